"""A migrating user's own code around the stock classes, after swapping one import.

Users subclass the stock adapters (a query prefix, a filter, a calibration), switch their model
with ``model_copy`` or assignment, tune ``top_n`` at query time, and catch ``OSError`` around
the first call. Each test runs the stock class next to ours on the same tiny model where the
stock class is installed, so "as stock" means what stock does in this run.
"""

from __future__ import annotations

import asyncio
import pickle
from typing import Any

import pytest
from langchain_core.cross_encoders import BaseCrossEncoder
from langchain_core.documents import Document
from llama_index.core.schema import NodeWithScore, QueryBundle, TextNode

from rag_rerank_plugins import ConfigurationError, ModelLoadError, ModelNotFoundError, ModelPool
from rag_rerank_plugins.langchain import (
    SharedCrossEncoder,
    SharedEmbeddings,
    SharedRerankCompressor,
)
from rag_rerank_plugins.llama_index import SharedEmbedding, SharedRerankPostprocessor

TEXTS = ["ab", "abcd x", "abcde y", "a"]


# -- a sync override serves the async path, as in every stock base class -----------------------


class PrefixEmbeddings(SharedEmbeddings):
    def embed_query(self, text: str) -> list[float]:
        return super().embed_query("query: " + text)

    def embed_documents(self, texts: list[str]) -> list[list[float]]:
        return super().embed_documents(["passage: " + t for t in texts])


class DropShort(SharedRerankCompressor):
    def compress_documents(self, documents: Any, query: str, callbacks: Any = None) -> Any:
        kept = [d for d in documents if len(d.page_content) > 3]
        return super().compress_documents(kept, query, callbacks)


class MinScore(SharedRerankPostprocessor):
    def _postprocess_nodes(
        self, nodes: list[NodeWithScore], query_bundle: QueryBundle | None = None
    ) -> list[NodeWithScore]:
        kept = [n for n in nodes if (n.score or 0) >= 0.5]
        return super()._postprocess_nodes(kept, query_bundle)


class PrefixEmbedding(SharedEmbedding):
    def _get_query_embedding(self, query: str) -> list[float]:
        return super()._get_query_embedding("query: " + query)

    def _get_text_embedding(self, text: str) -> list[float]:
        return super()._get_text_embedding("passage: " + text)

    def _get_text_embeddings(self, texts: list[str]) -> list[list[float]]:
        return super()._get_text_embeddings(["passage: " + t for t in texts])


def test_langchain_embeddings_subclass_sync_override_serves_async(pool: ModelPool) -> None:
    emb = PrefixEmbeddings(model="fake", backend="fake-embedder", pool=pool)
    assert asyncio.run(emb.aembed_query("hi")) == emb.embed_query("hi")
    assert emb.embed_query("hi") != SharedEmbeddings(
        model="fake", backend="fake-embedder", pool=pool
    ).embed_query("hi")  # the override changes the vector: the check above can fail
    assert asyncio.run(emb.aembed_documents(["ab c"])) == emb.embed_documents(["ab c"])


def test_langchain_compressor_subclass_sync_override_serves_async(pool: ModelPool) -> None:
    compressor = DropShort(model="fake", backend="fake-reranker", pool=pool, top_n=None)
    docs = [Document(page_content=t) for t in TEXTS]
    sync = [d.page_content for d in compressor.compress_documents(docs, "ab")]
    via_async = [d.page_content for d in asyncio.run(compressor.acompress_documents(docs, "ab"))]
    assert via_async == sync
    assert "ab" not in via_async


def test_llama_index_postprocessor_subclass_sync_override_serves_async(pool: ModelPool) -> None:
    reranker = MinScore("fake", backend="fake-reranker", top_n=3, pool=pool)
    nodes = [
        NodeWithScore(node=TextNode(text=t), score=s)
        for t, s in [("low", 0.1), ("high a", 0.9), ("high b", 0.8)]
    ]
    via_async = asyncio.run(reranker.apostprocess_nodes(nodes, query_str="low"))
    assert [n.node.text for n in via_async] == [
        n.node.text for n in reranker.postprocess_nodes(nodes, query_str="low")
    ]
    assert "low" not in [n.node.text for n in via_async]


def test_llama_index_embedding_subclass_sync_overrides_serve_async(pool: ModelPool) -> None:
    emb = PrefixEmbedding("fake", backend="fake-embedder", pool=pool)
    assert asyncio.run(emb.aget_query_embedding("hi")) == emb.get_query_embedding("hi")
    assert asyncio.run(emb.aget_text_embedding("hi")) == emb.get_text_embedding("hi")
    assert asyncio.run(emb.aget_text_embedding_batch(["hi", "yo"])) == (
        emb.get_text_embedding_batch(["hi", "yo"])
    )
    plain = SharedEmbedding("fake", backend="fake-embedder", pool=pool)
    assert emb.get_text_embedding("hi") != plain.get_text_embedding("hi")


