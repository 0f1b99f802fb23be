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
  ``preload()`` before forking CPU workers (gunicorn ``--preload``) saves memory. The idle reaper
  thread is started again in the child.
* **Memory-managed** (optional, :class:`~rag_rerank_plugins.engine_config.PoolConfig`). With a
  per-device budget, loading a model evicts the least recently used models on its device that
  have no call in flight (before the load when the model's footprint is known from an earlier
  load, else right after it, never the model just loaded); with ``idle_unload_s`` a reaper thread
  releases models nobody called for that long. A call pins its handle from lookup to result, so a
  model is never evicted under a running forward and a request never fails because its model was
  evicted (it reloads, with the warm-up pass of ``preload``). Loads are serialised under a budget:
  each load must see what the previous ones took.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import threading
import time
import weakref
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, Literal, TypeVar

from ._memory import free_memory
from .backends import backend_info, get_loader
from .engine_config import EngineConfig, PoolConfig
from .exceptions import (
    ConfigurationError,
    InvalidInputError,
    ModelLoadError,
    ModelReleasedError,
    RagRerankError,
)
from .policy import configure_torch_threads, resolve_spec
from .spec import ModelSpec

if TYPE_CHECKING:  # imported on first load: keeps `get_pool()` cheap at start-up
    from .handle import ModelHandle
    from .engine.request import Lane
    from .stats import SpecStats

__all__ = ["ModelPool", "get_pool"]

logger = logging.getLogger(__name__)
T = TypeVar("T")
_MB = 1024 * 1024


class _Unset:
    def __repr__(self) -> str:
        return "<from PoolConfig / RAG_RERANK_POOL_*>"


_UNSET: Any = _Unset()


class _Slot:
    """Per-spec load lock plus the handle once loaded."""

    __slots__ = ("handle", "loaded_at", "lock", "retired")

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.handle: ModelHandle | None = None
        self.retired = False
        self.loaded_at = 0.0  # time.time() of the load: an unused model's idle clock starts here


def _reap_loop(ref: weakref.ref[ModelPool], stop: threading.Event, interval: float) -> None:
    """The reaper thread: holds its pool only weakly, so an unreferenced pool is collected and
    the thread ends within one interval."""
    while not stop.wait(interval):
        pool = ref()
        if pool is None:
            return
        try:
            pool._reap()
        except Exception:  # never let a bug end the reaper silently
            logger.exception("rag-rerank: idle reaper failed")
        del pool


def _fmt_mb(nbytes: int | None) -> str:
    return "unknown" if nbytes is None else f"{nbytes / _MB:.0f} MB"


_POOLS: weakref.WeakSet[ModelPool] = weakref.WeakSet()


