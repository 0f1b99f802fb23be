"""LlamaIndex adapters: postprocessor contract, events, no mutation, query engines."""

from __future__ import annotations

import asyncio
import copy
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

pytest.importorskip("llama_index.core")

from llama_index.core.callbacks import CallbackManager, CBEventType, LlamaDebugHandler
from llama_index.core.instrumentation import get_dispatcher
from llama_index.core.instrumentation.event_handlers import BaseEventHandler
from llama_index.core.instrumentation.events.rerank import ReRankEndEvent, ReRankStartEvent
from llama_index.core.schema import NodeWithScore, QueryBundle, TextNode

from rag_rerank_plugins import InvalidInputError, ModelPool
from rag_rerank_plugins.llama_index import SharedEmbedding, SharedRerankPostprocessor

QUERY = "which organelle produces ATP?"


def _nodes(passages: list[str]) -> list[NodeWithScore]:
    return [
        NodeWithScore(
            node=TextNode(text=p, id_=f"n{i}", metadata={"title": f"t{i}"}), score=1.0 - i / 10
        )
        for i, p in enumerate(passages)
    ]


class _Recorder(BaseEventHandler):
    events: list = []  # noqa: RUF012 - a pydantic field, copied per instance

    @classmethod
    def class_name(cls) -> str:
        return "Recorder"

    def handle(self, event, **kwargs) -> None:
        if isinstance(event, (ReRankStartEvent, ReRankEndEvent)):
            self.events.append(event)


@pytest.fixture
def recorder():
    handler = _Recorder(events=[])
    root = get_dispatcher()
    root.add_event_handler(handler)
    yield handler
    root.event_handlers.remove(handler)


def test_postprocessor_orders_scores_and_leaves_inputs_alone(
    pool: ModelPool, tiny_ce_path: str, direct_cross_encoder, passages: list[str], recorder
) -> None:
    nodes = _nodes(passages)
    before = copy.deepcopy(nodes)
    debug = LlamaDebugHandler()
    post = SharedRerankPostprocessor(
        model=tiny_ce_path,
        top_n=3,
        device="cpu",
        dtype="float32",
        pool=pool,
        callback_manager=CallbackManager([debug]),
    )
    out = post.postprocess_nodes(nodes, query_bundle=QueryBundle(QUERY))

    texts = [n.node.get_content(metadata_mode="embed") for n in nodes]
    assert "t0" in texts[0], "scored text includes embed-mode metadata, like LlamaIndex"
    ref = direct_cross_encoder.predict([(QUERY, t) for t in texts], show_progress_bar=False)
    order = sorted(range(len(texts)), key=lambda i: (-ref[i], i))[:3]
    assert [n.node.node_id for n in out] == [f"n{i}" for i in order]
    np.testing.assert_allclose([n.score for n in out], [ref[i] for i in order], atol=1e-5)
    assert all(isinstance(n.score, float) for n in out)
    # Inputs untouched: same scores, same metadata; outputs are new NodeWithScore objects.
    assert [(n.node.node_id, n.score, n.node.metadata) for n in nodes] == [
        (n.node.node_id, n.score, n.node.metadata) for n in before
    ]
    assert all(o is not i for o in out for i in nodes)
    # Instrumentation and callbacks, as LlamaIndex's own rerankers emit them.
    start, end = recorder.events[-2:]
    assert isinstance(start, ReRankStartEvent)
    assert isinstance(end, ReRankEndEvent)
    assert start.top_n == 3
    assert start.model_name == tiny_ce_path
    assert [n.node.node_id for n in end.nodes] == [n.node.node_id for n in out]
    pairs = debug.get_event_pairs(CBEventType.RERANKING)
    assert len(pairs) == 1


def test_keep_retrieval_score_goes_on_a_copy(pool: ModelPool, passages: list[str]) -> None:
    nodes = _nodes(passages)
    post = SharedRerankPostprocessor(
        model="f", backend="fake-reranker", keep_retrieval_score=True, top_n=None, pool=pool
    )
    out = post.postprocess_nodes(nodes, query_str="powerhouse of the cell")
    assert len(out) == len(nodes)
    first = out[0]
    assert first.node.node_id == "n0"
    assert first.node.metadata["retrieval_score"] == 1.0
    assert "retrieval_score" not in first.node.get_content(metadata_mode="llm")
    assert all("retrieval_score" not in n.node.metadata for n in nodes)


