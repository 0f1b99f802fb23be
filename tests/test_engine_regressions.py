"""Engine regressions, one test per symptom seen in the field (public APIs only).

Each test failed (or hung) on the engine before its rewrite, but for the two cases where a direct
backend returns None instead of a list, which already failed cleanly. Waits are bounded and run in
daemon threads, so a wedged engine fails a test instead of hanging it or blocking pytest's exit;
pools are released in daemon threads for the same reason. (Symptoms 6, 8 and 9 are tested
elsewhere.)

1. An interactive call that times out while queued behind a long bulk pass must not kill the
   worker and strand the bulk caller (``IndexError`` in the scheduler, bulk items left behind).
2. Bad ``finish()`` output (None; a generator with parallel CPU workers) and a ``free_cache()``
   that raises after an out-of-memory pass: every caller resolves, and a later bulk request does
   not livelock the worker.
3. Bulk work put back for interactive work ages like queued work: it is not starved by a
   continuous interactive stream.
4. The direct path (the bi-encoder) honours ``timeout`` and ``priority``.
5. Async calls never load a model on the event loop.
7. Bad backend output on the direct path (wrong counts, None / str / NaN / inf scores, bad
   vectors) is an ``InferenceError`` naming the backend, through the LangChain adapters too.
"""

from __future__ import annotations

import asyncio
import functools
import gc
import logging
import math
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future
from typing import Any

import pytest

from rag_rerank_plugins import ModelPool, ModelSpec
from rag_rerank_plugins.backends import register_backend
from rag_rerank_plugins.backends.base import (
    EmbedderModel,
    Kind,
    LoadedModel,
    Prepared,
    RerankerModel,
    Task,
)
from rag_rerank_plugins.backends.bi_encoder import embedder_spec_for
from rag_rerank_plugins.engine_config import EngineConfig
from rag_rerank_plugins.exceptions import (
    InferenceError,
    RagRerankError,
    RequestTimeoutError,
)
from rag_rerank_plugins.testing import FakeEmbedder, FakeReranker

# -- helpers --------------------------------------------------------------------------------------


def _in_thread(fn: Callable[[], Any]) -> Future[Any]:
    """Run ``fn`` in a daemon thread; its outcome lands in the returned future."""
    future: Future[Any] = Future()

    def target() -> None:
        try:
            future.set_result(fn())
        except BaseException as exc:
            future.set_exception(exc)

    threading.Thread(target=target, name="regression-caller", daemon=True).start()
    return future


#: How long a caller may take before the engine counts as wedged: generous, because a loaded
#: 2-core CI box once needed more than 3 s for a split pass (a hang never resolves at all).
WEDGED_S = 10.0


def _outcome(future: Future[Any], seconds: float, what: str) -> Any:
    """The result, or the exception, of ``future``; fails the test if it takes longer."""
    try:
        return future.result(seconds)
    except BaseException as exc:
        # RequestTimeoutError is a TimeoutError too: only a future still pending timed out here.
        if not future.done():
            pytest.fail(f"{what} did not resolve within {seconds} s (the engine is wedged)")
        return exc


def _register(model: Callable[[], LoadedModel], kind: Kind = "reranker") -> ModelSpec:
    name = f"regression-{uuid.uuid4().hex[:8]}"
    register_backend(name, lambda spec, provider: model(), kind, uses_torch=False, replace=True)
    return ModelSpec("m", backend=name, device="cpu")


def _expected(pairs: Sequence[tuple[str, str]]) -> list[float]:
    return FakeReranker().score_pairs(pairs, len(pairs))


@pytest.fixture
def make_pool() -> Iterator[Callable[..., ModelPool]]:
    """Pools with an ``EngineConfig``; cleared afterwards in a daemon thread (a wedged worker
    must not hang the test session)."""
    pools: list[ModelPool] = []

    def make(**config: Any) -> ModelPool:
        pool = ModelPool(config=EngineConfig(**config))
        pools.append(pool)
        return pool

    yield make
    for pool in pools:
        thread = threading.Thread(target=pool.clear, name="regression-clear", daemon=True)
        thread.start()
        thread.join(5)


