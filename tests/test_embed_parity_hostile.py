"""Embedders under a migrating, hostile user: side by side with the stock classes.

A user swaps langchain-huggingface's ``HuggingFaceEmbeddings`` for ``SharedEmbeddings`` and
llama-index's ``HuggingFaceEmbedding`` for ``SharedEmbedding``, keeps every argument and the
attributes it reads, and passes bad input. Covered here: bad single texts refused before the
model loads, ``truncate_dim`` values sentence-transformers slices unchecked refused at
construction, ``show_progress_bar`` read and set under the stock name, ``normalize_embeddings``
given as None, and prompt handling with a pooling that leaves the prompt tokens out
(``include_prompt=False``, Instructor-style). Nothing is downloaded: a MiniLM copy without its
Normalize module (which would hide every normalisation difference) is built from the packaged one.
"""

from __future__ import annotations

import asyncio
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

pytest.importorskip("torch")
pytest.importorskip("sentence_transformers")

from rag_rerank_plugins import ConfigurationError, InvalidInputError, ModelPool, ModelSpec

ATOL = 1e-5
QUERY = "which organelle produces ATP?"
TEXTS = [
    "The mitochondria is the powerhouse of the cell.",
    "",
    "The mitochondria is the powerhouse of the cell.",
    "héllo wörld 日本語 🙂",
    "word " * 600,  # past the 256-token limit: truncated as stock truncates
]


@pytest.fixture(scope="module", autouse=True)
def _fp32(float32_policy: None) -> None:
    """Compared with the stock classes: FP32 in the BF16 run too (see conftest)."""


@pytest.fixture(scope="module")
def plain_minilm(tmp_path_factory: pytest.TempPathFactory, minilm_path: str) -> str:
    """The packaged MiniLM's Transformer and Pooling modules, without Normalize: its vectors are
    not unit length, so normalisation settings show in the numbers."""
    from sentence_transformers import SentenceTransformer

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        full = SentenceTransformer(minilm_path, device="cpu")
        plain = SentenceTransformer(modules=[full[0], full[1]], device="cpu")
    path = tmp_path_factory.mktemp("embed-parity") / "minilm-plain"
    plain.save(str(path))
    return str(path)


@pytest.fixture(scope="module")
def prompt_excluded_minilm(tmp_path_factory: pytest.TempPathFactory, plain_minilm: str) -> str:
    """The plain MiniLM with ``include_prompt=False`` pooling: the prompt's tokens are left out
    of the mean, so a prompt handled as plain text (or miscounted) changes every vector."""
    from sentence_transformers import SentenceTransformer

    model = SentenceTransformer(plain_minilm, device="cpu")
    model[1].include_prompt = False
    path = tmp_path_factory.mktemp("embed-parity") / "minilm-prompt-excluded"
    model.save(str(path))
    return str(path)


def _close(ours: Any, stock: Any) -> None:
    np.testing.assert_allclose(np.asarray(ours), np.asarray(stock), atol=ATOL, rtol=0)


# -- LlamaIndex: a bad single text is refused before the model loads -----------------------------


def _fake_embedding(pool: ModelPool) -> Any:
    pytest.importorskip("llama_index.core")
    from rag_rerank_plugins.llama_index import SharedEmbedding

    return SharedEmbedding(model_name="fake", backend="fake-embedder", device="cpu", pool=pool)


_SINGLE_TEXT_CALLS: list[tuple[str, Callable[[Any, Any], Any]]] = [
    ("get_query_embedding", lambda e, x: e.get_query_embedding(x)),
    ("get_text_embedding", lambda e, x: e.get_text_embedding(x)),
    ("aget_query_embedding", lambda e, x: asyncio.run(e.aget_query_embedding(x))),
    ("aget_text_embedding", lambda e, x: asyncio.run(e.aget_text_embedding(x))),
]