def test_empty_nodes_emit_matching_events(pool: ModelPool, recorder) -> None:
    post = SharedRerankPostprocessor(model="f", backend="fake-reranker", pool=pool)
    assert post.postprocess_nodes([], query_str="q") == []
    start, end = recorder.events[-2:]
    assert isinstance(start, ReRankStartEvent)
    assert start.nodes == []
    assert isinstance(end, ReRankEndEvent)
    assert end.nodes == []


def test_missing_query_is_a_clear_error(pool: ModelPool, passages: list[str]) -> None:
    post = SharedRerankPostprocessor(model="f", backend="fake-reranker", pool=pool)
    with pytest.raises(InvalidInputError, match="needs a query"):
        post.postprocess_nodes(_nodes(passages))


def test_sentence_transformer_rerank_arguments_are_accepted(pool: ModelPool) -> None:
    post = SharedRerankPostprocessor(
        top_n=4,
        model="cross-encoder/ms-marco-MiniLM-L-6-v2",
        device=None,
        keep_retrieval_score=True,
        trust_remote_code=True,
        pool=pool,
    )
    assert post.device == "auto"
    assert post.spec.option("trust_remote_code") is True
    assert SharedRerankPostprocessor(model="m").spec.options == ()
    assert post.class_name() == "SharedRerankPostprocessor"


def test_async_postprocess_matches_sync(pool: ModelPool, minilm_path: str, passages) -> None:
    post = SharedRerankPostprocessor(model=minilm_path, backend="bi-encoder", top_n=3, pool=pool)
    nodes = _nodes(passages)
    sync = post.postprocess_nodes(nodes, query_str=QUERY)
    async_ = asyncio.run(post.apostprocess_nodes(nodes, query_str=QUERY))
    assert [(n.node.node_id, n.score) for n in sync] == [(n.node.node_id, n.score) for n in async_]
    assert sync[0].node.node_id == "n0"


def test_shared_embedding_matches_sentence_transformers(
    pool: ModelPool, minilm_path: str, direct_embedder, passages: list[str]
) -> None:
    emb = SharedEmbedding(model_name=minilm_path, dtype="float32", pool=pool, embed_batch_size=3)
    ref = direct_embedder.encode_document(passages, normalize_embeddings=True)
    np.testing.assert_allclose(emb.get_text_embedding_batch(passages), ref, atol=1e-5)
    np.testing.assert_allclose(
        emb.get_query_embedding(QUERY),
        direct_embedder.encode_query([QUERY], normalize_embeddings=True)[0],
        atol=1e-5,
    )
    a = asyncio.run(emb.aget_text_embedding_batch(passages))
    np.testing.assert_allclose(a, ref, atol=1e-5)
    assert pool.spec_stats(emb.spec)["loads"] == 1


def test_query_engine_end_to_end_with_shared_adapters(
    pool: ModelPool, minilm_path: str, passages: list[str]
) -> None:
    from llama_index.core import VectorStoreIndex
    from llama_index.core.llms import MockLLM
    from llama_index.core.query_engine import RetrieverQueryEngine
    from llama_index.core.response_synthesizers.no_text import NoText

    nodes = [TextNode(text=p, id_=f"n{i}") for i, p in enumerate(passages)]
    index = VectorStoreIndex(nodes, embed_model=SharedEmbedding(model_name=minilm_path, pool=pool))

    def request(_: int) -> list[str]:
        post = SharedRerankPostprocessor(
            model=minilm_path, backend="bi-encoder", top_n=2, pool=pool
        )
        # LLM-free synthesis: NoText returns the (reranked) source nodes only.
        engine = RetrieverQueryEngine.from_args(
            index.as_retriever(similarity_top_k=5),
            llm=MockLLM(),
            response_synthesizer=NoText(llm=MockLLM()),
            node_postprocessors=[post],
        )
        response = engine.query(QUERY)
        return [n.node.node_id for n in response.source_nodes]

    with ThreadPoolExecutor(8) as ex:
        results = list(ex.map(request, range(24)))
    assert all(r == results[0] for r in results)
    assert len(results[0]) == 2
    assert results[0][0] == "n0"
    assert {s["backend"]: s["loads"] for s in pool.stats().values()} == {
        "sentence-transformers": 1,
        "bi-encoder": 1,
    }


