"""The semantic-cache adapters (LangChain, LlamaIndex) and the remote cache client against what
production throws at them.

* A streaming or pydantic LlamaIndex engine over a cache a plain engine filled (the same index,
  the same default namespace) is passed through: it gets its ``StreamingResponse``, not the plain
  engine's cached ``Response`` (which has no ``response_gen`` to iterate).
* A hung cache server (accepts, never answers) or a refused port costs a short timeout, once
  per LLM call (no update after a lookup that failed on the transport), and after a few
  failures nothing at all for a cool-down (the circuit breaker), then one probe.
* A failed lookup is a miss too, so the adapters' hit rate stays honest.
* LangChain generations holding a ``datetime``, numpy number or ``bytes`` in their metadata are
  cached readably (converted), and what still cannot be read back is not stored.
* LlamaIndex answers with NaN/inf in node metadata or scores are cached (as null).
* A LlamaIndex index over a text-storing vector store (``from_vector_store``: Chroma, Qdrant)
  has a random id per process: the default namespace warns, naming ``namespace=``.

The cache is the fake embedder through the real pool; the LLMs are LangChain's and LlamaIndex's
fakes; the cache servers are local sockets or an ``httpx.MockTransport``.
"""

from __future__ import annotations

import asyncio
import datetime
import decimal
import json
import socket
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest

pytest.importorskip("llama_index.core")
pytest.importorskip("langchain_core")
pytest.importorskip("httpx")

import httpx
import numpy as np
from langchain_core.language_models import FakeListLLM
from langchain_core.language_models.fake_chat_models import FakeMessagesListChatModel
from langchain_core.load import Serializable
from langchain_core.messages import AIMessage
from langchain_core.outputs import ChatGeneration, Generation
from llama_index.core import VectorStoreIndex
from llama_index.core.base.response.schema import Response, StreamingResponse
from llama_index.core.embeddings import MockEmbedding
from llama_index.core.llms import MockLLM
from llama_index.core.query_engine import CustomQueryEngine
from llama_index.core.schema import NodeWithScore, TextNode
from llama_index.core.vector_stores import SimpleVectorStore
from pydantic import BaseModel

from rag_rerank_plugins import ModelPool
from rag_rerank_plugins.backends.remote.client import use_transport
from rag_rerank_plugins.exceptions import ConfigurationError, RemoteUnavailableError
from rag_rerank_plugins.langchain import SharedSemanticCache
from rag_rerank_plugins.llama_index import SemanticCacheQueryEngine
from rag_rerank_plugins.llama_index.query_engine import CACHE_KEY, default_namespace
from rag_rerank_plugins.semantic_cache import SemanticCache
from rag_rerank_plugins.semantic_cache.remote import CacheSkippedError, RemoteSemanticCache
from rag_rerank_plugins.testing import fake_embedder_spec

ART_72 = "O que diz o Art. 72?"


def fake_cache() -> SemanticCache:
    return SemanticCache(fake_embedder_spec(), pool=ModelPool(), guard="dense", threshold=0.99)


@pytest.fixture
def hung_url() -> Iterator[str]:
    """A server that accepts connections and never answers (a hung worker, a GC pause)."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(64)
    held: list[socket.socket] = []
    stop = threading.Event()

    def accept() -> None:
        while not stop.is_set():
            try:
                held.append(server.accept()[0])
            except OSError:  # closed at teardown
                return

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    address = server.getsockname()
    yield f"http://127.0.0.1:{address[1]}"
    stop.set()
    socket.create_connection(address).close()  # wakes accept() to see the stop
    thread.join(timeout=5)
    server.close()
    for conn in held:
        conn.close()


@pytest.fixture
def refused_url() -> str:
    """A port nothing listens on (the cache server is down)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return f"http://127.0.0.1:{port}"


# -- LlamaIndex: streaming and structured engines -------------------------------------------------


@pytest.fixture
def index() -> VectorStoreIndex:
    return VectorStoreIndex(
        [TextNode(text="Art. 72. Compete ao juiz dirigir o processo", id_="art72")],
        embed_model=MockEmbedding(embed_dim=8),
    )


class Answer(BaseModel):
    text: str


