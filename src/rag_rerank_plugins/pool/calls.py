"""The pool's call methods: look up (or load) the shared handle, call it, unpin.

The handle stays pinned from the lookup to the result, so a pool that evicts by itself never
evicts a model under a running call; a call that races an explicit ``release()`` retries once on
the reloaded model. ``release()`` does not wait for a load in flight: a call whose load (its
own, or the one it waited for) was released starts over with a fresh load, at once when it only
waited, so no call fails because a release met its load. Async calls never load on the event
loop: a cold spec loads in a thread. Every call checks its input (texts, pairs, batch size,
priority) before it looks the model up, so bad input never costs a load.

A call's ``timeout`` (or ``EngineConfig.request_timeout_s``) bounds the whole call, the wait for
a cold model's load included: a load that is slow, or never ends (a stalled network share, a
progress bar's lock left held: docs/troubleshooting.md), raises :class:`RequestTimeoutError` at
the deadline instead of holding the caller; a load that has begun goes on in its thread and later
calls use the model once it is in, while one that had not begun (waiting its turn behind other
loads under a memory budget) never starts, so callers that gave up load nothing for nobody.
Without a timeout a call waits for the load as before.
"""

from __future__ import annotations

import asyncio
import contextvars
import time
from collections.abc import Awaitable, Callable, Sequence
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout
from typing import TYPE_CHECKING, TypeVar

from .._exitsafe import late_caller, start_daemon, to_thread
from .._mps import empty_cache
from ..engine_config import no_limit
from ..exceptions import ModelLoadError, ModelReleasedError, RequestTimeoutError
from ..inputs import check_batch_size, check_pairs, check_priority, check_texts, check_timeout
from ..spec import ModelSpec
from ._state import PoolState

if TYPE_CHECKING:
    from ..engine.request import Lane
    from ..handle import ModelHandle

__all__ = ["PoolCalls"]

T = TypeVar("T")


class _Loading(Future["ModelHandle"]):
    """One caller's wait for :meth:`PoolCalls._get` in a thread; ``wanted`` turns false when
    the caller stops waiting."""

    wanted = True


