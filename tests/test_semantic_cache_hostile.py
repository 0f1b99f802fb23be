"""The semantic cache under hostile input, concurrency, and LangChain's cache contract.

Complements ``test_semantic_cache_edges.py`` (settings, ties, long prompts, replacing answers):

* Unicode the identity extractor used to crash on (NFD text, "½", Devanagari, ligatures,
  full-width apostrophes): such a put was skipped, and its entry, already in the store, failed
  every later lookup of the whole cache (every namespace, every process sharing the file).
  NFC and NFD of one question are one question.
* One entry the cache cannot index never takes the others down with it.
* A huge prompt costs linear time (the identity pass was quadratic: 12 s per 30k-word put).
* A lone surrogate in a query or namespace is an ``InvalidInputError``, whatever the store.
* SQLite eviction never drops the entry its own put just reported stored.
* A new SQLite connection (after ``close()``, or in a forked worker) sees what other
  processes stored meanwhile.
* LangChain: every message class a generation can hold round-trips like in ``InMemoryCache``;
  tool calls, usage metadata, two LLM configurations; non-str keys are a clear error.
* Threads and asyncio tasks on one cache, two processes on one SQLite file: no torn or lost
  entries, no stale hit after an invalidation or clear anywhere.
* usearch and the exact index agree across the switch-over, deletes and re-puts.
* The server endpoints on such input.

The fake embedder (hashed bag of words through the real pool) keeps it fast.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import textwrap
import threading
import time
import unicodedata
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from rag_rerank_plugins import ModelPool
from rag_rerank_plugins.exceptions import InvalidInputError
from rag_rerank_plugins.semantic_cache import SemanticCache
from rag_rerank_plugins.semantic_cache import core as core_module
from rag_rerank_plugins.semantic_cache.identity import extract
from rag_rerank_plugins.testing import fake_embedder_spec

FAKE = fake_embedder_spec(dim=1024)
SRC = str(Path(__file__).resolve().parents[1] / "src")


def fake_cache(**kwargs: Any) -> SemanticCache:
    kwargs.setdefault("guard", "dense")
    kwargs.setdefault("threshold", 0.99)
    return SemanticCache(FAKE, pool=kwargs.pop("pool", None) or ModelPool(), **kwargs)


@pytest.fixture(params=["memory", "sqlite"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    return "memory" if request.param == "memory" else f"sqlite:///{tmp_path / 'cache.db'}"


# -- unicode the identity pass crashed on ----------------------------------------------------------

CRASHED = [
    unicodedata.normalize("NFD", "O que diz a Constituição sobre o Art. 5?"),
    unicodedata.normalize("NFD", "Não pode recorrer?"),
    "Quanto é ½ de 10?",
    "हिन्दी में बताओ",
    "ﷺ meaning",
    "don\uff07t cancel my order",  # a full-width apostrophe
]


@pytest.mark.parametrize("query", CRASHED)
def test_unusual_unicode_is_cached_and_found(query: str, store: str) -> None:
    cache = fake_cache(guard="hybrid", threshold=0.75, store=store)
    assert cache.put(query, {"answer": 1}) is True
    hit = cache.lookup(query)
    assert hit is not None
    assert hit.value == {"answer": 1}
    assert cache.stats()["errors"] == 0


def test_nfc_and_nfd_of_one_question_are_one_question() -> None:
    nfc = "Não é possível anular a decisão da Comissão?"
    nfd = unicodedata.normalize("NFD", nfc)
    assert nfc != nfd
    assert extract(nfc) == extract(nfd)
    for stored, asked in ((nfc, nfd), (nfd, nfc)):
        cache = fake_cache()  # dense at 0.99 over a bag of words: only the same words hit
        assert cache.put(stored, "resposta") is True
        hit = cache.lookup(asked)
        assert hit is not None, (stored == nfc, cache.stats())
        assert hit.value == "resposta"
        assert hit.query == nfc  # the cached question, in NFC
    # A namespace is an opaque key: not normalised.
    cache = fake_cache()
    cache.put(nfc, 1, namespace=nfc)
    assert cache.lookup(nfc, namespace=nfd) is None
    assert cache.lookup(nfc, namespace=nfc) is not None


def test_one_put_the_identity_pass_crashes_on_does_not_break_the_cache(
    store: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    cache = fake_cache(guard="hybrid", threshold=0.75, store=store)
    assert cache.put("What is the capital of France?", "Paris", namespace="geo")
    real = core_module.extract

    def flaky(text: str) -> Any:
        if "poison" in text:
            raise ValueError("cannot extract this one")
        return real(text)

    monkeypatch.setattr(core_module, "extract", flaky)
    assert cache.put("a poison question", 1, namespace="other") is False  # logged, counted
    # Every other namespace, and every later put, goes on working.
    hit = cache.lookup("What is the capital of France?", namespace="geo")
    assert hit is not None
    assert hit.value == "Paris"
    assert cache.put("What is the capital of Spain?", "Madrid", namespace="geo")
    hit = cache.lookup("What is the capital of Spain?", namespace="geo")
    assert hit is not None
    assert hit.value == "Madrid"
    # So does a new cache on the same store (a restart, or another process on the file).
    if store != "memory":
        again = fake_cache(guard="hybrid", threshold=0.75, store=store)
        hit = again.lookup("What is the capital of Spain?", namespace="geo")
        assert hit is not None
        assert hit.value == "Madrid"
        assert again.stats()["errors"] == 1  # the entry it could not index, skipped once


def test_huge_prompt_is_linear_time() -> None:
    words = ["the", "quick", "Brown", "fox", "jumps", "over", "a", "dog.", "And", "What", "then"]
    prompt = " ".join(words[i % len(words)] for i in range(60_000))  # ~330 kB
    cache = fake_cache(guard="hybrid", threshold=0.75)
    t0 = time.perf_counter()
    assert cache.put(prompt, "answer") is True
    hit = cache.lookup(prompt)
    elapsed = time.perf_counter() - t0
    assert hit is not None
    assert hit.value == "answer"
    assert elapsed < 8, f"{elapsed:.1f} s for one put and one lookup of a 60k-word prompt"


# -- lone surrogates, odd namespaces ---------------------------------------------------------------


def test_lone_surrogate_query_or_namespace_is_invalid_input(store: str) -> None:
    cache = fake_cache(store=store)
    with pytest.raises(InvalidInputError, match="lone surrogate"):
        cache.put("what is \ud800 this", 1)
    with pytest.raises(InvalidInputError, match="lone surrogate"):
        cache.lookup("what is \ud800 this")
    with pytest.raises(InvalidInputError, match="lone surrogate"):
        cache.put("what is this", 1, namespace="ns\udc00")
    with pytest.raises(InvalidInputError, match="lone surrogate"):
        cache.invalidate("ns\udc00")
    with pytest.raises(InvalidInputError, match="lone surrogate"):
        asyncio.run(cache.aput("what is \ud800 this", 1))
    assert cache.stats()["errors"] == 0  # refused as input, not a store failure


def test_remote_client_refuses_a_lone_surrogate_before_sending() -> None:
    pytest.importorskip("httpx")
    from rag_rerank_plugins.semantic_cache.remote import RemoteSemanticCache

    client = RemoteSemanticCache("http://127.0.0.1:9", retries=0)  # nothing listens there
    try:
        with pytest.raises(InvalidInputError, match="lone surrogate"):
            client.lookup("what is \ud800 this")
        with pytest.raises(InvalidInputError, match="lone surrogate"):
            client.invalidate("ns\udc00")
    finally:
        client.close()


@pytest.mark.parametrize("namespace", ["%", "a_b", "a%", "../etc/passwd", "c:\\x", "n\x00ul", "*"])
def test_namespaces_with_wildcards_and_separators_are_literal(namespace: str, store: str) -> None:
    cache = fake_cache(store=store)
    cache.put("the question", "mine", namespace=namespace)
    cache.put("the question", "other", namespace="a_bc%/x")
    hit = cache.lookup("the question", namespace=namespace)
    assert hit is not None
    assert hit.value == "mine"
    assert cache.invalidate(namespace) == 1
    assert cache.lookup("the question", namespace=namespace) is None
    hit = cache.lookup("the question", namespace="a_bc%/x")
    assert hit is not None
    assert hit.value == "other"


# -- SQLite eviction -------------------------------------------------------------------------------


def test_sqlite_put_never_evicts_the_entry_it_stores(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A hit since the put began (another thread or process), or a clock stepped back, left the
    new entry the least recently used one: the put reported it stored and evicted it."""
    clock = [1000.0]
    monkeypatch.setattr(core_module, "now", lambda: clock[0])
    results = {}
    for kind in ("memory", f"sqlite:///{tmp_path / 'lru.db'}"):
        cache = fake_cache(store=kind, max_entries=1)
        assert cache.put("first question", 1)
        assert cache.lookup("first question") is not None  # touched at 1000
        clock[0] = 990.0  # NTP stepped the clock back
        assert cache.put("second question", 2) is True
        second = cache.lookup("second question")
        results[kind.split(":")[0]] = (second and second.value, cache.lookup("first question"))
        assert cache.stats()["entries"] == 1
        clock[0] = 1000.0
    assert results["memory"] == (2, None)
    assert results["sqlite"] == results["memory"]