def test_streaming_engine_never_gets_a_plain_engines_cached_response(
    index: VectorStoreIndex,
) -> None:
    cache = fake_cache()
    plain = SemanticCacheQueryEngine(index.as_query_engine(llm=MockLLM()), cache)
    plain.query(ART_72)  # yesterday's deploy filled the cache
    streaming = SemanticCacheQueryEngine(
        index.as_query_engine(llm=MockLLM(), streaming=True), cache
    )
    assert streaming.namespace == plain.namespace  # same index: same default namespace
    response = streaming.query(ART_72)
    assert isinstance(response, StreamingResponse)
    assert "".join(response.response_gen)  # what stock streaming code does
    assert streaming.stats()["hits"] == 0


async def test_async_streaming_engine_is_passed_through(index: VectorStoreIndex) -> None:
    cache = fake_cache()
    await SemanticCacheQueryEngine(index.as_query_engine(llm=MockLLM()), cache).aquery(ART_72)
    streaming = SemanticCacheQueryEngine(
        index.as_query_engine(llm=MockLLM(), streaming=True), cache
    )
    response = await streaming.aquery(ART_72)
    assert not isinstance(response, Response)  # the engine's own (async) streaming response
    assert streaming.stats()["hits"] == 0


def test_structured_engine_is_passed_through(index: VectorStoreIndex) -> None:
    cache = fake_cache()
    SemanticCacheQueryEngine(index.as_query_engine(llm=MockLLM()), cache).query(ART_72)
    structured = SemanticCacheQueryEngine(
        index.as_query_engine(llm=MockLLM(), output_cls=Answer), cache
    )
    response = structured.query(ART_72)  # the engine's own answer, not the plain one's
    assert CACHE_KEY not in (getattr(response, "metadata", None) or {})
    assert structured.passthrough


class _Streams(CustomQueryEngine):
    """An engine with none of llama-index-core's marks that answers with a stream."""

    def custom_query(self, query_str: str) -> StreamingResponse:
        return StreamingResponse(response_gen=iter(["Art. 72 ", "trata de ..."]))


class _Plain(CustomQueryEngine):
    """An engine with none of llama-index-core's marks that answers with a ``Response``."""

    def custom_query(self, query_str: str) -> Response:
        return Response(response="Art. 72 trata de ...")


def test_engine_without_marks_is_cached_until_it_streams() -> None:
    plain = SemanticCacheQueryEngine(_Plain(), fake_cache(), namespace="legal")
    plain.query(ART_72)  # no synthesizer, no marks: cached as before
    assert plain.query(ART_72).metadata[CACHE_KEY]["hit"] is True

    cache = fake_cache()
    streams = SemanticCacheQueryEngine(_Streams(), cache, namespace="legal")
    assert isinstance(streams.query(ART_72), StreamingResponse)
    # Another engine stores a plain answer there; this one, a streamer since its first answer,
    # never looks it up.
    cache.put(ART_72, {"response": "cached", "source_nodes": []}, namespace="legal")
    assert isinstance(streams.query(ART_72), StreamingResponse)
    assert streams.passthrough


# -- LlamaIndex: NaN and inf --------------------------------------------------------------------


class _NaNs(CustomQueryEngine):
    """Sources as a DataFrame row with empty cells gives them, scored by a broken reranker."""

    def custom_query(self, query_str: str) -> Response:
        node = TextNode(
            text="Art. 72.", id_="art72", metadata={"price": float("nan"), "cap": float("inf")}
        )
        return Response(
            response="Art. 72 trata de ...",
            source_nodes=[NodeWithScore(node=node, score=float("nan"))],
            metadata={"confidence": float("-inf")},
        )


@pytest.mark.parametrize("is_async", [False, True])
async def test_nan_and_inf_in_an_answer_are_cached_as_null(is_async: bool) -> None:
    engine = SemanticCacheQueryEngine(_NaNs(), fake_cache(), namespace="legal")
    for _ in range(2):
        hit = await engine.aquery(ART_72) if is_async else engine.query(ART_72)
    assert engine.stats()["errors"] == 0
    assert hit.metadata[CACHE_KEY]["hit"] is True
    source = hit.source_nodes[0]
    assert source.node.metadata == {"price": None, "cap": None}
    assert source.score is None
    assert hit.metadata["confidence"] is None


# -- LlamaIndex: an index over a text-storing vector store --------------------------------------


class _TextStoringStore(SimpleVectorStore):
    """As Chroma, Qdrant or pgvector: the store keeps the nodes' text."""

    stores_text: bool = True


