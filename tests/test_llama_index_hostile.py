"""The LlamaIndex adapters under a migrating, hostile user: one import swapped from the stock class,
then everything a pipeline does to a component (pickle it, deep-copy it, tune it by assignment,
call it with the wrong shapes), side by side with the stock classes where they are installed.

Each regression test names the failure it pins down (what the old code did).
"""

from __future__ import annotations

import asyncio
import copy
import pickle
from typing import Any

import numpy as np
import pytest

pytest.importorskip("llama_index.core")

from llama_index.core import VectorStoreIndex
from llama_index.core.llms import MockLLM
from llama_index.core.schema import (
    ImageNode,
    MetadataMode,
    NodeRelationship,
    NodeWithScore,
    QueryBundle,
    RelatedNodeInfo,
    TextNode,
)

from rag_rerank_plugins import ModelPool
from rag_rerank_plugins.exceptions import ConfigurationError, InvalidInputError
from rag_rerank_plugins.llama_index import (
    SemanticCacheQueryEngine,
    SharedEmbedding,
    SharedRerankPostprocessor,
)
from rag_rerank_plugins.llama_index.query_engine import CACHE_KEY
from rag_rerank_plugins.semantic_cache import SemanticCache
from rag_rerank_plugins.testing import fake_embedder_spec

ATOL = 1e-5


@pytest.fixture(scope="module", autouse=True)
def _float32(float32_policy: None) -> None:
    """Compared with the stock classes to 1e-5: FP32 in the BF16 run too (see conftest)."""


def _reranker(pool: ModelPool, **kwargs: Any) -> SharedRerankPostprocessor:
    return SharedRerankPostprocessor(model="fake", backend="fake-reranker", pool=pool, **kwargs)


def _embedding(pool: ModelPool, **kwargs: Any) -> SharedEmbedding:
    return SharedEmbedding(model_name="fake", backend="fake-embedder", pool=pool, **kwargs)


def _nodes() -> list[NodeWithScore]:
    texts = ["cats sleep all day", "dogs bark", "birds sing", "cats and dogs"]
    return [
        NodeWithScore(node=TextNode(text=t, id_=f"n{i}", metadata={"i": i}), score=0.1 * i)
        for i, t in enumerate(texts)
    ]


# -- pickling and copying --------------------------------------------------------------------


@pytest.mark.parametrize("make", [_reranker, _embedding], ids=["postprocessor", "embedding"])
def test_pickling_leaves_the_adapter_itself_working(make: Any, pool: ModelPool) -> None:
    """Old: LlamaIndex's __getstate__ deleted the unpicklable ``pool`` from the live adapter's
    own __dict__ (pydantic hands out that dict), so after ``pickle.dumps(adapter)`` (an
    IngestionPipeline with num_workers, a multiprocessing pool) its next call raised
    ``AttributeError: ... no attribute 'pool'``."""
    adapter = make(pool)
    restored = pickle.loads(pickle.dumps(adapter))
    assert adapter.pool is pool  # the original keeps its pool
    assert restored.pool is None  # the copy uses the default pool where it is unpickled
    assert restored.spec == adapter.spec
    if isinstance(adapter, SharedRerankPostprocessor):
        assert [n.node.node_id for n in adapter.postprocess_nodes(_nodes(), query_str="cats")]
        assert len(asyncio.run(adapter.apostprocess_nodes(_nodes(), query_str="cats"))) == 2
    else:
        assert len(adapter.get_text_embedding("cats")) == 64
        assert adapter.stats()["loaded"]
    restored.release()  # what the copy loaded in the default pool


def test_an_unpicklable_model_option_is_refused_not_dropped_with_the_others(
    pool: ModelPool,
) -> None:
    """One lambda in the options dropped the whole options field from the pickle: the copy
    loaded the model without ``revision`` and the rest and scored differently (a log line was
    the only sign). The options define the model: refused, naming the value."""
    adapter = SharedRerankPostprocessor(
        model="fake",
        backend="fake-reranker",
        pool=pool,
        cross_encoder_kwargs={"activation_fn": lambda x: x * 100.0, "revision": "main"},
    )
    with pytest.raises(pickle.PicklingError, match=r"model_kwargs\['activation_fn'\]"):
        pickle.dumps(adapter)
    assert adapter.pool is pool  # the live adapter is untouched
    assert adapter.spec.option("revision") == "main"


@pytest.mark.parametrize("make", [_reranker, _embedding], ids=["postprocessor", "embedding"])
def test_deep_copies_share_the_pool(make: Any, pool: ModelPool) -> None:
    """Old: ``copy.deepcopy(adapter)`` and ``model_copy(deep=True)`` with ``pool=`` raised
    ``TypeError: cannot pickle '_thread.lock' object`` (it tried to copy the pool's locks).
    The pool is a process-wide resource: a copy shares it, as it shares the loaded model."""
    adapter = make(pool)
    for twin in (copy.deepcopy(adapter), adapter.model_copy(deep=True)):
        assert twin.pool is pool
        assert twin is not adapter
        assert twin.spec == adapter.spec
        assert twin.callback_manager is not adapter.callback_manager  # still a deep copy


