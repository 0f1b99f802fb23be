"""Priority lanes: interactive requests overtake queued bulk work without starving it."""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest
from pydantic import ValidationError

from rag_rerank_plugins import InvalidInputError, ModelPool, ModelSpec
from rag_rerank_plugins.backends import register_backend
from rag_rerank_plugins.backends.base import Prepared, Task
from rag_rerank_plugins.engine_config import EngineConfig
from rag_rerank_plugins.testing import SimulatedReranker


class _Recording(SimulatedReranker):
    """A slow simulated device that records the first query of every pass, in order."""

    def __init__(self, seconds_per_pass: float) -> None:
        super().__init__()
        self.seconds_per_pass = seconds_per_pass
        self.order: list[str] = []
        self._lock = threading.Lock()
        self.started = threading.Event()

    def forward(self, task: Task, batch: Prepared) -> Any:
        self.started.set()
        time.sleep(self.seconds_per_pass)  # GIL-free, like a kernel
        with self._lock:
            self.order.append(batch.payload[0][0])
        return [0.0] * batch.size

    def prepare(self, task: Task, items: Sequence[Any]) -> Prepared:
        return Prepared(list(items), len(items))


def _setup(seconds_per_pass: float, **config: Any) -> tuple[ModelPool, ModelSpec, _Recording]:
    model = _Recording(seconds_per_pass)
    name = f"lanes-{uuid.uuid4().hex[:8]}"
    register_backend(name, lambda spec, provider: model, "reranker", uses_torch=False)
    pool = ModelPool(config=EngineConfig(max_batch_size=8, **config))
    return pool, ModelSpec("m", backend=name, device="cpu"), model


@pytest.mark.parametrize("arrival", [0.15, 0.2, 0.25, 0.35, 0.45])
def test_an_interactive_request_waits_for_at_most_the_running_pass(arrival: float) -> None:
    """At several moments of the bulk stream. Before, when the worker's refill took the
    interactive request into a round behind bulk batches, the yield check (which looked at the
    queue only) no longer saw it: it waited for 4 bulk passes at half of these moments."""
    # 100 ms passes: between reading ``before`` and the request reaching the queue, a busy CI
    # box may let the running pass finish and the next start; at 30 ms that happened.
    pool, spec, model = _setup(0.1, bulk_aging_ms=60_000)
    bulk_pairs = [[(f"bulk {r}", f"passage {i}") for i in range(20)] for r in range(10)]
    with ThreadPoolExecutor(10) as ex:
        bulk = [ex.submit(pool.score_pairs, spec, p, priority="bulk") for p in bulk_pairs]
        assert model.started.wait(10)
        time.sleep(arrival)  # bulk passes are running and more are prepared ahead
        before = len(model.order)
        scores = pool.score_pairs(spec, [("interactive q", f"p{i}") for i in range(4)])
        returned = len(model.order)
        first_interactive = model.order.index("interactive q")
        results = [f.result(timeout=60) for f in bulk]
    # Its answer came before the next (bulk) pass ended: before, a backend whose forward does
    # all the work had its interactive pass delivered only after the next pass's forward.
    assert returned == first_interactive + 1, model.order[first_interactive:returned]
    assert scores == [0.0] * 4
    assert results == [[0.0] * 20] * 10, "bulk work still completes, every item"
    # Passes that finished after the interactive request arrived and before its own pass: at
    # most the one that was running (the 200 queued bulk items are 25 passes).
    assert first_interactive - before <= 1, model.order[before : first_interactive + 1]
    stats = pool.spec_stats(spec)
    assert stats["bulk_yields"] >= 1
    assert stats["queue_wait_ms_p95_bulk"] is not None
    assert stats["queue_wait_ms_p95_interactive"] is not None
    pool.clear()


def test_bulk_work_is_not_starved_by_a_stream_of_interactive_requests() -> None:
    pool, spec, _ = _setup(0.01, bulk_aging_ms=100)
    stop = threading.Event()

    def interactive_stream() -> int:
        n = 0
        while not stop.is_set():
            pool.score_pairs(spec, [(f"interactive {n}", "p")] * 8)
            n += 1
        return n

    with ThreadPoolExecutor(4) as ex:
        streams = [ex.submit(interactive_stream) for _ in range(3)]
        time.sleep(0.05)
        started = time.perf_counter()
        try:
            bulk = pool.score_pairs(spec, [("bulk", f"p{i}") for i in range(16)], priority="bulk")
        finally:  # a failed call must fail the test, not leave the streams running forever
            stop.set()
        waited = time.perf_counter() - started
        served = sum(f.result() for f in streams)
    assert bulk == [0.0] * 16
    assert served > 0
    assert waited < 30, "aging must let bulk through while interactive traffic continues"
    pool.clear()


def test_results_are_the_same_in_either_lane() -> None:
    pool, spec, _ = _setup(0.0)
    pairs = [("alpha beta", "alpha x"), ("alpha beta", "beta alpha"), ("alpha beta", "none")]
    assert pool.score_pairs(spec, pairs, priority="bulk") == pool.score_pairs(spec, pairs)
    pool.clear()


def test_bad_priorities_are_rejected_before_model_work() -> None:
    pool, spec, model = _setup(0.0)
    with pytest.raises(InvalidInputError, match="interactive"):
        pool.score_pairs(spec, [("q", "p")], priority="urgent")  # type: ignore[arg-type]
    assert model.order == []
    pytest.importorskip("langchain_core")
    from rag_rerank_plugins.langchain import SharedEmbeddings, SharedRerankCompressor

    with pytest.raises(ValidationError):
        SharedRerankCompressor(model="m", backend="fake-reranker", priority="urgent")
    emb = SharedEmbeddings(model="m", backend="fake-embedder", priority="bulk", pool=pool)
    assert emb.priority == "bulk"
    assert len(emb.embed_documents(["a", "b"])) == 2
    pool.clear()
