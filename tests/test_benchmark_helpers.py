"""The benchmarks' shared figures are computed one right way (benchmarks/bench_common.py).

Spearman: rerankers in INT8 or BF16 often give several passages the same score. Ranking ties
by position (``argsort(argsort(x))``) made the printed rho depend on the passage order: the
same pairs, listed backwards, went from 1.0 to -1.0. Every script that prints a Spearman now
uses one helper in which tied scores share their average rank. The OpenVINO A/B script's
settings patch must keep the loader's ``compile_config(dtype, threads, user)`` signature (a
two-argument patch crashed every OpenVINO variant).
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import pytest

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
# Three tied scores, then three more: the true rho is 0.8783 whatever the listing order.
GOT = [0.5, 0.5, 0.5, 0.9, 0.9, 0.9]
WANT = [0.1, 0.2, 0.3, 0.4, 0.5, 0.6]


@pytest.fixture(scope="module")
def benchmarks() -> Iterator[None]:
    """benchmarks/ importable as its scripts import each other (their folder on sys.path)."""
    sys.path.insert(0, str(BENCHMARKS))
    try:
        yield
    finally:
        sys.path.remove(str(BENCHMARKS))


def _module(name: str) -> ModuleType:
    return importlib.import_module(name)


@pytest.mark.parametrize("script", ["peers", "quality_cross_encoder"])
def test_spearman_gives_ties_their_average_rank(benchmarks: None, script: str) -> None:
    spearman = _module(script).spearman
    forward = spearman(GOT, WANT)
    backward = spearman(GOT[::-1], WANT[::-1])  # the same pairs, listed the other way round
    assert forward == pytest.approx(0.8783, abs=1e-4)
    assert backward == pytest.approx(forward)


@pytest.mark.parametrize(
    "script", ["peers", "quality_cross_encoder", "quality_int8_schemes", "cpu_peers", "openvino_ab"]
)
def test_every_script_uses_the_one_shared_spearman(benchmarks: None, script: str) -> None:
    shared = _module("bench_common").spearman
    assert getattr(_module(script), "spearman", None) is shared


def test_openvino_ab_settings_keep_the_loaders_compile_config_signature(
    benchmarks: None,
) -> None:
    pytest.importorskip("openvino")
    from rag_rerank_plugins.backends import _openvino_common as common

    openvino_ab = _module("openvino_ab")
    before = common.compile_config
    with openvino_ab.settings(True, "LATENCY", False, {"ENABLE_CPU_PINNING": False}):
        config = common.compile_config("float32", 2, {"NUM_STREAMS": 1})
    assert config["ENABLE_CPU_PINNING"] is False  # the variant's extra setting
    assert config["NUM_STREAMS"] == 1  # the user's own settings still reach the compile
    assert common.compile_config is before
