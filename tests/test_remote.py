"""Remote backends: option checks, the three protocols against our server, retries and errors.

Protocol results are compared with the local model; retry/timeout/error paths use a scripted
``http.server`` on 127.0.0.1 whose answers are listed per test (bounded: every script is finite,
every client call has a small timeout and retry budget).
"""

from __future__ import annotations

import asyncio
import json
import logging
import random
import socket
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest

pytest.importorskip("httpx")

from rag_rerank_plugins import ConfigurationError, InvalidInputError, ModelPool, ModelSpec
from rag_rerank_plugins.backends.remote import (
    DEFAULT_MAX_REQUEST_BYTES,
    HEADROOM_BYTES,
    plan_chunks,
    truncate_json,
)
from rag_rerank_plugins.exceptions import (
    InferenceError,
    RemoteAuthError,
    RemoteError,
    RemoteRequestError,
    RemoteTimeoutError,
    RemoteUnavailableError,
)

QUERY = "which organelle produces ATP?"
PASSAGES = [
    "The mitochondria is the powerhouse of the cell and produces ATP.",
    "Paris is the capital of France and is known for the Eiffel Tower.",
    "Python is a programming language that emphasises readability.",
    "Photosynthesis converts light energy into chemical energy in plants.",
]
FAST = {"backoff": 0.01, "max_backoff": 0.05, "timeout": 5, "connect_timeout": 1}


def reranker(model: str, **options: Any) -> ModelSpec:
    return ModelSpec(
        model, backend="remote-reranker", device="cpu", dtype="float32", options=options
    )


def embedder(model: str, **options: Any) -> ModelSpec:
    return ModelSpec(
        model, backend="remote-embedder", device="cpu", dtype="float32", options=options
    )


# -- a scripted server -------------------------------------------------------------------------


class Script:
    """Answers POSTs in order from ``replies`` (status, body, headers, delay); then 500s.
    ``GET /info`` answers ``info`` (status, body) if given, else 404."""

    def __init__(
        self,
        replies: list[tuple[int, Any, dict[str, str], float]],
        info: tuple[int, Any] | None = None,
    ) -> None:
        self.replies = list(replies)
        self.info = info
        self.requests: list[dict[str, Any]] = []
        self.gets: list[str] = []
        self.lock = threading.Lock()


@pytest.fixture
def scripted() -> Iterator[Any]:
    servers: list[ThreadingHTTPServer] = []

    def start(*replies: tuple, info: tuple[int, Any] | None = None) -> tuple[str, Script]:
        script = Script([(*r, *({}, 0.0)[len(r) - 2 :]) for r in replies], info)

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:
                pass

            def do_GET(self) -> None:
                with script.lock:
                    script.gets.append(self.path)
                status, payload = script.info or (404, {"error": "not found"})
                self._answer(status, payload, {}, 0.0)

            def do_POST(self) -> None:
                length = int(self.headers.get("content-length", 0))
                body = json.loads(self.rfile.read(length) or b"null")
                with script.lock:
                    script.requests.append(
                        {
                            "path": self.path,
                            "body": body,
                            "auth": self.headers.get("authorization"),
                            "bytes": length,
                        }
                    )
                    reply = script.replies.pop(0) if script.replies else (500, "end", {}, 0.0)
                self._answer(*reply)

            def _answer(
                self, status: int, payload: Any, headers: dict[str, str], delay: float
            ) -> None:
                if delay:
                    time.sleep(delay)
                raw = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
                self.send_response(status)
                for key, value in headers.items():
                    self.send_header(key, value)
                self.send_header("content-length", str(len(raw)))
                self.end_headers()
                self.wfile.write(raw)

        server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        server.daemon_threads = True
        servers.append(server)
        threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}).start()
        return f"http://127.0.0.1:{server.server_address[1]}", script

    yield start
    for server in servers:
        server.shutdown()
        server.server_close()


OK_TEI = [{"index": 1, "score": 0.25}, {"index": 0, "score": 0.75}]


# -- options -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("spec", "needle"),
    [
        (reranker("http://127.0.0.1:1", api_key="x"), "api_key_env"),
        (reranker("http://127.0.0.1:1", tiemout=3), "does not accept option(s) 'tiemout'"),
        (reranker("my-model"), "needs the server's URL"),
        (reranker("my-model", url="ftp://x"), "needs the server's URL"),
        (reranker("http://127.0.0.1:1", protocol="grpc"), "Unknown remote protocol 'grpc'"),
        (reranker("http://127.0.0.1:1", protocol="cohere"), "model_name"),
        (reranker("http://127.0.0.1:1", api_key_env="RAG_RERANK_TEST_UNSET_VAR"), "not set"),
        (reranker("http://127.0.0.1:1", url="http://127.0.0.1:2"), "two URLs"),
        (reranker("http://127.0.0.1:1", timeout=0), "positive"),
        (reranker("http://127.0.0.1:1", max_request_bytes=100), "at least 1024"),
        (reranker("http://127.0.0.1:1", truncate="maybe"), "truncate must be true or false"),
        (reranker("http://127.0.0.1:1", verify=2), "verify must be true or false"),
        (
            ModelSpec("http://127.0.0.1:1", backend="remote-reranker", max_length=8),
            "max_length",
        ),
    ],
)
def test_bad_options_are_clear_configuration_errors(
    pool: ModelPool, spec: ModelSpec, needle: str
) -> None:
    with pytest.raises(ConfigurationError, match=needle.replace("(", r"\(").replace(")", r"\)")):
        pool.get(spec)
    assert not pool.loaded_specs()


