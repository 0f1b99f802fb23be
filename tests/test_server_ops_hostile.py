"""`rag-rerank serve` run by an operator and attacked by clients: limits, disconnects, auth.

* A client that disconnects while its request waits or runs frees its admission slot at once
  (its model work is withdrawn): after 100 such clients the server still serves
  ``max_concurrency`` requests at once, and ``/metrics`` counts them as 499, never 200 or 500.
* A body the guard refuses before reading it all (413 by Content-Length or by chunked bytes,
  408, 415) closes the connection, so the server never keeps reading the rest.
* A compressed body (gzip/deflate ``Content-Encoding``) is a 415 that says what to do, before
  anything is inflated (a zip bomb costs nothing).
* The bearer token: a blank one (auth silently off while ``/info`` says ``auth: true``) or one no
  client can send (a second line in the key file) is refused at start-up, without echoing it.
* The semantic cache's served models and store are checked before ``rag-rerank serve`` starts.

Every server listens on 127.0.0.1; every socket read, request and wait is bounded.
"""

from __future__ import annotations

import gzip
import json
import socket
import threading
import time
import zlib
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
pytest.importorskip("httpx")

import httpx

from rag_rerank_plugins import ConfigurationError, ModelPool
from rag_rerank_plugins.cli import main as cli_main
from rag_rerank_plugins.server import ServerConfig, create_app
from rag_rerank_plugins.server.testing import ServerThread, wait_until_healthy

FAKE = {"name": "fake", "model": "f", "backend": "fake-reranker", "device": "cpu"}
FAKE_EMB = {"name": "fake-emb", "model": "e", "backend": "fake-embedder", "device": "cpu"}
BODY = json.dumps({"query": "a b", "texts": ["a"]}).encode()


@contextmanager
def served(specs: list[dict[str, Any]], **settings: Any) -> Iterator[tuple[str, int, Any]]:
    """A fake-model server: (url, port, state)."""
    pool = ModelPool()
    app = create_app(ServerConfig(specs=specs, **settings), pool=pool)
    server = ServerThread(app, graceful_timeout=5)
    url = server.start()
    try:
        wait_until_healthy(url, timeout=30)
        yield url, server.port, app.state.server
    finally:
        server.stop()
        pool.clear()


def _head(path: str, length: int | None, extra: str = "") -> bytes:
    size = f"Content-Length: {length}\r\n" if length is not None else ""
    return (
        f"POST {path} HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\n{size}{extra}\r\n"
    ).encode()


def _read_until_closed(sock: socket.socket, timeout: float) -> tuple[bytes, bool]:
    """Everything the server sends, and whether it closed the connection within ``timeout``."""
    sock.settimeout(timeout)
    data = b""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            chunk = sock.recv(65536)
        except TimeoutError:
            return data, False
        except ConnectionResetError:
            return data, True
        if not chunk:
            return data, True
        data += chunk
    return data, False


def _wait_for(predicate: Any, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.02)
    return bool(predicate())


def _metric(text: str, line_start: str) -> float:
    """The value of the first exposition line starting with ``line_start`` (0 if none)."""
    for line in text.splitlines():
        if line.startswith(line_start):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


# -- disconnects -------------------------------------------------------------------------------