class Passes(RerankerModel):
    """A scheduled reranker whose passes take ``pass_s`` (GIL-free); FakeReranker's scores.

    ``first_pass_s`` overrides the first pass; ``started`` is set when a pass begins; ``output``
    may turn a pass's scores into something else (what ``finish`` returns)."""

    thread_safe = False

    def __init__(
        self,
        pass_s: float = 0.0,
        *,
        first_pass_s: float | None = None,
        output: Callable[[list[tuple[str, str]], list[float]], Any] | None = None,
    ) -> None:
        self.pass_s = pass_s
        self.first_pass_s = first_pass_s
        self.output = output
        self.started = threading.Event()
        self.passes = 0

    def forward(self, task: Task, batch: Prepared) -> Any:
        first = not self.started.is_set()
        self.started.set()
        time.sleep(self.first_pass_s if first and self.first_pass_s is not None else self.pass_s)
        self.passes += 1
        return list(batch.payload)

    def finish(self, task: Task, pending: Any) -> Any:
        scores = _expected(pending)
        return scores if self.output is None else self.output(pending, scores)

    def score_pairs(self, pairs: Sequence[tuple[str, str]], batch_size: int) -> list[float]:
        task = Task("score")
        return list(self.finish(task, self.forward(task, self.prepare(task, pairs))))


def _no_engine_errors_logged(caplog: pytest.LogCaptureFixture) -> None:
    crashes = [
        r.getMessage()
        for r in caplog.records
        if r.levelno >= logging.ERROR and r.name.startswith("rag_rerank_plugins")
    ]
    assert not crashes, f"the engine logged errors: {crashes}"


def _later_bulk_request_completes(pool: ModelPool, spec: ModelSpec) -> None:
    """A bulk request after the fault: served quickly, by a worker that does not spin."""
    pairs = [("red apple", f"apple number {i}") for i in range(6)]
    yields_before = pool.spec_stats(spec).get("bulk_yields", 0)
    start = time.perf_counter()
    later = _in_thread(lambda: pool.score_pairs(spec, pairs, priority="bulk"))
    assert _outcome(later, WEDGED_S, "a later bulk request") == _expected(pairs)
    assert time.perf_counter() - start < 2.0
    yields = pool.spec_stats(spec).get("bulk_yields", 0)
    assert yields - yields_before <= 2, f"{yields - yields_before} bulk yields: a livelocked worker"
    time.sleep(0.1)
    assert pool.spec_stats(spec).get("bulk_yields", 0) == yields, "the worker keeps yielding"


# -- 1 --------------------------------------------------------------------------------------------


def test_interactive_timeout_behind_a_bulk_pass_does_not_strand_the_bulk_caller(
    make_pool: Callable[..., ModelPool], caplog: pytest.LogCaptureFixture
) -> None:
    """The interactive request expires while queued during a 0.4 s bulk pass, with more bulk
    batches prepared ahead (they are put back for it); the bulk caller must still finish without
    any later request coming to wake the worker."""
    model = Passes(pass_s=0.4)
    pool = make_pool(max_wait_ms=5, max_batch_size=8)
    spec = _register(lambda: model)
    pool.get(spec)
    pairs = [("red apple", f"bulk passage {i}") for i in range(10)]
    bulk = _in_thread(lambda: pool.score_pairs(spec, pairs, batch_size=2, priority="bulk"))
    assert model.started.wait(5)
    time.sleep(0.05)
    start = time.perf_counter()
    with pytest.raises(RequestTimeoutError):
        pool.score_pairs(spec, [("red apple", "interactive")], timeout=0.2)
    assert time.perf_counter() - start < 1.5
    # Nothing else is submitted from here on.
    assert _outcome(bulk, 5 * 0.4 + WEDGED_S, "the bulk caller") == _expected(pairs)
    _no_engine_errors_logged(caplog)


# -- 2 --------------------------------------------------------------------------------------------


def _nil_when_tagged(pairs: list[tuple[str, str]], scores: list[float]) -> Any:
    return None if any("#nil" in p for _, p in pairs) else scores


