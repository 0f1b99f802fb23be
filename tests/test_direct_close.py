"""The direct path's close: a thread-safe model's ``close()`` never runs under one of its calls.

A thread-safe backend (a remote client, the bi-encoder, the fakes) is called without a queue
(``engine/executor.py``'s ``DirectExecutor``). Releasing or evicting it must wait for its running
calls: a remote backend's ``close()`` shuts the HTTP client a live request is using. What these
tests pin down is when a call stops counting as running: when the backend returns, not when its
caller stops waiting (an async timeout or cancellation used to let ``close()`` in under a call
that was still running in its thread); a release on an event-loop thread still waits for calls
made from other threads; and a forked child does not inherit the parent's running calls (its
``release()`` waited for them forever).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import threading
import time
import uuid
from collections.abc import Sequence

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from rag_rerank_plugins import ModelPool, ModelSpec, RequestTimeoutError
from rag_rerank_plugins.backends import RerankerModel, register_backend
from rag_rerank_plugins.engine_config import EngineConfig

PAIRS = [("red apple", "a red apple"), ("red apple", "a green pear")]


class Watched(RerankerModel):
    """A thread-safe reranker that records whether ``close()`` ran while a call was inside."""

    thread_safe = True

    def __init__(self, seconds: float = 0.3) -> None:
        self.seconds = seconds
        self.running = 0
        self.lock = threading.Lock()
        self.closed_under: list[int] = []  # calls running at each close()
        self.entered = threading.Event()

    def score_pairs(self, pairs: Sequence[tuple[str, str]], batch_size: int) -> list[float]:
        with self.lock:
            self.running += 1
        self.entered.set()
        try:
            time.sleep(self.seconds)
            return [0.5] * len(pairs)
        finally:
            with self.lock:
                self.running -= 1

    def close(self) -> None:
        with self.lock:
            self.closed_under.append(self.running)


def _spec(model: RerankerModel) -> ModelSpec:
    name = f"watched-{uuid.uuid4().hex[:8]}"
    register_backend(name, lambda spec, provider: model, "reranker", uses_torch=False)
    return ModelSpec("m", backend=name, device="cpu")


def _loaded(model: RerankerModel) -> tuple[ModelPool, ModelSpec]:
    pool = ModelPool(config=EngineConfig())
    spec = _spec(model)
    pool.get(spec)
    return pool, spec


@pytest.mark.parametrize("how", ["timeout", "cancel"])
def test_async_caller_gone_release_waits_for_the_running_call(how: str) -> None:
    model = Watched(seconds=0.4)
    pool, spec = _loaded(model)

    async def main() -> None:
        if how == "timeout":
            with pytest.raises(RequestTimeoutError):
                await pool.ascore_pairs(spec, PAIRS, timeout=0.05)
        else:
            task = asyncio.ensure_future(pool.ascore_pairs(spec, PAIRS))
            await asyncio.to_thread(model.entered.wait, 5)
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
        assert model.running == 1  # the backend call goes on in its thread
        await asyncio.to_thread(pool.release, spec)

    asyncio.run(main())
    assert model.closed_under == [0]


def test_release_on_an_event_loop_waits_for_other_threads_calls() -> None:
    """An async admin route releasing a model while a sync route's call runs in a thread."""
    model = Watched(seconds=0.3)
    pool, spec = _loaded(model)
    got: list[list[float]] = []
    caller = threading.Thread(target=lambda: got.append(pool.score_pairs(spec, PAIRS)))
    caller.start()
    assert model.entered.wait(5)

    async def admin() -> None:
        pool.release(spec)

    asyncio.run(admin())
    caller.join(5)
    assert model.closed_under == [0]
    assert got == [[0.5, 0.5]]


def test_release_on_its_own_loop_does_not_wait_for_calls_awaited_there() -> None:
    """A native ``arun`` awaited on the loop that releases cannot finish while the release
    waits; the release goes on (documented), and the awaited call ends with the model's answer
    or a clear error, not a hang."""

    class Native(Watched):
        async def arun(self, task, items, batch_size):  # type: ignore[no-untyped-def]
            self.entered.set()
            await asyncio.sleep(self.seconds)
            return [0.5] * len(items)

    model = Native(seconds=0.2)
    pool, spec = _loaded(model)

    async def main() -> list[float]:
        task = asyncio.ensure_future(pool.ascore_pairs(spec, PAIRS))
        while not model.entered.is_set():
            await asyncio.sleep(0.01)
        pool.release(spec)  # on the loop's thread: waiting for ``task`` would never end
        return await asyncio.wait_for(task, 5)

    got: list[list[float]] = []
    runner = threading.Thread(target=lambda: got.append(asyncio.run(main())), daemon=True)
    runner.start()
    runner.join(20)
    assert not runner.is_alive(), "release() on the loop waited for a call awaited on it"
    assert got == [[0.5, 0.5]]


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
def test_fork_during_a_direct_call_child_can_release() -> None:
    model = Watched(seconds=1.0)
    pool, spec = _loaded(model)
    caller = threading.Thread(target=pool.score_pairs, args=(spec, PAIRS), daemon=True)
    caller.start()
    assert model.entered.wait(5)
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child reports through its exit code
        code = 1
        try:
            model.seconds = 0.0
            ok = pool.score_pairs(spec, PAIRS, timeout=5) == [0.5, 0.5]
            done = threading.Event()
            threading.Thread(target=lambda: (pool.release(spec), done.set()), daemon=True).start()
            code = 0 if ok and done.wait(5) else 3
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    caller.join(5)
    assert os.waitstatus_to_exitcode(status) == 0, "release() in the forked child hung"


