"""One scheduled model's engine: accepts requests and guarantees each resolves exactly once.

Why a worker instead of a lock: a plain lock is unfair (measured p95 8.6 s vs p50 405 ms with 8
callers) and cannot merge requests. Callers (threads or asyncio tasks) enqueue a
:class:`~.request.Request` and wait on its future; the worker (:mod:`.worker`) serves the queue
(:mod:`.queue`).

The invariant lives here. The scheduler knows every request it accepted and has not settled
(``_live``). If the worker thread dies (a bug in the engine, a ``BaseException`` a stage did not
contain), :meth:`_crashed` fails every request the worker held, by name of the cause and the
model; requests still queued and untouched are served by a fresh worker started at once; and if
the worker died before taking anything, everything queued fails too, so a crash can never loop.
On :meth:`close` the worker drains the queue, and anything still live after it stopped fails
with :class:`ModelReleasedError`.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any

from .._exitsafe import late_caller, native_section, paused, start_thread
from ..backends.base import LoadedModel
from ..engine_config import EngineConfig
from ..exceptions import InferenceError, ModelReleasedError
from ..stats import Metrics
from .queue import RequestQueue
from .request import Request
from .worker import Worker, engine_of_this_thread

__all__ = ["Scheduler"]

logger = logging.getLogger(__name__)


class Scheduler:
    """Owns one loaded model; see the module docstring."""

    def __init__(
        self, model: LoadedModel, config: EngineConfig, metrics: Metrics, *, name: str = "model"
    ) -> None:
        self.name = name
        self._queue = RequestQueue(name, config, metrics)
        self._worker = Worker(model, self._queue, config, metrics)
        self._thread: threading.Thread | None = None
        self._live: set[Request] = set()  # accepted, not settled; guarded by the queue's lock

    @property
    def token_budget(self) -> int:
        """Padded tokens per pass allowed now (shrinks after an out-of-memory pass)."""
        return self._worker.budget

    def submit(
        self,
        request: Request,
        *,
        wait: bool = True,
        admit_by: float | None = None,
        on_room: Callable[[], None] | None = None,
    ) -> Future[list[Any]] | None:
        """Accept ``request`` (or raise QueueFullError / ModelReleasedError /
        RequestTimeoutError: then it was never accepted); its future resolves to one result per
        item, in input order. ``wait=False``: None instead of waiting for room in a full queue
        (an event loop then awaits ``on_room`` and retries until ``admit_by``; see
        :meth:`RequestQueue.add`). A call from one of this engine's own threads (a backend's
        forward, prepare or finish calling its own model) is refused at once with
        InferenceError: it would wait for a pass that waits for it."""
        if engine_of_this_thread() is self._worker.token:
            raise InferenceError(
                f"{self.name} was called from inside one of its own passes (its forward, "
                "prepare or finish): that call would wait for itself. Call the model from "
                "outside its backend, or give the nested use its own spec (its own load)."
            )
        request.batch_size = min(request.batch_size, self._worker.config.max_batch_size)
        if not request.lengths:
            request.lengths, request.token_scale = self._worker.scale.lengths(request.items)
        request.on_settled = self._forget
        with self._queue.cond:
            if not self._queue.add(
                request, self._ensure_worker, wait=wait, admit_by=admit_by, on_room=on_room
            ):
                # Full and not to wait here (None), or withdrawn while it waited for room.
                return request.future if request.done else None
            self._live.add(request)
        return request.future

    def _forget(self, request: Request) -> None:
        with self._queue.cond:
            self._live.discard(request)

    def _ensure_worker(self) -> None:
        """Under the queue's lock: start a worker thread unless one is running."""
        if self._thread is None or not self._thread.is_alive():
            self._worker.model()  # released: raise instead of starting a worker
            self._thread = threading.Thread(
                target=self._run, name=f"rag-rerank-worker[{self.name}]", daemon=True
            )
            if not start_thread(self._thread):  # before the request is queued: refused whole
                self._thread = None
                raise InferenceError(
                    f"{self.name}: the interpreter is exiting and refused a new thread (CPython "
                    "3.12.0-3.12.2 refuse every one then), so this model's worker cannot start. "
                    "Call the model once before exit (its worker then serves exit hooks)."
                )

    def _run(self) -> None:
        try:
            with native_section():  # interpreter exit waits for its pass (_exitsafe)
                self._worker.serve()
        except BaseException as exc:  # the invariant: no caller is left waiting
            self._crashed(exc)
        finally:
            self._worker.idle = True

    def busy(self) -> bool:
        """Whether the worker has work in hand: a pass may run for a caller that gave up (a
        timeout), which a budget eviction must leave for later rather than wait for while it
        holds the pool's memory lock (an unrelated load then timed out behind it)."""
        return not self._worker.idle

    def _crashed(self, exc: BaseException) -> None:
        logger.error("%s: the engine's worker crashed", self.name, exc_info=exc)
        error = InferenceError(
            f"{self.name}: the engine's worker crashed ({type(exc).__name__}: {exc}); the "
            "requests it held were failed and the next request gets a fresh worker. Please "
            "report this with the traceback logged by rag_rerank_plugins."
        )
        error.__cause__ = exc
        with self._queue.cond:
            self._thread = None
            held = [r for r in self._live if r.started is not None]
            if not held:  # died before taking anything: retrying would crash the same way
                held = list(self._live)
        for request in held:
            request.fail(error)
        stranded: list[Request] = []
        with self._queue.cond:
            if len(self._queue) and not self._queue.closing:
                try:
                    self._ensure_worker()  # untouched requests still queued get a fresh worker
                except InferenceError as refused:  # exiting, and no thread to be had
                    error, stranded = refused, list(self._live)
        for request in stranded:
            request.fail(error)

    def close(self) -> None:
        """Stop accepting work, finish what is queued, and stop the threads."""
        self._queue.close()
        with self._queue.cond:
            thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            # A release in an atexit hook after the exit gate's: the worker is not parked; by a
            # reaper or finalizer (in a section): exit need not wait for this join.
            with late_caller(), paused():
                thread.join()
        with self._queue.cond:
            stranded = list(self._live)
        for request in stranded:
            request.fail(ModelReleasedError(f"{self.name} was released before this request ran."))
        self._queue.drain()
        self._worker.close()
