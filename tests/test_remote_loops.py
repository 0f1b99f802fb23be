"""Remote backends and event loops: each loop's ``httpx.AsyncClient`` lives and dies with it.

Against a real keep-alive HTTP/1.1 server on 127.0.0.1 (real sockets, so they can be counted):
``asyncio.run`` after ``asyncio.run`` must leave no client, loop or socket behind, while one loop
(a long-lived server's) keeps reusing its pooled connection. Open sockets are counted from
``/proc`` (Linux), live clients and loops with ``gc``.
"""

from __future__ import annotations

import asyncio
import gc
import json
import os
import sys
import threading
from collections.abc import Iterator
from concurrent.futures import Future
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest

pytest.importorskip("httpx")

import httpx

from rag_rerank_plugins import ModelPool, ModelSpec

pytestmark = pytest.mark.skipif(
    not sys.platform.startswith("linux"), reason="counts sockets through /proc"
)

PAIRS = [("q", "a"), ("q", "b")]
RUNS = 100


@dataclass
class Server:
    url: str
    port: int
    connections: int = 0  # TCP connections accepted so far
    lock: threading.Lock = field(default_factory=threading.Lock)


@pytest.fixture
def server() -> Iterator[Server]:
    """A TEI-speaking server that keeps connections alive (HTTP/1.1), counting connections."""
    state = Server("", 0)

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"
        disable_nagle_algorithm = True  # headers and body go out at once: no delayed-ACK stall

        def log_message(self, *args: Any) -> None:
            pass

        def setup(self) -> None:
            super().setup()
            with state.lock:
                state.connections += 1

        def do_GET(self) -> None:
            self._answer(404, {"error": "no /info here"})

        def do_POST(self) -> None:
            body = json.loads(self.rfile.read(int(self.headers.get("content-length", 0))))
            if self.path == "/rerank":
                self._answer(200, [{"index": i, "score": 0.5} for i in range(len(body["texts"]))])
            else:
                self._answer(200, [[1.0, 0.0] for _ in body["inputs"]])

        def _answer(self, status: int, payload: Any) -> None:
            raw = json.dumps(payload).encode()
            self.send_response(status)
            self.send_header("content-length", str(len(raw)))
            self.end_headers()
            self.wfile.write(raw)

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    httpd.daemon_threads = True
    state.port = httpd.server_address[1]
    state.url = f"http://127.0.0.1:{state.port}"
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05})
    thread.start()
    yield state
    httpd.shutdown()
    httpd.server_close()
    thread.join()


def reranker(url: str) -> ModelSpec:
    return ModelSpec(url, backend="remote-reranker", device="cpu", dtype="float32")


def embedder(url: str) -> ModelSpec:
    return ModelSpec(url, backend="remote-embedder", device="cpu", dtype="float32")


def client_sockets(port: int) -> int:
    """This process's open TCP sockets connected to ``port`` (the client ends only)."""
    inodes = set()
    for fd in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:  # closed meanwhile
            continue
        if target.startswith("socket:["):
            inodes.add(target[len("socket:[") : -1])
    with open("/proc/self/net/tcp", encoding="ascii") as table:
        rows = [line.split() for line in table.read().splitlines()[1:]]
    return sum(1 for row in rows if row[9] in inodes and int(row[2].split(":")[1], 16) == port)


def census(port: int) -> tuple[int, int, int]:
    """(open client sockets, live AsyncClients, live event loops), after a full collection."""
    gc.collect()
    objects = gc.get_objects()
    clients = sum(1 for o in objects if isinstance(o, httpx.AsyncClient))
    loops = sum(1 for o in objects if isinstance(o, asyncio.AbstractEventLoop))
    return client_sockets(port), clients, loops


def open_async_clients() -> list[Any]:
    gc.collect()
    return [o for o in gc.get_objects() if isinstance(o, httpx.AsyncClient) and not o.is_closed]


def test_asyncio_run_leaves_no_client_loop_or_socket(pool: ModelPool, server: Server) -> None:
    """Each ``asyncio.run`` closes the client it built, with its sockets, and frees its loop."""
    rerank, embed = reranker(server.url), embedder(server.url)
    assert pool.score_pairs(rerank, PAIRS) == [0.5, 0.5]  # loads both models, sync path
    assert len(pool.embed(embed, ["a"])) == 1
    sockets, clients, loops = census(server.port)
    for n in range(RUNS):
        if n % 2:
            assert asyncio.run(pool.ascore_pairs(rerank, PAIRS)) == [0.5, 0.5]
        else:
            assert len(asyncio.run(pool.aembed(embed, ["a", "b"]))) == 2
    assert census(server.port) == (sockets, clients, loops), (
        "(sockets, AsyncClients, loops) grew over asyncio.run calls"
    )
    assert server.connections >= RUNS  # one connection per loop: none outlives its loop