@settings(
    max_examples=12,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
@given(
    calls=st.lists(
        st.tuples(
            st.sampled_from(["sync", "sync_timeout", "async", "async_timeout", "async_cancel"]),
            st.floats(0.0, 0.04),  # when it starts
        ),
        min_size=1,
        max_size=6,
    ),
    release_at=st.floats(0.0, 0.08),
)
def test_property_close_never_runs_under_a_call(
    calls: list[tuple[str, float]], release_at: float
) -> None:
    """Whatever mix of callers (waiting, timing out, cancelled; sync and async) is running,
    a release at any moment closes the model only once no backend call is inside it. (A call
    after the release loads the model again: each load is a model of its own, as with a real
    backend.)"""
    models: list[Watched] = []

    def load(spec: ModelSpec, provider: object) -> Watched:
        models.append(Watched(seconds=0.06))
        return models[-1]

    name = f"watched-{uuid.uuid4().hex[:8]}"
    register_backend(name, load, "reranker", uses_torch=False)
    spec = ModelSpec("m", backend=name, device="cpu")
    pool = ModelPool(config=EngineConfig())
    pool.get(spec)

    def sync(timeout: float | None) -> None:
        with contextlib.suppress(Exception):  # timed out, or released first: both fine here
            pool.score_pairs(spec, PAIRS, timeout=timeout)

    async def one_async(kind: str, start: float) -> None:
        await asyncio.sleep(start)
        call = pool.ascore_pairs(spec, PAIRS, timeout=0.01 if kind == "async_timeout" else None)
        task = asyncio.ensure_future(call)
        if kind == "async_cancel":
            await asyncio.sleep(0.02)
            task.cancel()
        with contextlib.suppress(Exception, asyncio.CancelledError):
            await task

    async def main() -> None:
        threads = []
        tasks = []
        for kind, start in calls:
            if kind.startswith("sync"):
                timeout = 0.01 if kind == "sync_timeout" else None
                timer = threading.Timer(start, sync, args=(timeout,))
                timer.start()
                threads.append(timer)
            else:
                tasks.append(asyncio.ensure_future(one_async(kind, start)))
        await asyncio.sleep(release_at)
        await asyncio.to_thread(pool.release, spec)
        await asyncio.gather(*tasks)
        for thread in threads:
            await asyncio.to_thread(thread.join, 5)

    asyncio.run(main())
    assert models[0].closed_under == [0]
    assert all(m.closed_under in ([], [0]) for m in models), [m.closed_under for m in models]


def test_eviction_skips_a_model_a_timed_out_caller_left_running() -> None:
    """A budget eviction (here on an event loop's thread, where the next model's load is
    awaited) must neither close a model under the call a timed-out caller left running, nor
    wait for that call: the model is busy, so it stays (over budget) until the call ends."""
    from rag_rerank_plugins.testing import FakeReranker

    class Sized(Watched):
        def footprint_bytes(self) -> int | None:
            return 100 * 2**20

    slow = Sized(seconds=2.0)
    spec_a = _spec(slow)
    spec_b = _spec(FakeReranker(footprint_mb=100))
    pool = ModelPool(config=EngineConfig(), memory_budget_mb=150)
    pool.get(spec_a)

    async def main() -> float:
        with pytest.raises(RequestTimeoutError):
            await pool.ascore_pairs(spec_a, PAIRS, timeout=0.05)
        t0 = time.monotonic()
        await pool.ascore_pairs(spec_b, PAIRS)  # loads b: a is over budget, and busy
        return time.monotonic() - t0

    waited = asyncio.run(main())
    assert waited < 1.2, f"the eviction waited {waited:.2f} s for the leftover call"
    assert slow.closed_under in ([], [0])
    time.sleep(2.1)
    pool.score_pairs(spec_b, PAIRS)  # a call ending settles the budget: a goes now
    assert slow.closed_under == [0]
    pool.clear()
