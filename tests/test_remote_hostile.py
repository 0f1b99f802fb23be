"""Remote backends against hostile servers and callers: secrets in URLs, broken rerank answers,
redirects, retries past the call's deadline, and a release while async calls are in flight.

Servers are faked with ``httpx.MockTransport`` (through ``use_transport``) or, where a real
socket timeout matters, a tiny ``http.server`` on 127.0.0.1. Every wait is bounded.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import threading
import time
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest

pytest.importorskip("httpx")

import httpx

from rag_rerank_plugins import ConfigurationError, ModelPool, ModelSpec
from rag_rerank_plugins.backends.remote import use_transport
from rag_rerank_plugins.exceptions import (
    RagRerankError,
    RemoteError,
    RemoteRequestError,
    RemoteUnavailableError,
)

BASE = "http://remote-hostile.test:8080"


def reranker(model: str = BASE, **options: Any) -> ModelSpec:
    return ModelSpec(
        model, backend="remote-reranker", device="cpu", dtype="float32", options=options
    )


def embedder(model: str = BASE, **options: Any) -> ModelSpec:
    return ModelSpec(
        model, backend="remote-embedder", device="cpu", dtype="float32", options=options
    )


@pytest.fixture
def mock_server(pool: ModelPool) -> Iterator[Callable[[Callable[[httpx.Request], Any]], None]]:
    """Route ``BASE`` through a handler (sync or async) for the test; release before the end."""
    stack: list[Any] = []

    def start(handler: Callable[[httpx.Request], Any]) -> None:
        block = use_transport(BASE, httpx.MockTransport(handler))
        block.__enter__()
        stack.append(block)

    yield start
    pool.clear()
    for block in stack:
        block.__exit__(None, None, None)


def _no_info(request: httpx.Request) -> httpx.Response | None:
    return httpx.Response(404, json={"error": "no info"}) if request.method == "GET" else None


# -- secrets in the URL ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("model", "options"),
    [
        ("http://alice:s3cretpw@127.0.0.1:1", {}),
        ("https://:s3cretpw@api.example.com/v1", {}),
        ("my-model", {"url": "http://alice:s3cretpw@127.0.0.1:1", "protocol": "infinity"}),
    ],
)
def test_credentials_in_the_url_are_refused_without_echoing_them(
    pool: ModelPool, model: str, options: dict[str, Any], caplog: pytest.LogCaptureFixture
) -> None:
    """user:password@ in the URL would sit in the spec label and in every error naming the
    endpoint (it did: 'could not reach http://alice:s3cretpw@...')."""
    caplog.set_level(logging.DEBUG)
    with pytest.raises(ConfigurationError, match="api_key_env") as info:
        pool.score_pairs(reranker(model, retries=0, connect_timeout=0.2, **options), [("q", "a")])
    assert "s3cretpw" not in str(info.value)
    assert "s3cretpw" not in caplog.text


@pytest.mark.parametrize("url", ["http://127.0.0.1:1/?api_key=s3cret", "http://127.0.0.1:1/#x"])
def test_a_query_string_in_the_url_is_refused(pool: ModelPool, url: str) -> None:
    """Routes are appended to the base URL: '?api_key=...' + '/rerank' is no URL the user
    meant (it posted to '/?api_key=s3cret/rerank')."""
    with pytest.raises(ConfigurationError, match="query string") as info:
        pool.get(reranker(url))
    assert "s3cret" not in str(info.value)


# -- broken rerank answers -----------------------------------------------------------------------


@pytest.mark.parametrize(
    "answer",
    [
        # -1 is the last passage to Python: it got the score, silently.
        [{"index": 0, "score": 0.1}, {"index": 1, "score": 0.2}, {"index": -1, "score": 0.9}],
        # passage #1 scored twice (the last one won), nothing missing: silently accepted.
        [
            {"index": 0, "score": 0.1},
            {"index": 1, "score": 0.2},
            {"index": 2, "score": 0.3},
            {"index": 1, "score": 0.9},
        ],
        # a bool is not an index; a string is not a score.
        [{"index": True, "score": 0.1}, {"index": 0, "score": 0.2}, {"index": 2, "score": 0.3}],
        [{"index": 0, "score": "0.1"}, {"index": 1, "score": 0.2}, {"index": 2, "score": 0.3}],
        # out of range (already refused) and missing (already refused): kept as references.
        [{"index": 0, "score": 0.1}, {"index": 1, "score": 0.2}, {"index": 3, "score": 0.3}],
        [{"index": 0, "score": 0.1}, {"index": 1, "score": 0.2}],
    ],
)
def test_rerank_answers_must_score_each_passage_once(
    pool: ModelPool, mock_server, answer: list[dict[str, Any]]
) -> None:
    mock_server(lambda request: _no_info(request) or httpx.Response(200, json=answer))
    with pytest.raises(RemoteError, match="unexpected response"):
        pool.score_pairs(reranker(), [("q", "a"), ("q", "b"), ("q", "c")])


@pytest.mark.parametrize(
    "answer",
    [
        {"results": [{"index": 0, "relevance_score": 0.1}, {"index": -1, "relevance_score": 0.5}]},
        {
            "results": [
                {"index": 0, "relevance_score": 0.1},
                {"index": 1, "relevance_score": 0.5},
                {"index": 0, "relevance_score": 0.7},
            ]
        },
    ],
)
def test_documents_rerank_answers_must_score_each_passage_once(
    pool: ModelPool, mock_server, answer: dict[str, Any]
) -> None:
    mock_server(lambda request: _no_info(request) or httpx.Response(200, json=answer))
    spec = reranker(protocol="cohere", model_name="rerank-v3")
    with pytest.raises(RemoteError, match="unexpected response"):
        pool.score_pairs(spec, [("q", "a"), ("q", "b")])


@pytest.mark.parametrize("indices", [[0, 0], [1, 1], [0, 2], [True, 0]])
def test_openai_embeddings_must_carry_each_index_once(
    pool: ModelPool, mock_server, indices: list[Any]
) -> None:
    """Two vectors both at index 1 were sorted and returned in whatever order they came."""
    data = [
        {"index": index, "embedding": [float(i), 1.0], "object": "embedding"}
        for i, index in enumerate(indices)
    ]
    mock_server(lambda request: _no_info(request) or httpx.Response(200, json={"data": data}))
    spec = embedder(protocol="infinity", model_name="e5")
    with pytest.raises(RemoteError, match="unexpected response"):
        pool.embed(spec, ["a", "b"])


def test_openai_embeddings_in_any_order_are_put_back_in_index_order(
    pool: ModelPool, mock_server
) -> None:
    data = [{"index": i, "embedding": [float(i), 1.0]} for i in (2, 0, 1)]
    mock_server(lambda request: _no_info(request) or httpx.Response(200, json={"data": data}))
    vectors = pool.embed(embedder(protocol="infinity", model_name="e5"), ["a", "b", "c"])
    assert vectors == [[0.0, 1.0], [1.0, 1.0], [2.0, 1.0]]


@pytest.mark.parametrize(
    "vectors", [[[], []], [["0.1", "0.2"], [0.3, 0.4]], [[True, 0.2], [0.3, 0.4]]]
)
def test_tei_vectors_must_be_non_empty_lists_of_numbers(
    pool: ModelPool, mock_server, vectors: list[list[Any]]
) -> None:
    """Empty vectors came back as two 0-dimensional embeddings; strings and bools as floats."""
    mock_server(lambda request: _no_info(request) or httpx.Response(200, json=vectors))
    with pytest.raises(RemoteError, match="unexpected response"):
        pool.embed(embedder(), ["a", "b"])


def test_a_server_that_changes_its_vector_dimension_is_an_error(
    pool: ModelPool, mock_server
) -> None:
    """A different model behind the URL: 2-d vectors, then 3-d ones, silently, into one index."""
    answers = iter([[[1.0, 0.0]], [[1.0, 0.0, 0.0]]])
    mock_server(lambda request: _no_info(request) or httpx.Response(200, json=next(answers)))
    spec = embedder()
    assert pool.embed(spec, ["a"]) == [[1.0, 0.0]]
    with pytest.raises(RemoteError, match="3-dimensional vectors, but 2-dimensional"):
        pool.embed(spec, ["b"])


# -- redirects -----------------------------------------------------------------------------------


@pytest.mark.parametrize("status", [307, 308])
def test_a_redirect_is_followed_with_its_body_like_the_official_clients(
    pool: ModelPool, mock_server, status: int
) -> None:
    """openai and cohere build their httpx clients with follow_redirects=True; ours parsed the
    307's own body and blamed the 'protocol' option."""
    seen: list[tuple[str, str, bytes]] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append((request.method, request.url.path, request.content))
        if request.method == "GET":
            return httpx.Response(404)
        if request.url.path == "/rerank":
            return httpx.Response(status, headers={"location": f"{BASE}/v2/rerank"}, json={})
        return httpx.Response(200, json=[{"index": 1, "score": 0.2}, {"index": 0, "score": 0.8}])

    mock_server(handler)
    assert pool.score_pairs(reranker(), [("q", "a"), ("q", "b")]) == [0.8, 0.2]
    posts = [entry for entry in seen if entry[0] == "POST"]
    assert [path for _, path, _ in posts] == ["/rerank", "/v2/rerank"]
    assert posts[0][2] == posts[1][2]
    assert json.loads(posts[1][2])["texts"] == ["a", "b"]


