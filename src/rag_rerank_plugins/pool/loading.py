"""Loading one spec: the backend's loader, timing, footprint, and the handle around it.

A failed load caches nothing (the next call retries), frees what it allocated and is counted in
``load_failures``; a
foreign exception becomes :class:`ModelLoadError` (a loader's KeyboardInterrupt or SystemExit
too, except on the main thread, where it may be the user's Ctrl-C). The footprint is the CUDA
allocator's growth during a load that ran alone (no other load, no call on that device at its
start or end) when it can be measured, else the backend's own count.
"""

from __future__ import annotations

import contextlib
import re
import sys
import threading
import time
import traceback
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, cast

from .._cpu import fork_safe_threads
from .._exitsafe import exiting, native_section
from .._memory import free_memory
from ..backends import get_loader
from ..backends.base import SCORE, Task
from ..exceptions import MissingDependencyError, ModelLoadError, ModelNotFoundError, RagRerankError
from ..policy import configure_torch_threads
from ..spec import ModelSpec
from ._state import LoadReleasedError, PoolState, Slot, fmt_mb, logger

if TYPE_CHECKING:
    from ..backends.base import ModelProvider
    from ..handle import ModelHandle

__all__ = ["POLL_S", "Loading", "StartOver", "Unwanted"]

#: How often a caller waiting for another caller's load looks whether that load was released.
POLL_S = 0.05


class StartOver(Exception):
    """The slot a caller waited on was released before any load began in it."""


class Unwanted(Exception):
    """Every caller a load would serve had stopped waiting before it began: none starts."""


class Loading(PoolState):
    """The load and warm-up of one spec (see the module docstring)."""

    _num_threads: int | None

    def _take_turn(
        self,
        held: contextlib.ExitStack,
        key: ModelSpec,
        slot: Slot,
        wanted: Callable[[], bool] | None = None,
    ) -> None:
        """Take the memory lock (under a budget) then the slot's lock, until ``held`` exits. A
        caller waiting there for someone else's load stops waiting as soon as that load is
        released (it may never end): :class:`LoadReleasedError`; or, when no load had begun in
        the slot, ``StartOver``; or once nobody wants its answer (``wanted()`` false: the
        callers of a shared load all gave up): :class:`Unwanted`."""
        if self.pool_config.manages_memory:
            self._wait_for(self._mem_lock, key, slot, wanted)
            held.callback(self._mem_lock.release)
        self._wait_for(slot.lock, key, slot, wanted)
        held.callback(slot.lock.release)

    @staticmethod
    def _wait_for(
        lock: threading.Lock | threading.RLock,
        key: ModelSpec,
        slot: Slot,
        wanted: Callable[[], bool] | None,
    ) -> None:
        while not lock.acquire(timeout=POLL_S):
            if slot.cancelled:
                if slot.loading:
                    raise LoadReleasedError(key, in_flight=True)
                raise StartOver
            if wanted is not None and not wanted():
                raise Unwanted(key.label)

    def _load(self, key: ModelSpec) -> ModelHandle:
        """Load ``key`` inside an exit-gate section: interpreter exit waits for the load, and for
        what a failed one frees (:mod:`.._exitsafe`), even on a caller's daemon thread."""
        with native_section():
            return self._load_in_section(key)

    def _load_in_section(self, key: ModelSpec) -> ModelHandle:
        stats = self._stats_for(key)
        configure_torch_threads(self._num_threads)
        loader = get_loader(key.backend)
        cuda_before = _cuda_allocated(key.device)
        if cuda_before is not None and self._busy(key.device):
            cuda_before = None  # another model's activations would count as this one's weights
        with self._lock:
            alone = self._loading == 0
            self._loading += 1
            self._load_seq += 1
            seq = self._load_seq
        start = time.perf_counter()
        here, mine = self._loads_here(), (id(self), key)
        here.add(mine)
        try:
            with fork_safe_threads():
                model = loader(key, cast("ModelProvider", self))  # ModelPool is one
        except BaseException as exc:
            stats.add(load_failures=1)
            _drop_partial_load(exc, key.device)
            if exiting() and _refused_at_exit(exc):
                cause = exc.__cause__ if isinstance(exc, RagRerankError) else None
                why = _AT_EXIT.format(exc=cause or exc)
                raise ModelLoadError(key.model, key.backend, why) from exc
            if isinstance(exc, RagRerankError) or _interrupts_caller(exc):
                raise
            raise ModelLoadError(key.model, key.backend, exc) from exc
        finally:
            here.discard(mine)
            with self._lock:
                self._loading -= 1
                alone = alone and self._load_seq == seq  # no other load overlapped this one
        if cuda_before is not None and self._busy(key.device):
            alone = False  # nor a call that is still running
        elapsed = time.perf_counter() - start
        stats.add(loads=1, load_seconds=elapsed)
        stats.update(
            footprint_bytes=_footprint(model, key.device, cuda_before if alone else None),
            loaded=True,
            device=model.device,
            dtype=model.dtype,
            dtype_reason=self._reasons.get(key, ""),
            kernels=model.kernels,
        )
        logger.info(
            "rag-rerank: loaded %s in %.2fs on %s as %s (%s), %s%s",
            key.model,
            elapsed,
            model.device,
            model.dtype,
            stats.dtype_reason,
            fmt_mb(stats.footprint_bytes),
            f", kernels: {model.kernels}" if model.kernels else "",
        )
        from ..handle import ModelHandle

        return ModelHandle(key, model, stats, self.config)

    def _busy(self, device: str) -> bool:
        """Whether a call runs on another model of ``device`` (its activations move the CUDA
        allocator's count: a load measured then falls back to the backend's own count)."""
        return any(handle._in_flight for _, _, handle, _ in self._resident(device))

    def _warm_up(self, handle: ModelHandle, *, reload: bool = False) -> None:
        """One tiny forward pass. After an eviction (``reload``) a failure only logs: the request
        that triggered the reload will report the model's real error, if any. No caller asked
        for it: counted in ``warmups`` alone, never as a call (calls, items, busy seconds, the
        latency histogram and percentiles), or a model nobody called reported calls=1 and a
        latency, and under eviction churn a third of the counted calls were warm-ups."""
        try:
            if handle.kind == "reranker":
                handle._warm_up(SCORE, [("warm-up query", "warm-up passage")])
            else:
                handle._warm_up(Task("embed"), ["warm-up text"])
        except Exception as exc:
            if not reload:
                raise
            logger.warning("rag-rerank: warm-up of %s after a reload failed: %r", handle.spec, exc)
        else:
            self._stats_for(handle.spec).add(warmups=1)
            with self._lock:
                self._warm.add(handle)


