"""Per-model scheduler: FIFO requests, token-budget micro-batches, and a prepare/forward pipeline.

Why a worker instead of a lock: a plain lock is unfair (measured p95 8.6 s vs p50 405 ms with 8
callers) and cannot merge requests. Callers (threads or asyncio tasks) enqueue work and wait on a
future. Two kinds of threads serve one model:

* the **device worker**, the only thread that runs the model's forward. It

  1. takes pending requests in arrival order (FIFO: nobody starves), optionally waiting
     ``max_wait`` for more when it was idle, so concurrent requests share forward passes;
  2. sorts their items by estimated token length and cuts micro-batches bounded by
     ``max_batch_size`` and the token budget (sorting alone halved padding waste);
  3. keeps up to ``LOOKAHEAD`` micro-batches being prepared ahead of the device;
  4. launches pass k+1 before it finishes pass k (the device->host copy of k then overlaps the
     kernels of k+1 on a GPU) and completes each request's future once its last item is done;

* the **prepare thread** (``EngineConfig.pipeline``), which tokenises and collates the next
  micro-batches while the device runs the current one, like infinity's pre-processing stage and
  TEI's tokenisation workers. One thread per model, so a backend's tokenizer is never shared,
  unless the backend declares ``concurrent_prepare``: then ``EngineConfig.prepare_workers``
  threads prepare the look-ahead batches in parallel (the worker still consumes them in order).
  With the pipeline off, the worker prepares each batch itself (the sequential engine).

* on the CPU, for a backend with ``parallel_forward`` (the sentence-transformers ones), the
  **parallel device workers** (``EngineConfig.cpu_workers``, default one per usable core): the
  worker hands whole passes to them instead of running them itself, each with its share of the
  cores as torch threads. Small matmuls spread over every core spend their time waiting for each
  other; one pass per core does not (MiniLM-L6, 2 cores: 1.7x). A lone pass (a small request on
  an idle model) still gets every core. Results are still delivered by the worker alone, and an
  out-of-memory pass is split after the other passes have finished.

Out of memory: the failed pass is dropped *before* anything is retried. The exception, its
traceback and the frames holding the pass's activations are released (we leave the ``except``
block first, collect garbage, and empty the device cache), then the batch is split in halves,
down to one item. The scheduler also learns: the token budget shrinks to half the failed pass's
padded tokens, so the next request does not hit the same wall. An exception fails only the
requests that had items in that pass. A request cancelled while queued is skipped; one cancelled
mid-flight finishes and its result is dropped.
"""

from __future__ import annotations

import functools
import gc
import logging
import math
import re
import threading
import time
from collections import deque
from collections.abc import Hashable, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from typing import Any, Literal

from .backends.base import LoadedModel, Prepared, Task
from .engine_config import EngineConfig
from .exceptions import (
    InferenceError,
    InvalidInputError,
    ModelReleasedError,
    OutOfMemoryError,
    QueueFullError,
    RagRerankError,
)
from .stats import Metrics

__all__ = ["LANES", "LOOKAHEAD", "Lane", "Scheduler", "estimate_tokens"]

#: Priority lanes: ``interactive`` (query-time reranking) is served before ``bulk`` (re-embedding a
#: corpus); bulk work that has waited ``EngineConfig.bulk_aging_ms`` is served as interactive.
Lane = Literal["interactive", "bulk"]
LANES: tuple[Lane, ...] = ("interactive", "bulk")

logger = logging.getLogger(__name__)

#: Micro-batches prepared ahead of the device. Two would hide tokenisation in a steady state;
#: more bridge the bursts at round boundaries. On the simulated device (16 callers): 2 -> 82 %,
#: 3 -> 85 %, 4 -> 89 %, 6 -> 90 % of the pipelined bound (with 4-pass rounds); 4 keeps rounds
#: short for fairness.
LOOKAHEAD = 4
#: Passes' worth of items the worker takes from the queue at a time (sorted by length within).
#: Every request of a round completes at the round's end, so closed-loop callers resubmit in a
#: burst and the prepare thread idles through the round's last passes; short rounds spread the
#: completions. Simulated device, 16 callers, interleaved: 2 -> 93-98 % of the pipelined bound
#: and ~3 % more pairs/s than 4 (90-96 %); 1 pads more (forward +25 %) and loses pairs/s.
ROUND_PASSES = 2
#: Rounds hold at least this many estimated tokens, so small CPU passes (1024 tokens) are still
#: cut from a whole request sorted by length (1 x 50 passages, 2-core EPYC: a 2048-token round
#: padded 14 % and took 545 ms, a 16384-token one 7.5 % and 463 ms).
ROUND_MIN_TOKENS = 16384
#: How far the token-estimate scale moves towards one prepared pass's real/estimated ratio
#: (geometric: 0.3 closes ~30 % of the gap per pass, so one odd batch does not swing it).
TOKEN_SCALE_RATE = 0.3


