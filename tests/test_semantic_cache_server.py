"""The semantic cache behind ``rag-rerank serve --semantic-cache``, and ``RemoteSemanticCache``.

A real server (uvicorn on loopback, in a thread) serving the packaged MiniLM, with the cache
enabled and a bearer token; clients are :class:`RemoteSemanticCache` (sync and async), the
LangChain adapter on two clients (two "hosts" sharing one cache), and raw HTTP for bad input.
Also: the endpoints do not exist unless enabled (and the client says how to enable them), a
server that is down is a miss for the adapters, and the config reaches the cache (store, guard,
served embedder and reranker).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
pytest.importorskip("httpx")

import httpx

from rag_rerank_plugins import ModelPool
from rag_rerank_plugins.exceptions import (
    InvalidInputError,
    RemoteAuthError,
    RemoteRequestError,
    RemoteUnavailableError,
)
from rag_rerank_plugins.semantic_cache import SemanticCache
from rag_rerank_plugins.semantic_cache.remote import RemoteSemanticCache
from rag_rerank_plugins.server import ServerConfig, create_app
from rag_rerank_plugins.server.routers.semantic_cache import PREFIX, build_cache
from rag_rerank_plugins.server.testing import ServerThread, wait_until_healthy

TOKEN = "semantic-cache-token"
TOKEN_ENV = "RAG_RERANK_TEST_SEMCACHE_TOKEN"
ART_72 = "O que diz o Art. 72?"


def _config(minilm_path: str, **overrides: Any) -> ServerConfig:
    options: dict[str, Any] = {
        "embedders": [f"minilm={minilm_path}"],
        "device": "cpu",
        "dtype": "float32",
        "semantic_cache": "memory",
        "semantic_cache_embedder": "minilm",
        "api_key": TOKEN,
        **overrides,
    }
    return ServerConfig(**options)


@pytest.fixture(scope="module")
def cache_server(minilm_path: str) -> Iterator[SimpleNamespace]:
    pool = ModelPool()
    app = create_app(_config(minilm_path), pool=pool)
    server = ServerThread(app)
    url = server.start()
    try:
        wait_until_healthy(url, timeout=180)
        yield SimpleNamespace(url=url, state=app.state.server)
    finally:
        server.stop()
        pool.clear()


@pytest.fixture
def remote(cache_server: SimpleNamespace, monkeypatch: pytest.MonkeyPatch) -> Iterator[Any]:
    monkeypatch.setenv(TOKEN_ENV, TOKEN)
    client = RemoteSemanticCache(cache_server.url, api_key_env=TOKEN_ENV)
    client.clear()
    yield client
    client.close()


def _post(url: str, path: str, body: Any, token: str | None = TOKEN) -> Any:
    headers = {"authorization": f"Bearer {token}"} if token else {}
    return httpx.post(url + PREFIX + path, json=body, headers=headers, timeout=30)


def test_put_paraphrase_hits_article_75_misses(remote: RemoteSemanticCache) -> None:
    answer = {"answer": "O Art. 72 trata de ...", "sources": ["lei-13105#72"]}
    remote.put(ART_72, answer, namespace="legal")
    hit = remote.lookup("O que diz o artigo 72?", namespace="legal")
    assert hit is not None
    assert hit.value == answer
    assert hit.query == ART_72
    assert hit.namespace == "legal"
    assert 0 < hit.score <= 1.0 + 1e-6
    assert hit.age_s >= 0
    assert remote.lookup("O que diz o Art. 75?", namespace="legal") is None
    assert remote.lookup(ART_72, namespace="other-chain") is None  # namespaces are separate
    stats = remote.stats()
    assert stats["hits"] >= 1
    assert stats["misses"] >= 2

    assert remote.invalidate("legal") == 1
    assert remote.lookup(ART_72, namespace="legal") is None


async def test_async_client(remote: RemoteSemanticCache) -> None:
    await remote.aput("What is the capital of France?", "Paris")
    hit = await remote.alookup("Which city is the capital of France?")
    assert hit is not None
    assert hit.value == "Paris"
    assert hit.namespace == "default"
    remote.clear()
    assert await remote.alookup("What is the capital of France?") is None


def test_a_rag_prompt_over_32k_characters_is_cached_as_in_process(
    remote: RemoteSemanticCache,
) -> None:
    """A RAG prompt carries its context: 41k characters is ordinary. The server refused any query
    over 32,768 characters (422), so through it such prompts were never cached, an error logged
    per call, while the in-process cache took them (exact match past the guard's word limit)."""
    prompt = "Answer from the context.\n" + "The refund window is 30 days. " * 1360 + "Q: refund?"
    assert len(prompt) > 40_000
    assert remote.put(prompt, {"answer": "30 days"}, namespace="rag") is True
    hit = remote.lookup(prompt, namespace="rag")
    assert hit is not None
    assert hit.value == {"answer": "30 days"}
    assert remote.lookup(prompt.replace("30 days", "31 days", 1), namespace="rag") is None
    assert remote.stats()["errors"] == 0


def test_same_answer_as_the_in_process_cache(
    remote: RemoteSemanticCache, cache_server: SimpleNamespace, pool: ModelPool
) -> None:
    spec = cache_server.state.pick("embedder", "minilm").spec
    local = SemanticCache(spec, pool=pool)
    for cache in (remote, local):
        cache.put(ART_72, {"n": 72}, namespace="legal")
    for query in ("O que diz o artigo 72?", "O que diz o Art. 75?", "What does Art. 72 say?"):
        remote_hit, local_hit = remote.lookup(query, "legal"), local.lookup(query, "legal")
        assert (remote_hit is None) == (local_hit is None), query
        if remote_hit is not None and local_hit is not None:
            assert remote_hit.score == pytest.approx(local_hit.score, abs=1e-4)


def test_langchain_adapter_on_two_hosts_shares_answers(
    remote: RemoteSemanticCache, cache_server: SimpleNamespace
) -> None:
    pytest.importorskip("langchain_core")
    from langchain_core.language_models import FakeListLLM

    from rag_rerank_plugins.langchain import SharedSemanticCache

    host_a = SharedSemanticCache(RemoteSemanticCache(cache_server.url, api_key_env=TOKEN_ENV))
    host_b = SharedSemanticCache(RemoteSemanticCache(cache_server.url, api_key_env=TOKEN_ENV))
    # The same model configuration on both hosts (the llm_string is the namespace).
    llm_a = FakeListLLM(responses=["answer", "second", "third"], cache=host_a)
    llm_b = FakeListLLM(responses=["answer", "second", "third"], cache=host_b)
    assert llm_a.invoke(ART_72) == "answer"
    assert llm_a.i == 1
    assert llm_b.invoke("O que diz o artigo 72?") == "answer"
    assert llm_b.i == 0  # host b's model was not called: host a's answer came from the server
    llm_b.invoke("O que diz o Art. 75?")
    assert llm_b.i == 1  # another article: host b's model answered


def test_remote_clear_one_model_clears_its_chat_contexts(
    remote: RemoteSemanticCache, cache_server: SimpleNamespace
) -> None:
    pytest.importorskip("langchain_core")
    from langchain_core.messages import HumanMessage, SystemMessage

    from rag_rerank_plugins.langchain import SharedSemanticCache

    adapter = SharedSemanticCache(RemoteSemanticCache(cache_server.url, api_key_env=TOKEN_ENV))
    from langchain_core.load import dumps
    from langchain_core.outputs import Generation

    prompt = dumps([SystemMessage("Be brief."), HumanMessage("What is our refund policy?")])
    adapter.update(prompt, "chat-m1", [Generation(text="old")])
    adapter.update(prompt, "chat-m2", [Generation(text="kept")])
    adapter.clear(llm_string="chat-m1")
    assert adapter.lookup(prompt, "chat-m1") is None
    assert adapter.lookup(prompt, "chat-m2") == [Generation(text="kept")]
    refused = _post(cache_server.url, "/invalidate", {"namespace": "x", "subspaces": "yes"})
    assert refused.status_code == 422


def test_token_is_required(cache_server: SimpleNamespace) -> None:
    response = _post(cache_server.url, "/lookup", {"query": ART_72}, token=None)
    assert response.status_code == 401
    with pytest.raises(RemoteAuthError):
        RemoteSemanticCache(cache_server.url).lookup(ART_72)


def test_bad_input_gets_422(cache_server: SimpleNamespace) -> None:
    url = cache_server.url
    for path, body in [
        ("/lookup", {"query": ""}),
        ("/lookup", {"namespace": "x"}),
        ("/lookup", {"query": ART_72, "namespace": ""}),
        ("/put", {"query": ART_72}),  # no value
        ("/put", {"query": "   ", "value": 1}),
        ("/invalidate", {}),
    ]:
        response = _post(url, path, body)
        assert response.status_code == 422, (path, body, response.text)
        assert response.json()["message"]
    # A value nested past what an answer can be written at: refused when put, not stored to
    # answer every later lookup with a 500.
    deep: Any = []
    for _ in range(300):
        deep = [deep]
    response = _post(url, "/put", {"query": "what does article 9 say?", "value": deep})
    assert response.status_code == 422, response.text
    assert "nested more than" in response.json()["message"]
    response = _post(url, "/lookup", {"query": "what does article 9 say?"})
    assert response.status_code == 200, response.text
    # Strict like every endpoint: an unknown field is a 400 naming it, never ignored.
    for path, body in [
        ("/lookup", {"query": ART_72, "namespce": "x"}),
        ("/put", {"query": ART_72, "value": 1, "ttl": 5}),
        ("/clear", {"all": True}),
    ]:
        response = _post(url, path, body)
        assert response.status_code == 400, (path, body, response.text)
        unknown = next(k for k in body if k not in ("query", "value"))
        assert unknown in response.json()["message"]
    # The client refuses before sending.
    client = RemoteSemanticCache(url)
    with pytest.raises(InvalidInputError, match="empty"):
        client.lookup("  ")
    with pytest.raises(InvalidInputError, match="JSON"):
        client.put(ART_72, {1, 2})
    with pytest.raises(InvalidInputError, match="JSON"):
        client.put(ART_72, float("nan"))


def test_endpoints_are_counted_in_metrics(
    remote: RemoteSemanticCache, cache_server: SimpleNamespace
) -> None:
    remote.lookup(ART_72)
    text = httpx.get(
        cache_server.url + "/metrics", headers={"authorization": f"Bearer {TOKEN}"}
    ).text
    assert f'"{PREFIX}/lookup"' in text
    # The cache's own counters, like the pool's metrics: a lookup is counted.
    lookups = [
        line
        for line in text.splitlines()
        if line.startswith('rag_rerank_semantic_cache_lookups_total{cache="server"')
    ]
    assert lookups
    assert float(lookups[0].rsplit(" ", 1)[1]) >= 1
    assert "rag_rerank_semantic_cache_search_ms_p50_seconds" in text


def test_off_unless_enabled(model_server: SimpleNamespace) -> None:
    """The conftest server has no --semantic-cache: no endpoint, and the client says why."""
    assert httpx.post(model_server.url + PREFIX + "/lookup", json={"query": "x"}).status_code == 404
    with pytest.raises(RemoteRequestError, match="--semantic-cache"):
        RemoteSemanticCache(model_server.url).lookup("x")


def test_server_down_is_an_error_for_the_client_and_a_miss_for_adapters() -> None:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]  # closed once the block ends: nothing listens there
    client = RemoteSemanticCache(f"http://127.0.0.1:{port}", retries=0)
    with pytest.raises(RemoteUnavailableError, match="could not reach"):
        client.lookup(ART_72)
    pytest.importorskip("langchain_core")
    from langchain_core.language_models import FakeListLLM

    from rag_rerank_plugins.langchain import SharedSemanticCache

    adapter = SharedSemanticCache(client)
    assert FakeListLLM(responses=["fine"], cache=adapter).invoke(ART_72) == "fine"
    stats = adapter.stats()  # the lookup failed (a miss); its update was skipped; the chain went on
    assert (stats["errors"], stats["misses"], stats["skipped"]) == (1, 1, 1)
    assert "error" in adapter.stats()["cache"]


