"""The pool's memory budget and idle reaper: which models leave, and when.

With a per-device budget (``PoolConfig.memory_budget_mb``), loading a model evicts the least
recently used models on its device that have no call in flight (before the load when the model's
footprint is known from an earlier load, else right after it, never the model just loaded); a
device left over budget because every model was busy is settled when a call ends. With
``idle_unload_s`` a reaper thread releases models nobody called for that long. An evicted model
reloads on its next call, with a warm-up pass.
"""

from __future__ import annotations

import threading
import time
import weakref
from typing import Any

from .._exitsafe import late_caller, native_section, start_thread
from ..exceptions import ConfigurationError
from ..spec import ModelSpec
from ._state import MB, PoolState, Slot, fmt_mb, logger

__all__ = ["MemoryBudget"]


def _reap_loop(ref: weakref.ref[Any], stop: threading.Event, interval: float) -> None:
    """The reaper thread: holds its pool only weakly, so an unreferenced pool is collected and
    the thread ends within one interval."""
    while not stop.wait(interval):
        with native_section():  # a release frees tensors: not cut short by interpreter exit
            pool = ref()
            if pool is None:
                return
            try:
                pool._reap(stop)
            except Exception:  # never let a bug end the reaper silently
                logger.exception("rag-rerank: idle reaper failed")
            del pool


class MemoryBudget(PoolState):
    """Eviction under a budget and idle unload (see the module docstring)."""

    def _budget(self, device: str) -> int | None:
        return self.pool_config.budget_bytes(device)

    def _recency(self, key: ModelSpec, slot: Slot) -> float:
        stats = self._stats.get(key)
        last = stats.last_used if stats is not None else None
        return max(last or 0.0, slot.loaded_at)

    def _check_alone(self, key: ModelSpec, device: str, footprint: int | None) -> None:
        """A model bigger than its device's whole budget: refuse it or say so."""
        budget = self._budget(device)
        if budget is None or footprint is None or footprint <= budget:
            return
        message = (
            f"{key.label} takes {fmt_mb(footprint)} on {device}, more than the pool's whole "
            f"memory budget there ({fmt_mb(budget)})."
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
                fmt_mb(budget),
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

    def _evict(self, key: ModelSpec, slot: Slot, reason: str, idle: float | None = None) -> bool:
        """Release ``key`` for ``reason`` if ``slot`` is still its loaded slot and no call is in
        flight (atomically: a later call finds the handle retired and reloads); with ``idle``,
        only if it is still unused for that long (the reaper decided before it waited for the
        memory lock, which a load holds until it ends: meanwhile the model may be in use)."""
        with self._lock:
            handle = slot.handle
            if idle is not None and time.time() - self._recency(key, slot) < idle:
                return False
            if self._slots.get(key) is not slot or handle is None or not handle._try_retire():
                return False
            del self._slots[key]
            self._forget_keys(key)
            slot.retired = True  # under _lock, as release(): a waiter reads them together
            slot.handle = None
        stats = self._stats[key]
        stats.add(evictions=1)
        stats.update(last_eviction_reason=reason)
        self._needs_warmup.add(key)
        footprint = stats.footprint_bytes
        device = handle.device
        try:
            self._close_handle(key, handle)
        except Exception:  # evicted all the same: the call that made room must not fail for it
            logger.exception("rag-rerank: closing the evicted %s failed", key.label)
        del handle
        logger.info(
            "rag-rerank: evicted %s from %s (%s; %s; idle for %.1fs)",
            key.label,
            device,
            reason,
            fmt_mb(footprint),
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
            used = sum(r[3] for r in resident)
            # Never below what is in now (a forked child starts its peaks afresh, with models).
            peak = max(self._peak.get(device, 0), used)
            out[device] = {
                "budget_mb": None if budget is None else round(budget / MB, 3),
                "used_mb": round(used / MB, 3),
                "peak_mb": round(peak / MB, 3),
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
            # One finalizer per pool, for the current reaper (clear() and a reload start another).
            if self._reaper_finalizer is not None:
                self._reaper_finalizer.detach()
            self._reaper_finalizer = weakref.finalize(self, stop.set)
            # Started under the lock: clear() (_stop_reaper) joins what it finds published, and
            # joining a thread not started yet raised, leaving every model loaded.
            if not start_thread(thread):  # Python is exiting: no idle unloads now
                self._reaper_thread = None

    def _stop_reaper(self) -> None:
        with self._lock:  # as _ensure_reaper: a reaper started meanwhile is not left running
            self._reaper_stop.set()
            thread, self._reaper_thread = self._reaper_thread, None
        if thread is not None and thread is not threading.current_thread():
            with late_caller():  # clear() in an atexit hook after the exit gate's: not parked
                thread.join(timeout=10)

    def _reap(self, stop: threading.Event | None = None) -> None:
        """One pass of the reaper: release every idle model unused for ``idle_unload_s``.
        Gives up when ``stop`` is set while it waits for the memory lock: a load holds that lock
        until it ends (maybe never), and ``clear()`` joins this thread."""
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
            while not self._mem_lock.acquire(timeout=0.05):
                if stop is not None and stop.is_set():
                    return
            try:
                self._evict(key, slot, "idle", idle=idle)
            finally:
                self._mem_lock.release()