def test_from_vector_store_index_warns_that_its_default_namespace_is_not_stable(
    caplog: pytest.LogCaptureFixture,
) -> None:
    store = _TextStoringStore()
    index = VectorStoreIndex.from_vector_store(store, embed_model=MockEmbedding(embed_dim=8))
    with caplog.at_level("WARNING"):
        SemanticCacheQueryEngine(index.as_query_engine(llm=MockLLM()), fake_cache())
    assert "namespace=" in caplog.text
    named = SemanticCacheQueryEngine(
        index.as_query_engine(llm=MockLLM()), fake_cache(), namespace="legal-index"
    )
    assert named.namespace == "legal-index"


def test_an_in_memory_index_keeps_its_default_namespace(index: VectorStoreIndex) -> None:
    assert default_namespace(index.as_query_engine(llm=MockLLM())).endswith(index.index_id)


# -- LangChain: metadata JSON cannot carry ------------------------------------------------------


def test_chat_reply_with_datetime_metadata_is_cached_and_read_back() -> None:
    adapter = SharedSemanticCache(fake_cache())
    replies = [
        AIMessage(
            content=f"answer {i}",
            response_metadata={
                "created": datetime.datetime(2024, 1, 1),
                "logprob": np.float32(0.5),
                "tokens": np.array([1, 2]),
                "raw": b"id-1",
                "cost": decimal.Decimal("0.25"),
                "parsed": Answer(text="x"),
            },
        )
        for i in range(3)
    ]
    model = FakeMessagesListChatModel(responses=replies, cache=adapter)
    answers = [model.invoke(ART_72) for _ in range(3)]
    assert [a.content for a in answers] == ["answer 0"] * 3  # the LLM was called once
    stats = adapter.stats()
    assert (stats["hits"], stats["misses"], stats["updates"], stats["errors"]) == (2, 1, 1, 0)
    assert answers[1].response_metadata == {
        "created": "2024-01-01 00:00:00",
        "logprob": 0.5,
        "tokens": [1, 2],
        "raw": "b'id-1'",
        "cost": "0.25",
        "parsed": {"text": "x"},
    }


def test_generation_info_with_numpy_is_cached() -> None:
    adapter = SharedSemanticCache(fake_cache())
    adapter.update(ART_72, "llm", [Generation(text="a", generation_info={"p": np.int64(3)})])
    hit = adapter.lookup(ART_72, "llm")
    assert hit is not None
    assert hit[0].generation_info == {"p": 3}


class _Opaque(Serializable):
    """A LangChain object its class says cannot be serialised: ``dumps`` writes a marker."""

    value: int = 1


def test_a_generation_that_cannot_be_read_back_is_not_stored() -> None:
    cache = fake_cache()
    adapter = SharedSemanticCache(cache)
    message = AIMessage(content="a", response_metadata={"obj": _Opaque()})
    adapter.update(ART_72, "llm", [ChatGeneration(message=message)])
    stats = adapter.stats()
    assert (stats["updates"], stats["errors"]) == (0, 1)
    assert stats["cache"]["entries"] == 0  # not an entry that fails every read


def test_a_serialisable_object_outside_the_allowlist_is_not_stored() -> None:
    """``dumps`` writes a serialisable LangChain object (a prompt template here) without a
    marker, but a hit refuses to rebuild it: it was stored, counted as an update, and every
    lookup failed with "Deserialization ... is not allowed"."""
    from langchain_core.prompts import PromptTemplate

    adapter = SharedSemanticCache(fake_cache())
    info = {"template": PromptTemplate.from_template("say {x}")}
    adapter.update(ART_72, "llm", [Generation(text="a", generation_info=info)])
    assert adapter.lookup(ART_72, "llm") is None
    stats = adapter.stats()
    assert (stats["updates"], stats["errors"], stats["cache"]["entries"]) == (0, 1, 0)


def test_a_cited_document_in_the_metadata_reads_back_as_stock_gives_it() -> None:
    from langchain_core.caches import InMemoryCache
    from langchain_core.documents import Document

    source = Document(page_content="cited passage", metadata={"page": 3})
    generation = ChatGeneration(message=AIMessage(content="hi"), generation_info={"src": source})
    ours, stock = SharedSemanticCache(fake_cache()), InMemoryCache()
    for cache in (ours, stock):
        cache.update(ART_72, "llm", [generation])
    [hit] = ours.lookup(ART_72, "llm")
    [stock_hit] = stock.lookup(ART_72, "llm")
    assert hit.generation_info == stock_hit.generation_info == {"src": source}
    assert ours.stats()["errors"] == 0


