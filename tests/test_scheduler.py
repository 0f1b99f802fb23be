"""The per-model scheduler: batching shapes, fairness, bounded queue, cancellation, OOM, caches."""

from __future__ import annotations

import asyncio
import threading
import time
import uuid
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor

import pytest

from rag_rerank_plugins import (
    InferenceError,
    ModelPool,
    ModelSpec,
    OutOfMemoryError,
    QueueFullError,
    RequestTimeoutError,
)
from rag_rerank_plugins.backends import RerankerModel, register_backend
from rag_rerank_plugins.engine.batching import estimate_tokens
from rag_rerank_plugins.engine_config import EngineConfig
from rag_rerank_plugins.testing import FakeEmbedder, FakeReranker


class Recording(RerankerModel):
    """A scheduled (not thread-safe) reranker that records every forward pass it receives."""

    thread_safe = False

    def __init__(self, delay_s: float = 0.0, oom_above: int | None = None) -> None:
        self.batches: list[list[tuple[str, str]]] = []
        self.delay_s = delay_s
        self.oom_above = oom_above
        self.active = 0
        self.max_active = 0
        self._lock = threading.Lock()
        self._fake = FakeReranker()

    def score_pairs(self, pairs: Sequence[tuple[str, str]], batch_size: int) -> list[float]:
        with self._lock:
            self.active += 1
            self.max_active = max(self.max_active, self.active)
        try:
            if self.oom_above is not None and len(pairs) > self.oom_above:
                raise MemoryError("simulated OOM")
            if any("boom" in p for _, p in pairs):
                raise ValueError("simulated failure")
            self.batches.append(list(pairs))
            if self.delay_s:
                time.sleep(self.delay_s)
            return self._fake.score_pairs(pairs, batch_size)
        finally:
            with self._lock:
                self.active -= 1


def _spec(model: Recording) -> ModelSpec:
    name = f"rec-{uuid.uuid4().hex[:8]}"
    register_backend(name, lambda spec, pool: model, "reranker")
    return ModelSpec("m", backend=name, device="cpu")


def _pool(**config) -> ModelPool:
    return ModelPool(config=EngineConfig(**config))


def test_micro_batches_respect_token_budget_and_sort_by_length() -> None:
    model = Recording()
    pool = _pool(max_batch_size=8, token_budget=400)
    spec = _spec(model)
    passages = [("word " * n).strip() for n in (5, 80, 10, 40, 3, 60, 20, 70, 1, 30) * 3]
    pairs = [("query", p) for p in passages]
    scores = pool.score_pairs(spec, pairs, batch_size=32)
    assert scores == FakeReranker().score_pairs(pairs, 1)  # results in input order
    seen = [p for batch in model.batches for p in batch]
    assert sorted(seen) == sorted(set(pairs))  # each distinct pair once (they repeat x3)
    for batch in model.batches:
        lengths = [estimate_tokens(q) + estimate_tokens(p) + 3 for q, p in batch]
        assert len(batch) <= 8
        assert max(lengths) * len(batch) <= 400 or len(batch) == 1
        assert lengths == sorted(lengths, reverse=True)
    stats = pool.spec_stats(spec)
    assert stats["forward_passes"] == len(model.batches)
    assert 0 <= stats["padding_ratio"] < 0.5
    pool.clear()


def test_caller_batch_size_caps_forward_passes() -> None:
    model = Recording()
    pool = _pool(max_batch_size=64)
    spec = _spec(model)
    pool.score_pairs(spec, [("q", f"p{i}") for i in range(10)], batch_size=3)
    assert max(len(b) for b in model.batches) == 3
    pool.clear()


