"""Settings a migrating user changes the stock way still mean what they meant.

Swap one import (the stock LangChain / LlamaIndex class for ours), change nothing else: each
test runs the installed stock class and ours side by side on the same local FP32 model.
Covered: ``encode_kwargs`` / ``query_encode_kwargs`` read per call (so ``model_copy(update=...)``
and in-place edits change normalisation as they do for ``HuggingFaceEmbeddings``), and devices
given as ``torch.device(...)`` or torch's ``"cpu:0"`` (the common
``torch.device("cuda" if ... else "cpu")`` idiom) in every adapter.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("torch")
pytest.importorskip("sentence_transformers")

import torch

ATOL = 1e-4
QUERY = "which animal sleeps all day?"
TEXTS = ["cats sleep all day long", "dogs bark at the postman", "fish swim"]


@pytest.fixture(scope="module", autouse=True)
def _fp32(float32_policy: None) -> None:
    """FP32 on every CPU, so vectors compare to the stock classes' (see conftest)."""


@pytest.fixture(scope="module")
def plain_embedder(tmp_path_factory: pytest.TempPathFactory, tiny_ce_path: str) -> str:
    """A sentence-transformers embedder *without* a Normalize module (all-MiniLM has one, which
    hides every normalize_embeddings difference): mean pooling over a tiny BERT."""
    from sentence_transformers import SentenceTransformer

    path = tmp_path_factory.mktemp("review") / "plain-embedder"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        SentenceTransformer(tiny_ce_path, device="cpu").save(str(path))
    return str(path)


def _norm(vector: list[float]) -> float:
    return float(np.linalg.norm(np.asarray(vector, dtype=np.float64)))


# -- 1. SharedEmbeddings reads normalize_embeddings from encode_kwargs only at construction ------


def _lc_pair(plain_embedder: str, pool, **kwargs):
    pytest.importorskip("langchain_huggingface")
    from langchain_huggingface import HuggingFaceEmbeddings

    from rag_rerank_plugins.langchain import SharedEmbeddings

    stock = HuggingFaceEmbeddings(
        model_name=plain_embedder, model_kwargs={"device": "cpu"}, **kwargs
    )
    ours = SharedEmbeddings(
        model_name=plain_embedder,
        model_kwargs={"device": "cpu"},
        dtype="float32",
        pool=pool,
        **kwargs,
    )
    return stock, ours


def test_model_copy_with_new_encode_kwargs_normalizes_as_stock(plain_embedder: str, pool) -> None:
    """``emb.model_copy(update={"encode_kwargs": {"normalize_embeddings": True}})``: the stock
    class reads encode_kwargs per call and returns unit vectors; ours kept the construction-time
    ``normalize_embeddings`` field (False) and returns unnormalised vectors."""
    stock, ours = _lc_pair(plain_embedder, pool)
    update = {"encode_kwargs": {"normalize_embeddings": True}}
    stock2, ours2 = stock.model_copy(update=update), ours.model_copy(update=update)
    expected = stock2.embed_documents(TEXTS)
    assert _norm(expected[0]) == pytest.approx(1.0, abs=1e-5)
    np.testing.assert_allclose(ours2.embed_documents(TEXTS), expected, atol=ATOL)
    np.testing.assert_allclose(ours2.embed_query(QUERY), stock2.embed_query(QUERY), atol=ATOL)


def test_encode_kwargs_changed_in_place_apply_as_stock(plain_embedder: str, pool) -> None:
    """``emb.encode_kwargs["normalize_embeddings"] = False`` after construction: the stock class
    follows it; ours keeps normalising."""
    stock, ours = _lc_pair(plain_embedder, pool, encode_kwargs={"normalize_embeddings": True})
    stock.encode_kwargs["normalize_embeddings"] = False
    ours.encode_kwargs["normalize_embeddings"] = False
    expected = stock.embed_documents(TEXTS)
    assert _norm(expected[0]) > 1.5
    np.testing.assert_allclose(ours.embed_documents(TEXTS), expected, atol=ATOL)


