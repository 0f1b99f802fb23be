"""``RemoteSemanticCache``: the semantic cache served by ``rag-rerank serve --semantic-cache``,
with the in-process cache's ``lookup``/``put`` API.

Why: one process can keep the cache in memory, several processes on one host can share a SQLite
file, but processes on several hosts need one owner of the entries and of the embedder that
compares them. That owner is the server (:mod:`rag_rerank_plugins.server.routers.semantic_cache`);
this client is what the LangChain and LlamaIndex adapters (or your code) hold instead of a
:class:`~rag_rerank_plugins.semantic_cache.SemanticCache`.

The HTTP part is the remote backends' client (:class:`~..backends.remote.client.RemoteClient`):
pooled connections (one ``httpx.AsyncClient`` per event loop), retries with backoff on
connection errors, 429 and 5xx, and errors that say what to do. httpx is imported on first use
(extra ``remote``). Errors are raised here; the adapters turn them into misses.

A cache must never cost more than the call it saves, so the client waits little and stops
asking a server that keeps failing: a 1 s timeout (connect and answer; a lookup is one query
embedding) by default, and a circuit breaker. After ``breaker_failures`` calls in a row failed on
the transport (no connection, no answer in time, 5xx/429 after the retries), ``lookup``,
``put`` and ``stats`` raise :class:`~._adapter.CacheSkippedError` at once, without a request,
for ``breaker_cooldown`` seconds; then one call tries the server again (the others are still
skipped meanwhile), and its success closes the breaker. Without it a hung server added two
10 s timeouts to every LLM call, forever. ``invalidate`` and ``clear`` always go to the server:
an invalidation must fail loudly, never be skipped.
"""

from __future__ import annotations

import json
import logging
import math
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar

from ..backends.remote.client import RemoteClient, Send, Wait
from ..backends.remote.protocols import get_protocol
from ..backends.remote.settings import RemoteSettings, _refuse_url_secrets, is_url
from ..exceptions import ConfigurationError, InvalidInputError, RemoteRequestError
from ..spec import redact_urls
from ._adapter import CacheSkippedError, transport_failure
from ._helpers import SharedResource, _valid_text

if TYPE_CHECKING:
    from ..backends.remote.client import Plan

__all__ = ["CacheSkippedError", "RemoteCacheHit", "RemoteSemanticCache"]

logger = logging.getLogger("rag_rerank_plugins.semantic_cache")
T = TypeVar("T")

#: The server's path prefix (:data:`rag_rerank_plugins.server.routers.semantic_cache.PREFIX`).
PREFIX = "/v1/semantic-cache"


@dataclass(frozen=True)
class RemoteCacheHit:
    """A hit answered by the server: the same fields as the in-process ``CacheHit``."""

    value: Any
    query: str
    score: float
    namespace: str
    age_s: float


def _check_query(query: Any) -> str:
    if not isinstance(query, str):
        raise InvalidInputError(f"query must be a str, got {type(query).__name__}.")
    if not query.strip():
        raise InvalidInputError("query is empty; pass the question text to look up or store.")
    _valid_text(query, "query")  # as the in-process cache (the server would answer 422)
    return query


def _check_namespace(namespace: Any) -> str:
    if not isinstance(namespace, str) or not namespace.strip():
        raise InvalidInputError(f"namespace must be a non-empty str, got {namespace!r}.")
    _valid_text(namespace, "namespace")
    return namespace


def _encode(body: dict[str, Any]) -> bytes:
    try:
        return json.dumps(body, allow_nan=False, separators=(",", ":")).encode("utf-8")
    except (TypeError, ValueError) as exc:
        raise InvalidInputError(
            f"The value cannot be sent as JSON ({exc}). Store JSON values (str, numbers, bools, "
            "None, lists and dicts of them), e.g. a dict made with model.model_dump()."
        ) from None


