"""A call's ``timeout`` bounds the wait for a cold model's load, too.

A load that never ends (a stalled network share; tqdm's write lock left held after a failed
write, docs/troubleshooting.md) used to hold every caller of that model for good, whatever its
``timeout``: the timeout started at the engine's queue, after the load. Now the deadline covers
the whole call: the caller gets ``RequestTimeoutError`` at its deadline, the load goes on in its
own thread, later calls use the model once it is in (one load, not one per caller), and the pin
the load took for the caller who left is given back (the model stays evictable).
"""

from __future__ import annotations

import asyncio
import threading
import time
import traceback
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest

from rag_rerank_plugins import (
    EngineConfig,
    InvalidInputError,
    ModelLoadError,
    ModelPool,
    ModelSpec,
    PoolConfig,
    RequestTimeoutError,
)
from rag_rerank_plugins.backends import register_backend
from rag_rerank_plugins.testing import FakeEmbedder, FakeReranker

PAIRS = [("red apple", "apple"), ("red apple", "pear")]


class Loader:
    """A backend loader that blocks until ``release`` is set (or raises ``error``)."""

    def __init__(
        self, kind: str = "reranker", error: BaseException | None = None, footprint_mb: int = 0
    ) -> None:
        self.footprint_mb = footprint_mb
        self.release = threading.Event()
        self.started = threading.Event()
        self.error = error
        self.calls = 0
        self.kind = kind
        name = f"deadline-{uuid.uuid4().hex[:8]}"
        register_backend(name, self._load, kind, uses_torch=False, replace=True)
        self.spec = ModelSpec("m", backend=name, device="cpu")

    def _load(self, spec: ModelSpec, provider: Any) -> Any:
        self.calls += 1
        self.started.set()
        self.release.wait(30)
        if self.error is not None:
            raise self.error
        if self.kind == "reranker":
            return FakeReranker(footprint_mb=self.footprint_mb)
        return FakeEmbedder()


@pytest.fixture
def make_pool() -> Iterator[Callable[..., ModelPool]]:
    pools: list[ModelPool] = []

    def make(config: EngineConfig | None = None, **pool_config: Any) -> ModelPool:
        pool = ModelPool(
            config=config, pool_config=PoolConfig(**pool_config) if pool_config else None
        )
        pools.append(pool)
        return pool

    yield make
    for pool in pools:
        thread = threading.Thread(target=pool.clear, daemon=True)
        thread.start()
        thread.join(5)


def _wait_for(condition: Callable[[], bool], seconds: float = 5.0) -> None:
    end = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < end, "condition not reached"
        time.sleep(0.01)


def test_a_hung_load_times_out_the_call_and_the_load_still_serves_later_calls(
    make_pool: Callable[..., ModelPool],
) -> None:
    loader = Loader()
    pool = make_pool()
    started = time.monotonic()
    with pytest.raises(RequestTimeoutError, match="still loading") as info:
        pool.score_pairs(loader.spec, PAIRS, timeout=0.3)
    waited = time.monotonic() - started
    assert 0.25 < waited < 2.0, waited
    assert "preload" in str(info.value)  # the message says what to do
    assert isinstance(info.value, TimeoutError)
    loader.release.set()
    assert pool.score_pairs(loader.spec, PAIRS) == FakeReranker().score_pairs(PAIRS, 2)
    assert loader.calls == 1  # the abandoned load served the next call: no second load
    stats = pool.spec_stats(loader.spec)
    assert (stats["loads"], stats["calls"], stats["errors"]) == (1, 2, 1)  # the timeout shows


def test_many_callers_with_timeouts_on_one_hung_load_all_time_out_and_it_loads_once(
    make_pool: Callable[..., ModelPool],
) -> None:
    loader = Loader()
    pool = make_pool()

    def call(_: int) -> BaseException | None:
        try:
            pool.score_pairs(loader.spec, PAIRS, timeout=0.3)
        except BaseException as exc:
            return exc
        return None

    with ThreadPoolExecutor(16) as ex:
        outcomes = list(ex.map(call, range(16)))
    assert all(isinstance(o, RequestTimeoutError) for o in outcomes), outcomes
    loader.release.set()
    assert pool.score_pairs(loader.spec, PAIRS, timeout=5) == FakeReranker().score_pairs(PAIRS, 2)
    assert loader.calls == 1