# -- LangChain's cache contract --------------------------------------------------------------------


def _langchain() -> SimpleNamespace:
    """LangChain's classes (the tests below skip without langchain-core, the others run)."""
    pytest.importorskip("langchain_core")
    from langchain_core import messages, outputs
    from langchain_core.caches import InMemoryCache
    from langchain_core.globals import set_llm_cache
    from langchain_core.language_models.fake_chat_models import (
        FakeListChatModel,
        GenericFakeChatModel,
    )

    from rag_rerank_plugins.langchain import SharedSemanticCache

    tool_call = messages.AIMessage(
        content="",
        tool_calls=[{"name": "lookup_article", "args": {"n": 72, "x": 1.5}, "id": "call_1"}],
        additional_kwargs={"refusal": None, "extra": [1, {"a": "b"}]},
        usage_metadata={"input_tokens": 3, "output_tokens": 4, "total_tokens": 7},
        response_metadata={"model_name": "m", "finish_reason": "tool_calls"},
    )
    return SimpleNamespace(
        m=messages,
        o=outputs,
        InMemoryCache=InMemoryCache,
        set_llm_cache=set_llm_cache,
        FakeListChatModel=FakeListChatModel,
        GenericFakeChatModel=GenericFakeChatModel,
        SharedSemanticCache=SharedSemanticCache,
        tool_call=tool_call,
    )


