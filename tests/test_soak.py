"""Reduced soak (CI form of benchmarks/soak.py): 2,000 adapter calls, RSS must stay flat.

The full 10,000-call run is ``python benchmarks/soak.py``; both share :func:`soak`, loaded from
the benchmark file so the figure CI checks and the one reported come from the same code.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

pytest.importorskip("langchain_core")
pytest.importorskip("llama_index.core")

#: Allowed RSS growth for 2,000 calls after warm-up (measured: about 0.6 MiB per 10,000 calls).
GROWTH_BOUND_MIB = 8.0


def _soak_module():
    path = Path(__file__).resolve().parents[1] / "benchmarks" / "soak.py"
    spec = importlib.util.spec_from_file_location("_soak_benchmark", path)
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
def test_soak_2000_calls_rss_stays_flat() -> None:
    result = _soak_module().soak(2000)
    print(result)
    assert result["errors"] == 0
    assert result["loads"] == 1
    assert result["rss_growth_mib"] < GROWTH_BOUND_MIB, result
