"""Hostile callers against the engine: odd timeouts, interrupted and cancelled callers, a full
queue, backends raising interpreter-level exceptions, and the counters that must stay consistent.

Each test failed on the engine before its fix (noted per test). Waits are bounded (a wedged engine
fails a test instead of hanging it), pools are cleared in daemon threads, and only public APIs
are used (``ModelPool``, ``EngineConfig``, ``register_backend``, the backend protocol).
"""

from __future__ import annotations

import asyncio
import math
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from rag_rerank_plugins import ModelPool, ModelSpec
from rag_rerank_plugins.backends import register_backend
from rag_rerank_plugins.backends.base import Prepared, RerankerModel, Task
from rag_rerank_plugins.engine_config import EngineConfig
from rag_rerank_plugins.exceptions import (
    InferenceError,
    InvalidInputError,
    QueueFullError,
    RequestTimeoutError,
)
from rag_rerank_plugins.testing import FakeReranker

PAIRS = [("red apple", "a red apple"), ("red apple", "a green pear")]
EXPECTED = FakeReranker().score_pairs(PAIRS, 2)


class Slow(RerankerModel):
    """A reranker whose passes take ``pass_s`` (GIL-free); FakeReranker's scores. Scheduled
    unless ``thread_safe``; ``raises`` is raised by every pass."""

    def __init__(
        self, pass_s: float = 0.0, *, thread_safe: bool = False, raises: Any = None
    ) -> None:
        self.pass_s = pass_s
        self.thread_safe = thread_safe  # type: ignore[misc]  # per instance: both paths
        self.raises = raises
        self.seen: list[tuple[str, str]] = []  # every item a pass ran on
        self.started = threading.Event()

    def _pass(self, pairs: Sequence[tuple[str, str]]) -> list[float]:
        self.started.set()
        time.sleep(self.pass_s)
        if self.raises is not None:
            raise self.raises
        self.seen.extend(pairs)
        return FakeReranker().score_pairs(pairs, len(pairs))

    def forward(self, task: Task, batch: Prepared) -> Any:
        return self._pass(batch.payload)

    def finish(self, task: Task, pending: Any) -> list[float]:
        return list(pending)

    def score_pairs(self, pairs: Sequence[tuple[str, str]], batch_size: int) -> list[float]:
        return self._pass(pairs)


def _spec(model: Slow) -> ModelSpec:
    name = f"hostile-{uuid.uuid4().hex[:8]}"
    register_backend(name, lambda spec, provider: model, "reranker", uses_torch=False, replace=True)
    return ModelSpec("m", backend=name, device="cpu")


def _in_thread(fn: Callable[[], Any]) -> Future[Any]:
    future: Future[Any] = Future()

    def target() -> None:
        try:
            future.set_result(fn())
        except BaseException as exc:
            future.set_exception(exc)

    threading.Thread(target=target, name="hostile-caller", daemon=True).start()
    return future


def _outcome(future: Future[Any], seconds: float, what: str) -> Any:
    try:
        return future.result(seconds)
    except BaseException as exc:
        if not future.done():
            pytest.fail(f"{what} did not resolve within {seconds} s (the engine is wedged)")
        return exc


@pytest.fixture
def make_pool() -> Iterator[Callable[..., ModelPool]]:
    pools: list[ModelPool] = []

    def make(**config: Any) -> ModelPool:
        pool = ModelPool(config=EngineConfig(**config))
        pools.append(pool)
        return pool

    yield make
    for pool in pools:
        thread = threading.Thread(target=pool.clear, name="hostile-clear", daemon=True)
        thread.start()
        thread.join(5)


