"""The adapter contract, with the model behind `rag-rerank serve` (remote backends).

The same behaviours as tests/test_langchain.py and tests/test_llama_index.py: ordering and scores
equal the local model's, metadata kept, inputs never mutated, empty input costs nothing, async
equals sync, bad input is the same clear error, and per-request adapters share one server model.
"""

from __future__ import annotations

import asyncio
import copy
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

pytest.importorskip("httpx")
pytest.importorskip("fastapi")
pytest.importorskip("langchain_core")
pytest.importorskip("llama_index.core")

from langchain_core.documents import Document
from llama_index.core.schema import NodeWithScore, QueryBundle, TextNode

from rag_rerank_plugins import InvalidInputError, ModelPool
from rag_rerank_plugins.langchain import (
    SharedCrossEncoder,
    SharedEmbeddings,
    SharedRerankCompressor,
)
from rag_rerank_plugins.llama_index import SharedEmbedding, SharedRerankPostprocessor

QUERY = "which organelle produces ATP?"


def _docs(passages: list[str]) -> list[Document]:
    return [
        Document(page_content=p, metadata={"source": f"s{i}", "nested": {"k": i}}, id=f"doc-{i}")
        for i, p in enumerate(passages)
    ]


def _nodes(passages: list[str]) -> list[NodeWithScore]:
    return [
        NodeWithScore(
            node=TextNode(text=p, id_=f"n{i}", metadata={"title": f"t{i}"}), score=1.0 - i / 10
        )
        for i, p in enumerate(passages)
    ]


def _server_calls(model_server, name: str) -> int:
    spec = next(m.spec for m in model_server.state.served if m.name == name)
    return int(model_server.pool.spec_stats(spec)["calls"])


@pytest.fixture(params=["tei", "cohere"])
def protocol(request: pytest.FixtureRequest) -> str:
    return str(request.param)


def _remote(model_server, name: str, protocol: str) -> dict:
    return {
        "device": "cpu",
        "model_kwargs": {"protocol": protocol, "model_name": name, "retries": 1},
    }


def _remote_and_local(
    pool: ModelPool, model_server, tiny_ce_path: str, protocol: str
) -> tuple[SharedRerankCompressor, SharedRerankCompressor]:
    """The served tiny cross-encoder and the same model in process (FP32), keeping every doc."""
    remote = SharedRerankCompressor(
        model=model_server.url,
        backend="remote-reranker",
        top_n=None,
        pool=pool,
        **_remote(model_server, "tiny-ce", protocol),
    )
    local = SharedRerankCompressor(
        model=tiny_ce_path, device="cpu", dtype="float32", top_n=None, pool=pool
    )
    return remote, local


def test_compressor_equals_local_and_leaves_inputs_alone(
    pool: ModelPool, model_server, tiny_ce_path: str, passages: list[str], protocol: str
) -> None:
    docs = _docs(passages)
    before = copy.deepcopy(docs)
    remote, local = _remote_and_local(pool, model_server, tiny_ce_path, protocol)
    out = remote.compress_documents(docs, QUERY)
    ref = local.compress_documents(docs, QUERY)
    assert [d.id for d in out] == [d.id for d in ref]
    for got, want in zip(out, ref, strict=True):
        assert got.metadata["relevance_score"] == pytest.approx(
            want.metadata["relevance_score"], abs=1e-6
        )
        assert isinstance(got.metadata["relevance_score"], float)
        assert got.metadata["source"] == want.metadata["source"]
        assert got.page_content == want.page_content
    assert docs == before, "input documents must not be mutated"
    assert all(o is not d for o in out for d in docs)
    top2 = remote.model_copy(update={"top_n": 2}).compress_documents(docs, QUERY)
    assert [d.id for d in top2] == [d.id for d in ref[:2]]
    cut = ref[1].metadata["relevance_score"]
    kept = remote.model_copy(update={"score_threshold": cut}).compress_documents(docs, QUERY)
    assert [d.id for d in kept] == [d.id for d in ref if d.metadata["relevance_score"] >= cut]


