"""Where cached entries live: in this process (:class:`MemoryStore`) or in a SQLite file shared
by every process on the host (:class:`SQLiteStore`).

Why a store apart from the index: the vector index is an in-memory acceleration structure, rebuilt
from the store; the store is the truth (query text, vector, payload, timestamps) and the unit of
sharing. Several processes using one SQLite file each keep their own index and catch up with the
others' puts through :meth:`Store.changes` (cheap when nothing changed: SQLite's
``PRAGMA data_version``). Entries removed by another process (eviction, TTL) are noticed lazily,
when a lookup finds them missing.

SQLite runs in WAL mode with ``synchronous=NORMAL``: a committed put survives the writer being
killed (``kill -9``) at any point; an interrupted transaction is rolled back by the next opener.
Entries carry the embedder's identity (:func:`._helpers.cache_identity`: its label, plus a digest
of the full spec where the label hides part of a URL), so caches with different embedders can
share a file without comparing incomparable vectors.
"""

from __future__ import annotations

import secrets
import threading
import time
from abc import ABC, abstractmethod
from collections import OrderedDict
from collections.abc import Iterable
from dataclasses import dataclass
from typing import ClassVar

import numpy as np

__all__ = ["Cursor", "Entry", "MemoryStore", "Store", "in_namespace", "now"]


@dataclass
class Entry:
    id: int
    model: str
    namespace: str
    query: str
    vector: np.ndarray
    payload: bytes
    is_bytes: bool
    created: float


#: (store id, epoch, last id seen, store version): what a reader has already seen. The store id
#: names the storage itself (a SQLite file's random id, kept in the file): ids restart at 1 in a
#: new file, so a cursor of another file must reset the reader's index, never extend it (its ids
#: would name another file's rows, another tenant's answers).
Cursor = tuple[int, int, int, int]


def in_namespace(name: str, namespace: str, subspaces: bool) -> bool:
    """Whether an entry's namespace ``name`` is ``namespace`` (or, with ``subspaces``, one under
    it: ``namespace + ":..."``, as an adapter's per-context namespaces are under its model's)."""
    return name == namespace or (subspaces and name.startswith(namespace + ":"))


class Store(ABC):
    """The storage interface :class:`~.core.SemanticCache` uses. Every method may raise; the
    cache turns a failure into a miss (counted in ``stats()["errors"]``)."""

    #: True when :meth:`put` itself replaces an entry of the same model, namespace and query,
    #: atomically (the built-in stores). Otherwise the cache removes the copy it knows before
    #: putting, which two simultaneous puts (threads, processes) can both miss, leaving a dead
    #: duplicate that holds a ``max_entries`` slot.
    replaces_same_query: ClassVar[bool] = False

    @abstractmethod
    def put(
        self, entry: Entry, *, max_entries: int | None, ttl: float | None
    ) -> tuple[int, list[int]]:
        """Store ``entry`` (its ``id`` is ignored); return its id and the ids removed to respect
        ``max_entries`` (least recently used first) and ``ttl``. A store that sets
        :attr:`replaces_same_query` also removes, in the same atomic step, any entry of the
        same ``(model, namespace, query)`` (not listed: that is a replacement, not an
        eviction; readers drop the old copy when they index the new one)."""

    @abstractmethod
    def get(self, ids: Iterable[int]) -> dict[int, Entry]:
        """The entries still present among ``ids``."""

    @abstractmethod
    def touch(self, key: int, now: float) -> None:
        """Mark an entry used (least-recently-used order)."""

    @abstractmethod
    def remove(self, ids: Iterable[int]) -> None: ...

    @abstractmethod
    def invalidate(self, model: str | None, namespace: str, subspaces: bool = False) -> int:
        """Remove one namespace (of one embedder, or of all when ``model`` is None); with
        ``subspaces``, every namespace under it too (``namespace + ":..."``)."""

    @abstractmethod
    def clear(self) -> None: ...

    @abstractmethod
    def count(self) -> int: ...

    @abstractmethod
    def changes(self, since: Cursor | None) -> tuple[bool, list[Entry], Cursor]:
        """(reset, entries, cursor): every entry when ``reset`` (first call, a cursor of another
        store or file, or after a clear or an invalidation anywhere), else the entries added
        since ``since``. Ids are never reused within one store id (``cursor[0]``)."""

    def close(self) -> None:  # noqa: B027 - optional hook
        """Release resources (the SQLite connection)."""


class MemoryStore(Store):
    """Entries in a dict of this process; LRU order in an OrderedDict. Thread-safe."""

    replaces_same_query = True

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._entries: dict[int, Entry] = {}  # insertion order = id order = creation order
        self._lru: OrderedDict[int, None] = OrderedDict()
        #: (model, namespace, query) -> id: a put of a stored question replaces it.
        self._by_query: dict[tuple[str, str, str], int] = {}
        self._next = 1
        self._id = secrets.randbits(62)
        self._epoch = 0
        self._version = 0

    def put(
        self, entry: Entry, *, max_entries: int | None, ttl: float | None
    ) -> tuple[int, list[int]]:
        with self._lock:
            same = (entry.model, entry.namespace, entry.query)
            if same in self._by_query:  # the same question again: the newest answer wins
                self._drop([self._by_query[same]])
            entry.id = key = self._next
            self._next += 1
            self._entries[key] = entry
            self._lru[key] = None
            self._by_query[same] = key
            removed: list[int] = []
            if ttl is not None:
                for old in list(self._entries.values()):
                    if entry.created - old.created <= ttl:
                        break
                    removed.append(old.id)
            if max_entries is not None:
                excess = len(self._entries) - len(removed) - max_entries
                for old_key in self._lru:
                    if excess <= 0:
                        break
                    if old_key not in removed:
                        removed.append(old_key)
                        excess -= 1
            self._drop(removed)
            self._version += 1
            return key, removed

    def _drop(self, ids: Iterable[int]) -> None:
        for key in ids:
            entry = self._entries.pop(key, None)
            self._lru.pop(key, None)
            if entry is not None:
                self._by_query.pop((entry.model, entry.namespace, entry.query), None)

    def get(self, ids: Iterable[int]) -> dict[int, Entry]:
        with self._lock:
            return {k: self._entries[k] for k in ids if k in self._entries}

    def touch(self, key: int, now: float) -> None:
        with self._lock:
            if key in self._lru:
                self._lru.move_to_end(key)

    def remove(self, ids: Iterable[int]) -> None:
        with self._lock:
            self._drop(list(ids))
            self._version += 1

    def invalidate(self, model: str | None, namespace: str, subspaces: bool = False) -> int:
        with self._lock:
            gone = [
                e.id
                for e in self._entries.values()
                if in_namespace(e.namespace, namespace, subspaces)
                and (model is None or e.model == model)
            ]
            self._drop(gone)
            self._epoch += 1
            return len(gone)

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()
            self._lru.clear()
            self._by_query.clear()
            self._epoch += 1

    def count(self) -> int:
        with self._lock:
            return len(self._entries)

    def changes(self, since: Cursor | None) -> tuple[bool, list[Entry], Cursor]:
        with self._lock:
            cursor = (self._id, self._epoch, self._next - 1, self._version)
            if since is None or since[:2] != cursor[:2]:
                return True, list(self._entries.values()), cursor
            if since[3] == self._version:
                return False, [], cursor
            fresh: list[Entry] = []
            for key, entry in reversed(self._entries.items()):
                if key <= since[2]:
                    break
                fresh.append(entry)
            return False, fresh[::-1], cursor


def now() -> float:
    """Wall-clock seconds (entries' ages are compared across processes)."""
    return time.time()
