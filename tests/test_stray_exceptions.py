"""Exceptions a backend raises where nobody expects them fail only what they touch.

The engine's promise (docs/architecture.md): a failure in load, prepare, forward, finish or
free_cache, any exception or a BaseException, fails only the requests it concerns, with a typed
error; it never stops the caller's event loop, never reaches another thread's caller raw, and
never takes healthy passes down with a crashed worker. These are the seams that caught only
``Exception`` (or only ``TypeError``/``ValueError``) before: the loader, ``free_cache()`` after
running out of memory, and results that fail while being read.
"""

from __future__ import annotations

import asyncio
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future
from typing import Any

import pytest

from rag_rerank_plugins import (
    InferenceError,
    ModelLoadError,
    ModelPool,
    ModelSpec,
    OutOfMemoryError,
)
from rag_rerank_plugins.backends import EmbedderModel, RerankerModel, register_backend
from rag_rerank_plugins.backends.base import Prepared, Task
from rag_rerank_plugins.engine_config import EngineConfig

PAIRS = [("red apple", "a red apple"), ("red apple", "a green pear")]
STRAY = [SystemExit(3), KeyboardInterrupt(), GeneratorExit()]


def _spec(loader: Callable[..., Any], kind: str = "reranker") -> ModelSpec:
    name = f"stray-{uuid.uuid4().hex[:8]}"
    register_backend(name, loader, kind, uses_torch=False)
    return ModelSpec("m", backend=name, device="cpu")


def _in_thread(fn: Callable[[], Any]) -> Future[Any]:
    """``fn()`` on a thread that is not the main one (as in a server's worker thread)."""
    future: Future[Any] = Future()

    def run() -> None:
        try:
            future.set_result(fn())
        except BaseException as exc:
            future.set_exception(exc)

    threading.Thread(target=run, daemon=True).start()
    return future


# -- the loader ---------------------------------------------------------------------------------


def _raising_loader(exc: BaseException) -> Callable[..., Any]:
    def load(spec: ModelSpec, provider: object) -> Any:
        raise exc

    return load


@pytest.mark.parametrize("exc", STRAY[:2], ids=type)
def test_loader_base_exception_fails_the_async_caller_not_its_loop(exc: BaseException) -> None:
    pool = ModelPool(config=EngineConfig())
    spec = _spec(_raising_loader(exc))

    async def main() -> tuple[list[Any], str]:
        other = asyncio.ensure_future(asyncio.sleep(0.1, "other task finished"))
        outcomes = await asyncio.gather(pool.ascore_pairs(spec, PAIRS), return_exceptions=True)
        return outcomes, await other

    outcomes, other = asyncio.run(main())
    assert other == "other task finished"
    assert isinstance(outcomes[0], ModelLoadError)
    assert type(exc).__name__ in str(outcomes[0])
    assert pool.stats()[next(iter(pool.stats()))]["load_failures"] == 1


@pytest.mark.parametrize("timeout", [None, 5.0])
@pytest.mark.parametrize("exc", STRAY[:2], ids=type)
def test_loader_base_exception_off_the_main_thread_is_a_load_error(
    exc: BaseException, timeout: float | None
) -> None:
    pool = ModelPool(config=EngineConfig())
    spec = _spec(_raising_loader(exc))
    with pytest.raises(ModelLoadError, match=type(exc).__name__):
        _in_thread(lambda: pool.score_pairs(spec, PAIRS, timeout=timeout)).result(10)


def test_loader_keyboard_interrupt_on_the_main_thread_stays_an_interrupt() -> None:
    """On the main thread a KeyboardInterrupt may be the user's Ctrl-C during a long load:
    it must stop the program, not become a load error someone catches and retries."""
    pool = ModelPool(config=EngineConfig())
    spec = _spec(_raising_loader(KeyboardInterrupt()))
    assert threading.current_thread() is threading.main_thread()
    with pytest.raises(KeyboardInterrupt):
        pool.score_pairs(spec, PAIRS)


# -- free_cache() after running out of memory ---------------------------------------------------


