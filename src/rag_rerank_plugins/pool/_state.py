"""The pool's shared state: slots, locks and counters every part of the pool reads.

:class:`PoolState` holds what loading, releasing, the memory budget and the calls share, and
the helpers they all use (:meth:`PoolState._stats_for`, :meth:`PoolState._close_handles`), so
each concern lives in its own module as a small mixin over one state.

Lock discipline: ``_lock`` guards the dicts (``_slots``, ``_stats``, ``_keys``); ``_mem_lock``
(re-entrant; taken before any slot lock) serialises loads under a budget and evictions; each
slot's lock serialises the load of one spec (not re-entrant: a loader asking for its own spec
is refused before it would wait on it, :meth:`PoolState._refuse_own_load`). Counters of a spec
are changed only through :meth:`SpecStats.add` / :meth:`SpecStats.update`, under the stats'
own lock.
"""

from __future__ import annotations

import logging
import threading
import weakref
from collections.abc import Callable
from concurrent.futures import Future
from typing import TYPE_CHECKING, Any

from .._memory import free_memory, release_window
from ..backends import backend_info
from ..engine_config import EngineConfig, PoolConfig
from ..exceptions import ModelLoadError, ModelReleasedError
from ..spec import ModelSpec

if TYPE_CHECKING:
    from ..handle import ModelHandle
    from ..stats import SpecStats

__all__ = [
    "MB",
    "POOLS",
    "LoadReleasedError",
    "PoolState",
    "SharedLoad",
    "Slot",
    "fmt_mb",
    "forget_loads_here",
    "fresh_error",
]

logger = logging.getLogger("rag_rerank_plugins.pool")
MB = 1024 * 1024


#: Every pool alive in this process (a forked child renews their locks).
POOLS: weakref.WeakSet[PoolState] = weakref.WeakSet()


def fmt_mb(nbytes: int | None) -> str:
    return "unknown" if nbytes is None else f"{nbytes / MB:.0f} MB"


class Slot:
    """Per-spec load lock plus the handle once loaded.

    ``retired``: the slot left the pool (released, evicted, or its load failed); a caller that
    waited on it starts again with a fresh slot, or raises ``error`` when its load failed.
    ``cancelled``: released *before* a model was in, i.e. while its load ran or before it
    started: ``release()`` does not wait for a load (one that never ends would hang every
    shutdown hook), so the load drops its model the moment it ends and whoever waited on it gets
    :class:`ModelReleasedError`. Both are set under the pool's ``_lock``, together with
    ``handle``.
    """

    __slots__ = ("cancelled", "error", "handle", "loaded_at", "loading", "lock", "retired")

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.handle: ModelHandle | None = None
        self.retired = False
        self.cancelled = False
        self.loading = False  # a load began in this slot (a waiter then waits for that load)
        self.loaded_at = 0.0  # time.time() of the load: an unused model's idle clock starts here
        self.error: Exception | None = None  # its load failed: for the callers waiting on it


class SharedLoad(Future["ModelHandle"]):
    """:meth:`~.core.ModelPool._get` of one spec in a thread, for its ``waiters`` (counted
    under the pool's lock); the load begins only while someone waits."""

    waiters = 0
    #: The handle the load pinned for its waiters (a pool that pins), until the last leaves.
    pinned: ModelHandle | None = None


def fresh_error(error: BaseException) -> BaseException:
    """A copy of ``error`` (class, args, attributes) for one of the callers that waited on the
    load it failed, raised ``from`` it. One instance raised in many threads gathered each
    raiser's frames in its traceback, and with them each caller's request: 1205 frames for 200
    callers, 107 MB held by one kept error of 50 callers. The original is not copied if its class
    cannot be built from its args."""
    try:
        fresh = type(error).__new__(type(error), *error.args)
        fresh.__dict__.update(error.__dict__)
    except Exception:
        return error
    return fresh


class LoadReleasedError(ModelReleasedError):
    """A load was released (``release``/``clear``) before its model was in. ``in_flight``: it
    was still running when the caller stopped waiting for it (it may never end). ``get()`` and
    ``preload()`` raise it to whoever ran or waited for that load; calls (``score_pairs``,
    ``embed``, the adapters) start over with a fresh load instead (:mod:`.calls`)."""

    def __init__(self, key: ModelSpec, *, in_flight: bool) -> None:
        self.in_flight = in_flight
        state = "while it was loading" if in_flight else "while it loaded"
        super().__init__(
            f"{key.label} was released (pool.release or pool.clear) {state}: its model is "
            "dropped unused. Call again to load it afresh, or do not release models that calls "
            "still need."
        )


#: Per thread: (pool id, key) of the loads whose loader runs in this thread now. A loader asking
#: its own pool for the model it is loading would wait for its own load (the slot's lock, or the
#: shared load's future): :meth:`PoolState._refuse_own_load` refuses that at once.
_LOADING_HERE = threading.local()


def forget_loads_here() -> None:
    """In a forked child: the forking thread's loads do not run here (the pool was renewed)."""
    _LOADING_HERE.keys = None


