"""Waiting for a load with a deadline: one shared wait per spec.

A caller with a deadline (a call's ``timeout``, ``EngineConfig.request_timeout_s``) or on an
event loop cannot block in the load itself: the load runs in a thread, and the caller waits for
its future until the deadline (:mod:`.calls`). That thread and future are **shared by every
caller of the spec** waiting at the time. Why: each caller ran the lookup in an OS thread of its
own, so 1000 async callers of a cold model were 1000 threads polling its load lock, and callers
that timed out behind a load that never ends (a stalled share) each left theirs behind, for good
(1000 requests: 1001 threads and 30 % of a core spent polling). Now:

* a spec's waiting callers are one thread and one future, however many they are;
* the load of a spec nobody waits for any more does not begin (``waiters`` at 0), and the
  thread waiting its turn for it stops waiting (:mod:`.loading`);
* a load that fails fails every caller waiting for it, at once; the next call retries;
* each caller pins the handle it gets (when the pool pins): one evicted before that looks again.
"""

from __future__ import annotations

import asyncio
import contextvars
import time
from concurrent.futures import TimeoutError as FutureTimeout
from typing import TYPE_CHECKING

from .._exitsafe import late_caller, start_daemon, to_thread
from ..engine_config import no_limit
from ..exceptions import ModelLoadError, RequestTimeoutError
from ..inputs import check_timeout
from ..spec import ModelSpec
from ._state import PoolState, SharedLoad, fresh_error
from .loading import Unwanted

if TYPE_CHECKING:
    from ..backends.base import LoadedModel
    from ..handle import ModelHandle

__all__ = ["LoadWaits"]


