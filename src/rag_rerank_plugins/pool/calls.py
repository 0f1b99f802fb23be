"""The pool's call methods: look up (or load) the shared handle, call it, unpin.

The handle stays pinned from the lookup to the result, so a pool that evicts by itself never
evicts a model under a running call; a call that races an explicit ``release()`` retries once on
the reloaded model. Async calls never load on the event loop: a cold spec loads in a thread.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Sequence
from typing import TYPE_CHECKING, TypeVar

from .._mps import empty_cache
from ..exceptions import ModelReleasedError
from ..spec import ModelSpec
from ._state import PoolState

if TYPE_CHECKING:
    from ..engine.request import Lane
    from ..handle import ModelHandle

__all__ = ["PoolCalls"]

T = TypeVar("T")


class PoolCalls(PoolState):
    """Scoring and embedding through the pool (see the module docstring)."""

    # The handle stays pinned from the lookup to the result: never evicted under the call.

    def _call(self, spec: ModelSpec, fn: Callable[[ModelHandle], T]) -> T:
        for attempt in (1, 2):
            handle = self._get(spec, pin=self._pins)
            try:
                return fn(handle)
            except ModelReleasedError:
                if attempt == 2:
                    raise
            finally:
                if self._pins:
                    self._unpin(handle)
                self._after_call(handle)
        raise AssertionError("unreachable")

    async def _acall(self, spec: ModelSpec, fn: Callable[[ModelHandle], Awaitable[T]]) -> T:
        for attempt in (1, 2):
            handle = await self._aget(spec)
            try:
                return await fn(handle)
            except ModelReleasedError:
                if attempt == 2:
                    raise
            finally:
                if self._pins:
                    handle._unpin()
                    if self._over:  # evicting closes a worker (joins a thread): not on the loop
                        await asyncio.to_thread(self._settle)
                self._after_call(handle)
        raise AssertionError("unreachable")

    def _after_call(self, handle: ModelHandle) -> None:
        """Option ``mps_empty_cache``: the MPS cache back to macOS after every call (a fast
        synchronous call: fine on the event loop)."""
        if self.pool_config.mps_empty_cache and handle.device == "mps":
            empty_cache()

    async def _aget(self, spec: ModelSpec) -> ModelHandle:
        """:meth:`_get` for coroutines: a loaded handle at once; a load (first call, or after
        a release, an eviction or an idle unload), its warm-up and any eviction it causes run
        in a thread, so the event loop keeps running while the model loads."""
        key = self._keys.get(spec)  # resolving a new spec may import torch: in the thread too
        slot = self._slots.get(key) if key is not None else None
        handle = slot.handle if slot is not None else None
        if handle is not None and (not self._pins or handle._pin()):
            return handle
        return await asyncio.to_thread(self._get, spec, pin=self._pins)

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
        return self._call(
            spec, lambda h: h.score_pairs(pairs, batch_size, timeout=timeout, priority=priority)
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
        return self._call(
            spec,
            lambda h: h.embed(
                texts,
                batch_size,
                is_query=is_query,
                normalize=normalize,
                prompt=prompt,
                timeout=timeout,
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
        return await self._acall(
            spec, lambda h: h.ascore_pairs(pairs, batch_size, timeout=timeout, priority=priority)
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
        return await self._acall(
            spec,
            lambda h: h.aembed(
                texts,
                batch_size,
                is_query=is_query,
                normalize=normalize,
                prompt=prompt,
                timeout=timeout,
                priority=priority,
            ),
        )
