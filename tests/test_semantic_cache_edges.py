"""The semantic cache at its edges, as a RAG team migrating to it would meet them.

* Settings that would silently disable the cache are refused: a NaN or infinite threshold or
  ttl, a hybrid or dense threshold outside [0, 1] (in Python and in the server's config), a
  blank namespace.
* An exact repeat always gets its own answer, even when another cached question ties with it.
* Long prompts (a RAG prompt: retrieved context + question, as LangChain's LLM cache sees it)
  only hit on identical text: two questions over the same context never share an answer.
* Storing a question again replaces its answer: no stale copy takes an LRU slot from another
  question.
* ``stats()`` adds up: a failed lookup is a lookup and a miss, a TTL expiry found by a lookup is
  an eviction.
* A value that is not valid text (a lone surrogate) is an ``InvalidInputError``.
* LangChain: the same words about two different images (or from two named senders) are two
  questions.
* LlamaIndex: engines on one index filtered to two tenants never share answers; an unfiltered
  engine keeps its namespace.
* Server: a put the store could not do answers ``{"stored": false}`` (``RemoteSemanticCache.put``
  returns False); an invalidation or clear it could not do is a 503 that says so.

The cache tests use the fake embedder (hashed bag of words through the real pool); the long
prompt test uses the packaged all-MiniLM-L6-v2, whose 256-token window the prompts exceed.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from rag_rerank_plugins import ModelPool, ModelSpec
from rag_rerank_plugins.exceptions import ConfigurationError, InvalidInputError
from rag_rerank_plugins.semantic_cache import MemoryStore, SemanticCache
from rag_rerank_plugins.semantic_cache import core as core_module
from rag_rerank_plugins.testing import fake_embedder_spec

FAKE = fake_embedder_spec(dim=1024)


def fake_cache(**kwargs: object) -> SemanticCache:
    kwargs.setdefault("guard", "dense")
    kwargs.setdefault("threshold", 0.99)
    return SemanticCache(FAKE, pool=ModelPool(), **kwargs)  # type: ignore[arg-type]


# -- settings ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("guard", "threshold"),
    [
        ("hybrid", math.nan),
        ("dense", math.nan),
        ("rerank", math.nan),
        ("rerank", math.inf),
        ("hybrid", -1.0),  # the fused score is in [0, 1]: -1 would turn the guard off
        ("dense", 1.5),  # cosine never reaches 1.5: exact match only, silently
    ],
)
def test_threshold_nan_or_out_of_range_is_refused(guard: str, threshold: float) -> None:
    with pytest.raises(ConfigurationError, match="threshold"):
        SemanticCache(FAKE, pool=ModelPool(), guard=guard, threshold=threshold)


def test_threshold_range_is_the_guards_score_range() -> None:
    with pytest.raises(ConfigurationError, match=r"\[0, 1\]"):
        SemanticCache(FAKE, pool=ModelPool(), guard="hybrid", threshold=2.5)
    # A cross-encoder's score has its own scale (a logit, for some heads): any finite number.
    cache = SemanticCache(FAKE, pool=ModelPool(), guard="rerank", threshold=2.5)
    assert cache.threshold == 2.5


@pytest.mark.parametrize("ttl", [math.nan, math.inf])
def test_ttl_nan_or_infinite_is_refused(ttl: float) -> None:
    # With ttl=NaN every entry expired as it was stored: a cache that stores nothing.
    with pytest.raises(ConfigurationError, match="ttl"):
        fake_cache(ttl=ttl)


def test_blank_namespace_is_refused_like_the_remote_client_does() -> None:
    cache = fake_cache()
    for call in (
        lambda: cache.put("a question", 1, namespace=" "),
        lambda: cache.lookup("a question", namespace="  "),
        lambda: cache.invalidate(" "),
    ):
        with pytest.raises(InvalidInputError, match="namespace"):
            call()


def test_server_threshold_nan_or_out_of_range_is_refused() -> None:
    pytest.importorskip("fastapi")
    from rag_rerank_plugins.server import ServerConfig

    spec = {"name": "fe", "model": "e", "backend": "fake-embedder", "device": "cpu"}
    for options in (
        {"semantic_cache_threshold": math.nan},
        {"semantic_cache_threshold": 1.5},
        {"semantic_cache_threshold": -0.1, "semantic_cache_guard": "dense"},
        {"semantic_cache_ttl": math.nan},
    ):
        with pytest.raises(ConfigurationError, match=next(iter(options))):
            ServerConfig(specs=[spec], semantic_cache="memory", **options)
    rerank = ServerConfig(
        specs=[spec],
        semantic_cache="memory",
        semantic_cache_guard="rerank",
        semantic_cache_threshold=2.5,
    )
    assert rerank.semantic_cache_threshold == 2.5


# -- eviction, TTL, stats ------------------------------------------------------------------------


def test_storing_a_question_again_does_not_evict_another_question() -> None:
    cache = fake_cache(max_entries=2)
    cache.put("alpha question", 1)
    cache.put("beta question", 2)
    assert cache.put("beta question", 3) is True  # a new answer for beta: still two questions
    assert cache.lookup("beta question").value == 3
    assert cache.lookup("alpha question").value == 1  # not evicted by beta's stale copy
    stats = cache.stats()
    assert (stats["entries"], stats["evictions"]) == (2, 0)


def test_a_failed_lookup_counts_as_a_lookup_and_a_miss() -> None:
    cache = fake_cache()
    cache.put("alpha question", 1)
    assert cache.lookup("alpha question") is not None

    def broken(query: str) -> None:
        raise RuntimeError("embedder failed to load")

    cache._embed = broken  # type: ignore[method-assign]
    assert cache.lookup("beta question") is None  # a failure is a miss
    stats = cache.stats()
    assert (stats["lookups"], stats["hits"], stats["misses"], stats["errors"]) == (2, 1, 1, 1)
    assert stats["hit_rate"] == 0.5


def test_ttl_expiry_found_by_a_lookup_counts_as_an_eviction(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    clock = [1000.0]
    monkeypatch.setattr(core_module, "now", lambda: clock[0])
    cache = fake_cache(ttl=10)
    cache.put("old question", 1)
    clock[0] += 11
    assert cache.lookup("old question") is None
    stats = cache.stats()
    assert stats["entries"] == 0
    assert stats["evictions"] == 1  # stats() counts "evictions (LRU and TTL)"


# -- values, exact repeats, long prompts ----------------------------------------------------------


def test_lone_surrogate_value_is_invalid_input() -> None:
    cache = fake_cache()
    with pytest.raises(InvalidInputError, match="JSON-serialisable"):
        cache.put("a question", "broken \ud800 text")
    assert cache.stats()["puts"] == 0


@pytest.mark.parametrize("guard", ["hybrid", "dense"])
def test_exact_repeat_returns_its_own_answer_on_a_score_tie(guard: str) -> None:
    # The bag-of-words fake gives these two questions one vector: a tie at 1.0 (with a real
    # embedder: two long prompts truncated to the same window, where the other may round above).
    cache = SemanticCache(FAKE, pool=ModelPool(), guard=guard)
    cache.put("how much does Bob owe Alice", "bob owes alice")
    cache.put("how much does Alice owe Bob", "alice owes bob")
    assert cache.lookup("how much does Bob owe Alice").value == "bob owes alice"
    assert cache.lookup("how much does Alice owe Bob").value == "alice owes bob"


CONTEXT = " ".join(
    f"The {w} clause of the services agreement governs renewal, payment terms and liability."
    for w in ["first", "second", "third", "fourth", "fifth", "sixth", "seventh", "eighth"] * 4
)


def _rag_prompt(question: str) -> str:
    return f"Answer using only this context.\nContext: {CONTEXT}\nQuestion: {question}\nAnswer:"


@pytest.fixture(scope="module")
def minilm(minilm_path: str) -> Iterator[tuple[ModelSpec, ModelPool]]:
    pool = ModelPool()
    yield ModelSpec(minilm_path, backend="sentence-transformers", device="cpu"), pool
    pool.clear()


def test_long_prompts_with_different_questions_do_not_hit(
    minilm: tuple[ModelSpec, ModelPool],
) -> None:
    """A RAG prompt is context + question. Past the embedder's window the question is cut off
    (cosine 1.0), and the shared context dominates the lexical score too (hybrid 0.997): only
    the identical prompt may hit."""
    spec, pool = minilm
    cache = SemanticCache(spec, pool=pool)  # default: hybrid @ 0.75
    cache.put(_rag_prompt("Who pays the shipping costs?"), "the buyer", namespace="n")
    hit = cache.lookup(_rag_prompt("What is the governing law?"), namespace="n")
    assert hit is None, f"false hit: {hit.value!r} (score {hit.score:.3f})"
    [verdict] = cache.explain(_rag_prompt("What is the governing law?"), namespace="n")
    assert verdict.reason == "length"
    same = cache.lookup(_rag_prompt("Who pays the shipping costs?"), namespace="n")
    assert same is not None
    assert same.value == "the buyer"


# -- LangChain ------------------------------------------------------------------------------------


def test_langchain_chat_prompts_with_different_images_do_not_share_answers() -> None:
    pytest.importorskip("langchain_core")
    from langchain_core.load import dumps
    from langchain_core.messages import AIMessage, HumanMessage
    from langchain_core.outputs import ChatGeneration

    from rag_rerank_plugins.langchain import SharedSemanticCache
    from rag_rerank_plugins.langchain.semantic_cache import split_prompt

    def ask(url: str) -> str:
        content = [
            {"type": "text", "text": "What is shown in this image?"},
            {"type": "image_url", "image_url": {"url": url}},
        ]
        return dumps([HumanMessage(content=content)])

    adapter = SharedSemanticCache(fake_cache())
    adapter.update(ask("https://x/cat.png"), "gpt-4o", [ChatGeneration(message=AIMessage("a cat"))])
    assert adapter.lookup(ask("https://x/invoice.png"), "gpt-4o") is None
    hit = adapter.lookup(ask("https://x/cat.png"), "gpt-4o")
    assert hit is not None
    assert hit[0].text == "a cat"
    # The sender's name is part of the question; a plain text message keeps its namespace.
    named = split_prompt(dumps([HumanMessage("hi", name="alice")]))
    assert named[0] == "hi"
    assert "alice" in named[1]
    assert split_prompt(dumps([HumanMessage("hi")])) == ("hi", "")


def test_langchain_update_the_store_skipped_is_an_error_not_an_update() -> None:
    pytest.importorskip("langchain_core")
    from langchain_core.outputs import Generation

    from rag_rerank_plugins.langchain import SharedSemanticCache

    class FullDisk(MemoryStore):
        def put(self, entry, *, max_entries, ttl):  # type: ignore[no-untyped-def]
            raise OSError("No space left on device")

    adapter = SharedSemanticCache(fake_cache(store=FullDisk()))
    adapter.update("What is a cat?", "llm", [Generation(text="an animal")])
    stats = adapter.stats()
    assert (stats["updates"], stats["errors"], stats["cache"]["errors"]) == (0, 1, 1)


# -- LlamaIndex -----------------------------------------------------------------------------------


def test_llama_index_default_namespace_separates_tenant_filters() -> None:
    pytest.importorskip("llama_index.core")
    from llama_index.core import VectorStoreIndex
    from llama_index.core.embeddings import MockEmbedding
    from llama_index.core.indices.vector_store.retrievers import VectorIndexRetriever
    from llama_index.core.llms import MockLLM
    from llama_index.core.query_engine import RetrieverQueryEngine
    from llama_index.core.schema import TextNode
    from llama_index.core.vector_stores import ExactMatchFilter, MetadataFilters

    from rag_rerank_plugins.llama_index import SemanticCacheQueryEngine

    nodes = [
        TextNode(text="Tenant A: refunds within 30 days.", id_="a", metadata={"tenant": "a"}),
        TextNode(text="Tenant B: no refunds.", id_="b", metadata={"tenant": "b"}),
    ]
    index = VectorStoreIndex(nodes, embed_model=MockEmbedding(embed_dim=8))
    cache = fake_cache()

    def engine(tenant: str) -> SemanticCacheQueryEngine:
        filters = MetadataFilters(filters=[ExactMatchFilter(key="tenant", value=tenant)])
        inner = index.as_query_engine(llm=MockLLM(max_tokens=4), filters=filters)
        return SemanticCacheQueryEngine(inner, cache)

    a, b = engine("a"), engine("b")
    answer_a = a.query("What is the refund policy?")
    assert {n.node.node_id for n in answer_a.source_nodes} == {"a"}
    answer_b = b.query("What is the refund policy?")  # not tenant A's answer and sources
    assert {n.node.node_id for n in answer_b.source_nodes} == {"b"}
    assert a.namespace == engine("a").namespace  # the same filter: the same namespace
    # Unfiltered: the namespace as before, whatever nodes the index holds.
    plain = SemanticCacheQueryEngine(index.as_query_engine(llm=MockLLM(max_tokens=4)), cache)
    assert plain.namespace == f"llama_index:RetrieverQueryEngine:{index.index_id}"
    assert a.namespace.startswith(plain.namespace + ":")
    index.insert_nodes([TextNode(text="Tenant C: store credit.", id_="c")])
    grown = SemanticCacheQueryEngine(index.as_query_engine(llm=MockLLM(max_tokens=4)), cache)
    assert grown.namespace == plain.namespace
    # A retriever restricted to some nodes is another scope.
    only_b = RetrieverQueryEngine.from_args(
        VectorIndexRetriever(index, node_ids=["b"]), llm=MockLLM(max_tokens=4)
    )
    assert SemanticCacheQueryEngine(only_b, cache).namespace not in (plain.namespace, b.namespace)


def test_llama_index_default_namespace_separates_vector_store_kwargs() -> None:
    """Chroma's ``where``, Qdrant's ``qdrant_filters`` and Pinecone's ``filter`` reach the store
    through ``vector_store_kwargs``: two tenants filtered that way shared one namespace, so
    tenant B got tenant A's answer and sources from the cache."""
    pytest.importorskip("llama_index.core")
    from llama_index.core import StorageContext, VectorStoreIndex
    from llama_index.core.embeddings import MockEmbedding
    from llama_index.core.llms import MockLLM
    from llama_index.core.schema import TextNode
    from llama_index.core.vector_stores import SimpleVectorStore

    from rag_rerank_plugins.llama_index import SemanticCacheQueryEngine

    class WhereStore(SimpleVectorStore):
        """Honours a store-specific ``where`` argument, as Chroma does."""

        def query(self, query: Any, **kwargs: Any) -> Any:
            result = super().query(query)
            where = kwargs.get("where") or {}
            meta = self._data.metadata_dict
            keep = [
                i
                for i, node_id in enumerate(result.ids)
                if not where or meta.get(node_id, {}).get("tenant") == where["tenant"]
            ]
            result.ids = [result.ids[i] for i in keep]
            result.similarities = [result.similarities[i] for i in keep]
            return result

    nodes = [
        TextNode(text="Tenant A: salary 100.", id_="a", metadata={"tenant": "A"}),
        TextNode(text="Tenant B: salary 200.", id_="b", metadata={"tenant": "B"}),
    ]
    storage = StorageContext.from_defaults(vector_store=WhereStore(stores_text=False))
    index = VectorStoreIndex(nodes, embed_model=MockEmbedding(embed_dim=8), storage_context=storage)
    cache = fake_cache()

    def engine(tenant: str, **kwargs: Any) -> SemanticCacheQueryEngine:
        inner = index.as_query_engine(
            llm=MockLLM(max_tokens=4), vector_store_kwargs={"where": {"tenant": tenant}}, **kwargs
        )
        return SemanticCacheQueryEngine(inner, cache)

    a, b = engine("A", similarity_top_k=2), engine("B", similarity_top_k=2)
    assert {n.node.node_id for n in a.query("What is the salary?").source_nodes} == {"a"}
    answer_b = b.query("What is the salary?")
    assert {n.node.node_id for n in answer_b.source_nodes} == {"b"}
    assert not answer_b.metadata.get("semantic_cache", {}).get("hit")
    assert a.namespace == engine("A").namespace != b.namespace
    plain = index.as_query_engine(llm=MockLLM(max_tokens=4), vector_store_kwargs={})
    assert SemanticCacheQueryEngine(plain, cache).namespace.count(":") == 2  # no restriction