def test_the_engine_default_timeout_bounds_the_load_too(
    make_pool: Callable[..., ModelPool],
) -> None:
    loader = Loader(kind="embedder")
    pool = make_pool(EngineConfig(request_timeout_s=0.3))
    with pytest.raises(RequestTimeoutError):
        pool.embed(loader.spec, ["red apple"])
    loader.release.set()
    _wait_for(lambda: bool(pool.loaded_specs()))
    assert pool.embed(loader.spec, ["red apple"]) == FakeEmbedder().embed(
        ["red apple"], batch_size=1, is_query=False
    )


def test_without_a_timeout_a_call_waits_for_a_slow_load(
    make_pool: Callable[..., ModelPool],
) -> None:
    loader = Loader()
    pool = make_pool()
    threading.Timer(0.5, loader.release.set).start()
    assert pool.score_pairs(loader.spec, PAIRS) == FakeReranker().score_pairs(PAIRS, 2)


class SlowReranker(FakeReranker):
    """FakeReranker's scores after ``seconds``."""

    def __init__(self, seconds: float) -> None:
        super().__init__()
        self.seconds = seconds

    def score_pairs(self, pairs: Any, batch_size: int) -> list[float]:
        time.sleep(self.seconds)
        return super().score_pairs(pairs, batch_size)


def test_a_load_within_the_timeout_leaves_the_rest_to_the_request(
    make_pool: Callable[..., ModelPool],
) -> None:
    """0.4 s of load + 0.4 s of scoring: within 10 s, but not within 0.6 s (each alone is)."""
    name = f"deadline-{uuid.uuid4().hex[:8]}"

    def load(spec: ModelSpec, provider: Any) -> SlowReranker:
        time.sleep(0.4)
        return SlowReranker(0.4)

    register_backend(name, load, "reranker", uses_torch=False, replace=True)
    expected = FakeReranker().score_pairs(PAIRS, 2)
    pool = make_pool()
    assert pool.score_pairs(ModelSpec("a", backend=name), PAIRS, timeout=10) == expected
    started = time.monotonic()
    with pytest.raises(RequestTimeoutError):
        pool.score_pairs(ModelSpec("b", backend=name), PAIRS, timeout=0.6)
    assert time.monotonic() - started < 0.75  # the request got what the load left, not 0.6 s
    assert pool.score_pairs(ModelSpec("b", backend=name), PAIRS, timeout=0.6) == expected


def test_a_failing_load_raises_its_own_error_not_a_timeout(
    make_pool: Callable[..., ModelPool],
) -> None:
    loader = Loader(error=OSError("broken weights"))
    pool = make_pool()
    threading.Timer(0.2, loader.release.set).start()
    with pytest.raises(ModelLoadError, match="broken weights"):
        pool.score_pairs(loader.spec, PAIRS, timeout=10)


@pytest.mark.parametrize("timeout", [0, -1, "5", True, float("nan")])
def test_a_bad_timeout_is_rejected_before_any_load(
    make_pool: Callable[..., ModelPool], timeout: Any
) -> None:
    loader = Loader()
    loader.release.set()
    pool = make_pool()
    with pytest.raises(InvalidInputError, match="timeout"):
        pool.score_pairs(loader.spec, PAIRS, timeout=timeout)
    assert loader.calls == 0


def test_the_pin_taken_for_a_caller_who_left_is_given_back(
    make_pool: Callable[..., ModelPool],
) -> None:
    """With pins on (an idle unload), a pin left behind would keep the model busy for good:
    never unloaded, never evicted."""
    loader = Loader()
    pool = make_pool(idle_unload_s=60)
    with pytest.raises(RequestTimeoutError):
        pool.score_pairs(loader.spec, PAIRS, timeout=0.2)
    loader.release.set()
    _wait_for(lambda: bool(pool.loaded_specs()))
    handle = pool.get(loader.spec)
    _wait_for(lambda: handle._in_flight == 0)
    pool.release(loader.spec)  # a pinned handle would make this wait for a call that never ends
    assert not pool.loaded_specs()


