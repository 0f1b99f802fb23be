"""Issue 21 (symptom 9): what concurrent callers get compared with sequential calls.

Concurrent requests share forward passes, so an item is computed next to other items and padded
to another length than when it arrives alone. The documented bound (README, docs/concepts.md):

* float32: scores and vectors within 1e-5 of the sequential ones (measured ~3e-7), rankings
  equal;
* bfloat16 (the CPU default with native BF16): oneDNN's BF16 matmuls round differently with the
  number of rows of a pass (the 1536 -> 384 feed-forward matmul of a MiniLM layer gave a row
  other bits at 480 rows than at 224; the pass's padded length alone did not change it), so
  scores and vector components move by up to ~2e-3 (MiniLM-L6 cross-encoder on SciFact, sigmoid
  scores; MiniLM embedder) and passages with nearly equal scores may swap. Making that exact
  would take fixed-row matmul calls, ~1.5x slower per layer; 5e-3 is the documented bound.

The float32 bound is checked here; the bfloat16 one only on a CPU with native BF16 (emulated
BF16 is ~150x slower).
"""

from __future__ import annotations

import importlib.util
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from rag_rerank_plugins import EngineConfig, ModelPool, ModelSpec

pytest.importorskip("sentence_transformers")

FLOAT32_BOUND = 1e-5
BFLOAT16_BOUND = 5e-3


def _requests(count: int, per_request: int) -> list[list[tuple[str, str]]]:
    """Seeded requests whose passages vary in length (20-200 words), so passes mix lengths."""
    path = Path(__file__).resolve().parents[1] / "benchmarks" / "memory_plateau.py"
    spec = importlib.util.spec_from_file_location("_memory_plateau_benchmark", path)
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    requests: list[list[tuple[str, str]]] = module.synthetic_requests(
        count, per_request, seed=7, max_words=200
    )
    return requests


def _order(scores: list[float]) -> list[int]:
    return sorted(range(len(scores)), key=lambda i: -scores[i])


def _native_bf16() -> bool:
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def _sequential_vs_threads(
    spec: ModelSpec, requests: list[list[tuple[str, str]]]
) -> tuple[float, int]:
    """Worst score difference and number of changed rankings, 10 threads vs one caller."""
    # A short merge window so concurrent requests really share passes.
    pool = ModelPool(config=EngineConfig(max_wait_ms=5))
    try:
        sequential = [pool.score_pairs(spec, r) for r in requests]
        with ThreadPoolExecutor(10) as ex:
            concurrent = list(ex.map(lambda r: pool.score_pairs(spec, r), requests))
        merged = pool.spec_stats(spec)["avg_batch_items"]
    finally:
        pool.clear()
    assert merged > 1  # passes were shared
    worst = max(
        abs(a - b)
        for s, c in zip(sequential, concurrent, strict=True)
        for a, b in zip(s, c, strict=True)
    )
    changed = sum(_order(s) != _order(c) for s, c in zip(sequential, concurrent, strict=True))
    return worst, changed


def test_float32_concurrent_scores_match_sequential_within_bound(real_ce_path: str) -> None:
    spec = ModelSpec(real_ce_path, backend="cross-encoder", device="cpu", dtype="float32")
    worst, changed = _sequential_vs_threads(spec, _requests(20, 8))
    assert worst <= FLOAT32_BOUND
    assert changed == 0


def _embed_sequential_vs_threads(spec: ModelSpec, texts: list[str]) -> float:
    """Worst vector-component difference, 10 threads (one text each) vs one caller."""
    pool = ModelPool(config=EngineConfig(max_wait_ms=5))
    try:
        sequential = [pool.embed(spec, [t]) for t in texts]
        with ThreadPoolExecutor(10) as ex:
            concurrent = list(ex.map(lambda t: pool.embed(spec, [t]), texts))
        merged = pool.spec_stats(spec)["avg_batch_items"]
    finally:
        pool.clear()
    assert merged > 1  # passes were shared
    return max(
        abs(a - b)
        for s, c in zip(sequential, concurrent, strict=True)
        for a, b in zip(s[0], c[0], strict=True)
    )


def test_float32_concurrent_vectors_match_sequential_within_bound(emb_spec: ModelSpec) -> None:
    texts = [p for r in _requests(4, 10) for _, p in r]
    assert _embed_sequential_vs_threads(emb_spec, texts) <= FLOAT32_BOUND


@pytest.mark.skipif(not _native_bf16(), reason="BF16 is emulated on this CPU (very slow)")
def test_bfloat16_concurrent_scores_stay_within_documented_bound(real_ce_path: str) -> None:
    spec = ModelSpec(real_ce_path, backend="cross-encoder", device="cpu", dtype="bfloat16")
    worst, _ = _sequential_vs_threads(spec, _requests(20, 8))
    assert worst <= BFLOAT16_BOUND


@pytest.mark.skipif(not _native_bf16(), reason="BF16 is emulated on this CPU (very slow)")
def test_bfloat16_concurrent_vectors_stay_within_documented_bound(minilm_path: str) -> None:
    spec = ModelSpec(minilm_path, backend="sentence-transformers", device="cpu", dtype="bfloat16")
    texts = [p for r in _requests(4, 10) for _, p in r]
    assert _embed_sequential_vs_threads(spec, texts) <= BFLOAT16_BOUND