def test_stock_base_classes_run_the_sync_override_on_the_async_path() -> None:
    """The behaviour the tests above copy, pinned on the installed stock base classes."""
    from langchain_core.embeddings import Embeddings

    class Stock(Embeddings):
        def embed_documents(self, texts: list[str]) -> list[list[float]]:
            return [[float(len(t))] for t in texts]

        def embed_query(self, text: str) -> list[float]:
            return [float(len(text))]

    class Sub(Stock):
        def embed_query(self, text: str) -> list[float]:
            return super().embed_query("query: " + text)

    assert asyncio.run(Sub().aembed_query("hi")) == Sub().embed_query("hi") == [9.0]


def test_an_unchanged_subclass_keeps_the_native_async_path(pool: ModelPool) -> None:
    """A subclass overriding nothing (or both methods) is not sent through a thread."""

    class Plain(SharedEmbeddings):
        pass

    class Both(SharedEmbeddings):
        def embed_query(self, text: str) -> list[float]:
            return [1.0]

        async def aembed_query(self, text: str) -> list[float]:
            return [2.0]

    assert asyncio.run(Plain(model="fake", backend="fake-embedder", pool=pool).aembed_query("hi"))
    assert asyncio.run(
        Both(model="fake", backend="fake-embedder", pool=pool).aembed_query("x")
    ) == [2.0]


# -- a cross-encoder subclass with its own score() ---------------------------------------------


class Negated(SharedCrossEncoder):
    def score(self, text_pairs: Any) -> Any:
        return [-s for s in super().score(text_pairs)]


def test_compressor_uses_a_shared_cross_encoder_subclass_s_own_score(tiny_ce_path: str) -> None:
    """``CrossEncoderReranker(model=Negated(...))`` ranks by the subclass's scores; ours took
    only its model fields and ranked as a plain SharedCrossEncoder."""
    from langchain_classic.retrievers.document_compressors import CrossEncoderReranker

    docs = [Document(page_content=t, metadata={"i": i}) for i, t in enumerate(TEXTS)]
    query = "abcd"
    stock = CrossEncoderReranker(model=Negated(model_name=tiny_ce_path), top_n=3)
    ours = SharedRerankCompressor(model=Negated(model_name=tiny_ce_path), top_n=3)
    plain = SharedRerankCompressor(model=SharedCrossEncoder(model_name=tiny_ce_path), top_n=3)
    expected = [d.metadata["i"] for d in stock.compress_documents(docs, query)]
    assert [d.metadata["i"] for d in ours.compress_documents(docs, query)] == expected
    assert [d.metadata["i"] for d in plain.compress_documents(docs, query)] != expected


# -- switching the model after construction ----------------------------------------------------


class Shortest(BaseCrossEncoder):
    def score(self, text_pairs: Any) -> list[float]:
        return [-float(len(p[1])) for p in text_pairs]


class Longest(BaseCrossEncoder):
    def score(self, text_pairs: Any) -> list[float]:
        return [float(len(p[1])) for p in text_pairs]


def _order(compressor: Any) -> list[str]:
    docs = [Document(page_content=t) for t in ("aaaa", "a", "aaaaaaaa", "aa")]
    return [d.page_content for d in compressor.compress_documents(docs, "q")]


def test_model_copy_and_assignment_switch_the_model_as_stock_does(pool: ModelPool) -> None:
    from langchain_classic.retrievers.document_compressors import CrossEncoderReranker

    for cls in (CrossEncoderReranker, SharedRerankCompressor):
        first = cls(model=Longest(), top_n=2)
        copied = first.model_copy(update={"model": Shortest()})
        assert _order(first) == ["aaaaaaaa", "aaaa"], cls
        assert _order(copied) == ["a", "aa"], cls  # the copy switched; the original did not
        first.model = Shortest()
        assert _order(first) == ["a", "aa"], cls


def test_a_custom_scorer_copied_to_a_model_name_scores_with_the_shared_model(
    pool: ModelPool,
) -> None:
    """The private scorer was copied along: the copy named a shared model and still scored
    with the old object."""
    first = SharedRerankCompressor(model=Longest(), top_n=2)
    copied = first.model_copy(update={"model": "fake", "backend": "fake-reranker", "pool": pool})
    fake = SharedRerankCompressor(model="fake", backend="fake-reranker", pool=pool, top_n=2)
    assert _order(copied) == _order(fake)
    assert _order(first) == ["aaaaaaaa", "aaaa"]
    first.model = "fake"
    first.backend = "fake-reranker"
    assert _order(first) == _order(fake)


