"""``GET /metrics`` of the server: the pool's metric table plus the server's own counters.

The per-model families (counters, gauges, latency and queue-wait histograms) come from
:func:`rag_rerank_plugins.metrics.model_families`, the same table the in-process
:class:`~rag_rerank_plugins.metrics.PoolCollector` uses; this module adds the HTTP counters
(:class:`RequestMetrics`, filled by the guard middleware) and the admission gauges, and renders
everything with ``prometheus_client`` (part of the ``server`` extra).

What a scrape reads of the server state is the :class:`ScrapedState` protocol (a
:class:`~.state.ServerState` is one), so this module never imports the state, which imports it.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    from prometheus_client.metrics_core import Metric

    from ..pool import ModelPool
    from .config import ServedModel, ServerConfig

__all__ = ["CONTENT_TYPE", "RequestMetrics", "ScrapedState", "render"]

#: The classic text format (0.0.4), which every Prometheus version scrapes.
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


class RequestMetrics:
    """HTTP counters of one app: requests by endpoint and status, latency sums, rejections."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.requests: dict[tuple[str, int], int] = {}
        self.seconds: dict[str, float] = {}
        self.rejected: dict[str, int] = {}

    def observe(self, endpoint: str, status: int, seconds: float) -> None:
        with self._lock:
            self.requests[(endpoint, status)] = self.requests.get((endpoint, status), 0) + 1
            self.seconds[endpoint] = self.seconds.get(endpoint, 0.0) + seconds

    def reject(self, reason: str) -> None:
        with self._lock:
            self.rejected[reason] = self.rejected.get(reason, 0) + 1

    def snapshot(self) -> tuple[dict[tuple[str, int], int], dict[str, float], dict[str, int]]:
        with self._lock:
            return dict(self.requests), dict(self.seconds), dict(self.rejected)


class _AdmissionGauges(Protocol):
    @property
    def running(self) -> int: ...

    @property
    def queued(self) -> int: ...


class ScrapedState(Protocol):
    """What ``/metrics`` reads of the app's state (a :class:`~.state.ServerState`)."""

    @property
    def config(self) -> ServerConfig: ...

    @property
    def pool(self) -> ModelPool: ...

    @property
    def served(self) -> Sequence[ServedModel]: ...

    @property
    def metrics(self) -> RequestMetrics: ...

    @property
    def admission(self) -> _AdmissionGauges: ...

    @property
    def ready(self) -> bool: ...


class _ServerCollector:
    """The families of one scrape of ``state`` (a ``prometheus_client`` custom collector)."""

    def __init__(self, state: ScrapedState) -> None:
        self.state = state

    def collect(self) -> Iterator[Metric]:
        from ..metrics import cache_families, model_families, prometheus_core
        from .cache_slot import built_cache

        core = prometheus_core("rag-rerank serve's GET /metrics", extra="server")
        state = self.state
        served: dict[str, list[str]] = {}  # names served by one model share its counters
        for m in state.served:
            served.setdefault(state.pool.key(m.spec).label, []).append(m.name)
        names = {label: ",".join(sorted(set(group))) for label, group in served.items()}
        yield from model_families(state.pool.stats(), names)
        cache = built_cache(state)
        if cache is not None:  # --semantic-cache, once a request has built it
            yield from cache_families({"server": cache.stats()})

        requests, seconds, rejected = state.metrics.snapshot()
        family = core.CounterMetricFamily(
            "rag_rerank_http_requests",
            "HTTP requests by endpoint, status",
            labels=("endpoint", "status"),
        )
        for (endpoint, status), count in sorted(requests.items()):
            family.add_metric([endpoint, str(status)], count)
        yield family
        family = core.CounterMetricFamily(
            "rag_rerank_http_request_seconds",
            "Seconds spent answering, by endpoint",
            labels=("endpoint",),
        )
        for endpoint, total in sorted(seconds.items()):
            family.add_metric([endpoint], total)
        yield family
        family = core.CounterMetricFamily(
            "rag_rerank_http_rejected",
            "Requests refused before inference, by reason "
            "(auth, too_large, timeout, invalid, overloaded)",
            labels=("reason",),
        )
        for reason, count in sorted(rejected.items()):
            family.add_metric([reason], count)
        yield family

        config, admission = state.config, state.admission
        gauges: dict[str, tuple[float, str]] = {
            "rag_rerank_ready": (1.0 if state.ready else 0.0, "1 once models are warmed up"),
            "rag_rerank_requests_running": (float(admission.running), "Model calls running now"),
            "rag_rerank_requests_queued": (float(admission.queued), "Requests waiting for a slot"),
            "rag_rerank_max_concurrency": (float(config.max_concurrency), "Limit"),
            "rag_rerank_max_pending": (float(config.max_pending), "Limit"),
        }
        for name, (value, help_text) in gauges.items():
            yield core.GaugeMetricFamily(name, help_text, value=value)


def render(state: ScrapedState) -> bytes:
    """The ``/metrics`` body for ``state`` (Prometheus text format 0.0.4)."""
    from prometheus_client import CollectorRegistry
    from prometheus_client.exposition import generate_latest

    registry = CollectorRegistry(auto_describe=False)
    registry.register(_ServerCollector(state))
    body: Any = generate_latest(registry)
    return bytes(body)