@pytest.fixture
def lc() -> SimpleNamespace:
    return _langchain()


@pytest.fixture
def adapter(lc: SimpleNamespace) -> Any:
    return lc.SharedSemanticCache(fake_cache())


@pytest.fixture
def global_cache(lc: SimpleNamespace) -> Iterator[None]:
    from langchain_core.globals import get_llm_cache

    previous = get_llm_cache()
    yield
    lc.set_llm_cache(previous)


GENERATIONS = {
    "AIMessage with tool calls": lambda lc: lc.o.ChatGeneration(
        message=lc.tool_call, generation_info={"finish_reason": "tool_calls"}
    ),
    "ChatMessage": lambda lc: lc.o.ChatGeneration(
        message=lc.m.ChatMessage(role="assistant", content="a custom role")
    ),
    "FunctionMessage": lambda lc: lc.o.ChatGeneration(
        message=lc.m.FunctionMessage(name="f", content="legacy function reply")
    ),
    "AIMessageChunk": lambda lc: lc.o.ChatGenerationChunk(
        message=lc.m.AIMessageChunk(content="streamed")
    ),
    "ToolMessageChunk": lambda lc: lc.o.ChatGenerationChunk(
        message=lc.m.ToolMessageChunk(content="t", tool_call_id="call_1")
    ),
    "HumanMessageChunk": lambda lc: lc.o.ChatGenerationChunk(
        message=lc.m.HumanMessageChunk(content="echo")
    ),
}


