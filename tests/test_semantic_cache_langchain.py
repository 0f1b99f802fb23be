"""``SharedSemanticCache``: LangChain's ``BaseCache`` on the guarded semantic cache.

What a user relies on, through real chains (prompt | fake LLM / fake chat model) and the real
cache on the packaged MiniLM:

* the first question goes to the model, a paraphrase is answered from the cache, and the seed 004
  question that differs by one article number ("Art. 75" after "Art. 72") goes to the model;
* ``set_llm_cache`` (the documented path), sync and async, LLMs and chat models, and
  ``ChatGeneration`` surviving the round trip (message type, content, metadata);
* two models, or one chat model under two system prompts, never share answers;
* a broken cache (its store raising, or the cache object itself) never fails the chain: a miss,
  logged and counted;
* LangChain's own standard cache suites (``langchain-tests``), sync and async;
* side by side with LangChain's stock ``InMemoryCache``: the same exact-match answers, plus the
  paraphrase hits it cannot give.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from typing import Any

import pytest

pytest.importorskip("langchain_core")

from langchain_core.caches import BaseCache, InMemoryCache
from langchain_core.globals import get_llm_cache, set_llm_cache
from langchain_core.language_models import FakeListChatModel, FakeListLLM
from langchain_core.load import dumps
from langchain_core.messages import AIMessage, HumanMessage, SystemMessage
from langchain_core.outputs import ChatGeneration, Generation
from langchain_core.prompts import ChatPromptTemplate, PromptTemplate

from rag_rerank_plugins import ModelPool
from rag_rerank_plugins.exceptions import ConfigurationError
from rag_rerank_plugins.langchain import SharedSemanticCache
from rag_rerank_plugins.langchain.semantic_cache import split_prompt
from rag_rerank_plugins.semantic_cache import SemanticCache, Store

ART_72 = "O que diz o Art. 72?"
ART_72_PARAPHRASE = "O que diz o artigo 72?"
ART_75 = "O que diz o Art. 75?"


@pytest.fixture
def semantic(minilm_path: str, pool: ModelPool) -> SemanticCache:
    """A fresh in-memory cache on the packaged MiniLM (hybrid guard, the default)."""
    return SemanticCache(pool=pool)


@pytest.fixture
def adapter(semantic: SemanticCache) -> SharedSemanticCache:
    return SharedSemanticCache(semantic)


@pytest.fixture
def global_cache() -> Iterator[None]:
    previous = get_llm_cache()
    yield
    set_llm_cache(previous)


def _llm(*responses: str, cache: BaseCache | None = None) -> FakeListLLM:
    return FakeListLLM(responses=list(responses), cache=cache)


# -- through real chains -------------------------------------------------------------------------


def test_set_llm_cache_paraphrase_hits_and_article_75_misses(
    adapter: SharedSemanticCache, global_cache: None
) -> None:
    set_llm_cache(adapter)
    llm = _llm("answer about 72", "answer about 75", "unused")
    chain = PromptTemplate.from_template("{question}") | llm

    assert chain.invoke({"question": ART_72}) == "answer about 72"
    assert llm.i == 1  # the model answered
    assert chain.invoke({"question": ART_72_PARAPHRASE}) == "answer about 72"
    assert llm.i == 1  # from the cache: the model was not called
    assert chain.invoke({"question": ART_75}) == "answer about 75"
    assert llm.i == 2  # a different article: the model answered, not the cache
    stats = adapter.stats()
    assert (stats["hits"], stats["misses"], stats["updates"], stats["errors"]) == (1, 2, 2, 0)
    assert stats["cache"]["hits"] == 1


async def test_async_chain_hits_and_misses_like_the_sync_one(
    adapter: SharedSemanticCache,
) -> None:
    llm = _llm("answer about 72", "answer about 75", "unused", cache=adapter)
    chain = PromptTemplate.from_template("{question}") | llm
    assert await chain.ainvoke({"question": ART_72}) == "answer about 72"
    assert await chain.ainvoke({"question": ART_72_PARAPHRASE}) == "answer about 72"
    assert await chain.ainvoke({"question": ART_75}) == "answer about 75"
    assert llm.i == 2
    # What the async path stored, the sync path reads (one cache).
    assert chain.invoke({"question": "O que diz o artigo 75?"}) == "answer about 75"


def test_chat_model_keeps_chat_generation_and_metadata(adapter: SharedSemanticCache) -> None:
    chat = FakeListChatModel(responses=["Art. 72 trata de ..."], cache=adapter)
    first = chat.invoke([HumanMessage(ART_72)])
    cached = chat.invoke([HumanMessage(ART_72_PARAPHRASE)])
    assert isinstance(cached, AIMessage)
    assert cached.content == first.content == "Art. 72 trata de ..."
    assert adapter.stats()["hits"] == 1

    # A ChatGeneration with metadata round-trips exactly.
    generation = ChatGeneration(
        message=AIMessage(content="x", response_metadata={"model": "m", "tokens": 3}),
        generation_info={"finish_reason": "stop"},
    )
    adapter.update("What is a cat?", "chat-llm", [generation])
    (back,) = adapter.lookup("What is a cat?", "chat-llm") or []
    assert back == generation
    assert isinstance(back, ChatGeneration)


def test_chat_prompt_system_message_is_part_of_the_namespace(
    adapter: SharedSemanticCache,
) -> None:
    chat = FakeListChatModel(responses=["formal", "pirate"], cache=adapter)
    formal = ChatPromptTemplate.from_messages([("system", "Answer formally."), ("human", "{q}")])
    pirate = ChatPromptTemplate.from_messages([("system", "Answer as a pirate."), ("human", "{q}")])
    assert (formal | chat).invoke({"q": ART_72}).content == "formal"
    assert (formal | chat).invoke({"q": ART_72_PARAPHRASE}).content == "formal"  # a hit
    # The same question under another system prompt is another question.
    assert (pirate | chat).invoke({"q": ART_72}).content == "pirate"


def test_two_models_never_share_answers(adapter: SharedSemanticCache) -> None:
    small = FakeListLLM(responses=["small"], cache=adapter)
    large = FakeListLLM(responses=["large"], cache=adapter)
    assert small.invoke(ART_72) == "small"
    assert large.invoke(ART_72) == "large"
    assert small.invoke(ART_72) == "small"
    assert large.invoke(ART_72_PARAPHRASE) == "large"
    assert adapter.namespace_for("a") != adapter.namespace_for("b")


def test_same_answers_as_stock_in_memory_cache_for_exact_prompts(
    adapter: SharedSemanticCache,
) -> None:
    stock = InMemoryCache()
    generations = [Generation(text="Paris", generation_info={"why": "capital"})]
    for cache in (stock, adapter):
        cache.update("What is the capital of France?", "llm", generations)
    assert adapter.lookup("What is the capital of France?", "llm") == stock.lookup(
        "What is the capital of France?", "llm"
    )
    paraphrase = "Which city is the capital of France?"
    assert stock.lookup(paraphrase, "llm") is None  # exact match only
    assert adapter.lookup(paraphrase, "llm") == generations  # the semantic cache answers


def test_clear_and_clear_one_model(adapter: SharedSemanticCache) -> None:
    generations = [Generation(text="a")]
    adapter.update("What is a cat?", "m1", generations)
    adapter.update("What is a cat?", "m2", generations)
    adapter.clear(llm_string="m1")
    assert adapter.lookup("What is a cat?", "m1") is None
    assert adapter.lookup("What is a cat?", "m2") == generations
    adapter.clear()
    assert adapter.lookup("What is a cat?", "m2") is None
    with pytest.raises(ConfigurationError, match="llm_string"):
        adapter.clear(namespace="x")


@pytest.mark.parametrize("store", ["memory", "sqlite"])
def test_clear_one_model_clears_its_chat_contexts_too(
    store: str, pool: ModelPool, tmp_path: Any
) -> None:
    """A chat call with a system prompt or history is stored under a namespace of its own
    (model + context); ``clear(llm_string=...)`` left those answers served, stale."""
    url = f"sqlite:///{tmp_path / 'cache.db'}" if store == "sqlite" else "memory"
    adapter = SharedSemanticCache(SemanticCache(pool=pool, store=url))
    chat = FakeListChatModel(responses=["OLD answer", "NEW answer", "other"], cache=adapter)
    other = FakeListChatModel(responses=["kept", "model called again"], cache=adapter)
    other.sleep = 0.001  # another model configuration: another llm_string
    messages = [
        SystemMessage("You are a helpful assistant."),
        HumanMessage("What is our refund policy?"),
    ]
    assert chat.invoke(messages).content == "OLD answer"
    assert other.invoke(messages).content == "kept"
    assert chat._get_llm_string() != other._get_llm_string()
    adapter.clear(llm_string=chat._get_llm_string())
    assert chat.invoke(messages).content == "NEW answer"
    assert other.invoke(messages).content == "kept"  # from the cache: the other model stays


def test_clear_one_model_on_a_cache_of_the_older_protocol(pool: ModelPool) -> None:
    """A user's cache whose ``invalidate`` takes no ``subspaces``: still called, with the
    model's own namespace."""
    calls: list[str] = []

    class Older:
        def invalidate(self, namespace: str) -> int:
            calls.append(namespace)
            return 0

    adapter = SharedSemanticCache(Older())  # type: ignore[arg-type]
    adapter.clear(llm_string="m1")
    assert calls == [adapter.namespace_for("m1")]


