"""One request, from the handle to the backend and back: the object that owns the invariant.

**Every accepted request resolves exactly once**: with its results, or with one typed error
(:class:`~rag_rerank_plugins.exceptions.RagRerankError`), whatever the backend or the worker
does. :meth:`Request.resolve` and :meth:`Request.fail` are the only two ways a request ends; both
go through :meth:`Request._settle`, which is idempotent under the request's lock, so no path can
set a future twice, raise ``InvalidStateError`` in a crash handler, or leave one unset once the
engine has failed what it held.

The handle builds a request once (items checked and cleaned, task, batch-size cap, lane,
deadline, future); the queue, the batcher, the worker and delivery all hold this same object (a
micro-batch is a list of ``(request, item index)`` entries), never a repacked copy.
"""

from __future__ import annotations

import itertools
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import CancelledError, Future
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any, Literal

from ..backends.base import Task
from ..exceptions import RequestTimeoutError

__all__ = ["LANES", "Entry", "Lane", "Request", "timeout_error"]

#: Priority lanes: ``interactive`` (query-time reranking) is served before ``bulk`` (re-embedding a
#: corpus); bulk work that has waited ``EngineConfig.bulk_aging_ms`` is served as interactive.
Lane = Literal["interactive", "bulk"]
LANES: tuple[Lane, ...] = ("interactive", "bulk")

_SEQUENCE = itertools.count()


@dataclass(eq=False)
class Request:
    """A caller's request: items of one task, and everything the engine needs to serve it."""

    task: Task
    items: Sequence[Any]
    batch_size: int
    lane: Lane = "interactive"
    #: Seconds the caller waits (None: as long as it takes); sets :attr:`deadline`.
    timeout: float | None = None
    #: ``time.monotonic()`` after which nobody waits for the result (None: no deadline).
    deadline: float | None = field(default=None, init=False)
    future: Future[list[Any]] = field(default_factory=Future)
    #: Estimated tokens per item (set by the batcher at submit; only batch shapes depend on it).
    lengths: list[int] = field(default_factory=list)
    token_scale: float = 1.0  # the estimate's scale when ``lengths`` were made
    enqueued: float = field(default_factory=time.perf_counter)
    started: float | None = None
    #: Indices of items not yet handed to a pass, in order (put-back items return to the front).
    pending: deque[int] = field(default_factory=deque)
    results: list[Any] = field(default_factory=list)
    remaining: int = 0
    seq: int = field(default_factory=lambda: next(_SEQUENCE))
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)
    _settled: bool = False
    #: False for work no caller asked for (the pool's warm-up pass): kept out of the per-request
    #: figures (latency, queue wait), or a model nobody called reported a latency.
    counted: bool = True
    #: Called once when the request settles (the scheduler forgets it).
    on_settled: Callable[[Request], None] | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        if self.timeout is not None:
            self.deadline = time.monotonic() + self.timeout
        self.results = [None] * len(self.items)
        self.remaining = len(self.items)
        self.pending = deque(range(len(self.items)))

    # -- state ------------------------------------------------------------------------------------

    @property
    def done(self) -> bool:
        """Settled, or withdrawn by its caller (a cancelled future)."""
        return self._settled or self.future.cancelled()

    def expired(self, now: float | None = None) -> bool:
        return self.deadline is not None and (now or time.monotonic()) >= self.deadline

    def remaining_seconds(self) -> float | None:
        return None if self.deadline is None else max(0.0, self.deadline - time.monotonic())

    def effective_lane(self, now: float, aging_s: float) -> Lane:
        """Bulk work that has waited ``aging_s`` is served as interactive: bulk never starves."""
        if self.lane == "bulk" and now - self.enqueued < aging_s:
            return "bulk"
        return "interactive"

    def start(self) -> bool:
        """Mark the request as taken by the worker; False when its caller already withdrew it."""
        with self._lock:
            if self.started is not None:
                return not self._settled
            if self._settled or not self.future.set_running_or_notify_cancel():
                return False
            self.started = time.perf_counter()
            return True

    # -- the only two ways a request ends ---------------------------------------------------------

    def deliver(self, index: int, result: Any) -> bool:
        """Store one item's (validated) result; True when that completed the request."""
        self.results[index] = result
        self.remaining -= 1
        return self.remaining == 0 and self.resolve(self.results)

    def resolve(self, results: list[Any]) -> bool:
        return self._settle(results, None)

    def fail(self, error: BaseException) -> bool:
        return self._settle(None, error)

    def withdraw(self) -> bool:
        """Its caller stopped waiting (timeout or cancellation): settle it so the worker skips
        its remaining items. A queued request is cancelled; a taken one gets CancelledError."""
        self.future.cancel()  # succeeds while queued; then nothing is delivered
        return self.fail(CancelledError())

    def fail_if_expired(self, name: str, now: float | None = None) -> bool:
        """Fail with :class:`RequestTimeoutError` once the deadline has passed."""
        if not self.expired(now):
            return False
        return self.fail(timeout_error(name, self.timeout))

    def _settle(self, results: list[Any] | None, error: BaseException | None) -> bool:
        with self._lock:
            if self._settled:
                return False
            self._settled = True
            future = self.future
            # A withdrawn future is never set (and may already be notified of its
            # cancellation, when set_running_or_notify_cancel would raise).
            if future.cancelled() or (
                self.started is None and not future.set_running_or_notify_cancel()
            ):
                settled = False  # withdrawn by its caller while queued: nothing to deliver
            elif error is not None:
                future.set_exception(error)
                settled = True
            else:
                future.set_result(results if results is not None else [])
                settled = True
        self.pending.clear()
        callback = self.on_settled
        if callback is not None:
            callback(self)
        return settled


#: A request's item on its way through a pass: ``(request, index into request.items)``.
Entry = tuple[Request, int]


def timeout_error(name: str, timeout: float | None) -> RequestTimeoutError:
    # 3 significant digits: after a cold load the engine gets what the load left of the
    # caller's timeout (0.19956630200067593 s reads as 0.2, and 0.1994 as 0.199).
    if timeout is None:
        within = "in time"
    elif timeout >= 99.5:  # whole seconds (never 1e+03)
        within = f"within {timeout:.0f} s"
    else:  # 3 significant digits, never an exponent (1e-07 reads 0.0000001)
        within = f"within {Decimal(f'{timeout:.3g}'):f} s"
    return RequestTimeoutError(
        f"{name}: no result {within} (queued or running). Raise the timeout, "
        "reduce load, or add replicas."
    )