@pytest.mark.parametrize("kind", list(GENERATIONS))
def test_every_message_class_round_trips_like_in_memory_cache(
    lc: SimpleNamespace, adapter: Any, kind: str
) -> None:
    generation = GENERATIONS[kind](lc)
    stock = lc.InMemoryCache()
    for cache in (stock, adapter):
        cache.update("What does Art. 72 say?", "llm-a", [generation])
    expected = stock.lookup("What does Art. 72 say?", "llm-a")
    assert adapter.lookup("What does Art. 72 say?", "llm-a") == expected
    assert adapter.stats()["errors"] == 0
    assert adapter.lookup("What does Art. 72 say?", "llm-b") is None  # another model


def test_tool_calls_and_usage_round_trip_through_set_llm_cache(
    lc: SimpleNamespace, adapter: Any, global_cache: None
) -> None:
    lc.set_llm_cache(adapter)
    model = lc.GenericFakeChatModel(messages=iter([lc.tool_call, lc.m.AIMessage(content="never")]))
    first = model.invoke("Call the article tool for Art. 72")
    again = model.invoke("Call the article tool for Art. 72")
    assert again.tool_calls == first.tool_calls == lc.tool_call.tool_calls
    assert again.additional_kwargs == lc.tool_call.additional_kwargs
    assert again.usage_metadata is not None
    assert again.usage_metadata["total_tokens"] == 7
    assert adapter.stats()["hits"] == 1


def test_two_temperatures_never_share_answers(
    lc: SimpleNamespace, adapter: Any, global_cache: None
) -> None:
    lc.set_llm_cache(adapter)
    model = lc.FakeListChatModel(responses=["cold", "warm", "warm again"])
    assert model.invoke("Tell me a joke", temperature=0.0).content == "cold"
    assert model.invoke("Tell me a joke", temperature=0.9).content == "warm"
    assert model.invoke("Tell me a joke", temperature=0.0).content == "cold"  # cached
    batch = model.batch(["Tell me a joke", "Tell me a joke"], temperature=0.0)
    assert [m.content for m in batch] == ["cold", "cold"]

    async def both() -> Any:
        return await asyncio.gather(
            model.ainvoke("Tell me a joke", temperature=0.0),
            model.ainvoke("Tell me a joke", temperature=0.9),
        )

    assert [m.content for m in asyncio.run(both())] == ["cold", "warm"]


def test_non_str_prompt_or_llm_string_is_a_clear_error(adapter: Any) -> None:
    with pytest.raises(InvalidInputError, match="prompt must be a str"):
        adapter.lookup(None, "llm")
    with pytest.raises(InvalidInputError, match="llm_string must be a str"):
        adapter.update("q", 42, [])
    # A lone surrogate in an llm_string (it names a model) is a key like any other.
    assert adapter.lookup("question", "llm\udc00") is None


def test_chat_prompt_in_nfd_hits_the_nfc_answer(
    lc: SimpleNamespace, adapter: Any, global_cache: None
) -> None:
    lc.set_llm_cache(adapter)
    model = lc.FakeListChatModel(responses=["resposta", "outra"])
    question = "O que diz a Constituição sobre ação civil pública?"
    assert model.invoke(question).content == "resposta"
    assert model.invoke(unicodedata.normalize("NFD", question)).content == "resposta"
    assert adapter.stats()["errors"] == 0


# -- concurrency -----------------------------------------------------------------------------------

QUESTIONS = [f"question {w} about {t}" for w in ("alpha", "beta", "gamma", "delta") for t in "xyzw"]


