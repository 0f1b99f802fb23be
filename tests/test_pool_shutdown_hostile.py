"""Shutdown paths of the pool with a load that never ends.

``pool.release(spec)`` and ``pool.clear()`` used to wait for a load of the same spec in flight:
with a backend whose load hangs (a stalled network share, a model server that never answers)
an app's shutdown hook (FastAPI lifespan, atexit, a notebook restart) hung for good. Now they
release the load instead and return at once; when the load ends its model is freed and handed to
nobody, whoever waited for it gets ``ModelReleasedError``, stats stay consistent (the load and
its release are both counted) and the next call loads afresh. Under a budget with an idle
reaper, ``clear()`` also used to wait 10 s for a reaper blocked behind the hung load.
"""

from __future__ import annotations

import asyncio
import random
import subprocess
import sys
import textwrap
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from rag_rerank_plugins import ModelPool, ModelReleasedError, ModelSpec
from rag_rerank_plugins.backends import register_backend
from rag_rerank_plugins.testing import FakeReranker

PAIRS = [("red apple", "apple"), ("red apple", "pear")]
EXPECTED = FakeReranker().score_pairs(PAIRS, 32)
PROMPT_S = 2.0  # "returns promptly": far below any hang, far above a slow CI machine's jitter


class _Model(FakeReranker):
    """A fake model that knows whether it was freed, and refuses calls once it was."""

    def __init__(self, footprint_mb: float | None = None) -> None:
        super().__init__(footprint_mb=footprint_mb)
        self.closed = False

    def close(self) -> None:
        self.closed = True

    def score_pairs(self, pairs: Any, batch_size: int) -> list[float]:
        if self.closed:
            raise AssertionError("a released model was handed to a caller")
        return super().score_pairs(pairs, batch_size)


class Gate:
    """A backend whose loads block until ``opened`` is set (a hung load, on demand)."""

    def __init__(self, footprint_mb: float | None = None) -> None:
        self.opened = threading.Event()
        self.entered = threading.Event()
        self.models: list[_Model] = []
        self.entries = 0
        self.footprint_mb = footprint_mb
        self.name = f"shutdown-{uuid.uuid4().hex[:8]}"
        register_backend(self.name, self._load, "reranker", uses_torch=False, replace=True)

    def spec(self, model: str = "m") -> ModelSpec:
        return ModelSpec(model, backend=self.name, device="cpu")

    def _load(self, spec: ModelSpec, _provider: object) -> _Model:
        self.entries += 1
        self.entered.set()
        assert self.opened.wait(30), "the test never opened the gate"
        model = _Model(self.footprint_mb)
        self.models.append(model)
        return model


@pytest.fixture
def gate() -> Iterator[Gate]:
    gate = Gate()
    yield gate
    gate.opened.set()  # no load thread outlives its test for long


@pytest.fixture
def make_pool() -> Iterator[Callable[..., ModelPool]]:
    pools: list[ModelPool] = []

    def make(**kwargs: Any) -> ModelPool:
        pool = ModelPool(**kwargs)
        pools.append(pool)
        return pool

    yield make
    for pool in pools:
        pool.clear()


def _timed(fn: Callable[[], Any]) -> tuple[Any, float]:
    """Run ``fn`` in a daemon thread (a regression hangs it, not the test run)."""
    box: Future[Any] = Future()

    def run() -> None:
        try:
            box.set_result(fn())
        except BaseException as exc:
            box.set_exception(exc)

    start = time.monotonic()
    threading.Thread(target=run, daemon=True).start()
    try:
        result = box.result(timeout=15)
    except TimeoutError:
        pytest.fail("it hung on a load that never ends")
    return result, time.monotonic() - start


def _background(fn: Callable[[], Any]) -> Future[Any]:
    box: Future[Any] = Future()

    def run() -> None:
        try:
            box.set_result(fn())
        except BaseException as exc:
            box.set_exception(exc)

    threading.Thread(target=run, daemon=True).start()
    return box


