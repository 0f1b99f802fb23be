"""Fault injection through the backend seam, seen from the adapters, and ``on_error`` passthrough.

Faults come from backends registered with ``register_backend`` (a failing loader, a forward that
raises, runs out of memory, or hangs); nothing patches torch. Pool-level versions of some faults
live in test_pool.py (load failure + retry) and test_scheduler.py (OOM split, one failing batch,
queued timeout, cancellation); these tests add what callers of the LangChain and LlamaIndex
adapters see, and the graceful-degradation mode.
"""

from __future__ import annotations

import asyncio
import copy
import logging
import math
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest

pytest.importorskip("langchain_core")
pytest.importorskip("llama_index.core")

from langchain_core.documents import Document
from llama_index.core.schema import NodeWithScore, QueryBundle, TextNode

from rag_rerank_plugins import (
    InferenceError,
    InvalidInputError,
    ModelLoadError,
    ModelPool,
    ModelSpec,
    OutOfMemoryError,
    RequestTimeoutError,
)
from rag_rerank_plugins.backends import RerankerModel, register_backend
from rag_rerank_plugins.engine_config import EngineConfig
from rag_rerank_plugins.langchain import SharedRerankCompressor
from rag_rerank_plugins.llama_index import SharedRerankPostprocessor
from rag_rerank_plugins.testing import FakeReranker

QUERY = "red apple"
TEXTS = ["green pear", "red apple pie", "apple tree", "blue sky", "red car"]
EXPECTED_ORDER = [1, 2, 4, 0, 3]  # fake scores 1.0, 0.5, 0.5, 0, 0 (ties keep retrieval order)


class Faulty(RerankerModel):
    """A scheduled (not thread-safe) fake whose forward fails as told.

    ``fail``: raise ValueError when any passage contains "boom"; ``oom_above``: MemoryError for
    batches larger than that; ``gate``: block each forward until the event is set (a hung model).
    """

    thread_safe = False

    def __init__(
        self, *, oom_above: int | None = None, gate: threading.Event | None = None
    ) -> None:
        self.oom_above = oom_above
        self.gate = gate
        self.forwards = 0
        self._fake = FakeReranker()

    def score_pairs(self, pairs: Sequence[tuple[str, str]], batch_size: int) -> list[float]:
        self.forwards += 1
        if self.gate is not None:
            self.gate.wait(10)
        if self.oom_above is not None and len(pairs) > self.oom_above:
            raise MemoryError("simulated OOM")
        if any("boom" in p for _, p in pairs):
            raise ValueError("simulated forward failure")
        return self._fake.score_pairs(pairs, batch_size)


def _backend(loader: Callable[..., RerankerModel]) -> str:
    name = f"faulty-{uuid.uuid4().hex[:8]}"
    register_backend(name, loader, "reranker")
    return name


def _docs(texts: Sequence[str] = TEXTS) -> list[Document]:
    return [
        Document(page_content=t, metadata={"i": i, "relevance_score": 0.9}, id=f"d{i}")
        for i, t in enumerate(texts)
    ]


def _nodes(texts: Sequence[str] = TEXTS) -> list[NodeWithScore]:
    return [
        NodeWithScore(node=TextNode(text=t, id_=f"n{i}", metadata={"i": i}), score=1.0 - i / 10)
        for i, t in enumerate(texts)
    ]


def _lc(pool: ModelPool, backend: str, **kwargs) -> SharedRerankCompressor:
    return SharedRerankCompressor(model="m", backend=backend, pool=pool, **kwargs)


def _li(pool: ModelPool, backend: str, **kwargs) -> SharedRerankPostprocessor:
    return SharedRerankPostprocessor(model="m", backend=backend, pool=pool, **kwargs)


@pytest.fixture
def pool() -> ModelPool:
    fresh = ModelPool(config=EngineConfig(max_batch_size=8))
    yield fresh
    fresh.clear()


# -- graceful degradation -------------------------------------------------------------------


@pytest.mark.parametrize("use_async", [False, True])
def test_langchain_passthrough_keeps_retrieval_order_flags_and_counts(
    pool: ModelPool, use_async: bool
) -> None:
    comp = _lc(pool, _backend(lambda s, p: Faulty()), top_n=3, on_error="passthrough")
    docs = _docs(["boom", *TEXTS[1:]])
    before = copy.deepcopy(docs)
    if use_async:
        out = asyncio.run(comp.acompress_documents(docs, QUERY))
    else:
        out = comp.compress_documents(docs, QUERY)
    assert [d.id for d in out] == ["d0", "d1", "d2"]  # retrieval order, top_n applied
    for doc in out:
        assert "simulated forward failure" in doc.metadata["rerank_error"]
        assert "relevance_score" not in doc.metadata  # the earlier stage's score is not ours
        assert len(doc.metadata["rerank_error"]) <= 200
    assert docs == before, "inputs are never modified"
    stats = comp.stats()
    assert (stats["passthrough"], stats["errors"]) == (1, 1)


