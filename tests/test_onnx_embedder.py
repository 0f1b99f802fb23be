"""The ONNX Runtime embedder backend (``onnx-sentence-transformers``): ``SentenceTransformer``'s
vectors (queries, documents, prompts, normalisation, other pooling setups), the export cache
reused by a second process without torch, int8, the refusals and the adapters. (The missing
onnxruntime extra is tested for both ONNX backends in test_onnx.py.)

Offline: the model is the packaged all-MiniLM-L6-v2 (mean pooling + Normalize) and a copy of it
re-configured to CLS pooling without Normalize, with query/document prompts and
``include_prompt=False`` (its weights are a symlink to the packaged ones).
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest

from rag_rerank_plugins import ConfigurationError, ModelPool, ModelSpec
from rag_rerank_plugins.backends import check_options

pytest.importorskip("onnxruntime")
pytest.importorskip("sentence_transformers")

from rag_rerank_plugins.backends import _onnx_common, onnx_embedder
from rag_rerank_plugins.backends.base import Task

BACKEND = "onnx-sentence-transformers"
TEXTS = [
    "The mitochondria is the powerhouse of the cell and produces ATP.",
    "A short one.",
    "Qu'est-ce qu'un qubit ? Die Zelle — 細胞 — uses energy.",
    " ".join(["the cell converts energy from food into ATP"] * 80),  # truncated at 256 tokens
    "",
]


@pytest.fixture(scope="module")
def onnx_cache(tmp_path_factory: pytest.TempPathFactory) -> str:
    """One export cache for the module, so each (model, mode) is exported once here."""
    return str(tmp_path_factory.mktemp("onnx-emb-cache"))


@pytest.fixture(scope="module")
def variant_path(tmp_path_factory: pytest.TempPathFactory, minilm_path: str) -> str:
    """MiniLM with CLS pooling, no Normalize, prompts, and pooling that skips the prompt."""
    target = tmp_path_factory.mktemp("models") / "minilm-cls-prompts"
    shutil.copytree(minilm_path, target, ignore=shutil.ignore_patterns("model.safetensors"))
    (target / "model.safetensors").symlink_to(Path(minilm_path) / "model.safetensors")
    modules = json.loads((target / "modules.json").read_text())
    (target / "modules.json").write_text(json.dumps(modules[:2]))
    (target / "1_Pooling" / "config.json").write_text(
        json.dumps({"embedding_dimension": 384, "pooling_mode": "cls", "include_prompt": False})
    )
    config = json.loads((target / "config_sentence_transformers.json").read_text())
    config["prompts"] = {"query": "query: ", "document": "passage: ", "plain": ""}
    (target / "config_sentence_transformers.json").write_text(json.dumps(config))
    return str(target)


def onnx_spec(path: str, cache: str, **options: Any) -> ModelSpec:
    return ModelSpec(path, backend=BACKEND, options={"cache_dir": cache, **options})


def reference(path: str) -> Any:
    import torch
    from sentence_transformers import SentenceTransformer

    return SentenceTransformer(path, device="cpu", model_kwargs={"dtype": torch.float32})


def max_error(got: list[list[float]], want: Any) -> float:
    import numpy as np

    return float(np.abs(np.asarray(got) - np.asarray(want)).max())


# -- vectors ----------------------------------------------------------------------------------


@pytest.mark.parametrize("which", ["minilm", "variant"])
def test_float32_vectors_equal_sentence_transformers(
    which: str, minilm_path: str, variant_path: str, onnx_cache: str, pool: ModelPool
) -> None:
    path = minilm_path if which == "minilm" else variant_path
    st = reference(path)
    spec = onnx_spec(path, onnx_cache)
    for normalize in (False, True):
        got = pool.embed(spec, TEXTS, is_query=True, normalize=normalize)
        want = st.encode_query(TEXTS, normalize_embeddings=normalize)
        assert max_error(got, want) <= 1e-5
        got = pool.embed(spec, TEXTS, is_query=False, normalize=normalize)
        want = st.encode_document(TEXTS, normalize_embeddings=normalize)
        assert max_error(got, want) <= 1e-5
    instruction = "Represent this sentence for searching relevant passages: "
    got = pool.embed(spec, TEXTS, is_query=True, prompt=instruction)
    assert max_error(got, st.encode_query(TEXTS, prompt=instruction)) <= 1e-5
    model = pool.get(spec).model
    assert (model.device, model.dtype, model.dimension) == ("cpu", "float32", 384)
    stats = pool.spec_stats(spec)
    assert (stats["device"], stats["dtype"]) == ("cpu", "float32")


def test_variant_really_differs_from_the_plain_model(
    minilm_path: str, variant_path: str, onnx_cache: str, pool: ModelPool
) -> None:
    """The variant's prompts, CLS pooling and missing Normalize all change the vectors, so the
    test above would catch a backend that ignored any of them."""
    import numpy as np

    spec = onnx_spec(variant_path, onnx_cache)
    query = np.asarray(pool.embed(spec, TEXTS[:2], is_query=True))
    document = np.asarray(pool.embed(spec, TEXTS[:2], is_query=False))
    assert np.abs(query - document).max() > 1e-3  # "query: " vs "passage: " (then excluded)
    assert abs(float(np.linalg.norm(query[0])) - 1) > 1e-2  # no Normalize module
    plain = np.asarray(pool.embed(onnx_spec(minilm_path, onnx_cache), TEXTS[:2], is_query=True))
    assert np.abs(plain - query).max() > 1e-2


def test_options_applied_at_run_time(variant_path: str, onnx_cache: str, pool: ModelPool) -> None:
    """truncate_dim, default_prompt_name and max_length reuse the export and match
    SentenceTransformer built with the same arguments."""
    import torch
    from sentence_transformers import SentenceTransformer

    pool.embed(onnx_spec(variant_path, onnx_cache), ["warm"], is_query=True)  # exported (once)
    before = _onnx_common.export_count()
    spec = ModelSpec(
        variant_path,
        backend=BACKEND,
        max_length=16,
        options={"cache_dir": onnx_cache, "truncate_dim": 64, "default_prompt_name": "plain"},
    )
    st = SentenceTransformer(
        variant_path,
        device="cpu",
        model_kwargs={"dtype": torch.float32},
        truncate_dim=64,
        default_prompt_name="plain",
    )
    st.max_seq_length = 16
    got = pool.embed(spec, TEXTS, is_query=False, normalize=True)
    assert max_error(got, st.encode_document(TEXTS, normalize_embeddings=True)) <= 1e-5
    assert pool.get(spec).model.dimension == 64
    assert pool.get(spec).model.max_tokens == 16
    assert _onnx_common.export_count() == before  # the same entry, options applied on top


def test_two_phase_protocol(minilm_path: str, onnx_cache: str, pool: ModelPool) -> None:
    model = pool.get(onnx_spec(minilm_path, onnx_cache)).model
    assert model.thread_safe is False
    task = Task("embed", is_query=True, normalize=True)
    batch = model.prepare(task, TEXTS[:3])
    assert batch.size == 3
    assert batch.real_tokens is not None
    assert batch.real_tokens < (batch.padded_tokens or 0)
    vectors = model.finish(task, model.forward(task, batch))
    assert vectors == model.embed(TEXTS[:3], batch_size=1, is_query=True, normalize=True)
    # The graph's inputs are recorded at export, so a load never asks a session what to feed
    # (the OpenVINO embedder replaces the session before onnxruntime ever opens it).
    assert model.meta["feeds"] == [i.name for i in model.session.get_inputs()]


@pytest.mark.parametrize(
    "modes",
    [
        ("mean",),
        ("cls",),
        ("max",),
        ("mean_sqrt_len_tokens",),
        ("weightedmean",),
        ("lasttoken",),
        ("cls", "mean"),
    ],
)
@pytest.mark.parametrize("prompt_length", [None, 2])
@pytest.mark.parametrize("side", ["right", "left"])
def test_pool_matches_sentence_transformers_pooling(
    modes: tuple[str, ...], prompt_length: int | None, side: str
) -> None:
    """numpy pooling == sentence-transformers' Pooling on padded batches, every mode."""
    import numpy as np
    import torch
    from sentence_transformers.sentence_transformer.modules.pooling import Pooling

    rng = np.random.default_rng(0)
    tokens = rng.standard_normal((3, 7, 8)).astype(np.float32)
    mask = np.zeros((3, 7), dtype=np.int64)
    for row, length in enumerate((7, 4, 5)):
        if side == "right":
            mask[row, :length] = 1
        else:
            mask[row, 7 - length :] = 1
    module = Pooling(8, pooling_mode=modes if len(modes) > 1 else modes[0], include_prompt=False)
    features: dict[str, Any] = {
        "token_embeddings": torch.from_numpy(tokens),
        "attention_mask": torch.from_numpy(mask),
    }
    if prompt_length:
        features["prompt_length"] = prompt_length
    want = module(features)["sentence_embedding"].numpy()
    got = onnx_embedder.pool(tokens, mask, modes, prompt_length)
    assert np.allclose(got, want, atol=1e-6, rtol=0)