# -- the known bug: release/clear during a hung load ---------------------------------------------


def test_release_returns_at_once_while_the_load_hangs_and_the_late_model_is_dropped(
    gate: Gate, make_pool: Callable[..., ModelPool]
) -> None:
    pool = make_pool()
    spec = gate.spec()
    loader = _background(lambda: pool.get(spec))
    assert gate.entered.wait(10)
    released, took = _timed(lambda: pool.release(spec))
    assert took < PROMPT_S
    assert released is False  # no model was in yet
    assert not pool.is_loaded(spec)
    gate.opened.set()
    with pytest.raises(ModelReleasedError, match=r"released \(pool.release or pool.clear\)"):
        loader.result(timeout=10)  # get() never retries
    [model] = gate.models
    assert model.closed  # freed the moment its load ended, handed to nobody
    assert not pool.is_loaded(spec)
    stats = pool.spec_stats(spec)
    assert (stats["loads"], stats["releases"], stats["loaded"]) == (1, 1, False)
    # The next call starts a fresh load and gets a live model.
    assert pool.score_pairs(spec, PAIRS) == EXPECTED
    assert len(gate.models) == 2
    assert not gate.models[1].closed
    stats = pool.spec_stats(spec)
    assert (stats["loads"], stats["releases"], stats["loaded"]) == (2, 1, True)


def test_clear_returns_at_once_with_a_hung_load_and_releases_the_rest(
    gate: Gate, make_pool: Callable[..., ModelPool]
) -> None:
    pool = make_pool()
    other = ModelSpec("other", backend="fake-reranker", device="cpu")
    assert pool.score_pairs(other, PAIRS) == EXPECTED
    hung = _background(lambda: pool.score_pairs(gate.spec(), PAIRS))
    assert gate.entered.wait(10)
    count, took = _timed(pool.clear)
    assert took < PROMPT_S
    assert count == 1  # the loaded model; the hung load is released too, but had no model yet
    assert pool.loaded_specs() == []
    gate.opened.set()
    # The call's own load ended after the release: its model was dropped, and the call retried
    # once on a fresh load, as any call racing a release does (docs/bad-input.md, B21).
    assert hung.result(timeout=10) == EXPECTED
    first, second = gate.models
    assert first.closed
    assert not second.closed
    stats = pool.spec_stats(gate.spec())
    assert (stats["loads"], stats["releases"], stats["loaded"]) == (2, 1, True)


def test_callers_waiting_for_a_released_load_are_woken_at_once_not_when_it_ends(
    gate: Gate, make_pool: Callable[..., ModelPool]
) -> None:
    """Callers queued behind another caller's hung load stop waiting right after the release:
    ``get()``/``preload()`` raise ModelReleasedError; score calls (sync and async) retry once,
    as any call racing a release does, so exactly one fresh load starts for all of them."""
    pool = make_pool()
    spec = gate.spec()
    first = _background(lambda: pool.get(spec))
    assert gate.entered.wait(10)
    getters = [_background(lambda: pool.get(spec)) for _ in range(3)]
    getters.append(_background(lambda: pool.preload(spec)))
    calls = [_background(lambda: pool.score_pairs(spec, PAIRS)) for _ in range(2)]
    calls.append(_background(lambda: asyncio.run(pool.ascore_pairs(spec, PAIRS))))
    time.sleep(0.2)  # all of them wait for the first caller's load now
    assert not any(w.done() for w in getters + calls)
    assert gate.entries == 1
    assert pool.release(spec) is False
    for getter in getters:
        with pytest.raises(ModelReleasedError, match="while it was loading"):
            getter.result(timeout=PROMPT_S)
    deadline = time.monotonic() + PROMPT_S
    while gate.entries < 2 and time.monotonic() < deadline:
        time.sleep(0.005)
    assert gate.entries == 2  # the woken calls started one fresh load, while the first hangs
    assert not first.done()  # the loading thread itself is inside the backend until it returns
    gate.opened.set()
    with pytest.raises(ModelReleasedError):
        first.result(timeout=10)
    assert [c.result(timeout=10) for c in calls] == [EXPECTED] * 3
    assert sorted(m.closed for m in gate.models) == [False, True]
    assert pool.get(spec).model is next(m for m in gate.models if not m.closed)
    stats = pool.spec_stats(spec)
    assert (stats["loads"], stats["releases"], stats["loaded"]) == (2, 1, True)


