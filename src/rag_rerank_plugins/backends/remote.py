"""Remote backends: a model served over HTTP used exactly like a local one (extra ``remote``).

``backend="remote-reranker"`` and ``backend="remote-embedder"`` talk to a model server instead of
loading weights, so every adapter (LangChain compressor/embeddings, LlamaIndex postprocessor/
embedding) can use one model shared by many processes or machines. Three wire protocols:

* ``tei`` (default): Hugging Face text-embeddings-inference, ``POST /rerank`` and ``POST /embed``;
  also what ``rag-rerank serve`` speaks.
* ``cohere``: ``POST /v1/rerank`` and ``POST /v1/embed`` (Cohere's API shape; ``rag-rerank serve``
  answers both too).
* ``infinity``: michaelfeil/infinity, ``POST /rerank`` (``documents``) and ``POST /embeddings``
  (OpenAI shape).

The spec's ``model`` is either the server URL (``ModelSpec("http://10.0.0.5:8080",
backend="remote-reranker")``) or the model name the server knows, with the URL in the ``url``
option. Options (all plain values, so the spec stays a hashable pool key)::

    url            base URL when ``model`` is a model name
    model_name     model name to send when ``model`` is the URL (cohere/infinity need one)
    protocol       "tei" | "cohere" | "infinity"                            (default "tei")
    timeout        seconds to wait for an answer                              (default 30)
    connect_timeout seconds to wait for a connection                          (default 5)
    retries        extra attempts on 429, 5xx and connection errors           (default 3)
    backoff        first retry delay in seconds, doubled per attempt, jittered (default 0.25)
    max_backoff    cap on one delay, also on the server's Retry-After          (default 8)
    api_key_env    name of the environment variable holding the bearer token
    truncate       ask the server to truncate long inputs (TEI)             (default True)
    query_prompt_name  TEI ``prompt_name`` sent for queries (e.g. "query")  (default none)
    max_connections    connection pool size per client                         (default 32)
    verify         verify TLS certificates                                  (default True)
    max_request_bytes  largest request body the server (and any proxy) accepts
                   (default: what ``GET /info`` advertises, else 1 MiB)

Requests are split by count *and* by bytes. The client asks ``GET /info`` once (``rag-rerank
serve`` advertises ``max_request_bytes`` and ``max_client_batch_size``, TEI the latter), takes the
``max_request_bytes`` option over it when given and 1 MiB when neither says, then packs texts, in
order, into requests of at most ``batch_size`` texts (and the server's batch limit) whose encoded
JSON body, query and envelope included, stays under that limit minus ``HEADROOM_BYTES``
(:func:`plan_chunks`); results are mapped back to the input's positions. A text too large to fit
in a request even alone is cut to its longest prefix that fits (:func:`truncate_json`; a warning
says so). Rerankers and embedders read only their first ``max_length`` tokens (~512; 8192 for
long-context models), and a prefix of hundreds of KB holds far more than that, so the scores and
vectors are those of the whole text. With ``truncate=False`` such a text is an
:class:`InvalidInputError` instead, raised before anything is sent; so is a query that alone
fills a request.

Secrets never go into the spec (its label shows up in stats, metrics and logs): the token is read
from the environment variable named by ``api_key_env`` on every request, so rotation works.

One loaded remote model owns a pooled ``httpx.Client`` (thread-safe: the pool skips its call lock)
and one ``httpx.AsyncClient`` per event loop for :meth:`ascore_pairs`/:meth:`aembed`. Its device is
``"remote"``: after ``fork`` a child builds fresh clients instead of sharing sockets.
"""

from __future__ import annotations

import asyncio
import functools
import json
import logging
import math
import os
import random
import threading
import time
import weakref
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ..exceptions import (
    ConfigurationError,
    InvalidInputError,
    MissingDependencyError,
    RemoteAuthError,
    RemoteError,
    RemoteRequestError,
    RemoteTimeoutError,
    RemoteUnavailableError,
)
from .base import EmbedderModel, ModelProvider, RerankerModel, Task
from .options import REMOTE_OPTIONS

if TYPE_CHECKING:
    import httpx

    from ..spec import ModelSpec

__all__ = [
    "PROTOCOLS",
    "RemoteEmbedder",
    "RemoteReranker",
    "RemoteSettings",
    "load_embedder",
    "load_reranker",
]

logger = logging.getLogger(__name__)