# -- the remote cache: hung, down, breaker --------------------------------------------------------


def _invoke_timed(llm: Any) -> float:
    started = time.perf_counter()
    assert llm.invoke(ART_72) == "answer"
    return time.perf_counter() - started


def test_hung_server_costs_one_short_timeout_per_call_by_default(hung_url: str) -> None:
    """The defaults: a lookup waits about 1 s, and the update after it is not tried (before:
    10 s for the lookup and 10 s for the update, on every call)."""
    adapter = SharedSemanticCache(RemoteSemanticCache(hung_url))
    took = _invoke_timed(FakeListLLM(responses=["answer"], cache=adapter))
    assert took < 2.5
    stats = adapter.stats()
    assert (stats["misses"], stats["errors"], stats["skipped"], stats["updates"]) == (1, 1, 1, 0)


def test_hung_server_is_skipped_after_failures_then_probed(hung_url: str) -> None:
    remote = RemoteSemanticCache(hung_url, timeout=0.2, breaker_failures=2, breaker_cooldown=30)
    adapter = SharedSemanticCache(remote)
    llm = FakeListLLM(responses=["answer"], cache=adapter)
    for _ in range(2):  # each waits one timeout, for the lookup only
        assert 0.15 < _invoke_timed(llm) < 1.5
    assert remote.client_stats()["breaker"] == "open"
    for _ in range(3):  # no network at all
        assert _invoke_timed(llm) < 0.1
    client = remote.client_stats()  # before adapter.stats(), which asks the server's too
    assert (client["transport_failures"], client["skipped"]) == (2, 3)
    stats = adapter.stats()
    assert (stats["misses"], stats["errors"], stats["updates"]) == (5, 2, 0)
    assert stats["skipped"] == 2 + 3 * 2  # the first two updates; then lookups and updates
    assert "CacheSkippedError" in stats["cache"]["error"]  # the server's stats: skipped too

    now = time.monotonic()
    remote._breaker.clock = lambda: now + 31  # the cool-down is over: one call probes
    assert 0.15 < _invoke_timed(llm) < 1.5
    assert remote.client_stats()["breaker"] == "open"  # the probe failed: open again
    assert _invoke_timed(llm) < 0.1


def test_refused_port_counts_a_miss_and_skips_the_update(refused_url: str) -> None:
    adapter = SharedSemanticCache(RemoteSemanticCache(refused_url, retries=0))
    _invoke_timed(FakeListLLM(responses=["answer"], cache=adapter))
    stats = adapter.stats()
    assert (stats["hits"], stats["misses"], stats["errors"]) == (0, 1, 1)  # a miss, honestly
    assert (stats["skipped"], stats["updates"]) == (1, 0)  # the update was not tried


def test_open_breaker_refuses_at_once_with_what_to_do(refused_url: str) -> None:
    remote = RemoteSemanticCache(refused_url, retries=0, breaker_failures=1)
    with pytest.raises(RemoteUnavailableError, match="could not reach"):
        remote.lookup(ART_72)
    with pytest.raises(CacheSkippedError, match="breaker_cooldown"):
        remote.lookup(ART_72)  # open: refused without a request
    with pytest.raises(RemoteUnavailableError):  # what callers of the client already catch
        remote.put(ART_72, "x")
    assert remote.client_stats() == {
        "breaker": "open",
        "failures_in_a_row": 1,
        "transport_failures": 1,
        "skipped": 2,
    }


def test_llama_index_unreachable_cache_is_a_miss_and_no_put(
    refused_url: str, index: VectorStoreIndex
) -> None:
    remote = RemoteSemanticCache(refused_url, retries=0)
    engine = SemanticCacheQueryEngine(
        index.as_query_engine(llm=MockLLM()), remote, namespace="legal"
    )
    assert engine.query(ART_72).response
    stats = engine.stats()
    assert (stats["hits"], stats["misses"], stats["errors"]) == (0, 1, 1)  # a miss, honestly
    assert (stats["skipped"], stats["updates"]) == (1, 0)  # the put was not tried


def _transport(answers: list[Any]) -> Any:
    """An ``httpx.MockTransport`` answering each request with the next of ``answers``: an
    exception to raise (the transport failed), or a JSON body."""

    def handler(request: Any) -> Any:
        answer = answers.pop(0)
        if isinstance(answer, BaseException):
            raise answer
        return httpx.Response(200, content=json.dumps(answer).encode())

    return httpx.MockTransport(handler)