# -- int8 -------------------------------------------------------------------------------------


def test_int8_mode(minilm_path: str, onnx_cache: str, pool: ModelPool) -> None:
    import numpy as np

    spec = onnx_spec(minilm_path, onnx_cache, quantize="int8")
    got = np.asarray(pool.embed(spec, TEXTS, is_query=False, normalize=True))
    want = np.asarray(pool.embed(onnx_spec(minilm_path, onnx_cache), TEXTS, is_query=False))
    assert pool.get(spec).model.dtype == "int8"
    cosine = (got * want).sum(axis=1)
    assert cosine.min() >= 0.95  # close in direction...
    assert np.abs(got - want).max() > 1e-4  # ...but really quantized


# -- the export cache ---------------------------------------------------------------------------


def test_second_process_reuses_the_export_without_torch(
    minilm_path: str, onnx_cache: str, pool: ModelPool
) -> None:
    spec = onnx_spec(minilm_path, onnx_cache)
    vectors = pool.embed(spec, TEXTS[:2], is_query=True)  # exported (or cached)
    entries = [p for p in Path(onnx_cache).iterdir() if not p.name.startswith(".")]
    assert entries
    assert all((p / "meta.json").exists() for p in entries)
    code = textwrap.dedent(
        f"""
        import json, sys
        from rag_rerank_plugins import ModelPool, ModelSpec
        from rag_rerank_plugins.backends import _onnx_common
        spec = ModelSpec({minilm_path!r}, backend={BACKEND!r},
                         options={{"cache_dir": {onnx_cache!r}}})
        vectors = ModelPool().embed(spec, {TEXTS[:2]!r}, is_query=True)
        print(json.dumps([vectors, _onnx_common.export_count(), "torch" in sys.modules]))
        """
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=180, check=True
    )
    got, exports, torch_imported = json.loads(out.stdout.strip().splitlines()[-1])
    assert exports == 0
    assert torch_imported is False
    assert max_error(got, vectors) <= 1e-6


