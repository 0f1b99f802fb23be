"""Multi-worker proof (benchmarks/multiworker.py, small): N worker processes building adapters
per request load each model N times locally, but once in total through `rag-rerank serve`."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("httpx")
pytest.importorskip("langchain_core")
pytest.importorskip("psutil")

pytestmark = pytest.mark.slow

WORKERS = 4


def _benchmark():
    path = Path(__file__).resolve().parents[1] / "benchmarks" / "multiworker.py"
    spec = importlib.util.spec_from_file_location("multiworker_benchmark", path)
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_remote_mode_loads_each_model_once_for_all_workers(tiny_ce_path: str) -> None:
    report = _benchmark().run(workers=WORKERS, requests=2, reranker=tiny_ce_path)
    local, remote = report["local"], report["remote"]
    models = 2  # a reranker and an embedder
    assert local["model_loads"] == WORKERS * models, "every local worker loads its own copy"
    assert remote["server_model_loads"] == models
    assert remote["model_loads"] == models, "remote workers load no model at all"
    assert remote["torch_in_workers"] == 0
    assert local["torch_in_workers"] == WORKERS
    assert remote["server_calls"] >= WORKERS * 2, "every rerank reached the server"
    assert max(remote["workers_rss_mb"]) < min(local["workers_rss_mb"])
    assert remote["total_rss_mb"] < local["total_rss_mb"]
    assert report["same_results"], "the served model ranks exactly like the local one"