def _check_consistent(cache: SemanticCache) -> None:
    """Every entry the store holds is found with its own value; nothing else is."""
    _, entries, _ = cache.store.changes(None)
    stored = {(e.namespace, e.query) for e in entries}
    for namespace in ("a", "b"):
        for question in QUESTIONS:
            hit = cache.lookup(question, namespace=namespace)
            if (namespace, question) in stored:
                assert hit is not None, (namespace, question)
                assert hit.value == {"q": question, "ns": namespace}
            else:
                assert hit is None or hit.query != question, (namespace, question, hit)


def test_threads_and_tasks_on_one_cache(store: str) -> None:
    import random

    cache = fake_cache(store=store, max_entries=20)
    problems: list[Any] = []

    def act(rng: random.Random) -> None:
        question, namespace = rng.choice(QUESTIONS), rng.choice("ab")
        roll = rng.random()
        if roll < 0.5:
            cache.put(question, {"q": question, "ns": namespace}, namespace=namespace)
        elif roll < 0.98:
            hit = cache.lookup(question, namespace=namespace)
            if hit is not None and hit.value != {"q": hit.query, "ns": namespace}:
                problems.append(("torn", question, namespace, hit))
        elif roll < 0.995:
            cache.invalidate(namespace)
        else:
            cache.clear()

    def thread(seed: int) -> None:
        rng = random.Random(seed)
        try:
            for _ in range(150):
                act(rng)
        except Exception as exc:  # pragma: no cover - reported below
            problems.append(exc)

    async def tasks() -> None:
        async def one(seed: int) -> None:
            rng = random.Random(seed)
            for _ in range(60):
                question, namespace = rng.choice(QUESTIONS), rng.choice("ab")
                if rng.random() < 0.5:
                    await cache.aput(question, {"q": question, "ns": namespace}, namespace)
                else:
                    hit = await cache.alookup(question, namespace=namespace)
                    if hit is not None and hit.value != {"q": hit.query, "ns": namespace}:
                        problems.append(("torn", question, namespace, hit))

        await asyncio.gather(*(one(100 + i) for i in range(4)))

    threads = [threading.Thread(target=thread, args=(i,)) for i in range(4)]
    threads.append(threading.Thread(target=lambda: asyncio.run(tasks())))
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not problems
    assert cache.stats()["errors"] == 0
    assert cache.stats()["entries"] <= 20
    _check_consistent(cache)
    assert cache.invalidate("a") >= 0
    assert all(cache.lookup(q, namespace="a") is None for q in QUESTIONS)


CHILD = textwrap.dedent(
    """
    import sys
    from rag_rerank_plugins.semantic_cache import SemanticCache
    from rag_rerank_plugins.testing import fake_embedder_spec
    cache = SemanticCache(fake_embedder_spec(dim=1024), guard="dense", threshold=0.99,
                          store="sqlite:///" + sys.argv[1], max_entries=None)
    tag, action = sys.argv[2], sys.argv[3]
    if action == "write":
        failed = 0
        for i in range(60):
            failed += not cache.put(f"question {tag} {i}", {"tag": tag, "i": i},
                                    namespace=f"ns{i % 2}")
            cache.lookup(f"question {tag} {i // 2}", namespace=f"ns{(i // 2) % 2}")
        print(failed, cache.stats()["errors"], flush=True)
    elif action == "invalidate":
        print(cache.invalidate(tag), flush=True)
    else:
        cache.clear()
        print("cleared", flush=True)
    """
)


def _child(path: Path, tag: str, action: str) -> subprocess.Popen[str]:
    env = {**os.environ, "PYTHONPATH": SRC}
    return subprocess.Popen(
        [sys.executable, "-c", CHILD, str(path), tag, action],
        stdout=subprocess.PIPE,
        text=True,
        env=env,
    )


