"""The CPU peers harness (benchmarks/peers.py) works without .venv-peers.

CI has no .venv-peers (scripts/setup-peers is for benchmark runs), so the sentence-transformers
peers must come out as "not available" rows while the systems of this venv still run, each in its
own child, with the stock LangChain reranker scoring exactly like the FP32 reference. A child
that cannot load is a row with the error, never a crash, and no child outlives the harness.
No timing is asserted (speed goes to benchmarks/results/).
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

pytest.importorskip("sentence_transformers")
pytest.importorskip("langchain_community")


def _load_peers() -> Any:
    path = Path(__file__).resolve().parents[1] / "benchmarks" / "peers.py"
    spec = importlib.util.spec_from_file_location("_peers_benchmark", path)
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


peers = _load_peers()
QUERY = "what is the role of energy in the cell system"


@pytest.fixture
def no_peers_venv(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RAG_RERANK_PEERS_VENV", str(tmp_path / "no-such-venv"))


def test_local_systems_run_and_missing_peers_say_not_available(
    tiny_ce_path: str, passages: list[str], tmp_path: Path, no_peers_venv: None
) -> None:
    names = ["reference_fp32", "langchain", "ours_default", "st_onnx", "st_openvino"]
    rows = peers.run_systems(
        names, Path(tiny_ce_path), tmp_path, QUERY, passages, rounds=2, warmup=1
    )
    for name in ("st_onnx", "st_openvino"):
        assert rows[name]["error"].startswith("not available:"), rows[name]
        assert "setup-peers" in rows[name]["error"]
    want = rows["reference_fp32"]["scores"]
    assert len(want) == len(passages)
    lc, ours = rows["langchain"], rows["ours_default"]
    assert len(lc["ms"]) == 2
    assert len(ours["ms"]) == 2
    assert min(lc["ms"] + ours["ms"]) > 0
    # LangChain is plain sentence-transformers FP32: the reference exactly, in passage order.
    assert lc["scores"] == pytest.approx(want, abs=1e-5)
    assert peers.spearman(lc["scores"], want) == pytest.approx(1.0)
    assert ours["scores"] == pytest.approx(want, abs=0.05)  # BF16 on AMX machines
    text = peers.report(rows, ["CPU: test"])
    assert "| langchain |" in text
    assert "| 1.00x |" in text
    assert "| st_onnx | not available:" in text
    assert _workers() == []  # every child killed and reaped


def test_a_child_that_cannot_load_is_an_error_row_and_is_gone(
    tmp_path: Path, passages: list[str]
) -> None:
    rows = peers.run_systems(["langchain"], tmp_path / "no-model", tmp_path, QUERY, passages, 1)
    assert rows["langchain"]["error"].startswith("load failed:"), rows
    assert "| langchain | load failed:" in peers.report(rows, [])
    assert _workers() == []
    assert (tmp_path / "logs" / "langchain.log").read_text()  # the traceback, for the reader


def _workers() -> list[str]:
    """Harness children still alive under this test process."""
    import psutil

    alive = []
    for proc in psutil.Process().children(recursive=True):
        try:
            if proc.status() != psutil.STATUS_ZOMBIE and "peer_worker.py" in " ".join(
                proc.cmdline()
            ):
                alive.append(proc.name())
        except psutil.NoSuchProcess:
            pass
    return alive


def test_unknown_system_is_refused(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        peers.main(["--systems", "ours_default,no_such_peer"])
    assert "no_such_peer" in capsys.readouterr().err


@given(st.lists(st.integers(-5000, 5000), min_size=3, max_size=40, unique=True))
def test_quality_measures(ints: list[int]) -> None:
    scores = [i / 100 for i in ints]
    assert peers.spearman(scores, scores) == pytest.approx(1.0)
    assert peers.spearman([-s for s in scores], scores) == pytest.approx(-1.0)
    assert peers.max_err_pct(scores, scores) == 0.0
    span = max(scores) - min(scores)
    shifted = [s + span / 10 for s in scores]
    assert peers.max_err_pct(shifted, scores) == pytest.approx(10.0)
    assert peers.spearman(shifted, scores) == pytest.approx(1.0)


def test_report_without_reference_or_anchor_still_renders() -> None:
    rows = {"ours_default": {"ms": [3.0, 1.0, 2.0], "scores": [0.1, 0.2], "versions": {}}}
    rows["st_onnx"] = {"error": "not available: .venv-peers missing"}
    text = peers.report(rows, ["CPU: test"])
    assert "| ours_default | 2.0 | - | - | - |" in text
    assert "| st_onnx | not available: .venv-peers missing |" in text