def test_clear_under_a_budget_with_an_idle_reaper_does_not_wait_for_the_reaper(
    make_pool: Callable[..., ModelPool],
) -> None:
    """The reaper, blocked on the memory lock the hung load holds, made clear() wait 10 s."""
    gate = Gate(footprint_mb=10)
    try:
        pool = make_pool(memory_budget_mb=1000, idle_unload_s=0.05)
        idle = ModelSpec(
            "idle", backend="fake-reranker", device="cpu", options=(("footprint_mb", 10),)
        )
        assert pool.score_pairs(idle, PAIRS) == EXPECTED
        hung = _background(lambda: pool.get(gate.spec()))
        assert gate.entered.wait(10)
        time.sleep(0.3)  # the reaper found `idle` idle and waits for the memory lock
        count, took = _timed(pool.clear)
        assert took < PROMPT_S
        assert count == 1
        gate.opened.set()
        with pytest.raises(ModelReleasedError):
            hung.result(timeout=10)
        assert pool.loaded_specs() == []
    finally:
        gate.opened.set()


async def test_release_on_the_event_loop_does_not_block_it_while_a_load_hangs(
    gate: Gate, make_pool: Callable[..., ModelPool]
) -> None:
    pool = make_pool()
    spec = gate.spec()
    call = asyncio.ensure_future(pool.ascore_pairs(spec, PAIRS))  # loads in a thread
    for _ in range(1000):  # the coroutine starts the load once the loop runs it
        if gate.entered.is_set():
            break
        await asyncio.sleep(0.01)
    assert gate.entered.is_set()
    started = time.monotonic()
    assert pool.release(spec) is False  # on the loop thread
    assert pool.clear() == 0
    assert time.monotonic() - started < PROMPT_S
    ticks = 0
    for _ in range(5):  # the loop runs on
        await asyncio.sleep(0.01)
        ticks += 1
    assert ticks == 5
    assert not call.done()
    gate.opened.set()
    assert await asyncio.wait_for(call, 10) == EXPECTED  # retried once on a fresh load
    assert gate.models[0].closed
    assert not gate.models[1].closed


def test_release_and_clear_twice_and_from_many_threads_at_once(
    gate: Gate, make_pool: Callable[..., ModelPool]
) -> None:
    pool = make_pool()
    loaded = ModelSpec("loaded", backend="fake-reranker", device="cpu")
    pool.get(loaded)
    loading = _background(lambda: pool.get(gate.spec()))
    assert gate.entered.wait(10)
    with ThreadPoolExecutor(12) as ex:
        futures: list[Future[bool | int]] = [ex.submit(pool.release, loaded) for _ in range(4)]
        futures += [ex.submit(pool.release, gate.spec()) for _ in range(4)]
        futures += [ex.submit(pool.clear) for _ in range(4)]
        results = [int(f.result(timeout=PROMPT_S * 2)) for f in futures]
    # `loaded` was released exactly once, whoever did it; nothing else had a model to free.
    assert sum(results) == 1
    assert pool.release(loaded) is False
    assert pool.clear() == 0
    gate.opened.set()
    with pytest.raises(ModelReleasedError):
        loading.result(timeout=10)
    for stats in pool.stats().values():
        assert stats["loads"] == stats["releases"]
        assert stats["loaded"] is False


