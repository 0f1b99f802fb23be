"""Request size: what the server accepts, and how texts are packed into requests under it.

Requests are split by count *and* by bytes. :class:`RequestLimits` says how large one request
may be (the ``max_request_bytes`` option, else what the protocol's limits discovery, ``GET
/info``, advertised, else :data:`DEFAULT_MAX_REQUEST_BYTES`; and the server's text count limit).
:func:`pack` measures each text as the client sends it (compact UTF-8 JSON, :func:`json_bytes`),
cuts a text too large for a request even alone to its longest prefix that fits
(:func:`truncate_json`, unless ``truncate=False``), and :func:`plan_chunks` packs the texts, in
order, into as few contiguous requests as both limits allow. Pure functions: no I/O, no httpx.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ...exceptions import InvalidInputError

if TYPE_CHECKING:
    from .protocols import ServerInfo
    from .settings import RemoteSettings

__all__ = [
    "DEFAULT_MAX_REQUEST_BYTES",
    "HEADROOM_BYTES",
    "Packed",
    "RequestLimits",
    "json_bytes",
    "pack",
    "plan_chunks",
    "truncate_json",
]

#: Request body limit assumed when neither the option nor ``GET /info`` gives one (TEI, Cohere,
#: infinity): nginx's default ``client_max_body_size``, and below TEI's 2 MB payload limit.
DEFAULT_MAX_REQUEST_BYTES = 1024 * 1024
#: Bytes every body keeps free below the limit: the envelope is measured without texts, and a
#: few fields grow with the number of texts (``top_n``: a few digits).
HEADROOM_BYTES = 64


@dataclass(frozen=True)
class RequestLimits:
    """How large one request may be: body bytes, and texts (None: only ``batch_size``)."""

    max_bytes: int
    max_items: int | None
    source: str  # where max_bytes comes from, for messages

    @classmethod
    def resolve(cls, settings: RemoteSettings, info: ServerInfo) -> RequestLimits:
        """The option wins, then what the server advertised, then the default."""
        if settings.max_request_bytes is not None:
            max_bytes, source = settings.max_request_bytes, "option max_request_bytes"
        elif info.max_request_bytes is not None:
            max_bytes, source = info.max_request_bytes, "advertised by the server's GET /info"
        else:
            max_bytes, source = DEFAULT_MAX_REQUEST_BYTES, "the default; set max_request_bytes"
        return cls(max_bytes, info.max_client_batch_size, source)


def plan_chunks(
    sizes: Sequence[int],
    *,
    max_items: int,
    max_bytes: int,
    overhead: int = 0,
    separator: int = 1,
) -> list[range]:
    """Split items, in order, into contiguous chunks of one request each.

    ``sizes[i]`` is the encoded size of item ``i``, ``overhead`` the size of the request body
    without any item, ``separator`` the bytes between two items (``,`` in compact JSON). A chunk
    of ``n`` items holds at most ``max_items`` of them, and its body, ``overhead + sum(sizes) +
    separator * (n - 1)``, at most ``max_bytes``. Each chunk is as long as both limits allow, so
    no contiguous split needs fewer requests. An item that does not fit even alone is an
    :class:`InvalidInputError` (callers cut such items first, or report them better).
    """
    if max_items < 1:
        raise ValueError(f"max_items must be at least 1, got {max_items}")
    chunks: list[range] = []
    start, body = 0, overhead
    for i, size in enumerate(sizes):
        if overhead + size > max_bytes:
            raise InvalidInputError(
                f"Item {i} takes {overhead + size} bytes in a request on its own (with "
                f"{overhead} bytes of envelope), over the limit of {max_bytes} bytes."
            )
        count = i - start
        if count and (count >= max_items or body + separator + size > max_bytes):
            chunks.append(range(start, i))
            start, body = i, overhead + size
        else:
            body += size + (separator if count else 0)
    if start < len(sizes):
        chunks.append(range(start, len(sizes)))
    return chunks


def json_bytes(value: Any) -> bytes:
    """``value`` as the client sends it: compact JSON in UTF-8 (what httpx's ``json=`` does)."""
    try:
        return json.dumps(
            value, ensure_ascii=False, separators=(",", ":"), allow_nan=False
        ).encode()
    except UnicodeEncodeError as exc:
        raise InvalidInputError(
            f"Text is not valid Unicode ({exc.reason} at character {exc.start}: a lone surrogate) "
            "and cannot be sent as JSON; decode the source with errors='replace'."
        ) from None


def truncate_json(text: str, max_bytes: int) -> str:
    """The longest prefix of ``text`` whose JSON string (quotes and escapes included) takes at
    most ``max_bytes`` bytes in UTF-8; whole characters only."""
    if len(json_bytes(text)) <= max_bytes:
        return text
    # Every character takes at least one byte, and the quotes two: a bound for the search.
    lo, hi = 0, min(len(text), max(max_bytes - 2, 0))
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if len(json_bytes(text[:mid])) <= max_bytes:
            lo = mid
        else:
            hi = mid - 1
    return text[:lo]


@dataclass(frozen=True)
class Packed:
    """The requests planned for some texts."""

    texts: list[str]  # the texts to send, cut where one did not fit in a request
    chunks: list[range]  # positions in ``texts``, one range per request
    truncated: int  # how many texts were cut
    longest: int  # the largest original size of a cut text, in bytes


def pack(
    texts: Sequence[str],
    positions: Sequence[int],
    *,
    overhead: int,
    limits: RequestLimits,
    batch_size: int,
    truncate: bool,
    what: str,
) -> Packed:
    """Plan the requests for ``texts`` (``positions``: their indices in the caller's input,
    for messages), each body of ``overhead`` bytes plus its texts under ``limits``."""
    budget = limits.max_bytes - HEADROOM_BYTES
    room = budget - overhead  # for one text alone in a request
    if room < len(b'""'):
        raise InvalidInputError(
            f"{what}: the request envelope (with the query, when reranking) takes {overhead} "
            f"bytes; with the {HEADROOM_BYTES} bytes kept free under the request limit of "
            f"{limits.max_bytes} bytes ({limits.source}), no text fits beside it. Raise the "
            "limit (the server's --max-request-bytes and the option max_request_bytes), or "
            "shorten the query when reranking."
        )
    out = list(texts)
    sizes = [len(json_bytes(text)) for text in out]
    truncated = longest = 0
    for i, size in enumerate(sizes):
        if size <= room:
            continue
        if not truncate:
            raise InvalidInputError(
                f"{what}: text {positions[i]} takes {size} bytes as JSON; with the envelope and "
                f"query ({overhead} bytes) it exceeds the request limit of {limits.max_bytes} "
                f"bytes ({limits.source}). Shorten it, raise the limit, or leave truncate=True "
                f"so that its first {room} bytes are sent (the model reads only its first "
                "max_length tokens anyway)."
            )
        out[i] = truncate_json(out[i], room)
        sizes[i] = len(json_bytes(out[i]))
        truncated, longest = truncated + 1, max(longest, size)
    max_items = min(batch_size, limits.max_items or batch_size)
    chunks = plan_chunks(sizes, max_items=max_items, max_bytes=budget, overhead=overhead)
    return Packed(out, chunks, truncated, longest)
