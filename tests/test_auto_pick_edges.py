"""``backend="auto"`` at its edges: what a user writes elsewhere in the package works with it too.

* Every spelling of a device or dtype that the adapters accept (``"CUDA"``, ``"cuda:0"``,
  ``"MPS"``, ``"bf16"``, ``"torch.float32"``, and ``RAG_RERANK_DEVICE=CUDA``) makes the pick its
  canonical name makes, so a GPU keeps torch and one model is one pool slot and one load;
  ``"AUTO"`` and ``" auto"`` mean ``"auto"``.
* The ONNX/OpenVINO export cache (option ``cache_dir``) is not read as the Hugging Face cache: a
  hub model's size is still known, so the pick does not change (and torch, which refuses
  ``cache_dir``, is not picked).
* When ``auto`` picks OpenVINO for an embedder, the model's named prompts behave as on torch:
  none prepended by default (vectors equal torch's) and ``prompt_name`` accepted.
* ``RAG_RERANK_EMBEDDER_BACKEND`` / ``RAG_RERANK_RERANKER_BACKEND`` set to ``auto`` reach
  ``SemanticCache`` and ``rag-rerank serve`` (the pick, as the adapters make it), and
  ``rag-rerank info`` says what ``auto`` resolves to.

The pick itself (per CPU kind, model size, options) and the fallback to torch after a failed
load are in ``tests/test_backend_choice.py``. The CPU kind always comes from
``RAG_RERANK_CPU_KIND`` (never the host's flags); the pick tests also take OpenVINO as
installed, so they run everywhere, while the tests that load it need the ``openvino`` extra.
"""

from __future__ import annotations

import importlib.util
import json
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from rag_rerank_plugins import ModelPool, backend_choice, cli
from rag_rerank_plugins.langchain import SharedEmbeddings, SharedRerankCompressor
from rag_rerank_plugins.policy import cpu_has_native_bf16
from rag_rerank_plugins.settings import get_settings

OPENVINO = all(importlib.util.find_spec(m) for m in ("openvino", "onnxruntime", "onnx"))
needs_openvino = pytest.mark.skipif(not OPENVINO, reason="needs the openvino extra")

TEXTS = [
    "Paris is the capital of France.",
    "Bananas are yellow and grow in bunches.",
    "France borders Spain and Italy.",
    "The mitochondria is the powerhouse of the cell.",
]
QUERY = "What is the capital of France?"


@pytest.fixture(scope="module")
def ov_cache(tmp_path_factory: pytest.TempPathFactory) -> str:
    """One ONNX/IR export cache for the module: each conversion runs once."""
    return str(tmp_path_factory.mktemp("ov-cache"))


@pytest.fixture
def amx(monkeypatch: pytest.MonkeyPatch, ov_cache: str) -> Iterator[None]:
    """An AMX CPU kind with the FP32 policy, export cache in tmp, settings read afresh."""
    monkeypatch.setenv("RAG_RERANK_CPU_KIND", "amx")
    monkeypatch.setenv("RAG_RERANK_CPU_BF16", "0")
    monkeypatch.setenv("RAG_RERANK_ONNX_CACHE", ov_cache)
    cpu_has_native_bf16.cache_clear()
    get_settings.cache_clear()
    backend_choice.forget_failed_picks()
    yield
    monkeypatch.undo()
    cpu_has_native_bf16.cache_clear()
    get_settings.cache_clear()
    backend_choice.forget_failed_picks()


@pytest.fixture
def openvino_installed(monkeypatch: pytest.MonkeyPatch) -> None:
    """The pick sees OpenVINO installed (nothing here loads it)."""
    monkeypatch.setattr(backend_choice, "_installed", lambda modules: True)


def _small_dir(root: Path, hidden: int = 384) -> str:
    """A model folder of the measured size (MiniLM: hidden size 384)."""
    root.mkdir(parents=True, exist_ok=True)
    (root / "config.json").write_text(json.dumps({"hidden_size": hidden}))
    return str(root)


