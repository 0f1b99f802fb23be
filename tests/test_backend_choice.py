"""``backend="auto"``: the measured-fastest backend for the CPU kind, never a surprise.

The CPU kind comes from ``RAG_RERANK_CPU_KIND`` here, never the host's flags, so every machine
runs every case. What a user relies on: AMX and AVX512-BF16 CPUs get OpenVINO for small
embedders only when it is installed, the dtype is BF16 or FP32 and every option given means
something to it; AVX512-BF16 CPUs get it for small rerankers in BF16 only; everything else keeps
torch (measured level there); the adapter holds the concrete name, so its
pool key (one load) equals that of an adapter naming the backend; a bad override or a bare
``ModelSpec(backend="auto")`` says what to do; a pick that cannot load the model falls back to
torch once, with a warning, and is not made again in the process, while a backend the user names
keeps failing with its own error.
"""

from __future__ import annotations

import importlib.util
import json
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

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


@pytest.mark.parametrize("bf16_policy", ["1", "0"])
@pytest.mark.parametrize("kind", ["avx512_bf16", "avx2", "other"])
def test_torch_everywhere_but_where_openvino_was_measured_faster(
    monkeypatch: pytest.MonkeyPatch, small: str, kind: str, bf16_policy: str
) -> None:
    """AVX512-BF16 without AMX (measured on an AMD Zen 4 EPYC): small embedders get OpenVINO in
    BF16 and FP32, small rerankers in BF16 only (FP32 was level); ``dtype="auto"`` counts as
    what the CPU policy makes it. AVX2-only and other CPUs keep torch for everything (nothing
    was measured there)."""
    monkeypatch.setenv("RAG_RERANK_CPU_KIND", kind)
    monkeypatch.setenv("RAG_RERANK_CPU_BF16", bf16_policy)
    cpu_has_native_bf16.cache_clear()
    try:
        assert cpu_kind() == kind
        measured = kind == "avx512_bf16" and OPENVINO
        embedder = "openvino-embedder" if measured else "sentence-transformers"
        reranker = "openvino-cross-encoder" if measured else "cross-encoder"
        auto_reranker = reranker if bf16_policy == "1" else "cross-encoder"
        assert choose_backend("reranker", device="cpu", model=small) == auto_reranker
        assert choose_backend("reranker", (), "cpu", "bf16", small) == reranker
        assert choose_backend("reranker", (), "cpu", "float32", small) == "cross-encoder"
        assert choose_backend("embedder", device="cpu", model=small) == embedder
        for dtype in ("bfloat16", "float32"):
            assert choose_backend("embedder", (), "cpu", dtype, small) == embedder
        for k in ("embedder", "reranker"):
            torch_ = "sentence-transformers" if k == "embedder" else "cross-encoder"
            assert choose_backend(k, (), "cpu", "float16", small) == torch_
            assert choose_backend(k, (), "cuda", "bfloat16", small) == torch_
            large = model_dir(Path(small).parent / "large", 1024)  # XLM-R large: level
            assert choose_backend(k, (), "cpu", "bfloat16", large) == torch_
        from rag_rerank_plugins.llama_index import SharedEmbedding, SharedRerankPostprocessor

        for cls in (SharedEmbeddings, SharedEmbedding):
            assert cls(model_name=small, backend="auto", device="cpu").backend == embedder
        for rerank_cls in (SharedRerankCompressor, SharedRerankPostprocessor):
            built = rerank_cls(model=small, backend="auto", device="cpu")
            assert built.backend == auto_reranker
    finally:
        monkeypatch.undo()
        cpu_has_native_bf16.cache_clear()


@pytest.fixture
def reranker_pick(monkeypatch: pytest.MonkeyPatch) -> None:
    """The measured table as it was before torch caught up for rerankers (OpenVINO for small
    rerankers on AMX): the mechanism under test does not depend on which row is measured."""
    from rag_rerank_plugins import backend_choice

    table = {**backend_choice._MEASURED_FASTEST}
    table["reranker", "amx"] = backend_choice._Pick("openvino-cross-encoder", 384)
    monkeypatch.setattr(backend_choice, "_MEASURED_FASTEST", table)