def test_two_processes_on_one_sqlite_file(tmp_path: Path) -> None:
    path = tmp_path / "shared.db"
    mine = fake_cache(store=f"sqlite:///{path}", max_entries=None)
    assert mine.lookup("question A 0", namespace="ns0") is None  # indexed before they write
    writers = [_child(path, tag, "write") for tag in "AB"]
    for proc in writers:  # this process reads while they write
        while proc.poll() is None:
            mine.lookup("question A 1", namespace="ns1")
            time.sleep(0.01)
    for proc in writers:
        out, _ = proc.communicate(timeout=120)
        assert proc.returncode == 0
        assert out.split() == ["0", "0"]  # no failed put, no error in the writers
    for tag in "AB":
        for i in range(60):
            hit = mine.lookup(f"question {tag} {i}", namespace=f"ns{i % 2}")
            assert hit is not None, (tag, i)
            assert hit.value == {"tag": tag, "i": i}
    # An invalidation in another process: no stale hit here, the other namespace stays.
    out, _ = _child(path, "ns0", "invalidate").communicate(timeout=120)
    assert out.strip() == "60"
    assert all(mine.lookup(f"question A {i}", namespace="ns0") is None for i in range(0, 60, 2))
    assert all(mine.lookup(f"question B {i}", namespace="ns1") for i in range(1, 60, 2))
    out, _ = _child(path, "-", "clear").communicate(timeout=120)
    assert out.strip() == "cleared"
    assert all(mine.lookup(f"question B {i}", namespace="ns1") is None for i in range(1, 60, 2))
    assert mine.stats()["entries"] == 0


@pytest.mark.parametrize("reconnect", ["close", "fork"])
def test_a_new_connection_sees_what_others_stored_meanwhile(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, reconnect: str
) -> None:
    """SQLite's data_version starts over on a new connection: after ``close()``, or in a worker
    forked from the process that built the cache (gunicorn --preload), the old cursor matched
    the new connection's version and hid every entry the other processes had stored."""
    from rag_rerank_plugins.semantic_cache import sqlite as sqlite_module

    path = f"sqlite:///{tmp_path / 'shared.db'}"
    mine, other = fake_cache(store=path), fake_cache(store=path)
    mine.put("old question", 1)
    assert mine.lookup("old question") is not None
    if reconnect == "close":
        mine.close()
    else:  # what a forked child sees: another pid, so the store opens its own connection
        monkeypatch.setattr(sqlite_module.os, "getpid", lambda: -1)
    other.put("new question", 2)
    hit = mine.lookup("new question")
    assert hit is not None
    assert hit.value == 2
    other.invalidate("default")
    assert mine.lookup("old question") is None
    assert mine.lookup("new question") is None


def test_ttl_boundary(monkeypatch: pytest.MonkeyPatch, store: str) -> None:
    clock = [1000.0]
    monkeypatch.setattr(core_module, "now", lambda: clock[0])
    cache = fake_cache(store=store, ttl=10)
    cache.put("the question", 1)
    clock[0] = 1010.0  # exactly ttl old: still fresh
    assert cache.lookup("the question") is not None
    clock[0] = 1010.001
    assert cache.lookup("the question") is None
    assert cache.stats()["entries"] == 0


# -- usearch vs exact ------------------------------------------------------------------------------


