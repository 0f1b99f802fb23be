"""``backend="auto"``: the measured-fastest backend for the CPU kind, never a surprise.

The CPU kind comes from ``RAG_RERANK_CPU_KIND`` here, never the host's flags, so every machine
runs every case. What a user relies on: AMX CPUs get OpenVINO for rerankers only when it is
installed, the dtype is BF16 and every option given means something to it; everything else keeps
torch; the adapter holds the concrete name, so its pool key (one load) equals that of an adapter
naming the backend; a bad override or a bare ``ModelSpec(backend="auto")`` says what to do.
"""

from __future__ import annotations

import importlib.util
import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from rag_rerank_plugins import ModelPool, ModelSpec, _cpu
from rag_rerank_plugins.backend_choice import choose_backend, cpu_kind
from rag_rerank_plugins.exceptions import ConfigurationError
from rag_rerank_plugins.langchain import SharedEmbeddings, SharedRerankCompressor
from rag_rerank_plugins.policy import cpu_has_native_bf16

TEXTS = ["Paris is the capital of France.", "Bananas are yellow.", "France borders Spain."]
OPENVINO = all(importlib.util.find_spec(m) for m in ("openvino", "onnxruntime", "onnx"))


def model_dir(root: Path, hidden_size: int) -> str:
    root.mkdir(parents=True, exist_ok=True)
    (root / "config.json").write_text(json.dumps({"hidden_size": hidden_size}))
    return str(root)


@pytest.fixture
def small(tmp_path: Path) -> str:
    """A model folder of the measured size (MiniLM: hidden size 384)."""
    return model_dir(tmp_path / "small", 384)