PROTOCOLS = ("tei", "cohere", "infinity")
#: Statuses worth another attempt: overloaded, or a server/gateway failure that may be transient.
RETRY_STATUSES = frozenset({429, 500, 502, 503, 504})
_SECRET_OPTIONS = ("api_key", "token", "bearer", "password", "authorization")
_OPTIONS = REMOTE_OPTIONS
#: Request body limit assumed when neither the option nor ``GET /info`` gives one (TEI, Cohere,
#: infinity): nginx's default ``client_max_body_size``, and below TEI's 2 MB payload limit.
DEFAULT_MAX_REQUEST_BYTES = 1024 * 1024
#: The smallest ``max_request_bytes`` option accepted.
MIN_REQUEST_BYTES = 1024
#: Bytes every body keeps free below the limit: the envelope is measured without texts, and a
#: few fields grow with the number of texts (``top_n``: a few digits).
HEADROOM_BYTES = 64


def _httpx() -> Any:
    try:
        import httpx
    except ImportError:
        raise MissingDependencyError("httpx", "remote", "The remote backends") from None
    return httpx


def _is_url(text: str) -> bool:
    return text.startswith(("http://", "https://"))


@dataclass(frozen=True)
class RemoteSettings:
    """The remote options of one spec, validated once at load time."""

    base_url: str
    model_name: str | None
    protocol: str
    timeout: float = 30.0
    connect_timeout: float = 5.0
    retries: int = 3
    backoff: float = 0.25
    max_backoff: float = 8.0
    api_key_env: str | None = None
    truncate: bool = True
    query_prompt_name: str | None = None
    max_connections: int = 32
    verify: bool = True
    max_request_bytes: int | None = None

    @classmethod
    def from_spec(cls, spec: ModelSpec) -> RemoteSettings:
        options = spec.options_dict
        for key in options:
            if key.lower() in _SECRET_OPTIONS:
                raise ConfigurationError(
                    f"Do not put secrets in a spec (option {key!r}): specs are shown in stats, "
                    "metrics and logs. Export the token in an environment variable and name it "
                    "with the option api_key_env='MY_TOKEN_VAR'."
                )
        unknown = sorted(set(options) - _OPTIONS)
        if unknown:
            raise ConfigurationError(
                f"Unknown remote backend option(s) {', '.join(map(repr, unknown))}; "
                f"valid options: {', '.join(sorted(_OPTIONS))}."
            )
        if spec.max_length is not None:
            raise ConfigurationError(
                "max_length cannot be set on a remote spec: the server fixes it when it loads "
                "the model. Set it there (e.g. `rag-rerank serve --max-length N`)."
            )
        base_url: Any
        if _is_url(spec.model):
            base_url, model_name = spec.model, options.get("model_name")
            if options.get("url") not in (None, spec.model):
                raise ConfigurationError(
                    f"The spec names two URLs ({spec.model!r} and url={options['url']!r}); "
                    "give the URL once, as the model or as the url option."
                )
        else:
            base_url, model_name = options.get("url"), options.get("model_name", spec.model)
            if not isinstance(base_url, str) or not _is_url(base_url):
                raise ConfigurationError(
                    f"The remote backend needs the server's URL: use model='http://host:port' or "
                    f"keep model={spec.model!r} and pass the option url='http://host:port' "
                    f"(got url={base_url!r})."
                )
        protocol = str(options.get("protocol", "tei")).lower()
        if protocol not in PROTOCOLS:
            raise ConfigurationError(
                f"Unknown remote protocol {protocol!r}; use one of {', '.join(PROTOCOLS)}."
            )
        if protocol in ("cohere", "infinity") and not model_name:
            raise ConfigurationError(
                f"Protocol {protocol!r} sends a model name with every request: pass the option "
                "model_name='...' (or use the model name as the spec's model and url=...)."
            )
        api_key_env = options.get("api_key_env")
        if api_key_env is not None and not os.environ.get(str(api_key_env)):
            raise ConfigurationError(
                f"Option api_key_env={api_key_env!r} names an environment variable that is not "
                f"set. Export the server's token first: export {api_key_env}=..."
            )
        try:
            settings = cls(
                base_url=str(base_url).rstrip("/"),
                model_name=str(model_name) if model_name else None,
                protocol=protocol,
                timeout=float(options.get("timeout", 30.0)),
                connect_timeout=float(options.get("connect_timeout", 5.0)),
                retries=int(options.get("retries", 3)),
                backoff=float(options.get("backoff", 0.25)),
                max_backoff=float(options.get("max_backoff", 8.0)),
                api_key_env=str(api_key_env) if api_key_env is not None else None,
                truncate=bool(options.get("truncate", True)),
                query_prompt_name=options.get("query_prompt_name"),
                max_connections=int(options.get("max_connections", 32)),
                verify=bool(options.get("verify", True)),
                max_request_bytes=(
                    int(options["max_request_bytes"])
                    if options.get("max_request_bytes") is not None
                    else None
                ),
            )
        except (TypeError, ValueError) as exc:
            raise ConfigurationError(f"Invalid remote backend option: {exc}") from None
        if settings.timeout <= 0 or settings.connect_timeout <= 0:
            raise ConfigurationError("Remote timeouts must be positive numbers of seconds.")
        if settings.retries < 0 or settings.backoff < 0 or settings.max_backoff < 0:
            raise ConfigurationError("retries, backoff and max_backoff must not be negative.")
        if settings.max_connections < 1:
            raise ConfigurationError("max_connections must be at least 1.")
        if (
            settings.max_request_bytes is not None
            and settings.max_request_bytes < MIN_REQUEST_BYTES
        ):
            raise ConfigurationError(
                f"max_request_bytes must be at least {MIN_REQUEST_BYTES} (bytes of one request "
                f"body), got {settings.max_request_bytes}."
            )
        return settings