@pytest.mark.skipif(not OPENVINO, reason="needs the openvino extra")
def test_amx_small_embedders_get_openvino(amx: None, small: str, tmp_path: Path) -> None:
    assert choose_backend("embedder", device="cpu", model=small) == "openvino-embedder"
    for dtype in ("bfloat16", "float32"):  # one query 1.7x faster than torch in both
        assert choose_backend("embedder", (), "cpu", dtype, small) == "openvino-embedder"
    # Rerankers: level with torch, which needs no conversion. Large or unknown size: torch.
    assert choose_backend("reranker", device="cpu", model=small) == "cross-encoder"
    large = model_dir(tmp_path / "large", 1024)
    assert choose_backend("embedder", device="cpu", model=large) == "sentence-transformers"
    assert choose_backend("embedder", device="cpu", model=str(tmp_path / "nowhere")) == (
        "sentence-transformers"
    )
    assert choose_backend("embedder", device="cpu") == "sentence-transformers"


def test_amx_without_openvino_keeps_torch(
    amx: None, small: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "openvino" else real(name, *a)
    )
    assert choose_backend("embedder", device="cpu", model=small) == "sentence-transformers"


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
    amx: None, reranker_pick: None, small: str, options: dict[str, object], device: str, dtype: str
) -> None:
    assert choose_backend("reranker", options, device, dtype, small) == "cross-encoder"


@pytest.mark.skipif(not OPENVINO, reason="needs the openvino extra")
def test_embedder_options_openvino_does_not_take_keep_torch(amx: None, small: str) -> None:
    pick = choose_backend("embedder", {"prompts": {"query": "q: "}}, "cpu", "auto", small)
    assert pick == "sentence-transformers"


@pytest.mark.skipif(not OPENVINO, reason="needs the openvino extra")
def test_adapter_holds_the_pick_and_shares_the_pool_key(
    amx: None, reranker_pick: None, small: str
) -> None:
    auto = SharedRerankCompressor(model=small, backend="auto", device="cpu")
    named = SharedRerankCompressor(model=small, backend="openvino-cross-encoder", device="cpu")
    assert auto.backend == "openvino-cross-encoder"
    assert auto.spec == named.spec
    assert SharedEmbeddings(model_name=small, backend="auto", device="cpu").backend == (
        "openvino-embedder"
    )
    from rag_rerank_plugins.llama_index import SharedEmbedding, SharedRerankPostprocessor

    assert SharedEmbedding(model_name=small, backend="auto", device="cpu").backend == (
        "openvino-embedder"
    )

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
    amx: None,
    reranker_pick: None,
    tiny_ce_path: str,
    tmp_path: object,
    monkeypatch: pytest.MonkeyPatch,
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


# -- a pick that cannot load falls back to torch -------------------------------------------------


@pytest.fixture
def failing_openvino(
    amx: None, reranker_pick: None, monkeypatch: pytest.MonkeyPatch
) -> Iterator[dict[str, list[str]]]:
    """OpenVINO "installed" and picked on this AMX kind, but every load of it fails the way an
    export the runtime cannot do fails (a foreign exception in the loader)."""
    from rag_rerank_plugins import backend_choice
    from rag_rerank_plugins import backends as registry

    monkeypatch.setattr(backend_choice, "_installed", lambda modules: True)
    attempts: dict[str, list[str]] = {"openvino-cross-encoder": [], "openvino-embedder": []}

    def failing(name: str) -> Any:
        def load(spec: ModelSpec, provider: object) -> Any:
            attempts[name].append(spec.model)
            raise RuntimeError("Exporting the model to ONNX failed: unsupported operator")

        return load

    for name in attempts:
        row = registry._REGISTRY[name]
        monkeypatch.setitem(registry._REGISTRY, name, replace(row, target=failing(name)))
    backend_choice.forget_failed_picks()
    yield attempts
    backend_choice.forget_failed_picks()


