"""Hammer tests: many threads and event loops mixing sync and async adapters over shared specs.

The claim under test is the package's core promise: concurrent callers get exactly the results
of sequential calls, each spec loads once, and cancelled async callers never wedge the worker or
disturb anyone else. The 64 x 200 run uses a scheduled (not thread-safe) fast fake so every call
goes through the real worker thread and batching in seconds; a smaller run uses the real tiny
cross-encoder (real tokenizer, real forward passes).
"""

from __future__ import annotations

import asyncio
import random
import threading
import uuid
from collections.abc import Sequence
from typing import Any

import pytest

pytest.importorskip("langchain_core")
pytest.importorskip("llama_index.core")

from langchain_core.documents import Document
from llama_index.core.schema import NodeWithScore, TextNode

from rag_rerank_plugins import ModelPool, ModelSpec
from rag_rerank_plugins.backends import register_backend
from rag_rerank_plugins.engine_config import EngineConfig
from rag_rerank_plugins.langchain import SharedRerankCompressor
from rag_rerank_plugins.llama_index import SharedRerankPostprocessor
from rag_rerank_plugins.testing import FakeReranker

WORDS = [
    "alpha",
    "beta",
    "gamma",
    "delta",
    "epsilon",
    "zeta",
    "eta",
    "theta",
    "iota",
    "kappa",
    "lambda",
    "mu",
]
QUERIES = [" ".join(WORDS[i : i + 3]) for i in range(0, 9, 2)]
DOCS = [" ".join(WORDS[(i * 5) % 12 : (i * 5) % 12 + 1 + i % 4]) + f" doc{i}" for i in range(12)]


class ScheduledFake(FakeReranker):
    """FakeReranker scores, but scheduled like a torch model (one worker thread owns it)."""

    thread_safe = False

    def __init__(self, tag: str, delay_ms: float = 0.0) -> None:
        super().__init__(delay_ms=delay_ms)
        self.tag = tag
        self.active = 0
        self.max_active = 0

    def score_pairs(self, pairs: Sequence[tuple[str, str]], batch_size: int) -> list[float]:
        self.active += 1
        self.max_active = max(self.max_active, self.active)
        try:
            base = super().score_pairs(pairs, batch_size)
            # The two specs must disagree, so a result sent to the wrong spec's caller shows.
            bias = 0.01 if self.tag == "b" else 0.0
            return [s + bias * (len(p) % 7) for s, (_, p) in zip(base, pairs, strict=True)]
        finally:
            self.active -= 1


def _register(delay_ms: float = 0.0) -> tuple[str, dict[str, int], list[ScheduledFake]]:
    name = f"hammer-{uuid.uuid4().hex[:8]}"
    loads: dict[str, int] = {}
    models: list[ScheduledFake] = []
    lock = threading.Lock()

    def loader(spec: ModelSpec, _pool: ModelPool) -> ScheduledFake:
        with lock:
            loads[spec.model] = loads.get(spec.model, 0) + 1
        model = ScheduledFake(spec.model, delay_ms)
        models.append(model)
        return model

    register_backend(name, loader, "reranker")
    return name, loads, models


def _docs() -> list[Document]:
    return [Document(page_content=t, metadata={"i": i}, id=f"d{i}") for i, t in enumerate(DOCS)]


def _nodes() -> list[NodeWithScore]:
    return [
        NodeWithScore(node=TextNode(text=t, id_=f"n{i}"), score=float(i))
        for i, t in enumerate(DOCS)
    ]


def _lc_key(out: Sequence[Document]) -> list[tuple[Any, ...]]:
    return [(d.id, d.page_content, d.metadata["relevance_score"]) for d in out]


def _li_key(out: Sequence[NodeWithScore]) -> list[tuple[Any, ...]]:
    return [(n.node.node_id, n.score) for n in out]