@functools.cache
def _token_pattern() -> re.Pattern[str]:
    return re.compile(r"\w+|[^\w\s]", re.UNICODE)


def estimate_tokens(text: str) -> int:
    """Cheap subword-count estimate, no tokenizer call: 2 tokens per 7 characters of ASCII text,
    ~1.3 tokens per word or symbol otherwise (CJK and other scripts pack more tokens per
    character). Both overestimate WordPiece on English by ~30 %, the scale the default token
    budgets were tuned with (a tighter ASCII estimate made CPU passes ~6 % slower).

    Only batch shapes depend on it, never results; the real tokenizer runs once, in prepare. It
    runs in the callers' threads, under the GIL, for every item: the ASCII path costs ~0.1 us
    where the regex costs ~17 us per passage, time the prepare thread would otherwise wait for.
    """
    if len(text) > 20_000:  # long texts are truncated by the model anyway
        return len(text) // 3
    if text.isascii():
        return len(text) * 2 // 7 + 1
    return int(len(_token_pattern().findall(text)) * 1.3) + 1


@dataclass(eq=False)
class _Work:
    """One caller's request: items of one task."""

    task: Task
    items: list[Any]
    lengths: list[int]
    future: Future[list[Any]]
    enqueued: float
    batch_size: int
    lane: Lane = "interactive"
    results: list[Any] = field(default_factory=list)
    remaining: int = 0
    next_index: int = 0
    started: float | None = None
    failed: bool = False
    token_scale: float = 1.0  # the scheduler's token-estimate scale when ``lengths`` were made

    def __post_init__(self) -> None:
        self.results = [None] * len(self.items)
        self.remaining = len(self.items)

    @property
    def group(self) -> Hashable:
        return self.task

    def effective_lane(self, now: float, aging_s: float) -> Lane:
        """Bulk work that has waited ``aging_s`` is served as interactive: bulk never starves."""
        if self.lane == "bulk" and now - self.enqueued < aging_s:
            return "bulk"
        return "interactive"


_Entry = tuple[_Work, int]


@dataclass(eq=False)
class _Batch:
    """A micro-batch on its way through the pipeline."""

    entries: list[_Entry]
    prepared: Future[Prepared] | None = None
    pending: Any = None
    device_seconds: float = 0.0  # time inside the model's forward and finish
    padded: int = 0
    real: int = 0
    real_measured: bool = False  # real came from the tokenizer, not from the estimate
    lane: Lane = "interactive"

    @property
    def task(self) -> Task:
        return self.entries[0][0].task

    @property
    def items(self) -> list[Any]:
        return [work.items[index] for work, index in self.entries]

    def measure(self, prepared: Prepared) -> None:
        """Token counts of the pass: the tokenizer's when prepare reported them."""
        self.padded = prepared.padded_tokens or self.padded_estimate
        self.real = prepared.real_tokens or self.real_estimate
        self.real_measured = bool(prepared.real_tokens)

    @property
    def padded_estimate(self) -> int:
        lengths = [work.lengths[index] for work, index in self.entries]
        return max(lengths) * len(lengths)

    @property
    def real_estimate(self) -> int:
        return sum(work.lengths[index] for work, index in self.entries)


class _OutOfMemory(Exception):
    """Internal signal: a pass ran out of memory (the original error is already dropped)."""