class PoolState:
    """State shared by the pool's parts (see the module docstring)."""

    config: EngineConfig
    pool_config: PoolConfig
    _pins: bool
    _reaper_finalizer: weakref.finalize[[], Any] | None = None  # see MemoryBudget._ensure_reaper

    def _init_state(self) -> None:
        self._lock = threading.Lock()
        self._slots: dict[ModelSpec, Slot] = {}
        self._keys: dict[ModelSpec, ModelSpec] = {}
        #: What a spec resolved to before its model was unloaded (_forget_keys): counters of a
        #: call that ended while its spec was not resolved again still find their stats.
        self._last_keys: dict[ModelSpec, ModelSpec] = {}
        self._stats: dict[ModelSpec, SpecStats] = {}
        self._reasons: dict[ModelSpec, str] = {}  # per key: the first spec's (stats())
        self._spec_reasons: dict[ModelSpec, str] = {}  # per spec as given (spec_stats())
        self._fork_orphans: list[ModelHandle] = []
        #: Per spec as given: the load its callers with a deadline wait for (:mod:`.waits`).
        self._shared_loads: dict[ModelSpec, SharedLoad] = {}
        # Loads (under a budget) and evictions hold _mem_lock, taken before any slot lock.
        # Re-entrant: a loader may load another spec (the bi-encoder's embedder).
        self._mem_lock = threading.RLock()
        self._peak: dict[str, int] = {}
        self._over: set[str] = set()  # devices left over budget (every model was busy)
        self._needs_warmup: set[ModelSpec] = set()
        # Handles warmed up once (preload() again, e.g. a server lifespan after a Ray Serve
        # replica's __init__ preloaded, must not run another pass while it reads "loading").
        self._warm: weakref.WeakSet[ModelHandle] = weakref.WeakSet()
        self._loading = 0
        self._load_seq = 0
        self._reaper_thread: threading.Thread | None = None
        self._reaper_stop = threading.Event()

    # Implemented by the parts that own them (declared here so each part type-checks alone).
    def _get(
        self,
        spec: ModelSpec,
        *,
        pin: bool,
        start_over: bool = False,
        wanted: Callable[[], bool] | None = None,
    ) -> ModelHandle:
        raise NotImplementedError  # core.ModelPool._get

    def _settle(self) -> None:
        raise NotImplementedError  # budget.MemoryBudget._settle

    def key(self, spec: ModelSpec) -> ModelSpec:
        raise NotImplementedError  # core.ModelPool.key

    def _loads_here(self) -> set[tuple[int, ModelSpec]]:
        """The loads running in this thread (:data:`_LOADING_HERE`), created on first use."""
        here = getattr(_LOADING_HERE, "keys", None)
        if here is None:
            here = _LOADING_HERE.keys = set()
        return here

    def _loading_in_this_thread(self) -> bool:
        """Whether this thread is running a loader of this pool (its calls then load inline:
        under a budget the loader holds the memory lock a load thread would wait for)."""
        return any(pool == id(self) for pool, _ in getattr(_LOADING_HERE, "keys", None) or ())

    def _refuse_own_load(self, spec: ModelSpec) -> None:
        """Raise when this thread is running the loader of ``spec`` in this pool."""
        if not self._loading_in_this_thread():
            return
        if (id(self), self.key(spec)) in _LOADING_HERE.keys:  # any spec of the same key
            raise ModelLoadError(
                spec.model,
                spec.backend,
                "its loader asked the pool for the model it is loading, which would wait for "
                "its own load. A loader may use other specs; use this one once the load "
                "returned (e.g. warm it up in the backend's own constructor).",
            )

    def _stats_for(self, key: ModelSpec) -> SpecStats:
        with self._lock:
            stats = self._stats.get(key)
            if stats is None:
                stats = self._stats[key] = self._new_stats(key)
            return stats

    @staticmethod
    def _new_stats(key: ModelSpec) -> SpecStats:
        """Zeroed counters for ``key`` (not recorded: :meth:`_stats_for` does that)."""
        from ..stats import SpecStats

        return SpecStats(
            spec=key.label,
            backend=key.backend,
            model=key.model,
            kind=backend_info(key.backend).kind,
            device=key.device,
            dtype=key.dtype,
        )

    def _forget_keys(self, key: ModelSpec) -> None:
        """Under ``_lock``, once ``key`` is unloaded: forget which specs resolved to it, so the
        next call resolves them again. A local path is made concrete (symlinks, the working
        directory) when resolved: a re-pointed "current" symlink (a blue/green deploy) or a
        relative path after a chdir reloaded the old folder after ``release()``, for good."""
        for spec in [given for given, resolved in self._keys.items() if resolved == key]:
            self._last_keys[spec] = self._keys.pop(spec)
            self._spec_reasons.pop(spec, None)

    def _close_handle(self, key: ModelSpec, handle: ModelHandle) -> None:
        self._close_handles([(key, handle)])

    def _close_handles(self, closing: list[tuple[ModelSpec, ModelHandle]]) -> None:
        """Close ``closing``'s handles, then free their memory once per device.

        Once, not once per handle: freeing runs a full garbage collection, which takes a large
        part of a second in a big heap (a service that has run a while), so a ``clear()`` of
        several models paid it per model. Empties ``closing``: no reference to a closed handle
        may outlive the collection. One handle's failed close does not keep the others open; the
        first error is raised once all are closed."""
        devices = sorted({handle.device for _, handle in closing})
        # oneDNN's kernel cache and glibc's arenas are process-wide: give them back only when no
        # CPU model of this pool is left (see _memory).
        last_cpu = "cpu" in devices and not self._resident("cpu")
        failed: list[Exception] = []
        with release_window(last_cpu):
            while closing:  # popped: no local name keeps a handle alive
                try:
                    self._close_one(*closing.pop(0))
                except Exception as exc:  # a backend's close failed: still close the others
                    failed.append(exc)
            for device in devices:
                free_memory(device, kernel_caches=last_cpu and device == "cpu")
        if failed:
            raise failed[0]

    def _close_one(self, key: ModelSpec, handle: ModelHandle) -> None:
        try:
            handle._close()
        finally:  # out of the pool either way: counted as released
            stats = self._stats.get(key)
            if stats is not None:
                stats.update(loaded=False)
                stats.add(releases=1)

    def _resident(self, device: str) -> list[tuple[ModelSpec, Slot, ModelHandle, int]]:
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