# -- SharedRerankPostprocessor -----------------------------------------------------------------


@pytest.mark.parametrize("value", [0, -1, "3", True, 2.0])
def test_top_n_assigned_after_construction_is_checked(value: Any, pool: ModelPool) -> None:
    """Old: ``reranker.top_n = 0`` (tuning at query time, as LlamaIndex users do) returned no
    nodes and ``-1`` all but the last, silently; ``"3"`` failed deep in the ranking with a
    TypeError about slices. Now each fails with the construction-time message."""
    reranker = _reranker(pool, top_n=None)
    reranker.top_n = value
    with pytest.raises(ConfigurationError, match="top_n"):
        reranker.postprocess_nodes(_nodes(), query_str="cats")
    with pytest.raises(ConfigurationError, match="top_n"):
        asyncio.run(reranker.apostprocess_nodes(_nodes(), query_str="cats"))
    reranker.top_n = 1  # a valid assignment still works, as on the stock class
    assert len(reranker.postprocess_nodes(_nodes(), query_str="cats")) == 1


def test_score_threshold_assigned_after_construction_is_checked(pool: ModelPool) -> None:
    reranker = _reranker(pool)
    reranker.score_threshold = "0.5"  # type: ignore[assignment]
    with pytest.raises(ConfigurationError, match="score_threshold"):
        reranker.postprocess_nodes(_nodes(), query_str="cats")


def test_a_str_as_query_bundle_is_a_clear_error(pool: ModelPool) -> None:
    """Old: ``postprocess_nodes(nodes, "question")`` (the second positional argument is the
    bundle) raised ``AttributeError: 'str' object has no attribute 'query_str'``, as the stock
    class does. Now it says to pass ``query_str=`` by keyword."""
    reranker = _reranker(pool)
    with pytest.raises(InvalidInputError, match=r"query_str='cats'"):
        reranker.postprocess_nodes(_nodes(), "cats")  # type: ignore[arg-type]
    with pytest.raises(InvalidInputError, match="QueryBundle, got dict"):
        asyncio.run(reranker.apostprocess_nodes(_nodes(), {"query_str": "cats"}))  # type: ignore[arg-type]
    assert reranker.postprocess_nodes(_nodes(), query_str="cats")[0].node.node_id == "n0"


def test_top_n_first_positionally_names_the_older_core_signature(pool: ModelPool) -> None:
    """``llama_index.core.postprocessor.SentenceTransformerRerank(3, "model")`` takes top_n
    first; ours takes the model first (as the sbert-rerank package). Old: pydantic's
    "model: Input should be a valid string". Now the message says what to change."""
    with pytest.raises(ConfigurationError, match="top_n=3 by keyword"):
        SharedRerankPostprocessor(3, "fake", backend="fake-reranker", pool=pool)


def test_nodes_side_by_side_with_the_stock_reranker(tiny_ce_path: str, pool: ModelPool) -> None:
    """Every node kind a retriever returns, through ``SentenceTransformerRerank`` and ours:
    the same order, scores, ids, node types and metadata; the scored text is
    ``get_content(MetadataMode.EMBED)`` (excluded embed keys left out) in both."""
    stock_module = pytest.importorskip("llama_index.postprocessor.sbert_rerank")

    def nodes() -> list[NodeWithScore]:
        return [
            NodeWithScore(
                node=TextNode(
                    text="cats sleep",
                    id_="meta",
                    metadata={"title": "dogs bark", "secret": "cats cats"},
                    excluded_embed_metadata_keys=["secret"],
                ),
                score=0.5,
            ),
            NodeWithScore(node=TextNode(text="", id_="empty"), score=0.4),
            NodeWithScore(node=ImageNode(text="a dog", image="aGk=", id_="image"), score=None),
            NodeWithScore(node=TextNode(text="cats sleep", id_="dup1"), score=0.3),
            NodeWithScore(node=TextNode(text="cats sleep", id_="dup2"), score=0.3),
            NodeWithScore(node=TextNode(text="word " * 3000, id_="long"), score=0.2),
        ]

    stock = stock_module.SentenceTransformerRerank(tiny_ce_path, device="cpu", top_n=100)
    ours = SharedRerankPostprocessor(
        tiny_ce_path, device="cpu", dtype="float32", top_n=100, pool=pool
    )
    query = "which dogs bark?"
    theirs = stock.postprocess_nodes(nodes(), query_str=query)
    mine = ours.postprocess_nodes(nodes(), query_str=query)
    assert [n.node.node_id for n in mine] == [n.node.node_id for n in theirs]
    assert [type(n.node) for n in mine] == [type(n.node) for n in theirs]
    assert [n.node.metadata for n in mine] == [n.node.metadata for n in theirs]
    np.testing.assert_allclose(
        [float(n.score or 0) for n in mine], [float(n.score or 0) for n in theirs], atol=ATOL
    )
    assert all(type(n.score) is float for n in mine)
    # None keeps all, as top_n larger than the list does in both.
    ours.top_n = None
    assert len(ours.postprocess_nodes(nodes(), query_str=query)) == len(theirs) == 6
    # The text scored is the EMBED content: the excluded key changes nothing, an included one does.
    alone = ours.postprocess_nodes(nodes()[:1], query_str=query)[0].score
    plain = TextNode(text="title: dogs bark\n\ncats sleep", id_="plain")
    assert ours.postprocess_nodes([NodeWithScore(node=plain)], query_str=query)[0].score == (
        pytest.approx(alone, abs=ATOL)
    )