# -- request size: what the server accepts, and how texts are packed into requests -------------


def _positive_int(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else None


@dataclass(frozen=True)
class RequestLimits:
    """How large one request may be: body bytes, and texts (None: only ``batch_size``)."""

    max_bytes: int
    max_items: int | None
    source: str  # where max_bytes comes from, for messages

    @classmethod
    def resolve(cls, settings: RemoteSettings, info: dict[str, Any] | None) -> RequestLimits:
        """The option wins, then what ``GET /info`` advertised, then the default."""
        info = info or {}
        advertised = _positive_int(info.get("max_request_bytes"))
        if settings.max_request_bytes is not None:
            max_bytes, source = settings.max_request_bytes, "option max_request_bytes"
        elif advertised is not None:
            max_bytes, source = advertised, "advertised by the server's GET /info"
        else:
            max_bytes, source = DEFAULT_MAX_REQUEST_BYTES, "the default; set max_request_bytes"
        return cls(max_bytes, _positive_int(info.get("max_client_batch_size")), source)


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


def _json_bytes(value: Any) -> bytes:
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
    if len(_json_bytes(text)) <= max_bytes:
        return text
    # Every character takes at least one byte, and the quotes two: a bound for the search.
    lo, hi = 0, min(len(text), max(max_bytes - 2, 0))
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if len(_json_bytes(text[:mid])) <= max_bytes:
            lo = mid
        else:
            hi = mid - 1
    return text[:lo]


@dataclass(frozen=True)
class _Packed:
    texts: list[str]  # the texts to send, cut where one did not fit in a request
    chunks: list[range]  # positions in ``texts``, one range per request
    truncated: int  # how many texts were cut
    longest: int  # the largest original size of a cut text, in bytes


def _pack(
    texts: Sequence[str],
    positions: Sequence[int],
    *,
    overhead: int,
    limits: RequestLimits,
    batch_size: int,
    truncate: bool,
    what: str,
) -> _Packed:
    """Plan the requests for ``texts`` (``positions``: their indices in the caller's input)."""
    budget = limits.max_bytes - HEADROOM_BYTES
    room = budget - overhead  # for one text alone in a request
    if room < len(b'""'):
        raise InvalidInputError(
            f"{what}: the query and request envelope alone take {overhead} bytes, over the "
            f"request limit of {limits.max_bytes} bytes ({limits.source}). Shorten the query, or "
            "raise the limit (the server's --max-request-bytes and the option max_request_bytes)."
        )
    out = list(texts)
    sizes = [len(_json_bytes(text)) for text in out]
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
        sizes[i] = len(_json_bytes(out[i]))
        truncated, longest = truncated + 1, max(longest, size)
    max_items = min(batch_size, limits.max_items or batch_size)
    chunks = plan_chunks(sizes, max_items=max_items, max_bytes=budget, overhead=overhead)
    return _Packed(out, chunks, truncated, longest)


# -- the retry policy, shared by the sync and async paths ------------------------------------


def _retry_after(response: httpx.Response) -> float | None:
    value = response.headers.get("retry-after")
    if value is None:
        return None
    try:
        seconds = float(value)
    except ValueError:
        return None
    return seconds if seconds >= 0 and math.isfinite(seconds) else None


def _server_message(response: httpx.Response) -> str:
    """The error text a TEI/Cohere/infinity/FastAPI server put in its body, if any."""
    try:
        body = response.json()
    except ValueError:
        return response.text[:300].strip()
    if isinstance(body, dict):
        for key in ("error", "message", "detail"):
            if body.get(key):
                detail = body[key]
                return detail if isinstance(detail, str) else str(detail)[:300]
    return str(body)[:300]


class _Attempt:
    """What to do after one attempt: return the JSON, wait and retry, or raise."""

    __slots__ = ("delay", "error")

    def __init__(self, delay: float | None = None, error: RemoteError | None = None) -> None:
        self.delay = delay
        self.error = error


class _Client:
    """Pooled HTTP clients plus the retry loop, for one base URL."""

    def __init__(self, settings: RemoteSettings, what: str) -> None:
        self.settings = settings
        self.what = what
        self._httpx = _httpx()
        self._lock = threading.Lock()
        self._sync: httpx.Client | None = None
        self._async: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, httpx.AsyncClient] = (
            weakref.WeakKeyDictionary()
        )
        self._closed = False
        self._limits: RequestLimits | None = None

    def _client_kwargs(self) -> dict[str, Any]:
        s = self.settings
        httpx = self._httpx
        return {
            "timeout": httpx.Timeout(s.timeout, connect=s.connect_timeout),
            "limits": httpx.Limits(
                max_connections=s.max_connections, max_keepalive_connections=s.max_connections
            ),
            "verify": s.verify,
            "headers": {"user-agent": "rag-rerank-plugins remote backend"},
        }

    def sync_client(self) -> httpx.Client:
        client = self._sync
        if client is None:
            with self._lock:
                self._check_open()
                if self._sync is None:
                    self._sync = self._httpx.Client(**self._client_kwargs())
                client = self._sync
        return client

    def async_client(self) -> httpx.AsyncClient:
        loop = asyncio.get_running_loop()
        with self._lock:
            self._check_open()
            client = self._async.get(loop)
            if client is None or client.is_closed:
                client = self._async[loop] = self._httpx.AsyncClient(**self._client_kwargs())
            return client

    def _check_open(self) -> None:
        if self._closed:
            raise RemoteError(f"{self.what}: the client was closed (the model was released).")

    def headers(self) -> dict[str, str]:
        env = self.settings.api_key_env
        if env is None:
            return {}
        token = os.environ.get(env)
        if not token:
            raise RemoteAuthError(
                f"{self.what}: environment variable {env} (option api_key_env) is empty; export "
                "the server's bearer token there."
            )
        return {"authorization": f"Bearer {token}"}

    def _delay(self, attempt: int, hint: float | None) -> float:
        s = self.settings
        delay = min(s.max_backoff, s.backoff * (2**attempt)) * random.uniform(0.5, 1.0)
        if hint is not None:
            delay = max(delay, min(hint, s.max_backoff))
        return delay

    def judge(
        self, url: str, attempt: int, response: httpx.Response | None, exc: BaseException | None
    ) -> _Attempt:
        """Classify one attempt (``response`` or transport ``exc``)."""
        httpx = self._httpx
        retries = self.settings.retries
        if exc is not None:
            connection_failed = isinstance(
                exc,
                (
                    httpx.ConnectError,
                    httpx.ConnectTimeout,
                    httpx.PoolTimeout,
                    httpx.RemoteProtocolError,
                    httpx.ReadError,
                    httpx.WriteError,
                ),
            )
            if isinstance(exc, httpx.TimeoutException) and not connection_failed:
                return _Attempt(
                    error=RemoteTimeoutError(
                        f"{self.what}: {url} did not answer within {self.settings.timeout:g}s "
                        f"({type(exc).__name__}). Not retried, since the server may still be "
                        "working on it: raise the 'timeout' option or send smaller batches.",
                        url=url,
                    )
                )
            if attempt < retries:
                return _Attempt(delay=self._delay(attempt, None))
            return _Attempt(
                error=RemoteUnavailableError(
                    f"{self.what}: could not reach {url} after {attempt + 1} attempt(s): "
                    f"{type(exc).__name__}: {exc}. Check that the server is running and the URL "
                    "is right (`curl <url>/health`).",
                    url=url,
                )
            )
        assert response is not None
        status = response.status_code
        if status < 400:
            return _Attempt()
        message = _server_message(response)
        if status in RETRY_STATUSES:
            if attempt < retries:
                return _Attempt(delay=self._delay(attempt, _retry_after(response)))
            advice = (
                "it stayed overloaded; add replicas or raise its --max-concurrency/--max-pending"
                if status == 429
                else "it kept failing; check the server's logs"
            )
            return _Attempt(
                error=RemoteUnavailableError(
                    f"{self.what}: {url} answered HTTP {status} to all {attempt + 1} attempt(s) "
                    f"({advice}): {message}",
                    url=url,
                    status=status,
                )
            )
        if status in (401, 403):
            env = self.settings.api_key_env
            hint = (
                f"check the token in ${env}"
                if env
                else "the server wants a bearer token: export it and pass "
                "model_kwargs={'api_key_env': 'VAR_NAME'}"
            )
            return _Attempt(
                error=RemoteAuthError(
                    f"{self.what}: {url} refused the request with HTTP {status} ({hint}): "
                    f"{message}",
                    url=url,
                    status=status,
                )
            )
        hint = ""
        if status == 413:
            limits, self._limits = self._limits, None  # ask GET /info again on the next call
            packed = f" of up to {limits.max_bytes} bytes ({limits.source})" if limits else ""
            hint = (
                f" The client sent requests{packed}: a proxy on the way may take less. Set the "
                "option max_request_bytes to the smallest body limit between client and model "
                "(or lower batch_size)."
            )
        elif status == 404:
            hint = f" Is protocol={self.settings.protocol!r} the one this server speaks?"
        return _Attempt(
            error=RemoteRequestError(
                f"{self.what}: {url} rejected the request with HTTP {status}: "
                f"{message.rstrip('.')}.{hint}",
                url=url,
                status=status,
            )
        )

    # -- the server's request limits, asked once per client --------------------------------------

    def _probe_timeout(self) -> httpx.Timeout:
        s = self.settings
        timeout: httpx.Timeout = self._httpx.Timeout(min(s.timeout, 5.0), connect=s.connect_timeout)
        return timeout

    def _settle_limits(
        self, response: httpx.Response | None, exc: BaseException | None
    ) -> RequestLimits:
        """The limits after one ``GET /info`` (``response`` or transport ``exc``). A definite
        answer (200, or a 4xx such as TEI-less servers' 404) is cached for the client's life;
        a failure that may pass (no connection, 429, 5xx, 401/403) is not: asked again next call."""
        info: dict[str, Any] | None = None
        definite = False
        if response is not None:
            status = response.status_code
            definite = status not in RETRY_STATUSES and status not in (401, 403)
            if status == 200:
                try:
                    body = response.json()
                except ValueError:
                    body = None
                info = body if isinstance(body, dict) else None
        limits = RequestLimits.resolve(self.settings, info)
        if definite:
            self._limits = limits
            logger.debug(
                "rag-rerank remote: %s: requests of up to %d bytes (%s) and %s texts",
                self.what,
                limits.max_bytes,
                limits.source,
                limits.max_items or "batch_size",
            )
        else:
            why = response.status_code if response is not None else type(exc).__name__
            logger.debug("rag-rerank remote: %s: GET /info failed (%s)", self.what, why)
        return limits

    def limits(self) -> RequestLimits:
        """The request limits; the first call asks the server's ``GET /info``."""
        limits = self._limits
        if limits is not None:
            return limits
        client = self.sync_client()
        response: httpx.Response | None = None
        exc: BaseException | None = None
        try:
            response = client.get(
                self.settings.base_url + "/info",
                headers=self.headers(),
                timeout=self._probe_timeout(),
            )
        except self._httpx.TransportError as error:
            exc = error
        return self._settle_limits(response, exc)

    async def alimits(self) -> RequestLimits:
        """:meth:`limits` on the event loop's ``AsyncClient``."""
        limits = self._limits
        if limits is not None:
            return limits
        client = self.async_client()
        response: httpx.Response | None = None
        exc: BaseException | None = None
        try:
            response = await client.get(
                self.settings.base_url + "/info",
                headers=self.headers(),
                timeout=self._probe_timeout(),
            )
        except self._httpx.TransportError as error:
            exc = error
        return self._settle_limits(response, exc)

    # -- requests ----------------------------------------------------------------------------

    def _post_headers(self) -> dict[str, str]:
        return {"content-type": "application/json", **self.headers()}

    def post(self, path: str, body: bytes) -> Any:
        """POST the JSON ``body`` (already encoded: its size was planned) with retries."""
        url = self.settings.base_url + path
        client = self.sync_client()
        attempt = 0
        while True:
            response: httpx.Response | None = None
            exc: BaseException | None = None
            try:
                response = client.post(url, content=body, headers=self._post_headers())
            except self._httpx.TransportError as error:
                exc = error
            verdict = self.judge(url, attempt, response, exc)
            if verdict.error is not None:
                raise verdict.error
            if verdict.delay is None:
                assert response is not None
                return self._json(url, response)
            self._log_retry(url, verdict.delay, attempt, response, exc)
            time.sleep(verdict.delay)
            attempt += 1

    async def apost(self, path: str, body: bytes) -> Any:
        """:meth:`post` on the event loop's ``AsyncClient``."""
        url = self.settings.base_url + path
        client = self.async_client()
        attempt = 0
        while True:
            response: httpx.Response | None = None
            exc: BaseException | None = None
            try:
                response = await client.post(url, content=body, headers=self._post_headers())
            except self._httpx.TransportError as error:
                exc = error
            verdict = self.judge(url, attempt, response, exc)
            if verdict.error is not None:
                raise verdict.error
            if verdict.delay is None:
                assert response is not None
                return self._json(url, response)
            self._log_retry(url, verdict.delay, attempt, response, exc)
            await asyncio.sleep(verdict.delay)
            attempt += 1

    @staticmethod
    def _log_retry(
        url: str,
        delay: float,
        attempt: int,
        response: httpx.Response | None,
        exc: BaseException | None,
    ) -> None:
        """One log line per retry, for the sync and the async path alike."""
        logger.info(
            "rag-rerank remote: retrying %s in %.2fs (attempt %d: %s)",
            url,
            delay,
            attempt + 1,
            response.status_code if response is not None else type(exc).__name__,
        )

    def _json(self, url: str, response: httpx.Response) -> Any:
        try:
            return response.json()
        except ValueError:
            raise RemoteError(
                f"{self.what}: {url} answered HTTP {response.status_code} with a body that is not "
                f"JSON ({response.text[:120]!r}). Is this the model server's URL?",
                url=url,
                status=response.status_code,
            ) from None

    def close(self) -> None:
        with self._lock:
            self._closed = True
            sync, self._sync = self._sync, None
            self._async = weakref.WeakKeyDictionary()
        if sync is not None:
            sync.close()
        # AsyncClients hold sockets bound to their loop; they are dropped, not awaited here.


