"""Per-model request scheduler: one worker thread owns the model and forms token-budget batches.

Why a worker instead of a lock: a plain lock is unfair (measured p95 8.6 s vs p50 405 ms with 8
callers) and cannot merge requests. Here callers (threads or asyncio tasks) enqueue work and wait
on a future; one worker thread, the only thread that touches the model and its tokenizer:

1. takes pending requests in arrival order (FIFO: nobody starves), optionally waiting
   ``max_wait`` for more to arrive so concurrent requests share forward passes;
2. sorts their items by estimated token length and cuts micro-batches bounded by
   ``max_batch_size`` and ``token_budget`` padded tokens (sorting alone halved padding waste);
3. runs each micro-batch; on out-of-memory it splits the batch in half and retries, down to one
   item; an exception fails only the requests that had items in that batch;
4. completes each request's future as soon as its last item is scored.

A request cancelled while queued is skipped; one cancelled mid-flight finishes and its result is
dropped, so cancellation never wedges the worker or touches other callers' results.
"""

from __future__ import annotations

import functools
import logging
import re
import sys
import threading
import time
from collections import deque
from collections.abc import Hashable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

from .engine_config import EngineConfig
from .exceptions import (
    InferenceError,
    ModelReleasedError,
    OutOfMemoryError,
    QueueFullError,
    RagRerankError,
)

__all__ = ["Metrics", "Scheduler", "estimate_tokens"]

logger = logging.getLogger(__name__)


@functools.cache
def _token_pattern() -> re.Pattern[str]:
    return re.compile(r"\w+|[^\w\s]", re.UNICODE)


def estimate_tokens(text: str) -> int:
    """Cheap subword-count estimate (~1.3 tokens per word or symbol), no tokenizer call.

    Only batch shapes depend on it, never results; the real tokenizer runs once, in the forward.
    """
    if len(text) > 20_000:  # long texts are truncated by the model anyway
        return len(text) // 3
    return int(len(_token_pattern().findall(text)) * 1.3) + 1


def _is_oom(exc: BaseException) -> bool:
    if isinstance(exc, MemoryError):
        return True
    torch = sys.modules.get("torch")
    oom_type = getattr(getattr(torch, "cuda", None), "OutOfMemoryError", None) if torch else None
    if oom_type is not None and isinstance(exc, oom_type):
        return True
    return isinstance(exc, RuntimeError) and "out of memory" in str(exc).lower()


def _percentile(values: Sequence[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))
    return ordered[index]


class Metrics:
    """Counters and recent samples for one model; read by ``ModelPool.stats()``."""

    def __init__(self, window: int, max_batch_size: int) -> None:
        self._lock = threading.Lock()
        self.max_batch_size = max_batch_size
        self.queue_waits: deque[float] = deque(maxlen=window)
        self.latencies: deque[float] = deque(maxlen=window)
        self.forward_passes = 0
        self.forward_seconds = 0.0
        self.batch_items = 0
        self.padded_tokens = 0
        self.real_tokens = 0
        self.oom_splits = 0
        self.rejected = 0
        self.cancelled = 0
        self.queue_depth = 0

    def record_forward(self, items: int, real: int, padded: int, seconds: float) -> None:
        with self._lock:
            self.forward_passes += 1
            self.forward_seconds += seconds
            self.batch_items += items
            self.real_tokens += real
            self.padded_tokens += padded

    def record_request(self, queue_wait: float, latency: float) -> None:
        with self._lock:
            self.queue_waits.append(queue_wait)
            self.latencies.append(latency)

    def bump(self, name: str, by: int = 1) -> None:
        with self._lock:
            setattr(self, name, getattr(self, name) + by)

    def snapshot(self) -> dict[str, Any]:
        with self._lock:
            waits = list(self.queue_waits)
            lats = list(self.latencies)
            passes = self.forward_passes

            def ms(v: float | None) -> float | None:
                return None if v is None else round(v * 1000, 3)

            return {
                "forward_passes": passes,
                "forward_seconds": self.forward_seconds,
                "avg_batch_items": self.batch_items / passes if passes else None,
                "batch_fill": self.batch_items / (passes * self.max_batch_size) if passes else None,
                "avg_tokens_per_batch": self.padded_tokens / passes if passes else None,
                "padding_ratio": (
                    1 - self.real_tokens / self.padded_tokens if self.padded_tokens else None
                ),
                "queue_wait_ms_p50": ms(_percentile(waits, 0.5)),
                "queue_wait_ms_p95": ms(_percentile(waits, 0.95)),
                "latency_ms_p50": ms(_percentile(lats, 0.5)),
                "latency_ms_p95": ms(_percentile(lats, 0.95)),
                "oom_splits": self.oom_splits,
                "rejected": self.rejected,
                "cancelled": self.cancelled,
                "queue_depth": self.queue_depth,
            }