def test_an_unfollowed_redirect_is_an_error_naming_it(pool: ModelPool, mock_server) -> None:
    mock_server(lambda request: _no_info(request) or httpx.Response(304))
    with pytest.raises(RemoteRequestError, match="HTTP 304"):
        pool.score_pairs(reranker(), [("q", "a")])


# -- the call's deadline -------------------------------------------------------------------------


@pytest.fixture
def slow_server() -> Iterator[Callable[[float], tuple[str, list[float]]]]:
    """A server answering every POST after ``delay`` seconds; returns its URL and the times the
    POSTs arrived."""
    servers: list[ThreadingHTTPServer] = []

    def start(delay: float) -> tuple[str, list[float]]:
        arrivals: list[float] = []

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:
                pass

            def do_GET(self) -> None:
                self.send_response(404)
                self.send_header("content-length", "0")
                self.end_headers()

            def do_POST(self) -> None:
                arrivals.append(time.monotonic())
                self.rfile.read(int(self.headers.get("content-length", 0)))
                time.sleep(delay)
                raw = json.dumps([{"index": 0, "score": 0.5}]).encode()
                try:
                    self.send_response(200)
                    self.send_header("content-length", str(len(raw)))
                    self.end_headers()
                    self.wfile.write(raw)
                except OSError:  # the client gave up
                    pass

        server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        server.daemon_threads = True
        servers.append(server)
        threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}).start()
        return f"http://127.0.0.1:{server.server_address[1]}", arrivals

    yield start
    for server in servers:
        server.shutdown()
        server.server_close()