def _unexpected(what: str, url: str, body: Any, expected: str) -> RemoteError:
    return RemoteError(
        f"{what}: unexpected response from {url}: expected {expected}, got "
        f"{str(body)[:160]!r}. Check the 'protocol' option (tei, cohere or infinity).",
        url=url,
    )


def _normalize(vector: list[float]) -> list[float]:
    norm = math.sqrt(sum(v * v for v in vector))
    return [v / norm for v in vector] if norm else vector


# -- protocols -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Call:
    path: str
    payload: dict[str, Any]
    parse: Callable[[Any, str], list[Any]]


class _Protocol:
    """Builds requests and parses responses for one wire protocol."""

    def __init__(self, settings: RemoteSettings, what: str) -> None:
        self.s = settings
        self.what = what

    def _with_model(self, payload: dict[str, Any]) -> dict[str, Any]:
        if self.s.model_name:
            payload["model"] = self.s.model_name
        return payload

    def rerank(self, query: str, texts: Sequence[str]) -> _Call:
        n = len(texts)
        if self.s.protocol == "tei":
            payload: dict[str, Any] = {
                "query": query,
                "texts": list(texts),
                "raw_scores": False,
                "return_text": False,
                "truncate": self.s.truncate,
            }
            return _Call("/rerank", payload, lambda body, url: self._scores(body, url, n, None))
        path = "/v1/rerank" if self.s.protocol == "cohere" else "/rerank"
        payload = self._with_model(
            {"query": query, "documents": list(texts), "return_documents": False, "top_n": n}
        )
        if self.s.protocol == "infinity":
            payload["raw_scores"] = False
        return _Call(path, payload, lambda body, url: self._scores(body, url, n, "results"))

    def _scores(self, body: Any, url: str, n: int, key: str | None) -> list[float]:
        items = body.get(key) if key is not None and isinstance(body, dict) else body
        score_key = "score" if key is None else "relevance_score"
        expected = (
            f"a list of {{index, {score_key}}}"
            if key is None
            else f"{{'{key}': [{{index, {score_key}}}]}}"
        )
        if not isinstance(items, list):
            raise _unexpected(self.what, url, body, expected)
        scores: list[float | None] = [None] * n
        try:
            for item in items:
                scores[int(item["index"])] = float(item[score_key])
        except (KeyError, TypeError, ValueError, IndexError):
            raise _unexpected(self.what, url, body, expected) from None
        if any(score is None for score in scores):
            raise _unexpected(self.what, url, body, f"one score for each of the {n} texts")
        return [float(score) for score in scores]  # type: ignore[arg-type]

    def embed(self, texts: Sequence[str], is_query: bool, normalize: bool) -> _Call:
        n = len(texts)
        if self.s.protocol == "tei":
            payload: dict[str, Any] = {
                "inputs": list(texts),
                "normalize": normalize,
                "truncate": self.s.truncate,
            }
            if is_query and self.s.query_prompt_name:
                payload["prompt_name"] = self.s.query_prompt_name
            return _Call("/embed", payload, lambda body, url: self._vectors(body, url, n))
        if self.s.protocol == "cohere":
            payload = self._with_model(
                {
                    "texts": list(texts),
                    "input_type": "search_query" if is_query else "search_document",
                    "embedding_types": ["float"],
                    "truncate": "END" if self.s.truncate else "NONE",
                }
            )
            return _Call("/v1/embed", payload, lambda body, url: self._cohere(body, url, n))
        payload = self._with_model({"input": list(texts), "encoding_format": "float"})
        return _Call("/embeddings", payload, lambda body, url: self._openai(body, url, n))

    def _vectors(self, body: Any, url: str, n: int) -> list[list[float]]:
        if not isinstance(body, list) or len(body) != n:
            raise _unexpected(self.what, url, body, f"a list of {n} vectors")
        try:
            return [[float(x) for x in vector] for vector in body]
        except (TypeError, ValueError):
            raise _unexpected(self.what, url, body, "lists of numbers") from None

    def _cohere(self, body: Any, url: str, n: int) -> list[list[float]]:
        vectors = body.get("embeddings") if isinstance(body, dict) else None
        if isinstance(vectors, dict):
            vectors = vectors.get("float")
        return self._vectors(vectors, url, n)

    def _openai(self, body: Any, url: str, n: int) -> list[list[float]]:
        data = body.get("data") if isinstance(body, dict) else None
        if not isinstance(data, list):
            raise _unexpected(self.what, url, body, "{'data': [{index, embedding}]}")
        try:
            ordered = sorted(data, key=lambda item: int(item["index"]))
            vectors = [item["embedding"] for item in ordered]
        except (KeyError, TypeError, ValueError):
            raise _unexpected(self.what, url, body, "{'data': [{index, embedding}]}") from None
        return self._vectors(vectors, url, n)