# -- spellings --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("alias", "canonical"),
    [
        ("fp32", "float32"),
        ("bf16", "bfloat16"),
        ("torch.float32", "float32"),
        ("BFloat16", "bfloat16"),
    ],
)
def test_dtype_spelling_does_not_change_the_pick(
    amx: None, openvino_installed: None, tmp_path: Path, alias: str, canonical: str
) -> None:
    small = _small_dir(tmp_path / "small")
    a = SharedEmbeddings(model_name=small, backend="auto", device="cpu", dtype=alias)
    b = SharedEmbeddings(model_name=small, backend="auto", device="cpu", dtype=canonical)
    assert a.backend == b.backend == "openvino-embedder"
    assert a.spec == b.spec  # one pool slot, one load
    assert backend_choice.choose_backend("embedder", (), "cpu", alias, small) == "openvino-embedder"


@pytest.mark.parametrize("device", ["CUDA", "Cuda:0", " cuda", "MPS", "env:CUDA"])
def test_gpu_device_spelling_keeps_torch(
    amx: None,
    openvino_installed: None,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    device: str,
) -> None:
    """OpenVINO runs on the CPU only: any spelling of a GPU device keeps torch (a pick of
    OpenVINO there would fail to load with an error about a backend nobody chose)."""
    small = _small_dir(tmp_path / "small")
    if device.startswith("env:"):
        monkeypatch.setenv("RAG_RERANK_DEVICE", device.removeprefix("env:"))
        get_settings.cache_clear()
        adapter = SharedEmbeddings(model_name=small, backend="auto")
    else:
        adapter = SharedEmbeddings(model_name=small, backend="auto", device=device)
    assert adapter.backend == "sentence-transformers", adapter.spec
    assert adapter.spec.device in ("cuda:0", "mps")


@pytest.mark.parametrize("spelling", ["AUTO", " auto", "Auto "])
def test_auto_in_any_case_is_auto(
    amx: None, openvino_installed: None, tmp_path: Path, spelling: str
) -> None:
    small = _small_dir(tmp_path / "small")
    assert SharedEmbeddings(model_name=small, backend=spelling, device="cpu").backend == (
        "openvino-embedder"
    )
    assert SharedRerankCompressor(model=small, backend=spelling, device="cpu").backend == (
        "cross-encoder"
    )


# -- the export cache -------------------------------------------------------------------------