def test_concurrent_requests_merge_into_shared_forward_passes() -> None:
    model = Recording(delay_s=0.05)
    pool = _pool(max_wait_ms=30, max_batch_size=64)
    spec = _spec(model)
    pool.get(spec)
    barrier = threading.Barrier(8)

    def call(i: int) -> list[float]:
        barrier.wait()
        return pool.score_pairs(spec, [(f"q{i}", f"q{i} p{j}") for j in range(3)])

    with ThreadPoolExecutor(8) as ex:
        results = list(ex.map(call, range(8)))
    assert all(r == [1.0, 1.0, 1.0] for r in results)
    assert len(model.batches) < 8, "requests were not merged"
    assert model.max_active == 1, "the model must only ever run on one thread"
    pool.clear()


def test_fifo_no_caller_starves() -> None:
    model = Recording(delay_s=0.02)
    pool = _pool(max_batch_size=1)
    spec = _spec(model)
    pool.get(spec)

    def call(i: int) -> None:
        pool.score_pairs(spec, [("q", f"p{i}")])

    threads = []
    for i in range(10):
        t = threading.Thread(target=call, args=(i,))
        t.start()
        threads.append(t)
        time.sleep(0.005)  # arrival order 0..9
    for t in threads:
        t.join()
    # Served in arrival order (the model's own record: two callers whose results are delivered
    # in the same microsecond may wake up in either order, so completion order proves nothing).
    served = [int(passage[1:]) for batch in model.batches for _, passage in batch]
    assert served == list(range(10))
    pool.clear()


def test_bounded_queue_rejects_then_waits_when_configured() -> None:
    model = Recording(delay_s=0.1)
    pool = _pool(max_queue=2, max_batch_size=1)
    spec = _spec(model)
    pool.get(spec)
    # While the first pass runs, the worker holds at most LOOKAHEAD more requests being prepared
    # (they count as running) and the queue max_queue: 16 requests cannot all fit.
    with ThreadPoolExecutor(16) as ex:
        futures = [ex.submit(pool.score_pairs, spec, [("q", f"p{i}")]) for i in range(16)]
        outcomes = [f.exception() for f in futures]
    rejected = [e for e in outcomes if isinstance(e, QueueFullError)]
    assert rejected, "a full queue must refuse work instead of growing"
    assert all(e is None or isinstance(e, QueueFullError) for e in outcomes)
    assert pool.spec_stats(spec)["rejected"] == len(rejected)
    assert "max_queue" in str(rejected[0])
    pool.clear()

    patient = _pool(max_queue=1, max_batch_size=1, queue_timeout_s=10)
    spec2 = _spec(Recording(delay_s=0.02))
    with ThreadPoolExecutor(6) as ex:
        results = list(ex.map(lambda i: patient.score_pairs(spec2, [("q", "q")]), range(6)))
    assert results == [[1.0]] * 6
    patient.clear()


def test_out_of_memory_splits_the_batch() -> None:
    model = Recording(oom_above=2)
    pool = _pool(max_batch_size=16)
    spec = _spec(model)
    pairs = [("q", f"q {i}") for i in range(8)]
    assert pool.score_pairs(spec, pairs) == [1.0] * 8
    assert max(len(b) for b in model.batches) <= 2
    assert pool.spec_stats(spec)["oom_splits"] >= 3
    pool.clear()

    always = Recording(oom_above=0)
    spec2 = _spec(always)
    with pytest.raises(OutOfMemoryError, match="single item"):
        pool.score_pairs(spec2, [("q", "p")])
    pool.clear()


def test_a_failing_batch_fails_only_its_requests() -> None:
    model = Recording(delay_s=0.01)
    pool = _pool(max_batch_size=1)
    spec = _spec(model)
    pool.get(spec)
    with ThreadPoolExecutor(4) as ex:
        good = [ex.submit(pool.score_pairs, spec, [("a", "a"), ("a", "b")]) for _ in range(3)]
        bad = ex.submit(pool.score_pairs, spec, [("a", "a"), ("a", "boom")])
        good += [ex.submit(pool.score_pairs, spec, [("a", "a")]) for _ in range(3)]
    with pytest.raises(InferenceError, match="simulated failure"):
        bad.result()
    assert [f.result() for f in good] == [[1.0, 0.0]] * 3 + [[1.0]] * 3
    assert pool.score_pairs(spec, [("x", "x")]) == [1.0]  # the worker is still alive
    assert pool.spec_stats(spec)["errors"] == 1
    pool.clear()