# -- the loaded models ---------------------------------------------------------------------------


def _group_by_query(pairs: Sequence[tuple[str, str]]) -> dict[str, list[int]]:
    groups: dict[str, list[int]] = {}
    for i, (query, _text) in enumerate(pairs):
        groups.setdefault(query, []).append(i)
    return groups


@dataclass(frozen=True)
class _Request:
    """One planned request: its call, its encoded body, and where its results go."""

    positions: list[int]  # indices in the caller's input, in the order of the call's texts
    call: _Call
    body: bytes


class _RemoteModel:
    thread_safe = True
    device = "remote"
    dtype = "remote"

    def __init__(self, spec: ModelSpec, settings: RemoteSettings) -> None:
        self.settings = settings
        self.what = f"{spec.backend} {settings.base_url}"
        self.client = _Client(settings, self.what)
        self.protocol = _Protocol(settings, self.what)
        self._warned_truncation = False

    def close(self) -> None:
        self.client.close()

    def _requests(
        self,
        texts: Sequence[str],
        positions: Sequence[int],
        build: Callable[[Sequence[str]], _Call],
        limits: RequestLimits,
        batch_size: int,
    ) -> Iterator[_Request]:
        """Requests for ``texts``, each body under the limits; ``build`` makes the protocol's
        call for a list of texts (the same query, prompt and flags in every request)."""
        overhead = len(_json_bytes(build([]).payload))
        packed = _pack(
            texts,
            positions,
            overhead=overhead,
            limits=limits,
            batch_size=batch_size,
            truncate=self.settings.truncate,
            what=self.what,
        )
        if packed.truncated:
            self._log_truncation(packed, limits, overhead)
        for chunk in packed.chunks:
            call = build(packed.texts[chunk.start : chunk.stop])
            yield _Request([positions[i] for i in chunk], call, _json_bytes(call.payload))

    def _log_truncation(self, packed: _Packed, limits: RequestLimits, overhead: int) -> None:
        level = logging.DEBUG if self._warned_truncation else logging.WARNING
        self._warned_truncation = True
        logger.log(
            level,
            "rag-rerank remote: %s: cut %d text(s) of up to %d bytes to the %d bytes that fit in "
            "one request (limit %d bytes, %s); the model reads only its first max_length tokens. "
            "Pass truncate=False to get an error instead.",
            self.what,
            packed.truncated,
            packed.longest,
            limits.max_bytes - HEADROOM_BYTES - overhead,
            limits.max_bytes,
            limits.source,
        )

    def _parse(self, request: _Request, body: Any) -> list[Any]:
        return request.call.parse(body, self.settings.base_url + request.call.path)