def test_retries_stop_at_the_calls_deadline(pool: ModelPool, mock_server) -> None:
    """A 503 with Retry-After past the call's timeout: the caller gets its error at once, and
    nobody keeps hammering the server for a caller that is gone (it went on for seconds)."""
    posts: list[float] = []

    def handler(request: httpx.Request) -> httpx.Response:
        if request.method == "GET":
            return httpx.Response(404)
        posts.append(time.monotonic())
        return httpx.Response(503, headers={"retry-after": "1"}, json={"error": "busy"})

    mock_server(handler)
    spec = reranker(retries=5, max_backoff=1)
    started = time.monotonic()
    with pytest.raises(RagRerankError):
        pool.score_pairs(spec, [("q", "a")], timeout=0.4)
    assert time.monotonic() - started < 1.0
    time.sleep(1.5)
    assert len(posts) == 1  # no retry was started past the deadline
    started = time.monotonic()
    pool.release(spec)  # waits for the call still running, if any (it retried for seconds)
    assert time.monotonic() - started < 1.5


def test_retries_within_the_deadline_still_happen(pool: ModelPool, mock_server) -> None:
    answers = iter([httpx.Response(503, json={"error": "busy"})])

    def handler(request: httpx.Request) -> httpx.Response:
        if request.method == "GET":
            return httpx.Response(404)
        return next(answers, None) or httpx.Response(200, json=[{"index": 0, "score": 0.5}])

    mock_server(handler)
    spec = reranker(backoff=0.01, max_backoff=0.05)
    assert pool.score_pairs(spec, [("q", "a")], timeout=5) == [0.5]