def test_timeout_withdraws_and_the_worker_keeps_going() -> None:
    model = Recording(delay_s=0.3)
    pool = _pool(max_batch_size=1)
    spec = _spec(model)
    pool.get(spec)
    blocker = threading.Thread(target=pool.score_pairs, args=(spec, [("q", "slow")]))
    blocker.start()
    time.sleep(0.05)
    with pytest.raises(RequestTimeoutError):
        pool.score_pairs(spec, [("q", "never")], timeout=0.05)
    blocker.join()
    assert pool.score_pairs(spec, [("q", "q")]) == [1.0]
    assert not any(p == "never" for b in model.batches for _, p in b), "withdrawn while queued"
    pool.clear()


async def test_cancelled_async_callers_do_not_disturb_others() -> None:
    model = Recording(delay_s=0.02)
    pool = _pool(max_batch_size=2)
    spec = _spec(model)
    pool.get(spec)

    async def call(i: int) -> list[float]:
        return await pool.ascore_pairs(spec, [(f"w{i}", f"w{i}"), (f"w{i}", "other")])

    tasks = [asyncio.create_task(call(i)) for i in range(20)]
    await asyncio.sleep(0.03)
    for task in tasks[1::2]:
        task.cancel()
    done = await asyncio.gather(*tasks, return_exceptions=True)
    for i, outcome in enumerate(done):
        if i % 2 == 0:
            assert outcome == [1.0, 0.0]
        else:
            assert isinstance(outcome, (asyncio.CancelledError, list))
    assert await pool.ascore_pairs(spec, [("z", "z")]) == [1.0]
    assert pool.spec_stats(spec)["cancelled"] > 0
    pool.clear()


def test_score_cache_hits_are_fast_and_counted() -> None:
    model = Recording()
    pool = _pool(score_cache_size=1000)
    spec = _spec(model)
    pairs = [("q", f"passage {i}") for i in range(50)]
    first = pool.score_pairs(spec, pairs)
    passes = len(model.batches)
    start = time.perf_counter()
    second = pool.score_pairs(spec, pairs)
    elapsed = time.perf_counter() - start
    assert second == first
    assert len(model.batches) == passes, "a full hit must not run the model"
    stats = pool.spec_stats(spec)
    assert (stats["cache_hits"], stats["cache_misses"]) == (50, 50)
    assert elapsed < 0.05  # generous bound; the benchmark reports the real figure
    pool.clear()


def test_query_embedding_cache() -> None:
    calls = []

    class CountingEmbedder(FakeEmbedder):
        thread_safe = False

        def embed(self, texts, *, batch_size, is_query, normalize=False):
            calls.append(list(texts))
            return super().embed(texts, batch_size=batch_size, is_query=is_query)

    name = f"emb-{uuid.uuid4().hex[:8]}"
    register_backend(name, lambda spec, pool: CountingEmbedder(), "embedder")
    pool = _pool()
    spec = ModelSpec("m", backend=name, device="cpu")
    a = pool.embed(spec, ["what is up"], is_query=True)
    b = pool.embed(spec, ["what is up"], is_query=True)
    assert a == b
    assert len(calls) == 1
    pool.embed(spec, ["what is up"], is_query=False)  # documents are not cached
    assert len(calls) == 2
    pool.clear()


def test_release_finishes_queued_work() -> None:
    model = Recording(delay_s=0.05)
    pool = _pool(max_batch_size=1)
    spec = _spec(model)
    pool.get(spec)
    with ThreadPoolExecutor(4) as ex:
        futures = [ex.submit(pool.score_pairs, spec, [("q", "q")]) for _ in range(4)]
        time.sleep(0.02)
        pool.release(spec)
        assert [f.result() for f in futures] == [[1.0]] * 4


