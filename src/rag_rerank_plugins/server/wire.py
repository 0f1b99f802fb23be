"""Small pieces every protocol shares: the client's priority, vector encodings, billing units.

* :func:`priority_of` - the engine lane of a request. A client sends ``X-Priority: interactive``
  or ``bulk`` (any protocol), or the body field ``priority``: the same words, or Cohere's integer
  (0, the default, is the highest; anything above 0 is served as bulk). A body field wins over
  the header. Bulk work yields to interactive work of the same model (``EngineConfig``'s aging
  keeps it from starving).
* :func:`shorten` - OpenAI's ``dimensions`` for matryoshka embedders: the first ``n``
  components, normalised again to unit length (what the OpenAI API does for ``text-embedding-3``).
* :func:`base64_vector` - OpenAI's ``encoding_format="base64"``: the vector's little-endian
  float32 bytes, base64-encoded (what the ``openai`` client decodes with ``numpy.frombuffer``).
* :func:`search_units` - Cohere's rerank billing: one search unit per query with up to 100
  documents (each chunk of a chunked document counts as one document).
"""

from __future__ import annotations

import base64
import math
import struct
from collections.abc import Mapping, Sequence
from typing import Literal

from .errors import ApiError

__all__ = [
    "PRIORITY_HEADER",
    "Lane",
    "base64_vector",
    "priority_of",
    "search_units",
    "shorten",
]

Lane = Literal["interactive", "bulk"]

#: The request header naming the engine lane (``interactive`` or ``bulk``).
PRIORITY_HEADER = "x-priority"
_WORDS: dict[str, Lane] = {"interactive": "interactive", "bulk": "bulk"}
#: Documents per Cohere search unit.
DOCS_PER_SEARCH_UNIT = 100


def _lane(value: object, where: str) -> Lane:
    if isinstance(value, bool):
        pass
    elif isinstance(value, int):
        if value < 0:
            raise ApiError(400, f"{where} must be 0 or more (0 is the highest), got {value}.")
        return "interactive" if value == 0 else "bulk"
    elif isinstance(value, str):
        word = value.strip().lower()
        if word in _WORDS:
            return _WORDS[word]
        if word.isascii() and word.isdigit():  # "²" and "①" are digits int() refuses
            return _lane(int(word), where)
    raise ApiError(
        400,
        f"{where} must be 'interactive' or 'bulk' (or Cohere's integer priority: 0 = highest), "
        f"got {value!r}.",
    )


def priority_of(body_value: object, headers: Mapping[str, str] | None) -> Lane:
    """The lane of a request: the body's ``priority`` if given, else ``X-Priority``, else
    interactive. A value that is neither is a 400 naming where it came from."""
    if body_value is not None:
        return _lane(body_value, "The body field 'priority'")
    header = headers.get(PRIORITY_HEADER) if headers is not None else None
    if header is None:
        return "interactive"
    return _lane(header, "The X-Priority header")


def shorten(
    vectors: list[list[float]], dimensions: int | None, field: str, *, renormalize: bool = True
) -> list[list[float]]:
    """The first ``dimensions`` components of each vector, normalised again unless
    ``renormalize`` is False (None or the model's own size: unchanged, as
    the model made them). 400 when ``dimensions`` is larger than the
    model's own."""
    if dimensions is None or not vectors:
        return vectors
    size = len(vectors[0])
    if dimensions > size:
        raise ApiError(
            400,
            f"'{field}' is {dimensions}, but this model's vectors have {size} dimensions; ask for "
            f"{size} or fewer.",
        )
    if dimensions == size:
        return vectors
    out = []
    for vector in vectors:
        head = vector[:dimensions]
        if not renormalize:
            out.append(head)
            continue
        norm = math.hypot(*head)  # scaled: no underflow for tiny components
        out.append([v / norm for v in head] if norm else head)
    return out


def base64_vector(vector: Sequence[float]) -> str:
    """``vector`` as base64 of its little-endian float32 bytes (OpenAI's ``base64`` format)."""
    return base64.b64encode(struct.pack(f"<{len(vector)}f", *vector)).decode("ascii")


def search_units(documents: int) -> int:
    """Cohere search units of one rerank query over ``documents`` documents (or chunks)."""
    return max(1, math.ceil(documents / DOCS_PER_SEARCH_UNIT))
