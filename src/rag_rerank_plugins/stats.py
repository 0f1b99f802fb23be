"""Counters of loaded models, in one place: :class:`SpecStats` per spec, :class:`Metrics` per model.

``SpecStats`` survives releases (so reloads show as ``loads > 1``) and is what
``ModelPool.stats()`` returns, merged with the engine's :class:`Metrics` snapshot (forward passes,
batch fill, padding, queue wait and latency percentiles and histograms, OOM splits, the learned
token budget). The Prometheus collector (:mod:`rag_rerank_plugins.metrics`) and the server read
the same dicts.
"""

from __future__ import annotations

import bisect
import math
import threading
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field, fields
from typing import Any

from .spec import redact_urls

__all__ = ["LATENCY_BUCKETS", "Histogram", "Metrics", "SpecStats", "percentile"]

#: Upper bounds (seconds) of the latency and queue-wait histograms: 1 ms to 30 s, roughly x2.5
#: per step (a CPU rerank of 10 passages takes tens of ms, a GPU batch a few, a queue under
#: overload seconds).
LATENCY_BUCKETS: tuple[float, ...] = (
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
)  # fmt: skip


def percentile(values: Sequence[float], q: float) -> float | None:
    """The nearest-rank ``q`` quantile of ``values`` (None when empty)."""
    if not values:
        return None
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))
    return ordered[index]


class Histogram:
    """Counts per bucket since the model was first loaded (Prometheus' histogram, cumulative in
    :meth:`snapshot`). Not locked itself: :class:`Metrics` observes under its own lock, so one
    observation costs a bisect over 14 floats and two additions."""

    def __init__(self, bounds: tuple[float, ...] = LATENCY_BUCKETS) -> None:
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)  # the last one is +Inf
        self.sum = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.bounds, value)] += 1
        self.sum += value

    def snapshot(self) -> dict[str, Any]:
        """``buckets``: ``(upper bound, cumulative count)`` pairs ending with ``inf``; ``sum``,
        ``count``."""
        cumulative = []
        total = 0
        for bound, count in zip((*self.bounds, math.inf), self.counts, strict=True):
            total += count
            cumulative.append((bound, total))
        return {"buckets": cumulative, "sum": self.sum, "count": total}


class Metrics:
    """Engine counters and recent samples for one model; read by ``ModelPool.stats()``.

    ``forward_seconds`` is device-worker time in passes; ``prepare_seconds`` is CPU time spent
    tokenising ahead of them (overlapped with forwards when the pipeline is on).
    """

    def __init__(self, window: int, max_batch_size: int) -> None:
        self._lock = threading.Lock()
        self.max_batch_size = max_batch_size
        self.queue_waits: deque[float] = deque(maxlen=window)
        self.latencies: deque[float] = deque(maxlen=window)
        #: Queue waits per priority lane ("interactive", "bulk").
        self.lane_waits: dict[str, deque[float]] = {
            lane: deque(maxlen=window) for lane in ("interactive", "bulk")
        }
        #: Every request since the first load (not windowed), for Prometheus histograms.
        self.latency_histogram = Histogram()
        self.queue_wait_histogram = Histogram()
        self.forward_passes = 0
        self.forward_seconds = 0.0
        self.batch_items = 0
        self.padded_tokens = 0
        self.real_tokens = 0
        self.prepare_seconds = 0.0
        self.oom_splits = 0
        #: Padded tokens per pass the scheduler currently allows (shrinks after an OOM).
        self.token_budget: int | None = None
        #: Real tokens per estimated token, learned from prepared passes (batching uses it).
        self.token_scale = 1.0
        self.bulk_yields = 0  # times bulk batches were put back for interactive work
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

    def record_prepare(self, seconds: float) -> None:
        with self._lock:
            self.prepare_seconds += seconds

    def record_request(self, queue_wait: float, latency: float, lane: str = "interactive") -> None:
        with self._lock:
            self.queue_waits.append(queue_wait)
            self.latencies.append(latency)
            self.lane_waits[lane].append(queue_wait)
            self.latency_histogram.observe(latency)
            self.queue_wait_histogram.observe(queue_wait)

    def bump(self, name: str, by: int = 1) -> None:
        with self._lock:
            setattr(self, name, getattr(self, name) + by)

    def snapshot(self) -> dict[str, Any]:
        with self._lock:
            waits = list(self.queue_waits)
            by_lane = {lane: list(values) for lane, values in self.lane_waits.items()}
            lats = list(self.latencies)
            passes = self.forward_passes

            def ms(v: float | None) -> float | None:
                return None if v is None else round(v * 1000, 3)

            return {
                "forward_passes": passes,
                "forward_seconds": self.forward_seconds,
                "prepare_seconds": self.prepare_seconds,
                "avg_batch_items": self.batch_items / passes if passes else None,
                "batch_fill": self.batch_items / (passes * self.max_batch_size) if passes else None,
                "avg_tokens_per_batch": self.padded_tokens / passes if passes else None,
                "padding_ratio": (
                    1 - self.real_tokens / self.padded_tokens if self.padded_tokens else None
                ),
                "queue_wait_ms_p50": ms(percentile(waits, 0.5)),
                "queue_wait_ms_p95": ms(percentile(waits, 0.95)),
                "latency_ms_p50": ms(percentile(lats, 0.5)),
                "latency_ms_p95": ms(percentile(lats, 0.95)),
                "queue_wait_ms_p95_interactive": ms(percentile(by_lane["interactive"], 0.95)),
                "queue_wait_ms_p95_bulk": ms(percentile(by_lane["bulk"], 0.95)),
                "bulk_yields": self.bulk_yields,
                "oom_splits": self.oom_splits,
                "token_budget": self.token_budget,
                "token_scale": round(self.token_scale, 3),
                "rejected": self.rejected,
                "cancelled": self.cancelled,
                "queue_depth": self.queue_depth,
                "latency_seconds_histogram": self.latency_histogram.snapshot(),
                "queue_wait_seconds_histogram": self.queue_wait_histogram.snapshot(),
            }