def test_a_chat_message_role_is_part_of_the_question(adapter: SharedSemanticCache) -> None:
    """As in the stock caches: a ChatMessage of another role is another prompt."""
    from langchain_core.messages import ChatMessage

    user = dumps([ChatMessage(role="user", content="Summarise the contract")])
    tool = dumps([ChatMessage(role="tool", content="Summarise the contract")])
    stock = InMemoryCache()
    for cache in (stock, adapter):
        cache.update(user, "chat-llm", [Generation(text="answer for role=user")])
    assert stock.lookup(tool, "chat-llm") is None
    assert adapter.lookup(tool, "chat-llm") is None
    assert adapter.lookup(user, "chat-llm") == [Generation(text="answer for role=user")]


# -- a broken cache never fails the chain ---------------------------------------------------------


class _Exploding:
    """A cache whose every call raises (a corrupt file, a server that is down)."""

    def lookup(self, query: str, namespace: str = "default") -> Any:
        raise RuntimeError("disk I/O error")

    def put(self, query: str, value: Any, namespace: str = "default") -> None:
        raise RuntimeError("database is locked")

    async def alookup(self, query: str, namespace: str = "default") -> Any:
        raise RuntimeError("disk I/O error")

    async def aput(self, query: str, value: Any, namespace: str = "default") -> None:
        raise RuntimeError("database is locked")

    def invalidate(self, namespace: str) -> int:
        raise RuntimeError("database is locked")

    def clear(self) -> None:
        raise RuntimeError("database is locked")