class PoolCalls(PoolState):
    """Scoring and embedding through the pool (see the module docstring)."""

    # The handle stays pinned from the lookup to the result: never evicted under the call.

    def _call(
        self,
        spec: ModelSpec,
        timeout: float | None,
        fn: Callable[[ModelHandle, float | None], T],
    ) -> T:
        deadline = self._deadline(timeout)
        for attempt in (1, 2):
            handle, waited = self._get_by(spec, deadline)
            try:
                return fn(handle, _left(deadline) if waited else timeout)
            except ModelReleasedError:
                if attempt == 2:
                    raise
            finally:
                if self._pins:
                    self._unpin(handle)
                self._after_call(handle)
        raise AssertionError("unreachable")

    async def _acall(
        self,
        spec: ModelSpec,
        timeout: float | None,
        fn: Callable[[ModelHandle, float | None], Awaitable[T]],
    ) -> T:
        deadline = self._deadline(timeout)
        for attempt in (1, 2):
            handle, waited = await self._aget(spec, deadline)
            try:
                return await fn(handle, _left(deadline) if waited else timeout)
            except ModelReleasedError:
                if attempt == 2:
                    raise
            finally:
                if self._pins:
                    handle._unpin()
                    if self._over:  # evicting closes a worker (joins a thread): not on the loop
                        await to_thread(self._settle)
                self._after_call(handle)
        raise AssertionError("unreachable")

    def _deadline(self, timeout: float | None) -> float | None:
        """The call's deadline on the monotonic clock (checked before any load starts)."""
        seconds = check_timeout(timeout)
        if seconds is None:
            seconds = self.config.request_timeout_s
        seconds = no_limit(seconds)  # inf given: no limit, not request_timeout_s
        return None if seconds is None else time.monotonic() + seconds

    def _loaded(self, spec: ModelSpec) -> ModelHandle | None:
        """The loaded handle (pinned when the pool pins), without loading or blocking."""
        key = self._keys.get(spec)  # resolving a new spec may import torch: not here
        slot = self._slots.get(key) if key is not None else None
        handle = slot.handle if slot is not None else None
        if handle is not None and (not self._pins or handle._pin()):
            return handle
        return None

    def _get_by(self, spec: ModelSpec, deadline: float | None) -> tuple[ModelHandle, bool]:
        """:meth:`_get`, waiting for a load until ``deadline`` at most (module docstring); and
        whether it waited (then the request gets what is left of the deadline)."""
        if deadline is None:
            return self._get(spec, pin=self._pins, start_over=True), False
        handle = self._loaded(spec)
        if handle is not None:
            return handle, False
        started = time.monotonic()
        loading = self._start_get(spec)
        try:
            with late_caller():  # its load thread serves an atexit hook after the exit gate's
                return loading.result(timeout=max(0.0, deadline - time.monotonic())), True
        except FutureTimeout:  # TimeoutError itself from Python 3.11
            raise self._load_timeout(spec, loading, started) from None
        except BaseException:  # e.g. KeyboardInterrupt: the load goes on without this caller
            self._abandon(loading)
            raise

    async def _aget(self, spec: ModelSpec, deadline: float | None) -> tuple[ModelHandle, bool]:
        """:meth:`_get_by` for coroutines: a loaded handle at once; a load (first call, or after
        a release, an eviction or an idle unload), its warm-up and any eviction it causes run
        in a thread, so the event loop keeps running while the model loads."""
        handle = self._loaded(spec)
        if handle is not None:
            return handle, False
        started = time.monotonic()
        loading = self._start_get(spec)
        wrapped = asyncio.wrap_future(loading)
        # Read once it ends, so a failed load nobody waits for any more (the caller timed out or
        # was cancelled) is not logged as "Future exception was never retrieved".
        wrapped.add_done_callback(lambda done: done.cancelled() or done.exception())
        waiting = asyncio.shield(wrapped)  # a cancelled caller: the load goes on
        try:
            with late_caller():  # its load thread serves an atexit hook after the exit gate's
                if deadline is None:
                    return await waiting, False
                left = max(0.0, deadline - time.monotonic())
                return await asyncio.wait_for(waiting, left), True
        except asyncio.TimeoutError:  # TimeoutError itself from Python 3.11
            raise self._load_timeout(spec, loading, started) from None
        except BaseException:  # cancelled: nobody takes the handle the load will give
            self._abandon(loading)
            raise

    def _start_get(self, spec: ModelSpec) -> _Loading:
        """:meth:`_get` in a thread of its own: a caller can stop waiting for it (then a load
        that has not begun yet never does: :meth:`_abandon`)."""
        loading = _Loading()
        loading.set_running_or_notify_cancel()  # running: nobody can cancel it from here on

        def run() -> None:
            try:
                handle = self._get(
                    spec, pin=self._pins, start_over=True, wanted=lambda: loading.wanted
                )
            except (KeyboardInterrupt, SystemExit) as exc:  # raised here: interrupts nobody
                loading.set_exception(ModelLoadError(spec.model, spec.backend, exc))
            except BaseException as exc:  # the waiting caller raises it
                loading.set_exception(exc)
            else:
                loading.set_result(handle)

        context = contextvars.copy_context()  # as asyncio.to_thread: the caller's context
        start_daemon(context.run, run, name="rag-rerank-load", inline=True)
        return loading

    def _load_timeout(
        self, spec: ModelSpec, loading: _Loading, started: float
    ) -> RequestTimeoutError:
        """The error for a caller whose deadline passed while ``loading`` still ran; counted
        as an errored call of the model in ``stats()`` (at once when the spec was resolved
        before, else once the load has resolved it)."""
        self._abandon(loading)

        def count(_: object = None) -> bool:
            key = self._keys.get(spec) or self._last_keys.get(spec)
            if key is not None:
                self._stats_for(key).add(calls=1, errors=1)
            return key is not None

        if not count():
            loading.add_done_callback(count)
        waited = time.monotonic() - started
        return RequestTimeoutError(
            f"{spec.model!r} was still loading after {waited:.1f} s, past the call's timeout. "
            "A load that has begun goes on in the background and later calls use the model once "
            "it is in: "
            "retry, preload the model at startup (ModelPool.preload), or give a longer timeout."
        )

    def _abandon(self, loading: _Loading) -> None:
        """The caller stopped waiting: a load already running goes on, and the pin it takes for
        the caller is given back when it ends (an idle or over-budget model stays evictable);
        one still waiting for its turn (the memory lock under a budget) never begins."""
        loading.wanted = False

        def unpin(done: Future[ModelHandle]) -> None:
            if self._pins and done.exception() is None:
                self._unpin(done.result())

        loading.add_done_callback(unpin)

    def _after_call(self, handle: ModelHandle) -> None:
        """Option ``mps_empty_cache``: the MPS cache back to macOS after every call (a fast
        synchronous call: fine on the event loop)."""
        if self.pool_config.mps_empty_cache and handle.device == "mps":
            empty_cache()

    def _unpin(self, handle: ModelHandle) -> None:
        handle._unpin()
        if self._over:
            self._settle()

    def score_pairs(
        self,
        spec: ModelSpec,
        pairs: Sequence[tuple[str, str]],
        batch_size: int = 32,
        *,
        timeout: float | None = None,
        priority: Lane = "interactive",
    ) -> list[float]:
        """Score (query, passage) pairs with the shared model for ``spec``. ``priority="bulk"``
        yields to interactive calls of the same model (they wait for at most one pass)."""
        pairs = _checked_pairs(pairs, batch_size, priority)
        return self._call(
            spec,
            timeout,
            lambda h, left: h.score_pairs(pairs, batch_size, timeout=left, priority=priority),
        )

    def embed(
        self,
        spec: ModelSpec,
        texts: Sequence[str],
        batch_size: int = 32,
        *,
        is_query: bool = False,
        normalize: bool = False,
        prompt: str | None = None,
        timeout: float | None = None,
        priority: Lane = "interactive",
    ) -> list[list[float]]:
        """Embed texts with the shared model for ``spec``; ``prompt`` (an instruction) replaces
        the model's own query/document prompt."""
        texts = _checked_texts(texts, prompt, batch_size, priority)
        return self._call(
            spec,
            timeout,
            lambda h, left: h.embed(
                texts,
                batch_size,
                is_query=is_query,
                normalize=normalize,
                prompt=prompt,
                timeout=left,
                priority=priority,
            ),
        )

    async def ascore_pairs(
        self,
        spec: ModelSpec,
        pairs: Sequence[tuple[str, str]],
        batch_size: int = 32,
        *,
        timeout: float | None = None,
        priority: Lane = "interactive",
    ) -> list[float]:
        """Like :meth:`score_pairs`; awaits the model's worker without blocking the event loop."""
        pairs = _checked_pairs(pairs, batch_size, priority)
        return await self._acall(
            spec,
            timeout,
            lambda h, left: h.ascore_pairs(pairs, batch_size, timeout=left, priority=priority),
        )

    async def aembed(
        self,
        spec: ModelSpec,
        texts: Sequence[str],
        batch_size: int = 32,
        *,
        is_query: bool = False,
        normalize: bool = False,
        prompt: str | None = None,
        timeout: float | None = None,
        priority: Lane = "interactive",
    ) -> list[list[float]]:
        """Like :meth:`embed`; awaits the model's worker without blocking the event loop."""
        texts = _checked_texts(texts, prompt, batch_size, priority)
        return await self._acall(
            spec,
            timeout,
            lambda h, left: h.aembed(
                texts,
                batch_size,
                is_query=is_query,
                normalize=normalize,
                prompt=prompt,
                timeout=left,
                priority=priority,
            ),
        )


def _left(deadline: float | None) -> float | None:
    """After a wait for a load: what it left of the deadline for the request itself (a tiny
    positive floor, so the engine times the request out through its one resolve path)."""
    return None if deadline is None else max(1e-3, deadline - time.monotonic())


def _checked_pairs(
    pairs: Sequence[tuple[str, str]], batch_size: int, priority: str
) -> list[tuple[str, str]]:
    """A scoring call's input, checked before the model is looked up (or loaded)."""
    check_batch_size(batch_size)
    check_priority(priority)
    return check_pairs(pairs)


def _checked_texts(
    texts: Sequence[str], prompt: str | None, batch_size: int, priority: str
) -> list[str]:
    """An embedding call's input, checked before the model is looked up (or loaded)."""
    check_batch_size(batch_size)
    check_priority(priority)
    return check_texts(texts, prompt)
