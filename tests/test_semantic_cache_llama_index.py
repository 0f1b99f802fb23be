"""``SemanticCacheQueryEngine``: a LlamaIndex query engine answering repeated questions from the
guarded semantic cache.

A real ``VectorStoreIndex`` over a few legal articles (embedded by our ``SharedEmbedding`` on the
packaged MiniLM) and LlamaIndex's ``MockLLM``: the first question runs retrieval and synthesis,
a paraphrase is answered from the cache with the same text and source nodes, the seed 004
near-duplicate ("Art. 75" after "Art. 72") runs the engine; sync and async; two indexes never
share answers; a broken cache never fails a query; bad input gets a clear error.
"""

from __future__ import annotations

from typing import Any

import pytest

pytest.importorskip("llama_index.core")

from llama_index.core import VectorStoreIndex
from llama_index.core.base.response.schema import Response, StreamingResponse
from llama_index.core.llms import MockLLM
from llama_index.core.schema import QueryBundle, TextNode

from rag_rerank_plugins import ModelPool
from rag_rerank_plugins.exceptions import ConfigurationError
from rag_rerank_plugins.llama_index import SemanticCacheQueryEngine, SharedEmbedding
from rag_rerank_plugins.llama_index.query_engine import CACHE_KEY
from rag_rerank_plugins.semantic_cache import SemanticCache

ARTICLES = {
    "art72": "Art. 72. Compete ao juiz dirigir o processo e velar pela duração razoável.",
    "art75": "Art. 75. Serão representados em juízo a União, os Estados e os Municípios.",
    "art76": "Art. 76. Verificada a incapacidade processual, o juiz suspenderá o processo.",
}


@pytest.fixture
def index(pool: ModelPool, minilm_path: str) -> VectorStoreIndex:
    nodes = [
        TextNode(text=text, id_=key, metadata={"article": key}) for key, text in ARTICLES.items()
    ]
    return VectorStoreIndex(nodes, embed_model=SharedEmbedding(model_name=minilm_path, pool=pool))


@pytest.fixture
def semantic(pool: ModelPool, minilm_path: str) -> SemanticCache:
    return SemanticCache(pool=pool)


class Counting:
    """Counts the calls that reach the wrapped engine (i.e. the cache misses)."""

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


def _engine(index: VectorStoreIndex) -> Any:
    return index.as_query_engine(llm=MockLLM(max_tokens=8), similarity_top_k=2)


def test_paraphrase_from_cache_article_75_runs_the_engine(
    index: VectorStoreIndex, semantic: SemanticCache
) -> None:
    inner = _engine(index)
    counter = Counting(inner)
    engine = SemanticCacheQueryEngine(inner, semantic)

    first = engine.query("O que diz o Art. 72?")
    assert counter.calls == 1
    assert isinstance(first, Response)
    assert CACHE_KEY not in (first.metadata or {})

    cached = engine.query("O que diz o artigo 72?")
    assert counter.calls == 1  # answered from the cache
    assert isinstance(cached, Response)
    assert cached.response == first.response
    assert [n.node.node_id for n in cached.source_nodes] == [
        n.node.node_id for n in first.source_nodes
    ]
    assert [n.score for n in cached.source_nodes] == pytest.approx(
        [n.score for n in first.source_nodes]
    )
    assert [n.node.get_content() for n in cached.source_nodes] == [
        n.node.get_content() for n in first.source_nodes
    ]
    assert [n.node.metadata for n in cached.source_nodes] == [
        n.node.metadata for n in first.source_nodes
    ]
    info = cached.metadata[CACHE_KEY]
    assert info["hit"] is True
    assert info["cached_query"] == "O que diz o Art. 72?"

    engine.query("O que diz o Art. 75?")
    assert counter.calls == 2  # another article: not the cached answer
    stats = engine.stats()
    assert (stats["hits"], stats["misses"], stats["updates"]) == (1, 2, 2)


async def test_async_query_uses_the_same_cache(
    index: VectorStoreIndex, semantic: SemanticCache
) -> None:
    inner = _engine(index)
    counter = Counting(inner)
    engine = SemanticCacheQueryEngine(inner, semantic)
    first = await engine.aquery("O que diz o Art. 72?")
    cached = await engine.aquery("O que diz o artigo 72?")
    assert counter.calls == 1
    assert cached.response == first.response
    await engine.aquery("O que diz o Art. 75?")
    assert counter.calls == 2
    # Stored by the async path, read by the sync one.
    assert engine.query("O que diz o artigo 75?").metadata[CACHE_KEY]["hit"]
    assert counter.calls == 2