async def test_cache_object_raising_is_a_logged_counted_miss(
    caplog: pytest.LogCaptureFixture,
) -> None:
    adapter = SharedSemanticCache(_Exploding())
    llm = _llm("one", "two", "three", cache=adapter)
    with caplog.at_level(logging.WARNING, logger="rag_rerank_plugins.semantic_cache"):
        assert llm.invoke(ART_72) == "one"
        assert llm.invoke(ART_72) == "two"  # no cache: the model answers again
        assert await llm.ainvoke(ART_72) == "three"
    assert adapter.stats()["errors"] == 6  # 3 lookups, 3 updates
    assert "disk I/O error" in caplog.text
    assert "database is locked" in caplog.text


class BrokenStore(Store):
    """A store whose every call raises, as a corrupt or locked SQLite file does."""

    def _fail(self, *args: Any, **kwargs: Any) -> Any:
        raise OSError("database disk image is malformed")

    put = get = touch = remove = invalidate = clear = count = changes = _fail


def test_store_raising_never_fails_the_chain(minilm_path: str, pool: ModelPool) -> None:
    cache = SemanticCache(pool=pool, store=BrokenStore())
    adapter = SharedSemanticCache(cache)
    llm = _llm("one", "two", cache=adapter)
    assert llm.invoke(ART_72) == "one"
    assert llm.invoke(ART_72) == "two"  # nothing could be stored: the model answers again
    stats = adapter.stats()
    assert stats["hits"] == 0
    # Counted by the cache (which turned the failures into misses) or by the adapter.
    assert stats["cache"]["errors"] + stats["errors"] >= 2


