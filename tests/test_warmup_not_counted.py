"""The pool's warm-up pass is no caller's call: it stays out of every per-call statistic.

``preload()`` (a server's start-up) and the reload after an eviction run one tiny forward pass.
It was counted as a model call: a served model nobody had called reported ``calls=1 items=1``
and one latency observation, and under eviction churn about a third of the counted calls were
warm-ups, skewing ``calls_total``, ``items_total``, ``busy_seconds_total``, the latency
histogram and the p50/p95 gauges (docs/guides/observability.md: calls are "calls, pairs or
texts"; latency is every request). It is counted in ``warmups`` instead.

The fakes here run through the scheduler (``thread_safe = False``, like a torch model), the
path that records latency and queue wait.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from rag_rerank_plugins import ModelPool, ModelSpec
from rag_rerank_plugins.backends import register_backend
from rag_rerank_plugins.backends.base import ModelProvider
from rag_rerank_plugins.engine_config import EngineConfig
from rag_rerank_plugins.testing import FakeEmbedder, FakeReranker

RERANKER = "warm-scheduled-reranker"
EMBEDDER = "warm-scheduled-embedder"
PAIRS = [("capital of France", "Paris"), ("capital of France", "Bananas"), ("q", "q")]


class _ScheduledReranker(FakeReranker):
    thread_safe = False  # through the scheduler's worker, like a torch model


class _ScheduledEmbedder(FakeEmbedder):
    thread_safe = False


def _reranker(spec: ModelSpec, _provider: ModelProvider) -> _ScheduledReranker:
    delay_ms = 20.0 if spec.option("slow") else 0.0  # callers queue up and share passes
    return _ScheduledReranker(delay_ms=delay_ms, footprint_mb=spec.option("footprint_mb"))


def _embedder(spec: ModelSpec, _provider: ModelProvider) -> _ScheduledEmbedder:
    return _ScheduledEmbedder()


register_backend(RERANKER, _reranker, "reranker", uses_torch=False, replace=True)
register_backend(EMBEDDER, _embedder, "embedder", uses_torch=False, replace=True)


@pytest.fixture
def make_pool() -> Iterator[Any]:
    pools: list[ModelPool] = []

    def make(**kwargs: Any) -> ModelPool:
        pools.append(ModelPool(**kwargs))
        return pools[-1]

    yield make
    for pool in pools:
        pool.clear()


def _per_call(stats: dict[str, Any]) -> dict[str, Any]:
    """Every per-call figure of a spec's stats."""
    return {
        "calls": stats["calls"],
        "items": stats["items"],
        "errors": stats["errors"],
        "busy": stats["busy_seconds"] > 0,
        "cache_misses": stats["cache_misses"],
        "latency_count": stats["latency_seconds_histogram"]["count"],
        "queue_wait_count": stats["queue_wait_seconds_histogram"]["count"],
        "latency_p95": stats["latency_ms_p95"] is not None,
        "queue_wait_p95": stats["queue_wait_ms_p95"] is not None,
    }


NOTHING = {
    "calls": 0,
    "items": 0,
    "errors": 0,
    "busy": False,
    "cache_misses": 0,
    "latency_count": 0,
    "queue_wait_count": 0,
    "latency_p95": False,
    "queue_wait_p95": False,
}


@pytest.mark.parametrize("backend", [RERANKER, EMBEDDER])
def test_a_preloaded_model_nobody_called_reports_no_call(make_pool: Any, backend: str) -> None:
    pool = make_pool(config=EngineConfig(score_cache_size=64))  # a warm-up is no cache miss
    spec = ModelSpec("warm-model", backend=backend, device="cpu")
    pool.preload(spec)  # loads and runs the warm-up pass
    stats = pool.spec_stats(spec)
    assert _per_call(stats) == NOTHING
    assert stats["warmups"] == 1
    assert stats["forward_passes"] == 1  # the device did run it: engine work, not a call

    if backend == RERANKER:
        pool.score_pairs(spec, PAIRS)
    else:
        pool.embed(spec, ["a", "b", "c"])
    stats = pool.spec_stats(spec)
    assert _per_call(stats) == {
        **NOTHING,
        "calls": 1,
        "items": 3,
        "busy": True,
        "cache_misses": 3 if backend == RERANKER else 0,  # the score cache (queries: none)
        "latency_count": 1,
        "queue_wait_count": 1,
        "latency_p95": True,
        "queue_wait_p95": True,
    }
    assert pool.stats()[stats["spec"]]["warmups"] == 1
    pool.reset_stats()  # call counters zeroed; warm-ups belong to the loads, kept
    assert pool.spec_stats(spec)["warmups"] == 1


