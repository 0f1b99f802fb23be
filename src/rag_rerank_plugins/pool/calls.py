"""The pool's call methods: look up (or load) the shared handle, call it, unpin.

The handle stays pinned from the lookup to the result, so a pool that evicts by itself never
evicts a model under a running call; a call that races an explicit ``release()`` retries once on
the reloaded model. ``release()`` does not wait for a load in flight: a call whose load (its
own, or the one it waited for) was released starts over with a fresh load, at once when it only
waited, so no call fails because a release met its load. Async calls never load on the event
loop: a cold spec loads in a thread, one for all its waiting callers (:mod:`.waits`). Every call
checks its input (texts, pairs, batch size, priority) before it looks the model up, so bad input
never costs a load.

A call's ``timeout`` (or ``EngineConfig.request_timeout_s``) bounds the whole call, the wait for
a cold model's load included: a load that is slow, or never ends (a stalled network share, a
progress bar's lock left held: docs/troubleshooting.md), raises :class:`RequestTimeoutError` at
the deadline instead of holding the caller; a load that has begun goes on in its thread and later
calls use the model once it is in, while one that had not begun (waiting its turn behind other
loads under a memory budget) never starts, so callers that gave up load nothing for nobody.
Without a timeout a call waits for the load as before. A call made inside a loader (a backend
that uses another model of the pool while it loads) loads in the loader's thread instead, its
own event loop's included; its timeout then bounds the wait for a load in another thread.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable, Sequence
from typing import TYPE_CHECKING, TypeVar

from .._exitsafe import to_thread
from .._mps import empty_cache
from ..exceptions import ModelReleasedError
from ..inputs import check_batch_size, check_pairs, check_priority, check_texts
from ..spec import ModelSpec
from .waits import LoadWaits

if TYPE_CHECKING:
    from ..engine.request import Lane
    from ..handle import ModelHandle

__all__ = ["PoolCalls"]

T = TypeVar("T")


class PoolCalls(LoadWaits):
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

    def _after_call(self, handle: ModelHandle) -> None:
        """Option ``mps_empty_cache``: the MPS cache back to macOS after every call (a fast
        synchronous call: fine on the event loop)."""
        if self.pool_config.mps_empty_cache and handle.device == "mps":
            empty_cache()

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
