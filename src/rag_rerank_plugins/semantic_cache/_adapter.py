"""What the framework adapters (LangChain, LlamaIndex) share: the cache they accept, and the rule
that a cache failure never fails the caller.

Why here and not in each adapter: both wrap any cache with the same small surface
(:class:`CacheBackend`: the in-process ``SemanticCache`` and the HTTP ``RemoteSemanticCache``
both fit), and both must turn every cache error into a miss that is logged and counted the same
way, so a locked SQLite file or a server that is down costs an LLM call, never an exception.
"""

from __future__ import annotations

import logging
import threading
from typing import Any, Protocol, runtime_checkable

__all__ = ["AdapterCounters", "CacheBackend"]

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


class AdapterCounters:
    """Thread-safe hits, misses, updates and errors of one adapter; :meth:`failed` logs."""

    def __init__(self, owner: str) -> None:
        self.owner = owner
        self._lock = threading.Lock()
        self._counts = {"hits": 0, "misses": 0, "updates": 0, "errors": 0}

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