class RemoteReranker(_RemoteModel, RerankerModel):
    """Scores pairs on a rerank server: one request per distinct query and chunk of texts that
    fits the server's limits (``batch_size`` texts, its body size)."""

    def _rerank_requests(
        self, pairs: Sequence[tuple[str, str]], batch_size: int, limits: RequestLimits
    ) -> Iterator[_Request]:
        for positions in _group_by_query(pairs).values():
            query = pairs[positions[0]][0]
            texts = [pairs[i][1] for i in positions]
            yield from self._requests(
                texts,
                positions,
                functools.partial(self.protocol.rerank, query),
                limits,
                batch_size,
            )

    def score_pairs(self, pairs: Sequence[tuple[str, str]], batch_size: int) -> list[float]:
        scores = [0.0] * len(pairs)
        if not pairs:
            return scores
        for request in self._rerank_requests(pairs, batch_size, self.client.limits()):
            body = self.client.post(request.call.path, request.body)
            # Rerank answers index into the request's own texts: map them back to the input.
            for i, score in zip(request.positions, self._parse(request, body), strict=True):
                scores[i] = score
        return scores

    async def ascore_pairs(
        self, pairs: Sequence[tuple[str, str]], batch_size: int = 32
    ) -> list[float]:
        """Like :meth:`score_pairs` on the event loop's own pooled ``AsyncClient``."""
        scores = [0.0] * len(pairs)
        if not pairs:
            return scores
        for request in self._rerank_requests(pairs, batch_size, await self.client.alimits()):
            body = await self.client.apost(request.call.path, request.body)
            for i, score in zip(request.positions, self._parse(request, body), strict=True):
                scores[i] = score
        return scores

    async def arun(self, task: Task, items: Sequence[Any], batch_size: int) -> list[Any]:
        return await self.ascore_pairs(items, batch_size)