class Harness:
    """Adapters for two specs and the sequential answer of every (adapter, query) case."""

    def __init__(self, pool: ModelPool, backend: str, **adapter_kwargs: Any) -> None:
        self.adapters: list[SharedRerankCompressor | SharedRerankPostprocessor] = []
        for model in ("a", "b"):
            self.adapters.append(
                SharedRerankCompressor(model=model, backend=backend, pool=pool, **adapter_kwargs)
            )
            self.adapters.append(
                SharedRerankPostprocessor(model=model, backend=backend, pool=pool, **adapter_kwargs)
            )
        self.expected = {
            (a, q): self.call(a, q) for a in range(len(self.adapters)) for q in range(len(QUERIES))
        }
        a_key, b_key = self.expected[(0, 0)], self.expected[(2, 0)]
        assert a_key != b_key, "the specs must score differently"

    def call(self, a: int, q: int) -> list[tuple[Any, ...]]:
        adapter = self.adapters[a]
        if isinstance(adapter, SharedRerankCompressor):
            return _lc_key(adapter.compress_documents(_docs(), QUERIES[q]))
        return _li_key(adapter.postprocess_nodes(_nodes(), query_str=QUERIES[q]))

    async def acall(self, a: int, q: int) -> list[tuple[Any, ...]]:
        adapter = self.adapters[a]
        if isinstance(adapter, SharedRerankCompressor):
            return _lc_key(await adapter.acompress_documents(_docs(), QUERIES[q]))
        return _li_key(await adapter.apostprocess_nodes(_nodes(), query_str=QUERIES[q]))


