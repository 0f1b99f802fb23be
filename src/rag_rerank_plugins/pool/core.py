"""The :class:`ModelPool` itself: keys, the load-once path, release, introspection.

The pool's other concerns are parts of the same object, one module each: loading a spec
(:mod:`.loading`), the memory budget and idle reaper (:mod:`.budget`), the call methods
(:mod:`.calls`), and the shared state they all read (:mod:`._state`); the process-wide default
pool and fork handling are in :mod:`.process`.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any, Literal

from .._mps import apply_high_watermark
from ..backends import backend_info
from ..engine_config import EngineConfig, PoolConfig
from ..exceptions import ConfigurationError, InvalidInputError
from ..policy import resolve_spec
from ..spec import ModelSpec
from ._state import POOLS, LoadReleasedError, Slot, fresh_error, logger
from .budget import MemoryBudget
from .calls import PoolCalls
from .loading import Loading, StartOver, Unwanted

if TYPE_CHECKING:
    from ..handle import ModelHandle
    from ..stats import SpecStats

__all__ = ["ModelPool"]


class _Unset:
    def __repr__(self) -> str:
        return "<from PoolConfig / RAG_RERANK_POOL_*>"


_UNSET: Any = _Unset()


class ModelPool(PoolCalls, MemoryBudget, Loading):
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
        mps_high_watermark_ratio: float | None = _UNSET,
        mps_empty_cache: bool = _UNSET,
    ) -> None:
        """``memory_budget_mb``: most MB of models per device (a number for every device, or
        ``{"cpu": 2000, "cuda:0": 6000}``); ``idle_unload_s``: release models unused that long;
        ``over_budget``: ``"warn"`` (load a model bigger than its whole budget anyway) or
        ``"raise"``; ``mps_high_watermark_ratio`` / ``mps_empty_cache``: the MPS allocator's cap
        and emptying its cache after each call (:mod:`rag_rerank_plugins._mps`). Arguments not
        given come from ``pool_config``, else from ``RAG_RERANK_POOL_*``
        (:meth:`PoolConfig.from_env`)."""
        for name, value, cls in (
            ("config", config, EngineConfig),
            ("pool_config", pool_config, PoolConfig),
        ):
            if value is not None and not isinstance(value, cls):  # a dict failed at first call
                raise ConfigurationError(
                    f"ModelPool({name}=...) takes a {cls.__name__}, got "
                    f"{type(value).__name__}: pass {cls.__name__}(...) with those settings "
                    f"(e.g. {cls.__name__}(**your_dict))."
                )
        #: Scheduling, queue and cache settings for every model this pool loads.
        self.config = config if config is not None else EngineConfig.from_env()
        base = pool_config if pool_config is not None else PoolConfig.from_env()
        given = {
            "memory_budget_mb": memory_budget_mb,
            "idle_unload_s": idle_unload_s,
            "over_budget": over_budget,
            "mps_high_watermark_ratio": mps_high_watermark_ratio,
            "mps_empty_cache": mps_empty_cache,
        }
        changes = {name: value for name, value in given.items() if value is not _UNSET}
        #: Memory budget, idle unload and over-budget policy of this pool.
        self.pool_config = base.with_changes(**changes) if changes else base
        # Only a pool that evicts by itself pins handles for the whole call (without one, just
        # an explicit release() can race a call, and the retry below covers that).
        self._pins = self.pool_config.manages_memory or self.pool_config.idle_unload_s is not None
        self._num_threads = num_threads
        apply_high_watermark(self.pool_config.mps_high_watermark_ratio)  # before torch if we can
        self._init_state()
        POOLS.add(self)

    # -- keys ---------------------------------------------------------------------------------

    def key(self, spec: ModelSpec) -> ModelSpec:
        """The resolved spec the pool stores ``spec`` under (device, dtype, path made concrete)."""
        key = self._keys.get(spec)
        if key is None:
            if not isinstance(spec, ModelSpec):
                raise InvalidInputError(f"expected a ModelSpec, got {type(spec).__name__}")
            info = backend_info(spec.backend)  # unknown backend -> clear error before any work
            key, decision = resolve_spec(spec, uses_torch=info.uses_torch, cpu_bf16=info.cpu_bf16)
            with self._lock:  # release() walks these dicts under it (_forget_keys)
                self._reasons.setdefault(key, decision.reason)
                self._spec_reasons[spec] = decision.reason
                self._keys[spec] = key
        return key

    # -- loading ------------------------------------------------------------------------------

    def get(self, spec: ModelSpec) -> ModelHandle:
        """The shared handle for ``spec``, loading it on first use (exactly once)."""
        return self._get(spec, pin=False)

    def _get(
        self,
        spec: ModelSpec,
        *,
        pin: bool,
        start_over: bool = False,
        wanted: Callable[[], bool] | None = None,
    ) -> ModelHandle:
        """:meth:`get`; with ``pin`` the handle comes back with one call counted in flight (the
        caller unpins), so no eviction can happen between the lookup and the call. A caller
        whose load (its own, or the one it waited for) was released gets
        :class:`LoadReleasedError`, or with ``start_over`` (the calls, :mod:`.calls`) starts
        again with a fresh slot and a fresh load. A load of a caller that gave up before its
        turn (``wanted()`` false) does not begin (:class:`Unwanted`): under a tight budget,
        callers that time out would otherwise each still load (and evict) a model for nobody."""
        key = self.key(spec)
        self._refuse_own_load(key)
        while True:
            slot = self._slots.get(key)
            if slot is not None:
                handle = slot.handle
                if handle is not None and (not pin or handle._pin()):
                    return handle
            with self._lock:
                slot = self._slots.get(key)
                if slot is None:
                    slot = self._slots[key] = Slot()
            with contextlib.ExitStack() as held:
                try:
                    self._take_turn(held, key, slot, wanted)
                except StartOver:
                    continue  # released before a load began in it: a fresh slot
                except LoadReleasedError:  # the load we waited for, still running, was released
                    if start_over:
                        continue
                    raise
                with self._lock:  # one view: release() and _evict() set these under it
                    retired, cancelled, handle = slot.retired, slot.cancelled, slot.handle
                if cancelled and slot.loading and not start_over:  # its load ended, released
                    raise LoadReleasedError(key, in_flight=False)
                if retired and slot.error is not None:
                    # The load we waited for failed: its error (a copy), not a retry.
                    raise fresh_error(slot.error) from slot.error
                if retired:
                    continue  # evicted or released while we waited: a fresh slot
                if handle is None:
                    if wanted is not None and not wanted():
                        self._drop_empty(key, slot)
                        raise Unwanted(key.label)
                    slot.loading = True
                    try:
                        handle = self._load_into(key, slot)
                    except LoadReleasedError:  # released while it loaded: dropped, not kept
                        if start_over:
                            continue
                        raise
                    except BaseException as exc:
                        self._drop_empty(key, slot, exc)
                        raise
                if not pin or handle._pin():
                    return handle
            # Evicted between the lookup and the pin: look again (a fresh slot, or reload).

    def _drop_empty(self, key: ModelSpec, slot: Slot, error: BaseException | None = None) -> None:
        """After a failed load (``error``) or one nobody wanted: forget the empty slot, so a
        failing spec leaves nothing behind and the next call retries the load. The callers
        that were waiting on it raise its error (a Ctrl-C of the loading caller's excepted):
        each retried the load in turn, so the last of N waited N loads (minutes when the hub is
        unreachable)."""
        with self._lock:
            if self._slots.get(key) is slot and slot.handle is None:
                del self._slots[key]
                slot.retired = True
                if isinstance(error, Exception):
                    slot.error = error

    def _load_into(self, key: ModelSpec, slot: Slot) -> ModelHandle:
        """Under the slot's lock (and the memory lock with a budget): make room, load, warm up
        after an eviction, publish, then evict others until the device is back under budget."""
        managed = self.pool_config.manages_memory
        if managed:
            self._make_room(key)
        handle = self._load(key)
        published = False
        try:
            if managed:
                self._check_alone(key, handle.device, self._stats[key].footprint_bytes)
            if key in self._needs_warmup and not slot.cancelled:
                self._warm_up(handle, reload=True)
            with self._lock:  # as release(): either it finds the handle, or we find it released
                if not slot.cancelled:
                    slot.loaded_at = time.time()
                    slot.handle = handle
                    published = True
            if not published:  # released while it loaded: freed now, handed to nobody
                raise LoadReleasedError(key, in_flight=False)
        except BaseException:
            self._close_handle(key, handle)
            raise
        self._needs_warmup.discard(key)  # warmed up (a dropped load leaves it for the next)
        if managed:
            self._settle_after_load(key, handle.device)
        else:
            self._note_peak(handle.device)
        self._ensure_reaper()
        return handle

    def model_info(self, spec: ModelSpec) -> tuple[str, str]:
        """Load ``spec`` if needed; its concrete ``(device, dtype)``. Backends that build on
        another shared model (the bi-encoder) ask this through ``ModelProvider``; a release of
        ``spec`` meeting its load starts it over (it does not fail the other model's load)."""
        handle, _ = self._lookup(spec)
        return handle.device, handle.dtype

    def preload(self, *specs: ModelSpec, warmup: bool = True) -> list[ModelHandle]:
        """Load ``specs`` now (e.g. in a FastAPI lifespan) and optionally run one tiny forward pass.

        Warm-up moves first-call costs (kernel choice, allocator growth) out of the first request.
        Under a budget too small for all of them, later specs may evict earlier ones (each was
        warmed up while it was in, and warms up again when it reloads). A handle already warmed
        up is not warmed again (a server's lifespan after a Ray Serve replica preloaded).
        """
        handles = []
        for spec in specs:
            # Warmed up right after its own load, pinned: the next load may evict it (a budget).
            handle = self._get(spec, pin=warmup and self._pins)
            if warmup:
                try:
                    if handle not in self._warm:
                        self._warm_up(handle)
                finally:
                    if self._pins:
                        self._unpin(handle)
            handles.append(handle)
        return handles

    # -- releasing ----------------------------------------------------------------------------

    def release(self, spec: ModelSpec) -> bool:
        """Unload ``spec`` and free its memory. Returns False when it was not loaded.

        In-flight calls on the handle finish first; later calls load the model again.

        Never waits for a load of ``spec`` in flight (one that never ends, e.g. a stalled
        network share or a model server that never answers, would hang a shutdown hook for
        good): that load is released instead, and this returns False (no model was in yet).
        When the load ends its model is freed at once and handed to nobody (``stats()`` counts
        the load and its release); ``get()``/``preload()`` waiting for it raise
        :class:`ModelReleasedError` at once; calls start over with a fresh load (:mod:`.calls`).
        """
        closing = self._take(self.key(spec))
        if not closing:
            return False
        label = closing[0][0].label
        self._close_handles(closing)  # empties it: no name here keeps the handle alive
        logger.info("rag-rerank: released %s", label)
        return True

    def _take(self, key: ModelSpec) -> list[tuple[ModelSpec, ModelHandle]]:
        """Remove ``key``'s slot: ``[(key, its handle)]``, or ``[]`` if it was not loaded (a load
        in flight is dropped when it comes in). A list, for :meth:`_close_handles` to empty."""
        with self._lock:
            slot = self._slots.pop(key, None)
            if slot is None:
                return []
            slot.retired, handle, slot.handle = True, slot.handle, None
            self._forget_keys(key)
            slot.cancelled = handle is None
        if handle is None:
            logger.info("rag-rerank: released %s while it was loading (dropped when in)", key.label)
            return []
        return [(key, handle)]

    def clear(self) -> int:
        """Release every model and stop the idle reaper (the next load starts it again).
        Returns how many models were released. Loads in flight are released without waiting,
        as :meth:`release` does, so a shutdown hook returns even while a load hangs. Memory is
        freed once for all the models (:meth:`_close_handles`), not once per model."""
        self._stop_reaper()
        with self._lock:
            keys = list(self._slots)
        closing = [taken for key in keys for taken in self._take(key)]
        labels = [key.label for key, _ in closing]
        self._close_handles(closing)
        for label in labels:
            logger.info("rag-rerank: released %s", label)
        return len(labels)

    # -- introspection ------------------------------------------------------------------------

    def is_loaded(self, spec: ModelSpec) -> bool:
        slot = self._slots.get(self.key(spec))
        return slot is not None and slot.handle is not None

    def loaded_specs(self) -> list[ModelSpec]:
        return [key for key, slot in list(self._slots.items()) if slot.handle is not None]

    def stats(self) -> dict[str, dict[str, Any]]:
        """Counters per spec label: loads, load_seconds, calls, items, errors, device, dtype, ..."""
        with self._lock:
            items = list(self._stats.items())
        return {stats.spec: self._stats_dict(key, stats) for key, stats in items}

    def spec_stats(self, spec: ModelSpec) -> dict[str, Any]:
        """Counters for one spec (zeros if it was never loaded; asking records nothing), with
        this spec's ``dtype_reason`` (specs sharing a model got its dtype for their own reasons)."""
        key = self.key(spec)
        stats = self._stats.get(key)
        data = self._stats_dict(key, stats if stats is not None else self._new_stats(key))
        return {**data, "dtype_reason": self._spec_reasons.get(spec, data["dtype_reason"])}

    def _stats_dict(self, key: ModelSpec, stats: SpecStats) -> dict[str, Any]:
        """``stats.as_dict()`` with ``loaded`` read from the slots, as :meth:`is_loaded` does: the
        flag a release sets could otherwise land after a concurrent reload of the same spec."""
        data = stats.as_dict()
        slot = self._slots.get(key)
        data["loaded"] = slot is not None and slot.handle is not None
        return data

    def record_passthrough(self, spec: ModelSpec) -> None:
        """Count one adapter call answered in retrieval order (``on_error="passthrough"``)."""
        self._stats_for(self.key(spec)).add(passthrough=1)

    def reset_stats(self) -> None:
        """Zero the call counters; load counters and state are kept."""
        with self._lock:
            all_stats = list(self._stats.values())
        for stats in all_stats:
            stats.update(calls=0, items=0, errors=0, passthrough=0, busy_seconds=0.0)