def test_config_reaches_the_cache(
    minilm_path: str, tiny_ce_path: str, tmp_path: Path, pool: ModelPool
) -> None:
    db = tmp_path / "cache.db"
    config = _config(
        minilm_path,
        rerankers=[f"tiny-ce={tiny_ce_path}"],
        semantic_cache=f"sqlite:///{db}",
        semantic_cache_guard="rerank",
        semantic_cache_threshold=0.5,
        semantic_cache_ttl=60,
        semantic_cache_max_entries=5,
    )
    state = create_app(config, pool=pool).state.server
    cache = build_cache(state)
    try:
        assert cache.guard == "rerank"
        assert cache.threshold == 0.5
        assert cache.ttl == 60
        assert cache.max_entries == 5
        assert cache.embedder == state.pick("embedder", "minilm").spec
        assert cache.reranker == state.pick("reranker", "tiny-ce").spec
        assert type(cache.store).__name__ == "SQLiteStore"
        cache.put(ART_72, {"n": 72})  # the file is opened on first use
        assert db.exists()
    finally:
        cache.close()


def test_config_from_environment_and_unknown_embedder(minilm_path: str) -> None:
    config = ServerConfig.from_env(
        {
            "RAG_RERANK_EMBEDDERS": f"minilm={minilm_path}",
            "RAG_RERANK_SEMANTIC_CACHE": "memory",
            "RAG_RERANK_SEMANTIC_CACHE_GUARD": "dense",
            "RAG_RERANK_SEMANTIC_CACHE_EMBEDDER": "nope",
        }
    )
    assert config.semantic_cache == "memory"
    assert config.semantic_cache_guard == "dense"
    from rag_rerank_plugins.exceptions import ConfigurationError

    # Refused when the app is built, as `rag-rerank serve` refuses it before it starts (an app
    # served by `uvicorn module:app` turned ready, then answered every cache request with a 500).
    with pytest.raises(ConfigurationError, match="'nope' is not a served embedder"):
        create_app(config, pool=ModelPool())
    config = config.model_copy(update={"semantic_cache_embedder": "minilm"})
    with pytest.raises(Exception, match="semantic_cache_guard"):
        ServerConfig(embedders=["m"], semantic_cache_guard="cosine")
    # Off by default: no route.
    off = create_app(ServerConfig(embedders=["m"]), pool=ModelPool())
    assert not any(PREFIX in path for path in off.openapi()["paths"])
    on = create_app(config, pool=ModelPool())
    assert {f"{PREFIX}/lookup", f"{PREFIX}/put"} <= set(on.openapi()["paths"])
    assert json.loads(json.dumps(config.model_dump()))["semantic_cache"] == "memory"


def test_an_app_without_the_reranker_its_rerank_guard_needs_is_refused_when_built(
    minilm_path: str,
) -> None:
    """``create_app`` checks what ``rag-rerank serve`` checks before it starts: a rerank guard
    needs exactly one served reranker."""
    from rag_rerank_plugins.exceptions import ConfigurationError

    config = _config(minilm_path, semantic_cache="memory", semantic_cache_guard="rerank")
    with pytest.raises(ConfigurationError, match="needs exactly one served reranker"):
        create_app(config, pool=ModelPool())