def test_finish_returning_none_fails_its_callers_and_the_worker_keeps_serving(
    make_pool: Callable[..., ModelPool],
) -> None:
    """A's pass returns None while B (more than one round of items) is partly taken and C is
    still queued: A gets an InferenceError naming the model, B and C resolve, and a later bulk
    request is served by a worker that does not livelock."""
    model = Passes(pass_s=0.1, output=_nil_when_tagged)
    pool = make_pool(max_batch_size=2)
    spec = _register(lambda: model)
    pool.get(spec)
    a = _in_thread(lambda: pool.score_pairs(spec, [("q", "a #nil"), ("q", "a q")]))
    assert model.started.wait(5)
    b_pairs = [("q", f"b q {i}") for i in range(10)]
    b = _in_thread(lambda: pool.score_pairs(spec, b_pairs))
    c = _in_thread(lambda: pool.score_pairs(spec, [("q", "c q")]))
    error = _outcome(a, WEDGED_S, "the caller whose pass returned None")
    assert isinstance(error, InferenceError), repr(error)
    assert spec.backend in str(error)
    for name, future, expected in (("B", b, _expected(b_pairs)), ("C", c, [1.0])):
        outcome = _outcome(future, WEDGED_S, f"caller {name}")
        assert outcome == expected or isinstance(outcome, RagRerankError), (name, outcome)
    _later_bulk_request_completes(pool, spec)


def test_generators_from_parallel_cpu_workers_are_results_when_their_length_is_right(
    make_pool: Callable[..., ModelPool],
) -> None:
    """``finish`` may return any iterable with one result per item (a generator too); with the
    wrong length it is an InferenceError; the parallel device workers keep serving either way."""

    def generator(pairs: list[tuple[str, str]], scores: list[float]) -> Any:
        if any("#short" in p for _, p in pairs):
            scores = scores[:-1]
        return (s for s in scores)

    class Parallel(Passes):
        parallel_forward = True

    model = Parallel(pass_s=0.01, output=generator)
    pool = make_pool(max_batch_size=2, cpu_workers=2)
    spec = _register(lambda: model)
    pairs = [("red apple", f"apple {i}") for i in range(6)]
    good = _in_thread(lambda: pool.score_pairs(spec, pairs))
    assert _outcome(good, WEDGED_S, "a call answered by generators") == _expected(pairs)
    short = _in_thread(lambda: pool.score_pairs(spec, [("q", "x #short"), ("q", "y")]))
    error = _outcome(short, WEDGED_S, "a call answered by a short generator")
    assert isinstance(error, InferenceError), repr(error)
    assert spec.backend in str(error)
    _later_bulk_request_completes(pool, spec)


def test_free_cache_raising_after_an_oom_resolves_the_callers(
    make_pool: Callable[..., ModelPool],
) -> None:
    """Out of memory for passes of more than one item, and ``free_cache()`` raises: the caller
    gets its scores (the split went on) or an InferenceError, never a hang; then the worker
    still serves."""

    class OomThenBrokenCache(Passes):
        def forward(self, task: Task, batch: Prepared) -> Any:
            if batch.size > 1:
                raise MemoryError("simulated out of memory")
            return super().forward(task, batch)

        def free_cache(self) -> None:
            raise RuntimeError("simulated: emptying the device cache failed")

    pool = make_pool(max_batch_size=4)
    spec = _register(lambda: OomThenBrokenCache(pass_s=0.01))
    pairs = [("red apple", f"apple {i}") for i in range(4)]
    first = _in_thread(lambda: pool.score_pairs(spec, pairs))
    queued = _in_thread(lambda: pool.score_pairs(spec, [("red apple", "red")]))
    for name, future, expected in (
        ("the caller whose pass ran out of memory", first, _expected(pairs)),
        ("a caller queued behind it", queued, [0.5]),
    ):
        outcome = _outcome(future, WEDGED_S, name)
        if isinstance(outcome, BaseException):
            assert isinstance(outcome, InferenceError), (name, repr(outcome))
            assert spec.backend in str(outcome)
        else:
            assert outcome == expected, name
    single = _in_thread(lambda: pool.score_pairs(spec, [("red apple", "apple")]))
    assert _outcome(single, WEDGED_S, "a one-item call after the fault") == [0.5]
    _later_bulk_request_completes(pool, spec)


# -- 3 --------------------------------------------------------------------------------------------


