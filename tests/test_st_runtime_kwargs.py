"""sentence-transformers' ONNX / OpenVINO arguments, as a migrating user passes them.

``CrossEncoder(name, backend="onnx", model_kwargs={"file_name": ..., "provider": ...})`` and
``backend="openvino", model_kwargs={"ov_config": {...}}`` reach us through LangChain's
``HuggingFaceCrossEncoder(model_kwargs=...)``, LlamaIndex's ``cross_encoder_kwargs`` and
``HuggingFaceEmbeddings(model_kwargs=...)``; and ``backend="onnx"`` / ``"openvino"`` / ``"torch"``
is how sentence-transformers users spell the runtime on our classes too. Each must mean what it
means there (``_stock._runtime_kwargs``, ``backends._repo_file``), or be refused before any
model work with a message that says what to do.

The repository's own file is built here as optimum writes it (inputs ``input_ids``,
``attention_mask``, ``token_type_ids``; output ``logits``), plus a dynamically quantized copy; the
reference is onnxruntime running that file with ``CrossEncoder.predict``'s sigmoid.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest

from rag_rerank_plugins import ConfigurationError, ModelPool
from rag_rerank_plugins.langchain import (
    SharedCrossEncoder,
    SharedEmbeddings,
    SharedRerankCompressor,
)

pytest.importorskip("onnxruntime")
pytest.importorskip("sentence_transformers")

PAIRS = [
    ("what is a cat", "a cat is a small domesticated animal"),
    ("what is a cat", "dogs bark at night and sleep by day, " * 3),
    ("why is the sky blue", "Rayleigh scattering of sunlight by the air"),
    ("", "an empty query"),
    ("Qu'est-ce que l'énergie ?", "Die Zelle — 細胞 — uses energy. " * 4),
]
INPUTS = ["input_ids", "attention_mask", "token_type_ids"]


@pytest.fixture(scope="module")
def repo(tmp_path_factory: pytest.TempPathFactory, tiny_ce_path: str) -> Path:
    """A copy of the tiny cross-encoder shipping ``onnx/model.onnx`` (optimum's layout and
    names) and ``onnx/model_qint8_avx512_vnni.onnx`` (dynamic int8 of it)."""
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from rag_rerank_plugins.backends._onnx_common import quantize_int8

    folder = tmp_path_factory.mktemp("repo") / "ce"
    shutil.copytree(tiny_ce_path, folder)
    model = AutoModelForSequenceClassification.from_pretrained(folder).eval()
    tokenizer = AutoTokenizer.from_pretrained(folder)

    class Logits(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.model = model

        def forward(self, ids: Any, mask: Any, types: Any) -> Any:
            return self.model(input_ids=ids, attention_mask=mask, token_type_ids=types).logits

    sample = tokenizer(["a q", "b"], ["a passage of words", "p"], padding=True, return_tensors="pt")
    (folder / "onnx").mkdir()
    axes = {n: {0: "batch", 1: "sequence"} for n in INPUTS}
    torch.onnx.export(
        Logits(),
        tuple(sample[n] for n in INPUTS),
        str(folder / "onnx" / "model.onnx"),
        input_names=INPUTS,
        output_names=["logits"],
        dynamic_axes={**axes, "logits": {0: "batch"}},
        dynamo=False,
    )
    quantize_int8(folder / "onnx" / "model.onnx", folder / "onnx" / "model_qint8_avx512_vnni.onnx")
    try:  # the IRs optimum-intel saves: openvino/openvino_model.xml (+ .bin), FP32 weights
        import openvino as ov
    except ImportError:
        return folder
    (folder / "openvino").mkdir()
    ir = ov.convert_model(str(folder / "onnx" / "model.onnx"))
    ov.save_model(ir, str(folder / "openvino" / "openvino_model.xml"), compress_to_fp16=False)
    # Another task's IR (token vectors, as an embedder's): must not be read as scores.
    body = AutoModelForSequenceClassification.from_pretrained(folder).base_model.eval()

    class Tokens(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.body = body

        def forward(self, input_ids: Any, attention_mask: Any, token_type_ids: Any) -> Any:
            return self.body(input_ids, attention_mask, token_type_ids=token_type_ids)[0]

    example = tuple(sample[n] for n in INPUTS)
    ov.save_model(
        ov.convert_model(Tokens(), example_input=example),
        str(folder / "openvino" / "openvino_tokens.xml"),
    )
    ov.save_model(  # a graph whose inputs are not the tokenizer's
        ov.convert_model(Logits(), example_input=example),
        str(folder / "openvino" / "openvino_renamed.xml"),
    )
    return folder


def direct(repo: Path, file_name: str) -> list[float]:
    """onnxruntime on the file, one pair at a time, with predict's sigmoid: the reference."""
    import numpy as np
    import onnxruntime as ort
    from transformers import AutoTokenizer

    session = ort.InferenceSession(str(repo / file_name), providers=["CPUExecutionProvider"])
    tokenizer = AutoTokenizer.from_pretrained(repo)
    out = []
    for q, p in PAIRS:
        enc = tokenizer(q, p, truncation=True, max_length=512, return_tensors="np")
        logit = session.run(None, {n: enc[n].astype(np.int64) for n in INPUTS})[0][0, 0]
        out.append(float(1 / (1 + np.exp(-logit))))
    return out