class ModelPool:
    """Thread-safe, fork-aware registry of loaded models keyed by resolved :class:`ModelSpec`.

    Most applications use the process-wide :func:`get_pool`; separate pools are useful in tests.
    """

    def __init__(
        self,
        *,
        config: EngineConfig | None = None,
        num_threads: int | None = None,
        memory_budget_mb: int | float | Mapping[str, int | float] | None = _UNSET,
        idle_unload_s: float | None = _UNSET,
        over_budget: Literal["warn", "raise"] = _UNSET,
        pool_config: PoolConfig | None = None,
    ) -> None:
        """``memory_budget_mb``: most MB of models per device (a number for every device, or
        ``{"cpu": 2000, "cuda:0": 6000}``); ``idle_unload_s``: release models unused that long;
        ``over_budget``: ``"warn"`` (load a model bigger than its whole budget anyway) or
        ``"raise"``. Arguments not given come from ``pool_config``, else from
        ``RAG_RERANK_POOL_*`` (:meth:`PoolConfig.from_env`)."""
        #: Scheduling, queue and cache settings for every model this pool loads.
        self.config = config if config is not None else EngineConfig.from_env()
        base = pool_config if pool_config is not None else PoolConfig.from_env()
        given = {
            "memory_budget_mb": memory_budget_mb,
            "idle_unload_s": idle_unload_s,
            "over_budget": over_budget,
        }
        changes = {name: value for name, value in given.items() if value is not _UNSET}
        #: Memory budget, idle unload and over-budget policy of this pool.
        self.pool_config = base.with_changes(**changes) if changes else base
        # Only a pool that evicts by itself pins handles for the whole call (without one, just
        # an explicit release() can race a call, and the retry below covers that).
        self._pins = self.pool_config.manages_memory or self.pool_config.idle_unload_s is not None
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
        # Memory management: loads (under a budget) and evictions hold _mem_lock, taken before
        # any slot lock. Re-entrant: a loader may load another spec (the bi-encoder's embedder).
        self._mem_lock = threading.RLock()
        self._peak: dict[str, int] = {}
        self._over: set[str] = set()  # devices left over budget (every model was busy)
        self._needs_warmup: set[ModelSpec] = set()
        self._loading = 0
        self._load_seq = 0
        self._reaper_thread: threading.Thread | None = None
        self._reaper_stop = threading.Event()

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
        return self._get(spec, pin=False)

    def _get(self, spec: ModelSpec, *, pin: bool) -> ModelHandle:
        """:meth:`get`; with ``pin`` the handle comes back with one call counted in flight (the
        caller unpins), so no eviction can happen between the lookup and the call."""
        key = self.key(spec)
        while True:
            slot = self._slots.get(key)
            if slot is not None:
                handle = slot.handle
                if handle is not None and (not pin or handle._pin()):
                    return handle
            with self._lock:
                slot = self._slots.get(key)
                if slot is None:
                    slot = self._slots[key] = _Slot()
            with self._load_guard(), slot.lock:
                if slot.retired:
                    continue  # released while we waited: start again with a fresh slot
                handle = slot.handle
                if handle is None:
                    handle = self._load_into(key, slot)
                if not pin or handle._pin():
                    return handle
            # Evicted between the lookup and the pin: look again (a fresh slot, or reload).

    def _load_guard(self) -> contextlib.AbstractContextManager[Any]:
        return self._mem_lock if self.pool_config.manages_memory else contextlib.nullcontext()

    def _load_into(self, key: ModelSpec, slot: _Slot) -> ModelHandle:
        """Under the slot's lock (and the memory lock with a budget): make room, load, warm up
        after an eviction, publish, then evict others until the device is back under budget."""
        managed = self.pool_config.manages_memory
        if managed:
            self._make_room(key)
        handle = self._load(key)
        try:
            if managed:
                self._check_alone(key, handle.device, self._stats[key].footprint_bytes)
            if key in self._needs_warmup:
                self._needs_warmup.discard(key)
                self._warm_up(handle, reload=True)
        except BaseException:
            self._close_handle(key, handle)
            raise
        slot.loaded_at = time.time()
        slot.handle = handle
        if managed:
            self._settle_after_load(key, handle.device)
        else:
            self._note_peak(handle.device)
        self._ensure_reaper()
        return handle

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
        cuda_before = _cuda_allocated(key.device)
        with self._lock:
            alone = self._loading == 0
            self._loading += 1
            self._load_seq += 1
            seq = self._load_seq
        start = time.perf_counter()
        try:
            model = loader(key, self)
        except RagRerankError:
            stats.load_failures += 1
            raise
        except Exception as exc:
            stats.load_failures += 1
            raise ModelLoadError(key.model, key.backend, exc) from exc
        finally:
            with self._lock:
                self._loading -= 1
                alone = alone and self._load_seq == seq  # no other load overlapped this one
        elapsed = time.perf_counter() - start
        stats.footprint_bytes = _footprint(model, key.device, cuda_before if alone else None)
        stats.loads += 1
        stats.load_seconds += elapsed
        stats.loaded = True
        stats.device = model.device
        stats.dtype = model.dtype
        stats.dtype_reason = self._reasons.get(key, "")
        stats.kernels = model.kernels
        logger.info(
            "rag-rerank: loaded %s in %.2fs on %s as %s (%s), %s%s",
            key.model,
            elapsed,
            model.device,
            model.dtype,
            stats.dtype_reason,
            _fmt_mb(stats.footprint_bytes),
            f", kernels: {model.kernels}" if model.kernels else "",
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
                self._warm_up(handle)
        return handles

    @staticmethod
    def _warm_up(handle: ModelHandle, *, reload: bool = False) -> None:
        """One tiny forward pass. After an eviction (``reload``) a failure only logs: the request
        that triggered the reload will report the model's real error, if any."""
        try:
            if handle.kind == "reranker":
                handle.score_pairs([("warm-up query", "warm-up passage")])
            else:
                handle.embed(["warm-up text"])
        except Exception as exc:
            if not reload:
                raise
            logger.warning("rag-rerank: warm-up of %s after a reload failed: %r", handle.spec, exc)

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
        self._close_handle(key, handle)
        logger.info("rag-rerank: released %s", key.label)
        return True

    def _close_handle(self, key: ModelSpec, handle: ModelHandle) -> None:
        device = handle.device
        handle._close()
        stats = self._stats.get(key)
        if stats is not None:
            stats.loaded = False
            stats.releases += 1
        del handle
        free_memory(device)

    def clear(self) -> int:
        """Release every model and stop the idle reaper (the next load starts it again).
        Returns how many models were released."""
        self._stop_reaper()
        with self._lock:
            keys = list(self._slots)
        return sum(self.release(key) for key in keys)

    # -- memory budget, eviction, idle unload --------------------------------------------------

    def _budget(self, device: str) -> int | None:
        return self.pool_config.budget_bytes(device)

    def _resident(self, device: str) -> list[tuple[ModelSpec, _Slot, ModelHandle, int]]:
        """Loaded models on ``device`` with their footprints (unknown counts as 0)."""
        with self._lock:
            items = list(self._slots.items())
        out = []
        for key, slot in items:
            handle = slot.handle
            if handle is None or handle.device != device:
                continue
            stats = self._stats.get(key)
            footprint = (stats.footprint_bytes if stats is not None else None) or 0
            out.append((key, slot, handle, footprint))
        return out

    def _recency(self, key: ModelSpec, slot: _Slot) -> float:
        stats = self._stats.get(key)
        last = stats.last_used if stats is not None else None
        return max(last or 0.0, slot.loaded_at)

    def _check_alone(self, key: ModelSpec, device: str, footprint: int | None) -> None:
        """A model bigger than its device's whole budget: refuse it or say so."""
        budget = self._budget(device)
        if budget is None or footprint is None or footprint <= budget:
            return
        message = (
            f"{key.label} takes {_fmt_mb(footprint)} on {device}, more than the pool's whole "
            f"memory budget there ({_fmt_mb(budget)})."
        )
        if self.pool_config.over_budget == "raise":
            raise ConfigurationError(
                f"{message} Raise memory_budget_mb for {device!r}, use a smaller dtype or model, "
                "or pass over_budget='warn' to load it anyway."
            )
        logger.warning("rag-rerank: %s Loading it anyway (over_budget='warn').", message)

    def _make_room(self, key: ModelSpec) -> None:
        """Before a load: evict for the footprint this spec had at its previous load, if any."""
        stats = self._stats.get(key)
        expected = stats.footprint_bytes if stats is not None else None
        if not expected:
            return  # first load (or unknown size): evict after the load instead
        device = stats.device if stats is not None else key.device
        budget = self._budget(device)
        if budget is None:
            return
        self._check_alone(key, device, expected)
        self._evict_until(device, max(0, budget - expected), exclude=key)

    def _settle_after_load(self, key: ModelSpec, device: str) -> None:
        budget = self._budget(device)
        self._note_peak(device)
        if budget is None:
            return
        if not self._evict_until(device, budget, exclude=key):
            footprint = self._stats[key].footprint_bytes or 0
            if footprint <= budget:  # busy models: evict them once their calls end
                self._over.add(device)
            logger.info(
                "rag-rerank: %s is over its memory budget (%s) while its models are busy",
                device,
                _fmt_mb(budget),
            )

    def _settle(self) -> None:
        """After a call ends on an over-budget device: evict now-idle models (never blocks)."""
        if not self._mem_lock.acquire(blocking=False):
            return  # a load or eviction is running; it settles the budget itself
        try:
            for device in list(self._over):
                budget = self._budget(device)
                if budget is None or self._evict_until(device, budget, keep_one=True):
                    self._over.discard(device)
        finally:
            self._mem_lock.release()

    def _evict_until(
        self,
        device: str,
        target: int,
        *,
        exclude: ModelSpec | None = None,
        keep_one: bool = False,
    ) -> bool:
        """Evict least-recently-used idle models on ``device`` until its models take at most
        ``target`` bytes. False when that is impossible now (the rest are busy or excluded)."""
        while True:
            resident = self._resident(device)
            if sum(r[3] for r in resident) <= target:
                return True
            if keep_one and len(resident) <= 1:
                return False
            candidates = sorted(
                (r for r in resident if r[0] != exclude and r[3] > 0 and not r[2]._in_flight),
                key=lambda r: self._recency(r[0], r[1]),
            )
            if not any(self._evict(key, slot, "budget") for key, slot, _, _ in candidates):
                return False

    def _evict(self, key: ModelSpec, slot: _Slot, reason: str) -> bool:
        """Release ``key`` for ``reason`` if ``slot`` is still its loaded slot and no call is in
        flight (atomically: a later call finds the handle retired and reloads)."""
        with self._lock:
            handle = slot.handle
            if self._slots.get(key) is not slot or handle is None or not handle._try_retire():
                return False
            del self._slots[key]
        with slot.lock:
            slot.retired = True
            slot.handle = None
        stats = self._stats[key]
        stats.evictions += 1
        stats.last_eviction_reason = reason
        self._needs_warmup.add(key)
        footprint = stats.footprint_bytes
        device = handle.device
        self._close_handle(key, handle)
        del handle
        logger.info(
            "rag-rerank: evicted %s from %s (%s; %s; idle for %.1fs)",
            key.label,
            device,
            reason,
            _fmt_mb(footprint),
            time.time() - max(stats.last_used or 0.0, slot.loaded_at),
        )
        return True

    def _note_peak(self, device: str) -> None:
        used = sum(r[3] for r in self._resident(device))
        if used > self._peak.get(device, 0):
            self._peak[device] = used

    def memory(self) -> dict[str, dict[str, Any]]:
        """Per device: ``budget_mb``, ``used_mb`` (footprints of the loaded models), ``peak_mb``
        (the most they took right after a load), ``models`` and ``evictions``."""
        with self._lock:
            items = list(self._slots.items())
            all_stats = list(self._stats.values())
        devices = {slot.handle.device for _, slot in items if slot.handle is not None}
        devices |= set(self._peak) | {s.device for s in all_stats if s.loads}
        out: dict[str, dict[str, Any]] = {}
        for device in sorted(devices):
            resident = self._resident(device)
            budget = self._budget(device)
            out[device] = {
                "budget_mb": None if budget is None else round(budget / _MB, 3),
                "used_mb": round(sum(r[3] for r in resident) / _MB, 3),
                "peak_mb": round(self._peak.get(device, 0) / _MB, 3),
                "models": len(resident),
                "evictions": sum(s.evictions for s in all_stats if s.device == device),
            }
        return out

    def _ensure_reaper(self) -> None:
        """Start the idle reaper (once per pool and process) when ``idle_unload_s`` is set."""
        idle = self.pool_config.idle_unload_s
        if idle is None:
            return
        thread = self._reaper_thread
        if thread is not None and thread.is_alive():
            return
        with self._lock:
            thread = self._reaper_thread
            if thread is not None and thread.is_alive():
                return
            stop = self._reaper_stop = threading.Event()
            interval = min(max(idle / 4, 0.01), 5.0)
            thread = threading.Thread(
                target=_reap_loop,
                args=(weakref.ref(self), stop, interval),
                name="rag-rerank-reaper",
                daemon=True,
            )
            self._reaper_thread = thread
            weakref.finalize(self, stop.set)
        thread.start()

    def _stop_reaper(self) -> None:
        self._reaper_stop.set()
        thread = self._reaper_thread
        self._reaper_thread = None
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout=10)

    def _reap(self) -> None:
        """One pass of the reaper: release every idle model unused for ``idle_unload_s``."""
        idle = self.pool_config.idle_unload_s
        if idle is None:
            return
        now = time.time()
        with self._lock:
            items = list(self._slots.items())
        for key, slot in items:
            handle = slot.handle
            if handle is None or handle._in_flight or now - self._recency(key, slot) < idle:
                continue
            with self._mem_lock:
                self._evict(key, slot, "idle")

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
        raise AssertionError("unreachable")

    async def _acall(self, spec: ModelSpec, fn: Callable[[ModelHandle], Awaitable[T]]) -> T:
        for attempt in (1, 2):
            handle = self._get(spec, pin=self._pins)  # may load (a cold spec blocks once)
            try:
                return await fn(handle)
            except ModelReleasedError:
                if attempt == 2:
                    raise
            finally:
                if self._pins:
                    self._unpin(handle)
        raise AssertionError("unreachable")

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

    # -- fork ---------------------------------------------------------------------------------

    def _after_fork(self) -> None:
        """Runs in a forked child: new locks; drop (never touch) the parent's GPU models."""
        old_slots = self._slots
        old_stats = self._stats
        orphans = self._fork_orphans
        self._init_state()  # new locks; the parent's reaper thread does not exist here
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
                fresh.loaded_at = slot.loaded_at
                self._slots[key] = fresh
            else:
                # A CUDA context does not survive fork. Keep the object alive but unused: freeing
                # its tensors here would call into the parent's CUDA context.
                self._fork_orphans.append(handle)
                old_stats[key].loaded = False
        self._stats = old_stats
        if self._slots:
            self._ensure_reaper()  # the inherited CPU models still age out in the child


def _cuda_allocated(device: str) -> int | None:
    """Bytes torch's CUDA allocator holds on ``device`` now (0 before CUDA is initialised);
    None for other devices."""
    if not device.startswith("cuda"):
        return None
    torch = sys.modules.get("torch")
    if torch is None or not torch.cuda.is_initialized():
        return 0
    return int(torch.cuda.memory_allocated(device))


def _footprint(model: Any, device: str, cuda_before: int | None) -> int | None:
    """What a loaded model holds on its device: the CUDA allocator's growth during a load that
    ran alone (the best number there), else the backend's own count (parameters and buffers)."""
    try:
        counted = model.footprint_bytes()
    except Exception:  # a backend bug must not fail the load
        logger.debug("footprint_bytes() of %s failed", type(model).__name__, exc_info=True)
        counted = None
    if cuda_before is not None and model.device == device:
        after = _cuda_allocated(device)
        if after is not None and after > cuda_before:
            return after - cuda_before
    return None if counted is None else int(counted)


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