def test_interpreter_exit_with_an_atexit_clear_does_not_hang_on_a_hung_load() -> None:
    """A service's ``atexit.register(get_pool().clear)``, with a load that never ends in a
    daemon thread (a call with a timeout left it behind)."""
    script = textwrap.dedent(
        """
        import atexit, threading
        from rag_rerank_plugins import ModelSpec, RequestTimeoutError, get_pool
        from rag_rerank_plugins.backends import register_backend

        forever = threading.Event()
        register_backend("hangs", lambda s, p: forever.wait(), "reranker", uses_torch=False)
        atexit.register(lambda: print("cleared", get_pool().clear(), flush=True))
        try:
            get_pool().score_pairs(ModelSpec("m", backend="hangs"), [("q", "p")], timeout=0.2)
        except RequestTimeoutError:
            print("timed out", flush=True)
        """
    )
    try:
        done = subprocess.run(
            [sys.executable, "-c", script], capture_output=True, text=True, timeout=60
        )
    except subprocess.TimeoutExpired:
        pytest.fail("the interpreter hung at exit in pool.clear()")
    assert done.returncode == 0, done.stderr
    assert done.stdout.split("\n")[:2] == ["timed out", "cleared 0"]


# -- generated races: clear() against calls and loads ---------------------------------------------


class _Slow:
    """A backend whose loads take a random short while, counting live and freed models."""

    def __init__(self) -> None:
        self.name = f"shutdown-slow-{uuid.uuid4().hex[:8]}"
        self.models: list[_Model] = []
        self.lock = threading.Lock()
        register_backend(self.name, self._load, "reranker", uses_torch=False, replace=True)

    def _load(self, spec: ModelSpec, _provider: object) -> _Model:
        time.sleep(float(spec.option("load_ms", 0)) / 1000)
        model = _Model(footprint_mb=1)
        with self.lock:
            self.models.append(model)
        return model


@settings(
    max_examples=12,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
@given(
    load_ms=st.lists(st.sampled_from([0, 1, 5, 20, 60]), min_size=1, max_size=3),
    clears=st.integers(1, 6),
    budget=st.sampled_from([None, 2.5]),
    seed=st.integers(0, 2**16),
)
def test_clear_racing_calls_and_loads_never_hands_out_a_released_model(
    load_ms: list[int], clears: int, budget: float | None, seed: int
) -> None:
    backend = _Slow()
    pool = ModelPool(memory_budget_mb=budget)
    specs = [
        ModelSpec(f"s{n}", backend=backend.name, device="cpu", options=(("load_ms", ms),))
        for n, ms in enumerate(load_ms)
    ]
    problems: list[str] = []
    stop = threading.Event()

    def caller(n: int) -> int:
        rng, done = random.Random(seed + n), 0
        while not stop.is_set():
            spec = rng.choice(specs)
            try:
                if rng.random() < 0.5:
                    scores = pool.score_pairs(spec, PAIRS)
                else:
                    scores = asyncio.run(pool.ascore_pairs(spec, PAIRS))
            except ModelReleasedError:
                continue  # documented: the call raced a release of its model or its load
            except AssertionError as exc:
                problems.append(str(exc))
                return done
            if scores != EXPECTED:
                problems.append(f"wrong scores {scores}")
            done += 1
        return done

    try:
        with ThreadPoolExecutor(4) as ex:
            callers = [ex.submit(caller, n) for n in range(4)]
            rng = random.Random(seed)
            try:
                for _ in range(clears):
                    time.sleep(rng.choice([0.0, 0.002, 0.01, 0.03]))
                    _, took = _timed(pool.clear)
                    assert took < PROMPT_S
            finally:  # a failed check must fail the test, not leave the callers looping
                stop.set()  # while the executor's exit waits for them
            for future in callers:
                future.result(timeout=30)
    finally:
        stop.set()
        pool.clear()
    assert problems == []
    # After the last clear nothing is left; every model that was ever loaded was freed.
    assert pool.loaded_specs() == []
    assert all(model.closed for model in backend.models)
    for stats in pool.stats().values():
        assert stats["loads"] == stats["releases"], stats
        assert stats["loaded"] is False
