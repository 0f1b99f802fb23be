"""Interpreter exit while a model works: no thread of ours touches torch when Python finalizes.

Why: at exit Python ends each daemon thread when it next takes the GIL. A thread inside a torch
op, an ONNX Runtime run, a tokenizer call, or merely freeing a tensor (torch releases the GIL in
its deallocator) takes it back in C++ code, and the forced unwind of that thread there ends in
``std::terminate``: the process aborts ("terminate called without an active exception", exit
status 134) after the user's program had finished. A script whose last requests were abandoned
(a timed-out or cancelled call, ``asyncio.run`` cancelling its tasks, a daemon thread of the
user's) hit it in 3 of 4 runs. Stock ``CrossEncoder`` in a daemon thread does the same, but our
worker, load, direct-call, reaper and finalizer threads are ours, so preventing it is ours too.

The rule, in one place: a daemon thread of ours works inside :func:`native_section` (a device
worker's whole loop, a load, a direct call) and steps out of it only where it may stop: while
idle (:func:`paused`) and between passes (:func:`checkpoint`). At exit an ``atexit`` hook (it runs
after non-daemon threads were joined, before finalization) closes the gate and waits for the
running sections, at most :data:`EXIT_WAIT_S` seconds, so a stuck pass cannot hold the exit
forever. A daemon thread that reaches the closed gate parks there, in Python, where finalization
ends it cleanly; other threads pass. What a non-daemon thread does after that (an ``atexit`` hook
of the user's that runs after ours: a model call, ``pool.clear()``) runs in :func:`late_caller`:
the gate opens for it, so the threads it waits for serve it (a parked worker had left it waiting
forever), and closes again when it returns, waiting for what it started, so nothing is left
running in torch when the interpreter finalizes.
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import contextvars
import os
import sys
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import thread as _futures_thread
from typing import Any, TypeVar

_T = TypeVar("_T")

__all__ = [
    "EXIT_WAIT_S",
    "GatedLock",
    "checkpoint",
    "close_and_wait",
    "exiting",
    "late_caller",
    "native_section",
    "paused",
    "running_sections",
    "start_daemon",
    "submit",
    "to_thread",
]

#: Longest wait at exit for work already running (a forward pass, a load).
EXIT_WAIT_S = 10.0

_gate = threading.Condition()
_running = 0  # threads inside a section now
_closed = False
_late = 0  # late_caller scopes open now (the gate is open while there is one)
_local = threading.local()  # .depth: this thread's nesting of sections


def _enter() -> None:
    global _running
    with _gate:
        if _closed and threading.current_thread().daemon:
            _gate.wait_for(lambda: not _closed)  # parked: until the process ends (or reopens)
        _running += 1


def _leave() -> None:
    global _running
    with _gate:
        _running -= 1
        if not _running:
            _gate.notify_all()


@contextlib.contextmanager
def native_section(needed: bool = True) -> Iterator[None]:
    """Run work that interpreter exit must not cut short (see the module docstring); nested
    sections count once. ``needed=False`` (an HTTP client's call: a thread in a socket call
    ends cleanly) makes it a no-op, so that exit does not wait for a slow server."""
    if not needed:
        yield
        return
    depth = _step_in()
    try:
        yield
    finally:
        _step_out(depth)


def _step_in() -> int:
    """Into this thread's section (the gate counts the outermost only); its depth before."""
    depth = getattr(_local, "depth", 0)
    if not depth:
        _enter()
    _local.depth = depth + 1
    return depth


def _step_out(depth: int) -> None:
    """Back to ``depth`` (what :func:`_step_in` returned); out of the gate's count at 0."""
    _local.depth = depth
    if not depth:
        _leave()


class GatedLock:
    """A re-entrant lock held only inside a section, entered before the lock is taken: for
    state that native work runs under (the semantic cache's index: usearch is C++). Exit waits
    for its holder, and a daemon thread parks at the closed gate before taking it, never while
    holding it: parked there, it would leave an ``atexit`` hook of the user's that needs the
    lock (a lookup) waiting for ever."""

    def __init__(self) -> None:
        self._lock = threading.RLock()

    def __enter__(self) -> GatedLock:
        depth = _step_in()
        try:
            self._lock.acquire()
        except BaseException:
            _step_out(depth)
            raise
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._lock.release()
        _step_out(_local.depth - 1)


@contextlib.contextmanager
def paused() -> Iterator[None]:
    """Step out of this thread's outermost section while it blocks (an idle worker's wait), so
    that exit does not wait for it; stepping back in parks it when the gate has closed."""
    if getattr(_local, "depth", 0) != 1:
        yield  # not in a section, or nested in one that must finish
        return
    _leave()
    try:
        yield
    finally:
        _enter()


def checkpoint() -> None:
    """A point between passes where a daemon thread of ours may stop at exit."""
    if _closed:
        with paused():
            pass