# -- server ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def broken_store_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SimpleNamespace]:
    """A server whose cache store cannot be opened (its path is a folder: a missing folder is
    refused at start-up)."""
    pytest.importorskip("fastapi")
    pytest.importorskip("uvicorn")
    pytest.importorskip("httpx")
    from rag_rerank_plugins.server import ServerConfig, create_app
    from rag_rerank_plugins.server.testing import ServerThread, wait_until_healthy

    missing: Path = tmp_path_factory.mktemp("semcache") / "a-folder.db"
    missing.mkdir()
    spec = {"name": "fe", "model": "e", "backend": "fake-embedder", "device": "cpu"}
    config = ServerConfig(
        specs=[spec], semantic_cache=f"sqlite:///{missing}", semantic_cache_embedder="fe"
    )
    pool = ModelPool()
    server = ServerThread(create_app(config, pool=pool))
    url = server.start()
    try:
        wait_until_healthy(url, timeout=60)
        yield SimpleNamespace(url=url, base=f"{url}/v1/semantic-cache")
    finally:
        server.stop()
        pool.clear()


def test_server_put_the_store_failed_answers_stored_false(
    broken_store_server: SimpleNamespace,
) -> None:
    import httpx

    from rag_rerank_plugins.semantic_cache.remote import RemoteSemanticCache

    base = broken_store_server.base
    answer = httpx.post(f"{base}/put", json={"query": "q one", "value": 1}, timeout=30)
    assert answer.status_code == 200
    assert answer.json() == {"stored": False}
    remote = RemoteSemanticCache(broken_store_server.url, retries=0)
    try:
        assert remote.put("q two", 2) is False
    finally:
        remote.close()
    stats = httpx.get(f"{base}/stats", timeout=30).json()
    assert stats["puts"] == 0
    assert stats["errors"] >= 2