def test_passthrough_warning_names_the_documents_it_returns(
    pool: ModelPool, caplog: pytest.LogCaptureFixture
) -> None:
    """The incident log says how many documents went back (top_n applied), not how many came in."""
    comp = _lc(pool, _backend(lambda s, p: Faulty()), top_n=2, on_error="passthrough")
    with caplog.at_level(logging.WARNING, logger="rag_rerank_plugins"):
        out = comp.compress_documents(_docs(["boom", *TEXTS[1:4]]), QUERY)
    assert len(out) == 2
    [message] = [r.getMessage() for r in caplog.records if "passthrough" in r.getMessage()]
    assert "returning the first 2 of 4 documents" in message


@pytest.mark.parametrize("use_async", [False, True])
def test_llama_index_passthrough_keeps_retrieval_order_flags_and_counts(
    pool: ModelPool, use_async: bool
) -> None:
    post = _li(
        pool,
        _backend(lambda s, p: Faulty()),
        top_n=None,
        on_error="passthrough",
        keep_retrieval_score=True,
    )
    nodes = _nodes([*TEXTS, "boom"])
    before = copy.deepcopy(nodes)
    if use_async:
        out = asyncio.run(post.apostprocess_nodes(nodes, query_str=QUERY))
    else:
        out = post.postprocess_nodes(nodes, query_str=QUERY)
    assert [n.node.node_id for n in out] == [f"n{i}" for i in range(6)]  # nothing dropped
    for item, original in zip(out, nodes, strict=True):
        assert item.score is None
        assert "simulated forward failure" in item.node.metadata["rerank_error"]
        assert item.node.metadata["retrieval_score"] == original.score
        assert "rerank_error" in item.node.excluded_llm_metadata_keys
        assert item.node is not original.node
    assert [n.node.metadata for n in nodes] == [n.node.metadata for n in before]
    assert [n.score for n in nodes] == [n.score for n in before]
    assert post.stats()["passthrough"] == 1


def test_raise_is_the_default_and_counts_no_passthrough(pool: ModelPool) -> None:
    comp = _lc(pool, _backend(lambda s, p: Faulty()))
    with pytest.raises(InferenceError, match="simulated forward failure"):
        comp.compress_documents(_docs(["boom"]), QUERY)
    post = _li(pool, comp.backend)
    with pytest.raises(InferenceError, match="simulated forward failure"):
        post.postprocess_nodes(_nodes(["boom"]), query_str=QUERY)
    assert comp.stats()["passthrough"] == 0
    assert comp.stats()["errors"] == 2


def test_passthrough_never_hides_invalid_input(pool: ModelPool) -> None:
    comp = _lc(pool, _backend(lambda s, p: Faulty()), on_error="passthrough")
    with pytest.raises(InvalidInputError, match="query"):
        comp.compress_documents(_docs(), None)  # type: ignore[arg-type]
    with pytest.raises(InvalidInputError, match=r"documents\[1\]"):
        comp.compress_documents([Document(page_content="a"), "raw"], QUERY)  # type: ignore[list-item]
    post = _li(pool, comp.backend, on_error="passthrough")
    with pytest.raises(InvalidInputError, match="query"):
        post.postprocess_nodes(_nodes())
    assert comp.stats()["passthrough"] == 0


def test_passthrough_on_load_failure_then_the_next_call_loads(pool: ModelPool) -> None:
    attempts: list[int] = []

    def flaky(spec, _pool) -> RerankerModel:
        attempts.append(1)
        if len(attempts) == 1:
            raise OSError("weights file truncated")
        return Faulty()

    comp = _lc(pool, _backend(flaky), top_n=None, on_error="passthrough")
    first = comp.compress_documents(_docs(), QUERY)
    assert [d.id for d in first] == [f"d{i}" for i in range(5)]
    assert "ModelLoadError" in first[0].metadata["rerank_error"]
    assert "weights file truncated" in first[0].metadata["rerank_error"]
    second = comp.compress_documents(_docs(), QUERY)
    assert [d.id for d in second] == [f"d{i}" for i in EXPECTED_ORDER]
    assert "rerank_error" not in second[0].metadata
    stats = comp.stats()
    assert (stats["loads"], stats["load_failures"], stats["passthrough"]) == (1, 1, 1)