def test_a_slow_answer_is_not_awaited_past_the_calls_deadline(pool: ModelPool, slow_server) -> None:
    """The read timeout of one attempt is what is left of the call's timeout, not the 30 s of
    the option: the call's worker thread was stuck (and release waited for it)."""
    url, arrivals = slow_server(3.0)
    spec = reranker(url, timeout=30)
    started = time.monotonic()
    with pytest.raises(RagRerankError):
        pool.score_pairs(spec, [("q", "a")], timeout=0.5)
    pool.release(spec)  # waits for the running call: the server answers only after 3 s
    assert time.monotonic() - started < 2.0
    assert len(arrivals) == 1


async def test_async_call_with_a_deadline_on_a_slow_server(pool: ModelPool, slow_server) -> None:
    url, _ = slow_server(3.0)
    spec = reranker(url, timeout=30)
    started = time.monotonic()
    with pytest.raises(RagRerankError):
        await pool.ascore_pairs(spec, [("q", "a")], timeout=0.5)
    assert time.monotonic() - started < 2.0


# -- release while calls are in flight -----------------------------------------------------------


async def test_release_on_the_loop_lets_in_flight_async_calls_finish(
    pool: ModelPool, mock_server
) -> None:
    """pool.release() on the event loop cannot wait for the calls awaited on that loop, yet it
    promises that in-flight calls finish first: they do (next test: over real sockets they
    broke), the clients close when the last one ends, and later calls reload the model."""
    arrived = asyncio.Event()
    answer = asyncio.Event()

    async def handler(request: httpx.Request) -> httpx.Response:
        if request.method == "GET":
            return httpx.Response(404)
        arrived.set()
        await answer.wait()
        return httpx.Response(200, json=[{"index": 0, "score": 0.5}])

    mock_server(handler)
    spec = reranker()
    handle = pool.get(spec)
    model = handle.model
    calls = [asyncio.create_task(pool.ascore_pairs(spec, [("q", "a")])) for _ in range(3)]
    await asyncio.wait_for(arrived.wait(), 5)
    pool.release(spec)
    answer.set()
    assert await asyncio.wait_for(asyncio.gather(*calls), 5) == [[0.5]] * 3
    client = model.client
    assert client._sync is None
    assert not list(client._async.items())
    # New calls go to a fresh load of the model.
    assert await pool.ascore_pairs(spec, [("q", "a")]) == [0.5]
    assert pool.spec_stats(spec)["loads"] == 2


async def test_release_on_the_loop_does_not_close_sockets_under_in_flight_calls(
    pool: ModelPool, slow_server
) -> None:
    """The same over real sockets: closing the loop's client under a call awaiting its answer
    broke that call."""
    url, arrivals = slow_server(0.5)
    spec = reranker(url, retries=0)
    assert await pool.ascore_pairs(spec, [("q", "a")]) == [0.5]  # the client exists
    calls = [asyncio.create_task(pool.ascore_pairs(spec, [("q", "a")])) for _ in range(3)]
    for _ in range(200):
        if len(arrivals) >= 4:
            break
        await asyncio.sleep(0.01)
    pool.release(spec)
    assert await asyncio.wait_for(asyncio.gather(*calls), 5) == [[0.5]] * 3


def test_a_released_model_used_directly_says_to_reload(pool: ModelPool, mock_server) -> None:
    mock_server(lambda request: _no_info(request) or httpx.Response(200, json=[]))
    spec = reranker()
    model = pool.get(spec).model
    pool.release(spec)
    with pytest.raises(RagRerankError, match=r"released.*pool\.get"):
        model.score_pairs([("q", "a")], batch_size=8)


def test_the_loop_keeps_ticking_during_many_async_calls(pool: ModelPool, mock_server) -> None:
    async def handler(request: httpx.Request) -> httpx.Response:
        if request.method == "GET":
            return httpx.Response(404)
        await asyncio.sleep(0.2)
        return httpx.Response(200, json=[{"index": 0, "score": 0.5}])

    mock_server(handler)
    spec = reranker(max_connections=4)

    async def main() -> int:
        ticks = 0

        async def ticker() -> None:
            nonlocal ticks
            while True:
                await asyncio.sleep(0.01)
                ticks += 1

        task = asyncio.create_task(ticker())
        results = await asyncio.gather(
            *(pool.ascore_pairs(spec, [("q", f"p{i}")]) for i in range(16))
        )
        task.cancel()
        assert results == [[0.5]] * 16
        return ticks

    assert asyncio.run(main()) >= 10