@contextlib.contextmanager
def late_caller() -> Iterator[None]:
    """Around what a caller waits for from our threads (a call, a release's join): after the
    gate has closed, a non-daemon thread (the main thread in a later ``atexit`` hook) opens it
    for the duration, and closes it again after, waiting for the sections its work started
    (:func:`close_and_wait`). Nothing otherwise."""
    global _closed, _late
    if not (_closed or _late) or threading.current_thread().daemon:
        yield
        return
    with _gate:
        _late += 1
        _closed = False
        _gate.notify_all()
    try:
        yield
    finally:
        with _gate:
            _late -= 1
            last = not _late
        if last:
            close_and_wait()


def start_daemon(
    target: Callable[..., Any], *args: Any, name: str, native: bool = True, inline: bool = False
) -> None:
    """Start a daemon thread running ``target(*args)`` inside a section (``native=False``: an
    HTTP call's thread, which exit need not wait for). Once Python finalizes (a handle's
    finalizer, or a call from a ``__del__``, run by module teardown) no thread starts, since
    ``Thread.start`` would wait for it for ever: ``target`` then runs here when ``inline`` (work
    a caller waits for: it waited out its whole timeout for a thread that never ran), else not
    at all."""
    if sys.is_finalizing():
        if inline:
            target(*args)
        return

    def run() -> None:
        with native_section(native):
            target(*args)

    if not start_thread(threading.Thread(target=run, name=name, daemon=True)) and inline:
        target(*args)


def start_thread(thread: threading.Thread) -> bool:
    """``thread.start()``; False where Python refuses new threads because it is exiting.
    CPython 3.12.0-3.12.2 refuse them in atexit hooks and in non-daemon threads still running
    after the main thread returned (gh-104690; lifted in 3.12.3): the callers then do the work
    in their own thread, or say why they cannot."""
    try:
        thread.start()
    except RuntimeError:
        if not exiting():
            raise
        return False
    return True


def submit(pool: ThreadPoolExecutor, fn: Callable[..., Any], *args: Any) -> Future[Any]:
    """``pool.submit(fn, *args)``, or ``fn`` run here when the pool takes no more work: once
    the interpreter starts to exit, ``concurrent.futures`` refuses every submit (its exit hook
    runs before non-daemon threads are joined and before ``atexit`` hooks), and a call from
    such a thread or hook would otherwise crash the worker, again and again."""
    try:
        return pool.submit(fn, *args)
    except RuntimeError:
        future: Future[Any] = Future()
        try:
            future.set_result(fn(*args))
        except BaseException as exc:  # as the pool's threads keep it: for the caller to see
            future.set_exception(exc)
        return future


async def to_thread(fn: Callable[..., _T], /, *args: Any, **kwargs: Any) -> _T:
    """``asyncio.to_thread``, also once the interpreter exits: ``concurrent.futures`` then
    refuses every submit (an ``atexit`` hook's ``asyncio.run`` raised "cannot schedule new
    futures after interpreter shutdown"), so the call runs in a daemon thread of its own, with
    the gate open for it (:func:`late_caller`)."""
    if not getattr(_futures_thread, "_shutdown", False):
        return await asyncio.to_thread(fn, *args, **kwargs)
    loop = asyncio.get_running_loop()
    done: asyncio.Future[_T] = loop.create_future()
    context = contextvars.copy_context()

    def settle(result: Any, error: BaseException | None) -> None:
        if done.cancelled():
            return
        if error is not None:
            done.set_exception(error)
        else:
            done.set_result(result)

    def run() -> None:
        try:
            result = context.run(fn, *args, **kwargs)
        except BaseException as exc:  # for the awaiting coroutine to raise
            outcome: tuple[Any, BaseException | None] = (None, exc)
        else:
            outcome = (result, None)
        with contextlib.suppress(RuntimeError):  # the loop closed (its caller gave up)
            loop.call_soon_threadsafe(settle, *outcome)

    with late_caller():
        if not start_thread(threading.Thread(target=run, name="rag-rerank-to-thread", daemon=True)):
            return context.run(fn, *args, **kwargs)  # no thread to be had: here, blocking
        return await done


def exiting() -> bool:
    """Whether the interpreter has begun to exit (non-daemon threads joined): libraries then
    refuse to start thread pools or register exit hooks, so a model can no longer load."""
    return bool(getattr(_futures_thread, "_shutdown", False)) or sys.is_finalizing()


def running_sections() -> int:
    """Threads inside a section now (for tests and diagnostics)."""
    return _running


def close_and_wait(timeout: float | None = None) -> bool:
    """Close the gate and wait for the running sections (the ``atexit`` hook); True when none is
    left. ``timeout`` defaults to :data:`EXIT_WAIT_S`."""
    global _closed
    deadline = time.monotonic() + (EXIT_WAIT_S if timeout is None else timeout)
    with _gate:
        _closed = True
        while _running and (left := deadline - time.monotonic()) > 0:
            _gate.wait(left)
        return not _running


def _reopen_in_child() -> None:
    """A forked child: the parent's sections do not run here, and its gate may have been held by
    another thread at the fork."""
    global _gate, _running, _closed, _late
    _gate, _closed, _late = threading.Condition(), False, 0
    _running = 1 if getattr(_local, "depth", 0) else 0  # the forking thread's own section


atexit.register(close_and_wait)
if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_reopen_in_child)
