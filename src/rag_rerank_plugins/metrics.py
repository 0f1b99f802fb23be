"""Prometheus collector for pool stats (extra ``metrics``: ``prometheus-client``).

Register it once per process; every scrape reads the pool's counters, nothing is copied between
scrapes::

    from prometheus_client import REGISTRY
    from rag_rerank_plugins import get_pool
    from rag_rerank_plugins.metrics import PoolCollector

    REGISTRY.register(PoolCollector(get_pool()))

Metric names and help texts are those of ``rag-rerank serve``'s ``/metrics`` (one table in
:mod:`rag_rerank_plugins.server.metrics`), so dashboards work with either.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from .exceptions import MissingDependencyError
from .pool import ModelPool, get_pool
from .server.metrics import _SPEC_METRICS

if TYPE_CHECKING:
    from prometheus_client.metrics_core import Metric

__all__ = ["PoolCollector"]

#: Labels of every per-model sample.
_LABELS = ("model", "kind", "backend", "device", "dtype", "spec")

#: Stats fields beyond the server's table -> (metric name, type, help).
_EXTRA_METRICS: dict[str, tuple[str, str, str]] = {
    "passthrough": (
        "rag_rerank_model_passthrough_total",
        "counter",
        "Adapter calls answered in retrieval order after a failure (on_error='passthrough')",
    ),
    "cache_hits": ("rag_rerank_model_cache_hits_total", "counter", "Score/query cache hits"),
    "cache_misses": ("rag_rerank_model_cache_misses_total", "counter", "Score/query cache misses"),
    "queue_depth": ("rag_rerank_model_queue_depth", "gauge", "Requests waiting for the model"),
    "latency_ms_p50": (
        "rag_rerank_model_latency_ms_p50",
        "gauge",
        "Median call latency over the recent window, milliseconds",
    ),
    "latency_ms_p95": (
        "rag_rerank_model_latency_ms_p95",
        "gauge",
        "95th percentile call latency over the recent window, milliseconds",
    ),
    "queue_wait_ms_p50": (
        "rag_rerank_model_queue_wait_ms_p50",
        "gauge",
        "Median queue wait over the recent window, milliseconds",
    ),
    "queue_wait_ms_p95": (
        "rag_rerank_model_queue_wait_ms_p95",
        "gauge",
        "95th percentile queue wait over the recent window, milliseconds",
    ),
}


def _prometheus() -> Any:
    try:
        import prometheus_client.core as core
    except ImportError:
        raise MissingDependencyError(
            "prometheus-client", "metrics", "rag_rerank_plugins.metrics.PoolCollector"
        ) from None
    return core


class PoolCollector:
    """A ``prometheus_client`` custom collector exposing :meth:`ModelPool.stats` per spec label.

    Counters (loads, calls, items, errors, load seconds, cache hits/misses, ...) and gauges
    (loaded, queue depth, latency and queue-wait p50/p95). Percentiles are absent until a model
    has been called.
    """

    def __init__(self, pool: ModelPool | None = None) -> None:
        self._core = _prometheus()  # fail at construction, not at the first scrape
        self._pool = pool

    def collect(self) -> Iterator[Metric]:
        core = self._core
        pool = self._pool if self._pool is not None else get_pool()
        stats = pool.stats()
        for key, (name, kind, help_text) in {**_SPEC_METRICS, **_EXTRA_METRICS}.items():
            if kind == "counter":
                # prometheus_client appends _total itself.
                family = core.CounterMetricFamily(
                    name.removesuffix("_total"), help_text, labels=_LABELS
                )
            else:
                family = core.GaugeMetricFamily(name, help_text, labels=_LABELS)
            for label, spec_stats in sorted(stats.items()):
                value = spec_stats.get(key)
                if isinstance(value, (int, float)):
                    labels = [str(spec_stats.get(f, "")) for f in _LABELS[:-1]] + [label]
                    family.add_metric(labels, float(value))
            yield family

    def describe(self) -> Iterator[Metric]:
        """Nothing: the metric set depends on the pool, so it is read at each scrape."""
        return iter(())