def test_auto_pick_that_cannot_load_falls_back_to_torch_once(
    failing_openvino: dict[str, list[str]], tiny_ce_path: str, caplog: pytest.LogCaptureFixture
) -> None:
    """A retriever built per request with backend="auto": the first request falls back to
    torch with a warning; later adapters pick torch at once (no conversion retried per request),
    and the scores are the torch backend's."""
    from langchain_core.documents import Document

    from rag_rerank_plugins.backend_choice import failed_picks

    pool = ModelPool()
    docs = [Document(page_content=t, metadata={"i": i}) for i, t in enumerate(TEXTS)]
    named = SharedRerankCompressor(model=tiny_ce_path, backend="cross-encoder", pool=pool)
    want = [d.metadata for d in named.compress_documents(docs, "capital of France")]
    first = SharedRerankCompressor(model=tiny_ce_path, backend="auto", pool=pool)
    assert first.backend == "openvino-cross-encoder"
    with caplog.at_level("WARNING", logger="rag_rerank_plugins"):
        got = first.compress_documents(docs, "capital of France")
    assert [d.metadata for d in got] == want
    assert first.backend == "cross-encoder"
    assert "failed to load it" in caplog.text
    assert "using cross-encoder instead" in caplog.text
    assert ("openvino-cross-encoder", tiny_ce_path) in failed_picks()
    for _ in range(3):
        later = SharedRerankCompressor(model=tiny_ce_path, backend="auto", pool=pool)
        assert later.backend == "cross-encoder"
        assert [d.metadata for d in later.compress_documents(docs, "capital of France")] == want
    assert failing_openvino["openvino-cross-encoder"] == [tiny_ce_path]  # one attempt in all
    assert pool.spec_stats(named.spec)["loads"] == 1  # torch's model, loaded once
    loads = sorted((s["backend"], s["loads"], s["load_failures"]) for s in pool.stats().values())
    assert loads == [("cross-encoder", 1, 0), ("openvino-cross-encoder", 0, 1)]


async def test_auto_fallback_on_the_async_path(
    failing_openvino: dict[str, list[str]], tiny_ce_path: str
) -> None:
    from langchain_core.documents import Document

    pool = ModelPool()
    docs = [Document(page_content=t) for t in TEXTS]
    auto = SharedRerankCompressor(model=tiny_ce_path, backend="auto", pool=pool, top_n=3)
    got = await auto.acompress_documents(docs, "capital of France")
    assert len(got) == 3
    assert auto.backend == "cross-encoder"


def test_auto_embedder_falls_back_and_named_backends_never_do(
    failing_openvino: dict[str, list[str]], minilm_path: str
) -> None:
    from rag_rerank_plugins.exceptions import ModelLoadError

    pool = ModelPool()
    auto = SharedEmbeddings(model_name=minilm_path, backend="auto", pool=pool)
    assert auto.backend == "openvino-embedder"
    vectors = auto.embed_documents(TEXTS)
    assert auto.backend == "sentence-transformers"
    named = SharedEmbeddings(model_name=minilm_path, backend="sentence-transformers", pool=pool)
    assert vectors == named.embed_documents(TEXTS)
    # Naming the failing backend is a choice: its load error is the answer, every time.
    chosen = SharedEmbeddings(model_name=minilm_path, backend="openvino-embedder", pool=pool)
    for _ in range(2):
        with pytest.raises(ModelLoadError, match="unsupported operator"):
            chosen.embed_documents(TEXTS)
    assert chosen.backend == "openvino-embedder"


