"""release() gives memory back to the OS: RSS measured in a fresh process with a ~200 MB model."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

pytest.importorskip("sentence_transformers")

PROBE = textwrap.dedent(
    """
    import json, os, sys
    os.environ["HF_HUB_OFFLINE"] = "1"
    import torch, sentence_transformers  # imported before the baseline: not model memory
    from rag_rerank_plugins import ModelSpec, get_pool
    from rag_rerank_plugins._memory import free_memory, rss_bytes
    from rag_rerank_plugins.langchain import SharedRerankCompressor
    from langchain_core.documents import Document

    torch.set_num_threads(1)
    # Load and release a tiny model first, so lazily imported modules are in the baseline.
    warm = ModelSpec(sys.argv[2], device="cpu", dtype="float32")
    get_pool().score_pairs(warm, [("a", "b")])
    get_pool().release(warm)
    free_memory()
    base = rss_bytes()
    docs = [Document(page_content=f"passage number {i} " * 10) for i in range(4)]
    # 1000 live adapters (one per request): they must not pin or copy the model.
    adapters = [
        SharedRerankCompressor(model=sys.argv[1], device="cpu", dtype="float32")
        for _ in range(1000)
    ]
    for adapter in adapters[::100]:
        adapter.compress_documents(docs, "which passage?")
    loaded = rss_bytes()
    spec = SharedRerankCompressor(model=sys.argv[1], device="cpu", dtype="float32").spec
    assert get_pool().stats()[get_pool().key(spec).label]["loads"] == 1
    released = get_pool().release(spec)
    after = rss_bytes()
    print(json.dumps({"base": base, "loaded": loaded, "after": after, "released": released}))
    """
)


@pytest.fixture(scope="module")
def big_ce_path(tmp_path_factory: pytest.TempPathFactory, minilm_path: str) -> Path:
    from rag_rerank_plugins.testing import build_cross_encoder

    # ~57 M parameters -> ~230 MB in float32: large enough that RSS clearly moves.
    return build_cross_encoder(
        tmp_path_factory.mktemp("big") / "ce",
        hidden_size=768,
        num_layers=4,
        num_heads=12,
        intermediate_size=3072,
    )


@pytest.mark.slow
def test_release_returns_the_models_memory(big_ce_path: Path, tiny_ce_path: str) -> None:
    out = subprocess.run(
        [sys.executable, "-c", PROBE, str(big_ce_path), tiny_ce_path],
        check=True,
        capture_output=True,
        text=True,
        timeout=600,
    ).stdout
    m = json.loads(out.strip().splitlines()[-1])
    mb = 1024 * 1024
    grown = (m["loaded"] - m["base"]) / mb
    returned = (m["loaded"] - m["after"]) / mb
    print(f"RSS: +{grown:.0f} MB for model + 1000 adapters, {returned:.0f} MB back on release")
    assert m["released"] is True
    assert grown > 100, "the model should be visible in RSS (embedding rows load lazily)"
    assert grown < 230 * 1.5 + 50, "1000 adapters must cost about one model, not many"
    assert returned >= 0.9 * grown, m