def test_clients_that_disconnect_free_their_slots_and_count_as_499() -> None:
    slow = {**FAKE, "options": {"delay_ms": 2000}}
    with served([slow], max_concurrency=2, max_pending=1) as (url, port, state):
        for _ in range(100):
            with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
                sock.sendall(_head("/rerank", len(BODY)) + BODY)
                time.sleep(0.005)  # long enough for the request to be admitted, not answered
        # At once, not when the abandoned model calls would have ended (2 s each).
        assert _wait_for(lambda: state.admission.admitted == 0, 1.0), (
            f"abandoned requests still hold {state.admission.admitted} slot(s)"
        )
        barrier = threading.Barrier(3, timeout=10)

        def call(_: int) -> httpx.Response:
            barrier.wait()
            return httpx.post(url + "/rerank", content=BODY, timeout=30, headers=_JSON)

        with ThreadPoolExecutor(3) as executor:
            statuses = [r.status_code for r in executor.map(call, range(3))]
        assert statuses == [200, 200, 200], statuses  # 2 running + 1 pending: all served
        metrics = httpx.get(url + "/metrics", timeout=10).text
        gone = _metric(metrics, 'rag_rerank_http_requests_total{endpoint="/rerank",status="499"}')
        refused = _metric(
            metrics, 'rag_rerank_http_requests_total{endpoint="/rerank",status="429"}'
        )
        assert gone + refused == 100, metrics  # nobody was there to read a 200 or a 500
        assert gone >= 50
        assert 'status="500"' not in metrics
        assert _metric(metrics, 'rag_rerank_http_requests_total{endpoint="/rerank",status="200"}')
        assert _metric(metrics, "rag_rerank_requests_running ") == 0
        assert _metric(metrics, "rag_rerank_requests_queued ") == 0
        stats = next(iter(state.pool.stats().values()))
        # Withdrawn while queued: far fewer than 100 model calls were made for nobody.
        assert stats["calls"] < 60, stats["calls"]


def test_a_disconnect_mid_body_counts_499_and_runs_nothing() -> None:
    with served([FAKE]) as (_url, port, state):
        calls = next(iter(state.pool.stats().values()))["calls"]  # the warm-up's
        with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
            sock.sendall(_head("/rerank", len(BODY)) + BODY[:5])
            time.sleep(0.1)
        assert _wait_for(lambda: ("/rerank", 499) in state.metrics.snapshot()[0], 5)
        requests = state.metrics.snapshot()[0]
        assert ("/rerank", 500) not in requests, requests
        assert next(iter(state.pool.stats().values()))["calls"] == calls


# -- refusals close the connection; compressed bodies ------------------------------------------

_JSON = {"content-type": "application/json"}


@pytest.mark.parametrize("how", ["content-length", "chunked"])
def test_413_closes_the_connection_instead_of_reading_the_rest(how: str) -> None:
    with served([FAKE], max_request_bytes=1000) as (_url, port, state):
        calls = next(iter(state.pool.stats().values()))["calls"]  # the warm-up's
        with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
            if how == "content-length":
                sock.sendall(_head("/rerank", 10**9) + b"x" * 500)
            else:
                chunk = b"x" * 800
                piece = b"%x\r\n%s\r\n" % (len(chunk), chunk)
                sock.sendall(_head("/rerank", None, "Transfer-Encoding: chunked\r\n") + piece * 2)
            data, closed = _read_until_closed(sock, 3)
        assert data.startswith(b"HTTP/1.1 413"), data[:200]
        assert b"--max-request-bytes" in data
        assert closed, "the server kept the connection open to read the rest of a refused body"
        assert state.metrics.rejected["too_large"] == 1
        assert next(iter(state.pool.stats().values()))["calls"] == calls


def test_a_trickled_body_gets_408_and_the_connection_closes() -> None:
    with served([FAKE], body_timeout=0.5) as (_url, port, state):
        start = time.monotonic()
        with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
            sock.sendall(_head("/rerank", len(BODY)))
            sock.settimeout(0.05)
            data = b""
            for byte in BODY[:20]:  # slowloris: one byte every 100 ms
                sock.sendall(bytes([byte]))
                with suppress(TimeoutError):
                    data += sock.recv(65536)
                if data:
                    break
                time.sleep(0.1)
            rest, closed = _read_until_closed(sock, 3)
        assert (data + rest).startswith(b"HTTP/1.1 408"), data[:200]
        assert closed
        assert time.monotonic() - start < 3
        assert state.metrics.rejected["timeout"] == 1