async def test_async_a_hung_load_times_out_without_blocking_the_loop(
    make_pool: Callable[..., ModelPool],
) -> None:
    loader = Loader()
    pool = make_pool()
    ticks = 0

    async def tick() -> None:
        nonlocal ticks
        while True:
            await asyncio.sleep(0.01)
            ticks += 1

    ticker = asyncio.create_task(tick())
    try:
        started = time.monotonic()
        with pytest.raises(RequestTimeoutError, match="still loading"):
            await pool.ascore_pairs(loader.spec, PAIRS, timeout=0.3)
        assert time.monotonic() - started < 2.0
        assert ticks >= 10  # the loop ran while the caller waited
    finally:
        ticker.cancel()
    loader.release.set()
    assert await pool.ascore_pairs(loader.spec, PAIRS) == FakeReranker().score_pairs(PAIRS, 2)
    assert loader.calls == 1


async def test_async_a_cancelled_caller_leaves_the_load_running_and_no_pin_behind(
    make_pool: Callable[..., ModelPool],
) -> None:
    loader = Loader(kind="embedder")
    pool = make_pool(idle_unload_s=60)
    task = asyncio.create_task(pool.aembed(loader.spec, ["red apple"]))
    await asyncio.to_thread(loader.started.wait, 5)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    loader.release.set()
    await asyncio.to_thread(_wait_for, lambda: bool(pool.loaded_specs()))
    handle = await asyncio.to_thread(pool.get, loader.spec)
    await asyncio.to_thread(_wait_for, lambda: handle._in_flight == 0)
    assert await pool.aembed(loader.spec, ["red apple"], timeout=5) == FakeEmbedder().embed(
        ["red apple"], batch_size=1, is_query=False
    )
    assert loader.calls == 1


def _budget_of_one(make_pool: Callable[..., ModelPool]) -> tuple[ModelPool, Loader, list[Loader]]:
    """A pool whose budget fits one model, a load of ``blocker`` hung in it, and two more specs
    whose loads would each take the memory lock after it (and evict the one before)."""
    blocker = Loader(footprint_mb=100)
    others = [Loader(footprint_mb=100) for _ in range(2)]
    for other in others:
        other.release.set()  # they would load at once, once their turn comes
    pool = make_pool(memory_budget_mb=100)
    threading.Thread(target=pool.get, args=(blocker.spec,), daemon=True).start()
    assert blocker.started.wait(5)
    return pool, blocker, others


def test_callers_that_gave_up_before_their_turn_load_nothing_for_nobody(
    make_pool: Callable[..., ModelPool],
) -> None:
    """Under a budget that fits one model, 20 callers of two other specs time out while a load
    holds the memory lock. Their loads had not begun: none begins after they left (before, each
    still loaded, and evicted the model before it, for nobody: 18 loads for 30 gone callers)."""
    pool, blocker, others = _budget_of_one(make_pool)

    def call(i: int) -> BaseException | None:
        try:
            pool.score_pairs(others[i % 2].spec, PAIRS, timeout=0.2)
        except BaseException as exc:
            return exc
        return None

    with ThreadPoolExecutor(20) as ex:
        outcomes = list(ex.map(call, range(20)))
    assert all(isinstance(o, RequestTimeoutError) for o in outcomes), outcomes
    blocker.release.set()
    _wait_for(lambda: pool.is_loaded(blocker.spec))
    time.sleep(0.5)  # the gone callers' threads had their turn by now
    assert [other.calls for other in others] == [0, 0]
    assert pool.is_loaded(blocker.spec)  # the load that had begun went on, and was kept
    assert pool.spec_stats(others[0].spec)["errors"] == 10  # each timeout still counts
    # A caller still waiting is served, with one load; the next spec's callers load it again.
    assert pool.score_pairs(others[0].spec, PAIRS, timeout=5) == FakeReranker().score_pairs(
        PAIRS, 2
    )
    assert [other.calls for other in others] == [1, 0]


async def test_cancelled_async_callers_before_their_turn_load_nothing(
    make_pool: Callable[..., ModelPool],
) -> None:
    pool, blocker, others = _budget_of_one(make_pool)
    tasks = [asyncio.create_task(pool.ascore_pairs(others[i % 2].spec, PAIRS)) for i in range(8)]
    await asyncio.sleep(0.2)
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    blocker.release.set()
    await asyncio.to_thread(_wait_for, lambda: pool.is_loaded(blocker.spec))
    await asyncio.sleep(0.5)
    assert [other.calls for other in others] == [0, 0]
    # a caller that waits while another's load goes on is still served by that load
    waiting = asyncio.create_task(pool.ascore_pairs(others[1].spec, PAIRS, timeout=5))
    assert await waiting == FakeReranker().score_pairs(PAIRS, 2)
    assert [other.calls for other in others] == [0, 1]