def test_any_iterable_of_nodes_is_accepted_sync_and_async(
    pool: ModelPool, passages: list[str], recorder
) -> None:
    post = SharedRerankPostprocessor(model="f", backend="fake-reranker", top_n=3, pool=pool)
    query = "powerhouse of the cell"
    expected = [
        (n.node.node_id, n.score) for n in post.postprocess_nodes(_nodes(passages), query_str=query)
    ]
    assert len(expected) == 3

    def generated():
        yield from _nodes(passages)

    for nodes in (generated(), tuple(_nodes(passages)), iter(_nodes(passages))):
        out = post.postprocess_nodes(nodes, query_str=query)
        assert [(n.node.node_id, n.score) for n in out] == expected
    start = recorder.events[-2]
    assert isinstance(start, ReRankStartEvent)
    assert len(start.nodes) == len(passages), "the event sees every node, not a used-up generator"

    out = asyncio.run(post.apostprocess_nodes(generated(), query_bundle=QueryBundle(query)))
    assert [(n.node.node_id, n.score) for n in out] == expected


@pytest.mark.parametrize("nodes", [None, 3, "some text", {"n0": "x"}], ids=repr)
def test_nodes_that_are_not_an_iterable_of_nodes_fail_before_model_work(
    pool: ModelPool, passages: list[str], nodes
) -> None:
    post = SharedRerankPostprocessor(model="f", backend="fake-reranker", pool=pool)
    with pytest.raises(InvalidInputError, match="nodes must be a list"):
        post.postprocess_nodes(nodes, query_str=QUERY)
    with pytest.raises(InvalidInputError, match="nodes must be a list"):
        asyncio.run(post.apostprocess_nodes(nodes, query_str=QUERY))
    single = _nodes(passages)[0]
    with pytest.raises(InvalidInputError, match=r"Wrap a single node: \[NodeWithScore"):
        post.postprocess_nodes(single, query_str=QUERY)
    assert pool.stats() == {}, "nothing was loaded"


def _completed_spans(run: Callable[[], object]) -> list[tuple[str, str | None]]:
    from llama_index.core.instrumentation.span_handlers import SimpleSpanHandler

    handler = SimpleSpanHandler()
    root = get_dispatcher()
    root.add_span_handler(handler)
    try:
        run()
    finally:
        root.span_handlers.remove(handler)
    names = {s.id_: s.id_.split("-")[0] for s in handler.completed_spans}
    return [
        (s.id_.split("-")[0], names.get(s.parent_id) if s.parent_id else None)
        for s in handler.completed_spans
    ]


def test_async_rerank_runs_in_a_span_its_events_carry(pool: ModelPool, recorder) -> None:
    """Stock's async path runs its span-wrapped sync method; ours awaited natively without a
    span, so async query engines showed no rerank step and the ReRank events no span id."""

    post = SharedRerankPostprocessor(model="f", backend="fake-reranker", pool=pool)
    nodes = _nodes(["cats", "dogs"])
    spans = _completed_spans(lambda: asyncio.run(post.apostprocess_nodes(nodes, query_str="cat")))
    assert ("SharedRerankPostprocessor._apostprocess_nodes", None) in spans
    start, end = recorder.events[-2:]
    assert start.span_id is not None
    assert start.span_id.startswith("SharedRerankPostprocessor._apostprocess_nodes")
    assert end.span_id == start.span_id


def test_an_embedding_batch_is_one_span_as_in_stock(pool: ModelPool) -> None:
    """Our batch overrides were wrapped in the span by LlamaIndex's mixin and then called the
    span-wrapped base: two nested spans of one name per batch."""

    from rag_rerank_plugins.llama_index import SharedEmbedding

    embed = SharedEmbedding(model_name="f", backend="fake-embedder", pool=pool)
    sync = _completed_spans(lambda: embed.get_text_embedding_batch(["a", "b"]))
    assert [s for s in sync if "text_embedding_batch" in s[0]] == [
        ("SharedEmbedding.get_text_embedding_batch", None)
    ]
    spans = _completed_spans(lambda: asyncio.run(embed.aget_text_embedding_batch(["a", "b"])))
    assert [s for s in spans if "text_embedding_batch" in s[0]] == [
        ("SharedEmbedding.aget_text_embedding_batch", None)
    ]