class _Breaker:
    """The circuit breaker of one :class:`RemoteSemanticCache` (see the module's docstring).

    Closed: every call goes to the server. ``failures`` transport failures in a row open it:
    calls are refused (:class:`CacheSkippedError`) until ``cooldown`` seconds have passed;
    then the first call probes the server while the others are still refused. The probe's
    success closes it, its transport failure opens it for another ``cooldown``. Any answer
    from the server (a 4xx too) is a success: the server is there.
    """

    def __init__(self, what: str, failures: int, cooldown: float) -> None:
        self.what = what
        self.failures = failures
        self.cooldown = cooldown
        #: The time source (a test may replace it to pass the cool-down without waiting).
        self.clock: Callable[[], float] = time.monotonic
        self._lock = threading.Lock()
        self._in_a_row = 0
        self._open_until: float | None = None  # None: closed
        self._probing = False
        self._last = ""
        self._counts = {"transport_failures": 0, "skipped": 0}

    def enter(self, action: str) -> bool:
        """Let one call through, or raise :class:`CacheSkippedError` while open. True when this
        call is the one probing the server (it hands that back to :meth:`leave`)."""
        with self._lock:
            if self._open_until is None:
                return False
            left = self._open_until - self.clock()
            if left <= 0 and not self._probing:
                self._probing = True  # this call probes the server
                return True
            self._counts["skipped"] += 1
            when = f"in {left:.1f}s" if left > 0 else "once the call probing it ends"
            failed = f"{self._in_a_row} call(s) in a row (last: {self._last})"
        raise CacheSkippedError(
            f"{self.what}: {action} skipped without a request: the server failed {failed}; "
            f"it is tried again {when}. Check that the cache server is running and reachable, "
            "or tune the options breaker_failures and breaker_cooldown.",
        )

    def leave(self, exc: BaseException | None, probing: bool) -> None:
        """Record how the call let through by :meth:`enter` ended (``exc``: what it raised;
        ``probing``: what ``enter`` returned). Only the probe ends the probing: a call let in
        before the breaker opened (cancelled, say) must not let a second probe through."""
        with self._lock:
            if probing:
                self._probing = False
            if exc is not None and transport_failure(exc):
                self._counts["transport_failures"] += 1
                self._in_a_row += 1
                self._last = type(exc).__name__
                opened = self.cooldown > 0 and (probing or self._in_a_row >= self.failures)
                if opened:
                    self._open_until = self.clock() + self.cooldown
                in_a_row, last = self._in_a_row, self._last
            elif exc is None or getattr(exc, "status", None) is not None:  # it answered
                self._in_a_row, self._open_until = 0, None
                return
            else:  # no token, cancelled, interrupted: says nothing about the server
                return
        if opened:
            logger.warning(
                "%s: %d call(s) in a row failed (last: %s); lookups, puts and stats are "
                "skipped for %gs (misses for the adapters), then one call tries the server again.",
                self.what,
                in_a_row,
                last,
                self.cooldown,
            )

    def stats(self) -> dict[str, Any]:
        with self._lock:
            if self._open_until is None:
                state = "closed"
            elif self._probing:
                state = "probing"
            else:
                state = "open"
            return {"breaker": state, "failures_in_a_row": self._in_a_row, **self._counts}


