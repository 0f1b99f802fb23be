"""`rag-rerank serve` under failure: a 500 keeps the connection, NaN is never `null`, no circles.

* After any 500 (a backend's exception, mapped by the engine or not, or a bug in a handler) the
  client's keep-alive connection stays usable: the next request on it is answered, on the same
  socket. The 500 has the documented error shape, an ``X-Request-ID``, and the log has the
  traceback under that id.
* A NaN or infinite score or vector component is never written as JSON ``null``: it is a 500 in
  the error shape, both when a backend returns it (the engine may refuse it first) and when the
  server gets it straight from the pool (the server's own check, :func:`json_bytes`).
* The server package's imports have no circle, counting ``TYPE_CHECKING`` imports, imports
  inside functions, and the registry's loading of the built-in protocol modules by name.

Every server listens on 127.0.0.1 and every request and wait is bounded.
"""

from __future__ import annotations

import ast
import logging
import math
import re
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
pytest.importorskip("httpx")

import httpx
from pydantic import BaseModel, TypeAdapter

from rag_rerank_plugins import InferenceError, ModelPool
from rag_rerank_plugins.backends import register_backend
from rag_rerank_plugins.server import (
    Endpoint,
    ServerConfig,
    ServerProtocol,
    ServerState,
    create_app,
    register_protocol,
)
from rag_rerank_plugins.server.endpoints import json_bytes
from rag_rerank_plugins.server.registry import unregister_protocol
from rag_rerank_plugins.server.testing import ServerThread, wait_until_healthy
from rag_rerank_plugins.testing import FakeEmbedder, FakeReranker

SERVER = Path(__file__).resolve().parents[1] / "src" / "rag_rerank_plugins" / "server"

#: Bad passages: what each fake returns for a passage containing the word.
_NON_FINITE = {"nan": math.nan, "inf": math.inf}


class _RaisingReranker(FakeReranker):
    """A direct (thread-safe) backend whose own code raises a plain ValueError on 'boom'."""

    thread_safe = True

    def score_pairs(self, pairs: Sequence[tuple[str, str]], batch_size: int) -> list[float]:
        if any("boom" in passage for _, passage in pairs):
            raise ValueError("the backend's own bug")
        return super().score_pairs(pairs, batch_size)


def _bad_value(text: str) -> float | None:
    return next((value for word, value in _NON_FINITE.items() if word in text.split()), None)


class _NonFiniteReranker(FakeReranker):
    """A direct backend scoring NaN or +inf for passages containing 'nan' or 'inf'."""

    thread_safe = True

    def score_pairs(self, pairs: Sequence[tuple[str, str]], batch_size: int) -> list[float]:
        scores = super().score_pairs(pairs, batch_size)
        bad = [_bad_value(passage) for _, passage in pairs]
        return [s if b is None else b for s, b in zip(scores, bad, strict=True)]


class _NonFiniteEmbedder(FakeEmbedder):
    """A direct backend whose vector of a text containing 'nan' or 'inf' has that value."""

    thread_safe = True

    def embed(self, texts: Sequence[str], **kwargs: Any) -> list[list[float]]:
        vectors = super().embed(texts, **kwargs)
        for text, vector in zip(texts, vectors, strict=True):
            bad = _bad_value(text)
            if bad is not None:
                vector[1] = bad
        return vectors


register_backend(
    "test-robust-raising", lambda spec, pool: _RaisingReranker(), "reranker", replace=True
)
register_backend(
    "test-robust-nonfinite", lambda spec, pool: _NonFiniteReranker(), "reranker", replace=True
)
register_backend(
    "test-robust-nonfinite-emb", lambda spec, pool: _NonFiniteEmbedder(), "embedder", replace=True
)

