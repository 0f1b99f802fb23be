"""Prometheus text exposition (format 0.0.4) of the pool stats and the server's own counters.

Written by hand instead of with prometheus_client: the pool already keeps the counters
(:meth:`ModelPool.stats`), so formatting them is a few lines and costs no dependency.
"""

from __future__ import annotations

import math
import re
import threading
from collections.abc import Iterable, Mapping
from typing import Any

__all__ = ["CONTENT_TYPE", "RequestMetrics", "render"]

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

#: Pool stats field -> (metric name, type, help).
_SPEC_METRICS: dict[str, tuple[str, str, str]] = {
    "loaded": ("rag_rerank_model_loaded", "gauge", "1 while the model is in memory"),
    "loads": ("rag_rerank_model_loads_total", "counter", "Model loads (more than 1: reloads)"),
    "load_failures": ("rag_rerank_model_load_failures_total", "counter", "Failed model loads"),
    "load_seconds": ("rag_rerank_model_load_seconds_total", "counter", "Seconds spent loading"),
    "releases": ("rag_rerank_model_releases_total", "counter", "Models released from memory"),
    "calls": ("rag_rerank_model_calls_total", "counter", "Model calls (score or embed)"),
    "items": ("rag_rerank_model_items_total", "counter", "Pairs scored or texts embedded"),
    "errors": ("rag_rerank_model_errors_total", "counter", "Model calls that failed"),
    "busy_seconds": ("rag_rerank_model_busy_seconds_total", "counter", "Seconds inside calls"),
}
_NAME = re.compile(r"[^a-zA-Z0-9_]")


def _escape(value: object) -> str:
    return str(value).replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _labels(labels: Mapping[str, object]) -> str:
    if not labels:
        return ""
    return "{" + ",".join(f'{k}="{_escape(v)}"' for k, v in labels.items()) + "}"


def _number(value: float) -> str:
    if isinstance(value, bool):
        return "1" if value else "0"
    if isinstance(value, float):
        if math.isnan(value):
            return "NaN"
        if math.isinf(value):
            return "+Inf" if value > 0 else "-Inf"
        return repr(value)
    return str(value)


class _Family:
    def __init__(self, name: str, kind: str, help_text: str) -> None:
        self.name = name
        self.kind = kind
        self.help = help_text
        self.samples: list[tuple[str, Mapping[str, object], float]] = []

    def add(self, value: float, labels: Mapping[str, object], suffix: str = "") -> None:
        self.samples.append((suffix, labels, value))

    def lines(self) -> Iterable[str]:
        yield f"# HELP {self.name} {self.help}"
        yield f"# TYPE {self.name} {self.kind}"
        for suffix, labels, value in self.samples:
            yield f"{self.name}{suffix}{_labels(labels)} {_number(value)}"


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


def render(
    pool_stats: Mapping[str, Mapping[str, Any]],
    names: Mapping[str, str],
    requests: RequestMetrics,
    gauges: Mapping[str, tuple[float, str]],
) -> str:
    """The /metrics body. ``names`` maps spec labels to served model names; ``gauges`` are
    ``metric -> (value, help)`` for server state (in flight, queued, ready)."""
    families: dict[str, _Family] = {}

    def family(name: str, kind: str, help_text: str) -> _Family:
        fam = families.get(name)
        if fam is None:
            fam = families[name] = _Family(name, kind, help_text)
        return fam

    for label, stats in sorted(pool_stats.items()):
        labels = {
            "model": names.get(label, stats.get("model", label)),
            "kind": stats.get("kind", ""),
            "backend": stats.get("backend", ""),
            "device": stats.get("device", ""),
            "dtype": stats.get("dtype", ""),
            "spec": label,
        }
        for key, (metric, kind, help_text) in _SPEC_METRICS.items():
            value = stats.get(key)
            if isinstance(value, (int, float)):
                family(metric, kind, help_text).add(value, labels)
        extra = stats.get("extra") or {}
        for key, value in sorted(extra.items()):
            if isinstance(value, (int, float)):
                metric = "rag_rerank_model_" + _NAME.sub("_", str(key))
                family(metric, "untyped", f"pool stats extra field {key!r}").add(value, labels)

    requests_total, seconds, rejected = requests.snapshot()
    fam = family("rag_rerank_http_requests_total", "counter", "HTTP requests by endpoint, status")
    for (endpoint, status), count in sorted(requests_total.items()):
        fam.add(count, {"endpoint": endpoint, "status": status})
    fam = family(
        "rag_rerank_http_request_seconds_total", "counter", "Seconds spent answering, by endpoint"
    )
    for endpoint, total in sorted(seconds.items()):
        fam.add(total, {"endpoint": endpoint})
    fam = family(
        "rag_rerank_http_rejected_total",
        "counter",
        "Requests refused before inference, by reason (auth, too_large, invalid, overloaded)",
    )
    for reason, count in sorted(rejected.items()):
        fam.add(count, {"reason": reason})
    for metric, (value, help_text) in gauges.items():
        family(metric, "gauge", help_text).add(value, {})

    lines: list[str] = []
    for fam in families.values():
        lines.extend(fam.lines())
    return "\n".join(lines) + "\n"
