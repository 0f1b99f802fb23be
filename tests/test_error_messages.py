"""Error messages tell the user a next step that works with today's tools."""

from __future__ import annotations

import re
from pathlib import Path

from rag_rerank_plugins import ModelNotFoundError

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
