"""The device worker's stages: prepare, forward, finish, delivery.

The **device worker** is the only thread that runs a scheduled model's forward (or, on the CPU
with ``parallel_forward``, that hands whole passes to the parallel device workers). Each round it

1. takes a few passes' worth of items from the queue (:mod:`.queue`), waiting ``max_wait`` for
   more when it was idle, so concurrent requests share passes;
2. cuts them into length-sorted micro-batches (:mod:`.batching`; the last round queued is cut
   into whole rounds of the parallel CPU device workers, :func:`.shapes.balanced_budget`);
3. keeps up to :data:`LOOKAHEAD` of them being prepared ahead of the device on the **prepare
   thread(s)** (tokenise and collate while the device runs the current pass);
4. launches pass k+1 before finishing pass k (on a GPU the device->host copy of k overlaps the
   kernels of k+1), then delivers each pass's validated results (:mod:`.validate`).

Bulk batches not yet on the device are put back when interactive work waits (they return to
their requests' fronts in the queue), so an interactive request waits for at most the running
pass. A failure fails only the requests with items in that pass; an out-of-memory pass is
recovered by :mod:`.oom`. Anything that escapes these stages is a worker crash, which the
scheduler turns into failed requests and a fresh worker.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from typing import Any

from .._exitsafe import checkpoint, paused, submit
from ..backends.base import EmbedderModel, LoadedModel, Prepared, Task
from ..engine_config import EngineConfig
from ..exceptions import InferenceError, ModelReleasedError, RagRerankError
from ..stats import Metrics
from .batching import Batch, TokenScale, cut_micro_batches
from .oom import OutOfMemory, recover_from_oom, run_alone
from .queue import RequestQueue
from .request import Entry
from .validate import check_results

__all__ = ["LOOKAHEAD", "Worker", "engine_of_this_thread"]

#: Micro-batches prepared ahead of the device. On the simulated device (16 callers): 2 -> 82 %,
#: 3 -> 85 %, 4 -> 89 %, 6 -> 90 % of the pipelined bound; 4 keeps rounds short for fairness.
LOOKAHEAD = 4


#: Per thread: the token of the worker whose engine thread this is (its serve loop, a prepare or
#: device thread). A call into that same model from inside one of its passes would wait for
#: itself, so the scheduler refuses it (:func:`engine_of_this_thread`).
_ENGINE_THREAD = threading.local()


def engine_of_this_thread() -> object | None:
    """The :attr:`Worker.token` of the engine running this thread (None outside engines)."""
    return getattr(_ENGINE_THREAD, "token", None)


class Worker:
    """The stages of one model's engine; :meth:`serve` is one worker thread's loop."""

    def __init__(
        self, model: LoadedModel, queue: RequestQueue, config: EngineConfig, metrics: Metrics
    ) -> None:
        self._model: LoadedModel | None = model
        self.queue = queue
        self.config = config
        self.metrics = metrics
        self.name = queue.name
        self.device = model.device
        self.wait_s = config.wait_seconds(model.device)
        self.budget = config.tokens_per_batch(model.device, model.cpu_token_budget)
        metrics.token_budget = self.budget
        self.scale = TokenScale(model.max_tokens or 512)
        self.dimension = model.dimension if isinstance(model, EmbedderModel) else None
        self.token = object()  # marks this engine's threads; holds nothing alive
        self.prepare_pool: ThreadPoolExecutor | None = None
        if config.pipeline:
            workers = config.prepare_threads(model.device) if model.concurrent_prepare else 1
            self.prepare_pool = ThreadPoolExecutor(
                workers, f"rag-rerank-prepare[{self.name}]", _mark_thread, (self.token,)
            )
        #: Parallel device workers (a CPU model with ``parallel_forward``); None: the worker
        #: thread runs every pass itself.
        self.device_pool: ThreadPoolExecutor | None = None
        self.device_workers, self.device_threads = 1, 1
        if model.parallel_forward and model.device == "cpu":
            workers, _ = config.cpu_device_workers()
            if workers > 1:
                self.device_workers, self.device_threads = workers, config.cpu_threads()
                self.device_pool = ThreadPoolExecutor(
                    workers, f"rag-rerank-device[{self.name}]", _mark_thread, (self.token,)
                )
        self._bound_threads: dict[int, int] = {}  # device-pool thread id -> threads bound
        self.idle = True  # waiting for work with nothing in hand

    def model(self) -> LoadedModel:
        model = self._model
        if model is None:
            raise ModelReleasedError(f"{self.name} was released.")
        return model

    def close(self) -> None:
        for pool in (self.prepare_pool, self.device_pool):
            if pool is not None:
                pool.shutdown(wait=True)
        self._model = None

    # -- the loop ---------------------------------------------------------------------------------

    def serve(self) -> None:
        _mark_thread(self.token)
        formed: deque[Batch] = deque()  # cut into micro-batches, not yet sent to prepare
        ahead: deque[Batch] = deque()  # being prepared (or prepared), in order
        running: Batch | None = None  # launched on the device, not yet finished
        inflight: dict[Future[Any], Batch] = {}  # passes on the parallel CPU device workers
        while True:
            checkpoint()  # between passes: where interpreter exit may stop this thread
            while len(ahead) < LOOKAHEAD:
                if not formed:
                    idle = not ahead and running is None and not inflight
                    if idle:
                        self.idle = True  # nothing in hand (Scheduler.busy)
                        with paused():  # idle: interpreter exit need not wait for it
                            if not self.queue.wait_for_work(self.wait_s):
                                return  # closing and drained
                        self.idle = False
                    entries, lane = self.queue.take_round(self.budget)
                    if not entries:
                        break
                    # The last round queued: even its passes out over the device workers,
                    # so no worker runs a long last pass alone (earlier rounds pipeline).
                    parts = self.device_workers if not len(self.queue) else 1
                    cut = cut_micro_batches(
                        entries, self.config.max_batch_size, self.budget, self.device, parts
                    )
                    formed.extend(Batch(b, lane) for b in cut)
                batch = formed.popleft()
                if self._live(batch):
                    if self.prepare_pool is not None:
                        batch.prepared = submit(
                            self.prepare_pool, self.prepare, batch.task, batch.items
                        )
                    ahead.append(batch)
            if not ahead:
                if running is not None:
                    self._finish(running)
                    running = None
                elif inflight:
                    self._settle(inflight, keep=len(inflight) - 1)
                continue
            if ahead[0].lane == "bulk" and self._interactive_behind(formed, ahead):
                self._yield_to_interactive(formed, ahead)
                continue
            batch = ahead.popleft()
            if not self._live(batch):
                continue
            if self.device_pool is not None:
                # A lone pass (a small request on an idle model) gets every core, as one worker
                # would; a full house gets one share each.
                sharing = min(self.device_workers, len(inflight) + 1 + len(ahead) + len(formed))
                threads = max(1, self.device_threads // sharing)
                inflight[submit(self.device_pool, self._run_pass, batch, threads)] = batch
                self._settle(inflight, keep=self.device_workers - 1)
                continue
            if running is not None and running.lane != "bulk":
                # An interactive pass is delivered before the next pass launches: with a
                # backend whose forward does all the work, finishing it after would make its
                # callers wait one more whole pass.
                self._finish(running)
                running = None
            launched = self._launch(batch)
            if running is not None:  # finish pass k after launching pass k+1
                self._finish(running)
            running = batch if launched else None

    def _live(self, batch: Batch) -> bool:
        """Fail requests past their deadline; False when no entry of ``batch`` is still wanted."""
        now = time.monotonic()
        for request in {id(r): r for r, _ in batch.entries}.values():
            request.fail_if_expired(self.name, now)
        return batch.live()

    def _interactive_behind(self, formed: deque[Batch], ahead: deque[Batch]) -> bool:
        """Interactive work waits behind the bulk pass at the head: in the queue, or already
        taken into a round behind bulk batches (a refill takes whatever lane is first then)."""
        if any(b.lane != "bulk" for queue in (ahead, formed) for b in queue):
            return True
        return self.queue.interactive_waiting()

    def _yield_to_interactive(self, formed: deque[Batch], ahead: deque[Batch]) -> None:
        """Put back every bulk batch not yet on the device; prepared work is dropped and done
        again later, a small price for latency."""
        returned = [e for b in (*ahead, *formed) if b.lane == "bulk" for e in b.entries]
        for batch in ahead:
            if batch.lane == "bulk" and batch.prepared is not None:
                batch.prepared.cancel()
        for queue in (formed, ahead):
            kept = [b for b in queue if b.lane != "bulk"]
            queue.clear()
            queue.extend(kept)
        self.queue.put_back(returned)
        self.metrics.bump("bulk_yields")

    # -- stages -----------------------------------------------------------------------------------

    def prepare(self, task: Task, items: list[Any]) -> Prepared:
        start = time.perf_counter()
        prepared = self.model().prepare(task, items)
        self.metrics.record_prepare(time.perf_counter() - start)
        return prepared

    def _prepared(self, batch: Batch) -> Prepared:
        if batch.prepared is not None:
            return batch.prepared.result()
        return self.prepare(batch.task, batch.items)

    def _launch(self, batch: Batch) -> bool:
        """Prepare (if not done ahead) and launch one pass. False when it already ended (failed
        requests, or an out-of-memory pass that was split and run to completion)."""
        try:
            try:
                prepared = self._prepared(batch)  # tokenize, pin: may run out of memory too
                start = time.perf_counter()
                batch.pending = self.model().forward(batch.task, prepared)
                batch.device_seconds += time.perf_counter() - start
            except Exception as exc:
                if not self.model().is_oom(exc):
                    raise
                raise OutOfMemory from None  # drop the failed pass's traceback and frames
            batch.measure(prepared)
            return True
        except OutOfMemory:
            pass  # handled below, outside every except block
        except BaseException as exc:
            self.fail(batch.entries, exc)
            return False
        recover_from_oom(self, batch)
        return False

    def _finish(self, batch: Batch) -> None:
        try:
            try:
                start = time.perf_counter()
                results = self.model().finish(batch.task, batch.pending)
                batch.device_seconds += time.perf_counter() - start
            except Exception as exc:
                if not self.model().is_oom(exc):
                    raise
                raise OutOfMemory from None
        except OutOfMemory:
            batch.pending = None
            recover_from_oom(self, batch)
            return
        except BaseException as exc:
            batch.pending = None
            self.fail(batch.entries, exc)
            return
        batch.pending = None
        self.deliver(batch, results)

    def _run_pass(self, batch: Batch, threads: int) -> list[Any] | None:
        """One whole pass on a parallel CPU device worker; None when it ran out of memory (the
        failed pass's exception and frames are gone when this returns)."""
        model = self.model()
        ident = threading.get_ident()
        if self._bound_threads.get(ident) != threads:
            model.bind_worker_thread(threads)
            self._bound_threads[ident] = threads
        try:
            prepared = self._prepared(batch)  # may run out of memory too
            start = time.perf_counter()
            raw = model.finish(batch.task, model.forward(batch.task, prepared))
            # Validated here, on the device worker: a generator runs in this thread, not the
            # delivering one.
            results = check_results(self.name, batch.task, raw, len(batch.entries), self.dimension)
        except Exception as exc:
            if not model.is_oom(exc):
                raise
            return None
        batch.device_seconds += time.perf_counter() - start
        batch.measure(prepared)
        return results

    def _settle(self, inflight: dict[Future[Any], Batch], keep: int) -> None:
        """Wait until at most ``keep`` passes are in flight; deliver what finished (on this
        thread). After an out-of-memory pass every other pass is settled first, so the split
        runs alone."""
        oom: list[Batch] = []
        while len(inflight) > keep or (oom and inflight):
            done, _ = wait(list(inflight), return_when=FIRST_COMPLETED)
            for future in done:
                batch = inflight.pop(future)
                error = future.exception()
                if error is not None:
                    self.fail(batch.entries, error)
                elif (results := future.result()) is None:
                    oom.append(batch)
                else:
                    self.deliver(batch, results)
        for batch in oom:
            recover_from_oom(self, batch)

    # -- delivery ---------------------------------------------------------------------------------

    def deliver(self, batch: Batch, results: Any) -> None:
        """Validate one pass's results (count, type, finiteness) and hand them to requests."""
        try:
            checked = check_results(
                self.name, batch.task, results, len(batch.entries), self.dimension
            )
        except BaseException as exc:  # InferenceError; anything else fails this pass alone too
            self.fail(batch.entries, exc)
            return
        self.scale.learn(batch)
        self.metrics.token_scale = self.scale.value
        self.metrics.record_forward(
            len(batch.entries), batch.real, batch.padded, batch.device_seconds
        )
        now = time.perf_counter()
        for (request, index), result in zip(batch.entries, checked, strict=True):
            if request.deliver(index, result) and request.counted:
                started = request.started if request.started is not None else now
                self.metrics.record_request(
                    started - request.enqueued, now - request.enqueued, request.lane
                )

    def fail(self, entries: list[Entry], exc: BaseException) -> None:
        """Fail ``entries``' requests with ``exc``; when they are several requests' and the model
        failed on them (not a release), each request's part runs alone first, and only a part
        that fails again fails its own request: one caller's input (a text that breaks the
        tokenizer, NaN scores) must not fail the callers that happened to share its pass."""
        requests = {id(r): r for r, _ in entries}
        released = isinstance(exc, RagRerankError) and not isinstance(exc, InferenceError)
        if len(requests) > 1 and not released:
            for request in requests.values():
                part = [e for e in entries if e[0] is request and not request.done]
                if part and run_alone(self, part):  # out of memory alone: split as usual
                    recover_from_oom(self, Batch(part))
            return
        if not isinstance(exc, RagRerankError):
            wrapped = InferenceError(f"{self.name} failed: {type(exc).__name__}: {exc}")
            wrapped.__cause__ = exc
            exc = wrapped
        for request in requests.values():
            request.fail(exc)


def _mark_thread(token: object) -> None:
    _ENGINE_THREAD.token = token