@pytest.mark.parametrize(
    ("call", "run"), _SINGLE_TEXT_CALLS, ids=[c for c, _ in _SINGLE_TEXT_CALLS]
)
@pytest.mark.parametrize("bad", [None, 5, b"bytes", {"text": "x"}], ids=repr)
def test_llama_single_text_call_refuses_a_non_str_before_loading(
    call: str, run: Callable[[Any, Any], Any], bad: Any
) -> None:
    """``get_query_embedding(None)`` loaded the model (13 s for MiniLM on this machine, minutes
    for a big one) and only then failed, as ``text #0 is NoneType``: the pool's check."""
    pool = ModelPool()
    try:
        embedding = _fake_embedding(pool)
        with pytest.raises(InvalidInputError, match=rf"^{call} takes one str, got "):
            run(embedding, bad)
        assert pool.stats() == {}, "the model loaded for an input that could never embed"
    finally:
        pool.clear()


@pytest.mark.parametrize(
    ("call", "run"), _SINGLE_TEXT_CALLS, ids=[c for c, _ in _SINGLE_TEXT_CALLS]
)
def test_llama_single_text_call_given_a_list_points_to_the_batch_call(
    call: str, run: Callable[[Any, Any], Any]
) -> None:
    pool = ModelPool()
    try:
        with pytest.raises(InvalidInputError, match="get_text_embedding_batch"):
            run(_fake_embedding(pool), ["a", "b"])
        assert pool.stats() == {}
    finally:
        pool.clear()


# -- truncate_dim: sentence-transformers slices it unchecked; refused before any model work ------


_BAD_TRUNCATE_DIMS = [0, -1, 8.0, "8", True]


@pytest.mark.parametrize("value", _BAD_TRUNCATE_DIMS, ids=repr)
def test_llama_truncate_dim_must_be_a_positive_int(value: Any, minilm_path: str) -> None:
    """Stock: 0 gave empty vectors, -1 cut one dimension, 8.0 / "8" failed at the first call in
    torch. Ours was worse for -1: an InferenceError blaming the backend ("returned a
    383-dimensional vector ... This is a bug in the backend")."""
    pytest.importorskip("llama_index.core")
    from rag_rerank_plugins.llama_index import SharedEmbedding

    # (pydantic wraps the ConfigurationError of a validator: both are ValueErrors)
    with pytest.raises(ValueError, match="truncate_dim must be a positive int"):
        SharedEmbedding(minilm_path, device="cpu", truncate_dim=value)


@pytest.mark.parametrize("value", _BAD_TRUNCATE_DIMS, ids=repr)
def test_langchain_model_kwargs_truncate_dim_must_be_a_positive_int(
    value: Any, minilm_path: str
) -> None:
    from rag_rerank_plugins.langchain import SharedEmbeddings

    with pytest.raises(ValueError, match="truncate_dim must be a positive int"):
        SharedEmbeddings(model_name=minilm_path, model_kwargs={"truncate_dim": value})


@pytest.mark.parametrize("value", [-1, 8.0], ids=repr)
def test_spec_truncate_dim_is_refused_before_the_weights_load(
    value: Any, minilm_path: str, pool: ModelPool
) -> None:
    """A spec built directly (or by the bi-encoder, which hands its options to the embedder):
    refused by the loader, not at the first forward pass."""
    spec = ModelSpec(
        minilm_path,
        backend="sentence-transformers",
        device="cpu",
        dtype="float32",
        options={"truncate_dim": value},
    )
    with pytest.raises(ConfigurationError, match="truncate_dim must be a positive int"):
        pool.embed(spec, ["a text"])


def test_valid_truncate_dim_still_equals_the_stock_vectors(plain_minilm: str) -> None:
    pytest.importorskip("llama_index.embeddings.huggingface")
    from llama_index.embeddings.huggingface import HuggingFaceEmbedding

    from rag_rerank_plugins.llama_index import SharedEmbedding

    stock = HuggingFaceEmbedding(plain_minilm, device="cpu", truncate_dim=24)
    ours = SharedEmbedding(plain_minilm, device="cpu", dtype="float32", truncate_dim=24)
    _close(ours.get_text_embedding_batch(TEXTS), stock.get_text_embedding_batch(TEXTS))
    assert len(ours.get_query_embedding(QUERY)) == 24