async def test_async_compress_equals_sync(
    pool: ModelPool, model_server, passages: list[str]
) -> None:
    comp = SharedRerankCompressor(
        model=model_server.url,
        backend="remote-reranker",
        device="cpu",
        dtype="float32",
        top_n=4,
        pool=pool,
    )
    docs = _docs(passages)
    sync = comp.compress_documents(docs, QUERY)
    results = await asyncio.gather(*(comp.acompress_documents(docs, QUERY) for _ in range(4)))
    for result in results:
        assert [d.id for d in result] == [d.id for d in sync]


def test_empty_input_sends_nothing_and_bad_input_is_clear(pool: ModelPool, model_server) -> None:
    calls = _server_calls(model_server, "tiny-ce")
    comp = SharedRerankCompressor(
        model=model_server.url, backend="remote-reranker", device="cpu", dtype="float32", pool=pool
    )
    assert comp.compress_documents([], "q") == []
    assert not pool.loaded_specs(), "an empty call must not even build the client"
    with pytest.raises(InvalidInputError, match="query"):
        comp.compress_documents([Document(page_content="x")], None)  # type: ignore[arg-type]
    with pytest.raises(InvalidInputError, match="documents\\[1\\]"):
        comp.compress_documents([Document(page_content="x"), "raw"], "q")  # type: ignore[list-item]
    assert _server_calls(model_server, "tiny-ce") == calls


def test_cross_encoder_interface(
    pool: ModelPool, model_server, direct_cross_encoder, passages: list[str]
) -> None:
    ce = SharedCrossEncoder(
        model_name=model_server.url,
        backend="remote-reranker",
        device="cpu",
        dtype="float32",
        pool=pool,
    )
    pairs = [(QUERY, p) for p in passages] + [("other", passages[1])]
    np.testing.assert_allclose(
        ce.score(pairs), direct_cross_encoder.predict(pairs, show_progress_bar=False), atol=1e-6
    )


def test_langchain_embeddings_equal_local(
    pool: ModelPool, model_server, direct_embedder, passages: list[str], protocol: str
) -> None:
    emb = SharedEmbeddings(
        model=model_server.url,
        backend="remote-embedder",
        batch_size=3,
        pool=pool,
        **_remote(model_server, "minilm", protocol),
    )
    np.testing.assert_allclose(
        emb.embed_documents(passages),
        direct_embedder.encode_document(passages, show_progress_bar=False),
        atol=1e-5,
    )
    np.testing.assert_allclose(
        emb.embed_query(QUERY),
        direct_embedder.encode_query([QUERY], show_progress_bar=False)[0],
        atol=1e-5,
    )
    adocs = asyncio.run(emb.aembed_documents(passages))
    np.testing.assert_allclose(adocs, emb.embed_documents(passages), atol=1e-6)
    assert emb.embed_documents([]) == []


def test_postprocessor_equals_local_and_leaves_nodes_alone(
    pool: ModelPool, model_server, tiny_ce_path: str, passages: list[str], protocol: str
) -> None:
    nodes = _nodes(passages)
    before = copy.deepcopy(nodes)
    remote = SharedRerankPostprocessor(
        model=model_server.url,
        backend="remote-reranker",
        top_n=5,
        keep_retrieval_score=True,
        pool=pool,
        **_remote(model_server, "tiny-ce", protocol),
    )
    local = SharedRerankPostprocessor(
        model=tiny_ce_path,
        device="cpu",
        dtype="float32",
        top_n=5,
        keep_retrieval_score=True,
        pool=pool,
    )
    out = remote.postprocess_nodes(nodes, query_str=QUERY)
    ref = local.postprocess_nodes(nodes, query_str=QUERY)
    assert [n.node.node_id for n in out] == [n.node.node_id for n in ref]
    assert [n.score for n in out] == pytest.approx([n.score for n in ref], abs=1e-6)
    for item in out:
        original = next(n for n in nodes if n.node.node_id == item.node.node_id)
        assert item.node.metadata["retrieval_score"] == original.score
        assert item.node.metadata["title"] == original.node.metadata["title"]
    assert [n.score for n in nodes] == [n.score for n in before]
    assert all("retrieval_score" not in n.node.metadata for n in nodes)
    aout = asyncio.run(remote.apostprocess_nodes(nodes, query_bundle=QueryBundle(QUERY)))
    assert [n.node.node_id for n in aout] == [n.node.node_id for n in out]
    assert remote.postprocess_nodes([], query_str=QUERY) == []
    with pytest.raises(InvalidInputError, match="needs a query"):
        remote.postprocess_nodes(nodes)