# -- one shared wait per spec; a failed load fails its waiters once ----------------------------


def _threads() -> int:
    return threading.active_count()


def test_callers_that_time_out_behind_a_hung_load_leave_no_thread_behind(
    make_pool: Callable[..., ModelPool],
) -> None:
    """Each caller with a timeout ran the load lookup in a thread of its own, which stayed,
    polling the load lock, after its caller timed out: 1000 requests, 1001 threads."""
    loader = Loader()
    pool = make_pool()
    before = _threads()
    for _ in range(60):
        with pytest.raises(RequestTimeoutError):
            pool.score_pairs(loader.spec, PAIRS, timeout=0.005)
    assert loader.started.wait(5)
    _wait_for(lambda: _threads() <= before + 2)  # the one load thread (and no more)
    loader.release.set()
    assert pool.score_pairs(loader.spec, PAIRS, timeout=5) == FakeReranker().score_pairs(PAIRS, 2)
    assert loader.calls == 1


async def test_a_burst_of_async_callers_on_a_cold_model_shares_one_load_thread(
    make_pool: Callable[..., ModelPool],
) -> None:
    loader = Loader()
    pool = make_pool()
    before = _threads()
    calls = [asyncio.create_task(pool.ascore_pairs(loader.spec, PAIRS)) for _ in range(200)]
    await asyncio.to_thread(loader.started.wait, 5)
    await asyncio.sleep(0.2)  # every task is waiting now
    assert _threads() <= before + 2
    loader.release.set()
    answers = await asyncio.gather(*calls)
    assert all(a == FakeReranker().score_pairs(PAIRS, 2) for a in answers)
    assert loader.calls == 1


class _Timed:
    """A loader taking ``seconds``: of a model with a known footprint, or (``fails``) failing
    then (an unreachable hub, a corrupt 2 GB file)."""

    def __init__(self, seconds: float = 0.2, footprint_mb: int = 60, fails: bool = False) -> None:
        self.calls = 0
        self.seconds = seconds
        self.footprint_mb = footprint_mb
        self.fails = fails
        name = f"timed-{uuid.uuid4().hex[:8]}"
        register_backend(name, self._load, "reranker", uses_torch=False, replace=True)
        self.spec = ModelSpec("m", backend=name, device="cpu")

    @property
    def attempts(self) -> int:
        return self.calls

    def _load(self, spec: ModelSpec, provider: Any) -> Any:
        self.calls += 1
        time.sleep(self.seconds)
        if self.fails:
            raise OSError("weights are corrupt")
        return FakeReranker(footprint_mb=self.footprint_mb)


def _failing(seconds: float = 0.4) -> _Timed:
    return _Timed(seconds, fails=True)


@pytest.mark.parametrize("timeout", [None, 30.0])
def test_callers_waiting_on_a_load_that_fails_all_get_its_error_at_once(
    make_pool: Callable[..., ModelPool], timeout: float | None
) -> None:
    """Each waiter retried the failed load in turn: 8 callers, 8 loads, the last one waiting
    4 s (7 minutes with an unreachable hub). The next call still retries."""
    failing = _failing()
    pool = make_pool()

    def call(_: int) -> tuple[str, float]:
        started = time.monotonic()
        try:
            pool.score_pairs(failing.spec, PAIRS, timeout=timeout)
        except Exception as exc:
            return type(exc).__name__, time.monotonic() - started
        return "answered", time.monotonic() - started

    with ThreadPoolExecutor(8) as ex:
        outcomes = list(ex.map(call, range(8)))
    assert {name for name, _ in outcomes} == {"ModelLoadError"}
    assert max(took for _, took in outcomes) < 3 * failing.seconds + 0.5, outcomes
    assert failing.attempts <= 2  # one (a caller coming after the failure may start one more)
    attempts = failing.attempts
    with pytest.raises(ModelLoadError, match="corrupt"):
        pool.score_pairs(failing.spec, PAIRS, timeout=timeout)
    assert failing.attempts == attempts + 1  # the next call retries