@pytest.mark.parametrize(
    ("encoding", "compress"),
    # br: any small bytes do (the server never decodes them); the raw 20 MB would be a 413.
    [("gzip", gzip.compress), ("deflate", zlib.compress), ("br", zlib.compress)],
)
def test_a_compressed_body_is_415_before_anything_is_inflated(encoding: str, compress: Any) -> None:
    # A zip bomb: 20 MB of JSON whitespace compresses to ~20 kB, under the byte limit.
    bomb = compress(b"{" + b" " * 20_000_000 + b'"query": "a", "texts": ["a"]}')
    with served([FAKE]) as (url, _port, state):
        headers = {**_JSON, "content-encoding": encoding}
        response = httpx.post(url + "/rerank", content=bomb, headers=headers, timeout=30)
        assert response.status_code == 415, response.text
        assert "uncompressed" in response.json()["error"]
        assert response.json()["error_type"] == "Validation"
        # On OpenAI's paths the error is OpenAI's object, like every other error there.
        openai = httpx.post(url + "/v1/embeddings", content=bomb, headers=headers, timeout=30)
        assert openai.status_code == 415
        assert "uncompressed" in openai.json()["error"]["message"]
        assert state.metrics.rejected["invalid"] == 2
        # identity is no compression: served as usual.
        plain = httpx.post(
            url + "/rerank", content=BODY, headers={**_JSON, "content-encoding": "identity"}
        )
        assert plain.status_code == 200


# -- API key -----------------------------------------------------------------------------------


@pytest.mark.parametrize("key", ["", "   ", "\t"])
def test_a_blank_api_key_is_refused_not_silently_open(key: str) -> None:
    with pytest.raises(ConfigurationError, match="empty or blank"):
        create_app(ServerConfig(specs=[FAKE], api_key=key), pool=ModelPool())


def test_a_blank_api_key_variable_is_refused() -> None:
    config = ServerConfig.from_env(
        {"RAG_RERANK_API_KEY": "  \n", "RAG_RERANK_SPECS": json.dumps([FAKE])}
    )
    with pytest.raises(ConfigurationError, match="RAG_RERANK_API_KEY"):
        create_app(config, pool=ModelPool())


@pytest.fixture
def serve_calls(monkeypatch: pytest.MonkeyPatch) -> list[Any]:
    """``rag-rerank serve`` up to the point where it would start the server: the configs it
    would serve are recorded instead (a bad setting must stop it before that point)."""
    import rag_rerank_plugins.server.run as run

    calls: list[Any] = []

    def fake_serve(config: Any, **kwargs: Any) -> int:
        calls.append(config)
        return 0

    monkeypatch.setattr(run, "serve", fake_serve)
    return calls


@pytest.mark.parametrize("content", ["sekrit-1\nsekrit-2\n", "sekrit\x00sekrit", "\ufeffsekrit"])
def test_an_api_key_file_no_client_can_send_is_a_usage_error(
    tmp_path: Path, content: str, capsys: pytest.CaptureFixture[str], serve_calls: list[Any]
) -> None:
    key_file = tmp_path / "key"
    key_file.write_text(content, encoding="utf-8")
    with pytest.raises(SystemExit) as exit_info:
        cli_main(["serve", "--spec", json.dumps(FAKE), "--api-key-file", str(key_file)])
    assert exit_info.value.code == 2
    assert serve_calls == []
    err = capsys.readouterr().err.splitlines()[-1]
    assert "--api-key-file" in err
    assert "Authorization: Bearer" in err
    assert "sekrit" not in err, "the error must not echo the token"


def test_a_missing_api_key_file_is_a_usage_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], serve_calls: list[Any]
) -> None:
    with pytest.raises(SystemExit) as exit_info:
        cli_main(["serve", "--spec", json.dumps(FAKE), "--api-key-file", str(tmp_path / "no")])
    assert exit_info.value.code == 2
    assert serve_calls == []
    assert "cannot read --api-key-file" in capsys.readouterr().err


def test_a_good_api_key_file_is_served(tmp_path: Path, serve_calls: list[Any]) -> None:
    key_file = tmp_path / "key"
    key_file.write_text("  s3cret value-1\r\n", encoding="utf-8")  # CRLF, padding: stripped
    assert cli_main(["serve", "--spec", json.dumps(FAKE), "--api-key-file", str(key_file)]) == 0
    assert serve_calls[0].api_key == "s3cret value-1"


