"""Cancellation, timeouts and backend exceptions on the async paths: every accepted request
resolves exactly once, with its results or one typed error, and a caller that gave up holds
nothing another caller needs (a thread of the loop's executor, a slot in the queue).

Each test failed before its fix (found by a hostile probe): an async call on a backend raising
StopIteration waited forever; timed-out direct calls held the loop's default executor, so a
healthy model timed out and ``asyncio.run`` waited for the stuck calls; a backend's own
TimeoutError read as the caller's deadline; requests whose callers gave up filled the queue
(QueueFullError); closing a suspended call's coroutine raised InferenceError.
"""

from __future__ import annotations

import asyncio
import threading
import time
from typing import Any

import pytest

from rag_rerank_plugins import EngineConfig, ModelPool, ModelSpec
from rag_rerank_plugins.backends import register_backend
from rag_rerank_plugins.exceptions import InferenceError, RequestTimeoutError
from rag_rerank_plugins.testing import FakeEmbedder, FakeReranker


class _StopIteration(FakeReranker):  # thread-safe: the direct path, the default arun
    def score_pairs(self, pairs: Any, batch_size: int) -> list[float]:
        return [next(iter([]))]


class _SocketTimeout(FakeReranker):
    def score_pairs(self, pairs: Any, batch_size: int) -> list[float]:
        raise TimeoutError("upstream read timed out")  # socket.timeout


class _NativeTimeout(FakeReranker):
    async def arun(self, task: Any, items: Any, batch_size: int) -> list[Any]:
        async with asyncio.timeout(0.01):  # its own upstream call times out
            await asyncio.sleep(1)
        return []


class _Stuck(FakeReranker):
    release = threading.Event()

    def score_pairs(self, pairs: Any, batch_size: int) -> list[float]:
        self.release.wait(30)
        return super().score_pairs(pairs, batch_size)


class _Slow(FakeReranker):
    thread_safe = False  # scheduled, like every torch backend
    passes = 0

    def score_pairs(self, pairs: Any, batch_size: int) -> list[float]:
        type(self).passes += 1
        time.sleep(float(getattr(self, "seconds", 0.3)))
        return super().score_pairs(pairs, batch_size)


def _register() -> None:
    for name, cls in [
        ("cancel-stopiteration", _StopIteration),
        ("cancel-sockettimeout", _SocketTimeout),
        ("cancel-nativetimeout", _NativeTimeout),
        ("cancel-stuck", _Stuck),
        ("cancel-slow", _Slow),
    ]:
        register_backend(
            name, lambda s, p, cls=cls: cls(), "reranker", uses_torch=False, replace=True
        )


_register()


def _spec(backend: str, model: str = "m") -> ModelSpec:
    return ModelSpec(model, backend=f"cancel-{backend}", device="cpu")


@pytest.mark.parametrize("backend", ["stopiteration", "sockettimeout", "nativetimeout"])
def test_a_backend_exception_is_an_inference_error_on_every_path(backend: str) -> None:
    pool = ModelPool()
    spec = _spec(backend)
    pairs = [("q", "p")]

    async def both() -> list[BaseException]:
        out = []
        for timeout in (None, 5.0):
            try:
                await asyncio.wait_for(pool.ascore_pairs(spec, pairs, timeout=timeout), 10)
            except BaseException as exc:  # the type is the assertion
                out.append(exc)
        return out

    try:
        errors = asyncio.run(both())
        assert [type(e) for e in errors] == [InferenceError, InferenceError], errors
        assert all("failed" in str(e) for e in errors)
        if backend != "nativetimeout":  # its sync path is the fake's own, which works
            with pytest.raises(InferenceError):
                pool.score_pairs(spec, pairs)
        assert pool.spec_stats(spec)["errors"] == 2 + (backend != "nativetimeout")
    finally:
        pool.clear()


def test_timed_out_direct_calls_hold_no_thread_of_the_event_loop() -> None:
    pool = ModelPool()
    stuck, healthy = _spec("stuck", "a"), ModelSpec("b", backend="fake-reranker", device="cpu")
    _Stuck.release.clear()

    async def main() -> Any:
        gone = await asyncio.gather(
            *[pool.ascore_pairs(stuck, [("q", "p")], timeout=0.3) for _ in range(12)],
            return_exceptions=True,
        )
        assert {type(r) for r in gone} == {RequestTimeoutError}
        # More stuck calls than the default executor has threads: a healthy model still answers.
        return await pool.ascore_pairs(healthy, [("q", "q")], timeout=5)

    try:
        start = time.monotonic()
        assert len(asyncio.run(main())) == 1
        assert time.monotonic() - start < 10  # asyncio.run does not wait for the stuck calls
    finally:
        _Stuck.release.set()
        pool.clear()