async def test_async_callers_waiting_on_a_load_that_fails_all_get_its_error_at_once(
    make_pool: Callable[..., ModelPool],
) -> None:
    failing = _failing()
    pool = make_pool()
    outcomes = await asyncio.gather(
        *(pool.ascore_pairs(failing.spec, PAIRS) for _ in range(8)), return_exceptions=True
    )
    assert all(isinstance(o, ModelLoadError) for o in outcomes), outcomes
    assert failing.attempts == 1


@pytest.mark.parametrize("windowed", [False, True])
def test_adapter_lookups_of_the_model_are_bounded_by_the_calls_deadline(
    make_pool: Callable[..., ModelPool], windowed: bool
) -> None:
    """Embeddings read the model's named prompts, windowed rerankers its tokenizer, before
    their call: that lookup waited for a hung load for ever, whatever request_timeout_s said."""
    from langchain_core.documents import Document

    from rag_rerank_plugins.langchain import SharedEmbeddings, SharedRerankCompressor

    pool = make_pool(EngineConfig(request_timeout_s=0.5))
    if windowed:
        loader = Loader()
        adapter: Any = SharedRerankCompressor(
            model="m", backend=loader.spec.backend, device="cpu", window_tokens=64, pool=pool
        )
        call = lambda: adapter.compress_documents([Document(page_content="a")], "q")  # noqa: E731
    else:
        loader = Loader(kind="embedder")
        adapter = SharedEmbeddings(model="m", backend=loader.spec.backend, device="cpu", pool=pool)
        call = lambda: adapter.embed_query("q")  # noqa: E731
    result: list[Any] = []

    def run() -> None:
        started = time.monotonic()
        try:
            call()
        except Exception as exc:
            result.append((type(exc).__name__, time.monotonic() - started))

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(5)
    loader.release.set()
    assert result, "the call still waited for the load after 5 s"
    [(name, took)] = result
    assert name == "RequestTimeoutError"
    assert took < 3


def test_under_a_budget_each_callers_model_stays_in_until_it_is_pinned(
    make_pool: Callable[..., ModelPool],
) -> None:
    """The shared load pins the model for its callers: unpinned, the next model's load
    (waiting for the memory lock) evicted it before its caller could pin it, so calls with a
    timeout failed and models loaded three times (6 models, a budget for one)."""
    loaders = [_Timed() for _ in range(6)]
    pool = make_pool(memory_budget_mb=100)
    pool.preload(*(loader.spec for loader in loaders), warmup=False)  # footprints known
    pool.clear()
    for loader in loaders:
        loader.calls = 0

    def call(loader: _Timed) -> Any:
        try:
            return pool.score_pairs(loader.spec, PAIRS, timeout=30)  # evictions gc.collect()
        except Exception as exc:
            return exc

    with ThreadPoolExecutor(6) as ex:
        outcomes = list(ex.map(call, loaders))
    assert all(o == FakeReranker().score_pairs(PAIRS, 2) for o in outcomes), outcomes
    assert [loader.calls for loader in loaders] == [1] * 6


def test_each_waiting_caller_gets_its_own_copy_of_the_loads_error(
    make_pool: Callable[..., ModelPool],
) -> None:
    """One error instance raised in 200 threads gathered every raiser's frames (1205) and, with
    them, every caller's request in memory; each caller now raises a copy chained to it."""
    failing = _failing(seconds=0.3)
    pool = make_pool()

    def call(_: int) -> BaseException:
        with pytest.raises(ModelLoadError) as info:
            pool.score_pairs(failing.spec, PAIRS, timeout=30)
        return info.value

    with ThreadPoolExecutor(16) as ex:
        errors = list(ex.map(call, range(16)))
    assert len({id(e) for e in errors}) == 16
    frames = [len(traceback.extract_tb(e.__traceback__)) for e in errors]
    assert max(frames) < 30, frames
    causes = {id(e.__cause__) for e in errors if isinstance(e.__cause__, ModelLoadError)}
    assert len(causes) <= 2  # the load's own error (one more if a late caller loaded again)
    assert all("corrupt" in str(e) for e in errors)
