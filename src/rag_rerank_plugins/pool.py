"""The process-wide pool of loaded models: the one place where models are loaded and freed.

Adapters keep only a :class:`ModelSpec` and ask the pool for a :class:`ModelHandle` on each call,
so building an adapter per request costs microseconds, and ``release()`` really frees memory (no
adapter pins the weights).

Guarantees:

* **Once per spec.** Concurrent first calls for a cold spec wait on a per-spec lock; exactly one
  loads. Different specs load in parallel. A failed load caches nothing; the next call retries.
* **Thread-safe calls.** Each handle serialises forward passes of models that are not thread-safe
  (fast tokenizers raise "Already borrowed" when shared), so concurrent callers get exactly the
  results of sequential calls.
* **Fork-aware.** In a child after ``fork`` every lock is new; CUDA/MPS models of the parent are
  never used (the child loads its own); CPU models are kept and shared copy-on-write, which is why
  ``preload()`` before forking CPU workers (gunicorn ``--preload``) saves memory.
"""

from __future__ import annotations

import logging
import os
import threading
import time
import weakref
from collections.abc import Awaitable, Callable, Sequence
from typing import TYPE_CHECKING, Any, TypeVar

from ._memory import free_memory
from .backends import backend_info, get_loader
from .engine_config import EngineConfig
from .exceptions import (
    InvalidInputError,
    ModelLoadError,
    ModelReleasedError,
    RagRerankError,
)
from .policy import configure_torch_threads, resolve_spec
from .spec import ModelSpec

if TYPE_CHECKING:  # imported on first load: keeps `get_pool()` cheap at start-up
    from .handle import ModelHandle
    from .scheduler import Lane
    from .stats import SpecStats

__all__ = ["ModelPool", "get_pool"]

logger = logging.getLogger(__name__)
T = TypeVar("T")


class _Slot:
    """Per-spec load lock plus the handle once loaded."""

    __slots__ = ("handle", "lock", "retired")

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.handle: ModelHandle | None = None
        self.retired = False


_POOLS: weakref.WeakSet[ModelPool] = weakref.WeakSet()