def test_passthrough_on_timeout_answers_within_the_timeout(pool: ModelPool) -> None:
    gate = threading.Event()
    slow_pool = ModelPool(config=EngineConfig(request_timeout_s=0.2))
    comp = _lc(slow_pool, _backend(lambda s, p: Faulty(gate=gate)), on_error="passthrough")
    try:
        start = time.perf_counter()
        out = comp.compress_documents(_docs(), QUERY)
        assert time.perf_counter() - start < 2.0
        assert "RequestTimeoutError" in out[0].metadata["rerank_error"]
        out = asyncio.run(comp.acompress_documents(_docs(), QUERY))
        assert "RequestTimeoutError" in out[0].metadata["rerank_error"]
        assert comp.stats()["passthrough"] == 2
    finally:
        gate.set()
        slow_pool.clear()


# -- faults as adapter callers see them (raise mode) ------------------------------------------


def test_load_failure_names_model_and_cause_through_adapters(pool: ModelPool) -> None:
    attempts: list[int] = []

    def flaky(spec, _pool) -> RerankerModel:
        attempts.append(1)
        if len(attempts) <= 2:
            raise RuntimeError("CUDA driver too old")
        return Faulty()

    backend = _backend(flaky)
    comp = SharedRerankCompressor(model="org/reranker-x", backend=backend, pool=pool)
    with pytest.raises(ModelLoadError, match="org/reranker-x") as info:
        comp.compress_documents(_docs(), QUERY)
    assert "CUDA driver too old" in str(info.value)
    post = SharedRerankPostprocessor(model="org/reranker-x", backend=backend, pool=pool)
    with pytest.raises(ModelLoadError, match="CUDA driver too old"):
        asyncio.run(post.apostprocess_nodes(_nodes(), query_str=QUERY))
    out = comp.compress_documents(_docs(), QUERY)  # third attempt loads
    assert [d.id for d in out] == [f"d{i}" for i in EXPECTED_ORDER[:3]]
    assert len(attempts) == 3


def test_out_of_memory_splits_and_adapters_get_the_full_answer(pool: ModelPool) -> None:
    model = Faulty(oom_above=1)
    comp = _lc(pool, _backend(lambda s, p: model), top_n=None)
    out = comp.compress_documents(_docs(), QUERY)
    assert [d.id for d in out] == [f"d{i}" for i in EXPECTED_ORDER]
    post = _li(pool, comp.backend, top_n=None)
    nodes = asyncio.run(post.apostprocess_nodes(_nodes(), query_str=QUERY))
    assert [n.node.node_id for n in nodes] == [f"n{i}" for i in EXPECTED_ORDER]
    assert comp.stats()["oom_splits"] >= 2
    assert comp.stats()["errors"] == 0


class FaultyThreadSafe(Faulty):
    """Called directly (no queue): a user's thread-safe backend."""

    thread_safe = True


class PrepareOOM(Faulty):
    """Runs out of memory while preparing (tokenizing, pinning) a batch over 1 item."""

    def prepare(self, task: Any, items: Sequence[Any]) -> Any:
        if len(items) > 1:
            raise MemoryError("simulated OOM while pinning")
        return super().prepare(task, items)


@pytest.mark.parametrize("kind", [FaultyThreadSafe, PrepareOOM])
def test_out_of_memory_splits_on_every_path(pool: ModelPool, kind: type[Faulty]) -> None:
    """An out-of-memory error in a directly called (thread-safe) model, or in a pass's prepare
    step, failed the whole call as an InferenceError; the forward's was split."""
    model = kind(oom_above=1)
    comp = _lc(pool, _backend(lambda s, p: model), top_n=None)
    out = comp.compress_documents(_docs(), QUERY)
    assert [d.id for d in out] == [f"d{i}" for i in EXPECTED_ORDER]
    nodes = asyncio.run(
        _li(pool, comp.backend, top_n=None).apostprocess_nodes(_nodes(), query_str=QUERY)
    )
    assert [n.node.node_id for n in nodes] == [f"n{i}" for i in EXPECTED_ORDER]
    assert comp.stats()["errors"] == 0


def test_a_direct_call_whose_single_item_does_not_fit_says_so(pool: ModelPool) -> None:
    model = FaultyThreadSafe(oom_above=0)
    spec = ModelSpec("m", backend=_backend(lambda s, p: model), device="cpu")
    with pytest.raises(OutOfMemoryError, match="single item"):
        pool.score_pairs(spec, [(QUERY, t) for t in TEXTS])
    assert model.forwards <= 2 * len(TEXTS) - 1  # halves, down to one item: no loop


