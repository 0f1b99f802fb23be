"""Prometheus metrics of the pool: one table, read by the in-process collector and the server.

:data:`MODEL_METRICS` and :data:`MODEL_HISTOGRAMS` say which :meth:`ModelPool.stats` field becomes
which metric; :func:`model_families` turns a stats snapshot into ``prometheus_client`` metric
families. :class:`PoolCollector` (extra ``metrics``) registers them in your process;
``rag-rerank serve``'s ``GET /metrics`` renders the same families plus its HTTP counters, so
dashboards work with either::

    from prometheus_client import REGISTRY
    from rag_rerank_plugins import get_pool
    from rag_rerank_plugins.metrics import PoolCollector

    REGISTRY.register(PoolCollector(get_pool()))

Every per-model sample carries the labels ``model, kind, backend, device, dtype, spec``.
Latency and queue wait are histograms (``rag_rerank_model_latency_seconds_bucket{le=...}``) of
every request the model's scheduler served since it was first loaded; models called directly
(thread-safe ones: HTTP clients, fakes) have no queue and record none.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from .exceptions import MissingDependencyError
from .pool import ModelPool, get_pool

if TYPE_CHECKING:
    from prometheus_client.metrics_core import Metric

__all__ = [
    "CACHE_METRICS",
    "LABELS",
    "MODEL_HISTOGRAMS",
    "MODEL_METRICS",
    "PoolCollector",
    "SemanticCacheCollector",
    "cache_families",
    "model_families",
]

#: Labels of every per-model sample.
LABELS = ("model", "kind", "backend", "device", "dtype", "spec")


@dataclass(frozen=True)
class ModelMetric:
    """One stats field as a metric: ``name`` (counters end in ``_total``), type, help text, and a
    factor applied to the value (e.g. MiB -> bytes)."""

    key: str
    name: str
    kind: str  # "counter" or "gauge"
    help: str
    scale: float = 1.0


#: Stats field -> metric. Fields a model does not have (yet) are left out of the scrape.
MODEL_METRICS: tuple[ModelMetric, ...] = (
    ModelMetric("loaded", "rag_rerank_model_loaded", "gauge", "1 while the model is in memory"),
    ModelMetric("loads", "rag_rerank_model_loads_total", "counter", "Model loads (>1: reloads)"),
    ModelMetric(
        "load_failures", "rag_rerank_model_load_failures_total", "counter", "Failed model loads"
    ),
    ModelMetric(
        "load_seconds", "rag_rerank_model_load_seconds_total", "counter", "Seconds spent loading"
    ),
    ModelMetric(
        "releases", "rag_rerank_model_releases_total", "counter", "Models released from memory"
    ),
    ModelMetric(
        "evictions",
        "rag_rerank_model_evictions_total",
        "counter",
        "Releases the pool decided on (memory budget or idle reaper)",
    ),
    ModelMetric(
        "footprint_bytes",  # exact: footprint_mb is rounded to 1 kB
        "rag_rerank_model_footprint_bytes",
        "gauge",
        "Bytes the model held on its device at its last load",
    ),
    ModelMetric("calls", "rag_rerank_model_calls_total", "counter", "Model calls (score or embed)"),
    ModelMetric(
        "items", "rag_rerank_model_items_total", "counter", "Pairs scored or texts embedded"
    ),
    ModelMetric("errors", "rag_rerank_model_errors_total", "counter", "Model calls that failed"),
    ModelMetric(
        "warmups",
        "rag_rerank_model_warmups_total",
        "counter",
        "Warm-up passes after a load (no caller's; not in calls)",
    ),
    ModelMetric(
        "busy_seconds", "rag_rerank_model_busy_seconds_total", "counter", "Seconds inside calls"
    ),
    ModelMetric(
        "passthrough",
        "rag_rerank_model_passthrough_total",
        "counter",
        "Adapter calls answered in retrieval order after a failure (on_error='passthrough')",
    ),
    ModelMetric(
        "cache_hits", "rag_rerank_model_cache_hits_total", "counter", "Score/query cache hits"
    ),
    ModelMetric(
        "cache_misses", "rag_rerank_model_cache_misses_total", "counter", "Score/query cache misses"
    ),
    ModelMetric(
        "forward_passes", "rag_rerank_model_forward_passes_total", "counter", "Forward passes"
    ),
    ModelMetric(
        "oom_splits",
        "rag_rerank_model_oom_splits_total",
        "counter",
        "Batches split after running out of memory",
    ),
    ModelMetric(
        "rejected",
        "rag_rerank_model_rejected_total",
        "counter",
        "Requests refused by the model's full queue",
    ),
    ModelMetric(
        "cancelled", "rag_rerank_model_cancelled_total", "counter", "Requests cancelled by callers"
    ),
    ModelMetric(
        "queue_depth", "rag_rerank_model_queue_depth", "gauge", "Requests waiting for the model"
    ),
    ModelMetric(
        "batch_fill",
        "rag_rerank_model_batch_fill",
        "gauge",
        "Items per pass / max batch size, since the first load",
    ),
    ModelMetric(
        "latency_ms_p50",
        "rag_rerank_model_latency_ms_p50",
        "gauge",
        "Median call latency over the recent window, milliseconds",
    ),
    ModelMetric(
        "latency_ms_p95",
        "rag_rerank_model_latency_ms_p95",
        "gauge",
        "95th percentile call latency over the recent window, milliseconds",
    ),
    ModelMetric(
        "queue_wait_ms_p50",
        "rag_rerank_model_queue_wait_ms_p50",
        "gauge",
        "Median queue wait over the recent window, milliseconds",
    ),
    ModelMetric(
        "queue_wait_ms_p95",
        "rag_rerank_model_queue_wait_ms_p95",
        "gauge",
        "95th percentile queue wait over the recent window, milliseconds",
    ),
)

#: Stats field (a :meth:`~rag_rerank_plugins.stats.Histogram.snapshot`) -> (metric, help).
MODEL_HISTOGRAMS: dict[str, tuple[str, str]] = {
    "latency_seconds_histogram": (
        "rag_rerank_model_latency_seconds",
        "Request latency from enqueue to result, seconds",
    ),
    "queue_wait_seconds_histogram": (
        "rag_rerank_model_queue_wait_seconds",
        "Time a request waited before its first forward pass, seconds",
    ),
}


def prometheus_core(what: str, extra: str = "metrics") -> Any:
    """``prometheus_client.core``, or :class:`MissingDependencyError` naming ``extra``."""
    try:
        import prometheus_client.core as core
    except ImportError:
        raise MissingDependencyError("prometheus-client", extra, what) from None
    return core


def _le(bound: float) -> str:
    return "+Inf" if bound == float("inf") else repr(bound)


def model_families(
    stats: Mapping[str, Mapping[str, Any]], names: Mapping[str, str] | None = None
) -> Iterator[Metric]:
    """The metric families of a :meth:`ModelPool.stats` snapshot. ``names`` maps spec labels to
    the ``model`` label to use (the server's served names); default: the model path."""
    core = prometheus_core("rag_rerank_plugins.metrics.model_families")
    names = names or {}
    rows = [
        (
            [str(names.get(label, s.get("model", label)))]
            + [str(s.get(f, "")) for f in LABELS[1:-1]]
            + [label],
            s,
        )
        for label, s in sorted(stats.items())
    ]
    for metric in MODEL_METRICS:
        if metric.kind == "counter":
            # prometheus_client appends _total itself.
            family = core.CounterMetricFamily(
                metric.name.removesuffix("_total"), metric.help, labels=LABELS
            )
        else:
            family = core.GaugeMetricFamily(metric.name, metric.help, labels=LABELS)
        for labels, s in rows:
            value = s.get(metric.key)
            if isinstance(value, (int, float)):
                family.add_metric(labels, float(value) * metric.scale)
        yield family
    for key, (name, help_text) in MODEL_HISTOGRAMS.items():
        histogram = core.HistogramMetricFamily(name, help_text, labels=LABELS)
        for labels, s in rows:
            snapshot = s.get(key)
            if snapshot:
                histogram.add_metric(
                    labels,
                    buckets=[(_le(bound), count) for bound, count in snapshot["buckets"]],
                    sum_value=snapshot["sum"],
                )
        yield histogram


class PoolCollector:
    """A ``prometheus_client`` custom collector exposing :meth:`ModelPool.stats` per spec label:
    the counters, gauges and histograms of :data:`MODEL_METRICS` and :data:`MODEL_HISTOGRAMS`.
    Percentiles and histograms are absent until a model has been called."""

    def __init__(self, pool: ModelPool | None = None) -> None:
        # Fail at construction, not at the first scrape.
        prometheus_core("rag_rerank_plugins.metrics.PoolCollector")
        self._pool = pool

    def collect(self) -> Iterator[Metric]:
        pool = self._pool if self._pool is not None else get_pool()
        yield from model_families(pool.stats())

    def describe(self) -> Iterator[Metric]:
        """Nothing: the metric set depends on the pool, so it is read at each scrape."""
        return iter(())


#: :meth:`SemanticCache.stats` field -> metric (labels ``cache, guard, store``). Latency
#: percentiles are gauges in seconds over the cache's last 1000 lookups.
CACHE_METRICS: tuple[ModelMetric, ...] = (
    *(
        ModelMetric(key, f"rag_rerank_semantic_cache_{key}_total", "counter", help_text)
        for key, help_text in (
            ("lookups", "Lookups"),
            ("hits", "Lookups answered from the cache"),
            ("misses", "Lookups not answered (guard rejections included)"),
            ("guard_rejections", "Near cached queries the guard refused (a false hit avoided)"),
            ("errors", "Store or embedder failures, each answered as a miss"),
            ("puts", "Entries stored"),
            ("evictions", "Entries evicted (LRU or TTL)"),
        )
    ),
    ModelMetric("entries", "rag_rerank_semantic_cache_entries", "gauge", "Entries in the store"),
    *(
        ModelMetric(f"{key}_{q}", f"rag_rerank_semantic_cache_{key}_{q}_seconds", "gauge", h, 1e-3)
        for key, h in (("lookup_ms", "Lookup latency"), ("search_ms", "Latency beyond embedding"))
        for q in ("p50", "p95")
    ),
)
CACHE_LABELS = ("cache", "guard", "store")


def cache_families(stats: Mapping[str, Mapping[str, Any]]) -> Iterator[Metric]:
    """The metric families of named :meth:`SemanticCache.stats` snapshots (name -> stats)."""
    core = prometheus_core("rag_rerank_plugins.metrics.cache_families")
    for metric in CACHE_METRICS:
        family = (
            core.CounterMetricFamily(
                metric.name.removesuffix("_total"), metric.help, labels=CACHE_LABELS
            )
            if metric.kind == "counter"
            else core.GaugeMetricFamily(metric.name, metric.help, labels=CACHE_LABELS)
        )
        for name, s in sorted(stats.items()):
            value = s.get(metric.key)
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                labels = [name, str(s.get("guard", "")), str(s.get("store", ""))]
                family.add_metric(labels, float(value) * metric.scale)
        yield family


class SemanticCacheCollector:
    """A ``prometheus_client`` collector for semantic caches (anything with ``stats()``: a
    :class:`~rag_rerank_plugins.semantic_cache.SemanticCache` or a remote one), read at each
    scrape::

        REGISTRY.register(SemanticCacheCollector({"answers": cache}))
    """

    def __init__(self, caches: Mapping[str, Any]) -> None:
        prometheus_core("rag_rerank_plugins.metrics.SemanticCacheCollector")
        self._caches = dict(caches)

    def collect(self) -> Iterator[Metric]:
        yield from cache_families({name: c.stats() for name, c in self._caches.items()})

    def describe(self) -> Iterator[Metric]:
        return iter(())