def test_bulk_work_put_back_for_interactive_work_still_ages(
    make_pool: Callable[..., ModelPool],
) -> None:
    """The bulk request is on the device when a continuous interactive stream starts, so its
    prepared batches are put back; it must finish within about ``bulk_aging_ms`` and a few passes
    while the stream goes on (3 s), not when the stream ends."""
    model = Passes(pass_s=0.02, first_pass_s=0.1)
    pool = make_pool(max_batch_size=4, bulk_aging_ms=200)
    spec = _register(lambda: model)
    pool.get(spec)
    go, stop = threading.Event(), threading.Event()
    served = [0]

    def interactive_stream(i: int) -> None:
        go.wait(10)
        while not stop.is_set():
            pool.score_pairs(spec, [(f"interactive {i}", f"passage {j}") for j in range(4)])
            served[0] += 1

    def timed_bulk() -> tuple[list[float], float]:
        start = time.perf_counter()
        scores = pool.score_pairs(spec, pairs, priority="bulk")
        return scores, time.perf_counter() - start

    streams = [_in_thread(functools.partial(interactive_stream, i)) for i in range(6)]
    pairs = [("red apple", f"bulk apple {i}") for i in range(8)]
    bulk = _in_thread(timed_bulk)
    stopper = threading.Timer(3.0, stop.set)  # the stream lasts 3 s
    stopper.daemon = True
    try:
        assert model.started.wait(5)
        go.set()  # the stream starts while the first bulk pass runs
        stopper.start()
        outcome = _outcome(bulk, 8.0, "the bulk request")
    finally:
        stopper.join(5)
        stop.set()
        for future in streams:
            _outcome(future, 5.0, "an interactive caller")
    assert not isinstance(outcome, BaseException), repr(outcome)
    scores, waited = outcome
    assert scores == _expected(pairs)
    assert served[0] > 0
    assert waited < 1.0, f"the bulk request took {waited:.2f} s while the stream ran 3 s"


# -- 4 --------------------------------------------------------------------------------------------


def test_bi_encoder_rerank_honours_its_timeout(make_pool: Callable[..., ModelPool]) -> None:
    """The bi-encoder is called directly; its embedder (the fake, 1.5 s per call) too. A 0.2 s
    timeout must end the call after about 0.2 s, not after both embeds (3 s)."""
    pool = make_pool()
    spec = ModelSpec(
        "m",
        backend="bi-encoder",
        device="cpu",
        options=(("embedder_backend", "fake-embedder"), ("delay_ms", 1500)),
    )
    pool.get(spec)  # loads the embedder too (no embedding yet)
    start = time.perf_counter()
    call = _in_thread(lambda: pool.score_pairs(spec, [("red apple", "apple")], timeout=0.2))
    outcome = _outcome(call, 10.0, "the bi-encoder rerank")
    elapsed = time.perf_counter() - start
    assert isinstance(outcome, RequestTimeoutError), f"{outcome!r} after {elapsed:.2f} s"
    assert elapsed < 1.0, f"RequestTimeoutError after {elapsed:.2f} s for a 0.2 s timeout"


class SlowEmbedder(EmbedderModel):
    """A scheduled embedder with 0.1 s passes (FakeEmbedder's vectors)."""

    thread_safe = False

    def __init__(self) -> None:
        self._fake = FakeEmbedder()
        self.passes = 0
        self.two_passes = threading.Event()

    @property
    def dimension(self) -> int:
        return self._fake.dimension

    def forward(self, task: Task, batch: Prepared) -> Any:
        time.sleep(0.1)
        self.passes += 1
        if self.passes >= 2:
            self.two_passes.set()
        return self.run(task, batch.payload, batch.size)

    def embed(
        self,
        texts: Sequence[str],
        *,
        batch_size: int,
        is_query: bool,
        normalize: bool = False,
        prompt: str | None = None,
    ) -> list[list[float]]:
        return self._fake.embed(
            texts, batch_size=batch_size, is_query=is_query, normalize=normalize, prompt=prompt
        )