def test_connection_refused_gives_up_within_the_budget(pool: ModelPool) -> None:
    spec = reranker("http://127.0.0.1:1", retries=2, backoff=0.01, max_backoff=0.02)
    with pytest.raises(RemoteUnavailableError, match="after 3 attempt"):
        pool.score_pairs(spec, [("q", "a")])


# -- a server that answers slowly: the option ``timeout`` bounds the whole answer ------------------


@pytest.fixture
def trickle_server() -> Iterator[Callable[[bytes, float], str]]:
    """A raw socket server: headers at once, then the body one byte every ``pause`` seconds
    (``body=b""``: a chunked body that never ends). Stops when the test ends."""
    import socket

    sockets: list[socket.socket] = []
    stop = threading.Event()

    def start(body: bytes, pause: float) -> str:
        listener = socket.socket()
        listener.bind(("127.0.0.1", 0))
        listener.listen(8)
        listener.settimeout(0.1)
        sockets.append(listener)

        def serve(conn: socket.socket) -> None:
            with conn:
                request = b""
                while b"\r\n\r\n" not in request:
                    request += conn.recv(65536) or b"\r\n\r\n"
                if request.startswith(b"GET"):
                    # "connection: close": this server answers one request per connection, and
                    # a client reusing a kept-alive one raced its close (a flaky "Server
                    # disconnected without sending a response" under load).
                    conn.sendall(
                        b"HTTP/1.1 404 Not Found\r\nconnection: close\r\ncontent-length: 2"
                        b"\r\n\r\n{}"
                    )
                    return
                head = f"content-length: {len(body)}" if body else "transfer-encoding: chunked"
                conn.sendall(
                    f"HTTP/1.1 200 OK\r\nconnection: close\r\ncontent-type: application/json"
                    f"\r\n{head}\r\n\r\n".encode()
                )
                for i in range(10**6):
                    if stop.wait(pause) or (body and i >= len(body)):
                        return
                    with contextlib.suppress(OSError):
                        conn.sendall(body[i : i + 1] if body else b"1\r\n \r\n")

        def accept() -> None:
            while not stop.is_set():
                try:
                    conn, _ = listener.accept()
                except (TimeoutError, OSError):
                    continue
                threading.Thread(target=serve, args=(conn,), daemon=True).start()

        threading.Thread(target=accept, daemon=True).start()
        return f"http://127.0.0.1:{listener.getsockname()[1]}"

    yield start
    stop.set()
    for listener in sockets:
        listener.close()


TRICKLED = b'[{"index":0,"score":0.1},{"index":1,"score":0.2}]'


@pytest.mark.parametrize("body", [TRICKLED, b""], ids=["slow-body", "endless-chunks"])
def test_a_trickling_answer_is_cut_at_the_timeout_option(
    pool: ModelPool, trickle_server, body: bytes
) -> None:
    """httpx's timeouts bound each wait for bytes: a server sending one byte every 0.2 s held
    a call with timeout=1 for 10 s (a chunked body that never ends: forever, with no call
    timeout). The option now bounds the whole answer, sync and async."""
    from rag_rerank_plugins.exceptions import RemoteTimeoutError

    url = trickle_server(body, 0.2)
    spec = reranker(url, timeout=1, retries=0)
    started = time.monotonic()
    with pytest.raises(RemoteTimeoutError, match="did not answer within 1s"):
        pool.score_pairs(spec, [("q", "a"), ("q", "b")])
    assert time.monotonic() - started < 3.0

    async def call() -> None:
        await pool.ascore_pairs(spec, [("q", "a"), ("q", "b")])

    started = time.monotonic()
    with pytest.raises(RemoteTimeoutError):
        asyncio.run(call())
    assert time.monotonic() - started < 3.0


def test_a_slow_answer_within_the_timeout_is_read_whole(pool: ModelPool, trickle_server) -> None:
    url = trickle_server(TRICKLED, 0.002)
    assert pool.score_pairs(reranker(url, timeout=10), [("q", "a"), ("q", "b")]) == [0.1, 0.2]


# -- answers httpx cannot take are RemoteErrors, as the docs promise ---------------------------


def _redirect_loop(request: httpx.Request) -> httpx.Response:
    if request.method == "GET":
        return httpx.Response(404)
    return httpx.Response(307, headers={"location": BASE + "/rerank"})