class OomThenFreeFails(RerankerModel):
    """A scheduled model: a pass holding "boom" runs out of memory, then free_cache raises."""

    def __init__(self, exc: BaseException) -> None:
        self.exc = exc

    def forward(self, task: Task, batch: Prepared) -> Any:
        if any(query == "boom" for query, _ in batch.payload):
            raise RuntimeError("CUDA out of memory. Tried to allocate 2 GiB")
        time.sleep(0.05)
        return [0.5] * len(batch.payload)

    def finish(self, task: Task, pending: Any) -> list[Any]:
        return list(pending)

    def is_oom(self, exc: BaseException) -> bool:
        return "out of memory" in str(exc)

    def free_cache(self) -> None:
        raise self.exc

    def score_pairs(self, pairs: Sequence[tuple[str, str]], batch_size: int) -> list[float]:
        return [0.5] * len(pairs)


@pytest.mark.parametrize("exc", [*STRAY, RuntimeError("allocator broken")], ids=type)
def test_free_cache_failure_fails_only_the_oom_request(
    exc: BaseException, caplog: pytest.LogCaptureFixture
) -> None:
    model = OomThenFreeFails(exc)
    spec = _spec(lambda spec, provider: model)
    pool = ModelPool(config=EngineConfig(max_batch_size=1, max_wait_ms=100))
    pool.get(spec)
    bad = _in_thread(lambda: pool.score_pairs(spec, [("boom", "x")], timeout=10))
    good = _in_thread(lambda: pool.score_pairs(spec, [("fine", "y")], timeout=10))
    with pytest.raises(OutOfMemoryError):
        bad.result(15)
    assert good.result(15) == [0.5]
    assert pool.score_pairs(spec, [("after", "z")], timeout=10) == [0.5]
    assert "worker crashed" not in caplog.text


# -- results that fail while being read -----------------------------------------------------------


class _Unreadable:
    def __float__(self) -> float:
        raise RuntimeError("device-side assert triggered")


def _breaking(count: int) -> Iterator[float]:
    yield 0.5
    raise RuntimeError("stream broke")


class BadResults(RerankerModel):
    """A scheduled model whose results for a "boom" pass cannot be read."""

    def __init__(self, mode: str) -> None:
        self.mode = mode

    def forward(self, task: Task, batch: Prepared) -> Any:
        time.sleep(0.05)
        return batch.payload

    def finish(self, task: Task, pending: Any) -> Any:
        if pending[0][0] != "boom":
            return [0.5] * len(pending)
        if self.mode == "float":
            return [_Unreadable() for _ in pending]
        return _breaking(len(pending))

    def score_pairs(self, pairs: Sequence[tuple[str, str]], batch_size: int) -> list[float]:
        return [0.5] * len(pairs)


@pytest.mark.parametrize("workers", [None, 2])
@pytest.mark.parametrize("mode", ["float", "generator"])
def test_unreadable_results_fail_only_their_pass(
    mode: str, workers: int | None, caplog: pytest.LogCaptureFixture
) -> None:
    model = BadResults(mode)
    if workers:  # whole passes on CPU device workers: validated on the device worker
        model.parallel_forward = True  # type: ignore[attr-defined]
    spec = _spec(lambda spec, provider: model)
    config = EngineConfig(max_batch_size=1, max_wait_ms=100, cpu_workers=workers)
    pool = ModelPool(config=config)
    pool.get(spec)
    bad = _in_thread(lambda: pool.score_pairs(spec, [("boom", "x")], timeout=10))
    good = _in_thread(lambda: pool.score_pairs(spec, [("fine", "y")], timeout=10))
    with pytest.raises(InferenceError, match="could not be read"):
        bad.result(15)
    assert good.result(15) == [0.5]
    assert "worker crashed" not in caplog.text


# -- vectors ------------------------------------------------------------------------------------


class Huge(EmbedderModel):
    thread_safe = True
    dimension = 3

    def __init__(self, vector: list[float]) -> None:
        self.vector = vector

    def embed(self, texts: Sequence[str], **kwargs: Any) -> list[list[float]]:
        return [list(self.vector) for _ in texts]


def test_finite_vector_whose_sum_overflows_is_accepted() -> None:
    spec = _spec(lambda spec, provider: Huge([1e308, 1e308, -1.0]), kind="embedder")
    assert ModelPool(config=EngineConfig()).embed(spec, ["hello"]) == [[1e308, 1e308, -1.0]]


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_vector_is_still_refused(bad: float) -> None:
    spec = _spec(lambda spec, provider: Huge([1e308, bad, 1e308]), kind="embedder")
    with pytest.raises(InferenceError, match="non-finite"):
        ModelPool(config=EngineConfig()).embed(spec, ["hello"])