def test_model_name_with_url_option_and_no_secret_in_labels(
    pool: ModelPool, scripted, monkeypatch: pytest.MonkeyPatch
) -> None:
    url, script = scripted((200, {"results": [{"index": 0, "relevance_score": 0.5}]}))
    monkeypatch.setenv("RAG_RERANK_TEST_TOKEN", "very-secret")
    spec = ModelSpec(
        "rerank-v3",
        backend="remote-reranker",
        device="cpu",
        dtype="float32",
        options={"url": url, "protocol": "cohere", "api_key_env": "RAG_RERANK_TEST_TOKEN"},
    )
    assert pool.score_pairs(spec, [("q", "a")]) == [0.5]
    request = script.requests[0]
    assert request["path"] == "/v1/rerank"
    assert request["body"]["model"] == "rerank-v3"
    assert request["auth"] == "Bearer very-secret"
    stats = pool.spec_stats(spec)
    assert "very-secret" not in json.dumps(pool.stats())
    assert (stats["device"], stats["loads"], stats["calls"]) == ("remote", 1, 1)


# -- retries and errors ------------------------------------------------------------------------


def test_retries_429_and_5xx_then_succeeds(pool: ModelPool, scripted) -> None:
    url, script = scripted(
        (503, {"error": "warming up"}),
        (429, {"error": "busy"}, {"retry-after": "0"}),
        (502, b"<html>bad gateway</html>"),
        (200, OK_TEI),
    )
    scores = pool.score_pairs(reranker(url, retries=3, **FAST), [("q", "a"), ("q", "b")])
    assert scores == [0.75, 0.25]
    assert len(script.requests) == 4


def test_gives_up_after_the_retry_budget(pool: ModelPool, scripted) -> None:
    url, script = scripted(*[(503, {"error": "overloaded"})] * 5)
    with pytest.raises(RemoteUnavailableError, match="HTTP 503 to all 3 attempt") as info:
        pool.score_pairs(reranker(url, retries=2, **FAST), [("q", "a")])
    assert len(script.requests) == 3
    assert info.value.status == 503
    assert "overloaded" in str(info.value)
    assert isinstance(info.value, InferenceError)


def test_429_advice_mentions_scaling(pool: ModelPool, scripted) -> None:
    url, _ = scripted((429, {"error": "queue full"}), (429, {"error": "queue full"}))
    with pytest.raises(RemoteUnavailableError, match="add replicas"):
        pool.score_pairs(reranker(url, retries=1, **FAST), [("q", "a")])


@pytest.mark.parametrize(
    ("status", "error", "needle"),
    [
        (401, RemoteAuthError, "bearer token"),
        (403, RemoteAuthError, "HTTP 403"),
        (413, RemoteRequestError, "option max_request_bytes"),
        (422, RemoteRequestError, "texts must not be empty"),
        (404, RemoteRequestError, "protocol='tei'"),
    ],
)
def test_client_errors_are_not_retried(
    pool: ModelPool, scripted, status: int, error: type, needle: str
) -> None:
    url, script = scripted((status, {"error": "texts must not be empty"}))
    with pytest.raises(error, match=needle):
        pool.score_pairs(reranker(url, retries=3, **FAST), [("q", "a")])
    assert len(script.requests) == 1


def test_connection_refused_is_retried_then_unavailable(pool: ModelPool) -> None:
    with socket.socket() as sock:  # a port nobody listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    start = time.monotonic()
    with pytest.raises(RemoteUnavailableError, match=r"could not reach .* after 3 attempt"):
        pool.score_pairs(reranker(f"http://127.0.0.1:{port}", retries=2, **FAST), [("q", "a")])
    assert time.monotonic() - start < 5


def test_timeout_is_not_retried(pool: ModelPool, scripted) -> None:
    url, script = scripted((200, OK_TEI, {}, 1.0))
    spec = reranker(url, retries=3, **{**FAST, "timeout": 0.2})
    with pytest.raises(RemoteTimeoutError, match=r"did not answer within 0\.2s"):
        pool.score_pairs(spec, [("q", "a"), ("q", "b")])
    assert len(script.requests) == 1