async def test_breaker_probe_success_closes_it_async() -> None:
    url = "http://cache-host.invalid:8080"
    down = httpx.ConnectError("connection refused")
    answers: list[Any] = [down, down, {"stored": True}, {"hit": False}]
    with use_transport(url, _transport(answers)):
        remote = RemoteSemanticCache(url, retries=0, breaker_failures=2, breaker_cooldown=30)
        for _ in range(2):
            with pytest.raises(RemoteUnavailableError):
                await remote.alookup(ART_72)
        with pytest.raises(CacheSkippedError):
            await remote.aput(ART_72, "x")
        now = time.monotonic()
        remote._breaker.clock = lambda: now + 31
        assert await remote.aput(ART_72, "x") is True  # the probe: the server is back
        assert remote.client_stats()["breaker"] == "closed"
        assert await remote.alookup(ART_72) is None
        remote.close()
    assert answers == []


def test_an_update_is_skipped_only_after_its_own_lookup_failed() -> None:
    """A lookup that failed, whose model call then failed too (no update), must not make a
    later call of the same prompt skip its update once the server is back."""
    url = "http://cache-host.invalid:8081"
    refused = httpx.ConnectError("refused")
    answers: list[Any] = [refused, {"hit": False}, {"stored": True}, {"entries": 1}]
    with use_transport(url, _transport(answers)):
        remote = RemoteSemanticCache(url, retries=0)
        adapter = SharedSemanticCache(remote)
        assert adapter.lookup(ART_72, "llm") is None  # failed; the LLM call then raised
        assert adapter.lookup(ART_72, "llm") is None  # the server is back: a plain miss
        adapter.update(ART_72, "llm", [Generation(text="a")])
        stats = adapter.stats()
        assert (stats["updates"], stats["skipped"], stats["cache"]["entries"]) == (1, 0, 1)
        remote.close()
    assert answers == []


def test_breaker_options_are_checked() -> None:
    for bad in ({"breaker_failures": 0}, {"breaker_failures": 1.5}, {"breaker_cooldown": -1}):
        with pytest.raises(ConfigurationError, match="breaker_"):
            RemoteSemanticCache("http://127.0.0.1:1", **bad)
    with pytest.raises(ConfigurationError, match="breaker_cooldown"):
        RemoteSemanticCache("http://127.0.0.1:1", breaker_cooldown=float("nan"))


def test_failed_read_of_a_cached_value_is_a_miss() -> None:
    cache = fake_cache()
    adapter = SharedSemanticCache(cache)
    cache.put(ART_72, {"not": "generations"}, namespace=adapter.namespace_for("llm"))
    assert adapter.lookup(ART_72, "llm") is None
    stats = adapter.stats()
    assert (stats["hits"], stats["misses"], stats["errors"]) == (0, 1, 1)


def test_only_the_probe_ends_the_probing() -> None:
    """A call let in before the breaker opened, then cancelled (how LangChain and LlamaIndex
    timeouts end calls), cleared the probing flag: a second call went to a hung server while
    the probe still waited on it."""
    from rag_rerank_plugins.semantic_cache.remote import _Breaker

    breaker = _Breaker("semantic cache test", failures=1, cooldown=30)
    now = time.monotonic()
    breaker.clock = lambda: now
    early = breaker.enter("lookup")  # A: in while closed; it hangs
    failing = breaker.enter("lookup")  # B: fails, which opens the breaker
    breaker.leave(RemoteUnavailableError("refused"), failing)
    assert breaker.stats()["breaker"] == "open"
    breaker.clock = lambda: now + 31
    probe = breaker.enter("lookup")  # C: the cool-down is over, C probes
    assert (early, failing, probe) == (False, False, True)
    breaker.leave(asyncio.CancelledError(), early)  # A is cancelled
    assert breaker.stats()["breaker"] == "probing"
    with pytest.raises(CacheSkippedError, match="once the call probing it ends"):
        breaker.enter("lookup")  # D: still refused while C probes
    breaker.leave(RemoteUnavailableError("refused"), probe)  # C fails: open for another cool-down
    assert breaker.stats()["breaker"] == "open"
    with pytest.raises(CacheSkippedError, match=r"in 30\.0s"):
        breaker.enter("lookup")
