"""The server's protocol registry, error shape, body timeout, ranking rule and /metrics histograms.

* A fourth protocol is one module plus one ``register_protocol`` line: a toy protocol registered
  here is served, guarded, counted and listed like the built-in ones.
* Every error (400/401/404/405/408/413/422/429/500/503) has the documented body
  ``{error, error_type, message}``, including the ones FastAPI/Starlette would answer.
* A client that sends headers and stalls gets 408 within the body timeout.
* A NaN score is never answered as null: every rerank shape answers it as a 500 in the error
  shape (tests/test_server_robustness.py has the details).
* ``/metrics`` parses with prometheus_client and has latency and queue-wait histograms per model.

Every server listens on 127.0.0.1 and every wait is bounded.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import socket
import sys
import time
import types
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("httpx")
pytest.importorskip("prometheus_client")

import httpx
from prometheus_client.parser import text_string_to_metric_families
from pydantic import BaseModel

from rag_rerank_plugins import ConfigurationError, ModelPool
from rag_rerank_plugins.backends import register_backend
from rag_rerank_plugins.server import (
    Endpoint,
    ServerConfig,
    ServerProtocol,
    ServerState,
    create_app,
    register_protocol,
)
from rag_rerank_plugins.server.registry import describe, protocols, unregister_protocol
from rag_rerank_plugins.server.testing import ServerThread, wait_until_healthy
from rag_rerank_plugins.testing import FakeEmbedder, FakeReranker

FAKE = {"name": "fake", "model": "f", "backend": "fake-reranker", "device": "cpu"}
DOCS = Path(__file__).resolve().parents[1] / "docs"


class _NanReranker(FakeReranker):
    """Scores like the fake, except NaN for passages containing 'nan'."""

    def score_pairs(self, pairs: Sequence[tuple[str, str]], batch_size: int) -> list[float]:
        scores = super().score_pairs(pairs, batch_size)
        return [math.nan if "nan" in p else s for (_, p), s in zip(pairs, scores, strict=True)]


class _ScheduledReranker(FakeReranker):
    thread_safe = False  # served by a scheduler, which records latency and queue wait


class _ScheduledEmbedder(FakeEmbedder):
    thread_safe = False


register_backend("test-nan-reranker", lambda spec, pool: _NanReranker(), "reranker", replace=True)
register_backend(
    "test-scheduled-reranker", lambda spec, pool: _ScheduledReranker(), "reranker", replace=True
)
register_backend(
    "test-scheduled-embedder", lambda spec, pool: _ScheduledEmbedder(), "embedder", replace=True
)


@contextmanager
def served(specs: list[dict[str, Any]], **settings: Any) -> Iterator[str]:
    pool = ModelPool()
    app = create_app(ServerConfig(specs=specs, **settings), pool=pool)
    with ServerThread(app) as url:
        wait_until_healthy(url, timeout=30)
        yield url
    pool.clear()


def assert_error_shape(response: httpx.Response, status: int, error_type: str) -> dict[str, str]:
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error", "error_type", "message"}, body
    error = body["error"]
    if isinstance(error, dict):  # OpenAI's paths: OpenAI's error object
        assert response.request.url.path.endswith(("embeddings", "models")), body
        error = error["message"]
    assert error == body["message"]
    assert body["error_type"] == error_type
    return body


# -- a fourth protocol: one module plus one registry line -----------------------------------------


class ToyRerankRequest(BaseModel):
    question: str
    passages: list[str]


class ToyRerankResponse(BaseModel):
    best: int
    scores: list[float]


async def toy_rerank(body: ToyRerankRequest, state: ServerState) -> ToyRerankResponse:
    """The whole protocol: pick the model, score through the shared pool, shape the answer."""
    if not body.question.strip():
        from starlette.exceptions import HTTPException

        raise HTTPException(400, "question is blank")  # Starlette's own error, our shape
    if body.question == "boom":
        raise ValueError("a bug in the handler")  # not ours to map: 500, still our shape
    model = state.pick("reranker", None)
    scores = await state.scores(model, body.question, body.passages)
    return ToyRerankResponse(best=max(range(len(scores)), key=scores.__getitem__), scores=scores)


TOY = ServerProtocol(
    name="toy",
    title="Toy protocol",
    endpoints=(Endpoint("POST", "/toy/rerank", toy_rerank, "{question, passages} -> {best}"),),
)


@pytest.fixture
def toy() -> Iterator[ServerProtocol]:
    register_protocol(TOY)
    try:
        yield TOY
    finally:
        unregister_protocol("toy")
    assert "toy" not in [p.name for p in protocols()]


def test_a_registered_protocol_is_served_guarded_counted_and_listed(toy: ServerProtocol) -> None:
    assert "POST /toy/rerank" in re.sub(r" +", " ", describe())
    with served([FAKE], api_key="tok") as url:
        auth = {"authorization": "Bearer tok"}
        body = {"question": "a b", "passages": ["c", "a b", "a"]}
        response = httpx.post(url + "/toy/rerank", json=body, headers=auth, timeout=10)
        assert response.status_code == 200, response.text
        assert response.json() == {"best": 1, "scores": [0.0, 1.0, 0.5]}
        assert_error_shape(
            httpx.post(url + "/toy/rerank", json=body, timeout=10), 401, "Unauthorized"
        )
        blank = httpx.post(url + "/toy/rerank", json={**body, "question": " "}, headers=auth)
        assert "blank" in assert_error_shape(blank, 400, "Validation")["error"]
        boom = httpx.post(url + "/toy/rerank", json={**body, "question": "boom"}, headers=auth)
        assert "ValueError" in assert_error_shape(boom, 500, "Backend")["error"]
        invalid = httpx.post(url + "/toy/rerank", json={"question": "q"}, headers=auth)
        assert "passages" in assert_error_shape(invalid, 422, "Validation")["error"]
        schema = httpx.get(url + "/openapi.json", headers=auth, timeout=10).json()
        assert "/toy/rerank" in schema["paths"]
        metrics = httpx.get(url + "/metrics", headers=auth, timeout=10).text
    counted = {
        (s.labels["endpoint"], s.labels["status"]): s.value
        for family in text_string_to_metric_families(metrics)
        for s in family.samples
        if s.name == "rag_rerank_http_requests_total"
    }
    # Counted under its own path (a known path), not lumped into "other".
    assert counted[("/toy/rerank", "200")] == 1
    assert counted[("/toy/rerank", "401")] == 1
    assert counted[("/toy/rerank", "500")] == 1


def test_serve_help_lists_the_registered_protocols(toy: ServerProtocol) -> None:
    from rag_rerank_plugins.cli import build_parser

    parser = build_parser()
    [subcommands] = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    text = subcommands.choices["serve"].format_help()
    for protocol in protocols():
        assert protocol.title in text
        for endpoint in protocol.endpoints:
            assert re.search(rf"{endpoint.method} +{re.escape(endpoint.path)} ", text), endpoint
    assert "Toy protocol" in text


def test_a_path_belongs_to_one_protocol(toy: ServerProtocol) -> None:
    clash = ServerProtocol("clash", "Clash", (Endpoint("POST", "/rerank", toy_rerank, "x"),))
    with pytest.raises(ConfigurationError, match=r"POST /rerank .* protocol 'tei'"):
        register_protocol(clash)
    with pytest.raises(ConfigurationError, match="registered already"):
        register_protocol(TOY)


def test_the_extending_guide_example_is_served(monkeypatch: pytest.MonkeyPatch) -> None:
    """The worked example of docs/guides/extending.md, run as written (as a module)."""
    text = (DOCS / "guides" / "extending.md").read_text()
    section = text[text.index("## Adding a server protocol") :]
    module_code = re.findall(r"```python\n(.*?)```", section, flags=re.DOTALL)[0]
    module = types.ModuleType("hf_similarity_example")
    monkeypatch.setitem(sys.modules, module.__name__, module)
    exec(compile(module_code, "docs/guides/extending.md", "exec"), module.__dict__)
    protocol: ServerProtocol = module.PROTOCOL
    register_protocol(protocol)
    try:
        emb = {"name": "emb", "model": "e", "backend": "fake-embedder", "device": "cpu"}
        with served([FAKE, emb]) as url:
            inputs = {"source_sentence": "red apple", "sentences": ["red apple", "blue sky"]}
            response = httpx.post(url + "/similarity", json={"inputs": inputs}, timeout=10)
            assert response.status_code == 200, response.text
            same, other = response.json()
            assert same == pytest.approx(1.0)
            assert other < 0.99
            bad = httpx.post(url + "/similarity", json={"inputs": {"sentences": []}}, timeout=10)
            assert "source_sentence" in assert_error_shape(bad, 422, "Validation")["error"]
    finally:
        unregister_protocol(protocol.name)


def test_the_docs_endpoint_table_lists_every_registered_endpoint() -> None:
    text = (DOCS / "deployment.md").read_text()
    table = text[text.index("### Endpoints") : text.index("### Limits and status codes")]
    for protocol in protocols():
        for endpoint in protocol.endpoints:
            assert (
                re.search(rf"`{endpoint.method} [^`]*{re.escape(endpoint.path)}[`,]", table)
                or f"`{endpoint.path}`" in table
            ), (endpoint.method, endpoint.path)


# -- the documented error shape -------------------------------------------------------------------


def test_unknown_paths_and_methods_answer_in_the_error_shape() -> None:
    with served([FAKE]) as url:
        missing = httpx.get(url + "/nope", timeout=10)
        assert "/docs" in assert_error_shape(missing, 404, "NotFound")["error"]
        wrong = httpx.get(url + "/rerank", timeout=10)
        assert (
            "GET is not allowed on /rerank"
            in assert_error_shape(wrong, 405, "MethodNotAllowed")["error"]
        )
        no_model = httpx.post(url + "/embed", json={"inputs": ["a"]}, timeout=10)
        assert_error_shape(no_model, 404, "NotFound")
        invalid = httpx.post(url + "/rerank", json={"texts": ["a"]}, timeout=10)
        assert_error_shape(invalid, 422, "Validation")
        # A trailing slash: a 404 in the shape, not a bodiless 307 to the client's Host header.
        for method, path in (("GET", "/health/"), ("POST", "/rerank/")):
            slashed = httpx.request(
                method, url + path, json={}, headers={"host": "evil.example"}, timeout=10
            )
            assert "location" not in slashed.headers
            assert_error_shape(slashed, 404, "NotFound")


# -- a stalled body -------------------------------------------------------------------------------


def test_a_client_that_stalls_after_its_headers_gets_408() -> None:
    with served([FAKE], body_timeout=0.5) as url:
        host, port = url.removeprefix("http://").split(":")
        with socket.create_connection((host, int(port)), timeout=10) as sock:
            sock.sendall(
                b"POST /rerank HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                b'Content-Length: 200\r\n\r\n{"query": "a", "te'
            )
            start = time.monotonic()
            answer = b""
            while b"\r\n\r\n" not in answer or not answer.rstrip().endswith(b"}"):
                chunk = sock.recv(4096)  # bounded by the socket timeout (10 s)
                if not chunk:
                    break
                answer += chunk
            waited = time.monotonic() - start
        head, _, payload = answer.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 408"), answer[:200]
        assert 0.4 <= waited < 5, waited
        assert b"connection: close" in head.lower()
        body = json.loads(payload)
        assert body["error_type"] == "Timeout"
        assert body["error"] == body["message"]
        assert "RAG_RERANK_BODY_TIMEOUT" in body["error"]
        # The server is still fine for everyone else.
        ok = httpx.post(url + "/rerank", json={"query": "a", "texts": ["a"]}, timeout=10)
        assert ok.status_code == 200


def test_body_timeout_must_be_positive() -> None:
    with pytest.raises(ConfigurationError, match="body_timeout"):
        ServerConfig.from_env({"RAG_RERANK_RERANKERS": "x", "RAG_RERANK_BODY_TIMEOUT": "0"})


# -- ranking ------------------------------------------------------------------------------------


def test_nan_scores_are_an_error_not_null_in_every_rerank_shape() -> None:
    nan = {"name": "nan", "model": "n", "backend": "test-nan-reranker", "device": "cpu"}
    texts = ["a nan", "b", "a"]  # fake scores: NaN, 0, 1
    with served([nan]) as url:
        for path, body in (
            ("/rerank", {"query": "a", "texts": texts}),  # TEI
            ("/rerank", {"query": "a", "documents": texts}),  # infinity
            ("/v1/rerank", {"query": "a", "documents": texts}),  # Cohere
        ):
            response = httpx.post(url + path, json=body, timeout=10)
            assert "nan" in assert_error_shape(response, 500, "Backend")["message"].lower()
        fine = httpx.post(url + "/rerank", json={"query": "a", "texts": texts[1:]}, timeout=10)
        assert fine.json() == [{"index": 1, "score": 1.0}, {"index": 0, "score": 0.0}]


# -- /metrics -------------------------------------------------------------------------------------


def test_metrics_has_latency_and_queue_wait_histograms_per_model() -> None:
    specs = [
        {"name": "sched-r", "model": "r", "backend": "test-scheduled-reranker", "device": "cpu"},
        {"name": "sched-e", "model": "e", "backend": "test-scheduled-embedder", "device": "cpu"},
    ]
    reranks, embeds = 5, 3
    with served(specs, warmup=False) as url:
        for i in range(reranks):  # distinct texts: no cache could answer for the model
            response = httpx.post(
                url + "/rerank", json={"query": f"q{i}", "texts": [f"t{i}", "u"]}, timeout=10
            )
            assert response.status_code == 200
        for i in range(embeds):
            assert httpx.post(url + "/embed", json={"inputs": [f"e{i}"]}, timeout=10).is_success
        text = httpx.get(url + "/metrics", timeout=10).text
    families = {f.name: f for f in text_string_to_metric_families(text)}
    for metric in ("rag_rerank_model_latency_seconds", "rag_rerank_model_queue_wait_seconds"):
        family = families[metric]
        assert family.type == "histogram"
        for model, expected in (("sched-r", reranks), ("sched-e", embeds)):
            samples = [s for s in family.samples if s.labels["model"] == model]
            buckets = [s for s in samples if s.name == metric + "_bucket"]
            assert len(buckets) >= 10
            counts = [s.value for s in buckets]
            assert counts == sorted(counts), "buckets are cumulative"
            assert buckets[-1].labels["le"] == "+Inf"
            assert buckets[-1].value == expected, (metric, model)
            [count] = [s.value for s in samples if s.name == metric + "_count"]
            assert count == expected
            [total] = [s.value for s in samples if s.name == metric + "_sum"]
            assert total >= 0
    calls = {
        s.labels["model"]: s.value
        for s in families["rag_rerank_model_calls"].samples
        if s.name == "rag_rerank_model_calls_total"
    }
    assert calls == {"sched-r": reranks, "sched-e": embeds}
    for name in ("rag_rerank_model_evictions", "rag_rerank_model_footprint_bytes"):
        assert name in families, name
