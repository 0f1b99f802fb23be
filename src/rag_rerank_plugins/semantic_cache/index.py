"""Nearest cached queries: exact cosine with numpy, or usearch's HNSW past ~10k entries.

Why two: an exact search is a matrix-vector product, a fraction of a millisecond for a few
thousand cached queries and always right, but at 100k x 384 floats it reads 150 MB per lookup
(tens of ms on two cores). It runs through ``np.einsum``, not ``@``: OpenBLAS threads a
matrix-vector product and on a busy host its spinning threads took 25 ms for what one thread does
in 0.3 ms (5k x 384). usearch (extra ``semantic-ann``) answers in well under a millisecond at
100k. ``index="auto"`` starts exact and moves a namespace to usearch once it grows past
:data:`AUTO_ANN_SIZE` (when usearch is installed; otherwise it stays exact and logs once).
Vectors are unit length (the pool normalises them), so the inner product is the cosine.

The move to usearch builds the new index over every entry, seconds at that size: it runs
without the cache's lock (:meth:`NamespaceIndex.upgrade`), so lookups keep searching the exact
index meanwhile, and only the snapshot and the swap hold the lock (milliseconds).
"""

from __future__ import annotations

import logging
from typing import Any, Protocol

import numpy as np

from .._exitsafe import GatedLock, native_section
from ..exceptions import ConfigurationError, MissingDependencyError

__all__ = ["AUTO_ANN_SIZE", "ExactIndex", "NamespaceIndex", "UsearchIndex", "check_kind"]

logger = logging.getLogger(__name__)

#: Entries of one namespace past which ``index="auto"`` switches to usearch.
AUTO_ANN_SIZE = 10_000
KINDS = ("auto", "exact", "usearch")


def check_kind(kind: str) -> str:
    if kind not in KINDS:
        raise ConfigurationError(f"index must be one of {', '.join(KINDS)}; got {kind!r}.")
    if kind == "usearch":
        _usearch()
    return kind


def _usearch() -> Any:
    try:
        from usearch.index import Index
    except ImportError as exc:
        missing = isinstance(exc, ModuleNotFoundError) and exc.name == "usearch"
        raise MissingDependencyError(
            "usearch", "semantic-ann", "SemanticCache(index='usearch')", None if missing else exc
        ) from None
    return Index


class VectorIndex(Protocol):
    def add(self, key: int, vector: np.ndarray) -> None: ...
    def remove(self, key: int) -> None: ...
    def search(self, vector: np.ndarray, k: int) -> list[tuple[int, float]]: ...
    def __len__(self) -> int: ...
    def __contains__(self, key: object) -> bool: ...
    def items(self) -> list[tuple[int, np.ndarray]]: ...


class ExactIndex:
    """Rows of a growing float32 matrix; removal moves the last row into the hole."""

    def __init__(self, dim: int) -> None:
        self._mat = np.zeros((16, dim), dtype=np.float32)
        self._keys = np.zeros(16, dtype=np.int64)
        self._row: dict[int, int] = {}

    def __len__(self) -> int:
        return len(self._row)

    def __contains__(self, key: object) -> bool:
        return key in self._row

    def add(self, key: int, vector: np.ndarray) -> None:
        if key in self._row:
            self._mat[self._row[key]] = vector
            return
        n = len(self._row)
        if n == len(self._keys):
            self._mat = np.concatenate([self._mat, np.zeros_like(self._mat)])
            self._keys = np.concatenate([self._keys, np.zeros_like(self._keys)])
        self._mat[n] = vector
        self._keys[n] = key
        self._row[key] = n

    def remove(self, key: int) -> None:
        row = self._row.pop(key, None)
        if row is None:
            return
        last = len(self._row)
        if row != last:
            moved = int(self._keys[last])
            self._mat[row] = self._mat[last]
            self._keys[row] = moved
            self._row[moved] = row

    def search(self, vector: np.ndarray, k: int) -> list[tuple[int, float]]:
        n = len(self._row)
        if n == 0:
            return []
        scores = np.einsum("ij,j->i", self._mat[:n], vector)
        k = min(k, n)
        top = np.argpartition(-scores, k - 1)[:k] if k < n else np.arange(n)
        top = top[np.argsort(-scores[top])]
        return [(int(self._keys[i]), float(scores[i])) for i in top]

    def items(self) -> list[tuple[int, np.ndarray]]:
        return [(int(self._keys[r]), self._mat[r]) for r in range(len(self._row))]

    def snapshot(self) -> tuple[list[int], np.ndarray]:
        """The keys and a copy of their vectors: what a usearch build reads while this index
        keeps changing (the copy is taken under the caller's lock, the build runs without it)."""
        n = len(self._row)
        return [int(k) for k in self._keys[:n]], self._mat[:n].copy()

    def keys(self) -> set[int]:
        return set(self._row)

    def vector(self, key: int) -> np.ndarray:
        return self._mat[self._row[key]]