class ModelPool:
    """Thread-safe, fork-aware registry of loaded models keyed by resolved :class:`ModelSpec`.

    Most applications use the process-wide :func:`get_pool`; separate pools are useful in tests.
    """

    def __init__(
        self, *, config: EngineConfig | None = None, num_threads: int | None = None
    ) -> None:
        #: Scheduling, queue and cache settings for every model this pool loads.
        self.config = config if config is not None else EngineConfig.from_env()
        self._num_threads = num_threads
        self._init_state()
        _POOLS.add(self)

    def _init_state(self) -> None:
        self._lock = threading.Lock()
        self._slots: dict[ModelSpec, _Slot] = {}
        self._keys: dict[ModelSpec, ModelSpec] = {}
        self._stats: dict[ModelSpec, SpecStats] = {}
        self._reasons: dict[ModelSpec, str] = {}
        self._fork_orphans: list[ModelHandle] = []

    # -- keys ---------------------------------------------------------------------------------

    def key(self, spec: ModelSpec) -> ModelSpec:
        """The resolved spec the pool stores ``spec`` under (device, dtype, path made concrete)."""
        key = self._keys.get(spec)
        if key is None:
            if not isinstance(spec, ModelSpec):
                raise InvalidInputError(f"expected a ModelSpec, got {type(spec).__name__}")
            info = backend_info(spec.backend)  # unknown backend -> clear error before any work
            key, decision = resolve_spec(spec, uses_torch=info.uses_torch)
            self._reasons.setdefault(key, decision.reason)
            self._keys[spec] = key
        return key

    # -- loading ------------------------------------------------------------------------------

    def get(self, spec: ModelSpec) -> ModelHandle:
        """The shared handle for ``spec``, loading it on first use (exactly once)."""
        key = self.key(spec)
        while True:
            slot = self._slots.get(key)
            if slot is not None and slot.handle is not None:
                return slot.handle
            with self._lock:
                slot = self._slots.get(key)
                if slot is None:
                    slot = self._slots[key] = _Slot()
            with slot.lock:
                if slot.retired:
                    continue  # released while we waited: start again with a fresh slot
                if slot.handle is None:
                    slot.handle = self._load(key)
                return slot.handle

    def _stats_for(self, key: ModelSpec) -> SpecStats:
        from .stats import SpecStats

        with self._lock:
            stats = self._stats.get(key)
            if stats is None:
                info = backend_info(key.backend)
                stats = self._stats[key] = SpecStats(
                    spec=key.label,
                    backend=key.backend,
                    model=key.model,
                    kind=info.kind,
                    device=key.device,
                    dtype=key.dtype,
                )
            return stats

    def _load(self, key: ModelSpec) -> ModelHandle:
        stats = self._stats_for(key)
        configure_torch_threads(self._num_threads)
        loader = get_loader(key.backend)
        start = time.perf_counter()
        try:
            model = loader(key, self)
        except RagRerankError:
            stats.load_failures += 1
            raise
        except Exception as exc:
            stats.load_failures += 1
            raise ModelLoadError(key.model, key.backend, exc) from exc
        elapsed = time.perf_counter() - start
        stats.loads += 1
        stats.load_seconds += elapsed
        stats.loaded = True
        stats.device = model.device
        stats.dtype = model.dtype
        stats.dtype_reason = self._reasons.get(key, "")
        logger.info(
            "rag-rerank: loaded %s in %.2fs on %s as %s (%s)",
            key.model,
            elapsed,
            model.device,
            model.dtype,
            stats.dtype_reason,
        )
        from .handle import ModelHandle

        return ModelHandle(key, model, stats, self.config)

    def model_info(self, spec: ModelSpec) -> tuple[str, str]:
        """Load ``spec`` if needed; its concrete ``(device, dtype)``. Backends that build on
        another shared model (the bi-encoder) ask this through ``ModelProvider``."""
        handle = self.get(spec)
        return handle.device, handle.dtype

    def preload(self, *specs: ModelSpec, warmup: bool = True) -> list[ModelHandle]:
        """Load ``specs`` now (e.g. in a FastAPI lifespan) and optionally run one tiny forward pass.

        Warm-up moves first-call costs (kernel choice, allocator growth) out of the first request.
        """
        handles = [self.get(spec) for spec in specs]
        if warmup:
            for handle in handles:
                if handle.kind == "reranker":
                    handle.score_pairs([("warm-up query", "warm-up passage")])
                else:
                    handle.embed(["warm-up text"])
        return handles

    # -- releasing ----------------------------------------------------------------------------

    def release(self, spec: ModelSpec) -> bool:
        """Unload ``spec`` and free its memory. Returns False when it was not loaded.

        In-flight calls on the handle finish first; later calls load the model again.
        """
        key = self.key(spec)
        with self._lock:
            slot = self._slots.pop(key, None)
        if slot is None:
            return False
        with slot.lock:
            slot.retired = True
            handle, slot.handle = slot.handle, None
        if handle is None:
            return False
        device = handle.device
        handle._close()
        stats = self._stats.get(key)
        if stats is not None:
            stats.loaded = False
            stats.releases += 1
        del handle
        free_memory(device)
        logger.info("rag-rerank: released %s", key.label)
        return True

    def clear(self) -> int:
        """Release every model. Returns how many were released."""
        with self._lock:
            keys = list(self._slots)
        return sum(self.release(key) for key in keys)

    # -- introspection ------------------------------------------------------------------------

    def is_loaded(self, spec: ModelSpec) -> bool:
        slot = self._slots.get(self.key(spec))
        return slot is not None and slot.handle is not None

    def loaded_specs(self) -> list[ModelSpec]:
        return [key for key, slot in list(self._slots.items()) if slot.handle is not None]

    def stats(self) -> dict[str, dict[str, Any]]:
        """Counters per spec label: loads, load_seconds, calls, items, errors, device, dtype, ..."""
        with self._lock:
            return {s.spec: s.as_dict() for s in self._stats.values()}

    def spec_stats(self, spec: ModelSpec) -> dict[str, Any]:
        """Counters for one spec (zeros if it was never loaded)."""
        key = self.key(spec)
        stats = self._stats.get(key) or self._stats_for(key)
        return stats.as_dict()

    def record_passthrough(self, spec: ModelSpec) -> None:
        """Count one adapter call answered in retrieval order (``on_error="passthrough"``)."""
        stats = self._stats_for(self.key(spec))
        with self._lock:
            stats.passthrough += 1

    def reset_stats(self) -> None:
        """Zero the call counters; load counters and state are kept."""
        with self._lock:
            for stats in self._stats.values():
                stats.calls = stats.items = stats.errors = stats.passthrough = 0
                stats.busy_seconds = 0.0

    # -- calls with one retry when a release races the call -----------------------------------

    def _call(self, spec: ModelSpec, fn: Callable[[ModelHandle], T]) -> T:
        for attempt in (1, 2):
            handle = self.get(spec)
            try:
                return fn(handle)
            except ModelReleasedError:
                if attempt == 2:
                    raise
        raise AssertionError("unreachable")

    async def _acall(self, spec: ModelSpec, fn: Callable[[ModelHandle], Awaitable[T]]) -> T:
        for attempt in (1, 2):
            handle = self.get(spec)  # may load: the first call of a cold spec blocks once
            try:
                return await fn(handle)
            except ModelReleasedError:
                if attempt == 2:
                    raise
        raise AssertionError("unreachable")

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

    # -- fork ---------------------------------------------------------------------------------

    def _after_fork(self) -> None:
        """Runs in a forked child: new locks; drop (never touch) the parent's GPU models."""
        old_slots = self._slots
        old_stats = self._stats
        orphans = self._fork_orphans
        self._init_state()
        self._fork_orphans = orphans
        for key, slot in old_slots.items():
            handle = slot.handle
            if handle is None:
                continue
            if handle.device == "cpu":
                # Same weights, shared copy-on-write with the parent; new locks and worker.
                handle._after_fork()
                fresh = _Slot()
                fresh.handle = handle
                self._slots[key] = fresh
            else:
                # A CUDA context does not survive fork. Keep the object alive but unused: freeing
                # its tensors here would call into the parent's CUDA context.
                self._fork_orphans.append(handle)
                old_stats[key].loaded = False
        self._stats = old_stats


def _after_fork_in_child() -> None:
    global _default_lock
    _default_lock = threading.Lock()
    for pool in list(_POOLS):
        pool._after_fork()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)


_default_pool: ModelPool | None = None
_default_lock = threading.Lock()


def get_pool() -> ModelPool:
    """The process-wide default pool that every adapter uses unless given another."""
    global _default_pool
    pool = _default_pool
    if pool is None:
        with _default_lock:
            if _default_pool is None:
                _default_pool = ModelPool()
            pool = _default_pool
    return pool
