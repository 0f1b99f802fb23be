"""What the framework adapters (LangChain, LlamaIndex) share: the cache they accept, and the rule
that a cache failure never fails the caller.

Why here and not in each adapter: both wrap any cache with the same small surface
(:class:`CacheBackend`: the in-process ``SemanticCache`` and the HTTP ``RemoteSemanticCache``
both fit), and both must turn every cache error into a miss that is logged and counted the same
way, so a locked SQLite file or a server that is down costs an LLM call, never an exception.

A failure of the *transport* (no connection, no answer in time, 5xx/429 after the retries:
:func:`transport_failure`) says more than "this call failed": the next call to that server
will most likely wait as long for nothing. So an adapter does not store the answer of a call
whose lookup just failed that way, and a remote cache that keeps failing raises
:class:`CacheSkippedError` at once, without a request, for a while (its circuit breaker): the
adapters count both as ``skipped``, not as new errors.
"""

from __future__ import annotations

import logging
import threading
from collections import OrderedDict
from collections.abc import Hashable
from typing import Any, Protocol, runtime_checkable

from ..exceptions import RemoteTimeoutError, RemoteUnavailableError

__all__ = [
    "AdapterCounters",
    "CacheBackend",
    "CacheSkippedError",
    "RecentFailures",
    "transport_failure",
]

logger = logging.getLogger("rag_rerank_plugins.semantic_cache")


@runtime_checkable
class CacheBackend(Protocol):
    """The cache an adapter wraps: ``SemanticCache`` and ``RemoteSemanticCache`` fit. ``put``
    returns whether it stored (None, as older caches return, counts as stored)."""

    def lookup(self, query: str, namespace: str = ...) -> Any: ...

    def put(self, query: str, value: Any, namespace: str = ...) -> bool | None: ...

    async def alookup(self, query: str, namespace: str = ...) -> Any: ...

    async def aput(self, query: str, value: Any, namespace: str = ...) -> bool | None: ...

    def invalidate(self, namespace: str, *, subspaces: bool = False) -> int: ...

    def clear(self) -> None: ...


class CacheSkippedError(RemoteUnavailableError):
    """A cache call answered at once, without a request, because the cache server failed its
    last calls (see ``RemoteSemanticCache``'s ``breaker_failures``): nothing was looked up or
    stored. Adapters count it as ``skipped`` (a lookup also as a miss) and log it at debug
    level only, since the failures that opened the breaker were logged already."""


def transport_failure(exc: BaseException) -> bool:
    """Whether ``exc`` says the cache server could not be reached or did not answer in time
    (connection refused or reset, a timeout, 5xx/429 after the retries), as opposed to a
    refused request or a value that does not decode: then its next call would likely wait
    as long for nothing."""
    return isinstance(exc, RemoteUnavailableError | RemoteTimeoutError)


class RecentFailures:
    """The keys (question and namespace) whose lookup just failed on the transport, so the
    update that follows it in the same LLM call is skipped: without it a hung server cost
    every call two timeouts, the lookup's and the update's. Bounded (the oldest go first),
    since a lookup whose update never comes (the model failed) must not be kept forever."""

    def __init__(self, size: int = 1024) -> None:
        self._size = size
        self._lock = threading.Lock()
        self._keys: OrderedDict[Hashable, None] = OrderedDict()

    def add(self, key: Hashable) -> None:
        with self._lock:
            self._keys[key] = None
            self._keys.move_to_end(key)
            while len(self._keys) > self._size:
                self._keys.popitem(last=False)

    def pop(self, key: Hashable) -> bool:
        """Whether ``key``'s lookup failed on the transport (forgotten now)."""
        with self._lock:
            if key not in self._keys:
                return False
            del self._keys[key]
            return True


class AdapterCounters:
    """Thread-safe hits, misses, updates, errors and skipped calls of one adapter;
    :meth:`failed` logs.

    Every lookup ends as one hit or one miss (a failed or skipped one is a miss too), so
    ``hits / (hits + misses)`` is the hit rate the callers saw. ``skipped``: calls not made
    because the cache server was failing (:class:`CacheSkippedError`, or an update after a
    lookup that failed on the transport)."""

    def __init__(self, owner: str) -> None:
        self.owner = owner
        self._lock = threading.Lock()
        self._counts = {"hits": 0, "misses": 0, "updates": 0, "errors": 0, "skipped": 0}

    def count(self, what: str) -> None:
        with self._lock:
            self._counts[what] += 1

    def failed(self, action: str, exc: BaseException) -> None:
        """Count and log a cache failure the caller carries on without."""
        self.count("errors")
        logger.warning(
            "%s: %s failed, going on without the cache: %s: %s",
            self.owner,
            action,
            type(exc).__name__,
            exc,
        )

    def lookup_failed(self, exc: BaseException) -> bool:
        """Count a lookup that raised as a miss (and an error, logged, or a skipped call);
        whether it failed on the transport (then skip the update that follows)."""
        self.count("misses")
        if isinstance(exc, CacheSkippedError):
            self.skipped("lookup", exc)
            return True
        self.failed("lookup", exc)
        return transport_failure(exc)

    def update_failed(self, action: str, exc: BaseException) -> None:
        """Count an update that raised: skipped by the breaker, or an error (logged)."""
        if isinstance(exc, CacheSkippedError):
            self.skipped(action, exc)
        else:
            self.failed(action, exc)

    def skipped(self, action: str, reason: BaseException | str) -> None:
        """Count a call not made since the cache server is failing (logged at debug level:
        the failures that led here were logged as warnings already)."""
        self.count("skipped")
        logger.debug("%s: %s skipped: %s", self.owner, action, reason)

    def snapshot(self, cache: Any) -> dict[str, Any]:
        """The counts, plus ``cache.stats()`` under ``cache`` (its error, if it fails)."""
        with self._lock:
            counts: dict[str, Any] = dict(self._counts)
        stats = getattr(cache, "stats", None)
        if callable(stats):
            try:
                counts["cache"] = stats()
            except Exception as exc:  # a remote cache that is down
                counts["cache"] = {"error": f"{type(exc).__name__}: {exc}"}
        return counts