def _fill(pool: ModelPool, spec: ModelSpec, model: Slow, n: int) -> list[Future[Any]]:
    """One call running and ``n - 1`` queued behind it (``max_queue`` of them fill the queue)."""
    calls = [_in_thread(lambda: pool.score_pairs(spec, [("busy", "busy")]))]
    assert model.started.wait(2)
    for _ in range(n - 1):
        calls.append(_in_thread(lambda: pool.score_pairs(spec, [("busy", "busy")])))
    deadline = time.monotonic() + 2
    while pool.spec_stats(spec)["queue_depth"] < n - 1 and time.monotonic() < deadline:
        time.sleep(0.002)
    return calls


# -- timeouts ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def shared() -> Iterator[tuple[ModelPool, list[ModelSpec]]]:
    """One pool with a scheduled and a direct model, for many hypothesis examples."""
    pool = ModelPool(config=EngineConfig())
    yield pool, [_spec(Slow()), _spec(Slow(thread_safe=True))]
    thread = threading.Thread(target=pool.clear, name="hostile-clear", daemon=True)
    thread.start()
    thread.join(5)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    timeout=st.one_of(
        st.none(),
        st.floats(allow_nan=True, allow_infinity=True),
        st.integers(-(10**30), 10**30),
        st.sampled_from([0, 0.0, -0.0, True, "1", 1e-300]),
    )
)
def test_any_timeout_value_is_a_result_a_timeout_or_invalid_input(
    shared: tuple[ModelPool, list[ModelSpec]], timeout: Any
) -> None:
    """Every value a caller may pass, on the scheduled and the direct path: the result, a
    RequestTimeoutError (a tiny timeout), or an InvalidInputError (not a positive number); never
    another error, never a hang. (inf and huge values: tests/test_unbounded_durations.py.)"""
    pool, specs = shared
    valid = (
        isinstance(timeout, (int, float))
        and not isinstance(timeout, bool)
        and not math.isnan(timeout)
        and timeout > 0
    )
    for spec in specs:

        def call(spec: ModelSpec = spec) -> list[float]:
            return pool.score_pairs(spec, PAIRS, timeout=timeout)

        result = _outcome(_in_thread(call), 5, f"a call with timeout={timeout!r}")
        if timeout is None or (valid and timeout >= 1):
            assert result == EXPECTED, (timeout, result)
        elif valid:
            assert result == EXPECTED or isinstance(result, RequestTimeoutError), (timeout, result)
        else:
            assert isinstance(result, InvalidInputError), (timeout, result)


def test_a_callers_timeout_bounds_its_wait_for_room(make_pool: Callable[..., ModelPool]) -> None:
    """Before: a call with ``timeout=0.1`` on a full queue waited ``queue_timeout_s`` (2 s) for
    room, then for its result: the deadline that "covers the whole call" did not cover admission."""
    pool = make_pool(max_queue=1, queue_timeout_s=2.0)
    model = Slow(pass_s=0.4)
    spec = _spec(model)
    pool.get(spec)
    busy = _fill(pool, spec, model, 2)
    start = time.perf_counter()
    outcome = _outcome(
        _in_thread(lambda: pool.score_pairs(spec, PAIRS, timeout=0.1)), 5, "the timed call"
    )
    assert isinstance(outcome, RequestTimeoutError), outcome
    assert time.perf_counter() - start < 0.3
    for call in busy:
        assert _outcome(call, 5, "a busy call") == [1.0]
    assert ("red apple", "a red apple") not in model.seen


# -- interrupted and cancelled callers ----------------------------------------------------------