def test_one_loop_keeps_reusing_its_connection(pool: ModelPool, server: Server) -> None:
    rerank = reranker(server.url)
    pool.score_pairs(rerank, PAIRS)  # the sync client's connection
    before = server.connections

    async def many() -> tuple[int, int]:
        for _ in range(20):
            assert await pool.ascore_pairs(rerank, PAIRS) == [0.5, 0.5]
        await asyncio.gather(*(pool.ascore_pairs(rerank, PAIRS) for _ in range(4)))
        return server.connections - before, client_sockets(server.port)

    opened, open_now = asyncio.run(many())
    assert 1 <= opened <= 4, "sequential calls on one loop reuse one pooled connection"
    assert open_now == opened + 1, "the loop's connections stay pooled (plus the sync one)"
    assert client_sockets(server.port) == 1  # only the sync client's, after the loop closed


def test_long_lived_loop_keeps_its_client_until_release(pool: ModelPool, server: Server) -> None:
    """A server's loop in its own thread keeps one client and connection across calls, while
    short-lived loops come and go; releasing the model closes it on that loop."""
    rerank = reranker(server.url)
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever)
    thread.start()
    try:

        def on_loop() -> list[float]:
            future: Future[list[float]] = asyncio.run_coroutine_threadsafe(
                pool.ascore_pairs(rerank, PAIRS), loop
            )
            return future.result(timeout=10)

        assert on_loop() == [0.5, 0.5]
        opened = server.connections
        for n in range(1, 6):
            asyncio.run(pool.ascore_pairs(rerank, PAIRS))  # a connection of its own, each time
            assert on_loop() == [0.5, 0.5]
            assert server.connections == opened + n, "the long-lived loop reuses its connection"
        assert client_sockets(server.port) == 1, "only the long-lived loop's connection is open"
        assert len(open_async_clients()) == 1

        assert pool.release(rerank)
        asyncio.run_coroutine_threadsafe(asyncio.sleep(0.05), loop).result(timeout=10)
        assert open_async_clients() == [], "release closes the client on its (running) loop"
        assert client_sockets(server.port) == 0
    finally:
        loop.call_soon_threadsafe(loop.stop)
        thread.join(timeout=10)
        loop.run_until_complete(loop.shutdown_asyncgens())
        loop.close()
    assert census(server.port)[:2] == (0, 0)


@pytest.mark.filterwarnings("ignore::ResourceWarning")  # sockets closed by collection
def test_loops_closed_without_shutdown_leave_at_most_one_client(
    pool: ModelPool, server: Server
) -> None:
    """A hand-driven loop closed without ``shutdown_asyncgens()``: its client is dropped when
    the next one is built (its sockets close when collected), so they do not pile up."""
    rerank = reranker(server.url)
    pool.get(rerank)
    sockets, clients, loops = census(server.port)
    for _ in range(10):
        loop = asyncio.new_event_loop()
        loop.run_until_complete(pool.ascore_pairs(rerank, PAIRS))
        loop.close()
    del loop
    after = census(server.port)
    assert after[0] <= sockets + 1, "sockets of closed loops piled up"
    assert after[1] <= clients + 1, "AsyncClients of closed loops piled up"
    assert after[2] <= loops + 1, "closed loops piled up"
    pool.release(rerank)
    assert census(server.port) == (sockets, clients, loops)


def test_a_loop_s_client_reuses_the_tls_context_built_at_load(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Each event loop gets its own httpx client; building one loaded the CA bundle (40-120 ms)
    on the loop itself, every ``asyncio.run``. The context is now built once, at load."""
    import ssl

    from rag_rerank_plugins.backends.remote.client import RemoteClient
    from rag_rerank_plugins.backends.remote.protocols import get_protocol
    from rag_rerank_plugins.backends.remote.settings import RemoteSettings

    spec = ModelSpec("https://127.0.0.1:9", backend="remote-reranker", device="cpu")
    client = RemoteClient(RemoteSettings.from_spec(spec), "test", get_protocol("tei"))
    built: list[object] = []
    real = ssl.create_default_context

    def counting(*args: Any, **kwargs: Any) -> ssl.SSLContext:
        built.append(args)
        return real(*args, **kwargs)

    monkeypatch.setattr(ssl, "create_default_context", counting)

    async def on_a_loop() -> None:
        await client.async_client()

    for _ in range(3):  # three loops, three clients
        asyncio.run(on_a_loop())
    assert built == []
    client.close()