def _bad_gzip(request: httpx.Request) -> httpx.Response:
    if request.method == "GET":
        return httpx.Response(404)
    return httpx.Response(
        200,
        content=b"not gzip at all",
        headers={"content-encoding": "gzip", "content-type": "application/json"},
    )


def _huge_number(request: httpx.Request) -> httpx.Response:
    if request.method == "GET":
        return httpx.Response(404)
    return httpx.Response(200, content=b'[{"index":0,"score":1' + b"0" * 400 + b"}]")


def _huge_coordinate(request: httpx.Request) -> httpx.Response:
    if request.method == "GET":
        return httpx.Response(404)
    return httpx.Response(200, content=b"[[1" + b"0" * 400 + b"]]")


@pytest.mark.parametrize(
    ("handler", "needle"),
    [
        (_redirect_loop, "redirected in a loop"),
        (_bad_gzip, "does not decode"),
        (_huge_number, "unexpected response"),
        (_huge_coordinate, "unexpected response"),
    ],
)
@pytest.mark.parametrize("mode", ["sync", "async"])
def test_answers_httpx_cannot_take_are_remote_errors(
    pool: ModelPool, mock_server, handler: Any, needle: str, mode: str
) -> None:
    """Code that catches RemoteError to fail over missed these: a redirect loop and a bad gzip
    body were plain InferenceErrors (httpx's TooManyRedirects and DecodingError are not
    transport errors), and a number too large for a float an OverflowError inside one."""
    mock_server(handler)
    spec = embedder(retries=0) if handler is _huge_coordinate else reranker(retries=0)
    if spec.backend == "remote-embedder":
        call: Any = (pool.embed, pool.aembed, ["a"])
    else:
        call = (pool.score_pairs, pool.ascore_pairs, [("q", "a")])

    def run() -> Any:
        if mode == "sync":
            return call[0](spec, call[2])
        return asyncio.run(call[1](spec, call[2]))

    with pytest.raises(RemoteError, match=needle) as caught:
        run()
    assert caught.value.url.startswith(BASE)


@pytest.mark.parametrize(
    "options",
    [
        {"timeout": "nan"},
        {"connect_timeout": "nan"},
        {"timeout": "inf"},
        {"max_backoff": "nan"},
        {"backoff": "nan"},
        {"backoff": "inf"},
    ],
)
def test_nan_and_infinite_timing_options_are_refused_at_load(
    pool: ModelPool, options: dict[str, str]
) -> None:
    """NaN compares false both ways, so 'nan' passed the range checks and failed every request
    later (an infinite timeout too: the socket refuses it)."""
    with pytest.raises(ConfigurationError, match=r"timeout|backoff"):
        pool.get(reranker("http://127.0.0.1:1", **options))


def test_an_unbounded_max_backoff_is_still_accepted(pool: ModelPool) -> None:
    pool.get(reranker("http://127.0.0.1:1", max_backoff="inf"))


# -- found by the remote fault probe --------------------------------------------------------------


@pytest.mark.parametrize(
    "token", ["sk-live-SECRET123\n", "sk-live SECRET123", "sk-\u2019SECRET123"]
)
def test_a_token_no_header_can_carry_is_refused_without_echoing_it(
    pool: ModelPool, mock_server, monkeypatch: pytest.MonkeyPatch, token: str
) -> None:
    """A mounted secret ends in a newline; a pasted one may hold a typographic quote. The HTTP
    library refused the header quoting it (token included) in a RemoteUnavailableError that went
    to messages, WARNING logs and passthrough metadata, after 4 "retries"."""
    sent: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        sent.append(request)
        return _no_info(request) or httpx.Response(200, json=[{"index": 0, "score": 0.5}])

    mock_server(handler)
    monkeypatch.setenv("PROBE_TOKEN", token)
    spec = reranker(api_key_env="PROBE_TOKEN")
    if token.endswith("\n"):  # stripped, as --api-key-file is read
        assert pool.score_pairs(spec, [("q", "a")]) == [0.5]
        assert sent[-1].headers["authorization"] == "Bearer sk-live-SECRET123"
        return
    for call in (
        lambda: pool.score_pairs(spec, [("q", "a")]),
        lambda: asyncio.run(pool.ascore_pairs(spec, [("q", "a")])),
    ):
        with pytest.raises(RemoteError) as info:
            call()
        assert "SECRET123" not in str(info.value)
        assert "PROBE_TOKEN" in str(info.value)
    assert not [r for r in sent if r.method == "POST"]