def test_requests_whose_callers_gave_up_hold_no_room_in_the_queue() -> None:
    pool = ModelPool(config=EngineConfig(max_queue=4, queue_timeout_s=2.0))
    spec = _spec("slow")
    pool.preload(spec, warmup=False)
    pool.get(spec).model.seconds = 1.5  # type: ignore[attr-defined]

    async def main() -> None:
        running = asyncio.ensure_future(pool.ascore_pairs(spec, [("a", "a")]))
        await asyncio.sleep(0.2)  # the pass runs
        gone = await asyncio.gather(
            *[pool.ascore_pairs(spec, [(f"q{i}", "p")], timeout=0.2) for i in range(4)],
            return_exceptions=True,
        )
        assert {type(r) for r in gone} == {RequestTimeoutError}
        cancelled = [asyncio.ensure_future(pool.ascore_pairs(spec, [("c", "p")])) for _ in range(4)]
        await asyncio.sleep(0.05)
        for task in cancelled:
            task.cancel()
        await asyncio.gather(*cancelled, return_exceptions=True)
        assert len(await pool.ascore_pairs(spec, [("new", "p")], timeout=10)) == 1
        await running

    try:
        asyncio.run(main())
        # Threads too: a sync caller waiting for room is admitted once callers give up.
        assert pool.spec_stats(spec)["rejected"] == 0
    finally:
        pool.clear()


def test_closing_a_suspended_calls_coroutine_withdraws_it() -> None:
    pool = ModelPool()
    spec = _spec("slow")
    pool.preload(spec, warmup=False)
    _Slow.passes = 0
    loop = asyncio.new_event_loop()
    tasks = [loop.create_task(pool.ascore_pairs(spec, [("a", "a")]))]  # occupies the worker
    coro = pool.ascore_pairs(spec, [("b", "b")])  # queued behind it
    tasks.append(loop.create_task(coro))
    loop.run_until_complete(asyncio.sleep(0.05))
    loop.close()
    try:
        coro.close()  # what the garbage collector does to a task left on a closed loop
        time.sleep(0.8)
        stats = pool.spec_stats(spec)
        assert (stats["errors"], stats["cancelled"]) == (0, 1)
        assert _Slow.passes == 1  # the withdrawn request never ran
    finally:
        pool.clear()


class _SlowEmbedder(FakeEmbedder):
    thread_safe = False  # scheduled: a cancelled caller's queued requests can be withdrawn
    passes = 0

    def embed(self, texts: Any, **kwargs: Any) -> list[list[float]]:
        type(self).passes += 1
        time.sleep(0.05)
        return super().embed(texts, **kwargs)


register_backend(
    "cancel-slow-embedder",
    lambda s, p: _SlowEmbedder(),
    "embedder",
    uses_torch=False,
    replace=True,
)


def test_a_cancelled_bi_encoder_call_withdraws_its_embedder_requests() -> None:
    """The bi-encoder ran in a thread that cancellation cannot stop: a caller that gave up (a
    client that hung up on the server) kept the embedder busy for nobody, outside the server's
    --max-concurrency. It now awaits the embedder, so cancelling withdraws what is queued."""
    pool = ModelPool(config=EngineConfig(max_batch_size=1))
    spec = ModelSpec(
        "m",
        backend="bi-encoder",
        device="cpu",
        options={"embedder_backend": "cancel-slow-embedder"},
    )
    pairs = [("q", f"passage {i}") for i in range(60)]

    async def main() -> int:
        task = asyncio.ensure_future(pool.ascore_pairs(spec, pairs, batch_size=1))
        await asyncio.sleep(0.4)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        return _SlowEmbedder.passes

    try:
        pool.score_pairs(spec, pairs[:2])  # loaded, and the scores work
        _SlowEmbedder.passes = 0
        at_cancel = asyncio.run(main())
        time.sleep(1.0)
        assert _SlowEmbedder.passes <= at_cancel + 1  # at most the pass running at the cancel
        assert at_cancel < 30
    finally:
        pool.clear()