class UsearchIndex:
    """usearch HNSW (cosine), f32 vectors. Its calls are C++ that a daemon thread must not be
    inside as Python finalizes (a user's daemon thread putting into a usearch namespace as the
    script ended aborted the process, status 134 in 4 of 12 runs; ``_exitsafe``): the build runs
    in an exit-gate section of its own, the other calls under the cache's lock, which is held
    inside one (``GatedLock``)."""

    def __init__(self, dim: int) -> None:
        with native_section():
            self._index = _usearch()(ndim=dim, metric="cos", dtype="f32", expansion_search=128)
        self._keys: set[int] = set()

    def __len__(self) -> int:
        return len(self._keys)

    def __contains__(self, key: object) -> bool:
        return key in self._keys

    def add(self, key: int, vector: np.ndarray) -> None:
        if key in self._keys:
            self._index.remove(key)
        self._index.add(key, vector)
        self._keys.add(key)

    def add_many(self, keys: list[int], vectors: np.ndarray) -> None:
        if keys:
            with native_section():  # the build: seconds at 10,000 entries
                self._index.add(np.asarray(keys, dtype=np.uint64), vectors)
            self._keys.update(keys)

    def remove(self, key: int) -> None:
        if key in self._keys:
            self._index.remove(key)
            self._keys.discard(key)

    def search(self, vector: np.ndarray, k: int) -> list[tuple[int, float]]:
        if not self._keys:
            return []
        matches = self._index.search(vector, min(k, len(self._keys)))
        return [
            (int(key), 1.0 - float(dist))
            for key, dist in zip(matches.keys, matches.distances, strict=True)
        ]

    def items(self) -> list[tuple[int, np.ndarray]]:
        keys = sorted(self._keys)
        vectors = self._index.get(np.asarray(keys, dtype=np.uint64)) if keys else []
        return list(zip(keys, (np.asarray(v, dtype=np.float32) for v in vectors), strict=True))


class NamespaceIndex:
    """The index of one namespace, exact or usearch according to ``kind`` and its size.

    ``lock`` is the cache's lock, which guards every call here but :meth:`upgrade`: that one
    takes it itself, only around its snapshot and its swap, so a lookup (on an event loop too)
    never waits for a build.
    """

    def __init__(self, dim: int, kind: str, lock: GatedLock | None = None) -> None:
        self.kind = kind
        self.dim = dim
        self._lock = lock if lock is not None else GatedLock()
        self._building = False
        self._impl: VectorIndex = UsearchIndex(dim) if kind == "usearch" else ExactIndex(dim)

    def __len__(self) -> int:
        return len(self._impl)

    def __contains__(self, key: object) -> bool:
        return key in self._impl

    def add(self, key: int, vector: np.ndarray) -> None:
        """Add (or replace) one vector. Never builds the usearch index, however large the
        namespace grows: the caller does that after releasing its lock (:meth:`upgrade`)."""
        self._impl.add(key, vector)

    def upgrade_due(self, adding: int = 1) -> bool:
        """Whether adding ``adding`` more entries moves this namespace to usearch (and no build
        is under way): building that index over every entry takes seconds at this size, so
        async callers run such an add in a thread (:meth:`SemanticCache.aput`), never on the
        event loop."""
        auto = self.kind == "auto" and isinstance(self._impl, ExactIndex) and not self._building
        return auto and len(self._impl) + adding > AUTO_ANN_SIZE

    def upgrade(self) -> None:
        """Move to usearch if due (see :meth:`upgrade_due`). Call it without holding the lock:
        the build runs unlocked, while adds and removes go on in the exact index; the swap
        replays them."""
        with self._lock:
            if not self.upgrade_due(0):
                return
            self._building = True
        try:
            self._upgrade()
        except BaseException:
            with self._lock:  # stays exact: not a failed multi-second build on every later put
                self.kind = "exact"
            raise
        finally:
            with self._lock:
                self._building = False

    def _upgrade(self) -> None:
        try:
            ann = UsearchIndex(self.dim)  # the import of usearch: seconds the first time
        except MissingDependencyError:
            logger.info("SemanticCache: usearch is not installed; this namespace stays exact")
            with self._lock:
                self.kind = "exact"
            return
        with self._lock:
            exact = self._impl
            if not isinstance(exact, ExactIndex):
                return
            keys, vectors = exact.snapshot()
        if keys:
            ann.add_many(keys, vectors)  # the seconds: without the lock
        with self._lock:
            # Replay what changed meanwhile: ids are never re-added with another vector (the
            # cache gives a new question a new id), so the key sets tell it all.
            present, built = exact.keys(), set(keys)
            for key in built - present:
                ann.remove(key)
            for key in present - built:
                ann.add(key, exact.vector(key))
            self._impl = ann

    def remove(self, key: int) -> None:
        self._impl.remove(key)

    def search(self, vector: np.ndarray, k: int) -> list[tuple[int, float]]:
        return self._impl.search(vector, k)