# -- attributes read and set under the stock names -----------------------------------------------


def test_llama_show_progress_bar_reads_and_sets_as_stock(plain_minilm: str) -> None:
    """``embed_model.show_progress_bar`` was an AttributeError, and setting it a ValueError
    ('object has no field'): HuggingFaceEmbedding has it as a field."""
    pytest.importorskip("llama_index.embeddings.huggingface")
    from llama_index.embeddings.huggingface import HuggingFaceEmbedding

    from rag_rerank_plugins.llama_index import SharedEmbedding

    for given in (False, True):
        stock = HuggingFaceEmbedding(plain_minilm, device="cpu", show_progress_bar=given)
        ours = SharedEmbedding(plain_minilm, device="cpu", show_progress_bar=given)
        assert ours.show_progress_bar is stock.show_progress_bar is given
    ours = SharedEmbedding(plain_minilm, device="cpu")
    ours.show_progress_bar = True
    assert ours.show_progress is True
    assert ours.show_progress_bar is True


# -- LangChain: normalize_embeddings=None means "not given", as encode reads it -------------------


def test_langchain_normalize_embeddings_none_equals_stock(plain_minilm: str) -> None:
    """``encode_kwargs={"normalize_embeddings": None}`` (e.g. from a config file with a null):
    the stock class passes it to encode (no normalisation); ours was a pydantic 'Input should be
    a valid boolean' error at construction."""
    hf = pytest.importorskip("langchain_huggingface")
    from rag_rerank_plugins.langchain import SharedEmbeddings

    kwargs: dict[str, Any] = {
        "encode_kwargs": {"normalize_embeddings": None},
        "query_encode_kwargs": {"normalize_embeddings": None, "batch_size": 4},
    }
    stock = hf.HuggingFaceEmbeddings(model_name=plain_minilm, **kwargs)
    ours = SharedEmbeddings(model_name=plain_minilm, dtype="float32", **kwargs)
    docs = ours.embed_documents(TEXTS)
    _close(docs, stock.embed_documents(TEXTS))
    _close(ours.embed_query(QUERY), stock.embed_query(QUERY))
    assert abs(float(np.linalg.norm(docs[0])) - 1.0) > 0.01  # really not normalised


# -- prompts with a pooling that leaves the prompt tokens out -------------------------------------


def test_langchain_prompt_with_prompt_excluding_pooling_equals_stock(
    prompt_excluded_minilm: str,
) -> None:
    hf = pytest.importorskip("langchain_huggingface")
    from rag_rerank_plugins.langchain import SharedEmbeddings

    kwargs: dict[str, Any] = {
        "encode_kwargs": {"prompt": "Represent the document: "},
        "query_encode_kwargs": {"prompt": "Represent the question: ", "normalize_embeddings": True},
    }
    stock = hf.HuggingFaceEmbeddings(model_name=prompt_excluded_minilm, **kwargs)
    ours = SharedEmbeddings(model_name=prompt_excluded_minilm, dtype="float32", **kwargs)
    _close(ours.embed_documents(TEXTS), stock.embed_documents(TEXTS))
    _close(asyncio.run(ours.aembed_query(QUERY)), stock.embed_query(QUERY))