def test_llama_index_embedding_equals_local(
    pool: ModelPool, model_server, direct_embedder, passages: list[str]
) -> None:
    emb = SharedEmbedding(
        model_name=model_server.url,
        backend="remote-embedder",
        device="cpu",
        dtype="float32",
        embed_batch_size=4,
        pool=pool,
    )
    ref = direct_embedder.encode_document(passages, normalize_embeddings=True)
    np.testing.assert_allclose(emb.get_text_embedding_batch(passages), ref, atol=1e-5)
    query = direct_embedder.encode_query([QUERY], normalize_embeddings=True)[0]
    np.testing.assert_allclose(emb.get_query_embedding(QUERY), query, atol=1e-5)
    np.testing.assert_allclose(asyncio.run(emb.aget_query_embedding(QUERY)), query, atol=1e-5)


def test_per_request_adapters_share_one_model_in_the_server(
    pool: ModelPool, model_server, passages: list[str]
) -> None:
    docs = _docs(passages)
    loads_before = model_server.pool.stats()

    def request(i: int) -> list[str]:
        comp = SharedRerankCompressor(
            model=model_server.url,
            backend="remote-reranker",
            device="cpu",
            dtype="float32",
            top_n=3,
            pool=pool,
        )
        return [d.id for d in comp.compress_documents(docs, QUERY)]

    with ThreadPoolExecutor(8) as executor:
        orders = list(executor.map(request, range(48)))
    assert all(order == orders[0] for order in orders)
    (spec,) = pool.loaded_specs()
    assert pool.spec_stats(spec)["loads"] == 1, "one pooled client per process"
    assert model_server.pool.stats().keys() == loads_before.keys()
    for label, stats in model_server.pool.stats().items():
        assert stats["loads"] == 1, label


def _long(passages: list[str], size: int) -> list[str]:
    return [(f"{i}: {p} " * (size // len(p) + 1))[:size] for i, p in enumerate(passages)]


def test_long_documents_through_the_adapters_equal_local(
    pool: ModelPool,
    model_server,
    tiny_ce_path: str,
    minilm_path: str,
    passages: list[str],
    protocol: str,
) -> None:
    """8 x 100 KB documents against a server taking 256 KiB per request: the remote backend
    splits them by bytes, so the adapters answer as the local model does instead of failing
    with HTTP 413."""
    long = _long(passages, 100_000)
    docs = _docs(long)
    remote, local = _remote_and_local(pool, model_server, tiny_ce_path, protocol)
    out, ref = remote.compress_documents(docs, QUERY), local.compress_documents(docs, QUERY)
    assert [d.id for d in out] == [d.id for d in ref]
    assert [d.metadata["relevance_score"] for d in out] == pytest.approx(
        [d.metadata["relevance_score"] for d in ref], abs=1e-5
    )
    emb = SharedEmbedding(
        model_name=model_server.url,
        backend="remote-embedder",
        embed_batch_size=32,
        pool=pool,
        **_remote(model_server, "minilm", protocol),
    )
    want = SharedEmbedding(model_name=minilm_path, device="cpu", dtype="float32", pool=pool)
    np.testing.assert_allclose(
        emb.get_text_embedding_batch(long), want.get_text_embedding_batch(long), atol=1e-5
    )