def test_engine_config_from_env() -> None:
    config = EngineConfig.from_env(
        {"RAG_RERANK_TOKEN_BUDGET": "4096", "RAG_RERANK_MAX_WAIT_MS": "5", "RAG_RERANK_X": "1"}
    )
    assert config.token_budget == 4096
    assert config.max_wait_ms == 5.0
    assert config.wait_seconds("cpu") == 0.005
    assert EngineConfig().wait_seconds("cpu") == 0.0
    # Requests that arrive during a pass merge into the next ones: an idle worker never waits.
    assert EngineConfig().wait_seconds("cuda:0") == 0.0
    assert EngineConfig.from_env({"RAG_RERANK_PIPELINE": "0"}).pipeline is False
    with pytest.raises(ValueError, match="boolean"):
        EngineConfig.from_env({"RAG_RERANK_PIPELINE": "maybe"})
    assert EngineConfig().tokens_per_batch("cpu") == 1024
    assert EngineConfig(token_budget=100).tokens_per_batch("cuda:0") == 100
    # A model's kernels may prefer another CPU budget; the pool's explicit one always wins.
    assert EngineConfig().tokens_per_batch("cpu", 1536) == 1536
    assert EngineConfig(token_budget=100).tokens_per_batch("cpu", 1536) == 100
    assert EngineConfig().tokens_per_batch("cuda:0", 1536) == 16384
    assert EngineConfig().tokens_per_batch("cpu", 0) == 1024
    with pytest.raises(ValueError, match="positive"):
        EngineConfig(max_queue=0)


def test_a_request_withdrawn_and_notified_settles_without_raising() -> None:
    """A future cancelled by its caller and then seen by the worker (notified) is settled by a
    later failure (close, crash) quietly: 'Future in unexpected state' here once stranded every
    other caller of a crash handler."""
    from rag_rerank_plugins.backends.base import SCORE
    from rag_rerank_plugins.engine.request import Request

    settled: list[Request] = []
    request = Request(SCORE, [("q", "p")], 4)
    request.on_settled = settled.append
    assert request.future.cancel()
    assert not request.start()  # the worker sees the withdrawal (CANCELLED_AND_NOTIFIED)
    assert request.fail(RuntimeError("worker crashed")) is False
    assert request.done
    assert settled == [request]
    assert request.withdraw() is False  # exactly once


def test_a_loop_caller_past_its_own_deadline_gets_its_timeout_not_queue_full() -> None:
    """An event-loop caller waiting for room retries admission; when its own timeout ended
    first, the retry raised QueueFullError (counted as rejected), where a waiting thread gets
    RequestTimeoutError. Both paths now agree."""
    import time

    from rag_rerank_plugins.backends.base import SCORE
    from rag_rerank_plugins.engine.queue import RequestQueue
    from rag_rerank_plugins.engine.request import Request
    from rag_rerank_plugins.exceptions import QueueFullError, RequestTimeoutError
    from rag_rerank_plugins.stats import Metrics

    queue = RequestQueue("m", EngineConfig(max_queue=1, queue_timeout_s=5), Metrics(100, 8))
    assert queue.add(Request(SCORE, [("q", "p")], 4), lambda: None)
    late = Request(SCORE, [("q", "p")], 4, timeout=0.01)
    woken: list[int] = []
    admit_by = time.monotonic() + 5
    assert not queue.add(
        late, lambda: None, wait=False, admit_by=admit_by, on_room=lambda: woken.append(1)
    )
    time.sleep(0.02)
    with pytest.raises(RequestTimeoutError):
        queue.add(late, lambda: None, wait=False, admit_by=admit_by)
    gone = Request(SCORE, [("q", "p")], 4)
    with pytest.raises(QueueFullError):  # its wait for room is over
        queue.add(gone, lambda: None, wait=False, admit_by=time.monotonic() - 1)