def test_usearch_agrees_with_exact_across_the_switch_over(monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("usearch")
    import random

    from rag_rerank_plugins.semantic_cache import index as index_module

    monkeypatch.setattr(index_module, "AUTO_ANN_SIZE", 40)
    pool = ModelPool()
    caches = {
        kind: fake_cache(pool=pool, index=kind, max_entries=None)
        for kind in ("exact", "auto", "usearch")
    }
    words = ["alpha", "beta", "gamma", "delta", "epsilon", "zeta", "eta", "theta", "iota"]
    words += ["kappa", "lambda", "mu", "nu", "xi"]
    rng = random.Random(0)
    questions = sorted({" ".join(rng.sample(words, 4)) for _ in range(300)})[:90]
    probes = questions + [" ".join(rng.sample(words, 4)) for _ in range(40)]

    def answers(cache: SemanticCache, namespace: str) -> list[Any]:
        hits = [cache.lookup(q, namespace=namespace) for q in probes]
        return [None if h is None else (h.query, h.value) for h in hits]

    for cache in caches.values():
        for i, q in enumerate(questions[:30]):  # below the switch-over
            cache.put(q, i, namespace="one")
    below = {kind: answers(c, "one") for kind, c in caches.items()}
    assert below["auto"] == below["exact"] == below["usearch"]
    for cache in caches.values():
        for i, q in enumerate(questions):  # past it: re-puts and new questions
            cache.put(q, 100 + i, namespace="one")
        for i, q in enumerate(questions[:20]):
            cache.put(q, -i, namespace="two")
    assert type(caches["auto"]._indexes["one"]._impl).__name__ == "UsearchIndex"
    assert type(caches["auto"]._indexes["two"]._impl).__name__ == "ExactIndex"
    above = {kind: answers(c, "one") for kind, c in caches.items()}
    assert above["auto"] == above["exact"] == above["usearch"]
    assert sum(a is not None for a in above["exact"]) >= len(questions)
    for cache in caches.values():  # deletes, then re-puts of some
        cache.invalidate("two")
        for q in questions[:5]:
            cache.put(q, "again", namespace="two")
    two = {kind: answers(c, "two") for kind, c in caches.items()}
    assert two["auto"] == two["exact"] == two["usearch"]
    found = {a for a in two["exact"] if a is not None}  # a probe may be a reordering: a hit too
    assert found == {(q, "again") for q in questions[:5]}
    assert {kind: answers(c, "one") for kind, c in caches.items()} == above  # untouched


# -- server ----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def fake_server() -> Iterator[SimpleNamespace]:
    pytest.importorskip("fastapi")
    pytest.importorskip("uvicorn")
    pytest.importorskip("httpx")
    from rag_rerank_plugins.server import ServerConfig, create_app
    from rag_rerank_plugins.server.testing import ServerThread, wait_until_healthy

    spec = {"name": "fe", "model": "e", "backend": "fake-embedder", "device": "cpu"}
    config = ServerConfig(
        specs=[spec], semantic_cache="memory", semantic_cache_embedder="fe", api_key="tok"
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


def test_server_stores_unusual_unicode_and_matches_nfc_to_nfd(
    fake_server: SimpleNamespace,
) -> None:
    import httpx

    headers = {"authorization": "Bearer tok"}

    def post(path: str, body: dict[str, Any]) -> Any:
        answer = httpx.post(f"{fake_server.base}{path}", json=body, headers=headers, timeout=30)
        assert answer.status_code == 200, answer.text
        return answer.json()

    post("/clear", {})
    question = "O que diz a Constituição sobre ½ do prazo?"
    nfd = unicodedata.normalize("NFD", question)
    assert post("/put", {"query": nfd, "value": {"a": 1}, "namespace": "pt"}) == {"stored": True}
    hit = post("/lookup", {"query": question, "namespace": "pt"})
    assert hit["hit"] is True
    assert hit["value"] == {"a": 1}
    assert hit["query"] == question
    stats = httpx.get(f"{fake_server.base}/stats", headers=headers, timeout=30).json()
    assert stats["errors"] == 0
    # Without the token, nothing.
    assert httpx.post(f"{fake_server.base}/clear", json={}, timeout=30).status_code == 401


async def test_the_add_that_builds_the_ann_index_runs_off_the_event_loop(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Past AUTO_ANN_SIZE entries a namespace moves to usearch: that build (3-6 s at 10,000
    entries, its import included) ran on the event loop inside ``aput`` with a memory store,
    stalling every other coroutine (and every request of the server)."""
    from rag_rerank_plugins.semantic_cache import index as index_module

    monkeypatch.setattr(index_module, "AUTO_ANN_SIZE", 20)
    upgraded_on: list[threading.Thread] = []
    real_upgrade = index_module.NamespaceIndex._upgrade

    def upgrade(self: Any) -> None:
        upgraded_on.append(threading.current_thread())
        real_upgrade(self)

    monkeypatch.setattr(index_module.NamespaceIndex, "_upgrade", upgrade)
    cache = SemanticCache(embedder=fake_embedder_spec(dim=16), pool=ModelPool(), max_entries=None)
    for i in range(20):
        assert await cache.aput(f"question number {i}", i, namespace="n")
    assert upgraded_on == []
    assert await cache.aput("one more question", 20, namespace="n")  # the 21st: the upgrade
    assert len(upgraded_on) == 1
    assert upgraded_on[0] is not threading.main_thread()  # the loop runs on the main thread
    assert (await cache.alookup("question number 7", namespace="n")) is not None


async def test_a_sync_put_on_the_event_loop_still_moves_the_namespace_to_usearch(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A sync ``put`` on a loop's thread (a notebook cell: ipykernel runs cells on its loop) never
    built the usearch index: the namespace stayed on the exact search at any size. The build now
    runs in a thread of its own, and lookups meanwhile answer from the exact index."""
    pytest.importorskip("usearch")
    from rag_rerank_plugins.semantic_cache import index as index_module

    monkeypatch.setattr(index_module, "AUTO_ANN_SIZE", 20)
    built = threading.Event()
    upgraded_on: list[threading.Thread] = []
    real_upgrade = index_module.NamespaceIndex._upgrade

    def upgrade(self: Any) -> None:
        upgraded_on.append(threading.current_thread())
        real_upgrade(self)
        built.set()

    monkeypatch.setattr(index_module.NamespaceIndex, "_upgrade", upgrade)
    cache = SemanticCache(embedder=fake_embedder_spec(dim=16), pool=ModelPool(), max_entries=None)
    for i in range(21):
        assert cache.put(f"question number {i}", i, namespace="n")  # sync, on the loop's thread
    assert cache.lookup("question number 7", namespace="n") is not None
    assert await asyncio.to_thread(built.wait, 30)
    assert upgraded_on
    assert upgraded_on[0] is not threading.current_thread()
    assert type(cache._indexes["n"]._impl).__name__ == "UsearchIndex"
    assert cache.lookup("question number 7", namespace="n") is not None


def test_every_usearch_call_runs_inside_an_exit_gate_section(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """usearch is C++: a user's daemon thread putting into a usearch namespace as the script
    ended aborted the process (status 134, 4 of 12 runs at 10,000 SQLite entries). Its calls now
    run inside exit-gate sections, where exit waits for them (``_exitsafe``): the build in its
    own, the others under the cache's lock, which is only held inside one."""
    pytest.importorskip("usearch")
    from rag_rerank_plugins import _exitsafe
    from rag_rerank_plugins.semantic_cache import index as index_module

    outside: list[str] = []

    class Recording:
        def __init__(self, real: Any) -> None:
            self._real = real

        def __getattr__(self, name: str) -> Any:
            def call(*args: Any, **kwargs: Any) -> Any:
                if not getattr(_exitsafe._local, "depth", 0):
                    outside.append(name)
                return getattr(self._real, name)(*args, **kwargs)

            return call

    real_init = index_module.UsearchIndex.__init__

    def init(self: Any, dim: int) -> None:
        real_init(self, dim)
        self._index = Recording(self._index)

    monkeypatch.setattr(index_module.UsearchIndex, "__init__", init)
    monkeypatch.setattr(index_module, "AUTO_ANN_SIZE", 20)
    cache = SemanticCache(embedder=fake_embedder_spec(dim=16), pool=ModelPool(), max_entries=None)
    for i in range(22):
        assert cache.put(f"question number {i}", i, namespace="n")  # the 21st builds it
    assert type(cache._indexes["n"]._impl).__name__ == "UsearchIndex"
    assert cache.put("question number 3", "replaced", namespace="n")  # remove, then add
    assert cache.lookup("question number 3", namespace="n").value == "replaced"
    assert cache.invalidate("n") == 22
    assert outside == []
