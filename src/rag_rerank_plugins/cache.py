"""A small thread-safe LRU cache with a time-to-live, for scores and query embeddings.

Why not functools.lru_cache: entries must expire (documents and models change), the cache must
be per model (released with it), and hit/miss counts must reach ``stats()``.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from collections.abc import Hashable
from typing import Any

__all__ = ["TTLCache"]

_MISSING = object()


class TTLCache:
    def __init__(self, max_entries: int, ttl_s: float) -> None:
        self.max_entries = max_entries
        self.ttl_s = ttl_s
        self._data: OrderedDict[Hashable, tuple[float, Any]] = OrderedDict()
        self._lock = threading.Lock()
        self.hits = 0
        self.misses = 0

    @property
    def enabled(self) -> bool:
        return self.max_entries > 0

    def get(self, key: Hashable) -> Any:
        """The cached value, or ``TTLCache.MISSING``."""
        now = time.monotonic()
        with self._lock:
            entry = self._data.get(key, _MISSING)
            if entry is _MISSING or entry[0] < now:  # type: ignore[index]
                if entry is not _MISSING:
                    del self._data[key]
                self.misses += 1
                return _MISSING
            self._data.move_to_end(key)
            self.hits += 1
            return entry[1]  # type: ignore[index]

    def put(self, key: Hashable, value: Any) -> None:
        expires = time.monotonic() + self.ttl_s
        with self._lock:
            self._data[key] = (expires, value)
            self._data.move_to_end(key)
            while len(self._data) > self.max_entries:
                self._data.popitem(last=False)

    def clear(self) -> None:
        with self._lock:
            self._data.clear()

    def __len__(self) -> int:
        return len(self._data)

    MISSING = _MISSING