def test_a_ragged_answer_does_not_pin_a_dimension(pool: ModelPool, mock_server) -> None:
    """One answer with vectors of two sizes is refused, and must not fix the dimension: every
    later, correct answer then failed with "the model behind the URL changed"."""
    answers = iter([[[0.1, 0.2], [0.1, 0.2, 0.3]], [[1.0, 0.0, 0.0]] * 2, [[0.0, 1.0, 0.0]] * 2])
    mock_server(lambda request: _no_info(request) or httpx.Response(200, json=next(answers)))
    spec = embedder()
    with pytest.raises(RemoteError, match="2 sizes"):
        pool.embed(spec, ["a", "b"])
    assert pool.embed(spec, ["a", "b"]) == [[1.0, 0.0, 0.0]] * 2
    assert pool.embed(spec, ["a", "b"]) == [[0.0, 1.0, 0.0]] * 2


def test_retry_after_as_an_http_date_is_honoured() -> None:
    from email.utils import formatdate

    from rag_rerank_plugins.backends.remote.client import _retry_after

    later = httpx.Response(429, headers={"retry-after": formatdate(time.time() + 3, usegmt=True)})
    assert 1.5 < (_retry_after(later) or 0) <= 3.5
    past = httpx.Response(429, headers={"retry-after": formatdate(time.time() - 60, usegmt=True)})
    assert _retry_after(past) == 0.0
    assert _retry_after(httpx.Response(429, headers={"retry-after": "soon"})) is None
    assert _retry_after(httpx.Response(429, headers={"retry-after": "2"})) == 2.0


def test_an_info_endpoint_that_never_answers_costs_one_wait_not_every_calls(
    pool: ModelPool,
) -> None:
    """Each call asked GET /info again and waited up to 5 s for it, so every call with a timeout
    of 5 s or less failed though the rerank endpoint answered at once; and the POST was still
    sent after its caller had given up."""
    gets: list[float] = []

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args: Any) -> None:
            pass

        def do_GET(self) -> None:
            gets.append(time.monotonic())
            time.sleep(10)  # accepted, never answered in time

        def do_POST(self) -> None:
            self.rfile.read(int(self.headers.get("content-length", 0)))
            raw = json.dumps([{"index": 0, "score": 0.5}]).encode()
            self.send_response(200)
            self.send_header("content-length", str(len(raw)))
            self.end_headers()
            self.wfile.write(raw)

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}).start()
    spec = reranker(f"http://127.0.0.1:{server.server_address[1]}")
    try:
        for _ in range(3):
            started = time.monotonic()
            assert pool.score_pairs(spec, [("q", "a")], timeout=2) == [0.5]
            assert time.monotonic() - started < 1.5  # /info gets a slice of the call's time
        assert len(gets) == 1  # then not asked again for a while
    finally:
        pool.clear()
        server.shutdown()
        server.server_close()


def test_a_404_for_a_name_tei_cannot_send_says_which_protocol_can(pool: ModelPool) -> None:
    """``protocol="tei"`` has no model field, so against a server with several embedders the
    name never arrived; the hint asked whether ``tei`` was the server's protocol (it was)."""
    from rag_rerank_plugins.server import ServerConfig, create_app
    from rag_rerank_plugins.server.testing import ServerThread, wait_until_healthy

    emb = {"backend": "fake-embedder", "device": "cpu"}
    specs = [{**emb, "name": "a", "model": "a"}, {**emb, "name": "b", "model": "b"}]
    served = ModelPool()
    server = ServerThread(create_app(ServerConfig(specs=specs), pool=served))
    url = server.start()
    try:
        wait_until_healthy(url, timeout=30)
        spec = ModelSpec("b", backend="remote-embedder", options={"url": url})
        with pytest.raises(RemoteRequestError, match="protocol='infinity'"):
            pool.embed(spec, ["hello"])
        by_name = ModelSpec(
            "b", backend="remote-embedder", options={"url": url, "protocol": "infinity"}
        )
        assert len(pool.embed(by_name, ["hello"])) == 1
    finally:
        server.stop()
        served.clear()