def test_bi_encoder_rerank_with_bulk_priority_uses_the_embedders_bulk_lane(
    make_pool: Callable[..., ModelPool],
) -> None:
    """A bulk bi-encoder rerank of 60 passages is 16 embedder passes of 0.1 s; an interactive
    embed on the same embedder meanwhile waits for the pass on the device, the one launched
    ahead of it and its own (about 0.3 s with this fake, whose forward blocks), not for the
    whole rerank (1.5 s)."""
    pool = make_pool(max_batch_size=4)
    model = SlowEmbedder()
    embedder = _register(lambda: model, "embedder")
    spec = ModelSpec(
        "m", backend="bi-encoder", device="cpu", options=(("embedder_backend", embedder.backend),)
    )
    assert pool.key(embedder_spec_for(spec)) == pool.key(embedder)
    pool.get(spec)
    pairs = [("red apple", f"apple passage {i}") for i in range(60)]
    rerank = _in_thread(lambda: pool.score_pairs(spec, pairs, priority="bulk"))
    assert model.two_passes.wait(5), "the rerank's embedding passes did not start"
    start = time.perf_counter()
    vectors = pool.embed(embedder, ["an interactive text"])
    waited = time.perf_counter() - start
    scores = _outcome(rerank, 10.0, "the bulk rerank")
    assert not isinstance(scores, BaseException), repr(scores)
    assert len(scores) == 60
    assert all(math.isfinite(s) for s in scores)
    assert len(vectors) == 1
    assert waited < 0.5, f"the interactive embed waited {waited:.2f} s behind the bulk rerank"


# -- 5 --------------------------------------------------------------------------------------------


async def _max_loop_gap(coro: Any) -> tuple[float, Any]:
    """Await ``coro`` while a ticker sleeps 5 ms in a loop: the longest gap between its ticks
    (how long the event loop was blocked), and the result.

    The test process's heap (every earlier test's objects) is frozen meanwhile: an automatic
    full collection of it, in whichever thread allocates, holds the GIL for ~100 ms on a busy
    2-core box (one CI run saw a 116 ms gap that way), which says nothing about where the load
    runs."""
    gc.collect()
    gc.freeze()
    try:
        return await _loop_gap(coro)
    finally:
        gc.unfreeze()


async def _loop_gap(coro: Any) -> tuple[float, Any]:
    gaps: list[float] = []
    stop = asyncio.Event()

    async def ticker() -> None:
        last = time.perf_counter()
        while not stop.is_set():
            await asyncio.sleep(0.005)
            now = time.perf_counter()
            gaps.append(now - last)
            last = now

    task = asyncio.create_task(ticker())
    await asyncio.sleep(0.02)
    try:
        result = await asyncio.wait_for(coro, 10)
    finally:
        stop.set()
        await task
    return max(gaps), result


@pytest.mark.parametrize("kind", ["reranker", "embedder"])
async def test_async_calls_never_load_models_on_the_event_loop(
    make_pool: Callable[..., ModelPool], kind: Kind
) -> None:
    """The first ``await`` of a cold model, and the first after ``release``, load it (0.6 s
    here) off the event loop: other tasks keep running (gap < 100 ms; a blocked loop: 600)."""
    loads: list[float] = []

    def slow_load() -> LoadedModel:
        time.sleep(0.6)
        loads.append(time.perf_counter())
        return Passes() if kind == "reranker" else FakeEmbedder()

    pool = make_pool()
    spec = _register(slow_load, kind)
    pairs = [("red apple", "apple"), ("red apple", "pear")]

    def call() -> Any:
        if kind == "reranker":
            return pool.ascore_pairs(spec, pairs)
        return pool.aembed(spec, ["red apple"])

    expected = (
        _expected(pairs)
        if kind == "reranker"
        else FakeEmbedder().embed(["red apple"], batch_size=1, is_query=False)
    )
    cold_gap, result = await _max_loop_gap(call())
    assert result == expected
    await asyncio.to_thread(pool.release, spec)
    reload_gap, result = await _max_loop_gap(call())
    assert result == expected
    assert len(loads) == 2
    assert cold_gap < 0.1, f"the event loop was blocked {cold_gap * 1000:.0f} ms by the load"
    assert reload_gap < 0.1, f"the event loop was blocked {reload_gap * 1000:.0f} ms by the reload"


# -- 7 --------------------------------------------------------------------------------------------

INF_PAIRS = [("red apple", "red"), ("red apple", "apple"), ("red apple", "pear")]


class BadDirectReranker(RerankerModel):
    """A thread-safe (directly called) reranker that returns ``scores`` as they are."""

    thread_safe = True

    def __init__(self, scores: Any) -> None:
        self.scores = scores

    def score_pairs(self, pairs: Sequence[tuple[str, str]], batch_size: int) -> list[float]:
        return self.scores