@dataclass(eq=False)
class _Work:
    """One caller's request: items of one kind with the same call arguments."""

    method: str
    items: list[Any]
    lengths: list[int]
    kwargs: dict[str, Any]
    group: Hashable
    future: Future[list[Any]]
    enqueued: float
    batch_size: int
    results: list[Any] = field(default_factory=list)
    remaining: int = 0
    next_index: int = 0
    started: float | None = None
    failed: bool = False

    def __post_init__(self) -> None:
        self.results = [None] * len(self.items)
        self.remaining = len(self.items)


class Scheduler:
    """Owns one loaded model; see the module docstring for the algorithm."""

    def __init__(
        self,
        model: Any,
        config: EngineConfig,
        metrics: Metrics,
        *,
        device: str = "cpu",
        max_tokens: int | None = None,
        name: str = "model",
    ) -> None:
        self._model = model
        self._config = config
        self._metrics = metrics
        self._wait_s = config.wait_seconds(device)
        self._budget = config.tokens_per_batch(device)
        self._max_tokens = max_tokens or 512
        self._name = name
        self._queue: deque[_Work] = deque()
        self._cond = threading.Condition()
        self._closing = False
        self._thread: threading.Thread | None = None

    # -- callers ------------------------------------------------------------------------------

    def submit(
        self,
        method: str,
        items: Sequence[Any],
        kwargs: dict[str, Any] | None = None,
        *,
        batch_size: int | None = None,
    ) -> Future[list[Any]]:
        """Enqueue a request; the future resolves to one result per item, in input order.

        ``batch_size`` caps the forward passes this request's items go into (merged requests
        get the smallest cap among them).
        """
        kwargs = kwargs or {}
        future: Future[list[Any]] = Future()
        work = _Work(
            method=method,
            items=list(items),
            lengths=[self._length(item) for item in items],
            kwargs=kwargs,
            group=(method, tuple(sorted(kwargs.items()))),
            future=future,
            enqueued=time.perf_counter(),
            batch_size=min(batch_size or self._config.max_batch_size, self._config.max_batch_size),
        )
        with self._cond:
            if self._closing:
                raise ModelReleasedError(f"{self._name} is being released.")
            if len(self._queue) >= self._config.max_queue:
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
            self._queue.append(work)
            self._metrics.queue_depth = len(self._queue)
            self._ensure_worker()
            self._cond.notify_all()
        return future

    def _length(self, item: Any) -> int:
        if isinstance(item, str):
            n = estimate_tokens(item) + 2
        else:  # (query, passage) pair
            n = sum(estimate_tokens(part) for part in item) + 3
        return min(n, self._max_tokens)

    def close(self) -> None:
        """Stop accepting work, finish what is queued, and stop the worker."""
        with self._cond:
            self._closing = True
            self._cond.notify_all()
            thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join()
        self._model = None

    # -- worker -------------------------------------------------------------------------------

    def _ensure_worker(self) -> None:
        if self._thread is None or not self._thread.is_alive():
            self._thread = threading.Thread(
                target=self._loop, name=f"rag-rerank-worker[{self._name}]", daemon=True
            )
            self._thread.start()

    def _loop(self) -> None:
        while True:
            with self._cond:
                while not self._queue and not self._closing:
                    self._cond.wait()
                if not self._queue:
                    return  # closing and drained
                if self._wait_s > 0 and not self._closing:
                    deadline = self._queue[0].enqueued + self._wait_s
                    while (
                        self._pending_items() < self._config.max_batch_size
                        and (left := deadline - time.perf_counter()) > 0
                    ):
                        self._cond.wait(left)
                entries = self._take_round()
                self._metrics.queue_depth = len(self._queue)
                self._cond.notify_all()  # room in the queue for waiting submitters
            if entries:
                self._execute(entries)

    def _pending_items(self) -> int:
        return sum(len(w.items) - w.next_index for w in self._queue)

    def _take_round(self) -> list[tuple[_Work, int]]:
        """Items for one round: FIFO over requests of the head's kind, a few batches' worth."""
        cap_items = self._config.max_batch_size * 4
        cap_tokens = self._budget * 4
        entries: list[tuple[_Work, int]] = []
        tokens = 0
        group = None
        kept: deque[_Work] = deque()
        while self._queue:
            work = self._queue.popleft()
            if work.future.cancelled():  # withdrawn while queued
                self._metrics.bump("cancelled")
                continue
            if group is None:
                group = work.group
            full = len(entries) >= cap_items or tokens >= cap_tokens
            if work.group != group or full:
                kept.append(work)
                continue
            if work.started is None:
                if not work.future.set_running_or_notify_cancel():
                    self._metrics.bump("cancelled")
                    continue
                work.started = time.perf_counter()
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

    def _micro_batches(self, entries: list[tuple[_Work, int]]) -> list[list[tuple[_Work, int]]]:
        ordered = sorted(entries, key=lambda e: -e[0].lengths[e[1]])
        batches: list[list[tuple[_Work, int]]] = []
        current: list[tuple[_Work, int]] = []
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

    def _execute(self, entries: list[tuple[_Work, int]]) -> None:
        for batch in self._micro_batches(entries):
            batch = [e for e in batch if not e[0].failed]
            if not batch:
                continue
            work0 = batch[0][0]
            try:
                results = self._forward(work0.method, batch, work0.kwargs)
            except BaseException as exc:
                self._fail({id(w): w for w, _ in batch}.values(), exc)
                continue
            now = time.perf_counter()
            for (work, index), result in zip(batch, results, strict=True):
                work.results[index] = result
                work.remaining -= 1
                if work.remaining == 0 and not work.failed:
                    self._complete(work, now)

    def _forward(
        self, method: str, batch: list[tuple[_Work, int]], kwargs: dict[str, Any]
    ) -> list[Any]:
        """Run one micro-batch; on OOM split it in halves, down to a single item."""
        items = [work.items[index] for work, index in batch]
        lengths = [work.lengths[index] for work, index in batch]
        start = time.perf_counter()
        try:
            results = list(getattr(self._model, method)(items, batch_size=len(items), **kwargs))
        except Exception as exc:
            if not _is_oom(exc):
                raise
            self._free_cache()
            if len(batch) == 1:
                raise OutOfMemoryError(
                    f"{self._name}: out of memory on a single item ({lengths[0]} tokens est.). "
                    "Lower max_length, use a smaller dtype, or move the model to a larger device."
                ) from exc
            self._metrics.bump("oom_splits")
            logger.warning("%s: out of memory on %d items; splitting", self._name, len(batch))
            half = len(batch) // 2
            return self._forward(method, batch[:half], kwargs) + self._forward(
                method, batch[half:], kwargs
            )
        if len(results) != len(items):
            raise InferenceError(
                f"{self._name} returned {len(results)} results for {len(items)} items."
            )
        self._metrics.record_forward(
            len(items), sum(lengths), max(lengths) * len(lengths), time.perf_counter() - start
        )
        return results

    @staticmethod
    def _free_cache() -> None:
        torch = sys.modules.get("torch")
        if torch is not None and torch.cuda.is_available() and torch.cuda.is_initialized():
            torch.cuda.empty_cache()

    def _complete(self, work: _Work, now: float) -> None:
        started = work.started if work.started is not None else now
        self._metrics.record_request(started - work.enqueued, now - work.enqueued)
        if not work.future.done():
            work.future.set_result(work.results)

    def _fail(self, works: Any, exc: BaseException) -> None:
        if not isinstance(exc, RagRerankError):
            wrapped = InferenceError(f"{self._name} failed: {type(exc).__name__}: {exc}")
            wrapped.__cause__ = exc
            exc = wrapped
        for work in works:
            work.failed = True
            if not work.future.done():
                work.future.set_exception(exc)
        with self._cond:  # drop the rest of failed requests still queued
            self._queue = deque(w for w in self._queue if not w.failed)


def wait_result(future: Future[list[Any]], timeout: float | None, name: str) -> list[Any]:
    """Block for a scheduler future; on timeout withdraw the request if it is still queued."""
    from concurrent.futures import TimeoutError as FutureTimeout

    from .exceptions import RequestTimeoutError

    try:
        return future.result(timeout)
    except FutureTimeout:
        future.cancel()
        raise RequestTimeoutError(
            f"{name}: no result within {timeout} s (queued or running). Raise the timeout, "
            "reduce load, or add replicas."
        ) from None
