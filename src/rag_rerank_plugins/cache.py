"""Computing each input once: a small thread-safe LRU cache with a time-to-live (scores and
query embeddings, across calls) and :func:`distinct` / :func:`spread` (repeats inside one call).

Why not functools.lru_cache: entries must expire (documents and models change), the cache must
be per model (released with it), and hit/miss counts must reach ``stats()``.

Why repeats in one call are computed once: retrievers return the same chunk twice (two sources,
overlapping indexes), and two copies scored in passes of different shapes can differ in their
last float bits. Stock rerankers score copies side by side and rank the tie in input order
(``sorted`` is stable); ours then ranked the copies by those last bits, so which document (and
which metadata) came first changed from run to run. One computation per distinct item makes the
tie exact, and the ranking keeps input order, as stock's does.

Why a long text is held by its digest: the caches are bounded by entry count, and a key holds its
texts. 1024 queries of 1 MB pinned 1 GiB until release. A string longer than
:data:`LONG_TEXT` characters is therefore keyed by a 32-byte BLAKE2b digest of its UTF-8 bytes
(collisions are out of reach), so an entry costs its value plus at most a few hundred bytes.
"""

from __future__ import annotations

import hashlib
import threading
import time
from collections import OrderedDict
from collections.abc import Hashable
from typing import Any

__all__ = ["TTLCache", "distinct", "spread"]

_MISSING = object()

#: Strings longer than this many characters are keyed by digest (see the module docstring).
LONG_TEXT = 256


def _digest(text: str) -> tuple[str, bytes]:
    data = text.encode("utf-8", "surrogatepass")  # a lone surrogate is a text too
    return ("blake2b", hashlib.blake2b(data, digest_size=32).digest())


def compact_key(key: Hashable) -> Hashable:
    """``key`` with every long string (itself, or an item of a tuple) replaced by its digest."""
    if isinstance(key, str):
        return _digest(key) if len(key) > LONG_TEXT else key
    if isinstance(key, tuple) and any(isinstance(k, str) and len(k) > LONG_TEXT for k in key):
        return tuple(_digest(k) if isinstance(k, str) and len(k) > LONG_TEXT else k for k in key)
    return key


def distinct(items: list[Hashable]) -> tuple[list[Hashable], list[int]]:
    """The distinct items, in first-seen order, and for every item its position among them."""
    position: dict[Hashable, int] = {}
    slots = [position.setdefault(item, len(position)) for item in items]
    if len(position) == len(items):
        return items, slots
    return list(position), slots


def spread(results: list[Any], slots: list[int]) -> list[Any]:
    """One result per original item (``slots`` from :func:`distinct`). A repeat of a list
    result (a vector) gets a copy of its own, so a caller who edits one vector in place does
    not change its twin."""
    if len(results) == len(slots):
        return results
    seen: set[int] = set()
    out = []
    for slot in slots:
        value = results[slot]
        if slot in seen and isinstance(value, list):
            value = list(value)
        seen.add(slot)
        out.append(value)
    return out


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
        key = compact_key(key)
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
        key = compact_key(key)
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
