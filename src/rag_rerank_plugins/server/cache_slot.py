"""The semantic cache each app state has built, if any: one slot that both the semantic-cache
routes (which fill it) and ``GET /metrics`` (which reads its stats) import, so neither imports
the other (the routes import the state, which imports the metrics)."""

from __future__ import annotations

import weakref
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ..semantic_cache import SemanticCache

__all__ = ["CACHES", "built_cache"]

#: App state -> its cache, built on the first request (an app that is never asked builds none).
CACHES: weakref.WeakKeyDictionary[Any, SemanticCache] = weakref.WeakKeyDictionary()


def built_cache(state: object) -> SemanticCache | None:
    """The app's cache if a request has built it, else None."""
    return CACHES.get(state)