@pytest.mark.parametrize(
    ("reply", "needle"),
    [
        ((200, b"<html>hello</html>"), "not JSON"),
        ((200, {"results": []}), "protocol"),
        ((200, [{"index": 0, "score": 0.5}]), "one score for each of the 2 texts"),
    ],
)
def test_unexpected_bodies_are_clear_errors(
    pool: ModelPool, scripted, reply: tuple, needle: str
) -> None:
    url, _ = scripted(reply)
    with pytest.raises(RemoteError, match=needle):
        pool.score_pairs(reranker(url, **FAST), [("q", "a"), ("q", "b")])


def test_requests_are_split_per_query_and_batch(pool: ModelPool, scripted) -> None:
    url, script = scripted(
        (200, [{"index": 0, "score": 0.1}, {"index": 1, "score": 0.2}]),
        (200, [{"index": 0, "score": 0.3}]),
        (200, [{"index": 0, "score": 0.9}]),
    )
    pairs = [("q1", "a"), ("q2", "z"), ("q1", "b"), ("q1", "c")]
    assert pool.score_pairs(reranker(url, **FAST), pairs, batch_size=2) == [0.1, 0.9, 0.2, 0.3]
    bodies = [r["body"] for r in script.requests]
    assert [(b["query"], b["texts"]) for b in bodies] == [
        ("q1", ["a", "b"]),
        ("q1", ["c"]),
        ("q2", ["z"]),
    ]
    assert all(b["truncate"] is True and b["raw_scores"] is False for b in bodies)


def test_tei_embed_payload(pool: ModelPool, scripted) -> None:
    url, script = scripted((200, [[3.0, 4.0]]), (200, [[1.0, 0.0], [0.0, 2.0]]))
    spec = embedder(url, query_prompt_name="query", **FAST)
    assert pool.embed(spec, ["q"], is_query=True, normalize=True) == [[0.6, 0.8]]
    assert pool.embed(spec, ["a", "b"]) == [[1.0, 0.0], [0.0, 2.0]]
    first, second = (r["body"] for r in script.requests)
    assert first == {"inputs": ["q"], "normalize": True, "truncate": True, "prompt_name": "query"}
    assert "prompt_name" not in second
    assert pool.get(spec).dimension == 2


# -- the three protocols against `rag-rerank serve` ---------------------------------------------


@pytest.mark.parametrize("protocol", ["tei", "cohere", "infinity"])
def test_protocols_against_our_server_equal_local_results(
    pool: ModelPool,
    model_server,
    direct_cross_encoder,
    direct_embedder,
    passages: list[str],
    protocol: str,
) -> None:
    rerank = reranker(model_server.url, protocol=protocol, model_name="tiny-ce")
    embed = embedder(model_server.url, protocol=protocol, model_name="minilm")
    pairs = [(QUERY, p) for p in passages] + [("another query", passages[0])]
    ref = direct_cross_encoder.predict(pairs, show_progress_bar=False)
    assert pool.score_pairs(rerank, pairs, batch_size=3) == pytest.approx(
        [float(s) for s in ref], abs=1e-6
    )
    vectors = pool.embed(embed, passages, batch_size=5, normalize=True)
    want = direct_embedder.encode(passages, normalize_embeddings=True)
    for got, expected in zip(vectors, want, strict=True):
        assert got == pytest.approx(expected.tolist(), abs=1e-5)
    assert pool.get(embed).dimension == 384


async def test_async_clients_match_sync(pool: ModelPool, model_server, passages: list[str]) -> None:
    rerank = reranker(model_server.url)
    embed = embedder(model_server.url)
    pairs = [(QUERY, p) for p in passages]
    model = pool.get(rerank).model
    sync_scores = pool.score_pairs(rerank, pairs)
    async_scores = await asyncio.gather(*(model.ascore_pairs(pairs) for _ in range(4)))
    # The server batches concurrent requests together, and FP32 GEMMs round differently for
    # different row counts (~1e-7 relative): equal to float rounding, not bit for bit.
    assert all(s == pytest.approx(sync_scores, abs=1e-6) for s in async_scores)
    emb_model = pool.get(embed).model
    vectors = await emb_model.aembed(passages[:2], batch_size=1)
    for got, want in zip(vectors, pool.embed(embed, passages[:2]), strict=True):
        assert got == pytest.approx(want, abs=1e-6)
    assert await pool.ascore_pairs(rerank, pairs) == pytest.approx(sync_scores, abs=1e-6)