# -- SharedEmbedding ---------------------------------------------------------------------------


def test_a_single_str_is_not_embedded_letter_by_letter(pool: ModelPool) -> None:
    """Old (and the stock class): ``get_text_embedding_batch("hello")`` returned five vectors,
    one per letter. Now a clear error, sync and async, before any model work."""
    embedding = _embedding(pool)
    with pytest.raises(InvalidInputError, match="single str 'hello'"):
        embedding.get_text_embedding_batch("hello")  # type: ignore[arg-type]
    with pytest.raises(InvalidInputError, match="single str"):
        asyncio.run(embedding.aget_text_embedding_batch("hello"))  # type: ignore[arg-type]
    with pytest.raises(InvalidInputError, match="got NoneType"):
        embedding.get_text_embedding_batch(None)  # type: ignore[arg-type]
    assert pool.spec_stats(embedding.spec)["loads"] == 0


def test_a_bad_item_is_named_by_its_index_in_texts(pool: ModelPool) -> None:
    """Old: with ``embed_batch_size=2`` a None at texts[3] was reported as ``text #1`` (its
    index in the second chunk), after the first chunk was embedded."""
    embedding = _embedding(pool, embed_batch_size=2)
    with pytest.raises(InvalidInputError, match=r"texts\[3\] is NoneType"):
        embedding.get_text_embedding_batch(["a", "b", "c", None])  # type: ignore[list-item]
    with pytest.raises(InvalidInputError, match=r"texts\[3\] is int"):
        asyncio.run(embedding.aget_text_embedding_batch(["a", "b", "c", 3]))  # type: ignore[list-item]
    assert pool.spec_stats(embedding.spec)["loads"] == 0


def test_any_iterable_of_texts_is_embedded(pool: ModelPool) -> None:
    """Old: a generator (or any iterable without ``len``) raised ``TypeError: object of type
    'generator' has no len()`` inside LlamaIndex's batching."""
    embedding = _embedding(pool, embed_batch_size=2)
    texts = ["cats", "dogs", "cats", "birds sing"]
    expected = embedding.get_text_embedding_batch(texts)
    assert embedding.get_text_embedding_batch(t for t in texts) == expected  # type: ignore[arg-type]
    assert asyncio.run(embedding.aget_text_embedding_batch(tuple(texts))) == expected  # type: ignore[arg-type]
    assert expected[0] == expected[2]  # duplicates get equal vectors
    assert embedding.get_text_embedding_batch([]) == []


def test_batches_side_by_side_with_the_stock_embedding(minilm_path: str, pool: ModelPool) -> None:
    """HuggingFaceEmbedding and ours on the awkward batches: empty text, duplicates, a text far
    past the model's limit (truncated in both), an empty list; sync and async, queries too."""
    stock_module = pytest.importorskip("llama_index.embeddings.huggingface")
    stock = stock_module.HuggingFaceEmbedding(minilm_path, device="cpu", embed_batch_size=2)
    ours = SharedEmbedding(
        minilm_path, device="cpu", dtype="float32", embed_batch_size=2, pool=pool
    )
    texts = ["", "cats sleep", "cats sleep", "word " * 5000, "dogs bark"]
    expected = np.array(stock.get_text_embedding_batch(texts))
    np.testing.assert_allclose(ours.get_text_embedding_batch(texts), expected, atol=ATOL)
    got = asyncio.run(ours.aget_text_embedding_batch(texts, show_progress=True))
    np.testing.assert_allclose(got, expected, atol=ATOL)
    np.testing.assert_allclose(
        asyncio.run(ours.aget_query_embedding("cats?")),
        stock.get_query_embedding("cats?"),
        atol=ATOL,
    )
    assert ours.get_text_embedding_batch([]) == stock.get_text_embedding_batch([]) == []