def test_llama_instructions_with_prompt_excluding_pooling_equal_stock(
    prompt_excluded_minilm: str,
) -> None:
    pytest.importorskip("llama_index.embeddings.huggingface")
    from llama_index.embeddings.huggingface import HuggingFaceEmbedding

    from rag_rerank_plugins.llama_index import SharedEmbedding

    kwargs: dict[str, Any] = {
        "query_instruction": "Represent the question: ",
        "text_instruction": "Represent the document: ",
        "normalize": False,
        "embed_batch_size": 2,
    }
    stock = HuggingFaceEmbedding(prompt_excluded_minilm, device="cpu", **kwargs)
    ours = SharedEmbedding(prompt_excluded_minilm, device="cpu", dtype="float32", **kwargs)
    _close(ours.get_text_embedding_batch(TEXTS), stock.get_text_embedding_batch(TEXTS))
    _close(
        asyncio.run(ours.aget_text_embedding_batch(TEXTS)),
        asyncio.run(stock.aget_text_embedding_batch(TEXTS)),
    )
    _close(ours.get_query_embedding(QUERY), stock.get_query_embedding(QUERY))
    _close(
        asyncio.run(ours.aget_query_embedding(QUERY)),
        asyncio.run(stock.aget_query_embedding(QUERY)),
    )
    vector = ours.get_query_embedding(QUERY)
    assert isinstance(vector, list)
    assert type(vector[0]) is float


def test_bi_encoder_scores_equal_cosines_of_stock_vectors(
    plain_minilm: str, pool: ModelPool
) -> None:
    """On an embedder without a Normalize module (so the bi-encoder must normalise itself),
    duplicates, an empty passage and a passage past the token limit included."""
    from sentence_transformers import SentenceTransformer

    reference = SentenceTransformer(plain_minilm, device="cpu")
    spec = ModelSpec(plain_minilm, backend="bi-encoder", device="cpu", dtype="float32")
    pairs = [(QUERY, t) for t in TEXTS] + [("a second query", TEXTS[0])]
    scores = pool.score_pairs(spec, pairs)
    expected = []
    for query, text in pairs:
        q = reference.encode_query([query], normalize_embeddings=True)[0]
        d = reference.encode_document([text], normalize_embeddings=True)[0]
        expected.append(float(q @ d))
    np.testing.assert_allclose(scores, expected, atol=ATOL, rtol=0)
    assert scores[0] == pytest.approx(scores[2], abs=1e-6)  # the duplicate, in input order


def test_migration_guide_documents_the_differences_kept(repo_root: Path) -> None:
    """The deliberate differences a migrating user meets are written down."""
    guide = (repo_root / "docs" / "migration.md").read_text(encoding="utf-8")
    assert "`.max_length` reads back" in guide
    assert "`.show_progress_bar`" in guide
    assert "truncate_dim` must be a positive int" in guide


def test_langchain_call_truncate_dim_wider_than_the_models_is_refused(plain_minilm: str) -> None:
    """Stock: ``model_kwargs={"truncate_dim": 32}`` with ``encode_kwargs={"truncate_dim": 64}``
    gives 64-wide vectors (encode's value replaces the model's); ours silently gave 32."""
    from rag_rerank_plugins.langchain import SharedEmbeddings

    for argument in ("encode_kwargs", "query_encode_kwargs"):
        with pytest.raises(ValueError, match=rf"{argument}\['truncate_dim'\]=64 is wider"):
            SharedEmbeddings(
                model_name=plain_minilm,
                model_kwargs={"truncate_dim": 32},
                **{argument: {"truncate_dim": 64}},
            )


def test_langchain_call_truncate_dim_narrower_than_the_models_equals_stock(
    plain_minilm: str,
) -> None:
    hf = pytest.importorskip("langchain_huggingface")
    from rag_rerank_plugins.langchain import SharedEmbeddings

    kwargs: dict[str, Any] = {
        "model_kwargs": {"truncate_dim": 64},
        "encode_kwargs": {"truncate_dim": 32, "normalize_embeddings": True},
        "query_encode_kwargs": {"truncate_dim": 16},
    }
    stock = hf.HuggingFaceEmbeddings(model_name=plain_minilm, **kwargs)
    ours = SharedEmbeddings(model_name=plain_minilm, dtype="float32", **kwargs)
    _close(ours.embed_documents(TEXTS), stock.embed_documents(TEXTS))
    _close(ours.embed_query(QUERY), stock.embed_query(QUERY))
