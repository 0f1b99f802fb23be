"""The queue of one model: admission, lanes with aging, and rounds of work for the worker.

Requests wait here in arrival order. A request stays queued while it has items no pass has taken
(``Request.pending``); bulk items put back for interactive work return to their own request's
front, so aging, cancellation and deadlines see everything waiting, yielded work included. One
lock (the condition) guards the queue; every decision (is interactive work waiting? which lane
does the next round serve?) is computed from the queue itself, never from a counter that could
go stale.
"""

from __future__ import annotations

import bisect
import threading
import time
from collections.abc import Callable

from ..engine_config import EngineConfig
from ..exceptions import ModelReleasedError, QueueFullError
from ..stats import Metrics
from .request import Entry, Lane, Request, timeout_error

__all__ = ["ROUND_MIN_TOKENS", "ROUND_PASSES", "RequestQueue"]

#: Passes' worth of items the worker takes from the queue at a time (sorted by length within).
#: Every request of a round completes at the round's end, so closed-loop callers resubmit in a
#: burst; short rounds spread the completions (simulated device, 16 callers: 2 -> 93-98 % of the
#: pipelined bound, ~3 % more pairs/s than 4; 1 pads more and loses pairs/s).
ROUND_PASSES = 2
#: Rounds hold at least this many estimated tokens, so small CPU passes (1024 tokens) are still
#: cut from a whole request sorted by length (1 x 50 passages, 2-core EPYC: a 2048-token round
#: padded 14 % and took 545 ms, a 16384-token one 7.5 % and 463 ms).
ROUND_MIN_TOKENS = 16384