def test_server_invalidate_and_clear_the_store_failed_answer_503(
    broken_store_server: SimpleNamespace,
) -> None:
    import httpx

    base = broken_store_server.base
    for path, body in (("/invalidate", {"namespace": "default"}), ("/clear", {})):
        answer = httpx.post(f"{base}{path}", json=body, timeout=30)
        assert answer.status_code == 503, answer.text
        assert "store failed" in answer.json()["message"]
    blank = httpx.post(f"{base}/invalidate", json={"namespace": " "}, timeout=30)
    assert blank.status_code == 422


@pytest.mark.parametrize("store", ["memory", "sqlite"])
def test_invalidate_subspaces_takes_only_what_is_under_the_namespace(
    store: str, tmp_path: Any
) -> None:
    """``subspaces=True``: the namespace and ``namespace:...``; never a namespace that merely
    starts with the same characters (``m1x``), nor one whose name holds SQL's LIKE wildcards."""
    from rag_rerank_plugins.semantic_cache import SemanticCache
    from rag_rerank_plugins.testing import fake_embedder_spec

    url = f"sqlite:///{tmp_path / 'c.db'}" if store == "sqlite" else "memory"
    cache = SemanticCache(fake_embedder_spec(), pool=ModelPool(), store=url, guard="dense")
    names = ["m_1", "m_1:ctx", "m_1:ctx:deeper", "m_1x", "mX1:ctx", "m%1:ctx", "other"]
    for name in names:
        assert cache.put("What is a cat?", name, namespace=name)
    assert cache.invalidate("m_1", subspaces=True) == 3
    left = {name for name in names if cache.lookup("What is a cat?", namespace=name)}
    assert left == {"m_1x", "mX1:ctx", "m%1:ctx", "other"}
    assert cache.invalidate("other") == 1