def test_foreign_value_in_the_namespace_is_a_miss(
    adapter: SharedSemanticCache, semantic: SemanticCache
) -> None:
    namespace = adapter.namespace_for("llm")
    semantic.put("What is a cat?", {"not": "generations"}, namespace=namespace)
    assert adapter.lookup("What is a cat?", "llm") is None
    assert adapter.stats()["errors"] == 1
    # A serialised object that is not a generation is refused by the loader's allow-list.
    semantic.put("What is a dog?", dumps(SystemMessage("x")), namespace=namespace)
    assert adapter.lookup("What is a dog?", "llm") is None
    assert adapter.stats()["errors"] == 2


# -- bad input -----------------------------------------------------------------------------------


def test_bad_construction_is_a_clear_error(semantic: SemanticCache) -> None:
    with pytest.raises(ConfigurationError, match="either a cache or options"):
        SharedSemanticCache(semantic, ttl=10)
    with pytest.raises(ConfigurationError, match="prefix"):
        SharedSemanticCache(semantic, prefix="a:b")
    with pytest.raises(ConfigurationError, match="prefix"):
        SharedSemanticCache(semantic, prefix="")


def test_empty_prompt_is_a_miss_and_never_stored(adapter: SharedSemanticCache) -> None:
    adapter.update("   ", "llm", [Generation(text="x")])
    assert adapter.lookup("   ", "llm") is None
    assert adapter.stats()["updates"] == 0


def test_split_prompt() -> None:
    assert split_prompt("plain prompt") == ("plain prompt", "")
    assert split_prompt(dumps([HumanMessage(ART_72)])) == (ART_72, "")
    question, context = split_prompt(dumps([SystemMessage("be brief"), HumanMessage("hi")]))
    assert question == "hi"
    assert "be brief" in context
    blocks = HumanMessage(content=[{"type": "text", "text": "a"}, {"type": "text", "text": "b"}])
    assert split_prompt(dumps([blocks]))[0] == "a\nb"
    # Something that merely looks like JSON is a plain prompt.
    assert split_prompt('["lc" broken') == ('["lc" broken', "")
    assert split_prompt(json.dumps([{"lc": 1}])) == (json.dumps([{"lc": 1}]), "")


# -- LangChain's standard cache suites -------------------------------------------------------------

langchain_tests = pytest.importorskip("langchain_tests.integration_tests.cache")


class TestSharedSemanticCacheSync(langchain_tests.SyncCacheTestSuite):
    @pytest.fixture
    def cache(self, semantic: SemanticCache) -> BaseCache:
        return SharedSemanticCache(semantic)


class TestSharedSemanticCacheAsync(langchain_tests.AsyncCacheTestSuite):
    @pytest.fixture
    async def cache(self, semantic: SemanticCache) -> BaseCache:
        return SharedSemanticCache(semantic)


def test_a_hit_prints_no_langchain_beta_warning(adapter: SharedSemanticCache) -> None:
    """langchain_core marks loads() as beta: the first hit of each process printed a
    LangChainBetaWarning from our module, where stock InMemoryCache prints nothing."""
    import warnings

    chat = FakeListChatModel(responses=["A1", "A2"], cache=adapter)
    assert chat.invoke("What is the capital of France?").content == "A1"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert chat.invoke("What is the capital of France?").content == "A1"