RAISING = {"name": "raising", "model": "r", "backend": "test-robust-raising", "device": "cpu"}
NONFINITE = {"name": "nf", "model": "n", "backend": "test-robust-nonfinite", "device": "cpu"}
NONFINITE_EMB = {
    "name": "nf-emb",
    "model": "e",
    "backend": "test-robust-nonfinite-emb",
    "device": "cpu",
}
FAKE = {"name": "fake", "model": "f", "backend": "fake-reranker", "device": "cpu"}
FAKE_EMB = {"name": "fake-emb", "model": "e", "backend": "fake-embedder", "device": "cpu"}


class _UnmappingPool(ModelPool):
    """A pool that hands the server a backend's raw exception, as an engine that does not map
    foreign exceptions to ``InferenceError`` did (the reported keep-alive failure)."""

    async def ascore_pairs(
        self, spec: Any, pairs: Sequence[tuple[str, str]], *args: Any, **kwargs: Any
    ) -> list[float]:
        if any("boom" in passage for _, passage in pairs):
            raise ValueError("the backend's own bug, unmapped")
        return await super().ascore_pairs(spec, pairs, *args, **kwargs)


class _NonFinitePool(ModelPool):
    """A pool that hands the server NaN and +inf straight from the backend, past any check the
    engine makes: what the server writes is then its own responsibility."""

    async def ascore_pairs(
        self, spec: Any, pairs: Sequence[tuple[str, str]], *args: Any, **kwargs: Any
    ) -> list[float]:
        scores = await super().ascore_pairs(spec, pairs, *args, **kwargs)
        bad = [_bad_value(passage) for _, passage in pairs]
        return [s if b is None else b for s, b in zip(scores, bad, strict=True)]

    async def aembed(
        self, spec: Any, texts: Sequence[str], *args: Any, **kwargs: Any
    ) -> list[list[float]]:
        vectors = await super().aembed(spec, texts, *args, **kwargs)
        for text, vector in zip(texts, vectors, strict=True):
            bad = _bad_value(text)
            if bad is not None:
                vector[1] = bad
        return vectors


@contextmanager
def served(specs: list[dict[str, Any]], pool: ModelPool | None = None) -> Iterator[str]:
    pool = pool if pool is not None else ModelPool()
    app = create_app(ServerConfig(specs=specs, warmup=False), pool=pool)
    try:
        with ServerThread(app) as url:
            wait_until_healthy(url, timeout=30)
            yield url
    finally:
        pool.clear()


def assert_error_shape(response: httpx.Response, status: int, error_type: str) -> str:
    """The documented error body; returns its message."""
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error", "error_type", "message"}, body
    error = body["error"]
    if isinstance(error, dict):  # OpenAI's paths: OpenAI's error object
        assert response.request.url.path.endswith(("embeddings", "models")), body
        error = error["message"]
    assert error == body["message"]
    assert body["error_type"] == error_type
    return str(body["message"])


def client_port(response: httpx.Response) -> int:
    """The client-side port of the connection that carried ``response``."""
    port: int = response.extensions["network_stream"].get_extra_info("client_addr")[1]
    return port


# -- a 500 leaves the keep-alive connection usable -----------------------------------------------


class _BugRequest(BaseModel):
    query: str
    texts: list[str]


async def _buggy(body: _BugRequest, state: ServerState) -> list[float]:
    """Scores, except for a bug in the handler itself on 'boom'."""
    if "boom" in body.texts:
        raise ValueError("a bug in the handler")
    return await state.scores(state.pick("reranker", None), body.query, body.texts)


@pytest.fixture
def buggy() -> Iterator[None]:
    register_protocol(
        ServerProtocol("buggy", "Buggy", (Endpoint("POST", "/buggy", _buggy, "scores"),))
    )
    try:
        yield
    finally:
        unregister_protocol("buggy")


#: Where the 500 comes from: a direct backend raising ValueError (mapped to InferenceError by
#: the engine), the same exception reaching the server unmapped, and a bug in a handler.
SOURCES = {
    "direct-backend": (RAISING, ModelPool, "/rerank"),
    "unmapped-backend": (FAKE, _UnmappingPool, "/rerank"),
    "handler-bug": (FAKE, ModelPool, "/buggy"),
}