# -- races, paths, lengths ------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["memory", "sqlite"])
@pytest.mark.parametrize("mode", ["sync", "async"])
def test_a_lookup_racing_a_refresh_of_its_question_still_hits(
    kind: str, mode: str, tmp_path: Path
) -> None:
    """A put replacing a question's answer deletes the old entry: a lookup that found the old id
    just before must look again and find the new one (22 % of lookups racing refreshes of an
    always-cached question missed)."""
    import asyncio
    import threading

    from rag_rerank_plugins.semantic_cache import SQLiteStore

    question = "What is the capital of France?"
    refreshes: list[int] = []
    base: type = MemoryStore if kind == "memory" else SQLiteStore

    class Racing(base):  # type: ignore[misc, valid-type]
        def get(self, keys: Any) -> Any:
            if len(refreshes) < 2:  # another thread refreshes the answer in between, twice
                refreshes.append(1)
                writer = threading.Thread(target=cache.put, args=(question, len(refreshes)))
                writer.start()
                writer.join()
            return super().get(keys)

    store = Racing() if kind == "memory" else Racing(str(tmp_path / "c.db"))
    cache = fake_cache(store=store)
    cache.put(question, 0)
    hit = cache.lookup(question) if mode == "sync" else asyncio.run(cache.alookup(question))
    assert refreshes == [1, 1]
    assert hit is not None
    assert hit.value == 2
    assert (cache.stats()["misses"], cache.stats()["entries"]) == (0, 1)