@pytest.fixture
def amx(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    monkeypatch.setenv("RAG_RERANK_CPU_KIND", "amx")
    monkeypatch.setenv("RAG_RERANK_CPU_BF16", "1")
    cpu_has_native_bf16.cache_clear()  # it reads the override once per process
    yield
    monkeypatch.undo()
    cpu_has_native_bf16.cache_clear()


@pytest.mark.parametrize("kind", ["avx512_bf16", "avx2", "other"])
def test_torch_everywhere_but_amx(monkeypatch: pytest.MonkeyPatch, small: str, kind: str) -> None:
    monkeypatch.setenv("RAG_RERANK_CPU_KIND", kind)
    assert cpu_kind() == kind
    assert choose_backend("reranker", device="cpu", model=small) == "cross-encoder"
    assert choose_backend("embedder", device="cpu", model=small) == "sentence-transformers"


@pytest.mark.skipif(not OPENVINO, reason="needs the openvino extra")
def test_amx_small_models_get_openvino(amx: None, small: str, tmp_path: Path) -> None:
    assert choose_backend("reranker", device="cpu", model=small) == "openvino-cross-encoder"
    assert choose_backend("embedder", device="cpu", model=small) == "openvino-embedder"
    for dtype in ("bfloat16", "float32"):  # both measured faster than torch's
        assert choose_backend("reranker", (), "cpu", dtype, small) == "openvino-cross-encoder"
    # Measured slower: the XLM-R large shape; unknown size: no pick on belief.
    large = model_dir(tmp_path / "large", 1024)
    assert choose_backend("reranker", device="cpu", model=large) == "cross-encoder"
    assert choose_backend("reranker", device="cpu", model=str(tmp_path / "nowhere")) == (
        "cross-encoder"
    )
    assert choose_backend("reranker", device="cpu") == "cross-encoder"


def test_amx_without_openvino_keeps_torch(
    amx: None, small: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "openvino" else real(name, *a)
    )
    assert choose_backend("reranker", device="cpu", model=small) == "cross-encoder"


@pytest.mark.skipif(not OPENVINO, reason="needs the openvino extra")
@pytest.mark.parametrize(
    ("options", "device", "dtype"),
    [
        ({"cpu_kernels": False}, "cpu", "auto"),  # a torch-only option keeps its meaning
        ({"automodel_args": {}}, "cpu", "auto"),
        ({}, "cpu", "float16"),  # no FP16 hint on the CPU: torch
        ({}, "cuda", "auto"),
        ({}, "mps", "auto"),
    ],
)
def test_amx_keeps_torch_when_openvino_was_not_measured_faster(
    amx: None, small: str, options: dict[str, object], device: str, dtype: str
) -> None:
    assert choose_backend("reranker", options, device, dtype, small) == "cross-encoder"


@pytest.mark.skipif(not OPENVINO, reason="needs the openvino extra")
def test_embedder_options_openvino_does_not_take_keep_torch(amx: None, small: str) -> None:
    pick = choose_backend("embedder", {"prompts": {"query": "q: "}}, "cpu", "auto", small)
    assert pick == "sentence-transformers"


@pytest.mark.skipif(not OPENVINO, reason="needs the openvino extra")
def test_adapter_holds_the_pick_and_shares_the_pool_key(amx: None, small: str) -> None:
    auto = SharedRerankCompressor(model=small, backend="auto", device="cpu")
    named = SharedRerankCompressor(model=small, backend="openvino-cross-encoder", device="cpu")
    assert auto.backend == "openvino-cross-encoder"
    assert auto.spec == named.spec
    assert SharedEmbeddings(model_name=small, backend="auto", device="cpu").backend == (
        "openvino-embedder"
    )
    from rag_rerank_plugins.llama_index import SharedRerankPostprocessor

    assert SharedRerankPostprocessor(model=small, backend="auto", device="cpu").backend == (
        "openvino-cross-encoder"
    )


def test_bad_override_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RAG_RERANK_CPU_KIND", "avx1024")
    with pytest.raises(ValueError, match="RAG_RERANK_CPU_KIND must be one of"):
        SharedRerankCompressor(model="m", backend="auto")


def test_bad_kind_is_a_clear_error() -> None:
    with pytest.raises(ConfigurationError, match="reranker' or 'embedder"):
        choose_backend("classifier")


def test_a_bare_spec_with_auto_says_what_to_do() -> None:
    with pytest.raises(ConfigurationError, match="choose_backend"):
        ModelPool().score_pairs(ModelSpec("m", backend="auto"), [("q", "p")])


def test_flags_decide_without_override(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("RAG_RERANK_CPU_KIND", raising=False)
    for flags, kind in [
        ({"avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile"}, "amx"),
        ({"avx2", "avx512f", "avx512_bf16"}, "avx512_bf16"),
        ({"avx2", "fma"}, "avx2"),
        ({"asimd"}, "other"),
    ]:
        monkeypatch.setattr(_cpu, "_cpu_flags", lambda f=flags: frozenset(f))
        assert cpu_kind() == kind


@pytest.mark.slow
@pytest.mark.skipif(not OPENVINO, reason="needs the openvino extra")
def test_auto_reranks_like_the_backend_it_names(
    amx: None, tiny_ce_path: str, tmp_path: object, monkeypatch: pytest.MonkeyPatch
) -> None:
    from langchain_core.documents import Document

    monkeypatch.setenv("RAG_RERANK_ONNX_CACHE", str(tmp_path))
    pool = ModelPool()
    docs = [Document(page_content=t, metadata={"i": i}) for i, t in enumerate(TEXTS)]
    auto = SharedRerankCompressor(model=tiny_ce_path, backend="auto", pool=pool, top_n=3)
    named = SharedRerankCompressor(
        model=tiny_ce_path, backend="openvino-cross-encoder", pool=pool, top_n=3
    )
    got = auto.compress_documents(docs, "a query")
    assert [d.metadata for d in got] == [
        d.metadata for d in named.compress_documents(docs, "a query")
    ]
    assert [s["loads"] for s in pool.stats().values()] == [1]  # one model, one load