@pytest.mark.parametrize("source", list(SOURCES))
def test_a_500_keeps_the_connection_and_is_logged_under_its_request_id(
    source: str, buggy: None, caplog: pytest.LogCaptureFixture
) -> None:
    spec, pool_class, path = SOURCES[source]
    good = {"query": "a b", "texts": ["a", "c"]}
    bad = {"query": "a b", "texts": ["a", "boom"]}
    caplog.set_level(logging.ERROR, logger="rag_rerank_plugins")
    with served([spec], pool_class()) as url, httpx.Client(base_url=url, timeout=10) as client:
        first = client.post(path, json=good)
        assert first.status_code == 200, first.text
        port = client_port(first)
        failed = client.post(path, json=bad)
        # The next requests on the same keep-alive connection are answered (no ReadError), on
        # the same socket (a silently re-opened connection would hide the bug).
        for _ in range(2):
            after = client.post(path, json=good)
            assert after.status_code == 200, after.text
            assert client_port(after) == port
    message = assert_error_shape(failed, 500, "Backend")
    assert "ValueError" in message
    request_id = failed.headers["x-request-id"]
    assert request_id != first.headers["x-request-id"]
    logged = [r for r in caplog.records if request_id in r.getMessage()]
    assert logged, [r.getMessage() for r in caplog.records]
    assert any(r.levelno >= logging.ERROR and r.exc_info for r in logged)
    if source != "direct-backend":  # unmapped: the client can quote the id from the message
        assert request_id in message


def test_request_ids_come_from_the_client_when_plausible() -> None:
    with served([FAKE]) as url, httpx.Client(base_url=url, timeout=10) as client:
        mine = client.get("/health", headers={"x-request-id": "trace-7f3a:1"})
        assert mine.headers["x-request-id"] == "trace-7f3a:1"
        for bogus in ("x" * 200, "two words", ""):
            response = client.get("/health", headers={"x-request-id": bogus})
            assert re.fullmatch(r"[0-9a-f]{32}", response.headers["x-request-id"]), bogus
        refused = client.post("/nowhere", json={})  # answered by FastAPI's 404: has one too
        assert refused.status_code == 404
        assert re.fullmatch(r"[0-9a-f]{32}", refused.headers["x-request-id"])


# -- NaN and infinity are never written as null --------------------------------------------------

RERANK_SHAPES = {
    "tei": ("/rerank", lambda texts: {"query": "a", "texts": texts}),
    "infinity": ("/rerank", lambda texts: {"query": "a", "documents": texts}),
    "cohere": ("/v1/rerank", lambda texts: {"query": "a", "documents": texts}),
}
EMBED_SHAPES = {
    "tei": ("/embed", lambda texts: {"inputs": texts}),
    "cohere": ("/v1/embed", lambda texts: {"texts": texts}),
    "openai": ("/embeddings", lambda texts: {"input": texts}),
}


def _assert_refused_then_served(
    client: httpx.Client, path: str, body: Any, good: Any, server_message: bool
) -> None:
    refused = client.post(path, json=body)
    port = client_port(refused)
    message = assert_error_shape(refused, 500, "Backend")
    assert None not in refused.json().values()
    if server_message:  # the server's own check: names the value and where it is
        assert re.search(r"non-finite number \((NaN|infinity)\) at \S+", message), message
    served_after = client.post(path, json=good)
    assert served_after.status_code == 200, served_after.text
    assert client_port(served_after) == port


@pytest.mark.parametrize("bad", list(_NON_FINITE))
def test_non_finite_scores_from_a_direct_backend_are_an_error_not_null(bad: str) -> None:
    texts = ["a", f"b {bad}", "a c"]
    with served([NONFINITE]) as url, httpx.Client(base_url=url, timeout=10) as client:
        for path, body in RERANK_SHAPES.values():
            _assert_refused_then_served(client, path, body(texts), body(["a", "b"]), False)