def test_top_n_and_threshold_set_after_construction_are_checked_at_the_call(
    pool: ModelPool,
) -> None:
    """As the LlamaIndex postprocessor already did: ``top_n=0`` returned no documents, ``-1``
    all but the last (a silent drop), a string threshold failed deep in the ranking."""
    base = SharedRerankCompressor(model="fake", backend="fake-reranker", pool=pool)
    docs = [Document(page_content=t) for t in TEXTS]
    for update in ({"top_n": 0}, {"top_n": -1}, {"score_threshold": "0.5"}):
        with pytest.raises(ConfigurationError):
            base.model_copy(update=update).compress_documents(docs, "ab")
        with pytest.raises(ConfigurationError):
            asyncio.run(base.model_copy(update=update).acompress_documents(docs, "ab"))
    base.top_n = -1
    with pytest.raises(ConfigurationError, match="top_n"):
        base.compress_documents(docs, "ab")


# -- tokens set past the validators stay hidden ------------------------------------------------


@pytest.mark.parametrize("way", ["model_copy", "assignment", "write"])
def test_a_token_set_after_construction_is_never_shown(way: str) -> None:
    emb = SharedEmbeddings(model_name="org/private-model", model_kwargs={"token": "hf_FIRST"})
    if way == "model_copy":
        emb = emb.model_copy(update={"model_kwargs": {"token": "hf_SECOND"}})
    elif way == "assignment":
        emb.model_kwargs = {"token": "hf_SECOND"}
    else:
        emb.model_kwargs["token"] = "hf_SECOND"
    for shown in (repr(emb), emb.model_dump_json(), str(emb.model_dump()), emb.spec.label):
        assert "hf_SECOND" not in shown
        assert "hf_FIRST" not in shown
    li = SharedRerankPostprocessor("org/private-reranker", model_kwargs={"token": "hf_A"})
    li = li.model_copy(update={"model_kwargs": {"token": "hf_LI"}})
    assert "hf_LI" not in li.to_json()
    assert "hf_LI" not in repr(li)


# -- a missing model is an OSError, as stock's is ----------------------------------------------


def test_a_missing_model_is_an_os_error_like_stock_s(tmp_path: Any) -> None:
    from sentence_transformers import CrossEncoder

    missing = str(tmp_path / "no-such-model")
    with pytest.raises(OSError):  # noqa: PT011  # what stock code catches
        CrossEncoder(missing)
    with pytest.raises(OSError) as info:  # noqa: PT011
        SharedCrossEncoder(model_name=missing, pool=ModelPool()).score([("q", "p")])
    assert isinstance(info.value, ModelNotFoundError)
    assert isinstance(info.value, ModelLoadError)
    copy = pickle.loads(pickle.dumps(info.value))  # crosses process boundaries intact
    assert str(copy) == str(info.value)
    assert copy.model == missing


def test_switching_the_model_keeps_the_compressor_s_pool() -> None:
    mine = ModelPool()
    compressor = SharedRerankCompressor(model="a", backend="fake-reranker", pool=mine)
    assert compressor.model_copy(update={"model": "b"}).pool is mine
    compressor.model = "b"
    assert compressor.pool is mine
    compressor.compress_documents([Document(page_content="x y")], "x")
    assert [spec.model for spec in mine.loaded_specs()] == ["b"]
    mine.clear()


def test_an_async_override_calling_super_reaches_a_sync_override_above_it(
    pool: ModelPool,
) -> None:
    """As stock: ``B.aembed_query`` -> ``super()`` -> the base's async method, which runs the
    nearest ``embed_query`` (``A``'s prefix) in a thread; it skipped ``A`` because ``B`` had an
    async method of its own."""
    calls: list[str] = []

    class A(SharedEmbeddings):
        def embed_query(self, text: str) -> list[float]:
            calls.append("A.embed_query")
            return super().embed_query("query: " + text)

    class B(A):
        async def aembed_query(self, text: str) -> list[float]:
            calls.append("B.aembed_query")
            return await super().aembed_query(text)

    class Both(SharedEmbeddings):  # defines both: its own async method runs, no thread
        def embed_query(self, text: str) -> list[float]:
            return super().embed_query("query: " + text)

        async def aembed_query(self, text: str) -> list[float]:
            return await super().aembed_query("query: " + text)

    b = B(model="fake", backend="fake-embedder", pool=pool)
    sync = b.embed_query("hello")
    calls.clear()
    assert asyncio.run(b.aembed_query("hello")) == sync
    assert calls == ["B.aembed_query", "A.embed_query"]
    both = Both(model="fake", backend="fake-embedder", pool=pool)
    assert asyncio.run(both.aembed_query("hello")) == both.embed_query("hello")