def test_export_cache_dir_does_not_hide_the_model_size(
    amx: None, openvino_installed: None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A hub model in the Hugging Face cache with ``cache_dir`` (the export cache) given: the
    pick reads the size from the Hugging Face cache, so it is OpenVINO as without ``cache_dir``;
    torch, which does not take ``cache_dir``, would make the adapter impossible to build."""
    import huggingface_hub.constants as hub_constants

    from rag_rerank_plugins._model_files import json_int_field

    hub = tmp_path / "hub"
    repo = hub / "models--acme--mini-emb"
    snapshot = repo / "snapshots" / "abc123"
    snapshot.mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("abc123")
    (snapshot / "config.json").write_text(json.dumps({"hidden_size": 384}))
    monkeypatch.setattr(hub_constants, "HF_HUB_CACHE", str(hub))
    json_int_field.cache_clear()
    try:
        choose = backend_choice.choose_backend
        assert choose("embedder", {}, "cpu", "auto", "acme/mini-emb") == "openvino-embedder"
        export = {"cache_dir": str(tmp_path / "exports")}
        assert choose("embedder", export, "cpu", "auto", "acme/mini-emb") == "openvino-embedder"
        adapter = SharedEmbeddings(model_name="acme/mini-emb", backend="auto", model_kwargs=export)
        assert adapter.backend == "openvino-embedder"
    finally:
        json_int_field.cache_clear()


# -- named prompts when auto picks OpenVINO ---------------------------------------------------


@pytest.fixture(scope="module")
def prompted_model(tmp_path_factory: pytest.TempPathFactory, minilm_path: str) -> str:
    """MiniLM with E5-style prompts declared in its sentence-transformers config."""
    folder = tmp_path_factory.mktemp("models") / "minilm-prompts"
    shutil.copytree(minilm_path, folder)
    config_path = folder / "config_sentence_transformers.json"
    config = json.loads(config_path.read_text())
    config["prompts"] = {"query": "query: ", "document": "passage: "}
    config["default_prompt_name"] = None
    config_path.write_text(json.dumps(config))
    return str(folder)


@needs_openvino
def test_auto_embedder_on_a_prompted_model_equals_torch(
    amx: None, prompted_model: str, pool: ModelPool
) -> None:
    """Like HuggingFaceEmbeddings and the torch backend, the model's query/document prompts are
    not prepended by default: auto's OpenVINO vectors equal torch FP32's (1e-4), in LangChain
    and LlamaIndex, and auto shares the one load of the backend it names."""
    from rag_rerank_plugins.llama_index import SharedEmbedding

    kw: dict[str, Any] = {"device": "cpu", "dtype": "float32", "pool": pool}
    auto = SharedEmbeddings(model_name=prompted_model, backend="auto", **kw)
    named = SharedEmbeddings(model_name=prompted_model, backend="openvino-embedder", **kw)
    torch_ = SharedEmbeddings(model_name=prompted_model, backend="sentence-transformers", **kw)
    assert auto.backend == "openvino-embedder"
    assert auto.spec == named.spec
    np.testing.assert_allclose(auto.embed_query(QUERY), torch_.embed_query(QUERY), atol=1e-4)
    got = np.array(auto.embed_documents(TEXTS))
    np.testing.assert_allclose(got, torch_.embed_documents(TEXTS), atol=1e-4)
    assert np.array(named.embed_documents(TEXTS)).tolist() == got.tolist()
    li_auto = SharedEmbedding(model_name=prompted_model, backend="auto", **kw)
    li_torch = SharedEmbedding(model_name=prompted_model, backend="sentence-transformers", **kw)
    np.testing.assert_allclose(
        li_auto.get_query_embedding(QUERY), li_torch.get_query_embedding(QUERY), atol=1e-4
    )
    assert pool.spec_stats(named.spec)["loads"] == 1
    assert pool.spec_stats(named.spec)["backend"] == "openvino-embedder"  # the pick is reported


@needs_openvino
def test_auto_embedder_takes_prompt_name(amx: None, prompted_model: str, pool: ModelPool) -> None:
    """``query_encode_kwargs={"prompt_name": "query"}`` (HuggingFaceEmbeddings' way to ask for
    the model's query prompt) works when auto picked OpenVINO, with torch's result."""
    kw: dict[str, Any] = {
        "device": "cpu",
        "dtype": "float32",
        "pool": pool,
        "query_encode_kwargs": {"prompt_name": "query"},
    }
    auto = SharedEmbeddings(model_name=prompted_model, backend="auto", **kw)
    torch_ = SharedEmbeddings(model_name=prompted_model, backend="sentence-transformers", **kw)
    assert auto.backend == "openvino-embedder"
    np.testing.assert_allclose(auto.embed_query(QUERY), torch_.embed_query(QUERY), atol=1e-4)
    plain = SharedEmbeddings(
        model_name=prompted_model, backend="auto", **{**kw, "query_encode_kwargs": None}
    )
    assert not np.allclose(auto.embed_query(QUERY), plain.embed_query(QUERY), atol=1e-3)


# -- "auto" from the shared RAG_RERANK_*_BACKEND variables ------------------------------------


def test_auto_from_the_environment_reaches_semantic_cache_and_server(
    amx: None,
    openvino_installed: None,
    minilm_path: str,
    tiny_ce_path: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The variables are documented for "adapters, server": SemanticCache and ``rag-rerank
    serve`` make the adapters' pick, per model."""
    from rag_rerank_plugins.semantic_cache import SemanticCache
    from rag_rerank_plugins.server import ServerConfig

    monkeypatch.setenv("RAG_RERANK_EMBEDDER_BACKEND", "auto")
    monkeypatch.setenv("RAG_RERANK_RERANKER_BACKEND", "auto")
    get_settings.cache_clear()
    assert SharedEmbeddings(model_name=minilm_path).backend == "openvino-embedder"
    served = ServerConfig.from_env(embedders=[minilm_path], rerankers=[f"r={tiny_ce_path}"])
    assert {m.name: m.spec.backend for m in served.served_models()} == {
        "r": "cross-encoder",
        minilm_path: "openvino-embedder",
    }
    cache = SemanticCache(embedder=minilm_path, reranker=tiny_ce_path)
    assert cache.embedder.backend == "openvino-embedder"
    assert cache.reranker is not None
    assert cache.reranker.backend == "cross-encoder"


def test_info_says_what_auto_resolves_to(
    amx: None, openvino_installed: None, capsys: pytest.CaptureFixture[str]
) -> None:
    assert cli.main(["info"]) == 0
    out = capsys.readouterr().out
    assert "backend 'auto' (amx CPU), for these: reranker -> cross-encoder, embedder -> " in out