class RemoteSemanticCache(SharedResource):
    """The cache of ``rag-rerank serve --semantic-cache ...`` at ``url``.

    ``api_key_env`` names the environment variable holding the server's bearer token (read on
    every request, so rotation works); ``timeout`` (each wait for the answer, and the whole
    answer), ``connect_timeout`` and ``retries`` as for the remote backends, but short by
    default (1 s): a cache that waits longer than the LLM call it saves is a loss. Raise them
    for a server far away or heavily loaded. ``breaker_failures`` transport failures in a row
    (no connection, no answer in time, 5xx/429 after the retries) make ``lookup``, ``put`` and
    ``stats`` raise :class:`CacheSkippedError` without a request for ``breaker_cooldown``
    seconds (0: never); then one call tries the server again. ``client_stats()`` counts those
    failures and the skipped calls.

    Example::

        cache = RemoteSemanticCache("http://cache-host:8080")
        cache.put("What does Art. 72 say?", {"answer": "..."}, namespace="legal-qa")
        hit = cache.lookup("What does article 72 say?", namespace="legal-qa")
    """

    def __init__(
        self,
        url: str,
        *,
        api_key_env: str | None = None,
        timeout: float = 1.0,
        connect_timeout: float = 1.0,
        retries: int = 2,
        max_connections: int = 32,
        verify: bool = True,
        breaker_failures: int = 3,
        breaker_cooldown: float = 30.0,
    ) -> None:
        if not isinstance(url, str) or not is_url(url):
            raise ConfigurationError(
                f"url must be the server's http(s) URL (e.g. 'http://127.0.0.1:8080'), got "
                f"{redact_urls(str(url))!r}."
            )
        _refuse_url_secrets(url)  # as the remote backends: no user:password@, no ?query
        settings = RemoteSettings(
            base_url=url.rstrip("/"),
            model_name=None,
            protocol="tei",
            timeout=float(timeout),
            connect_timeout=float(connect_timeout),
            retries=int(retries),
            api_key_env=api_key_env,
            max_connections=int(max_connections),
            verify=verify,
        )
        settings._check_ranges()
        if isinstance(breaker_failures, bool) or not isinstance(breaker_failures, int):
            raise ConfigurationError(
                f"breaker_failures must be an int >= 1, got {breaker_failures!r} (e.g. 3)."
            )
        if breaker_failures < 1:
            raise ConfigurationError(
                f"breaker_failures must be >= 1, got {breaker_failures} (e.g. 3; to never skip "
                "the server, set breaker_cooldown=0)."
            )
        try:
            cooldown = float(breaker_cooldown)
        except (TypeError, ValueError):
            cooldown = math.nan
        if not 0 <= cooldown < math.inf:
            raise ConfigurationError(
                "breaker_cooldown must be a finite number of seconds >= 0, got "
                f"{breaker_cooldown!r} (e.g. 30; 0 never skips the server)."
            )
        self.url = settings.base_url
        self._client = RemoteClient(settings, f"semantic cache {self.url}", get_protocol("tei"))
        self._breaker = _Breaker(f"semantic cache {self.url}", breaker_failures, cooldown)

    # -- requests ----------------------------------------------------------------------------

    def _post(self, path: str, body: dict[str, Any]) -> Plan[Any]:
        """The plan posting ``body``, encoded now: a value that is not JSON is refused before
        the breaker counts the call as one the server answered."""
        return self._post_plan(path, _encode(body))

    def _post_plan(self, path: str, content: bytes) -> Plan[Any]:
        try:
            return (yield from self._client.post_plan(PREFIX + path, content))
        except RemoteRequestError as exc:
            if exc.status == 404:
                raise RemoteRequestError(
                    f"{self.url} has no semantic cache ({PREFIX}{path} answered 404): start the "
                    "server with --semantic-cache memory (or sqlite:///path), or set "
                    "RAG_RERANK_SEMANTIC_CACHE.",
                    url=exc.url,
                    status=404,
                ) from None
            raise

    def _get(self, path: str) -> Plan[Any]:
        url = self.url + PREFIX + path
        attempt = 0
        while True:
            outcome = yield Send("GET", url, self._client.headers())
            assert outcome is not None
            delay = self._client._judge(url, attempt, outcome)  # the remote client's status table
            if delay is None:
                assert outcome.response is not None
                return self._client._json(url, outcome.response)
            yield Wait(delay)
            attempt += 1

    @staticmethod
    def _hit(answer: Any) -> RemoteCacheHit | None:
        if not isinstance(answer, dict) or not answer.get("hit"):
            return None
        score = float(answer["score"])
        return RemoteCacheHit(
            value=answer.get("value"),
            query=str(answer["query"]),
            score=score if math.isfinite(score) else 0.0,
            namespace=str(answer["namespace"]),
            age_s=float(answer.get("age_s") or 0.0),
        )

    def _lookup_body(self, query: str, namespace: str) -> dict[str, Any]:
        return {"query": _check_query(query), "namespace": _check_namespace(namespace)}

    def _put_body(self, query: str, value: Any, namespace: str) -> dict[str, Any]:
        return {
            "query": _check_query(query),
            "value": value,
            "namespace": _check_namespace(namespace),
        }

    # -- the SemanticCache API ---------------------------------------------------------------

    def _guarded(self, action: str, plan: Plan[T]) -> T:
        """Run ``plan`` through the circuit breaker (sync)."""
        probing = self._breaker.enter(action)
        try:
            answer = self._client.run(plan)
        except BaseException as exc:
            self._breaker.leave(exc, probing)
            raise
        self._breaker.leave(None, probing)
        return answer

    async def _aguarded(self, action: str, plan: Plan[T]) -> T:
        """Run ``plan`` through the circuit breaker (on the event loop)."""
        probing = self._breaker.enter(action)
        try:
            answer = await self._client.arun(plan)
        except BaseException as exc:
            self._breaker.leave(exc, probing)
            raise
        self._breaker.leave(None, probing)
        return answer

    def lookup(self, query: str, namespace: str = "default") -> RemoteCacheHit | None:
        """The server's hit for ``query`` in ``namespace``, or None. Raises
        :class:`CacheSkippedError` at once while the breaker is open."""
        body = self._lookup_body(query, namespace)
        return self._hit(self._guarded("lookup", self._post("/lookup", body)))

    @staticmethod
    def _stored(answer: Any) -> bool:
        return isinstance(answer, dict) and answer.get("stored") is True

    def put(self, query: str, value: Any, namespace: str = "default") -> bool:
        """Store ``value`` (JSON) for ``query`` in ``namespace`` on the server; False when the
        server's cache skipped it (its store failed: counted in the server's ``stats()``).
        Raises :class:`CacheSkippedError` at once while the breaker is open."""
        body = self._put_body(query, value, namespace)
        return self._stored(self._guarded("put", self._post("/put", body)))

    async def alookup(self, query: str, namespace: str = "default") -> RemoteCacheHit | None:
        body = self._lookup_body(query, namespace)
        return self._hit(await self._aguarded("lookup", self._post("/lookup", body)))

    async def aput(self, query: str, value: Any, namespace: str = "default") -> bool:
        body = self._put_body(query, value, namespace)
        return self._stored(await self._aguarded("put", self._post("/put", body)))

    def invalidate(self, namespace: str, *, subspaces: bool = False) -> int:
        """Drop one namespace on the server (with ``subspaces``, those under it too); the number
        of entries removed."""
        body: dict[str, Any] = {"namespace": _check_namespace(namespace)}
        if subspaces:  # only when asked: a server before this field refuses unknown fields
            body["subspaces"] = True
        answer = self._client.run(self._post("/invalidate", body))
        return int(answer.get("removed", 0)) if isinstance(answer, dict) else 0

    def clear(self) -> None:
        """Drop every entry on the server (every client's namespaces)."""
        self._client.run(self._post("/clear", {}))

    def stats(self) -> dict[str, Any]:
        """The server cache's ``stats()``, with this client's :meth:`client_stats` under
        ``client``. Goes through the breaker like a lookup (a metrics scrape must not wait on
        a hung server either): :class:`CacheSkippedError` while it is open; ``client_stats()``
        answers without the server."""
        answer: dict[str, Any] = self._guarded("stats", self._get("/stats"))
        if isinstance(answer, dict):
            answer["client"] = self.client_stats()
        return answer

    def client_stats(self) -> dict[str, Any]:
        """This client's side, without a request: the breaker's state (``closed``, ``open``,
        ``probing``), its transport failures in a row and in all, and the calls it skipped."""
        return self._breaker.stats()

    def close(self) -> None:
        """Close the pooled connections."""
        self._client.close()

    def __repr__(self) -> str:
        return f"RemoteSemanticCache({self.url!r})"