@pytest.mark.parametrize("bad", list(_NON_FINITE))
def test_non_finite_vectors_from_a_direct_backend_are_an_error_not_null(bad: str) -> None:
    texts = ["a", f"b {bad}"]
    with served([NONFINITE_EMB]) as url, httpx.Client(base_url=url, timeout=10) as client:
        for path, body in EMBED_SHAPES.values():
            _assert_refused_then_served(client, path, body(texts), body(["a", "b"]), False)


@pytest.mark.parametrize("bad", list(_NON_FINITE))
def test_the_server_refuses_non_finite_numbers_on_its_own(bad: str) -> None:
    """Past the engine (the pool hands NaN and +inf over as they are): the server still never
    writes them, in any rerank or embed shape."""
    with (
        served([FAKE, FAKE_EMB], _NonFinitePool()) as url,
        httpx.Client(base_url=url, timeout=10) as client,
    ):
        shapes = [*RERANK_SHAPES.values(), *EMBED_SHAPES.values()]
        for path, body in shapes:
            _assert_refused_then_served(
                client, path, body(["a", f"b {bad}"]), body(["a", "b"]), True
            )


class _Item(BaseModel):
    index: int
    score: float
    text: str


def test_json_bytes_names_the_first_non_finite_number_and_passes_everything_else() -> None:
    items = TypeAdapter(list[_Item])
    fine = [
        _Item(index=0, score=1e308, text="NaN Infinity null"),
        _Item(index=1, score=1e308, text=""),
    ]
    # Text that reads like NaN is no number; finite scores whose sum overflows are fine.
    assert json_bytes(items, fine) == items.dump_json(fine)
    with pytest.raises(InferenceError, match=r"non-finite number \(NaN\) at \[1\]\.score"):
        json_bytes(items, [fine[0], _Item(index=1, score=math.nan, text="")])
    vectors = TypeAdapter(list[list[float]])
    with pytest.raises(InferenceError, match=r"\(-infinity\) at \[1\]\[2\]"):
        json_bytes(vectors, [[0.0, 1.0, 2.0], [0.0, 1.0, -math.inf]])
    with pytest.raises(InferenceError, match=r"\(infinity\) at the top level"):
        json_bytes(TypeAdapter(float), math.inf)
    assert json_bytes(vectors, [[0.5, -0.5], []]) == b"[[0.5,-0.5],[]]"


# -- no import circle in the server package ------------------------------------------------------


def _module_name(path: Path) -> str:
    parts = path.relative_to(SERVER.parent.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _server_imports(path: Path, name: str, modules: set[str]) -> set[str]:
    """Server modules ``path`` imports anywhere (top level, TYPE_CHECKING, functions)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    targets: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = package.split(".")
            base = base[: len(base) - node.level + 1] if node.level else []
            module = ".".join([*base, *([node.module] if node.module else [])])
            targets.add(module)
            targets.update(f"{module}.{alias.name}" for alias in node.names)
    return {t for t in targets if t in modules and t != name}


def test_the_server_package_has_no_import_circle() -> None:
    from rag_rerank_plugins.server import registry

    files = {_module_name(p): p for p in SERVER.rglob("*.py")}
    graph = {name: _server_imports(path, name, set(files)) for name, path in files.items()}
    # The registry loads the built-in protocol modules by name (importlib): an edge too.
    graph[registry.__name__] |= {f"{registry.__package__}.routers.{n}" for n in registry._BUILTIN}
    assert "rag_rerank_plugins.server.state" in graph["rag_rerank_plugins.server.app"]

    done: set[str] = set()

    def visit(name: str, trail: list[str]) -> None:
        if name in trail:
            circle = [*trail[trail.index(name) :], name]
            pytest.fail("import circle: " + " -> ".join(circle))
        if name in done:
            return
        for target in sorted(graph[name]):
            visit(target, [*trail, name])
        done.add(name)

    for name in sorted(graph):
        visit(name, [])