def test_hung_forward_honours_the_callers_timeout(pool: ModelPool) -> None:
    """The request is already running (not queued) when its timeout expires."""
    gate = threading.Event()
    model = Faulty(gate=gate)
    backend = _backend(lambda s, p: model)
    timed = ModelPool(config=EngineConfig(request_timeout_s=0.3))
    comp = _lc(timed, backend)
    post = _li(timed, backend)
    try:
        start = time.perf_counter()
        with pytest.raises(RequestTimeoutError):
            comp.compress_documents(_docs(), QUERY)
        with pytest.raises(RequestTimeoutError):
            asyncio.run(post.apostprocess_nodes(_nodes(), query_str=QUERY))
        spec = comp.spec
        with pytest.raises(RequestTimeoutError):  # an explicit timeout beats the config's
            timed.score_pairs(spec, [(QUERY, "x")], timeout=0.05)
        assert time.perf_counter() - start < 3.0
        gate.set()  # the model recovers: the worker is not wedged
        assert [d.id for d in comp.compress_documents(_docs(), QUERY)] == ["d1", "d2", "d4"]
        assert timed.spec_stats(spec)["errors"] == 3
    finally:
        gate.set()
        timed.clear()


def test_one_failing_batch_fails_only_its_callers_across_adapters() -> None:
    """Concurrent adapter calls share forward passes; the one with a poisoned document fails
    (or, with passthrough, degrades) and every other caller gets its exact answer."""
    pool = ModelPool(config=EngineConfig(max_batch_size=1))  # one item per forward pass
    backend = _backend(lambda s, p: Faulty())
    strict = _lc(pool, backend, top_n=None)
    lenient = _li(pool, backend, top_n=None, on_error="passthrough")
    good_docs = _docs()
    expected = [d.id for d in strict.compress_documents(good_docs, QUERY)]

    def good(_: int) -> list[str]:
        return [d.id for d in strict.compress_documents(good_docs, QUERY)]

    try:
        with ThreadPoolExecutor(8) as ex:
            goods = [ex.submit(good, i) for i in range(12)]
            bad_strict = ex.submit(strict.compress_documents, _docs([*TEXTS, "boom"]), QUERY)
            bad_lenient = ex.submit(
                lenient.postprocess_nodes, _nodes(["boom", *TEXTS]), None, QUERY
            )
            goods += [ex.submit(good, i) for i in range(12)]
        with pytest.raises(InferenceError, match="simulated forward failure"):
            bad_strict.result()
        degraded = bad_lenient.result()
        assert [n.node.node_id for n in degraded] == [f"n{i}" for i in range(6)]
        assert all(n.score is None for n in degraded)
        assert all(f.result() == expected for f in goods)
        stats = strict.stats()
        assert (stats["errors"], stats["passthrough"]) == (2, 1)
    finally:
        pool.clear()


def test_nan_scores_never_reach_a_passthrough_caller_as_numbers(pool: ModelPool) -> None:
    """Passthrough scores are absent (LangChain) / None (LlamaIndex), never NaN floats."""
    comp = _lc(pool, _backend(lambda s, p: Faulty()), on_error="passthrough", top_n=None)
    out = comp.compress_documents(_docs(["boom", "x"]), QUERY)
    assert all(
        not isinstance(d.metadata.get("relevance_score"), float)
        or not math.isnan(d.metadata["relevance_score"])
        for d in out
    )
    post = _li(pool, comp.backend, on_error="passthrough")
    assert [n.score for n in post.postprocess_nodes(_nodes(["boom"]), query_str=QUERY)] == [None]


def test_postprocess_with_query_bundle_passthrough(pool: ModelPool) -> None:
    post = _li(pool, _backend(lambda s, p: Faulty()), on_error="passthrough", top_n=1)
    out = post.postprocess_nodes(_nodes(["boom", "a"]), query_bundle=QueryBundle(QUERY))
    assert [n.node.node_id for n in out] == ["n0"]


def test_passthrough_on_a_full_queue() -> None:
    gate = threading.Event()
    full = ModelPool(config=EngineConfig(max_queue=1, max_batch_size=1))
    comp = _lc(full, _backend(lambda s, p: Faulty(gate=gate)), on_error="passthrough")
    full.get(comp.spec)
    try:
        with ThreadPoolExecutor(2) as ex:
            running = ex.submit(full.score_pairs, comp.spec, [(QUERY, "red")])
            time.sleep(0.2)  # taken by the worker, which now hangs on the gate
            queued = ex.submit(full.score_pairs, comp.spec, [(QUERY, "apple")])
            time.sleep(0.2)  # the queue (max 1) is full
            out = comp.compress_documents(_docs(), QUERY)
            gate.set()
        assert [d.id for d in out] == ["d0", "d1", "d2"]
        assert "QueueFullError" in out[0].metadata["rerank_error"]
        assert (running.result(), queued.result()) == ([0.5], [0.5])
        assert comp.stats()["rejected"] == 1
    finally:
        gate.set()
        full.clear()