# -- SemanticCacheQueryEngine ------------------------------------------------------------------


@pytest.fixture
def index(pool: ModelPool) -> VectorStoreIndex:
    source = RelatedNodeInfo(node_id="doc-cats")
    nodes = [
        TextNode(
            text="cats sleep all day",
            id_="cats",
            metadata={"owner": "alice", "topic": "cats"},
            excluded_llm_metadata_keys=["owner"],
            relationships={NodeRelationship.SOURCE: source},
        ),
        TextNode(text="dogs bark loudly", id_="dogs", metadata={"topic": "dogs"}),
    ]
    return VectorStoreIndex(nodes, embed_model=_embedding(pool))


class _Counting:
    """Counts the queries that reach the wrapped engine (the cache misses)."""

    def __init__(self, engine: Any) -> None:
        self.calls = 0
        query, aquery = engine._query, engine._aquery

        def counted(bundle: QueryBundle) -> Any:
            self.calls += 1
            return query(bundle)

        async def acounted(bundle: QueryBundle) -> Any:
            self.calls += 1
            return await aquery(bundle)

        engine._query, engine._aquery = counted, acounted


def _cached_engine(index: VectorStoreIndex, pool: ModelPool) -> tuple[Any, _Counting]:
    inner = index.as_query_engine(llm=MockLLM(max_tokens=4), similarity_top_k=1)
    counter = _Counting(inner)
    return SemanticCacheQueryEngine(inner, SemanticCache(fake_embedder_spec(), pool=pool)), counter


def test_a_bundle_retrieving_other_text_is_never_answered_from_the_cache(
    index: VectorStoreIndex, pool: ModelPool
) -> None:
    """Old: the cache is keyed by ``query_str`` only, so ``QueryBundle("cats",
    custom_embedding_strs=["dogs"])`` after "cats" was answered from the cache with the cats
    source, though the engine retrieves dogs for it. Now such bundles go to the engine."""
    engine, counter = _cached_engine(index, pool)
    assert engine.query("cats").source_nodes[0].node.node_id == "cats"
    other = engine.query(QueryBundle("cats", custom_embedding_strs=["dogs"]))
    assert counter.calls == 2
    assert other.source_nodes[0].node.node_id == "dogs"
    assert CACHE_KEY not in (other.metadata or {})
    async_other = asyncio.run(engine.aquery(QueryBundle("cats", custom_embedding_strs=["dogs"])))
    assert counter.calls == 3
    assert async_other.source_nodes[0].node.node_id == "dogs"
    # The question itself as the embedding text is the plain query: answered from the cache.
    same = engine.query(QueryBundle("cats", custom_embedding_strs=["cats"]))
    assert counter.calls == 3
    assert same.metadata[CACHE_KEY]["hit"]
    assert engine.query("cats").source_nodes[0].node.node_id == "cats"  # nothing overwrote it


def test_cached_sources_keep_what_the_index_hides_and_their_document(
    index: VectorStoreIndex, pool: ModelPool
) -> None:
    """Old: a hit's source nodes were rebuilt from id, text and metadata only, so
    ``get_content(MetadataMode.LLM)`` showed metadata the index excludes from the LLM
    (``owner: alice``) and ``ref_doc_id`` (what citations use) was None."""
    engine, counter = _cached_engine(index, pool)
    first = engine.query("cats").source_nodes[0].node
    hit = engine.query("cats")
    assert counter.calls == 1
    assert hit.metadata[CACHE_KEY]["hit"]
    cached = hit.source_nodes[0].node
    assert "owner" not in cached.get_content(metadata_mode=MetadataMode.LLM)
    for mode in (MetadataMode.LLM, MetadataMode.EMBED, MetadataMode.ALL, MetadataMode.NONE):
        assert cached.get_content(metadata_mode=mode) == first.get_content(metadata_mode=mode)
    assert cached.ref_doc_id == first.ref_doc_id == "doc-cats"
    assert cached.metadata == first.metadata


def test_answers_stored_by_earlier_versions_still_hit(
    index: VectorStoreIndex, pool: ModelPool
) -> None:
    """An entry without the node settings (written before they were stored) is still read."""
    engine, counter = _cached_engine(index, pool)
    old = {
        "response": "stored earlier",
        "source_nodes": [{"id": "cats", "score": 0.5, "text": "cats", "metadata": {"a": 1}}],
        "metadata": None,
    }
    engine.cache.put("cats", old, namespace=engine.namespace)
    hit = engine.query("cats")
    assert counter.calls == 0
    assert hit.response == "stored earlier"
    assert hit.source_nodes[0].node.metadata == {"a": 1}