def test_threads_share_one_pooled_client(
    pool: ModelPool, model_server, passages: list[str]
) -> None:
    spec = reranker(model_server.url)
    handle = pool.get(spec)
    assert handle.model.thread_safe is True, "HTTP clients are thread-safe: no call lock"
    pairs = [(QUERY, p) for p in passages]
    expected = pool.score_pairs(spec, pairs)
    with ThreadPoolExecutor(8) as executor:
        results = list(executor.map(lambda _: pool.score_pairs(spec, pairs), range(24)))
    assert all(r == expected for r in results)
    assert pool.spec_stats(spec)["loads"] == 1
    client = handle.model.client
    assert client._sync is not None


def test_bearer_token_from_env_against_our_server(
    pool: ModelPool, monkeypatch: pytest.MonkeyPatch
) -> None:
    from rag_rerank_plugins.server import ServerConfig, create_app
    from rag_rerank_plugins.server.testing import ServerThread, wait_until_healthy

    server_pool = ModelPool()
    app = create_app(
        ServerConfig(
            specs=[{"model": "f", "backend": "fake-reranker", "device": "cpu"}], api_key="tok"
        ),
        pool=server_pool,
    )
    with ServerThread(app) as url:
        wait_until_healthy(url, timeout=30)
        monkeypatch.setenv("RAG_RERANK_TEST_TOKEN", "tok")
        good = reranker(url, api_key_env="RAG_RERANK_TEST_TOKEN")
        assert pool.score_pairs(good, [("a b", "a")]) == [0.5]
        monkeypatch.setenv("RAG_RERANK_TEST_TOKEN", "rotated-wrong")
        with pytest.raises(RemoteAuthError, match="RAG_RERANK_TEST_TOKEN"):
            pool.score_pairs(good, [("a b", "a")])
        with pytest.raises(RemoteAuthError, match="api_key_env"):
            pool.score_pairs(reranker(url), [("a b", "a")])
    server_pool.clear()


def test_overloaded_server_is_absorbed_by_retries(pool: ModelPool) -> None:
    """429 + Retry-After from a busy server: clients back off and every call still succeeds."""
    from rag_rerank_plugins.server import ServerConfig, create_app
    from rag_rerank_plugins.server.testing import ServerThread, wait_until_healthy

    server_pool = ModelPool()
    slow = {"model": "f", "backend": "fake-reranker", "device": "cpu", "options": {"delay_ms": 50}}
    app = create_app(
        ServerConfig(specs=[slow], max_concurrency=1, max_pending=0, retry_after=1),
        pool=server_pool,
    )
    with ServerThread(app) as url:
        wait_until_healthy(url, timeout=30)
        spec = reranker(url, retries=8, backoff=0.05, max_backoff=0.3, timeout=10)
        with ThreadPoolExecutor(4) as executor:
            results = list(executor.map(lambda _: pool.score_pairs(spec, [("a", "a")]), range(8)))
        assert results == [[1.0]] * 8
        assert app.state.server.metrics.rejected.get("overloaded", 0) >= 1
    server_pool.clear()


def test_release_closes_the_clients(pool: ModelPool, model_server) -> None:
    spec = reranker(model_server.url)
    model = pool.get(spec).model
    pool.score_pairs(spec, [("q", "a")])
    assert pool.release(spec)
    with pytest.raises(RemoteError, match="closed"):
        model.score_pairs([("q", "a")], batch_size=4)
    assert pool.score_pairs(spec, [("q", "a")]), "the pool builds fresh clients on reload"


# -- request size: split by bytes as well as by count -------------------------------------------

LIMIT = 256 * 1024  # the model_server fixture's max_request_bytes