class Scheduler:
    """Owns one loaded model; see the module docstring for the algorithm."""

    def __init__(
        self,
        model: LoadedModel,
        config: EngineConfig,
        metrics: Metrics,
        *,
        name: str = "model",
    ) -> None:
        self._model: LoadedModel | None = model
        self._config = config
        self._metrics = metrics
        self._wait_s = config.wait_seconds(model.device)
        self._budget = config.tokens_per_batch(model.device)
        self._metrics.token_budget = self._budget
        self._max_tokens = model.max_tokens or 512
        self._name = name
        self._queue: deque[_Work] = deque()
        self._cond = threading.Condition()
        self._closing = False
        self._thread: threading.Thread | None = None
        self._prepare_pool: ThreadPoolExecutor | None = None
        #: Parallel device workers (a CPU model with ``parallel_forward``); None: the worker
        #: thread runs every pass itself.
        self._device_pool: ThreadPoolExecutor | None = None
        self._device_workers = 1
        self._device_threads = 1  # torch threads the parallel workers share
        self._worker_threads = threading.local()  # threads each device worker runs with now
        self._aging_s = config.bulk_aging_ms / 1000
        #: Interactive requests queued and not yet taken (read by the worker without the lock).
        self._interactive_waiting = 0
        #: Items of bulk batches put back before reaching the device; the next bulk round
        #: takes them first.
        self._returned: deque[_Entry] = deque()
        #: Real tokens per estimated token (learned; see _learn_token_scale).
        self._token_scale = 1.0
        self._round_lane: Lane = "interactive"

    # -- callers ------------------------------------------------------------------------------

    def submit(
        self,
        task: Task,
        items: Sequence[Any],
        *,
        batch_size: int | None = None,
        priority: Lane = "interactive",
    ) -> Future[list[Any]]:
        """Enqueue a request; the future resolves to one result per item, in input order.

        ``batch_size`` caps the forward passes this request's items go into (merged requests
        get the smallest cap among them). ``priority="bulk"`` requests yield to interactive
        ones: batches of bulk work not yet on the device are put back when interactive work
        arrives, so an interactive request waits for at most the pass that is running.
        """
        if priority not in LANES:
            raise InvalidInputError(f"priority must be 'interactive' or 'bulk', got {priority!r}.")
        future: Future[list[Any]] = Future()
        scale = self._token_scale
        work = _Work(
            task=task,
            items=list(items),
            lengths=[self._length(item, scale) for item in items],
            token_scale=scale,
            future=future,
            enqueued=time.perf_counter(),
            batch_size=min(batch_size or self._config.max_batch_size, self._config.max_batch_size),
            lane=priority,
        )
        with self._cond:
            if self._closing:
                raise ModelReleasedError(f"{self._name} is being released.")
            if len(self._queue) >= self._config.max_queue:
                self._wait_for_room()
            self._queue.append(work)
            if priority == "interactive":
                self._interactive_waiting += 1
            self._metrics.queue_depth = len(self._queue)
            self._ensure_worker()
            self._cond.notify_all()
        return future

    def _wait_for_room(self) -> None:
        """Under the lock: wait ``queue_timeout_s`` for room, else raise QueueFullError."""
        timeout = self._config.queue_timeout_s
        deadline = None if timeout is None else time.monotonic() + timeout
        while len(self._queue) >= self._config.max_queue and not self._closing:
            remaining = 0.0 if deadline is None else deadline - time.monotonic()
            if remaining <= 0:
                self._metrics.bump("rejected")
                raise QueueFullError(
                    f"{self._name}: {len(self._queue)} requests are already waiting "
                    f"(max_queue={self._config.max_queue}). Back off and retry, add "
                    "replicas, or raise EngineConfig.max_queue / queue_timeout_s."
                )
            self._cond.wait(remaining)
        if self._closing:
            raise ModelReleasedError(f"{self._name} is being released.")

    def _length(self, item: Any, scale: float) -> int:
        if isinstance(item, str):
            n = estimate_tokens(item) + 2
        else:  # (query, passage) pair
            n = sum(estimate_tokens(part) for part in item) + 3
        return min(math.ceil(n * scale), self._max_tokens)

    def _learn_token_scale(self, batch: _Batch) -> None:
        """Correct the character-based estimate towards the tokenizer's real counts.

        The estimate is a fixed characters-per-token rule; a tokenizer and a corpus differ from it
        (BERT's WordPiece on short English words: 1.33 estimated tokens per real one), and every
        micro-batch cut by a wrong length wastes passes or padding. Prepared batches report their
        real tokens, so the scale moves a little towards what they show after every pass."""
        # Unscaled estimate: each request's lengths were scaled by the scale of its submit time.
        raw = sum(work.lengths[index] / work.token_scale for work, index in batch.entries)
        if not batch.real_measured or raw <= 0:
            return
        target = min(4.0, max(0.25, batch.real / raw))
        rate = TOKEN_SCALE_RATE
        self._token_scale = self._token_scale ** (1 - rate) * target**rate
        self._metrics.token_scale = self._token_scale

    def close(self) -> None:
        """Stop accepting work, finish what is queued, and stop the threads."""
        with self._cond:
            self._closing = True
            self._cond.notify_all()
            thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join()
        for pool in (self._prepare_pool, self._device_pool):
            if pool is not None:
                pool.shutdown(wait=True)
        self._model = None

    @property
    def token_budget(self) -> int:
        """Padded tokens per pass allowed now (shrinks after an out-of-memory pass)."""
        return self._budget

    # -- device worker ------------------------------------------------------------------------

    def _ensure_worker(self) -> None:
        if self._thread is None or not self._thread.is_alive():
            model = self._model_or_raise()
            if self._config.pipeline and self._prepare_pool is None:
                workers = self._config.prepare_workers if model.concurrent_prepare else 1
                self._prepare_pool = ThreadPoolExecutor(
                    workers, thread_name_prefix=f"rag-rerank-prepare[{self._name}]"
                )
            if model.parallel_forward and model.device == "cpu" and self._device_pool is None:
                workers, _ = self._config.cpu_device_workers()
                if workers > 1:
                    self._device_workers = workers
                    self._device_threads = self._config.cpu_threads()
                    self._device_pool = ThreadPoolExecutor(
                        workers, thread_name_prefix=f"rag-rerank-device[{self._name}]"
                    )
            self._thread = threading.Thread(
                target=self._loop, name=f"rag-rerank-worker[{self._name}]", daemon=True
            )
            self._thread.start()

    def _loop(self) -> None:
        try:
            self._serve()
        except BaseException as exc:  # a bug here must not leave callers waiting forever
            logger.exception("%s: scheduler worker crashed", self._name)
            with self._cond:
                stranded = list(self._queue)
                self._queue.clear()
                self._thread = None
            for work in stranded:
                if not work.future.done() and work.future.set_running_or_notify_cancel():
                    work.future.set_exception(
                        InferenceError(f"{self._name}: the scheduler failed: {exc!r}")
                    )
            raise

    def _serve(self) -> None:
        formed: deque[_Batch] = deque()  # cut into micro-batches, not yet sent to prepare
        ahead: deque[_Batch] = deque()  # being prepared (or prepared), in order
        running: _Batch | None = None  # launched on the device, not yet finished
        inflight: dict[Future[Any], _Batch] = {}  # passes on the parallel CPU device workers
        while True:
            while len(ahead) < LOOKAHEAD:
                if not formed:
                    idle = not ahead and running is None and not inflight
                    entries = self._take_round(block=idle)
                    if entries is None:
                        return  # closing and drained
                    if not entries:
                        break
                    lane = self._round_lane  # set by _take_round (this thread only)
                    formed.extend(_Batch(b, lane=lane) for b in self._micro_batches(entries))
                batch = formed.popleft()
                batch.entries = [e for e in batch.entries if not e[0].failed]
                if batch.entries:
                    self._start_prepare(batch)
                    ahead.append(batch)
            if not ahead:
                if running is not None:
                    self._finish(running)
                    running = None
                elif inflight:
                    self._settle(inflight, keep=len(inflight) - 1)
                continue
            if ahead[0].lane == "bulk" and self._interactive_waiting:
                self._yield_to_interactive(formed, ahead)
                continue
            batch = ahead.popleft()
            if self._device_pool is not None:
                # Passes that will share the cores: a lone pass (a small request on an idle
                # model) gets all of them, as one worker would; a full house gets one share each.
                sharing = min(self._device_workers, len(inflight) + 1 + len(ahead) + len(formed))
                threads = max(1, self._device_threads // sharing)
                inflight[self._device_pool.submit(self._run_pass, batch, threads)] = batch
                self._settle(inflight, keep=self._device_workers - 1)
                continue
            launched = self._launch(batch)
            if running is not None:  # finish pass k after launching pass k+1
                self._finish(running)
            running = batch if launched else None

    def _take_round(self, *, block: bool) -> list[_Entry] | None:
        """Items for one round (FIFO over requests of the head's task, a few batches' worth).

        Blocks for work only when the device is idle; None means closing with nothing left.
        """
        with self._cond:
            if block:
                while not self._queue and not self._returned and not self._closing:
                    self._cond.wait()
                if not self._queue and not self._returned:
                    return None
                if self._wait_s > 0 and not self._closing:
                    deadline = self._queue[0].enqueued + self._wait_s
                    while (
                        self._pending_items() < self._config.max_batch_size
                        and (left := deadline - time.perf_counter()) > 0
                    ):
                        self._cond.wait(left)
            entries = self._take_entries()
            self._metrics.queue_depth = len(self._queue)
            self._cond.notify_all()  # room in the queue for waiting submitters
            return entries

    def _pending_items(self) -> int:
        return sum(len(w.items) - w.next_index for w in self._queue)

    def _take_entries(self) -> list[_Entry]:
        """Under the lock: FIFO over requests of the head's task and lane (interactive first,
        then returned bulk items, then queued bulk), a few passes' worth."""
        # A round is a few passes' worth: enough to sort by length, short enough that a request
        # arriving now is considered after a few passes, not after a long backlog.
        cap_items = self._config.max_batch_size * ROUND_PASSES
        cap_tokens = max(self._budget * ROUND_PASSES, ROUND_MIN_TOKENS)
        now = time.perf_counter()
        interactive = any(
            w.effective_lane(now, self._aging_s) == "interactive" for w in self._queue
        )
        lane: Lane = "interactive" if interactive or not (self._queue or self._returned) else "bulk"
        self._round_lane = lane
        entries: list[_Entry] = []
        tokens = 0
        group = None
        if lane == "bulk":
            while self._returned and len(entries) < cap_items and tokens < cap_tokens:
                work, index = self._returned.popleft()
                if work.failed or work.future.done():
                    continue
                if group is None:
                    group = work.group
                if work.group != group:
                    self._returned.appendleft((work, index))
                    break
                entries.append((work, index))
                tokens += work.lengths[index]
        kept: deque[_Work] = deque()
        while self._queue:
            work = self._queue.popleft()
            if work.future.cancelled():  # withdrawn while queued
                self._metrics.bump("cancelled")
                self._count_taken(work)
                continue
            if group is None and work.effective_lane(now, self._aging_s) == lane:
                group = work.group
            full = len(entries) >= cap_items or tokens >= cap_tokens
            if work.group != group or work.effective_lane(now, self._aging_s) != lane or full:
                kept.append(work)
                continue
            if work.started is None:
                if not work.future.set_running_or_notify_cancel():
                    self._metrics.bump("cancelled")
                    self._count_taken(work)
                    continue
                work.started = time.perf_counter()
                self._count_taken(work)
            while work.next_index < len(work.items) and len(entries) < cap_items:
                if tokens >= cap_tokens and entries:
                    break
                entries.append((work, work.next_index))
                tokens += work.lengths[work.next_index]
                work.next_index += 1
            if work.next_index < len(work.items):
                kept.append(work)
        self._queue.extendleft(reversed(kept))
        return entries

    def _count_taken(self, work: _Work) -> None:
        if work.lane == "interactive":
            self._interactive_waiting -= 1

    def _yield_to_interactive(self, formed: deque[_Batch], ahead: deque[_Batch]) -> None:
        """Put back every bulk batch not yet on the device (its items go first in the next bulk
        round); prepared work is dropped and done again later, a small price for latency."""
        keep_formed = [b for b in formed if b.lane != "bulk"]
        keep_ahead = [b for b in ahead if b.lane != "bulk"]
        returned = [e for b in (*formed, *ahead) if b.lane == "bulk" for e in b.entries]
        for batch in ahead:
            if batch.lane == "bulk" and batch.prepared is not None:
                batch.prepared.cancel()
        formed.clear()
        formed.extend(keep_formed)
        ahead.clear()
        ahead.extend(keep_ahead)
        with self._cond:
            self._returned.extendleft(reversed(returned))
        self._metrics.bump("bulk_yields")

    def _micro_batches(self, entries: list[_Entry]) -> list[list[_Entry]]:
        ordered = sorted(entries, key=lambda e: -e[0].lengths[e[1]])
        batches: list[list[_Entry]] = []
        current: list[_Entry] = []
        longest = 0
        cap = self._config.max_batch_size
        for entry in ordered:
            length = entry[0].lengths[entry[1]]
            longest_if_added = max(longest, length)
            cap_if_added = min(cap, entry[0].batch_size)
            if current and (
                len(current) >= cap_if_added or longest_if_added * (len(current) + 1) > self._budget
            ):
                batches.append(current)
                current, longest_if_added = [], length
                cap_if_added = min(self._config.max_batch_size, entry[0].batch_size)
            current.append(entry)
            longest, cap = longest_if_added, cap_if_added
        if current:
            batches.append(current)
        return batches

    # -- pipeline stages ----------------------------------------------------------------------

    def _model_or_raise(self) -> LoadedModel:
        model = self._model
        if model is None:
            raise ModelReleasedError(f"{self._name} was released.")
        return model

    def _prepare(self, task: Task, items: list[Any]) -> Prepared:
        start = time.perf_counter()
        prepared = self._model_or_raise().prepare(task, items)
        self._metrics.record_prepare(time.perf_counter() - start)
        return prepared

    def _start_prepare(self, batch: _Batch) -> None:
        if self._prepare_pool is not None:
            batch.prepared = self._prepare_pool.submit(self._prepare, batch.task, batch.items)

    def _launch(self, batch: _Batch) -> bool:
        """Prepare (if not done ahead) and launch one pass. False when it already ended (failed
        requests, or an out-of-memory pass that was split and run to completion)."""
        try:
            if batch.prepared is not None:
                prepared = batch.prepared.result()
            else:
                prepared = self._prepare(batch.task, batch.items)
            start = time.perf_counter()
            try:
                batch.pending = self._model_or_raise().forward(batch.task, prepared)
                batch.device_seconds += time.perf_counter() - start
            except Exception as exc:
                if not self._model_or_raise().is_oom(exc):
                    raise
                raise _OutOfMemory from None  # drop the failed pass's traceback and frames
            batch.measure(prepared)
            return True
        except _OutOfMemory:
            pass  # handled below, outside every except block
        except BaseException as exc:
            self._fail(batch.entries, exc)
            return False
        self._recover_from_oom(batch)
        return False

    def _finish(self, batch: _Batch) -> None:
        try:
            try:
                start = time.perf_counter()
                results = self._model_or_raise().finish(batch.task, batch.pending)
                batch.device_seconds += time.perf_counter() - start
            except Exception as exc:
                if not self._model_or_raise().is_oom(exc):
                    raise
                raise _OutOfMemory from None
        except _OutOfMemory:
            batch.pending = None
            self._recover_from_oom(batch)
            return
        except BaseException as exc:
            batch.pending = None
            self._fail(batch.entries, exc)
            return
        batch.pending = None
        self._record(batch)
        self._deliver(batch.entries, results)

    def _run_pass(self, batch: _Batch, threads: int) -> list[Any] | None:
        """One whole pass on a parallel CPU device worker, with ``threads`` compute threads;
        None when it ran out of memory (the failed pass's exception and frames are already gone
        when this returns)."""
        prepared = (
            batch.prepared.result()
            if batch.prepared is not None
            else self._prepare(batch.task, batch.items)
        )
        model = self._model_or_raise()
        if getattr(self._worker_threads, "threads", None) != threads:
            model.bind_worker_thread(threads)
            self._worker_threads.threads = threads
        start = time.perf_counter()
        try:
            results = model.finish(batch.task, model.forward(batch.task, prepared))
        except Exception as exc:
            if not model.is_oom(exc):
                raise
            return None
        batch.device_seconds += time.perf_counter() - start
        batch.measure(prepared)
        return results

    def _settle(self, inflight: dict[Future[Any], _Batch], keep: int) -> None:
        """Wait until at most ``keep`` passes are in flight; deliver what finished (on this
        thread, the only one that touches requests' results). After an out-of-memory pass every
        other pass is settled first, so the split runs alone."""
        oom: list[_Batch] = []
        while len(inflight) > keep or (oom and inflight):
            done, _ = wait(list(inflight), return_when=FIRST_COMPLETED)
            for future in done:
                batch = inflight.pop(future)
                error = future.exception()
                if error is not None:
                    self._fail(batch.entries, error)
                    continue
                results = future.result()
                if results is None:
                    oom.append(batch)
                    continue
                self._record(batch)
                self._deliver(batch.entries, results)
        for batch in oom:
            self._recover_from_oom(batch)

    def _record(self, batch: _Batch) -> None:
        self._learn_token_scale(batch)
        self._metrics.record_forward(
            len(batch.entries), batch.real, batch.padded, batch.device_seconds
        )

    def _deliver(self, entries: list[_Entry], results: list[Any]) -> None:
        if len(results) != len(entries):
            self._fail(
                entries,
                InferenceError(
                    f"{self._name} returned {len(results)} results for {len(entries)} items."
                ),
            )
            return
        now = time.perf_counter()
        for (work, index), result in zip(entries, results, strict=True):
            work.results[index] = result
            work.remaining -= 1
            if work.remaining == 0 and not work.failed:
                self._complete(work, now)

    # -- out of memory --------------------------------------------------------------------------

    def _recover_from_oom(self, batch: _Batch) -> None:
        """Free the failed pass, shrink the budget, then run the batch in halves (iteratively:
        no frame of a failed pass stays alive while its halves run)."""
        self._release_memory()
        self._shrink_budget(batch)
        stack: list[list[_Entry]] = [batch.entries]
        while stack:
            entries = [e for e in stack.pop() if not e[0].failed]
            if not entries:
                continue
            if not self._run_alone(entries):
                continue
            if len(entries) == 1:
                work, index = entries[0]
                self._fail(
                    entries,
                    OutOfMemoryError(
                        f"{self._name}: out of memory on a single item "
                        f"({work.lengths[index]} tokens est.). Lower max_length, use a smaller "
                        "dtype, or move the model to a larger device."
                    ),
                )
                continue
            self._metrics.bump("oom_splits")
            logger.warning("%s: out of memory on %d items; splitting", self._name, len(entries))
            half = len(entries) // 2
            stack.extend([entries[half:], entries[:half]])  # first half runs first

    def _run_alone(self, entries: list[_Entry]) -> bool:
        """Run one pass start to end. True when it ran out of memory (already cleaned up)."""
        batch = _Batch(entries)
        try:
            try:
                model = self._model_or_raise()
                prepared = self._prepare(batch.task, batch.items)
                start = time.perf_counter()
                pending = model.forward(batch.task, prepared)
                batch.measure(prepared)
                results = model.finish(batch.task, pending)
                batch.device_seconds = time.perf_counter() - start
                del pending, prepared
            except Exception as exc:
                if not self._model_or_raise().is_oom(exc):
                    raise
                raise _OutOfMemory from None
        except _OutOfMemory:
            self._release_memory()
            self._shrink_budget(batch)
            return True
        except BaseException as exc:
            self._fail(entries, exc)
            return False
        self._record(batch)
        self._deliver(entries, results)
        return False

    def _release_memory(self) -> None:
        gc.collect()  # tracebacks and activations of the failed pass may sit in cycles
        model = self._model
        if model is not None:
            model.free_cache()

    def _shrink_budget(self, failed: _Batch) -> None:
        """Half the failed pass's padded tokens, but room for its longest item alone."""
        longest = max(work.lengths[index] for work, index in failed.entries)
        learned = max(longest, failed.padded_estimate // 2)
        if learned < self._budget:
            logger.warning(
                "%s: token budget %d -> %d padded tokens per pass after running out of memory",
                self._name,
                self._budget,
                learned,
            )
            self._budget = learned
            self._metrics.token_budget = learned

    # -- results --------------------------------------------------------------------------------

    def _complete(self, work: _Work, now: float) -> None:
        started = work.started if work.started is not None else now
        self._metrics.record_request(started - work.enqueued, now - work.enqueued, work.lane)
        if not work.future.done():
            work.future.set_result(work.results)

    def _fail(self, entries: list[_Entry], exc: BaseException) -> None:
        if not isinstance(exc, RagRerankError):
            wrapped = InferenceError(f"{self._name} failed: {type(exc).__name__}: {exc}")
            wrapped.__cause__ = exc
            exc = wrapped
        works = {id(w): w for w, _ in entries}.values()
        for work in works:
            work.failed = True
            if not work.future.done():
                work.future.set_exception(exc)
        with self._cond:  # drop the rest of failed requests still queued
            self._queue = deque(w for w in self._queue if not w.failed)