def _hammer(harness: Harness, threads: int, calls: int, seed: int = 0) -> list[str]:
    """Half the threads call sync adapters, half run an event loop with async ones."""
    failures: list[str] = []
    lock = threading.Lock()
    barrier = threading.Barrier(threads)
    n_adapters, n_queries = len(harness.adapters), len(QUERIES)

    def check(a: int, q: int, got: list[tuple[Any, ...]]) -> None:
        if got != harness.expected[(a, q)]:
            with lock:
                failures.append(f"adapter {a} query {q}: {got} != {harness.expected[(a, q)]}")

    def sync_worker(t: int) -> None:
        rng = random.Random(seed * 1000 + t)
        barrier.wait()
        for _ in range(calls):
            a, q = rng.randrange(n_adapters), rng.randrange(n_queries)
            check(a, q, harness.call(a, q))

    async def async_calls(t: int) -> None:
        rng = random.Random(seed * 1000 + t)
        for _ in range(calls // 4):  # 4 concurrent tasks per loop, calls in all
            cases = [(rng.randrange(n_adapters), rng.randrange(n_queries)) for _ in range(4)]
            results = await asyncio.gather(*(harness.acall(a, q) for a, q in cases))
            for (a, q), got in zip(cases, results, strict=True):
                check(a, q, got)

    def async_worker(t: int) -> None:
        barrier.wait()
        asyncio.run(async_calls(t))

    def run(t: int) -> None:
        try:
            (sync_worker if t % 2 == 0 else async_worker)(t)
        except BaseException as exc:  # an error is a failure too
            with lock:
                failures.append(f"thread {t}: {type(exc).__name__}: {exc}")

    pool_threads = [threading.Thread(target=run, args=(t,)) for t in range(threads)]
    for thread in pool_threads:
        thread.start()
    for thread in pool_threads:
        thread.join(120)
    assert not any(thread.is_alive() for thread in pool_threads), "a caller is wedged"
    return failures


def test_64_threads_x_200_calls_sync_and_async_over_two_specs() -> None:
    backend, loads, models = _register()
    pool = ModelPool(config=EngineConfig(max_wait_ms=0.5))
    try:
        harness = Harness(pool, backend, top_n=5)
        before = {m: pool.spec_stats(harness.adapters[i].spec) for i, m in ((0, "a"), (2, "b"))}
        failures = _hammer(harness, threads=64, calls=200)
        assert failures == [], failures[:5]
        assert loads == {"a": 1, "b": 1}, "exactly one load per spec"
        assert all(m.max_active == 1 for m in models), "a model ran on two threads at once"
        total = 0
        for i, m in ((0, "a"), (2, "b")):
            stats = pool.spec_stats(harness.adapters[i].spec)
            assert stats["errors"] == 0
            assert stats["loads"] == 1
            assert stats["queue_depth"] == 0
            total += stats["calls"] - before[m]["calls"]
        assert total == 64 * 200
    finally:
        pool.clear()


def test_cancelled_async_callers_never_wedge_or_corrupt_others() -> None:
    backend, loads, _ = _register(delay_ms=1.0)
    pool = ModelPool(config=EngineConfig(max_batch_size=4))
    try:
        harness = Harness(pool, backend, top_n=None)
        rng = random.Random(7)

        async def main() -> tuple[int, int]:
            cases = [(rng.randrange(4), rng.randrange(len(QUERIES))) for _ in range(300)]
            tasks = [asyncio.create_task(harness.acall(a, q)) for a, q in cases]
            victims = rng.sample(range(len(tasks)), 120)
            for v in victims:
                await asyncio.sleep(rng.random() * 0.004)  # cancel at random points
                tasks[v].cancel()
            outcomes = await asyncio.wait_for(
                asyncio.gather(*tasks, return_exceptions=True), timeout=60
            )
            cancelled = 0
            for (a, q), outcome in zip(cases, outcomes, strict=True):
                if isinstance(outcome, asyncio.CancelledError):
                    cancelled += 1
                else:
                    assert outcome == harness.expected[(a, q)]
            # The worker still serves, promptly, with correct results.
            again = await asyncio.wait_for(harness.acall(0, 0), timeout=5)
            assert again == harness.expected[(0, 0)]
            return cancelled, len(tasks)

        cancelled, _total = asyncio.run(main())
        assert 0 < cancelled <= 120
        assert loads == {"a": 1, "b": 1}
        for i in (0, 2):
            stats = pool.spec_stats(harness.adapters[i].spec)
            assert stats["errors"] == 0
            assert stats["queue_depth"] == 0
        assert sum(pool.spec_stats(harness.adapters[i].spec)["cancelled"] for i in (0, 2)) > 0
        assert harness.call(1, 1) == harness.expected[(1, 1)]  # sync callers too
    finally:
        pool.clear()


def test_hammer_real_tiny_cross_encoder(tiny_ce_path: str) -> None:
    """8 threads x 12 calls on the real tokenizer and model: results equal sequential ones."""
    pool = ModelPool()
    try:
        adapters: list[SharedRerankCompressor | SharedRerankPostprocessor] = [
            SharedRerankCompressor(model=tiny_ce_path, device="cpu", pool=pool, top_n=None),
            SharedRerankPostprocessor(model=tiny_ce_path, device="cpu", pool=pool, top_n=None),
        ]
        harness = Harness.__new__(Harness)
        harness.adapters = adapters
        harness.expected = {(a, q): harness.call(a, q) for a in (0, 1) for q in range(3)}

        def approx_equal(got: list[tuple[Any, ...]], want: list[tuple[Any, ...]]) -> bool:
            return [g[:-1] for g in got] == [w[:-1] for w in want] and all(
                g[-1] == pytest.approx(w[-1], abs=1e-6) for g, w in zip(got, want, strict=True)
            )

        failures: list[str] = []
        lock = threading.Lock()

        def worker(t: int) -> None:
            rng = random.Random(t)
            try:
                for _ in range(12):
                    a, q = rng.randrange(2), rng.randrange(3)
                    got = asyncio.run(harness.acall(a, q)) if t % 2 else harness.call(a, q)
                    if not approx_equal(got, harness.expected[(a, q)]):
                        with lock:
                            failures.append(f"{a},{q}: {got}")
            except BaseException as exc:
                with lock:
                    failures.append(f"{type(exc).__name__}: {exc}")

        threads = [threading.Thread(target=worker, args=(t,)) for t in range(8)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(120)
        assert failures == []
        stats = pool.spec_stats(adapters[0].spec)
        assert (stats["loads"], stats["errors"]) == (1, 0)
    finally:
        pool.clear()