#: Why a load failed once the interpreter began to exit (an ``atexit`` hook's first call of a
#: model, a load still running as the script ended): transformers' loader pool, a module import
#: registering its own exit hook and so on refuse then, with errors that sent users astray
#: ("not installed", "operator does not exist").
_AT_EXIT = (
    "the interpreter is exiting, and libraries refuse to start threads or register exit hooks "
    "now ({exc!r}). Load the model before the script ends (ModelPool.preload at startup); an "
    "atexit hook can use models already loaded."
)


_EXIT_REFUSALS = re.compile(
    r"after (interpreter )?shutdown|interpreter shutdown|cannot schedule new futures"
)


def _refused_at_exit(exc: BaseException) -> bool:
    """Whether a load failed because the interpreter exits (a library refusing a thread pool,
    an exit hook, or the import that registers one), not for a reason of its own: a missing
    folder stays :class:`ModelNotFoundError`, whatever the time."""
    if isinstance(exc, ModelNotFoundError):
        return False
    seen: set[int] = set()
    error: BaseException | None = exc
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if isinstance(error, MissingDependencyError) or _EXIT_REFUSALS.search(str(error)):
            return True
        error = error.__cause__ or error.__context__
    return False


def _interrupts_caller(exc: BaseException) -> bool:
    """A Ctrl-C or exit that stops the caller: on the main thread, the only one signals reach.
    Elsewhere (a load thread, a server's worker thread) a KeyboardInterrupt or SystemExit is the
    loader's own and interrupts nobody; escaping an awaiting task it would stop the caller's
    whole event loop, so it becomes :class:`ModelLoadError` like any other failure."""
    return isinstance(exc, (KeyboardInterrupt, SystemExit)) and (
        threading.current_thread() is threading.main_thread()
    )


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


def _drop_partial_load(exc: BaseException, device: str) -> None:
    """Free what a failed load allocated. A loader that fails after building the weights (a bad
    ``score_label``, a head check) leaves them referenced by its finished frames, which the
    exception's traceback keeps, and torch modules sit in reference cycles: the weights stayed
    until a full collection, so a passthrough adapter retrying per request stacked one copy per
    request (on a GPU: until it ran out of memory). The finished frames' locals are cleared
    (tracebacks still print; a post-mortem debugger sees no locals there) and the garbage is
    collected, with the device's cache, as :meth:`release` does."""
    seen: set[int] = set()
    error: BaseException | None = exc
    while error is not None and id(error) not in seen:  # the chain: a loader's own re-raise
        seen.add(id(error))
        traceback.clear_frames(error.__traceback__)
        error = error.__cause__ or error.__context__
    free_memory(device)