class LoadWaits(PoolState):
    """Deadlines and shared waits for loads (see the module docstring)."""

    def _deadline(self, timeout: float | None) -> float | None:
        """The call's deadline on the monotonic clock (checked before any load starts)."""
        seconds = check_timeout(timeout)
        if seconds is None:
            seconds = self.config.request_timeout_s
        seconds = no_limit(seconds)  # inf given: no limit, not request_timeout_s
        return None if seconds is None else time.monotonic() + seconds

    def _loaded(self, spec: ModelSpec, pin: bool) -> ModelHandle | None:
        """The loaded handle (pinned with ``pin``), without loading or blocking."""
        key = self._keys.get(spec)  # resolving a new spec may import torch: not here
        slot = self._slots.get(key) if key is not None else None
        handle = slot.handle if slot is not None else None
        if handle is not None and (not pin or handle._pin()):
            return handle
        return None

    def _get_by(
        self, spec: ModelSpec, deadline: float | None, pin: bool | None = None
    ) -> tuple[ModelHandle, bool]:
        """:meth:`_get`, waiting for a load until ``deadline`` at most; and whether it waited
        (then the request gets what is left of the deadline). ``pin``: the pool's default. A
        loader's own call loads in its thread (:meth:`_inline_get`)."""
        pin = self._pins if pin is None else pin
        if deadline is None:
            return self._get(spec, pin=pin, start_over=True), False
        if self._loading_in_this_thread():
            return self._inline_get(spec, deadline, pin), False
        started, waited = time.monotonic(), False
        while True:
            handle = self._loaded(spec, pin)
            if handle is not None:
                return handle, waited
            load, waited = self._join(spec), True
            try:
                try:
                    with late_caller():  # its load thread serves an atexit hook after the gate's
                        error = load.exception(timeout=max(0.0, deadline - time.monotonic()))
                except FutureTimeout:  # TimeoutError itself from Python 3.11
                    raise self._load_timeout(spec, load, started) from None
                if isinstance(error, Unwanted):
                    continue  # it ended as we joined it: a fresh one
                if error is not None:
                    raise fresh_error(error) from error
                handle = load.result()
                if not pin or handle._pin():  # while the load's own pin holds it
                    return handle, waited
            finally:
                self._unpin(self._leave(load))
            # Released before we pinned it: look again.

    async def _aget(self, spec: ModelSpec, deadline: float | None) -> tuple[ModelHandle, bool]:
        """:meth:`_get_by` for coroutines: a loaded handle at once; a load (first call, or after
        a release, an eviction or an idle unload), its warm-up and any eviction it causes run
        in the shared thread, so the event loop keeps running while the model loads. On a
        loader's own event loop (``asyncio.run`` inside a loader) it loads inline instead."""
        if self._loading_in_this_thread():
            return self._inline_get(spec, deadline, self._pins), False
        started, waited = time.monotonic(), False
        while True:
            handle = self._loaded(spec, self._pins)
            if handle is not None:
                return handle, waited
            load, waited = self._join(spec), True
            wrapped = asyncio.wrap_future(load)
            # Read once it ends, so a failed load nobody waits for any more (the caller timed
            # out or was cancelled) is not logged as "Future exception was never retrieved".
            wrapped.add_done_callback(lambda done: done.cancelled() or done.exception())
            try:
                left = None if deadline is None else max(0.0, deadline - time.monotonic())
                with late_caller():  # its load thread serves an atexit hook after the gate's
                    # wait, not await: a cancelled caller leaves the load alone, and the
                    # load's error is not raised here (see fresh_error)
                    done, _ = await asyncio.wait({wrapped}, timeout=left)
                if not done:
                    raise self._load_timeout(spec, load, started) from None
                error = load.exception()
                if isinstance(error, Unwanted):
                    continue
                if error is not None:
                    raise fresh_error(error) from error
                handle = load.result()
                if not self._pins or handle._pin():
                    return handle, waited
            finally:
                shared = self._leave(load)
                if shared is not None:  # evicting joins a worker thread: not on the loop
                    shared._unpin()
                    if self._over:
                        await to_thread(self._settle)

    def _lookup(
        self, spec: ModelSpec, deadline: float | None = None
    ) -> tuple[ModelHandle, LoadedModel]:
        """The handle for ``spec`` and its model, loading it if needed (until ``deadline`` at
        most), for what is read off the model beside a call: the adapters' named prompts, window
        plans and ``backend="auto"`` check (under the call's deadline: a load that never ends
        held them for ever), the server's tokenizer, a backend's shared model (``model_info``).
        A release that meets the load, or lands before the model is read, starts over with a
        fresh load, as the calls do: :meth:`get` raises :class:`ModelReleasedError` there (as
        documented), which failed the adapter call that only wanted the model's prompts."""
        while True:
            handle, _ = self._get_by(spec, deadline, pin=False)
            model = handle._model  # None: released since the lookup (a racing release)
            if model is not None:
                return handle, model

    def _inline_get(self, spec: ModelSpec, deadline: float | None, pin: bool) -> ModelHandle:
        """A loader's own call (:meth:`_loading_in_this_thread`) loads in the loader's thread:
        under a budget the loader holds the memory lock a load thread would wait for. Waiting
        for another thread's load of the spec still ends at ``deadline`` (two loaders that call
        each other's model would otherwise hold each other's slot for good)."""
        started = time.monotonic()
        wanted = None if deadline is None else (lambda: time.monotonic() < deadline)
        try:
            return self._get(spec, pin=pin, start_over=True, wanted=wanted)
        except Unwanted:
            key = self._keys.get(spec)
            if key is not None:
                self._stats_for(key).add(calls=1, errors=1)
            raise RequestTimeoutError(
                f"{spec.model!r} was still loading in another thread after "
                f"{time.monotonic() - started:.1f} s, past the call's timeout (a call made "
                "inside a loader). Retry, or preload the model at startup (ModelPool.preload)."
            ) from None

    def _join(self, spec: ModelSpec) -> SharedLoad:
        """The spec's shared load, started if none runs, with this caller counted as waiting."""
        with self._lock:
            load = self._shared_loads.get(spec)
            fresh = load is None
            if load is None:
                load = self._shared_loads[spec] = SharedLoad()
            load.waiters += 1
        if fresh:
            self._start(spec, load)
        return load

    def _leave(self, load: SharedLoad) -> ModelHandle | None:
        """A caller stopped waiting (answered and pinned, timed out, cancelled): with none left,
        a load that has not begun never does. Returns the handle whose shared pin the last
        caller to leave a finished load must drop (:meth:`_unpin`)."""
        with self._lock:
            load.waiters -= 1
            return self._last_out(load)

    def _last_out(self, load: SharedLoad) -> ModelHandle | None:
        """Under ``_lock``: the load's pinned handle once it ended and nobody waits (once)."""
        if load.waiters or load.pinned is None or not load.done():
            return None
        handle, load.pinned = load.pinned, None
        return handle

    def _unpin(self, handle: ModelHandle | None) -> None:
        """Drop a pin (nothing for None); a device left over budget meanwhile settles now."""
        if handle is None:
            return
        handle._unpin()
        if self._over:
            self._settle()

    def _start(self, spec: ModelSpec, load: SharedLoad) -> None:
        """The load's thread. It pins the handle under the load's locks, for its waiters: each
        pins it again for itself, and the last to leave drops the load's pin. Unpinned, the
        next spec's load (waiting for the memory lock under a budget) evicted it before its
        callers could pin it: calls timed out and models loaded three times."""
        load.set_running_or_notify_cancel()  # running: nobody can cancel it from here on

        def run() -> None:
            error: BaseException | None = None
            try:
                handle = self._get(
                    spec, pin=self._pins, start_over=True, wanted=lambda: load.waiters > 0
                )
            except (KeyboardInterrupt, SystemExit) as exc:  # raised here: interrupts nobody
                error = ModelLoadError(spec.model, spec.backend, exc)
            except BaseException as exc:  # every waiting caller raises a copy
                error = exc
            with self._lock:  # out first: a caller coming after a failure starts a new load
                if self._shared_loads.get(spec) is load:
                    del self._shared_loads[spec]
                if error is None and self._pins:
                    load.pinned = handle
            if error is None:
                load.set_result(handle)
            else:
                load.set_exception(error)
            with self._lock:  # everyone left before the end: nobody else drops the pin
                unpin = self._last_out(load)
            self._unpin(unpin)

        context = contextvars.copy_context()  # as asyncio.to_thread: the caller's context
        start_daemon(context.run, run, name="rag-rerank-load", inline=True)

    def _load_timeout(
        self, spec: ModelSpec, load: SharedLoad, started: float
    ) -> RequestTimeoutError:
        """The error for a caller whose deadline passed while ``load`` still ran; counted as an
        errored call of the model in ``stats()`` (at once when the spec was resolved before,
        else once the load has resolved it)."""

        def count(_: object = None) -> bool:
            key = self._keys.get(spec) or self._last_keys.get(spec)
            if key is not None:
                self._stats_for(key).add(calls=1, errors=1)
            return key is not None

        if not count():
            load.add_done_callback(count)
        waited = time.monotonic() - started
        return RequestTimeoutError(
            f"{spec.model!r} was still loading after {waited:.1f} s, past the call's timeout. "
            "A load that has begun goes on in the background and later calls use the model once "
            "it is in: "
            "retry, preload the model at startup (ModelPool.preload), or give a longer timeout."
        )