def test_an_export_that_differs_from_sentence_transformers_is_not_published(
    minilm_path: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, pool: ModelPool
) -> None:
    from rag_rerank_plugins import ModelLoadError

    real_pool = onnx_embedder.pool

    def off_by_a_little(*args: Any) -> Any:
        vectors = real_pool(*args)
        vectors[:, 0] += 0.05  # survives the model's Normalize, unlike a scale
        return vectors

    monkeypatch.setattr(onnx_embedder, "pool", off_by_a_little)
    cache = tmp_path / "cache"
    with pytest.raises(ModelLoadError, match=r"differ from SentenceTransformer\.encode"):
        pool.get(onnx_spec(minilm_path, str(cache)))
    assert list(cache.iterdir()) == []  # nothing published, the scratch folder removed


def test_embedder_and_cross_encoder_entries_never_collide(
    minilm_path: str, onnx_cache: str
) -> None:
    """The same folder exported by both backends gets two keys (the embedder adds its kind)."""
    fingerprint = _onnx_common.model_fingerprint(Path(minilm_path))
    common = {"format_version": 1}
    assert _onnx_common.entry_key(fingerprint, "float32", 17, **common) != _onnx_common.entry_key(
        fingerprint, "float32", 17, kind="sentence-transformer", **common
    )