class RemoteEmbedder(_RemoteModel, EmbedderModel):
    """Embeds texts on an embedding server, in requests that fit its limits (``batch_size``
    texts, its body size)."""

    def __init__(self, spec: ModelSpec, settings: RemoteSettings) -> None:
        super().__init__(spec, settings)
        self._dimension: int | None = None

    @property
    def dimension(self) -> int:
        if self._dimension is None:
            self.embed(["dimension probe"], batch_size=1, is_query=False)
        assert self._dimension is not None
        return self._dimension

    def _finish(self, vectors: list[list[float]], normalize: bool) -> list[list[float]]:
        if vectors:
            self._dimension = len(vectors[0])
        # Normalising here too makes normalize=True hold whatever the server's defaults are.
        return [_normalize(v) for v in vectors] if normalize else vectors

    def _embed_requests(
        self,
        texts: Sequence[str],
        batch_size: int,
        is_query: bool,
        normalize: bool,
        limits: RequestLimits,
    ) -> Iterator[_Request]:
        return self._requests(
            texts,
            range(len(texts)),
            lambda chunk: self.protocol.embed(chunk, is_query, normalize),
            limits,
            batch_size,
        )

    def embed(
        self,
        texts: Sequence[str],
        *,
        batch_size: int,
        is_query: bool,
        normalize: bool = False,
        prompt: str | None = None,
    ) -> list[list[float]]:
        vectors: list[list[float]] = []
        if not texts:
            return vectors
        texts, limits = _with_prompt(texts, prompt), self.client.limits()
        for request in self._embed_requests(texts, batch_size, is_query, normalize, limits):
            body = self.client.post(request.call.path, request.body)
            vectors.extend(self._parse(request, body))  # requests follow the input's order
        return self._finish(vectors, normalize)

    async def aembed(
        self,
        texts: Sequence[str],
        *,
        batch_size: int = 32,
        is_query: bool = False,
        normalize: bool = False,
        prompt: str | None = None,
    ) -> list[list[float]]:
        """Like :meth:`embed` on the event loop's own pooled ``AsyncClient``."""
        vectors: list[list[float]] = []
        if not texts:
            return vectors
        texts, limits = _with_prompt(texts, prompt), await self.client.alimits()
        for request in self._embed_requests(texts, batch_size, is_query, normalize, limits):
            body = await self.client.apost(request.call.path, request.body)
            vectors.extend(self._parse(request, body))
        return self._finish(vectors, normalize)

    async def arun(self, task: Task, items: Sequence[Any], batch_size: int) -> list[Any]:
        return await self.aembed(
            items,
            batch_size=batch_size,
            is_query=task.is_query,
            normalize=task.normalize,
            prompt=task.prompt,
        )


def _with_prompt(texts: Sequence[str], prompt: str | None) -> list[str]:
    """Servers know no per-request instruction: it is prepended, as sentence-transformers does."""
    return [prompt + text for text in texts] if prompt else list(texts)


def load_reranker(spec: ModelSpec, provider: ModelProvider) -> RemoteReranker:
    """Loader of ``backend="remote-reranker"``: validates options, contacts nothing yet."""
    _httpx()
    return RemoteReranker(spec, RemoteSettings.from_spec(spec))


def load_embedder(spec: ModelSpec, provider: ModelProvider) -> RemoteEmbedder:
    """Loader of ``backend="remote-embedder"``: validates options, contacts nothing yet."""
    _httpx()
    return RemoteEmbedder(spec, RemoteSettings.from_spec(spec))