@pytest.mark.parametrize("option", ["intra_op_threads", "cache_dir"])
def test_options_only_the_pick_takes_keep_its_load_error(
    failing_openvino: dict[str, list[str]], minilm_path: str, tmp_path: Path, option: str
) -> None:
    """Options torch does not take (the export ``cache_dir``, ``intra_op_threads``, ...) tie the
    adapter to auto's pick: when it cannot load, its load error is the answer (saying that auto
    made the pick), every time, not a torch ConfigurationError about those options right
    after a warning saying torch serves the call."""
    from rag_rerank_plugins.backend_choice import failed_picks
    from rag_rerank_plugins.exceptions import ModelLoadError

    value = {"intra_op_threads": 1, "cache_dir": str(tmp_path / "exports")}[option]
    pool = ModelPool()
    auto = SharedEmbeddings(
        model_name=minilm_path, backend="auto", model_kwargs={option: value}, pool=pool
    )
    assert auto.backend == "openvino-embedder"
    for _ in range(2):
        with pytest.raises(ModelLoadError, match="unsupported operator") as info:
            auto.embed_query("a query")
        message = str(info.value)
        assert message.count("backend='auto' picked openvino-embedder") == 1, message
        assert "cannot fall back to sentence-transformers" in message
        assert option in message
    assert auto.backend == "openvino-embedder"
    assert failed_picks() == frozenset()  # torch would refuse the options: the pick stays
    again = SharedEmbeddings(
        model_name=minilm_path, backend="auto", model_kwargs={option: value}, pool=pool
    )
    assert again.backend == "openvino-embedder"


@pytest.mark.skipif(not OPENVINO, reason="needs the openvino extra")
def test_openvino_that_does_not_import_falls_back_to_torch(
    amx: None,
    minilm_path: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """OpenVINO installed (so picked) but failing to import: the first call falls back to
    torch with a warning (a MissingDependencyError, where the loader tests raise ModelLoadError)."""
    import builtins
    import sys

    from rag_rerank_plugins import backend_choice

    real = builtins.__import__

    def no_openvino(name: str, *args: Any, **kwargs: Any) -> Any:
        if name == "openvino" or name.startswith("openvino."):
            raise ImportError("simulated: openvino does not import", name="openvino")
        return real(name, *args, **kwargs)

    monkeypatch.setenv("RAG_RERANK_ONNX_CACHE", str(tmp_path))
    for name in [m for m in sys.modules if m == "openvino" or m.startswith("openvino.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setattr(builtins, "__import__", no_openvino)
    backend_choice.forget_failed_picks()
    try:
        auto = SharedEmbeddings(model_name=minilm_path, backend="auto", pool=ModelPool())
        assert auto.backend == "openvino-embedder"
        with caplog.at_level("WARNING", logger="rag_rerank_plugins"):
            vector = auto.embed_query("a query")
        assert len(vector) == 384
        assert auto.backend == "sentence-transformers"
        assert "using sentence-transformers instead" in caplog.text
    finally:
        backend_choice.forget_failed_picks()


def test_a_missing_model_is_not_retried_on_torch(
    failing_openvino: dict[str, list[str]],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from rag_rerank_plugins import backends as registry
    from rag_rerank_plugins.exceptions import ModelNotFoundError

    small = model_dir(tmp_path / "gone", 384)

    def not_found(spec: ModelSpec, provider: object) -> Any:
        raise ModelNotFoundError(spec.model, "openvino-cross-encoder", "no such folder")

    row = replace(registry._REGISTRY["openvino-cross-encoder"], target=not_found)
    monkeypatch.setitem(registry._REGISTRY, "openvino-cross-encoder", row)
    auto = SharedRerankCompressor(model=small, backend="auto", pool=ModelPool())
    with pytest.raises(ModelNotFoundError):
        auto.rank_texts("q", TEXTS)
    assert auto.backend == "openvino-cross-encoder"  # nothing to fall back to: the model is gone


def test_openvino_only_options_on_a_cpu_where_auto_keeps_torch_say_auto_picked(
    amx: None, small: str
) -> None:
    """On a CPU where auto keeps torch for rerankers, cache_dir named 'cross-encoder', a
    backend the user never asked for, with no word of auto."""
    with pytest.raises(ValueError, match=r"backend='auto' picked 'cross-encoder'.*cache_dir"):
        SharedRerankCompressor(
            model=small, backend="auto", device="cpu", model_kwargs={"cache_dir": "/tmp/x"}
        )