def test_an_interrupted_thread_caller_withdraws_its_queued_request(
    make_pool: Callable[..., ModelPool], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Before: Ctrl-C in a caller waiting for its result left the request queued, and the model
    scored it for nobody (the caller had already got KeyboardInterrupt).

    The interrupt is what Python raises in a wait a signal interrupts: KeyboardInterrupt out of
    ``Future.result``, here in this test's thread only. (A real signal sent to the pytest
    process crashed it in the full suite, whichever thread it was sent to.)"""
    pool = make_pool()
    model = Slow(pass_s=0.3)
    spec = _spec(model)
    pool.get(spec)
    busy = _fill(pool, spec, model, 1)
    me = threading.current_thread()
    result = Future.result

    def interrupted(self: Future[Any], timeout: float | None = None) -> Any:
        if threading.current_thread() is me and not self.done():
            time.sleep(0.05)  # the caller waits a little, then Ctrl-C
            raise KeyboardInterrupt
        return result(self, timeout)

    monkeypatch.setattr(Future, "result", interrupted)
    with pytest.raises(KeyboardInterrupt):
        pool.score_pairs(spec, PAIRS, timeout=5)
    monkeypatch.undo()
    assert _outcome(busy[0], 5, "the busy call") == [1.0]
    assert pool.score_pairs(spec, [("z", "z")]) == [1.0]  # served after the withdrawn one
    assert not set(PAIRS) & set(model.seen), "the interrupted caller's request still ran"


def test_an_async_caller_waiting_for_room_never_blocks_the_event_loop(
    make_pool: Callable[..., ModelPool],
) -> None:
    """Before: admission to a full queue waited (``queue_timeout_s``) on the event loop, which
    stalled every other task of the loop meanwhile (~0.3 s here)."""
    pool = make_pool(max_queue=1, queue_timeout_s=3.0)
    model = Slow(pass_s=0.15)
    spec = _spec(model)
    pool.get(spec)
    busy = _fill(pool, spec, model, 2)

    async def main() -> tuple[Any, float, Any]:
        gaps: list[float] = []
        done = asyncio.Event()

        async def tick() -> None:
            last = time.perf_counter()
            while not done.is_set():
                await asyncio.sleep(0.005)
                now = time.perf_counter()
                gaps.append(now - last)
                last = now

        ticker = asyncio.create_task(tick())
        await asyncio.sleep(0.01)
        result = await asyncio.wait_for(pool.ascore_pairs(spec, PAIRS), 5)
        # A caller cancelled while it waits for room: its request never runs.
        victim = asyncio.create_task(pool.ascore_pairs(spec, [("victim", "victim")]))
        waiting = [_in_thread(lambda: pool.score_pairs(spec, [("busy", "busy")]))]
        await asyncio.sleep(0.01)
        victim.cancel()
        cancelled = await asyncio.gather(victim, return_exceptions=True)
        done.set()
        await ticker
        _outcome(waiting[0], 5, "a busy call")
        return result, max(gaps), cancelled[0]

    result, gap, cancelled = asyncio.run(main())
    assert result == EXPECTED
    assert gap < 0.1, f"the event loop stalled for {gap:.3f} s"
    assert isinstance(cancelled, (asyncio.CancelledError, list))
    for call in busy:
        assert _outcome(call, 5, "a busy call") == [1.0]
    time.sleep(0.4)
    if isinstance(cancelled, asyncio.CancelledError):
        assert ("victim", "victim") not in model.seen


def test_cancellations_are_counted_once_and_timeouts_are_not_cancellations(
    make_pool: Callable[..., ModelPool],
) -> None:
    """Before: an async caller cancelled while queued counted 2 cancellations (the handle's and
    the queue's), and a caller timing out while queued counted an error *and* a cancellation."""
    pool = make_pool()
    model = Slow(pass_s=0.2)
    spec = _spec(model)
    pool.get(spec)

    async def main() -> None:
        busy = asyncio.create_task(pool.ascore_pairs(spec, [("busy", "busy")]))
        assert await asyncio.to_thread(model.started.wait, 2)
        queued = asyncio.create_task(pool.ascore_pairs(spec, PAIRS))
        await asyncio.sleep(0.02)
        queued.cancel()
        with pytest.raises(asyncio.CancelledError):
            await queued
        assert await busy == [1.0]

    asyncio.run(main())
    time.sleep(0.05)  # the worker prunes the withdrawn request
    stats = pool.spec_stats(spec)
    assert (stats["calls"], stats["errors"], stats["cancelled"]) == (1, 0, 1)

    busy_call = _in_thread(lambda: pool.score_pairs(spec, [("busy", "busy")]))
    time.sleep(0.02)
    with pytest.raises(RequestTimeoutError):
        pool.score_pairs(spec, PAIRS, timeout=0.05)
    assert _outcome(busy_call, 5, "the busy call") == [1.0]
    time.sleep(0.05)
    stats = pool.spec_stats(spec)
    assert (stats["calls"], stats["errors"], stats["cancelled"]) == (3, 1, 1)
    assert stats["queue_depth"] == 0


# -- backends raising interpreter-level exceptions ----------------------------------------------


@pytest.mark.parametrize("raised", [SystemExit(3), KeyboardInterrupt()], ids=repr)
def test_a_direct_backend_raising_systemexit_fails_the_call_not_the_event_loop(
    make_pool: Callable[..., ModelPool], raised: BaseException
) -> None:
    """Before: SystemExit or KeyboardInterrupt raised by a thread-safe (direct) backend reached
    the awaiting task unchanged, and asyncio re-raises those out of the loop: the whole event loop
    stopped (``gather(return_exceptions=True)`` could not catch it), and a thread caller got a
    fake Ctrl-C. The scheduled path already failed such calls with InferenceError."""
    pool = make_pool()
    spec = _spec(Slow(thread_safe=True, raises=raised))
    pool.get(spec)

    async def main() -> tuple[list[Any], str]:
        other = asyncio.create_task(asyncio.sleep(0.05, "other task finished"))
        outcomes = await asyncio.gather(pool.ascore_pairs(spec, PAIRS), return_exceptions=True)
        return list(outcomes), await other

    # In a thread of its own: on a broken engine the loop's KeyboardInterrupt lands here, not
    # in pytest (which would stop the whole session).
    ran = _outcome(_in_thread(lambda: asyncio.run(main())), 5, "the event loop")
    assert isinstance(ran, tuple), f"the event loop stopped with {ran!r}"
    outcomes, other = ran
    assert other == "other task finished"
    assert isinstance(outcomes[0], InferenceError), outcomes
    assert type(raised).__name__ in str(outcomes[0])
    # A thread caller with a deadline (the call runs in a thread of its own) gets the same.
    outcome = _outcome(_in_thread(lambda: pool.score_pairs(spec, PAIRS, timeout=5)), 5, "a call")
    assert isinstance(outcome, InferenceError), outcome


def test_a_full_queue_still_rejects_at_once_without_a_queue_timeout(
    make_pool: Callable[..., ModelPool],
) -> None:
    """The fast path is unchanged: no ``queue_timeout_s``, no wait (sync and async)."""
    pool = make_pool(max_queue=1)
    model = Slow(pass_s=0.3)
    spec = _spec(model)
    pool.get(spec)
    busy = _fill(pool, spec, model, 2)
    with pytest.raises(QueueFullError):
        pool.score_pairs(spec, PAIRS)
    with pytest.raises(QueueFullError):
        asyncio.run(pool.ascore_pairs(spec, PAIRS))
    for call in busy:
        assert _outcome(call, 5, "a busy call") == [1.0]


# -- calls while the interpreter exits -----------------------------------------------------------

EXIT_CALLS = """
import atexit, sys, threading, time
from rag_rerank_plugins import ModelPool, ModelSpec
pool = ModelPool()
spec = ModelSpec(sys.argv[1], backend="cross-encoder", device="cpu", dtype="float32")
print("main", len(pool.score_pairs(spec, [("q", "p")])), flush=True)
def late():
    time.sleep(0.3)  # main has returned: the interpreter is waiting for this thread
    print("thread", len(pool.score_pairs(spec, [("q", "p"), ("q", "a longer passage")] * 3)))
def at_exit():
    print("atexit", len(pool.score_pairs(spec, [("q", "p")] * 2)), flush=True)
    print("cleared", pool.clear(), flush=True)
atexit.register(at_exit)
threading.Thread(target=late).start()
"""


@pytest.mark.parametrize("refusing", [False, True])
@pytest.mark.parametrize("workers", ["1", "2"])
def test_calls_from_a_non_daemon_thread_and_an_atexit_hook_are_served(
    tiny_ce_path: str, workers: str, refusing: bool
) -> None:
    """Once the interpreter starts to exit, concurrent.futures refuses new work (its exit hook
    runs before non-daemon threads are joined and before atexit hooks). Every call to a
    scheduled model from such a thread or hook was 'the engine's worker crashed ... Please
    report this'; the worker now runs the stage itself. ``refusing``: as on CPython
    3.12.0-3.12.2, which refuse every new thread there too (binding a device worker's torch
    threads starts one: the call failed with "can't create new thread at interpreter
    shutdown")."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    from test_exit_in_flight import REFUSE_LATE_THREADS

    src = str(Path(__file__).resolve().parents[1] / "src")
    env = {**os.environ, "PYTHONPATH": src, "RAG_RERANK_CPU_WORKERS": workers}
    done = subprocess.run(
        [
            sys.executable,
            "-c",
            (REFUSE_LATE_THREADS if refusing else "") + EXIT_CALLS,
            tiny_ce_path,
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=180,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split("\n")[:4] == ["main 1", "thread 6", "atexit 2", "cleared 1"]
    assert "crashed" not in done.stderr, done.stderr[-2000:]


# -- event-loop callers waiting for room ---------------------------------------------------------


def test_async_callers_waiting_for_room_take_no_thread_each(
    make_pool: Callable[..., ModelPool],
) -> None:
    """Before: every async caller that found the queue full got an OS thread of its own to
    wait for room (1500 callers: 1471 threads), exactly when the process was overloaded. They
    now wait on the loop, woken when room frees; the outcomes are the same: admitted while
    there is time, else QueueFullError, a caller's own timeout first, a cancelled caller gone."""
    from rag_rerank_plugins.exceptions import QueueFullError, RequestTimeoutError

    pool = make_pool(max_queue=2, queue_timeout_s=0.6, max_batch_size=1)
    model = Slow(pass_s=0.05)
    spec = _spec(model)
    pool.get(spec)

    async def main() -> tuple[list[Any], int, Any, Any]:
        peak = threading.active_count()
        calls = [
            asyncio.ensure_future(pool.ascore_pairs(spec, [(f"q{i}", "p")])) for i in range(300)
        ]
        short = asyncio.ensure_future(pool.ascore_pairs(spec, [("short", "p")], timeout=0.1))
        victim = asyncio.ensure_future(pool.ascore_pairs(spec, [("victim", "p")]))
        while not all(c.done() for c in calls):
            peak = max(peak, threading.active_count())
            if not victim.done():
                victim.cancel()
            await asyncio.sleep(0.01)
        outcomes = await asyncio.gather(*calls, return_exceptions=True)
        return (
            outcomes,
            peak,
            (await asyncio.gather(short, return_exceptions=True))[0],
            (await asyncio.gather(victim, return_exceptions=True))[0],
        )

    before = threading.active_count()
    outcomes, peak, short, victim = asyncio.run(main())
    admitted = [o for o in outcomes if isinstance(o, list)]
    refused = [o for o in outcomes if isinstance(o, QueueFullError)]
    assert len(admitted) + len(refused) == 300, [o for o in outcomes if not isinstance(o, list)][:3]
    assert len(admitted) >= 5, "callers are admitted as room frees, before their wait ends"
    assert refused, "300 passes of 50 ms cannot all be admitted within 0.6 s"
    assert peak <= before + 4, f"{peak - before} threads while callers waited for room"
    assert isinstance(short, RequestTimeoutError)
    assert isinstance(victim, asyncio.CancelledError)
    time.sleep(0.2)
    assert ("victim", "p") not in model.seen
    assert pool.spec_stats(spec)["rejected"] == len(refused)


def test_a_release_wakes_async_callers_waiting_for_room(
    make_pool: Callable[..., ModelPool],
) -> None:
    from rag_rerank_plugins.exceptions import ModelReleasedError

    pool = make_pool(max_queue=1, queue_timeout_s=30)
    model = Slow(pass_s=0.3)
    spec = _spec(model)
    pool.get(spec)
    busy = _fill(pool, spec, model, 2)

    async def main() -> tuple[Any, float]:
        waiting = asyncio.ensure_future(pool.ascore_pairs(spec, [("late", "p")]))
        await asyncio.sleep(0.05)
        started = time.monotonic()
        await asyncio.to_thread(pool.release, spec)
        outcome = (await asyncio.gather(waiting, return_exceptions=True))[0]
        return outcome, time.monotonic() - started

    outcome, took = asyncio.run(main())
    # Either refused as released, or admitted to the reloaded model: never left waiting 30 s.
    assert isinstance(outcome, (ModelReleasedError, list)), outcome
    assert took < 5
    for call in busy:
        _outcome(call, 5, "a busy call")


# -- one caller's bad input fails only that caller ------------------------------------------------


class _Picky(FakeReranker):
    """Scheduled; raises on a pass holding the query "boom", scores NaN for "nan"."""

    thread_safe = False
    passes = 0

    def score_pairs(self, pairs: Any, batch_size: int) -> list[float]:
        type(self).passes += 1
        time.sleep(0.05)
        if any(q == "boom" for q, _ in pairs):
            raise RuntimeError("the tokenizer choked")
        return [math.nan if q == "nan" else float(len(p)) for q, p in pairs]


register_backend("test-picky", lambda s, p: _Picky(), "reranker", replace=True, uses_torch=False)


@pytest.mark.parametrize("bad", ["boom", "nan"])
def test_a_failing_request_does_not_fail_the_requests_sharing_its_pass(bad: str) -> None:
    """Requests batched together share a pass: when it failed (a backend exception, a NaN
    score), every request in it failed with the same error. Each request's part now runs
    alone first, so only the request whose input breaks the model fails."""
    pool = ModelPool(config=EngineConfig(max_wait_ms=200, max_batch_size=64))
    spec = ModelSpec("m", backend="test-picky", device="cpu")
    pool.preload(spec, warmup=False)
    results: dict[str, Any] = {}
    start = threading.Barrier(4)

    def call(name: str, query: str) -> None:
        start.wait()
        try:
            results[name] = pool.score_pairs(spec, [(query, "abc"), (query, "de")])
        except Exception as exc:
            results[name] = exc

    threads = [threading.Thread(target=call, args=(f"ok{i}", f"q{i}")) for i in range(3)] + [
        threading.Thread(target=call, args=("bad", bad))
    ]
    try:
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(30)
        assert isinstance(results["bad"], InferenceError), results
        for i in range(3):
            assert results[f"ok{i}"] == [3.0, 2.0], results
        assert pool.spec_stats(spec)["errors"] == 1
    finally:
        pool.clear()


def test_a_model_failing_every_pass_still_fails_every_request_once() -> None:
    pool = ModelPool(config=EngineConfig(max_wait_ms=100))
    spec = ModelSpec("m", backend="test-picky", device="cpu")
    pool.preload(spec, warmup=False)
    errors: list[BaseException] = []

    def call() -> None:
        try:
            pool.score_pairs(spec, [("boom", "x")], timeout=30)
        except Exception as exc:
            errors.append(exc)

    threads = [threading.Thread(target=call) for _ in range(6)]
    try:
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(30)
        assert len(errors) == 6
        assert all(isinstance(e, InferenceError) and "choked" in str(e) for e in errors)
    finally:
        pool.clear()
