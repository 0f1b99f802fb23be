"""How a handle's calls reach its model: one executor per loaded model, sync and async alike.

* :class:`ScheduledExecutor`: the model is owned by a :class:`~rag_rerank_plugins.scheduler.
  Scheduler` (torch models; anything not thread-safe). Callers wait on its future.
* :class:`DirectExecutor`: the model declares ``thread_safe`` (HTTP clients, fakes, the bi-encoder
  wrapper) and is called in the caller's thread, or awaited natively when it has ``arun``.

The base class owns what every path shares, once: caller timeouts, withdrawal of a timed-out or
cancelled queued request, and mapping foreign exceptions to :class:`InferenceError`. Sync and
async calls go through the same two methods (:meth:`Executor.run`, :meth:`Executor.arun`).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass
from typing import Any

from .backends.base import LoadedModel, Task
from .engine_config import EngineConfig
from .exceptions import InferenceError, RagRerankError, RequestTimeoutError
from .scheduler import Lane, Scheduler
from .stats import Metrics

__all__ = ["Call", "DirectExecutor", "Executor", "ScheduledExecutor", "executor_for"]


def map_error(exc: BaseException, name: str) -> BaseException:
    """Our errors pass through; anything else becomes InferenceError naming the model."""
    if isinstance(exc, (RagRerankError, KeyboardInterrupt, SystemExit)):
        return exc
    error = InferenceError(f"{name} failed: {type(exc).__name__}: {exc}")
    error.__cause__ = exc
    return error


def _timeout_error(name: str, timeout: float | None) -> RequestTimeoutError:
    return RequestTimeoutError(
        f"{name}: no result within {timeout} s (queued or running). Raise the timeout, "
        "reduce load, or add replicas."
    )


@dataclass(frozen=True)
class Call:
    """One request to a model: what to do, on which items, in passes of at most ``batch_size``,
    in which scheduler lane (direct calls have no queue to order)."""

    task: Task
    items: Sequence[Any]
    batch_size: int
    priority: Lane = "interactive"


class Executor(ABC):
    """Runs requests on one loaded model; see the module docstring."""

    def __init__(self, model: LoadedModel, name: str) -> None:
        self.model = model
        self.name = name

    def run(self, call: Call, timeout: float | None) -> list[Any]:
        """One result per item, waiting at most ``timeout`` seconds (None: as long as it takes)."""
        try:
            return self._run(call, timeout)
        except BaseException as exc:
            error = map_error(exc, self.name)
            if error is exc:
                raise
            raise error from exc

    async def arun(self, call: Call, timeout: float | None) -> list[Any]:
        """:meth:`run` for coroutines: never blocks the event loop; cancelling withdraws."""
        import asyncio  # lazily: keeps `import rag_rerank_plugins` cheap for sync-only apps

        try:
            try:
                return await asyncio.wait_for(self._arun(call), timeout)
            except asyncio.TimeoutError:
                raise _timeout_error(self.name, timeout) from None
        except asyncio.CancelledError:
            raise
        except BaseException as exc:
            error = map_error(exc, self.name)
            if error is exc:
                raise
            raise error from exc

    @abstractmethod
    def _run(self, call: Call, timeout: float | None) -> list[Any]: ...

    @abstractmethod
    async def _arun(self, call: Call) -> list[Any]: ...

    def close(self) -> None:  # noqa: B027 - nothing to stop for direct calls
        """Finish queued work and stop any threads."""

    def after_fork(self, metrics: Metrics, config: EngineConfig) -> Executor:
        """The executor to use in a forked child (threads do not survive fork)."""
        return self


class DirectExecutor(Executor):
    """Thread-safe models: called in the caller's thread (sync) or natively awaited (async).

    A sync call cannot be interrupted, so ``timeout`` bounds async calls only; HTTP backends
    carry their own timeouts.
    """

    def _run(self, call: Call, timeout: float | None) -> list[Any]:
        return self.model.run(call.task, call.items, call.batch_size)

    async def _arun(self, call: Call) -> list[Any]:
        return await self.model.arun(call.task, call.items, call.batch_size)


class ScheduledExecutor(Executor):
    """Models owned by a scheduler: callers enqueue and wait on a future."""

    def __init__(self, model: LoadedModel, name: str, config: EngineConfig, metrics: Metrics):
        super().__init__(model, name)
        self.scheduler = Scheduler(model, config, metrics, name=name)

    def _submit(self, call: Call) -> Future[list[Any]]:
        return self.scheduler.submit(
            call.task, call.items, batch_size=call.batch_size, priority=call.priority
        )

    def _run(self, call: Call, timeout: float | None) -> list[Any]:
        future = self._submit(call)
        try:
            return future.result(timeout)
        except FutureTimeout:
            future.cancel()  # withdraws the request if it is still queued
            raise _timeout_error(self.name, timeout) from None

    async def _arun(self, call: Call) -> list[Any]:
        import asyncio

        # Cancelling the awaiting task cancels the future: a queued request is withdrawn.
        return await asyncio.wrap_future(self._submit(call))

    def close(self) -> None:
        self.scheduler.close()

    def after_fork(self, metrics: Metrics, config: EngineConfig) -> Executor:
        return ScheduledExecutor(self.model, self.name, config, metrics)


def executor_for(model: LoadedModel, name: str, config: EngineConfig, metrics: Metrics) -> Executor:
    """Direct for models that declare ``thread_safe``, scheduled for every other."""
    if model.thread_safe:
        return DirectExecutor(model, name)
    return ScheduledExecutor(model, name, config, metrics)