def test_a_sqlite_store_in_a_missing_folder_is_refused_at_construction(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``sqlite:///var/...`` is relative (SQLAlchemy's convention): from another working
    directory its folder does not exist, and the cache then stored nothing, a warning per call.
    Refused when built, naming the absolute path and the four-slash form; ``~`` is expanded."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "home").mkdir()
    with pytest.raises(ConfigurationError, match="four") as info:
        fake_cache(store="sqlite:///var/cache/rag/semantic.db")
    assert str(tmp_path / "var" / "cache" / "rag") in str(info.value)
    absolute = tmp_path / "abs"
    absolute.mkdir()
    cache = fake_cache(store=f"sqlite:///{absolute}/c.db")  # four slashes: absolute
    assert cache.put("q", 1) is True
    assert (absolute / "c.db").exists()
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    home = fake_cache(store="sqlite:///~/c.db")
    assert home.put("q", 1) is True
    assert (tmp_path / "home" / "c.db").exists()
    pytest.importorskip("fastapi")
    from rag_rerank_plugins.server import ServerConfig

    spec = {"name": "fe", "model": "e", "backend": "fake-embedder", "device": "cpu"}
    with pytest.raises(ValueError, match="does not exist"):
        ServerConfig(specs=[spec], semantic_cache="sqlite:///nowhere/c.db")