# -- refusals and the missing extra -----------------------------------------------------------


def test_bad_requests_are_refused(minilm_path: str, onnx_cache: str, pool: ModelPool) -> None:
    from rag_rerank_plugins.backends import available_backends

    assert available_backends()[BACKEND].options == onnx_embedder.OPTIONS
    assert available_backends()[BACKEND].kind == "embedder"
    check_options(BACKEND, {"quantize": "int8", "intra_op_threads": 1, "truncate_dim": 64})
    with pytest.raises(ConfigurationError, match="Accepted"):
        check_options(BACKEND, {"score_mode": "raw"})  # a cross-encoder option
    bad = [
        ModelSpec(minilm_path, backend=BACKEND, dtype="bfloat16"),
        ModelSpec(minilm_path, backend=BACKEND, dtype="float16"),
        ModelSpec(minilm_path, backend=BACKEND, device="cuda"),
        onnx_spec(minilm_path, onnx_cache, quantize="int4"),
        onnx_spec(minilm_path, onnx_cache, intra_op_threads=0),
        onnx_spec(minilm_path, onnx_cache, opset=3),
        onnx_spec(minilm_path, onnx_cache, truncate_dim=0),
        onnx_spec(minilm_path, onnx_cache, truncate_dim=4096),
        onnx_spec(minilm_path, onnx_cache, default_prompt_name="nope"),
    ]
    for spec in bad:
        with pytest.raises(ConfigurationError):
            pool.get(spec)


def test_unsupported_pipelines_are_refused() -> None:
    """A module the numpy path does not reproduce (Dense, a Router) is refused, never skipped."""

    def module(name: str, **attrs: Any) -> Any:
        return type(name, (), attrs)()

    spec = ModelSpec("some/model", backend=BACKEND)
    transformer = module("Transformer", modality_config={"text": {}})
    pooling = module("Pooling", pooling_mode="mean", include_prompt=True)
    assert onnx_embedder._pipeline(spec, [transformer, pooling]) == {
        "pooling": ["mean"],
        "include_prompt": True,
        "normalize": False,
    }
    for modules in (
        [transformer, pooling, module("Dense"), module("Normalize")],
        [module("Router")],
        [module("Transformer", modality_config={"text": {}, "image": {}}), pooling],
        [module("Transformer", query_length=32), pooling],
    ):
        with pytest.raises(ConfigurationError, match="backend='sentence-transformers'"):
            onnx_embedder._pipeline(spec, modules)


# -- adapters ---------------------------------------------------------------------------------


def test_adapters_accept_the_onnx_embedder(
    minilm_path: str, onnx_cache: str, pool: ModelPool
) -> None:
    pytest.importorskip("langchain_core")
    pytest.importorskip("llama_index.core")
    from rag_rerank_plugins.langchain import SharedEmbeddings
    from rag_rerank_plugins.llama_index import SharedEmbedding

    st = reference(minilm_path)
    kw = {"backend": BACKEND, "model_kwargs": {"cache_dir": onnx_cache}, "pool": pool}
    lc = SharedEmbeddings(model=minilm_path, **kw)
    assert max_error(lc.embed_documents(TEXTS), st.encode_document(TEXTS)) <= 1e-5
    assert max_error([lc.embed_query(TEXTS[0])], st.encode_query(TEXTS[:1])) <= 1e-5

    li = SharedEmbedding(model_name=minilm_path, query_instruction="query: ", **kw)
    got = li.get_query_embedding(TEXTS[1])
    assert max_error([got], st.encode_query(TEXTS[1:2], prompt="query: ")) <= 1e-5
    assert max_error(li.get_text_embedding_batch(TEXTS), st.encode_document(TEXTS)) <= 1e-5
    assert pool.spec_stats(lc.spec)["loads"] == 1  # both adapters share one model
