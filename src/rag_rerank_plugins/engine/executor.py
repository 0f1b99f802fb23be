"""How a handle's requests reach its model: the scheduled path and the direct stage.

* :class:`ScheduledExecutor`: the model is owned by a :class:`~.scheduler.Scheduler` (torch
  models; anything not thread-safe). Callers wait on the request's future.
* :class:`DirectExecutor`: the model declares ``thread_safe`` (HTTP clients, fakes, the
  bi-encoder) and is called without a queue: a trivial stage that runs the same
  :class:`~.request.Request` with its lane and deadline in :func:`~..backends.base.current_call`,
  and validates what comes back exactly like the worker does. Closing it (a release, an
  eviction) refuses new calls and waits for the running ones, as the scheduled path finishes
  its queue first: the model's ``close()`` never runs under a call. A call counts as running
  until the backend really returns, not until its caller stops waiting: a sync call with a
  deadline and an async call on a model without a native ``arun`` run in a thread that holds
  the count, so a caller's timeout or cancellation cannot let ``close()`` in early.

The base class owns what every path shares, once: caller deadlines (a request past its deadline
raises :class:`RequestTimeoutError` in its caller on time, even while a direct backend call is
still running in its thread), withdrawal of a timed-out or cancelled request, and mapping foreign
exceptions to :class:`InferenceError`.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import threading
import time
from abc import ABC, abstractmethod
from collections.abc import Iterator
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout
from typing import Any

from .._exitsafe import late_caller, start_daemon
from ..backends.base import CallContext, EmbedderModel, LoadedModel, call_context
from ..engine_config import EngineConfig
from ..exceptions import InferenceError, ModelReleasedError, RagRerankError
from ..stats import Metrics
from .oom import run_direct
from .request import Request, timeout_error
from .scheduler import Scheduler
from .validate import check_results

__all__ = ["DirectExecutor", "Executor", "ScheduledExecutor", "executor_for", "map_error"]


def map_error(exc: BaseException, name: str, *, interruption: bool = True) -> BaseException:
    """Our errors pass through; anything else becomes InferenceError naming the model.

    ``interruption``: KeyboardInterrupt, SystemExit and asyncio cancellation pass through too
    (they interrupt the caller's own thread or task). False for what a backend raised in another
    thread or in an awaited call: there they interrupt nobody, a fake Ctrl-C would reach the
    caller, and SystemExit or KeyboardInterrupt escaping a task stops its whole event loop; the
    worker wraps them the same way."""
    passing = (
        (KeyboardInterrupt, SystemExit, asyncio.CancelledError, GeneratorExit)
        if interruption
        else ()
    )
    if isinstance(exc, (RagRerankError, *passing)):
        return exc
    error = InferenceError(f"{name} failed: {type(exc).__name__}: {exc}")
    error.__cause__ = exc
    return error


class Executor(ABC):
    """Runs requests on one loaded model; see the module docstring."""

    def __init__(self, model: LoadedModel, name: str) -> None:
        self.model = model
        self.name = name

    def run(self, request: Request) -> list[Any]:
        """One result per item, waiting until the request's deadline at most."""
        with late_caller():  # served even from an atexit hook that runs after the exit gate's
            return self._run(request)

    def _run(self, request: Request) -> list[Any]:
        future = self._start(request)
        try:
            try:
                return future.result(request.remaining_seconds())
            except FutureTimeout:
                if future.done():  # the model's own error is one (a nested call's timeout)
                    return future.result()  # or its result came just now
                request.withdraw()
                raise timeout_error(self.name, request.timeout) from None
        except BaseException as exc:
            if not future.done():  # interrupted while waiting (Ctrl-C): nobody wants it now
                request.withdraw()
            error = map_error(exc, self.name)
            if error is exc:
                raise
            raise error from exc

    async def arun(self, request: Request) -> list[Any]:
        """:meth:`run` for coroutines: never blocks the event loop; cancelling withdraws."""
        with late_caller():
            return await self._arun(request)

    async def _arun(self, request: Request) -> list[Any]:
        try:
            return await asyncio.wait_for(self._astart(request), request.remaining_seconds())
        except asyncio.TimeoutError as exc:
            if isinstance(exc, RagRerankError):  # the model's answer (a nested call timed
                raise  # out), not this caller's timeout: wait_for's own is a bare one
            request.withdraw()
            raise timeout_error(self.name, request.timeout) from None
        except (asyncio.CancelledError, GeneratorExit):  # a cancelled task, a closed coroutine
            request.withdraw()
            raise
        except BaseException as exc:
            error = map_error(exc, self.name)
            if error is exc:
                raise
            raise error from exc

    @abstractmethod
    def _start(self, request: Request) -> Future[list[Any]]: ...

    @abstractmethod
    async def _astart(self, request: Request) -> list[Any]: ...

    def close(self) -> None:  # noqa: B027 - nothing to stop for direct calls
        """Finish queued work and stop any threads."""

    def busy(self) -> bool:
        """Whether a backend call may run now that no caller waits for (a timed-out or cancelled
        direct call left in its thread, a scheduled pass already running for one): a budget or
        idle eviction leaves such a model for later."""
        return False

    def after_fork(self, metrics: Metrics, config: EngineConfig) -> Executor:
        """The executor to use in a forked child (threads do not survive fork)."""
        return self


class DirectExecutor(Executor):
    """Thread-safe models, called without a queue (see the module docstring).

    Without a deadline a sync call runs in the caller's thread; with one it runs in a daemon
    thread, so the caller gets its timeout on time (the call itself cannot be interrupted; its
    result is dropped).
    """

    def __init__(self, model: LoadedModel, name: str, metrics: Metrics | None = None) -> None:
        super().__init__(model, name)
        self.metrics = metrics
        self._idle = threading.Condition()
        self._running = 0  # calls inside the model now (in any thread, or awaited)
        self._on_loop: dict[asyncio.AbstractEventLoop, int] = {}  # of those, awaited per loop
        self._closed = False

    @contextlib.contextmanager
    def _inside(self) -> Iterator[None]:
        """One call inside the model: refused once closed (the pool retries on the reloaded
        model), counted so that :meth:`close` waits for it."""
        with self._idle:
            if self._closed:
                raise ModelReleasedError(
                    f"{self.name} was released. Ask the pool again (pool.get(spec)) to reload it."
                )
            self._running += 1
        try:
            yield
        finally:
            with self._idle:
                self._running -= 1
                if not self._running:
                    self._idle.notify_all()

    @contextlib.contextmanager
    def _awaited(self) -> Iterator[None]:
        """An awaited call (a native ``arun``) on the running loop: :meth:`close` on that
        loop's thread cannot wait for it (the loop would never run it to its end)."""
        loop = asyncio.get_running_loop()
        with self._idle:
            self._on_loop[loop] = self._on_loop.get(loop, 0) + 1
        try:
            yield
        finally:
            with self._idle:
                left = self._on_loop[loop] - 1
                if left:
                    self._on_loop[loop] = left
                else:
                    del self._on_loop[loop]
                self._idle.notify_all()

    def close(self) -> None:
        """Refuse new calls and wait for the running ones: the model's ``close()`` (a remote
        backend's HTTP client) must not run under them. On a thread running an event loop it
        waits for every call but the ones awaited on that loop, which cannot finish while it
        waits (a sync call in another thread, or a thread left running by a timed-out caller,
        is waited for there too)."""
        with self._idle:
            self._closed = True
            loop = _running_loop()
            while self._running - (self._on_loop.get(loop, 0) if loop is not None else 0):
                self._idle.wait()

    def busy(self) -> bool:
        return self._running > 0

    def after_fork(self, metrics: Metrics, config: EngineConfig) -> Executor:
        """A forked child gets a fresh count and condition: the parent's running calls do not
        run in the child (a count inherited from them would make :meth:`close` wait forever),
        and the parent's condition lock may have been held by another thread at the fork."""
        child = DirectExecutor(self.model, self.name, metrics)
        child._closed = self._closed
        return child

    def _call(self, request: Request) -> list[Any]:
        with self._inside(), call_context(CallContext(request.lane, request.deadline)):
            results = run_direct(
                self.model, request.task, request.items, request.batch_size, self.name, self.metrics
            )
        return self._check(request, results)

    def _check(self, request: Request, results: Any) -> list[Any]:
        dimension = self.model.dimension if isinstance(self.model, EmbedderModel) else None
        return check_results(self.name, request.task, results, len(request.items), dimension)

    def _start(self, request: Request) -> Future[list[Any]]:
        if request.deadline is None:
            request.start()
            try:
                request.resolve(self._call(request))
            except BaseException as exc:
                # A Ctrl-C or exit can only be the user's on the main thread (signals reach no
                # other); elsewhere, and for GeneratorExit anywhere (nothing here is a suspended
                # coroutine), the backend raised it itself: an InferenceError, as when scheduled.
                user = threading.current_thread() is threading.main_thread()
                own = not user or isinstance(exc, GeneratorExit)
                request.fail(map_error(exc, self.name, interruption=not own))
            return request.future
        return self._threaded(request)

    def _threaded(self, request: Request) -> Future[list[Any]]:
        """The call in a daemon thread of its own, settling ``request``: its caller can stop
        waiting on time. Not the event loop's default executor: a stuck call held one of its
        few threads past its caller's timeout, so other models' async calls (and the exit of
        ``asyncio.run``) queued behind it. Whatever the backend raises settles the request as
        an InferenceError: a raw StopIteration cannot be set into an asyncio future (the
        caller waited forever), and its own TimeoutError is not the caller's deadline."""
        context = contextvars.copy_context()
        request.start()

        def run() -> None:
            try:
                request.resolve(context.run(self._call, request))
            except BaseException as exc:  # raised in this thread: no interruption of the caller
                request.fail(map_error(exc, self.name, interruption=False))

        start_daemon(
            run, name=f"rag-rerank-direct[{self.name}]", native=self.model.native, inline=True
        )
        return request.future

    async def _astart(self, request: Request) -> list[Any]:
        if type(self.model).arun is LoadedModel.arun:
            # The default arun is ``run`` in a thread, which a cancelled or timed-out caller
            # leaves running: the whole call, count included, runs in that thread.
            return await asyncio.wrap_future(self._threaded(request))
        try:
            context = CallContext(request.lane, request.deadline)
            with self._inside(), self._awaited(), call_context(context):
                results = await self.model.arun(request.task, request.items, request.batch_size)
        except (asyncio.CancelledError, GeneratorExit):  # the caller's task, or its coroutine
            raise
        except BaseException as exc:
            # The backend's own (KeyboardInterrupt and TimeoutError included): wait_for's
            # timeout is raised outside this coroutine, never in it.
            raise map_error(exc, self.name, interruption=False) from exc
        return self._check(request, results)


def _running_loop() -> asyncio.AbstractEventLoop | None:
    try:
        return asyncio.get_running_loop()
    except RuntimeError:
        return None


class ScheduledExecutor(Executor):
    """Models owned by a scheduler: callers enqueue and wait on the request's future."""

    def __init__(self, model: LoadedModel, name: str, config: EngineConfig, metrics: Metrics):
        super().__init__(model, name)
        self.scheduler = Scheduler(model, config, metrics, name=name)
        self._queue_timeout = config.queue_timeout_s or 0.0

    def _start(self, request: Request) -> Future[list[Any]]:
        future = self.scheduler.submit(request)
        assert future is not None  # waiting for room: accepted, or an error raised
        return future

    async def _astart(self, request: Request) -> list[Any]:
        future = self.scheduler.submit(request, wait=False)
        if future is None:  # a full queue: wait for room (queue_timeout_s) on the loop
            future = await self._await_room(request)
        # Cancelling the awaiting task cancels the future: a queued request is withdrawn.
        return await asyncio.wrap_future(future)

    async def _await_room(self, request: Request) -> Future[list[Any]]:
        """Retry admission each time the queue may have room, until ``queue_timeout_s`` (or
        the call's own deadline) is over; then the queue raises as for a waiting thread. No
        thread per waiting caller: an overloaded service would otherwise add one per excess
        request, exactly when it can least afford them."""
        loop = asyncio.get_running_loop()
        admit_by = time.monotonic() + self._queue_timeout
        while True:
            room: asyncio.Future[None] = loop.create_future()

            def wake(room: asyncio.Future[None] = room) -> None:  # on any thread
                with contextlib.suppress(RuntimeError):  # the loop has closed
                    loop.call_soon_threadsafe(_settle_room, room)

            future = self.scheduler.submit(request, wait=False, admit_by=admit_by, on_room=wake)
            if future is not None:
                return future
            end = admit_by if request.deadline is None else min(admit_by, request.deadline)
            # Past ``end`` the next submit raises; a little slack so it is surely past.
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(room, max(0.0, end - time.monotonic()) + 0.001)

    def close(self) -> None:
        self.scheduler.close()

    def busy(self) -> bool:
        return self.scheduler.busy()

    def after_fork(self, metrics: Metrics, config: EngineConfig) -> Executor:
        return ScheduledExecutor(self.model, self.name, config, metrics)


def _settle_room(room: asyncio.Future[None]) -> None:
    if not room.done():
        room.set_result(None)


def executor_for(model: LoadedModel, name: str, config: EngineConfig, metrics: Metrics) -> Executor:
    """Direct for models that declare ``thread_safe``, scheduled for every other."""
    if model.thread_safe:
        return DirectExecutor(model, name, metrics)
    return ScheduledExecutor(model, name, config, metrics)
