"""Error messages tell the user a next step that works with today's tools."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from rag_rerank_plugins import MissingDependencyError, ModelNotFoundError

ROOT = Path(__file__).resolve().parents[1]


def test_model_not_found_recommends_hf_download() -> None:
    message = str(ModelNotFoundError("BAAI/bge-reranker-v2-m3", "cross-encoder", "offline"))
    # huggingface-hub ships the `hf` command; `huggingface-cli` is its deprecated old name.
    assert "hf download BAAI/bge-reranker-v2-m3 --local-dir" in message
    assert "huggingface-cli" not in message
    assert "model='/models/bge-reranker-v2-m3'" in message


def test_docs_recommend_hf_download_not_huggingface_cli() -> None:
    pages = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
    stale = [str(p.relative_to(ROOT)) for p in pages if re.search("huggingface-cli", p.read_text())]
    assert stale == []


def test_an_optional_package_that_cannot_be_imported_is_not_called_missing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """FlagEmbedding 1.4.2 under transformers 5.24 fails inside its own imports: the error must
    say the package is installed, quote why it failed, and name the extra whose pins fix it."""
    from rag_rerank_plugins.backends._torch_common import import_optional

    package = tmp_path / "rag_rerank_broken_pkg"
    package.mkdir()
    (package / "__init__.py").write_text("from rag_rerank_gone_module import helper\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(MissingDependencyError) as info:
        import_optional("rag_rerank_broken_pkg", "FlagEmbedding", "flag", "The 'x' backend")
    message = str(info.value)
    assert "is installed but cannot be imported" in message
    assert "rag_rerank_gone_module" in message
    assert "pip install 'rag-rerank-plugins[flag]'" in message
    with pytest.raises(MissingDependencyError, match="which is not installed"):
        import_optional("rag_rerank_absent_pkg", "FlagEmbedding", "flag", "The 'x' backend")


@pytest.mark.parametrize(
    ("seconds", "shown"),
    [
        (None, "no result in time"),
        (0.19956630200067593, "within 0.2 s"),  # what a cold load left of 0.2 s
        (0.1994, "within 0.199 s"),
        (0.0005, "within 0.0005 s"),
        (1e-7, "within 0.0000001 s"),
        (30, "within 30 s"),
        (99.97, "within 100 s"),
        (999.7, "within 1000 s"),  # never 1e+03
        (86400.0, "within 86400 s"),
    ],
)
def test_a_timeout_message_shows_the_seconds_as_a_person_would(
    seconds: float | None, shown: str
) -> None:
    from rag_rerank_plugins.engine.request import timeout_error

    message = str(timeout_error("m", seconds))
    assert shown in message
    assert "None" not in message
    assert "e+" not in message
    assert "e-" not in message