def test_query_encode_kwargs_set_after_construction_replace_as_stock(
    plain_embedder: str, pool
) -> None:
    """query_encode_kwargs given after construction replace encode_kwargs for queries in the stock
    class (so the documents' normalisation no longer applies to queries); ours still normalises."""
    stock, ours = _lc_pair(plain_embedder, pool, encode_kwargs={"normalize_embeddings": True})
    update = {"query_encode_kwargs": {"prompt": "q: "}}
    stock2, ours2 = stock.model_copy(update=update), ours.model_copy(update=update)
    expected = stock2.embed_query(QUERY)
    assert _norm(expected) > 1.5
    np.testing.assert_allclose(ours2.embed_query(QUERY), expected, atol=ATOL)


# -- 2. device given as torch.device, or as torch's canonical "cpu:0"/"mps:0", is refused --------


@pytest.mark.parametrize("device", [torch.device("cpu"), "cpu:0"], ids=["torch.device", "cpu:0"])
def test_langchain_embeddings_device_as_stock(plain_embedder: str, pool, device) -> None:
    pytest.importorskip("langchain_huggingface")
    from langchain_huggingface import HuggingFaceEmbeddings

    from rag_rerank_plugins.langchain import SharedEmbeddings

    stock = HuggingFaceEmbeddings(model_name=plain_embedder, model_kwargs={"device": device})
    ours = SharedEmbeddings(
        model_name=plain_embedder, model_kwargs={"device": device}, dtype="float32", pool=pool
    )
    np.testing.assert_allclose(ours.embed_documents(TEXTS), stock.embed_documents(TEXTS), atol=ATOL)


@pytest.mark.parametrize("device", [torch.device("cpu"), "cpu:0"], ids=["torch.device", "cpu:0"])
def test_langchain_cross_encoder_device_as_stock(tiny_ce_path: str, pool, device) -> None:
    pytest.importorskip("langchain_community.cross_encoders")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from langchain_community.cross_encoders import HuggingFaceCrossEncoder

    from rag_rerank_plugins.langchain import SharedCrossEncoder

    pairs = [(QUERY, t) for t in TEXTS]
    stock = HuggingFaceCrossEncoder(model_name=tiny_ce_path, model_kwargs={"device": device})
    ours = SharedCrossEncoder(
        model_name=tiny_ce_path, model_kwargs={"device": device}, dtype="float32", pool=pool
    )
    np.testing.assert_allclose(ours.score(pairs), list(stock.score(pairs)), atol=ATOL)


@pytest.mark.parametrize("device", [torch.device("cpu"), "cpu:0"], ids=["torch.device", "cpu:0"])
def test_llama_index_rerank_device_as_stock(tiny_ce_path: str, pool, device) -> None:
    pytest.importorskip("llama_index.postprocessor.sbert_rerank")
    from llama_index.core.schema import NodeWithScore, TextNode
    from llama_index.postprocessor.sbert_rerank import SentenceTransformerRerank

    from rag_rerank_plugins.llama_index import SharedRerankPostprocessor

    def nodes() -> list[NodeWithScore]:
        return [NodeWithScore(node=TextNode(text=t, id_=str(i))) for i, t in enumerate(TEXTS)]

    stock = SentenceTransformerRerank(tiny_ce_path, device, top_n=3)
    ours = SharedRerankPostprocessor(tiny_ce_path, device, top_n=3, dtype="float32", pool=pool)
    expected = stock.postprocess_nodes(nodes(), query_str=QUERY)
    got = ours.postprocess_nodes(nodes(), query_str=QUERY)
    assert [n.node.id_ for n in got] == [n.node.id_ for n in expected]
    np.testing.assert_allclose([n.score for n in got], [n.score for n in expected], atol=ATOL)


@pytest.mark.parametrize("device", [torch.device("cpu"), "cpu:0"], ids=["torch.device", "cpu:0"])
def test_llama_index_embedding_device_as_stock(plain_embedder: str, pool, device) -> None:
    pytest.importorskip("llama_index.embeddings.huggingface")
    from llama_index.embeddings.huggingface import HuggingFaceEmbedding

    from rag_rerank_plugins.llama_index import SharedEmbedding

    stock = HuggingFaceEmbedding(plain_embedder, device=device, cache_folder=str(Path("/tmp")))
    ours = SharedEmbedding(plain_embedder, device=device, dtype="float32", pool=pool)
    np.testing.assert_allclose(
        ours.get_query_embedding(QUERY), stock.get_query_embedding(QUERY), atol=ATOL
    )
