"""The server's app run by something other than ``rag-rerank serve``: a proxy or a parent app.

Ray Serve (docs/deployment.md) and a user's own FastAPI app run our ASGI app with a path prefix
(``root_path``: Ray's ``route_prefix``, ``parent.mount("/rr", app)``), cancel a request's task
when its client leaves, and set headers of their own. The prefix must not change what the app
answers (public health probes, OpenAI's 400s, per-endpoint metrics), a cancelled request is a
499 (not the 503 of a server shutting down), and ``X-Request-ID`` appears once.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("httpx")

import httpx
from fastapi import FastAPI

from rag_rerank_plugins import ModelPool
from rag_rerank_plugins.server import ServerConfig, create_app
from rag_rerank_plugins.server.errors import route_path

FAKE = {"name": "fake", "model": "f", "backend": "fake-reranker", "device": "cpu"}
FAKE_EMB = {"name": "e", "model": "e", "backend": "fake-embedder", "device": "cpu"}
TOKEN = {"authorization": "Bearer sekret"}


@pytest.mark.parametrize(
    ("path", "root", "inside"),
    [
        ("/rr/health", "/rr", "/health"),
        ("/rr", "/rr", "/"),
        ("/rr/", "/rr/", "/"),
        ("/rrx/health", "/rr", "/rrx/health"),  # another prefix that starts alike
        ("/health", "", "/health"),
        ("/health", "/rr", "/health"),  # a server that strips the prefix itself
    ],
)
def test_route_path_drops_only_a_whole_root_path(path: str, root: str, inside: str) -> None:
    assert route_path({"path": path, "root_path": root}) == inside


@asynccontextmanager
async def mounted(prefix: str, **settings: Any) -> AsyncIterator[tuple[httpx.AsyncClient, Any]]:
    """Our app mounted under ``prefix`` in a user's FastAPI app, its lifespan run from the
    parent's (docs/deployment.md): a client on the parent and our server state."""
    pool = ModelPool()
    api = create_app(ServerConfig(specs=[FAKE_EMB], **settings), pool=pool)

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        async with api.router.lifespan_context(api):
            yield

    parent = FastAPI(lifespan=lifespan)
    parent.mount(prefix, api)
    state = api.state.server
    try:
        async with parent.router.lifespan_context(parent):
            for _ in range(500):
                if state.status == "ok":
                    break
                await asyncio.sleep(0.01)
            assert state.status == "ok"
            transport = httpx.ASGITransport(app=parent)
            async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
                yield client, state
    finally:
        await asyncio.to_thread(pool.clear)


async def test_a_mounted_app_answers_as_at_the_root() -> None:
    async with mounted("/rr", api_key="sekret") as (client, state):
        health = await client.get("/rr/health")  # probes carry no token
        assert health.status_code == 200, health.text
        assert health.json()["status"] == "ok"
        assert len(health.headers.get_list("x-request-id")) == 1
        bad = await client.post(
            "/rr/v1/embeddings", json={"model": "e", "input": []}, headers=TOKEN
        )
        assert bad.status_code == 400, bad.text  # OpenAI answers 400, and the SDK reads error{}
        assert isinstance(bad.json()["error"], dict)
        assert bad.json()["error"]["type"] == "invalid_request_error"
        good = await client.post(
            "/rr/v1/embeddings", json={"model": "e", "input": ["a"]}, headers=TOKEN
        )
        assert good.status_code == 200, good.text
        assert (await client.get("/rr/info")).status_code == 401  # private paths stay private
        requests = state.metrics.snapshot()[0]
    assert requests[("/v1/embeddings", 400)] == 1
    assert requests[("/v1/embeddings", 200)] == 1
    assert requests[("/health", 200)] == 1
    assert not any(endpoint == "other" for endpoint, _ in requests), requests


async def test_a_request_a_proxy_cancels_counts_as_499_not_a_shutdown_503() -> None:
    """Ray Serve cancels the request's task when its client disconnects or its
    ``request_timeout_s`` passes; that was counted as a 503 "shutting down" (5xx alerts for
    client timeouts). uvicorn's own cancellation at the end of its graceful timeout names the
    shutdown, and stays a 503 (tests/test_server.py)."""
    slow = {**FAKE, "options": {"delay_ms": 2000}}
    pool = ModelPool()
    app = create_app(ServerConfig(specs=[slow]), pool=pool)
    state = app.state.server
    sent: list[dict[str, Any]] = []
    body = json.dumps({"query": "q", "texts": ["a"]}).encode()
    messages = [{"type": "http.request", "body": body, "more_body": False}]

    async def receive() -> dict[str, Any]:
        if messages:
            return messages.pop()
        await asyncio.sleep(3600)  # no disconnect: the proxy cancels instead
        raise AssertionError("unreachable")

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "POST",
        "scheme": "http",
        "path": "/rerank",
        "raw_path": b"/rerank",
        "root_path": "",
        "query_string": b"",
        "headers": [(b"content-type", b"application/json"), (b"host", b"t")],
        "client": ("127.0.0.1", 1),
        "server": ("127.0.0.1", 2),
    }
    try:
        async with app.router.lifespan_context(app):
            while state.status != "ok":
                await asyncio.sleep(0.05)
            task = asyncio.create_task(app(scope, receive, send))
            await asyncio.sleep(0.3)
            task.cancel()  # as Ray's proxy does: no message
            with pytest.raises(asyncio.CancelledError):
                await task
            requests = state.metrics.snapshot()[0]
    finally:
        await asyncio.to_thread(pool.clear)
    assert requests.get(("/rerank", 499)) == 1, requests
    assert ("/rerank", 503) not in requests, requests
    assert not sent  # nobody is there to read an answer