def _long_texts(count: int, size: int) -> list[str]:
    """``count`` distinct texts of about ``size`` bytes of prose each (distinct openings, so
    distinct scores and vectors: a wrong mapping of results to inputs shows)."""
    texts = []
    for i in range(count):
        sentence = f"Passage {i} says: {PASSAGES[i % len(PASSAGES)]} "
        texts.append((sentence * (size // len(sentence) + 1))[:size])
    return texts


def _reference_scores(pool: ModelPool, tiny_ce_path: str, pairs: list[tuple[str, str]]) -> list:
    local = ModelSpec(tiny_ce_path, backend="cross-encoder", device="cpu", dtype="float32")
    return pool.score_pairs(local, pairs)


@pytest.fixture
def recorded(model_server, monkeypatch: pytest.MonkeyPatch) -> list[list[tuple[str, str]]]:
    """The pairs the server's pool actually scored, one list per HTTP request."""
    batches: list[list[tuple[str, str]]] = []
    original = model_server.pool.ascore_pairs

    async def recording(spec: ModelSpec, pairs: Any, *args: Any, **kwargs: Any) -> Any:
        batches.append(list(pairs))
        return await original(spec, pairs, *args, **kwargs)

    monkeypatch.setattr(model_server.pool, "ascore_pairs", recording)
    return batches


def test_rerank_splits_by_bytes_end_to_end(
    pool: ModelPool, model_server, tiny_ce_path: str, recorded: list
) -> None:
    """10 x 100 KB = 1 MB of passages against a 256 KiB server: packed 2 per request, same
    scores as in-process, in input order. (Before: one 1 MB request, HTTP 413.)"""
    passages = _long_texts(10, 100_000)
    pairs = [(QUERY, p) for p in passages]
    scores = pool.score_pairs(reranker(model_server.url, protocol="tei"), pairs)
    assert scores == pytest.approx(_reference_scores(pool, tiny_ce_path, pairs), abs=1e-5)
    assert [len(batch) for batch in recorded] == [2] * 5
    assert [pair for batch in recorded for pair in batch] == pairs, "nothing truncated or moved"
    assert len(set(scores)) == len(scores)


def test_rerank_truncates_a_passage_over_the_limit_end_to_end(
    pool: ModelPool, model_server, tiny_ce_path: str, recorded: list
) -> None:
    """10 x 300 KB passages, each alone over the 256 KiB limit: each is sent as its longest
    prefix that fits, one per request. The scores equal the in-process scores of what the server
    scored, and of the full passages too (the model reads its first 512 tokens either way)."""
    passages = _long_texts(10, 300_000)
    pairs = [(QUERY, p) for p in passages]
    scores = pool.score_pairs(reranker(model_server.url, protocol="cohere", model_name="x"), pairs)
    assert [len(batch) for batch in recorded] == [1] * 10
    scored = [pair for batch in recorded for pair in batch]
    for (query, sent), passage in zip(scored, passages, strict=True):
        assert query == QUERY
        assert passage.startswith(sent)
        assert LIMIT - 2048 < len(sent.encode()) < LIMIT
    assert scores == pytest.approx(_reference_scores(pool, tiny_ce_path, scored), abs=1e-5)
    assert scores == pytest.approx(_reference_scores(pool, tiny_ce_path, pairs), abs=1e-5)


def test_embed_splits_by_bytes_end_to_end(pool: ModelPool, model_server, direct_embedder) -> None:
    """12 x 60 KB texts against a 256 KiB server, in the three protocols."""
    texts = _long_texts(12, 60_000)  # 720 KB in all
    for protocol in ("tei", "cohere", "infinity"):
        spec = embedder(model_server.url, protocol=protocol, model_name="minilm")
        vectors = pool.embed(spec, texts, batch_size=32, normalize=True)
        want = direct_embedder.encode(texts, normalize_embeddings=True)
        assert len(vectors) == len(texts)
        for got, expected in zip(vectors, want, strict=True):
            assert got == pytest.approx(expected.tolist(), abs=1e-5)


def test_the_servers_client_batch_limit_from_info(pool: ModelPool, model_server) -> None:
    """batch_size=100 against a server taking 64 texts per request: 64 + 6, not one 413."""
    pairs = [(QUERY, f"short passage {i}") for i in range(70)]
    spec = reranker(model_server.url)
    assert pool.score_pairs(spec, pairs, batch_size=100) == pytest.approx(
        pool.score_pairs(spec, pairs, batch_size=8), abs=1e-6
    )
    texts = [text for _, text in pairs]
    assert len(pool.embed(embedder(model_server.url), texts, batch_size=100)) == 70


async def test_async_paths_split_by_bytes_end_to_end(
    pool: ModelPool, model_server, tiny_ce_path: str, direct_embedder
) -> None:
    passages = _long_texts(10, 100_000)
    pairs = [(QUERY, p) for p in passages] + [("another query", p) for p in passages[:3]]
    reference = _reference_scores(pool, tiny_ce_path, pairs)
    rerank = pool.get(reranker(model_server.url)).model
    assert await rerank.ascore_pairs(pairs, batch_size=32) == pytest.approx(reference, abs=1e-5)
    assert await pool.ascore_pairs(reranker(model_server.url), pairs) == pytest.approx(
        reference, abs=1e-5
    )
    texts = _long_texts(12, 60_000)
    vectors = await pool.aembed(embedder(model_server.url), texts, normalize=True)
    want = direct_embedder.encode(texts, normalize_embeddings=True)
    for got, expected in zip(vectors, want, strict=True):
        assert got == pytest.approx(expected.tolist(), abs=1e-5)


# -- request size: the planner and the truncation, on their own --------------------------------


def test_plan_chunks_by_count() -> None:
    assert plan_chunks([1] * 7, max_items=3, max_bytes=10**6) == [
        range(0, 3),
        range(3, 6),
        range(6, 7),
    ]
    assert plan_chunks([1] * 3, max_items=3, max_bytes=10**6) == [range(0, 3)]


def test_plan_chunks_by_bytes_counts_overhead_and_separators() -> None:
    # 10 + 40 + 1 + 40 = 91: two items fit in 91 bytes exactly, not in 90.
    sizes = [40, 40, 40, 40]
    assert plan_chunks(sizes, max_items=99, max_bytes=91, overhead=10) == [
        range(0, 2),
        range(2, 4),
    ]
    assert plan_chunks(sizes, max_items=99, max_bytes=90, overhead=10) == [
        range(i, i + 1) for i in range(4)
    ]
    assert plan_chunks(sizes, max_items=99, max_bytes=80, overhead=0, separator=0) == [
        range(0, 2),
        range(2, 4),
    ]


def test_plan_chunks_mixed_limits_keep_order() -> None:
    sizes = [10, 10, 50, 10, 10, 10, 10]
    # [10,10] + 50 would be 72 > 60 bytes; [50] + 10 = 61 > 60; then 3 items is the count limit.
    assert plan_chunks(sizes, max_items=3, max_bytes=60) == [
        range(0, 2),
        range(2, 3),
        range(3, 6),
        range(6, 7),
    ]


def test_plan_chunks_random_inputs_are_covered_in_order_within_limits_and_greedy() -> None:
    rng = random.Random(7)
    for _ in range(300):
        overhead, max_bytes, max_items = rng.randint(0, 50), rng.randint(60, 400), rng.randint(1, 6)
        sizes = [rng.randint(0, max_bytes - overhead) for _ in range(rng.randint(0, 30))]
        chunks = plan_chunks(sizes, max_items=max_items, max_bytes=max_bytes, overhead=overhead)
        assert [i for chunk in chunks for i in chunk] == list(range(len(sizes)))

        def body(chunk: range, sizes: list[int] = sizes, overhead: int = overhead) -> int:
            return overhead + sum(sizes[i] for i in chunk) + len(chunk) - 1

        for k, chunk in enumerate(chunks):
            assert 1 <= len(chunk) <= max_items
            assert body(chunk) <= max_bytes
            if k + 1 < len(chunks):  # greedy: the next item would have broken a limit
                longer = range(chunk.start, chunk.stop + 1)
                assert len(longer) > max_items or body(longer) > max_bytes


def test_plan_chunks_single_oversized_item_and_empty_input() -> None:
    with pytest.raises(InvalidInputError, match=r"Item 1 takes 110 bytes .* limit of 50"):
        plan_chunks([5, 100, 5], max_items=8, max_bytes=50, overhead=10)
    assert plan_chunks([5, 40, 5], max_items=8, max_bytes=50, overhead=10) == [
        range(0, 1),
        range(1, 2),
        range(2, 3),
    ]
    assert plan_chunks([], max_items=8, max_bytes=50) == []
    with pytest.raises(ValueError, match="max_items"):
        plan_chunks([1], max_items=0, max_bytes=50)


@pytest.mark.parametrize(
    ("text", "max_bytes", "expected"),
    [
        ("abcdef", 5, "abc"),  # '"abc"'
        ("abcdef", 8, "abcdef"),  # fits: unchanged
        ("\u00e9\u00e9\u00e9", 7, "\u00e9\u00e9"),  # 2 bytes each in UTF-8, never half of one
        ('a"b\nc', 7, 'a"b'),  # escapes count: '"a\\"b"' is 6 bytes, '"a\\"b\\n"' 8
        ("\u4e2d\u6587", 4, ""),  # a 3-byte character does not fit in 4 - 2 bytes
    ],
)
def test_truncate_json_keeps_the_longest_prefix_that_fits(
    text: str, max_bytes: int, expected: str
) -> None:
    cut = truncate_json(text, max_bytes)
    size = len(json.dumps(cut, ensure_ascii=False).encode())
    assert text.startswith(cut)
    assert size <= max_bytes
    if cut != text:
        longer = text[: len(cut) + 1]
        assert len(json.dumps(longer, ensure_ascii=False).encode()) > max_bytes
    assert cut == expected


# -- request size: against a scripted server ----------------------------------------------------


def _tei(n: int, base: float) -> list[dict[str, float]]:
    """A TEI rerank answer for ``n`` texts, best first: text j scores base + j."""
    return [{"index": j, "score": base + j} for j in reversed(range(n))]


def test_limits_come_from_info_once_per_client(pool: ModelPool, scripted) -> None:
    info = {"max_request_bytes": 4096, "max_client_batch_size": 3}
    url, script = scripted(
        *[(200, _tei(n, 10 * k)) for k, n in enumerate([3, 3, 1] * 2)], info=(200, info)
    )
    texts = [f"{i}" + "x" * 999 for i in range(7)]
    spec = reranker(url, **FAST)
    pairs = [("q", t) for t in texts]
    assert pool.score_pairs(spec, pairs, batch_size=32) == [0, 1, 2, 10, 11, 12, 20]
    assert pool.score_pairs(spec, pairs, batch_size=32) == [30, 31, 32, 40, 41, 42, 50]
    assert script.gets == ["/info"], "asked once per client, then cached"
    assert [len(r["body"]["texts"]) for r in script.requests] == [3, 3, 1] * 2
    assert all(r["bytes"] <= 4096 for r in script.requests)
    assert [t for r in script.requests[:3] for t in r["body"]["texts"]] == texts


def test_rerank_indices_are_re_offset_per_request(pool: ModelPool, scripted) -> None:
    """Cohere answers best first with indices into its own request: mapped back per chunk, and
    per query, to the caller's positions."""
    url, script = scripted(
        (
            200,
            {
                "results": [
                    {"index": 1, "relevance_score": 0.2},
                    {"index": 0, "relevance_score": 0.1},
                ]
            },
        ),
        (200, {"results": [{"index": 0, "relevance_score": 0.3}]}),
        (200, {"results": [{"index": 0, "relevance_score": 0.9}]}),
        info=(200, {"max_request_bytes": 2048}),
    )
    spec = reranker(url, protocol="cohere", model_name="m", **FAST)
    big = ["a" * 800, "b" * 800, "c" * 800]
    pairs = [("q1", big[0]), ("q2", "z"), ("q1", big[1]), ("q1", big[2])]
    assert pool.score_pairs(spec, pairs) == [0.1, 0.9, 0.2, 0.3]
    bodies = [r["body"] for r in script.requests]
    assert [(b["query"], b["documents"], b["top_n"]) for b in bodies] == [
        ("q1", big[:2], 2),
        ("q1", big[2:], 1),
        ("q2", ["z"], 1),
    ]
    assert all(r["bytes"] <= 2048 for r in script.requests)


def test_the_option_wins_over_info(pool: ModelPool, scripted) -> None:
    url, script = scripted(
        *[(200, [[float(i)]]) for i in range(4)],
        info=(200, {"max_request_bytes": 10**6, "max_client_batch_size": 100}),
    )
    texts = [f"{i}" + "x" * 1499 for i in range(4)]
    spec = embedder(url, max_request_bytes=2048, **FAST)
    assert pool.embed(spec, texts) == [[0.0], [1.0], [2.0], [3.0]]
    assert [r["body"]["inputs"] for r in script.requests] == [[t] for t in texts]
    assert all(r["bytes"] <= 2048 for r in script.requests)


def test_without_info_the_default_limit_applies(pool: ModelPool, scripted) -> None:
    """TEI/Cohere/infinity without max_request_bytes on /info (here: 404): 1 MiB per request."""
    url, script = scripted((200, [[1.0], [2.0]]), (200, [[3.0]]), (200, [[4.0]]))
    texts = ["a" * 400_000, "b" * 400_000, "c" * 400_000]
    spec = embedder(url, **FAST)
    assert pool.embed(spec, texts, batch_size=32) == [[1.0], [2.0], [3.0]]
    assert pool.embed(spec, ["d"]) == [[4.0]]
    assert [len(r["body"]["inputs"]) for r in script.requests] == [2, 1, 1]
    assert all(r["bytes"] <= DEFAULT_MAX_REQUEST_BYTES - HEADROOM_BYTES for r in script.requests)
    assert script.gets == ["/info"], "a 404 is an answer: not asked again"


def test_an_info_failure_that_may_pass_is_asked_again(pool: ModelPool, scripted) -> None:
    url, script = scripted((200, [[1.0]]), (200, [[2.0]]), info=(503, {"error": "loading"}))
    spec = embedder(url, **FAST)
    assert pool.embed(spec, ["a"]) == [[1.0]]
    assert pool.embed(spec, ["b"]) == [[2.0]]
    assert script.gets == ["/info", "/info"]


def test_a_413_forgets_the_limits(pool: ModelPool, scripted) -> None:
    """The server (or a proxy) took less than advertised: the error says so, and the next call
    asks /info again."""
    url, script = scripted(
        (413, {"error": "too large"}), (200, [[1.0]]), info=(200, {"max_request_bytes": 4096})
    )
    spec = embedder(url, **FAST)
    with pytest.raises(RemoteRequestError, match=r"up to 4096 bytes \(advertised by .*/info\)"):
        pool.embed(spec, ["a"])
    assert pool.embed(spec, ["a"]) == [[1.0]]
    assert script.gets == ["/info", "/info"]


def test_a_413_about_tokens_keeps_the_limits_and_names_truncate(pool: ModelPool, scripted) -> None:
    """TEI's own 413 for a text over the model's tokens (``truncate: false``) is not about the
    body's bytes: the hint is truncate=True or shorter texts, and the limits stand."""
    tei_413 = {
        "error": "Input validation error: `inputs` must have less than 512 tokens. Given: 900",
        "error_type": "Validation",
    }
    url, script = scripted((413, tei_413), (200, [[1.0]]), info=(200, {"max_request_bytes": 4096}))
    spec = embedder(url, truncate=False, **FAST)
    with pytest.raises(RemoteRequestError, match="512 tokens") as caught:
        pool.embed(spec, ["a"])
    assert "truncate=True" in str(caught.value)
    assert "max_request_bytes" not in str(caught.value)
    assert pool.embed(spec, ["a"]) == [[1.0]]
    assert script.gets == ["/info"], "the limits were right: not asked again"


def test_a_text_over_the_limit_is_cut_to_what_fits(
    pool: ModelPool, scripted, caplog: pytest.LogCaptureFixture
) -> None:
    url, script = scripted(
        (200, _tei(1, 1.0)), (200, _tei(1, 2.0)), (200, _tei(1, 3.0)), (200, _tei(2, 4.0))
    )
    spec = reranker(url, max_request_bytes=2048, **FAST)
    long = "word " * 1000
    pairs = [("q", "short"), ("q", long), ("q", "\u00e9" * 3000), ("q", "x"), ("q", "y")]
    with caplog.at_level(logging.WARNING, logger="rag_rerank_plugins.backends.remote"):
        assert pool.score_pairs(spec, pairs) == [1.0, 2.0, 3.0, 4.0, 5.0]
    texts = [r["body"]["texts"] for r in script.requests]
    assert texts[0] == ["short"]
    assert texts[3] == ["x", "y"]
    for (sent,), original in zip(texts[1:3], [long, "\u00e9" * 3000], strict=True):
        assert original.startswith(sent)
        assert len(sent) > 900
    assert all(2048 - 100 < r["bytes"] <= 2048 - HEADROOM_BYTES for r in script.requests[1:3])
    assert "cut 2 text(s)" in caplog.text
    assert "truncate=False" in caplog.text


def test_a_text_over_the_limit_without_truncation_is_invalid_input(
    pool: ModelPool, scripted
) -> None:
    url, script = scripted(info=(200, {"max_request_bytes": 2048}))
    spec = reranker(url, truncate=False, **FAST)
    with pytest.raises(InvalidInputError, match=r"text 2 takes 3002 bytes .*2048 bytes"):
        pool.score_pairs(spec, [("q", "a"), ("q", "b"), ("q", "x" * 3000)])
    assert script.requests == [], "nothing is sent"
    with pytest.raises(InvalidInputError, match="text 0"):
        pool.embed(embedder(url, truncate=False, **FAST), ["x" * 3000])


def test_a_query_over_the_limit_and_bad_unicode_are_invalid_input(
    pool: ModelPool, scripted
) -> None:
    url, script = scripted(info=(200, {"max_request_bytes": 2048}))
    with pytest.raises(InvalidInputError, match=r"envelope .*takes 3\d\d\d bytes.*2048"):
        pool.score_pairs(reranker(url, **FAST), [("q" * 3000, "a")])
    # The pool's handle replaces lone surrogates (docs/bad-input.md, B10); the model on its own
    # refuses them before sending.
    model = pool.get(reranker(url, **FAST)).model
    with pytest.raises(InvalidInputError, match="lone surrogate"):
        model.score_pairs([("q", "bad \ud800 text")], batch_size=8)
    assert script.requests == []


async def test_sync_and_async_send_the_same_requests(pool: ModelPool, scripted) -> None:
    replies = [(200, _tei(n, 0.0)) for n in (2, 1, 1, 1)]
    url, script = scripted(*replies, *replies, info=(200, {"max_request_bytes": 2048}))
    pairs = [("q", "a" * 900), ("q", "b" * 900), ("q", "c" * 5000), ("p", "d"), ("q", "e" * 900)]
    model = pool.get(reranker(url, **FAST)).model
    sync = model.score_pairs(pairs, batch_size=32)
    sent = [r["body"] for r in script.requests]
    assert await model.ascore_pairs(pairs, batch_size=32) == sync
    assert [r["body"] for r in script.requests[len(sent) :]] == sent
    assert [len(body["texts"]) for body in sent] == [2, 1, 1, 1]


@pytest.mark.parametrize(
    ("given", "meant"),
    [(False, False), ("false", False), ("0", False), (" No ", False), (0, False), ("true", True)],
)
def test_yes_no_options_given_as_text_mean_what_they_say(given: object, meant: bool) -> None:
    """Specs read from JSON or the environment carry text: "false" must not become True (a
    truncate='false' that cut texts silently)."""
    from rag_rerank_plugins.backends.remote.settings import RemoteSettings

    spec = reranker("http://127.0.0.1:1", protocol="tei", truncate=given, verify=given)
    settings = RemoteSettings.from_spec(spec)
    assert (settings.truncate, settings.verify) == (meant, meant)