class RequestQueue:
    """Waiting requests of one model, ordered by arrival (see the module docstring)."""

    def __init__(self, name: str, config: EngineConfig, metrics: Metrics) -> None:
        self.name = name
        self.config = config
        self.metrics = metrics
        self.cond = threading.Condition()
        self.closing = False
        self._requests: list[Request] = []  # sorted by Request.seq
        self._aging_s = config.bulk_aging_ms / 1000
        #: Event-loop callers waiting for room (:meth:`add` with ``on_room``): called, then
        #: forgotten, whenever room may have freed or the queue closes.
        self._on_room: list[Callable[[], None]] = []

    def __len__(self) -> int:
        return len(self._requests)

    # -- admission (callers' threads) -------------------------------------------------------------

    def add(
        self,
        request: Request,
        start_worker: Callable[[], None],
        *,
        wait: bool = True,
        admit_by: float | None = None,
        on_room: Callable[[], None] | None = None,
    ) -> bool:
        """Admit ``request`` (waiting ``queue_timeout_s`` for room if full, never past the
        request's own deadline); wake the worker. False: not admitted, because ``wait`` is False
        and admission would wait (an event loop must not block here: ``on_room`` is called
        once when room may have freed, and a retry past ``admit_by``, the monotonic end of its
        wait, raises as a thread's wait would), or because its caller withdrew it while it
        waited."""
        with self.cond:
            if self.closing:
                raise ModelReleasedError(f"{self.name} is being released.")
            # Requests whose callers gave up (timed out, cancelled) hold no room: otherwise they
            # refused live callers (QueueFullError) until the worker's next look at the queue.
            self._prune(time.monotonic())
            if len(self._requests) >= self.config.max_queue:
                timeout = self.config.queue_timeout_s
                if not wait and timeout:
                    now = time.monotonic()
                    if admit_by is None or (now < admit_by and not request.expired(now)):
                        if on_room is not None:
                            self._on_room.append(on_room)
                        return False
                    if request.expired(now):  # the caller's timeout covers the whole call
                        raise timeout_error(self.name, request.timeout)
                    timeout = 0.0  # its wait is over: raise as a thread's wait would
                self._wait_for_room(request, timeout)
                if request.done:
                    return False
            start_worker()  # first: a worker that cannot start refuses the request whole
            self._requests.append(request)
            self.metrics.queue_depth = len(self._requests)
            self.cond.notify_all()
            return True

    def _wait_for_room(self, request: Request, timeout: float | None) -> None:
        deadline = None if timeout is None else time.monotonic() + timeout
        while len(self._requests) >= self.config.max_queue and not self.closing:
            if request.done:
                return
            now = time.monotonic()
            left = 0.0 if deadline is None else deadline - now
            if left <= 0:
                self.metrics.bump("rejected")
                raise QueueFullError(
                    f"{self.name}: {len(self._requests)} requests are already waiting "
                    f"(max_queue={self.config.max_queue}). Back off and retry, add "
                    "replicas, or raise EngineConfig.max_queue / queue_timeout_s."
                )
            if request.expired(now):  # the caller's timeout covers the whole call
                raise timeout_error(self.name, request.timeout)
            if request.deadline is not None:
                left = min(left, request.deadline - now)
            self.cond.wait(min(left, 0.1))  # a caller giving up notifies no one: look again
            self._prune(time.monotonic())
        if self.closing:
            raise ModelReleasedError(f"{self.name} is being released.")

    # -- the worker's side ------------------------------------------------------------------------

    def _prune(self, now: float) -> None:
        """Under the lock: drop requests that ended (withdrawn, failed, or past their deadline)."""
        kept = []
        for request in self._requests:
            if request.future.cancelled() and request.started is None:
                # Settles it; the caller is gone. Not counted here: the handle counts its
                # caller's cancellation once (a timeout is an error, not a cancellation).
                request.withdraw()
            elif not (request.done or request.fail_if_expired(self.name, now)) and request.pending:
                kept.append(request)
        if len(kept) != len(self._requests):
            self._requests = kept
            self.metrics.queue_depth = len(kept)
            self.cond.notify_all()  # room for waiting submitters
            self._room_freed()

    def interactive_waiting(self) -> bool:
        """Is interactive work (or bulk work past its aging) waiting? Decides whether queued
        bulk passes yield. Computed from the queue, so it cannot go stale."""
        with self.cond:
            self._prune(time.monotonic())
            now = time.perf_counter()
            return any(
                r.effective_lane(now, self._aging_s) == "interactive" for r in self._requests
            )

    def wait_for_work(self, wait_s: float) -> bool:
        """Block until work is queued (False: closing and drained); then wait up to ``wait_s``
        after the oldest request for more, so concurrent requests share passes."""
        with self.cond:
            while True:
                self._prune(time.monotonic())
                if self._requests or self.closing:
                    break
                self.cond.wait()
            if not self._requests:
                return False
            if wait_s > 0 and not self.closing:
                deadline = self._requests[0].enqueued + wait_s
                while (
                    sum(len(r.pending) for r in self._requests) < self.config.max_batch_size
                    and (left := deadline - time.perf_counter()) > 0
                ):
                    self.cond.wait(left)
            return True

    def take_round(self, budget: int) -> tuple[list[Entry], Lane]:
        """A few passes' worth of items: FIFO over requests of the first eligible request's task
        in the lane served now (interactive, which includes aged bulk, before bulk)."""
        cap_items = self.config.max_batch_size * ROUND_PASSES
        cap_tokens = max(budget * ROUND_PASSES, ROUND_MIN_TOKENS)
        with self.cond:
            self._prune(time.monotonic())
            now = time.perf_counter()
            lanes = {id(r): r.effective_lane(now, self._aging_s) for r in self._requests}
            lane: Lane = "interactive" if "interactive" in lanes.values() else "bulk"
            entries: list[Entry] = []
            tokens = 0
            group = None
            for request in self._requests:
                if lanes[id(request)] != lane or len(entries) >= cap_items:
                    continue
                if group is None:
                    group = request.task
                if request.task != group or not request.start():
                    continue
                while request.pending and len(entries) < cap_items:
                    if tokens >= cap_tokens and entries:
                        break
                    index = request.pending.popleft()
                    entries.append((request, index))
                    tokens += request.lengths[index]
            self._prune(now)  # fully taken requests leave the queue
            return entries, lane

    def put_back(self, entries: list[Entry]) -> None:
        """Return items not yet on the device to their requests' fronts, in order."""
        with self.cond:
            by_request: dict[int, tuple[Request, list[int]]] = {}
            for request, index in entries:
                by_request.setdefault(id(request), (request, []))[1].append(index)
            for request, indices in by_request.values():
                if request.done:
                    continue
                if not request.pending:  # it had left the queue: back in arrival order
                    bisect.insort(self._requests, request, key=lambda r: r.seq)
                request.pending.extendleft(reversed(sorted(indices)))
            self.metrics.queue_depth = len(self._requests)
            self.cond.notify_all()

    def drain(self) -> list[Request]:
        """Under no lock: remove and return every queued request (the crash and close paths)."""
        with self.cond:
            requests, self._requests = self._requests, []
            self.metrics.queue_depth = 0
            self.cond.notify_all()
            self._room_freed()
            return requests

    def close(self) -> None:
        with self.cond:
            self.closing = True
            self.cond.notify_all()
            self._room_freed()

    def _room_freed(self) -> None:
        """Under the lock: wake every event-loop caller waiting for room (they retry)."""
        waiters, self._on_room = self._on_room, []
        for wake in waiters:
            wake()
