"""`import rag_rerank_plugins` must stay cheap: no heavy or optional framework is imported."""

from __future__ import annotations

import json
import subprocess
import sys

HEAVY = [
    "torch",
    "transformers",
    "sentence_transformers",
    "langchain_core",
    "langchain",
    "llama_index",
    "FlagEmbedding",
]


def _modules_after(code: str) -> list[str]:
    probe = f"{code}\nimport sys, json\nprint(json.dumps(sorted(sys.modules)))"
    out = subprocess.run(
        [sys.executable, "-c", probe], check=True, capture_output=True, text=True
    ).stdout
    return json.loads(out.strip().splitlines()[-1])


def test_package_import_pulls_in_no_heavy_dependency() -> None:
    loaded = _modules_after(
        "import rag_rerank_plugins as r\n"
        "r.ModelSpec('x'); r.get_pool(); r.ModelPool; r.RagRerankError\n"
        "import rag_rerank_plugins.langchain, rag_rerank_plugins.llama_index\n"
        "import rag_rerank_plugins.testing"
    )
    leaked = [m for m in loaded if m.split(".")[0] in HEAVY]
    assert leaked == []


def test_fake_backends_work_without_torch() -> None:
    loaded = _modules_after(
        "from rag_rerank_plugins import get_pool\n"
        "from rag_rerank_plugins.testing import fake_reranker_spec, fake_embedder_spec\n"
        "assert get_pool().score_pairs(fake_reranker_spec(), [('a b', 'a')]) == [0.5]\n"
        "assert len(get_pool().embed(fake_embedder_spec(), ['x'])[0]) == 64"
    )
    assert "torch" not in loaded


def test_public_names() -> None:
    import rag_rerank_plugins as pkg

    for name in pkg.__all__:
        assert getattr(pkg, name) is not None
    shown = set(dir(pkg))
    assert set(pkg.__all__) <= shown
    extra = shown - set(pkg.__all__)  # module dunders (__file__, __name__), no private helpers
    assert all(name.startswith("__") for name in extra), sorted(extra)


def test_remote_and_fake_specs_never_import_torch() -> None:
    loaded = _modules_after(
        "from rag_rerank_plugins import ModelPool, ModelSpec\n"
        "pool = ModelPool()\n"
        "pool.key(ModelSpec('http://127.0.0.1:9', backend='remote-reranker', device='auto'))\n"
        "pool.key(ModelSpec('f', backend='fake-embedder', device='auto', dtype='auto'))"
    )
    assert "torch" not in loaded