class BadDirectEmbedder(EmbedderModel):
    """A thread-safe (directly called) embedder that returns ``vectors`` as they are."""

    thread_safe = True

    def __init__(self, vectors: Any) -> None:
        self.vectors = vectors

    @property
    def dimension(self) -> int:
        return 2

    def embed(
        self,
        texts: Sequence[str],
        *,
        batch_size: int,
        is_query: bool,
        normalize: bool = False,
        prompt: str | None = None,
    ) -> list[list[float]]:
        return self.vectors


BAD_SCORES = {
    "one too few": [0.5, 0.25],
    "one too many": [0.5, 0.25, 0.0, 0.75],
    "None": None,
    "a None score": [0.5, None, 0.0],
    "a str score": [0.5, "0.25", 0.0],
    "a NaN score": [0.5, math.nan, 0.0],
    "an inf score": [0.5, math.inf, 0.0],
    "a -inf score": [0.5, -math.inf, 0.0],
}
BAD_VECTORS = {
    "one vector too few": [[0.5, 0.5]],
    "one vector too many": [[0.5, 0.5], [0.1, 0.2], [0.3, 0.4]],
    "None": None,
    "a None vector": [[0.5, 0.5], None],
    "a str vector": [[0.5, 0.5], "0.5"],
    "a vector with a NaN": [[0.5, 0.5], [math.nan, 0.1]],
    "a vector with an inf": [[0.5, 0.5], [0.1, math.inf]],
    "a vector with a None": [[0.5, 0.5], [0.1, None]],
}


@pytest.mark.parametrize("scores", BAD_SCORES.values(), ids=BAD_SCORES.keys())
def test_bad_scores_from_a_direct_reranker_are_inference_errors(
    make_pool: Callable[..., ModelPool], scores: Any
) -> None:
    pool = make_pool()
    spec = _register(lambda: BadDirectReranker(scores))
    outcome = _outcome(_in_thread(lambda: pool.score_pairs(spec, INF_PAIRS)), 5.0, "score_pairs")
    assert isinstance(outcome, InferenceError), f"returned or raised {outcome!r}"
    assert spec.backend in str(outcome), f"the error does not name the backend: {outcome}"


@pytest.mark.parametrize("vectors", BAD_VECTORS.values(), ids=BAD_VECTORS.keys())
def test_bad_vectors_from_a_direct_embedder_are_inference_errors(
    make_pool: Callable[..., ModelPool], vectors: Any
) -> None:
    pool = make_pool()
    spec = _register(lambda: BadDirectEmbedder(vectors), "embedder")
    outcome = _outcome(_in_thread(lambda: pool.embed(spec, ["a", "b"])), 5.0, "embed")
    assert isinstance(outcome, InferenceError), f"returned or raised {outcome!r}"
    assert spec.backend in str(outcome), f"the error does not name the backend: {outcome}"


def test_bad_output_through_the_langchain_adapters(make_pool: Callable[..., ModelPool]) -> None:
    """An inf score is an error, never the top document; a short embedding batch is an error."""
    pytest.importorskip("langchain_core")
    from langchain_core.documents import Document

    from rag_rerank_plugins.langchain import SharedEmbeddings, SharedRerankCompressor

    pool = make_pool()
    reranker = _register(lambda: BadDirectReranker([0.5, 0.25, math.inf]))
    docs = [Document(page_content=p, id=f"d{i}") for i, (_, p) in enumerate(INF_PAIRS)]
    strict = SharedRerankCompressor(model="m", backend=reranker.backend, pool=pool, top_n=1)
    with pytest.raises(InferenceError, match=reranker.backend):
        strict.compress_documents(docs, "red apple")
    lenient = SharedRerankCompressor(
        model="m", backend=reranker.backend, pool=pool, top_n=1, on_error="passthrough"
    )
    out = lenient.compress_documents(docs, "red apple")
    assert [d.id for d in out] == ["d0"], "retrieval order, not the inf document first"
    assert "rerank_error" in out[0].metadata
    assert "relevance_score" not in out[0].metadata

    embedder = _register(lambda: BadDirectEmbedder([[0.5, 0.5]]), "embedder")
    embeddings = SharedEmbeddings(model="m", backend=embedder.backend, pool=pool)
    with pytest.raises(InferenceError, match=embedder.backend):
        embeddings.embed_documents(["a", "b"])