def test_two_indexes_never_share_answers(
    index: VectorStoreIndex, semantic: SemanticCache, pool: ModelPool, minilm_path: str
) -> None:
    other = VectorStoreIndex(
        [TextNode(text="Art. 72. Texto de outra lei.", id_="other72")],
        embed_model=SharedEmbedding(model_name=minilm_path, pool=pool),
    )
    a = SemanticCacheQueryEngine(_engine(index), semantic)
    b_inner = _engine(other)
    counter = Counting(b_inner)
    b = SemanticCacheQueryEngine(b_inner, semantic)
    assert a.namespace != b.namespace
    assert index.index_id in a.namespace
    a.query("O que diz o Art. 72?")
    b.query("O que diz o Art. 72?")
    assert counter.calls == 1  # index b's engine answered, not index a's cache


class _Exploding:
    def lookup(self, query: str, namespace: str = "default") -> Any:
        raise RuntimeError("disk I/O error")

    def put(self, query: str, value: Any, namespace: str = "default") -> None:
        raise RuntimeError("database is locked")

    async def alookup(self, query: str, namespace: str = "default") -> Any:
        raise RuntimeError("disk I/O error")

    async def aput(self, query: str, value: Any, namespace: str = "default") -> None:
        raise RuntimeError("database is locked")

    def invalidate(self, namespace: str) -> int:
        return 0

    def clear(self) -> None:
        pass


async def test_broken_cache_never_fails_a_query(index: VectorStoreIndex) -> None:
    inner = _engine(index)
    engine = SemanticCacheQueryEngine(inner, _Exploding())
    assert engine.query("O que diz o Art. 72?").response
    assert (await engine.aquery("O que diz o Art. 72?")).response
    assert engine.stats()["errors"] == 4


def test_foreign_value_is_a_miss(index: VectorStoreIndex, semantic: SemanticCache) -> None:
    inner = _engine(index)
    counter = Counting(inner)
    engine = SemanticCacheQueryEngine(inner, semantic, namespace="legal")
    semantic.put("O que diz o Art. 72?", ["not", "a", "response"], namespace="legal")
    assert engine.query("O que diz o Art. 72?").response
    assert counter.calls == 1
    assert engine.stats()["errors"] == 1


def test_streaming_responses_pass_through_uncached(
    index: VectorStoreIndex, semantic: SemanticCache
) -> None:
    inner = index.as_query_engine(llm=MockLLM(max_tokens=8), streaming=True)
    engine = SemanticCacheQueryEngine(inner, semantic)
    response = engine.query("O que diz o Art. 72?")
    assert isinstance(response, StreamingResponse)
    assert engine.stats()["updates"] == 0
    assert semantic.lookup("O que diz o Art. 72?", namespace=engine.namespace) is None


def test_bad_input_is_a_clear_error(index: VectorStoreIndex, semantic: SemanticCache) -> None:
    with pytest.raises(ConfigurationError, match="BaseQueryEngine"):
        SemanticCacheQueryEngine(object(), semantic)  # type: ignore[arg-type]
    with pytest.raises(ConfigurationError, match="SemanticCache"):
        SemanticCacheQueryEngine(_engine(index), {"not": "a cache"})  # type: ignore[arg-type]
    with pytest.raises(ConfigurationError, match="namespace"):
        SemanticCacheQueryEngine(_engine(index), semantic, namespace="  ")

    from llama_index.core.query_engine import CustomQueryEngine

    class Echo(CustomQueryEngine):
        def custom_query(self, query_str: str) -> str:
            return query_str

    with pytest.raises(ConfigurationError, match="namespace="):
        SemanticCacheQueryEngine(Echo(), semantic)
    engine = SemanticCacheQueryEngine(Echo(), semantic, namespace="echo")
    assert str(engine.query("O que diz o Art. 72?")) == "O que diz o Art. 72?"
    assert engine.query("O que diz o artigo 72?").metadata[CACHE_KEY]["hit"]
    assert engine.get_prompts() == {}
