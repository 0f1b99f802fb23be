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

    def split(self, keys: list[Hashable]) -> tuple[list[Any], list[int]]:
        """Cached values (None where missing) and the indices still to compute."""
        values: list[Any] = [None] * len(keys)
        if not self.enabled:
            return values, list(range(len(keys)))
        missing = []
        for i, key in enumerate(keys):
            value = self.get(key)
            if value is _MISSING:
                missing.append(i)
            else:
                values[i] = value
        return values, missing

    def merge(
        self, keys: list[Hashable], values: list[Any], missing: list[int], fresh: list[Any]
    ) -> list[Any]:
        """``values`` with ``fresh`` filled in at ``missing`` (and remembered)."""
        for i, value in zip(missing, fresh, strict=True):
            values[i] = value
            if self.enabled:
                self.put(keys[i], value)
        return values
