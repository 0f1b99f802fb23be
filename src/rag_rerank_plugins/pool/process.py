"""Process-wide concerns: the default pool, and what a forked child keeps.

In a child after ``fork`` every lock is new; CUDA/MPS models of the parent are never used (an
MPS child loads its own; a CUDA child cannot use CUDA at all once the parent initialised it, and
:func:`~rag_rerank_plugins.policy.resolve_device` says so with the fix); CPU models are kept and
shared copy-on-write, which is why ``preload()`` before forking CPU workers (gunicorn
``--preload``) saves memory, except models whose runtime cannot run in a child
(``LoadedModel.fork_safe``: OpenVINO's), which the child reloads (from the IR cache). Locks
outside the pool are renewed by :mod:`.._forksafe`. The idle reaper thread is started again in
the child.
"""

from __future__ import annotations

import os
import threading

from ..policy import resolve_device
from ._state import POOLS, Slot, forget_loads_here
from .core import ModelPool

__all__ = ["after_fork", "get_pool"]


def after_fork(pool: ModelPool) -> None:
    """Runs in a forked child: new locks; drop (never touch) the parent's GPU models."""
    old_slots = pool._slots
    old_stats = pool._stats
    for stats in old_stats.values():
        # Every spec's, loaded or not (evicted, released, a GPU orphan): a parent thread (the
        # reaper evicting, a stats() scrape) may have held one at the fork.
        stats.renew_lock()
    orphans = pool._fork_orphans
    pool._init_state()  # new locks; the parent's reaper thread does not exist here
    pool._fork_orphans = orphans
    for key, slot in old_slots.items():
        handle = slot.handle
        if handle is None or handle._retiring:
            continue  # a parent thread was evicting it at the fork: the child reloads
        if handle.device == "cpu" and handle.model.fork_safe:
            # Same weights, shared copy-on-write with the parent; new locks and worker.
            handle._after_fork()
            fresh = Slot()
            fresh.handle = handle
            fresh.loaded_at = slot.loaded_at
            pool._slots[key] = fresh
        else:
            # A CUDA context (or OpenVINO's executors) does not survive fork. Keep the object
            # alive but unused: freeing its tensors here would call into the parent's context.
            pool._fork_orphans.append(handle)
            old_stats[key].update(loaded=False)
    pool._stats = old_stats
    if pool._slots:
        pool._ensure_reaper()  # the inherited CPU models still age out in the child


def _after_fork_in_child() -> None:
    global _default_lock
    _default_lock = threading.Lock()
    # The parent's answers ("auto" -> "cuda:0") do not hold here: CUDA is unusable in a child
    # forked after the parent initialised it, and resolve_device must say so.
    resolve_device.cache_clear()
    forget_loads_here()  # a fork from inside a loader: that load is not running here
    for pool in list(POOLS):
        if isinstance(pool, ModelPool):
            after_fork(pool)


# A reload of this module (IPython's %autoreload, importlib.reload in a notebook) re-runs this
# code in the same module namespace. It must not forget the process-wide pool: a fresh one loaded
# every model again while the old pool's copies stayed in memory (its workers keep them alive);
# nor register the fork hook twice (the child would renew every pool twice).
if hasattr(os, "register_at_fork") and not globals().get("_fork_hook_registered"):
    os.register_at_fork(after_in_child=_after_fork_in_child)
    _fork_hook_registered = True


_default_pool: ModelPool | None = globals().get("_default_pool")
_default_lock: threading.Lock = globals().get("_default_lock") or threading.Lock()


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