def test_bearer_forms_clients_send_and_a_key_with_a_trailing_newline() -> None:
    config = ServerConfig.from_env(
        {"RAG_RERANK_API_KEY": "tok-123\n", "RAG_RERANK_SPECS": json.dumps([FAKE])}
    )
    pool = ModelPool()
    with ServerThread(create_app(config, pool=pool)) as url:
        wait_until_healthy(url, timeout=30)
        for header, status in [
            ("Bearer tok-123", 200),  # openai, cohere, huggingface_hub, our remote backend
            ("bearer tok-123", 200),  # the scheme is case-insensitive (RFC 7235)
            ("Bearer  tok-123", 200),
            ("Basic tok-123", 401),
            ("tok-123", 401),
            ("Bearer tok-12", 401),
            ("Bearer tok-1234", 401),
        ]:
            response = httpx.post(
                url + "/rerank",
                content=BODY,
                headers={**_JSON, "authorization": header},
                timeout=30,
            )
            assert response.status_code == status, header
        info = httpx.get(url + "/info", headers={"authorization": "Bearer tok-123"}, timeout=10)
        assert info.json()["auth"] is True
    pool.clear()


# -- request ids -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "value",
    [b"a" * 500, "caf\u00e9".encode("latin-1"), b"id with spaces", b"x\tinjected"],
)
def test_a_hostile_request_id_is_replaced_never_reflected(value: bytes) -> None:
    with served([FAKE]) as (_url, port, _state):
        with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
            sock.sendall(b"GET /health HTTP/1.1\r\nHost: t\r\nX-Request-ID: " + value + b"\r\n\r\n")
            sock.settimeout(5)
            data = sock.recv(65536)
        head = data.split(b"\r\n\r\n", 1)[0].lower()
        ids = [line for line in head.split(b"\r\n") if line.startswith(b"x-request-id:")]
        assert len(ids) == 1, head
        assert ids[0].split(b":", 1)[1].strip() != value.lower()
        assert len(ids[0]) < 80


# -- semantic cache and start-up checks --------------------------------------------------------


def test_a_bogus_semantic_cache_store_is_refused_at_configuration() -> None:
    with pytest.raises(ConfigurationError, match="semantic_cache"):
        ServerConfig(specs=[FAKE_EMB], semantic_cache="redis://localhost")
    with pytest.raises(ConfigurationError, match="semantic_cache"):
        ServerConfig(specs=[FAKE_EMB], semantic_cache="sqlite:///")
    assert ServerConfig(specs=[FAKE_EMB], semantic_cache="sqlite:///x.db").semantic_cache


@pytest.mark.parametrize(
    ("options", "needle"),
    [
        (["--semantic-cache-embedder", "nope"], "--semantic-cache-embedder 'nope'"),
        (["--semantic-cache-guard", "rerank"], "exactly one served reranker"),
    ],
)
def test_serve_refuses_a_semantic_cache_without_its_models(
    options: list[str], needle: str, capsys: pytest.CaptureFixture[str], serve_calls: list[Any]
) -> None:
    argv = ["serve", "--spec", json.dumps(FAKE_EMB), "--semantic-cache", "memory", *options]
    assert cli_main(argv) == 1
    assert serve_calls == [], "the server must not start (it would 500 every cache request)"
    captured = capsys.readouterr()
    assert needle in captured.err
    assert "serving" not in captured.out


def test_concurrent_first_cache_requests_build_one_cache() -> None:
    from rag_rerank_plugins.server.cache_slot import built_cache

    settings = {"semantic_cache": "memory", "semantic_cache_embedder": "fake-emb"}
    with served([FAKE, FAKE_EMB], **settings) as (url, _port, state):
        assert built_cache(state) is None
        barrier = threading.Barrier(8, timeout=10)

        def put(i: int) -> int:
            barrier.wait()
            body = {"query": f"what is item number {i}", "value": i}
            return httpx.post(url + "/v1/semantic-cache/put", json=body, timeout=30).status_code

        with ThreadPoolExecutor(8) as executor:
            assert list(executor.map(put, range(8))) == [200] * 8
        cache = built_cache(state)
        assert cache is not None
        assert cache.stats()["entries"] == 8  # one cache got every put
        metrics = httpx.get(url + "/metrics", timeout=10).text
        assert "rag_rerank_semantic_cache" in metrics or "semantic" in metrics