def test_reloads_after_evictions_count_only_the_real_calls(make_pool: Any) -> None:
    # A budget that fits one model: every call of the other evicts it, and each reload of an
    # evicted model runs a warm-up pass first.
    pool = make_pool(memory_budget_mb=150)
    a, b = (
        ModelSpec(name, backend=RERANKER, device="cpu", options=(("footprint_mb", 100),))
        for name in ("warm-a", "warm-b")
    )
    rounds = 4
    for i in range(rounds):
        pool.score_pairs(a, [("query", f"a {i}")])
        pool.score_pairs(b, [("query", f"b {i}")])
    for spec in (a, b):
        stats = pool.spec_stats(spec)
        assert stats["loads"] == rounds
        assert (stats["calls"], stats["items"]) == (rounds, rounds)
        assert stats["latency_seconds_histogram"]["count"] == rounds
        assert stats["queue_wait_seconds_histogram"]["count"] == rounds
        assert stats["warmups"] == rounds - 1  # every reload, not the first load


def test_server_metrics_of_a_model_nobody_called_show_no_call(make_pool: Any) -> None:
    pytest.importorskip("prometheus_client")
    from prometheus_client.parser import text_string_to_metric_families

    from rag_rerank_plugins.server import ServerConfig, create_app
    from rag_rerank_plugins.server.testing import ServerThread, wait_until_healthy

    pool = make_pool()
    spec = {"name": "warm", "model": "warm-model", "backend": RERANKER, "device": "cpu"}
    app = create_app(ServerConfig(specs=[spec], warmup=True), pool=pool)

    def samples(url: str) -> dict[str, float]:
        text = httpx.get(url + "/metrics", timeout=10).text
        return {
            s.name: s.value
            for family in text_string_to_metric_families(text)
            for s in family.samples
            if s.labels.get("model") == "warm" and "le" not in s.labels
        }

    with ServerThread(app) as url:
        wait_until_healthy(url, timeout=30)
        ready = samples(url)
        response = httpx.post(url + "/rerank", json={"query": "q", "texts": ["a", "b", "q"]})
        assert response.status_code == 200, response.text
        after = samples(url)
    assert ready["rag_rerank_model_loads_total"] == 1
    for name in (
        "rag_rerank_model_calls_total",
        "rag_rerank_model_items_total",
        "rag_rerank_model_busy_seconds_total",
        "rag_rerank_model_latency_seconds_count",
        "rag_rerank_model_queue_wait_seconds_count",
    ):
        assert ready[name] == 0, name
    assert "rag_rerank_model_latency_ms_p95" not in ready  # no latency yet: no gauge
    assert after["rag_rerank_model_calls_total"] == 1
    assert after["rag_rerank_model_items_total"] == 3
    assert after["rag_rerank_model_latency_seconds_count"] == 1
    [served] = app.state.server.served
    assert pool.spec_stats(served.spec)["warmups"] == 1  # the server did warm the model up
    assert ready["rag_rerank_model_warmups_total"] == after["rag_rerank_model_warmups_total"] == 1


def test_a_warm_up_sharing_passes_with_real_calls_leaves_exactly_their_figures(
    make_pool: Any,
) -> None:
    # A warm-up while callers already use the model (preload after the first calls, e.g. a
    # server's lifespan after a replica's __init__ loaded it): its items may share their passes.
    from concurrent.futures import ThreadPoolExecutor

    pool = make_pool()
    spec = ModelSpec("warm-shared", backend=RERANKER, device="cpu", options=(("slow", 1),))
    pool.preload(spec, warmup=False)
    callers = 8
    with ThreadPoolExecutor(callers + 1) as executor:
        calls = [executor.submit(pool.score_pairs, spec, PAIRS) for _ in range(callers)]
        warm = executor.submit(pool.preload, spec)
        for call in calls:
            assert call.result(timeout=10) == FakeReranker().score_pairs(PAIRS, 32)
        warm.result(timeout=10)
    stats = pool.spec_stats(spec)
    assert (stats["calls"], stats["items"]) == (callers, callers * len(PAIRS))
    assert stats["latency_seconds_histogram"]["count"] == callers
    assert stats["queue_wait_seconds_histogram"]["count"] == callers
    assert stats["warmups"] == 1


class _FailsOnWarmUp(_ScheduledReranker):
    def score_pairs(self, pairs: Any, batch_size: int) -> list[float]:
        if any(query == "warm-up query" for query, _ in pairs):
            raise RuntimeError("the warm-up input breaks this model")
        return super().score_pairs(pairs, batch_size)


def test_a_failed_warm_up_is_no_failed_call_and_the_next_call_counts(make_pool: Any) -> None:
    from rag_rerank_plugins import InferenceError

    register_backend(
        "warm-fails", lambda spec, _p: _FailsOnWarmUp(), "reranker", uses_torch=False, replace=True
    )
    pool = make_pool()
    spec = ModelSpec("warm-fails", backend="warm-fails", device="cpu")
    with pytest.raises(InferenceError, match="warm-up input"):
        pool.preload(spec)  # a preload's warm-up failure is the caller's to see
    assert _per_call(pool.spec_stats(spec)) == NOTHING
    pool.score_pairs(spec, PAIRS)  # the same worker thread records this one
    stats = pool.spec_stats(spec)
    assert (stats["calls"], stats["errors"], stats["warmups"]) == (1, 0, 0)
    assert stats["latency_seconds_histogram"]["count"] == 1
