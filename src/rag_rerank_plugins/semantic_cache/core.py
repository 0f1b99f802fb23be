"""SemanticCache: answers to repeated questions, keyed by meaning, guarded against near misses.

Why: once models stay warm, a RAG answer still costs seconds of LLM time; the same question asked
again in other words can be answered from a cache in milliseconds. The danger is the near miss
("Art. 72" cached, "Art. 75" asked), which a dense-only cache returns; see :mod:`.guards`.

A lookup embeds the query with the shared pool's embedder (its query cache applies), finds the
nearest cached queries of the namespace (:mod:`.index`), and returns the best one that passes the
guard. Namespaces (the LLM's identity, the chain, the index) never share answers. Values are
JSON-serialisable objects or bytes. The cache never fails its caller because of itself: a store or
embedder failure is a miss (or a skipped put: ``put`` returns False), logged and counted in
``stats()["errors"]``; only bad input (empty query, blank or non-string namespace, a query,
namespace or value that is not valid text, a value that is not JSON) raises, with
:class:`~rag_rerank_plugins.exceptions.InvalidInputError` (and ``invalidate``/``clear``, whose
silent failure would serve stale answers). Storing a question again replaces its answer. Queries
are compared in Unicode NFC (NFC and NFD of one question are one question); namespaces as given.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections import deque
from collections.abc import Iterable
from dataclasses import replace
from typing import Any

import numpy as np

from .._exitsafe import GatedLock, start_daemon, to_thread
from ..pool import ModelPool, get_pool
from ..spec import DEFAULT_EMBEDDER, DEFAULT_RERANKER, ModelSpec, redact_urls
from ..stats import percentile
from ._helpers import (
    CacheHit,
    SharedResource,
    _check,
    _check_namespace,
    _decode,
    _encode,
    _spec,
    cache_identity,
    check_settings,
    open_store,
)
from .guards import DEFAULT_THRESHOLDS, Candidate, Verdict, judge, too_long
from .identity import Identity, extract
from .index import NamespaceIndex, check_kind
from .lexical import BM25Corpus, tokens
from .stores import Cursor, Entry, MemoryStore, Store, in_namespace, now

__all__ = ["CacheHit", "SemanticCache"]

logger = logging.getLogger(__name__)

#: Nearest cached queries a guard looks at, and the cosine below which none is considered by the
#: ``hybrid`` and ``rerank`` guards (a pre-filter: a pair that far apart is not a paraphrase, and
#: the cross-encoder need not score it; ``explain`` lists the cut ones with the reason
#: ``"floor"``). The ``dense`` guard's threshold is itself the cosine bound: its floor is
#: ``min(CANDIDATE_FLOOR, threshold)``, so a threshold below 0.5 means what it says.
TOP_K = 8
CANDIDATE_FLOOR = 0.5
#: Lookups of one query: a candidate that vanished meanwhile (a concurrent put replacing its
#: question's answer deletes the old entry) is looked for again after a sync, which finds the
#: replacement. Without it 22 % of lookups racing refreshes of an always-cached question missed.
_ATTEMPTS = 3
_WINDOW = 1000


class SemanticCache(SharedResource):
    """See the module docstring and the guide docs/guides/semantic-cache.md."""

    def __init__(
        self,
        embedder: str | ModelSpec = DEFAULT_EMBEDDER,
        *,
        guard: str = "hybrid",
        reranker: str | ModelSpec | None = None,
        threshold: float | None = None,
        ttl: float | None = None,
        max_entries: int | None = 10_000,
        store: str | Store = "memory",
        pool: ModelPool | None = None,
        index: str = "auto",
    ) -> None:
        check_settings(guard, threshold, ttl, max_entries)
        self.guard = guard
        self.embedder = _spec(embedder, "embedder")
        self.reranker = (
            _spec(reranker or DEFAULT_RERANKER, "reranker")
            if guard == "rerank" or reranker is not None
            else None
        )
        self.threshold = float(threshold if threshold is not None else DEFAULT_THRESHOLDS[guard])
        self.ttl = None if ttl is None else float(ttl)
        self.max_entries = max_entries
        self.index_kind = check_kind(index)
        self.store = open_store(store)
        self._pool = pool
        # What entries are stored under: the full spec, not its display label (which hides the
        # query strings of URLs, so two remote deployments would compare each other's vectors).
        self._model = cache_identity(self.embedder)
        self._floor = min(CANDIDATE_FLOOR, self.threshold) if guard == "dense" else CANDIDATE_FLOOR
        # Held inside an exit-gate section (usearch runs under it): a daemon thread parks at
        # exit before taking it, never while holding it (``_exitsafe.GatedLock``).
        self._lock = GatedLock()
        self._indexes: dict[str, NamespaceIndex] = {}
        self._corpora: dict[str, BM25Corpus] = {}
        self._tokens: dict[int, list[str]] = {}
        self._identities: dict[int, Identity] = {}
        self._where: dict[int, tuple[str, str]] = {}  # id -> (namespace, query)
        self._by_text: dict[tuple[str, str], int] = {}
        self._cursor: Cursor | None = None
        self._counts = dict.fromkeys(
            ("lookups", "hits", "misses", "guard_rejections", "errors", "puts", "evictions"), 0
        )
        self._lookup_ms: deque[float] = deque(maxlen=_WINDOW)
        self._search_ms: deque[float] = deque(maxlen=_WINDOW)
        try:  # index what the store already holds (a SQLite file from an earlier run)
            self._sync()
        except Exception as exc:
            self._failed("opening the store", exc)

    def __repr__(self) -> str:
        return (
            f"SemanticCache(embedder={redact_urls(self.embedder.model)!r}, guard={self.guard!r}, "
            f"threshold={self.threshold}, store={type(self.store).__name__})"
        )

    # -- index maintenance (under self._lock) ---------------------------------------------------

    def pool(self) -> ModelPool:
        return self._pool if self._pool is not None else get_pool()

    def _count(self, key: str, n: int = 1) -> None:
        with self._lock:
            self._counts[key] += n

    def _failed(self, what: str, exc: BaseException) -> None:
        self._count("errors")
        logger.warning(
            "SemanticCache %s failed (%s: %s); going on without the cache (a miss, or no put)",
            what,
            type(exc).__name__,
            exc,
        )

    def _add(self, entry: Entry) -> None:
        if entry.model != self._model or entry.id in self._where:
            return
        index = self._indexes.get(entry.namespace)
        if index is not None and len(entry.vector) != index.dim:
            return
        older = self._by_text.get((entry.namespace, entry.query))
        if older is not None and older > entry.id:
            return  # an older copy (another process's, synced late): ids only grow
        # What may fail comes before any change: a failure leaves the index as it was (an id in
        # the vector index but not in _where would break every later search of the namespace).
        toks = tokens(entry.query)
        identity = extract(entry.query)
        if index is None:
            index = NamespaceIndex(len(entry.vector), self.index_kind, self._lock)
            self._indexes[entry.namespace] = index
            self._corpora[entry.namespace] = BM25Corpus()
        if older is not None:  # the same question stored again: the newest answer wins
            self._drop([older])
        index.add(entry.id, entry.vector)
        self._corpora[entry.namespace].add(toks)
        self._tokens[entry.id] = toks
        self._identities[entry.id] = identity
        self._where[entry.id] = (entry.namespace, entry.query)
        self._by_text[(entry.namespace, entry.query)] = entry.id

    def _drop(self, ids: list[int]) -> None:
        for key in ids:
            where = self._where.pop(key, None)
            if where is None:
                continue
            namespace = where[0]
            self._indexes[namespace].remove(key)
            self._corpora[namespace].remove(self._tokens.pop(key))
            self._identities.pop(key, None)
            if self._by_text.get(where) == key:
                del self._by_text[where]

    def _reset(self) -> None:
        self._indexes.clear()
        self._corpora.clear()
        self._tokens.clear()
        self._identities.clear()
        self._where.clear()
        self._by_text.clear()

    def _sync(self) -> None:
        reset, entries, cursor = self.store.changes(self._cursor)
        with self._lock:
            if reset:
                self._reset()
            for entry in entries:
                try:
                    self._add(entry)
                except Exception as exc:
                    # Skipped (and counted), and the cursor still moves past it: one entry this
                    # cache cannot index must not fail every later lookup, in every namespace,
                    # of every process sharing the store.
                    self._failed(f"indexing the cached query {entry.query[:80]!r}", exc)
            self._cursor = cursor
        if entries:
            self._grow({entry.namespace for entry in entries})

    def _grow(self, namespaces: Iterable[str]) -> None:
        """Move those of ``namespaces`` grown past AUTO_ANN_SIZE to usearch. Called without the
        lock held: the build (seconds) runs unlocked (:meth:`NamespaceIndex.upgrade`), so lookups
        go on meanwhile. Never on an event loop's thread, where it would stall every coroutine:
        there it runs in a thread of its own (a sync ``put`` from a notebook cell or an async
        handler; the namespace stays exact, and correct, until the build is in). A failed build
        leaves the namespace exact, logged and counted in ``stats()["errors"]``."""
        with self._lock:
            found = [(ns, self._indexes.get(ns)) for ns in namespaces]
            due = [(ns, index) for ns, index in found if index is not None and index.upgrade_due(0)]
        if due and _on_loop():
            start_daemon(self._upgrade, due, name="rag-rerank-cache-index")
        else:
            self._upgrade(due)

    def _upgrade(self, due: list[tuple[str, NamespaceIndex]]) -> None:
        for namespace, index in due:
            try:
                index.upgrade()
            except Exception as exc:
                self._count("errors")
                logger.warning(
                    "SemanticCache could not build the usearch index of namespace %r (%s: %s); "
                    "it stays exact (correct answers, slower searches past ~10k entries)",
                    namespace,
                    type(exc).__name__,
                    exc,
                )

    def _same(self, entry: Entry | None, namespace: str, query: str) -> bool:
        """Whether the store's ``entry`` is the one this index holds under its id (``namespace``,
        ``query``, this embedder). Why: ids are never reused within one store, so another row
        under a known id means the store was replaced beneath the index (a SQLite file deleted
        and created again); that row may be another tenant's answer. It is never returned, and
        the whole index is rebuilt on the next sync."""
        if entry is None:
            return False
        if (entry.model, entry.namespace, entry.query) == (self._model, namespace, query):
            return True
        logger.warning(
            "SemanticCache: entry %d of the store is not the one indexed under that id (the "
            "store was replaced, e.g. its SQLite file deleted and created again); ignoring it "
            "and rebuilding the index from the store",
            entry.id,
        )
        with self._lock:
            self._cursor = None
        return False

    # -- lookup ---------------------------------------------------------------------------------

    def _embed(self, query: str) -> np.ndarray:
        vectors = self.pool().embed(self.embedder, [query], is_query=True, normalize=True)
        return np.asarray(vectors[0], dtype=np.float32)

    async def _aembed(self, query: str) -> np.ndarray:
        vectors = await self.pool().aembed(self.embedder, [query], is_query=True, normalize=True)
        return np.asarray(vectors[0], dtype=np.float32)

    def _candidates(
        self, query: str, vector: np.ndarray, namespace: str, floor: float | None = None
    ) -> tuple[list[Candidate], bool]:
        """The candidates (cosine at least ``floor``, by default the guard's), and whether one
        vanished from the store (replaced by a concurrent put of its question, or evicted)
        since this process indexed it: then a retry syncs and finds the replacement."""
        self._sync()
        floor = self._floor if floor is None else floor
        with self._lock:
            index = self._indexes.get(namespace)
            if index is None or len(index) == 0 or len(vector) != index.dim:
                return [], False
            near = [(k, s) for k, s in index.search(vector, TOP_K) if s >= floor]
            found = {k: (s, self._where[k][1]) for k, s in near}
            same = self._by_text.get((namespace, query))
            if same is not None:  # the very same text: a candidate even if an ANN search missed it
                found[same] = (1.0, query)
        # A shared file may have lost entries to another process; TTL needs creation times.
        check = self.ttl is not None or not isinstance(self.store, MemoryStore)
        alive = self.store.get(found) if check else None
        gone = (
            []
            if alive is None
            else [k for k, (_, q) in found.items() if not self._same(alive.get(k), namespace, q)]
        )
        vanished = bool(gone)
        if alive is not None and self.ttl is not None:
            expired = [
                k for k, e in alive.items() if k not in gone and now() - e.created > self.ttl
            ]
            if expired:
                self.store.remove(expired)
                self._count("evictions", len(expired))
            gone += expired
        with self._lock:
            self._drop(gone)
            return [
                Candidate(k, q, s, self._tokens[k], self._identities[k])
                for k, (s, q) in found.items()
                if k in self._where
            ], vanished

    def _verdicts(self, query: str, namespace: str, candidates: list[Candidate],
                  rerank_scores: list[float] | None) -> list[Verdict]:  # fmt: skip
        with self._lock:
            corpus = self._corpora.get(namespace)
            return judge(self.guard, query, candidates, self.threshold, corpus=corpus,
                         rerank_scores=rerank_scores)  # fmt: skip

    def _needs_rerank(self, query: str, candidates: list[Candidate]) -> bool:
        # A long query only hits on identical text (guards.MAX_SEMANTIC_WORDS): nothing to score.
        return (
            self.guard == "rerank"
            and any(c.query != query for c in candidates)
            and not too_long(tokens(query))
        )

    def _finish(self, verdicts: list[Verdict], namespace: str) -> tuple[CacheHit | None, bool]:
        """The hit, and whether a passing candidate vanished before it was read."""
        vanished = False
        for verdict in verdicts:
            if not verdict.passed:
                continue
            key = verdict.candidate.id
            entry = self.store.get([key]).get(key)
            if entry is None or not self._same(entry, namespace, verdict.candidate.query):
                with self._lock:  # ids are never reused: this one is gone for good
                    self._drop([key])
                vanished = True
                continue
            t = now()
            self.store.touch(entry.id, t)
            age = t - entry.created
            return CacheHit(_decode(entry), entry.query, verdict.score, namespace, age), False
        return None, vanished

    def _record(self, hit: CacheHit | None, verdicts: list[Verdict], t0: float, t1: float) -> None:
        t2 = time.perf_counter()
        with self._lock:
            self._counts["lookups"] += 1
            self._counts["hits" if hit else "misses"] += 1
            if hit is None and verdicts:
                self._counts["guard_rejections"] += 1
            self._lookup_ms.append((t2 - t0) * 1000)
            self._search_ms.append((t2 - t1) * 1000)

    def lookup(self, query: str, namespace: str = "default") -> CacheHit | None:
        """The cached answer of the nearest cached query that passes the guard, or None."""
        query = _check(query, namespace)
        t0 = time.perf_counter()
        try:
            vector = self._embed(query)
            t1 = time.perf_counter()
            for _ in range(_ATTEMPTS):
                candidates, vanished = self._candidates(query, vector, namespace)
                scores = None
                if self._needs_rerank(query, candidates):
                    assert self.reranker is not None
                    pairs = [(query, c.query) for c in candidates]
                    scores = self.pool().score_pairs(self.reranker, pairs)
                verdicts = self._verdicts(query, namespace, candidates, scores)
                hit, lost = self._finish(verdicts, namespace)
                if hit is not None or not (vanished or lost):
                    break
        except Exception as exc:
            self._failed("lookup", exc)
            with self._lock:  # a failed lookup is a lookup and a miss (hit_rate stays honest)
                self._counts["lookups"] += 1
                self._counts["misses"] += 1
            return None
        self._record(hit, verdicts, t0, t1)
        return hit

    async def alookup(self, query: str, namespace: str = "default") -> CacheHit | None:
        """:meth:`lookup` for coroutines: the embedding and cross-encoder calls await the pool,
        SQLite work runs in a thread; the event loop never blocks."""
        query = _check(query, namespace)
        t0 = time.perf_counter()
        try:
            vector = await self._aembed(query)
            t1 = time.perf_counter()
            for _ in range(_ATTEMPTS):
                candidates, vanished = await self._off_loop(
                    self._candidates, query, vector, namespace
                )
                scores = None
                if self._needs_rerank(query, candidates):
                    assert self.reranker is not None
                    pairs = [(query, c.query) for c in candidates]
                    scores = await self.pool().ascore_pairs(self.reranker, pairs)
                verdicts = self._verdicts(query, namespace, candidates, scores)
                hit, lost = await self._off_loop(self._finish, verdicts, namespace)
                if hit is not None or not (vanished or lost):
                    break
        except Exception as exc:
            self._failed("lookup", exc)
            with self._lock:  # a failed lookup is a lookup and a miss (hit_rate stays honest)
                self._counts["lookups"] += 1
                self._counts["misses"] += 1
            return None
        self._record(hit, verdicts, t0, t1)
        return hit

    async def _off_loop(self, fn: Any, *args: Any, slow: bool = False) -> Any:
        """``fn(*args)`` for a coroutine: inline on a memory store (microseconds), unless the
        caller knows it is ``slow``; in a thread otherwise (SQLite's I/O)."""
        if isinstance(self.store, MemoryStore) and not slow:
            return fn(*args)
        return await to_thread(fn, *args)

    def explain(self, query: str, namespace: str = "default") -> list[Verdict]:
        """Every candidate the guard looked at for ``query``, with its scores and the reason it
        failed, best first (for tuning thresholds; counts nothing). Failures raise here.

        The nearest cached queries whose cosine is below the candidate floor (``CANDIDATE_FLOOR``
        for ``hybrid`` and ``rerank``) come last, scored as the guard would have, with the reason
        ``"floor"``: a lookup cuts them before the guard, whatever the threshold."""
        query = _check(query, namespace)
        candidates, _ = self._candidates(query, self._embed(query), namespace, floor=-math.inf)
        scores = None
        if self._needs_rerank(query, candidates):
            assert self.reranker is not None
            scores = self.pool().score_pairs(self.reranker, [(query, c.query) for c in candidates])
        verdicts = [
            replace(v, reason="floor")
            if v.candidate.dense < self._floor and v.candidate.query != query
            else v
            for v in self._verdicts(query, namespace, candidates, scores)
        ]
        return sorted(verdicts, key=lambda v: v.reason == "floor")

    # -- put, invalidate, stats -----------------------------------------------------------------

    def _store(self, query: str, vector: np.ndarray, payload: tuple[bytes, bool],
               namespace: str) -> None:  # fmt: skip
        entry = Entry(0, self._model, namespace, query, vector, payload[0], payload[1], now())
        with self._lock:
            older = self._by_text.get((namespace, query))
        if older is not None and not self.store.replaces_same_query:
            # The new answer replaces the old one: a dead copy would hold an LRU slot (and
            # evict another question) until it aged out. The built-in stores replace it inside
            # their put, atomically: this check-then-remove misses a copy another thread or
            # process stores meanwhile, so it is only the fallback for other stores.
            self.store.remove([older])
            with self._lock:
                self._drop([older])
        key, removed = self.store.put(entry, max_entries=self.max_entries, ttl=self.ttl)
        entry.id = key
        with self._lock:
            self._drop(removed)
            self._add(entry)
            self._counts["puts"] += 1
            self._counts["evictions"] += len(removed)
        self._grow([namespace])  # past AUTO_ANN_SIZE: the usearch build, without the lock

    def put(self, query: str, value: Any, namespace: str = "default") -> bool:
        """Cache ``value`` (JSON-serialisable, or bytes) as the answer to ``query``, replacing
        the answer stored for the same text. True when stored; False when a store or embedder
        failure skipped it (logged and counted in ``stats()["errors"]``, never raised)."""
        query = _check(query, namespace)
        payload = _encode(value)
        try:
            self._store(query, self._embed(query), payload, namespace)
        except Exception as exc:
            self._failed("put", exc)
            return False
        return True

    async def aput(self, query: str, value: Any, namespace: str = "default") -> bool:
        """:meth:`put` for coroutines (never blocks the event loop)."""
        query = _check(query, namespace)
        payload = _encode(value)
        try:
            vector = await self._aembed(query)
            index = self._indexes.get(namespace)
            # The add that moves a namespace past AUTO_ANN_SIZE builds its usearch index (3-6 s
            # at that size, the import included): in a thread, not on the loop, and without the
            # cache's lock, so lookups running inline on the loop never wait for it (_grow).
            slow = index is not None and index.upgrade_due()
            await self._off_loop(self._store, query, vector, payload, namespace, slow=slow)
        except Exception as exc:
            self._failed("put", exc)
            return False
        return True

    def invalidate(self, namespace: str, *, subspaces: bool = False) -> int:
        """Remove every entry of ``namespace`` (for this embedder); returns how many. With
        ``subspaces``, the namespaces under it too (``namespace + ":..."``: a LangChain
        adapter's chat contexts under its model's namespace). Store failures raise here: an
        invalidation that silently failed would serve stale answers."""
        _check_namespace(namespace)
        removed = self.store.invalidate(self._model, namespace, subspaces)
        with self._lock:
            self._drop(
                [
                    k
                    for k, (ns, _) in list(self._where.items())
                    if in_namespace(ns, namespace, subspaces)
                ]
            )
        return removed

    def clear(self) -> None:
        """Remove every entry (every namespace, every embedder sharing the store)."""
        self.store.clear()
        with self._lock:
            self._reset()

    def stats(self) -> dict[str, Any]:
        """Counters since construction: lookups (failed ones included), hits, misses (guard
        rejections and failed lookups included), guard_rejections, errors, puts, evictions (LRU
        and TTL, whether found by a put or a lookup), entries (in the store, all namespaces),
        and latency percentiles over the last 1000 lookups: ``lookup_ms_*`` end to
        end, ``search_ms_*`` beyond the query embedding."""
        with self._lock:
            out: dict[str, Any] = dict(self._counts)
            lookup, search = list(self._lookup_ms), list(self._search_ms)
        try:
            out["entries"] = self.store.count()
        except Exception as exc:
            self._failed("count", exc)
            out["entries"] = None
        out["hit_rate"] = out["hits"] / out["lookups"] if out["lookups"] else None
        for name, values in (("lookup_ms", lookup), ("search_ms", search)):
            for q, suffix in ((0.5, "p50"), (0.95, "p95")):
                value = percentile(values, q)
                out[f"{name}_{suffix}"] = None if value is None else round(value, 3)
        out.update(guard=self.guard, threshold=self.threshold, store=type(self.store).__name__)
        return out

    def close(self) -> None:
        """Close the store (the SQLite connection); the cache reopens it if used again."""
        self.store.close()


def _on_loop() -> bool:
    """Whether this thread is running an event loop (a coroutine calling us inline)."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return False
    return True