@pytest.fixture
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("RAG_RERANK_ONNX_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def stock(repo: Path, model_kwargs: dict[str, Any]) -> SharedCrossEncoder:
    """HuggingFaceCrossEncoder(model_name=..., model_kwargs=...) with only the import swapped."""
    return SharedCrossEncoder(model_name=str(repo), model_kwargs=model_kwargs, pool=ModelPool())


# -- backend names in sentence-transformers' sense ---------------------------------------------


@pytest.mark.parametrize(
    ("name", "reranker", "embedder"),
    [
        ("torch", "cross-encoder", "sentence-transformers"),
        ("onnx", "onnx-cross-encoder", "onnx-sentence-transformers"),
        ("openvino", "openvino-cross-encoder", "openvino-embedder"),
    ],
)
def test_top_level_backend_takes_sentence_transformers_names(
    tiny_ce_path: str, minilm_path: str, name: str, reranker: str, embedder: str
) -> None:
    if name == "openvino":
        pytest.importorskip("openvino")
    from rag_rerank_plugins.llama_index import SharedEmbedding, SharedRerankPostprocessor

    pool = ModelPool()
    assert SharedRerankCompressor(model=tiny_ce_path, backend=name, pool=pool).backend == reranker
    assert SharedCrossEncoder(model_name=tiny_ce_path, backend=name, pool=pool).backend == reranker
    assert (
        SharedRerankPostprocessor(model=tiny_ce_path, backend=name, pool=pool).backend == reranker
    )
    assert SharedEmbeddings(model_name=minilm_path, backend=name, pool=pool).backend == embedder
    assert SharedEmbedding(model_name=minilm_path, backend=name, pool=pool).backend == embedder


def test_unknown_backend_still_lists_ours(tiny_ce_path: str) -> None:
    with pytest.raises(ValueError, match="openvino-cross-encoder"):
        SharedRerankCompressor(model=tiny_ce_path, backend="openvin", pool=ModelPool())


# -- the translation, refused before any model work ---------------------------------------------


@pytest.mark.parametrize(
    ("nested", "match"),
    [
        ({"provider": "CUDAExecutionProvider"}, "runs on the CPU"),
        ({"export": "yes"}, "must be a bool"),
        ({"file_name": "/abs/model.onnx"}, "relative to it"),
        ({"file_name": "onnx/model.bin"}, "must name an .onnx"),
        ({"ov_config": {"INFERENCE_PRECISION_HINT": "f16"}}, "'f32' or 'bf16'"),
        ({"ov_config": 3}, "dict or the path of a JSON file"),
    ],
)
def test_bad_runtime_arguments_are_refused_at_construction(
    tiny_ce_path: str, nested: dict[str, Any], match: str
) -> None:
    pytest.importorskip("openvino")
    kwargs = {"backend": "openvino", "model_kwargs": nested}
    if "provider" in nested:
        kwargs["backend"] = "onnx"
    with pytest.raises(ValueError, match=match):
        SharedCrossEncoder(model_name=tiny_ce_path, model_kwargs=kwargs, pool=ModelPool())


def test_ov_config_on_onnxruntime_and_file_name_on_embedders_are_refused(
    tiny_ce_path: str, minilm_path: str
) -> None:
    with pytest.raises(ValueError, match="is for backend='openvino'"):
        stock(Path(tiny_ce_path), {"backend": "onnx", "model_kwargs": {"ov_config": {}}})
    with pytest.raises(ValueError, match="run it with backend='openvino'"):
        stock(
            Path(tiny_ce_path),
            {"backend": "onnx", "model_kwargs": {"file_name": "openvino/openvino_model.xml"}},
        )


def test_translation_keeps_meanings(tiny_ce_path: str, tmp_path: Path) -> None:
    pytest.importorskip("openvino")
    path = Path(tiny_ce_path)
    # provider: the CPU one is what ours runs; export=True: from the weights, file_name ignored.
    onnx = stock(path, {"backend": "onnx", "model_kwargs": {"provider": "CPUExecutionProvider"}})
    assert onnx.backend == "onnx-cross-encoder"
    assert "file_name" not in onnx.model_kwargs
    exported = stock(
        path, {"backend": "onnx", "model_kwargs": {"export": True, "file_name": "model.onnx"}}
    )
    assert "file_name" not in exported.model_kwargs
    # subfolder joins file_name, as sentence-transformers' backend_should_export does.
    sub = stock(
        path, {"backend": "onnx", "model_kwargs": {"subfolder": "onnx", "file_name": "m.onnx"}}
    )
    assert sub.model_kwargs["file_name"] == "onnx/m.onnx"
    # ov_config: the hint is the dtype, the rest OpenVINO's; a JSON file works as a dict.
    config = tmp_path / "ov.json"
    config.write_text(json.dumps({"INFERENCE_PRECISION_HINT": "bf16", "NUM_STREAMS": 1}))
    ov = stock(path, {"backend": "openvino", "model_kwargs": {"ov_config": str(config)}})
    assert ov.dtype == "bfloat16"
    assert ov.model_kwargs["ov_config"] == {"NUM_STREAMS": 1}
    with pytest.raises(ValueError, match="disagree"):
        SharedCrossEncoder(
            model_name=tiny_ce_path,
            dtype="float32",
            model_kwargs={
                "backend": "openvino",
                "model_kwargs": {"ov_config": {"INFERENCE_PRECISION_HINT": "bf16"}},
            },
            pool=ModelPool(),
        )


def test_llama_index_cross_encoder_kwargs_take_the_same_arguments(tiny_ce_path: str) -> None:
    from rag_rerank_plugins.llama_index import SharedRerankPostprocessor

    post = SharedRerankPostprocessor(
        model=tiny_ce_path,
        cross_encoder_kwargs={"backend": "onnx", "model_kwargs": {"file_name": "onnx/model.onnx"}},
        pool=ModelPool(),
    )
    assert post.backend == "onnx-cross-encoder"
    assert post.model_kwargs["file_name"] == "onnx/model.onnx"


# -- the repository's file really runs -----------------------------------------------------------


def test_file_name_runs_the_repository_file(repo: Path, cache: Path) -> None:
    from rag_rerank_plugins.backends._onnx_common import export_count

    before = export_count()
    fp32 = stock(repo, {"backend": "onnx", "model_kwargs": {"file_name": "onnx/model.onnx"}})
    got = fp32.score(PAIRS)
    assert got == pytest.approx(direct(repo, "onnx/model.onnx"), abs=1e-5)
    assert "onnx/model.onnx" in fp32.stats()["kernels"]
    # A bare name is looked up under onnx/ too; the quantized file is what runs, not our export.
    q8 = stock(
        repo, {"backend": "onnx", "model_kwargs": {"file_name": "model_qint8_avx512_vnni.onnx"}}
    )
    got8 = q8.score(PAIRS)
    assert got8 != pytest.approx(got, abs=1e-6)
    assert got8 == pytest.approx(direct(repo, "onnx/model_qint8_avx512_vnni.onnx"), abs=0.05)
    ours = stock(repo, {"backend": "onnx"})  # our own export of the weights: the float file's
    assert ours.score(PAIRS) == pytest.approx(got, abs=1e-5)
    assert export_count() == before + 3
    # A new pool loads the cached entries: nothing copied or exported again.
    again = stock(repo, {"backend": "onnx", "model_kwargs": {"file_name": "onnx/model.onnx"}})
    assert again.score(PAIRS) == got
    assert export_count() == before + 3


def test_a_changed_file_is_a_new_entry(repo: Path, cache: Path, tmp_path: Path) -> None:
    folder = tmp_path / "ce"
    shutil.copytree(repo, folder)
    kwargs = {"backend": "onnx", "model_kwargs": {"file_name": "onnx/model.onnx"}}
    first = stock(folder, kwargs).score(PAIRS)
    shutil.copyfile(
        folder / "onnx" / "model_qint8_avx512_vnni.onnx", folder / "onnx" / "model.onnx"
    )
    second = stock(folder, kwargs).score(PAIRS)
    assert second != pytest.approx(first, abs=1e-6)
    assert len([p for p in cache.iterdir() if not p.name.startswith(".")]) == 2


def test_missing_file_names_what_is_there(repo: Path, cache: Path) -> None:
    ce = stock(repo, {"backend": "onnx", "model_kwargs": {"file_name": "onnx/model_O3.onnx"}})
    with pytest.raises(ConfigurationError, match=r"no such file.*onnx/model\.onnx"):
        ce.score(PAIRS)
    with pytest.raises(ValueError, match="relative to it"):
        stock(repo, {"backend": "onnx", "model_kwargs": {"file_name": "../ce/onnx/model.onnx"}})
    with pytest.raises(ValueError, match="run as it is"):
        SharedCrossEncoder(
            model_name=str(repo),
            backend="onnx-cross-encoder",
            model_kwargs={"file_name": "onnx/model.onnx", "quantize": "int8"},
            pool=ModelPool(),
        ).score(PAIRS)


def test_openvino_runs_the_file_with_the_users_ov_config(repo: Path, cache: Path) -> None:
    pytest.importorskip("openvino")
    ce = stock(
        repo,
        {
            "backend": "openvino",
            "model_kwargs": {
                "file_name": "onnx/model.onnx",
                "ov_config": {"INFERENCE_PRECISION_HINT": "f32", "PERFORMANCE_HINT": "LATENCY"},
            },
        },
    )
    assert ce.dtype == "float32"
    assert ce.score(PAIRS) == pytest.approx(direct(repo, "onnx/model.onnx"), abs=1e-4)
    assert "LATENCY" in ce.stats()["kernels"]


def test_a_setting_openvino_refuses_is_a_configuration_error(repo: Path, cache: Path) -> None:
    pytest.importorskip("openvino")
    ce = stock(repo, {"backend": "openvino", "model_kwargs": {"ov_config": {"NO_SUCH_KEY": 1}}})
    with pytest.raises(ConfigurationError, match="NO_SUCH_KEY"):
        ce.score(PAIRS)
    # The IR was not thrown away over it: a load without the setting is a cache hit.
    from rag_rerank_plugins.backends._openvino_common import build_count

    before = build_count()
    assert len(stock(repo, {"backend": "openvino"}).score(PAIRS)) == len(PAIRS)
    assert build_count() == before


def test_openvino_runs_the_repositorys_own_ir(repo: Path, cache: Path) -> None:
    pytest.importorskip("openvino")
    from rag_rerank_plugins.backends._openvino_common import build_count

    kwargs = {
        "backend": "openvino",
        "model_kwargs": {
            "file_name": "openvino_model.xml",  # a bare name: looked up under openvino/
            "ov_config": {"INFERENCE_PRECISION_HINT": "f32"},
        },
    }
    ce = stock(repo, kwargs)
    assert ce.model_kwargs["file_name"] == "openvino_model.xml"
    got = ce.score(PAIRS)
    kernels = ce.stats()["kernels"]
    assert "the repository's IR openvino_model.xml, as it is" in kernels
    assert "pruned" not in kernels  # the twin's export is not what runs
    assert got == pytest.approx(direct(repo, "onnx/model.onnx"), abs=1e-4)
    # Its own entry: a second pool loads it from the cache.
    before = build_count()
    assert stock(repo, kwargs).score(PAIRS) == pytest.approx(got, abs=1e-6)
    assert build_count() == before


def test_the_repositorys_int8_ir_reports_int8(repo: Path, cache: Path, tmp_path: Path) -> None:
    """sentence-transformers' openvino_model_qint8_quantized.xml is INT8 already: stats said
    the BF16 or FP32 hint it was compiled with, and the pass-size rule read it as a float IR."""
    ov = pytest.importorskip("openvino")
    nncf = pytest.importorskip("nncf")
    from transformers import AutoTokenizer

    own = tmp_path / "repo"
    shutil.copytree(repo, own)
    tokenizer = AutoTokenizer.from_pretrained(own)
    feeds = [dict(tokenizer(q, p, return_tensors="np")) for q, p in PAIRS]
    model = ov.Core().read_model(str(own / "openvino" / "openvino_model.xml"))
    quantized = nncf.quantize(model, nncf.Dataset(feeds), subset_size=len(feeds))
    ov.save_model(quantized, str(own / "openvino" / "openvino_model_qint8_quantized.xml"))
    int8 = {"file_name": "openvino_model_qint8_quantized.xml"}
    ce = stock(own, {"backend": "openvino", "model_kwargs": int8})
    assert len(ce.score(PAIRS)) == len(PAIRS)
    stats = ce.stats()
    assert stats["dtype"] == "int8"
    assert "INT8: FakeQuantize ops" in stats["kernels"]
    plain = stock(own, {"backend": "openvino", "model_kwargs": {"file_name": "openvino_model.xml"}})
    plain.score(PAIRS)
    assert plain.stats()["dtype"] in ("float32", "bfloat16")


def test_an_ir_of_another_task_or_with_quantize_is_refused(repo: Path, cache: Path) -> None:
    pytest.importorskip("openvino")
    tokens = stock(
        repo, {"backend": "openvino", "model_kwargs": {"file_name": "openvino/openvino_tokens.xml"}}
    )
    with pytest.raises(ConfigurationError, match="not a cross-encoder's"):
        tokens.score(PAIRS)
    renamed = stock(
        repo,
        {"backend": "openvino", "model_kwargs": {"file_name": "openvino/openvino_renamed.xml"}},
    )
    with pytest.raises(ConfigurationError, match="that IR's inputs are"):
        renamed.score(PAIRS)
    both = SharedCrossEncoder(
        model_name=str(repo),
        backend="openvino-cross-encoder",
        model_kwargs={"file_name": "openvino/openvino_model.xml", "quantize": "int8"},
        pool=ModelPool(),
    )
    with pytest.raises(ConfigurationError, match="run as it is"):
        both.score(PAIRS)


# -- embedders: HuggingFaceEmbeddings / HuggingFaceEmbedding with a repository file ---------------

TEXTS = ["a cat is a small animal", "Rayleigh scattering " * 30, "", "細胞 uses energy"]


@pytest.fixture(scope="module")
def embedder_repo(tmp_path_factory: pytest.TempPathFactory, minilm_path: str) -> Path:
    """The packaged MiniLM embedder shipping ``onnx/model.onnx`` as optimum writes it for
    feature extraction (output ``last_hidden_state``), a dynamic int8 copy and the IR."""
    import torch
    from transformers import AutoModel, AutoTokenizer

    from rag_rerank_plugins.backends._onnx_common import quantize_int8

    folder = tmp_path_factory.mktemp("repo") / "emb"
    shutil.copytree(minilm_path, folder)
    model = AutoModel.from_pretrained(folder).eval()
    tokenizer = AutoTokenizer.from_pretrained(folder)

    class Hidden(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.model = model

        def forward(self, input_ids: Any, attention_mask: Any, token_type_ids: Any) -> Any:
            return self.model(input_ids, attention_mask, token_type_ids=token_type_ids)[0]

    sample = tokenizer(["a text", "b"], padding=True, return_tensors="pt")
    (folder / "onnx").mkdir()
    axes = {n: {0: "batch", 1: "sequence"} for n in INPUTS}
    torch.onnx.export(
        Hidden(),
        tuple(sample[n] for n in INPUTS),
        str(folder / "onnx" / "model.onnx"),
        input_names=INPUTS,
        output_names=["last_hidden_state"],
        dynamic_axes={**axes, "last_hidden_state": {0: "batch", 1: "sequence"}},
        dynamo=False,
    )
    quantize_int8(folder / "onnx" / "model.onnx", folder / "onnx" / "model_qint8_avx512_vnni.onnx")
    try:
        import openvino as ov
    except ImportError:
        return folder
    (folder / "openvino").mkdir()
    ir = ov.convert_model(str(folder / "onnx" / "model.onnx"))
    ov.save_model(ir, str(folder / "openvino" / "openvino_model.xml"), compress_to_fp16=False)
    return folder


def encode(folder: Path) -> Any:
    from sentence_transformers import SentenceTransformer

    return SentenceTransformer(str(folder), device="cpu").encode_document(TEXTS)


def test_embedder_file_name_runs_the_repository_file(embedder_repo: Path, cache: Path) -> None:
    import numpy as np

    want = encode(embedder_repo)
    kwargs = {"backend": "onnx", "model_kwargs": {"file_name": "onnx/model.onnx"}}
    fp32 = SharedEmbeddings(model_name=str(embedder_repo), model_kwargs=kwargs, pool=ModelPool())
    got = np.asarray(fp32.embed_documents(TEXTS))
    assert np.abs(got - want).max() < 1e-4
    q8 = SharedEmbeddings(
        model_name=str(embedder_repo),
        model_kwargs={
            "backend": "onnx",
            "model_kwargs": {"file_name": "model_qint8_avx512_vnni.onnx"},
        },
        pool=ModelPool(),
    )
    got8 = np.asarray(q8.embed_documents(TEXTS))
    assert np.abs(got8 - got).max() > 1e-5  # the quantized file runs, not our export
    assert ((got8 * want).sum(1) / np.linalg.norm(got8, axis=1)).min() > 0.95


def test_llama_index_embedding_takes_the_file_and_provider(
    embedder_repo: Path, cache: Path
) -> None:
    import numpy as np

    from rag_rerank_plugins.llama_index import SharedEmbedding

    emb = SharedEmbedding(
        model_name=str(embedder_repo),
        backend="onnx",
        model_kwargs={"file_name": "onnx/model.onnx", "provider": "CPUExecutionProvider"},
        pool=ModelPool(),
    )
    assert emb.backend == "onnx-sentence-transformers"
    got = np.asarray(emb.get_text_embedding_batch(TEXTS))
    assert np.abs(got - encode(embedder_repo)).max() < 1e-4


def test_openvino_embedder_runs_the_repositorys_ir(embedder_repo: Path, cache: Path) -> None:
    pytest.importorskip("openvino")
    import numpy as np

    emb = SharedEmbeddings(
        model_name=str(embedder_repo),
        model_kwargs={
            "backend": "openvino",
            "model_kwargs": {
                "file_name": "openvino/openvino_model.xml",
                "ov_config": {"INFERENCE_PRECISION_HINT": "f32"},
            },
        },
        pool=ModelPool(),
    )
    got = np.asarray(emb.embed_documents(TEXTS))
    assert np.abs(got - encode(embedder_repo)).max() < 1e-4
    # The reranker's IR is not an embedder's: refused at load, not read as vectors.
    wrong = SharedEmbeddings(
        model_name=str(embedder_repo),
        model_kwargs={"backend": "openvino", "model_kwargs": {"file_name": "onnx/model.onnx"}},
        pool=ModelPool(),
    )
    assert len(wrong.embed_query("ok")) == got.shape[1]  # an ONNX name goes to the twin: fine


def test_a_hub_name_downloads_the_file_with_the_loading_options(
    repo: Path, cache: Path, tmp_path: Path
) -> None:
    """A hub model: the snapshot of its weights (which leaves onnx/ remote) and the named file
    come from the hub cache given as ``cache_folder``, offline (``local_files_only``)."""
    import hashlib
    import os

    revision = "0123456789abcdef0123456789abcdef01234567"
    root = tmp_path / "hub" / "models--org--ce"
    (root / "refs").mkdir(parents=True)
    (root / "refs" / "main").write_text(revision)
    (root / "blobs").mkdir()
    for path in sorted(p for p in repo.rglob("*") if p.is_file()):
        data = path.read_bytes()
        blob = root / "blobs" / hashlib.sha256(data).hexdigest()
        blob.write_bytes(data)
        link = root / "snapshots" / revision / path.relative_to(repo)
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))
    loading = {"cache_folder": str(tmp_path / "hub"), "local_files_only": True}
    ce = SharedCrossEncoder(
        model_name="org/ce",
        model_kwargs={
            "backend": "onnx",
            "model_kwargs": {"file_name": "model_qint8_avx512_vnni.onnx"},
            **loading,
        },
        pool=ModelPool(),
    )
    local = stock(
        repo,
        {"backend": "onnx", "model_kwargs": {"file_name": "onnx/model_qint8_avx512_vnni.onnx"}},
    )
    assert ce.score(PAIRS) == pytest.approx(local.score(PAIRS), abs=1e-6)
    missing = SharedCrossEncoder(
        model_name="org/ce",
        model_kwargs={
            "backend": "onnx",
            "model_kwargs": {"file_name": "onnx/model_O4.onnx"},
            **loading,
        },
        pool=ModelPool(),
    )
    with pytest.raises(ConfigurationError, match="model_O4"):
        missing.score(PAIRS)


def test_our_ov_config_option_may_not_contradict_dtype(tiny_ce_path: str, cache: Path) -> None:
    """Given as our own option (not through sentence-transformers' kwargs, where the hint
    becomes dtype), a precision hint must agree with dtype: it is never silently dropped."""
    pytest.importorskip("openvino")

    def ce(hint: str) -> SharedCrossEncoder:
        return SharedCrossEncoder(
            model_name=tiny_ce_path,
            backend="openvino-cross-encoder",
            dtype="float32",
            model_kwargs={"ov_config": {"INFERENCE_PRECISION_HINT": hint}},
            pool=ModelPool(),
        )

    with pytest.raises(ConfigurationError, match="contradicts dtype='float32'"):
        ce("bf16").score(PAIRS)
    assert len(ce("f32").score(PAIRS)) == len(PAIRS)