@dataclass
class SpecStats:
    """Counters for one spec, as reported by ``ModelPool.stats()``."""

    spec: str
    backend: str
    model: str
    kind: str
    device: str
    dtype: str
    dtype_reason: str = ""
    #: Kernels the backend runs beyond the framework's defaults (``LoadedModel.kernels``).
    kernels: str = ""
    loaded: bool = False
    loads: int = 0
    load_failures: int = 0
    load_seconds: float = 0.0
    releases: int = 0
    calls: int = 0
    items: int = 0  # pairs scored (rerankers) or texts embedded (embedders)
    errors: int = 0
    #: Warm-up passes the pool ran after a load (preload, a reload after an eviction): device
    #: work no caller asked for, so never in calls, items, busy_seconds or the latency figures.
    warmups: int = 0
    passthrough: int = 0  # adapter calls answered in retrieval order (on_error)
    cache_hits: int = 0
    cache_misses: int = 0
    busy_seconds: float = 0.0
    last_used: float | None = None
    #: Bytes the model held on its device at its last load (None: never loaded, or unknown).
    footprint_bytes: int | None = None
    #: Releases the pool decided on (memory budget or idle reaper), and the last one's reason.
    evictions: int = 0
    last_eviction_reason: str | None = None
    metrics: Metrics | None = field(default=None, repr=False, compare=False)
    #: The one lock over these counters: every change goes through :meth:`add` or :meth:`update`.
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)

    def __post_init__(self) -> None:
        # The model becomes the ``model`` field of stats and the ``model`` label of metrics:
        # a URL's credentials must not, even for a spec its backend refuses at load time.
        self.model = redact_urls(self.model)

    def add(self, **deltas: float) -> None:
        """Add to counters, atomically (``stats.add(calls=1, items=n)``)."""
        with self._lock:
            for name, delta in deltas.items():
                setattr(self, name, getattr(self, name) + delta)

    def add_call(self, items: int, seconds: float, error: bool = False) -> None:
        """Count one caller's call of ``items`` items that took ``seconds`` (and its use now)."""
        with self._lock:
            self.calls += 1
            self.items += items
            self.busy_seconds += seconds
            self.errors += int(error)
            self.last_used = time.time()

    def update(self, **values: Any) -> None:
        """Set fields, atomically."""
        with self._lock:
            for name, value in values.items():
                setattr(self, name, value)

    def renew_lock(self) -> None:
        """In a forked child: locks the parent's threads cannot be holding (its metrics' too)."""
        self._lock = threading.Lock()
        if self.metrics is not None:
            self.metrics._lock = threading.Lock()

    def as_dict(self) -> dict[str, Any]:
        with self._lock:
            data = {
                f.name: getattr(self, f.name)
                for f in fields(self)
                if f.name not in ("metrics", "footprint_bytes", "_lock")
            }
        footprint = self.footprint_bytes
        data["footprint_mb"] = None if footprint is None else round(footprint / 2**20, 3)
        data["footprint_bytes"] = footprint  # exact, for the Prometheus gauge in bytes
        data["reloads"] = max(0, self.loads - 1)
        if self.metrics is not None:
            data.update(self.metrics.snapshot())
        return data
