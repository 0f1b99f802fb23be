"""`rag-rerank serve`: endpoints, status codes (200/401/404/413/422/429/503), metrics, shutdown.

Every server here listens on 127.0.0.1 only, and every wait or request loop is bounded in count
and time. Real models (tiny cross-encoder, MiniLM) run in the session's ``model_server``; limit
and failure paths use the dependency-free fake backends.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from typing import Any

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
pytest.importorskip("httpx")

import httpx

from rag_rerank_plugins import ConfigurationError, ModelPool
from rag_rerank_plugins.backends import register_backend
from rag_rerank_plugins.server import ServerConfig, create_app
from rag_rerank_plugins.server.testing import ServerThread, wait_until_healthy
from rag_rerank_plugins.testing import FakeReranker

QUERY = "which organelle produces ATP?"
FAKE = {"name": "fake", "model": "f", "backend": "fake-reranker", "device": "cpu"}
FAKE_EMB = {"name": "fake-emb", "model": "e", "backend": "fake-embedder", "device": "cpu"}

_GATE = threading.Event()


def _gated_loader(spec: Any, pool: Any) -> FakeReranker:
    _GATE.wait(20)
    return FakeReranker()


def _failing_loader(spec: Any, pool: Any) -> FakeReranker:
    raise RuntimeError("weights are corrupt")


register_backend("test-gated-reranker", _gated_loader, "reranker", replace=True)
register_backend("test-failing-reranker", _failing_loader, "reranker", replace=True)


@contextmanager
def fake_server(
    specs: list[dict[str, Any]] | None = None, *, wait: bool = True, **settings: Any
) -> Iterator[tuple[str, Any]]:
    pool = ModelPool()
    config = ServerConfig(specs=specs if specs is not None else [FAKE, FAKE_EMB], **settings)
    app = create_app(config, pool=pool)
    server = ServerThread(app)
    url = server.start()
    try:
        if wait:
            wait_until_healthy(url, timeout=30)
        yield url, app.state.server
    finally:
        _GATE.set()
        server.stop()
        pool.clear()


@pytest.fixture(scope="module")
def fake_url() -> Iterator[str]:
    """A fake-model server shared by the request-validation tests."""
    with fake_server() as (url, _state):
        yield url


def _post(url: str, path: str, body: Any, **kwargs: Any) -> httpx.Response:
    return httpx.post(url + path, json=body, timeout=30, **kwargs)


# -- results equal local results ---------------------------------------------------------------


def test_tei_rerank_equals_local_cross_encoder(
    model_server, direct_cross_encoder, passages: list[str]
) -> None:
    response = _post(model_server.url, "/rerank", {"query": QUERY, "texts": passages})
    assert response.status_code == 200
    body = response.json()
    ref = direct_cross_encoder.predict([(QUERY, p) for p in passages], show_progress_bar=False)
    assert [item["index"] for item in body] == sorted(
        range(len(passages)), key=lambda i: (-ref[i], i)
    ), "TEI answers best first"
    for item in body:
        assert item["score"] == pytest.approx(float(ref[item["index"]]), abs=1e-6)
        assert "text" not in item
    with_text = _post(
        model_server.url, "/rerank", {"query": QUERY, "texts": passages[:2], "return_text": True}
    ).json()
    assert {item["text"] for item in with_text} == set(passages[:2])


def test_infinity_and_cohere_rerank_shapes(
    model_server, direct_cross_encoder, passages: list[str]
) -> None:
    ref = direct_cross_encoder.predict([(QUERY, p) for p in passages], show_progress_bar=False)
    best = int(max(range(len(passages)), key=lambda i: ref[i]))
    infinity = _post(
        model_server.url,
        "/rerank",
        {"model": "tiny-ce", "query": QUERY, "documents": passages, "return_documents": True},
    ).json()
    assert infinity["model"] == "tiny-ce"
    assert infinity["results"][0]["index"] == best
    assert infinity["results"][0]["document"] == passages[best]
    cohere = _post(
        model_server.url,
        "/v1/rerank",
        {
            "model": "rerank-english-v3.0",  # one reranker served: any name selects it
            "query": QUERY,
            "documents": [{"text": p} for p in passages],
            "top_n": 3,
            "return_documents": True,
        },
    ).json()
    assert len(cohere["results"]) == 3
    assert cohere["results"][0] == {
        "index": best,
        "relevance_score": pytest.approx(float(ref[best]), abs=1e-6),
        "document": {"text": passages[best]},
    }
    assert cohere["id"]
    assert "meta" in cohere


def test_embed_equals_local_sentence_transformer(
    model_server, direct_embedder, passages: list[str]
) -> None:
    vectors = _post(model_server.url, "/embed", {"inputs": passages}).json()
    ref = direct_embedder.encode(passages, normalize_embeddings=True)
    assert len(vectors) == len(passages)
    for got, want in zip(vectors, ref, strict=True):
        assert got == pytest.approx(want.tolist(), abs=1e-5)
    single = _post(model_server.url, "/embed", {"inputs": passages[0], "prompt_name": "query"})
    assert single.json()[0] == pytest.approx(ref[0].tolist(), abs=1e-5)
    cohere = _post(
        model_server.url,
        "/v1/embed",
        {"texts": passages[:2], "input_type": "search_query", "embedding_types": ["float"]},
    ).json()
    assert cohere["embeddings"]["float"][1] == pytest.approx(ref[1].tolist(), abs=1e-5)
    openai = _post(model_server.url, "/v1/embeddings", {"input": passages[:3]}).json()
    assert [d["index"] for d in openai["data"]] == [0, 1, 2]
    assert openai["data"][2]["embedding"] == pytest.approx(ref[2].tolist(), abs=1e-5)


@pytest.mark.parametrize("path", ["/v1/embed", "/v2/embed"])
def test_cohere_truncate_none_413_gives_cohere_advice(model_server, path: str) -> None:
    """A too-long text under Cohere's ``truncate: "NONE"`` is a 413 whose advice the same
    endpoint accepts: it told clients to send TEI's ``truncate=true`` and
    ``truncation_direction``, which Cohere's endpoints refuse as unknown fields."""
    body = {"texts": ["word " * 600], "truncate": "NONE", "input_type": "search_document"}
    refused = _post(model_server.url, path, body)
    assert refused.status_code == 413
    message = refused.json()["message"]
    assert "truncate='END'" in message
    assert "truncation_direction" not in message
    for advice in ("END", "START"):
        assert _post(model_server.url, path, {**body, "truncate": advice}).status_code == 200


def test_health_info_and_metrics(model_server) -> None:
    health = httpx.get(model_server.url + "/health", timeout=10)
    assert health.status_code == 200
    assert health.json() == {"status": "ok", "models": ["tiny-ce", "minilm"]}
    info = httpx.get(model_server.url + "/info", timeout=10).json()
    assert [(m["name"], m["kind"], m["device"], m["dtype"]) for m in info["models"]] == [
        ("tiny-ce", "reranker", "cpu", "float32"),
        ("minilm", "embedder", "cpu", "float32"),
    ]
    assert info["max_client_batch_size"] == 64
    _post(model_server.url, "/rerank", {"query": "q", "texts": ["a"]})
    response = httpx.get(model_server.url + "/metrics", timeout=10)
    assert response.headers["content-type"].startswith("text/plain; version=0.0.4")
    samples = _samples(response.text)
    assert samples[("rag_rerank_model_loads_total", "tiny-ce")] == 1
    assert samples[("rag_rerank_model_loads_total", "minilm")] == 1
    assert samples[("rag_rerank_model_calls_total", "tiny-ce")] >= 1
    assert samples[("rag_rerank_http_requests_total", "/rerank 200")] >= 1
    assert samples[("rag_rerank_ready", "")] == 1


def _samples(text: str) -> dict[tuple[str, str], float]:
    """``(sample name, model or 'endpoint status' or le) -> value`` of a /metrics body, parsed
    by prometheus_client's own parser (so the body is valid exposition text)."""
    from prometheus_client.parser import text_string_to_metric_families

    out: dict[tuple[str, str], float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            labels = sample.labels
            key = labels.get("model") or " ".join(
                labels[k] for k in ("endpoint", "status", "reason") if k in labels
            )
            if "le" in labels:
                key += f" le={labels['le']}"
            out[(sample.name, key)] = sample.value
    return out


def test_names_served_by_one_model_share_its_metric_row_under_both_names() -> None:
    """Two served names for one spec are one pool slot with one set of counters: the row used
    to carry whichever name came last; it names both."""
    specs = [{**FAKE, "name": "fast"}, {**FAKE, "name": "default"}]
    row = ("rag_rerank_model_calls_total", "default,fast")
    with fake_server(specs) as (url, _state):
        warm = _samples(httpx.get(url + "/metrics", timeout=10).text)[row]  # warm-up passes
        for name in ("fast", "default"):
            response = _post(url, "/rerank", {"model": name, "query": "q", "texts": ["a", "b"]})
            assert response.status_code == 200, response.text
        samples = _samples(httpx.get(url + "/metrics", timeout=10).text)
    assert samples[row] == warm + 2
    assert not any(model in ("fast", "default") for _, model in samples)


# -- 413 / 422 / 404 ---------------------------------------------------------------------------


def test_every_refusal_before_inference_is_counted_with_its_reason() -> None:
    """observability.md lists the reasons (auth, too_large, timeout, invalid, overloaded) of
    ``rag_rerank_http_rejected_total``; an endpoint's own refusals (too many texts, an empty
    list, token ids) were answered but never counted."""
    with fake_server(max_client_batch=4) as (url, state):
        cases = [
            ("/rerank", {"query": "q", "texts": ["a"] * 5}, 413, "too_large"),
            ("/embed", {"inputs": ["a"] * 5}, 413, "too_large"),
            ("/rerank", {"query": "q", "texts": []}, 422, "invalid"),
            ("/v1/embeddings", {"input": [[1, 2, 3]], "model": "fake-emb"}, 400, "invalid"),
            ("/rerank", {"query": "q", "texts": ["a"], "bogus": 1}, 400, "invalid"),
        ]
        for path, body, status, reason in cases:
            before = dict(state.metrics.rejected)
            assert _post(url, path, body).status_code == status, (path, body)
            after = dict(state.metrics.rejected)
            assert after.get(reason, 0) == before.get(reason, 0) + 1, (path, body)
            assert sum(after.values()) == sum(before.values()) + 1, (path, body)
        assert _post(url, "/rerank", {"query": "q", "texts": ["a"]}).status_code == 200
        assert sum(state.metrics.rejected.values()) == len(cases)


def test_a_large_refused_body_still_reaches_the_client_as_its_413() -> None:
    """The server answered 413 and closed with the body unread: the kernel then sent a reset,
    and the client's stack dropped the answer (a connection error for 6 to 19 of 40 bodies of
    3-30 MB on loopback). The rest of the body is now read and dropped first (bounded)."""
    big = json.dumps({"query": "q", "texts": ["x" * 40_000] * 256}).encode()  # ~10 MB
    with fake_server([FAKE]) as (url, state):
        statuses = []
        for _ in range(12):
            try:
                statuses.append(
                    httpx.post(
                        url + "/rerank",
                        content=big,
                        headers={"content-type": "application/json"},
                        timeout=30,
                    ).status_code
                )
            except httpx.TransportError as exc:
                statuses.append(type(exc).__name__)
        assert statuses == [413] * 12
        assert state.metrics.rejected["too_large"] == 12


def test_413_for_too_many_texts_and_too_many_bytes() -> None:
    with fake_server(max_client_batch=8, max_request_bytes=2048) as (url, state):
        many = _post(url, "/rerank", {"query": "q", "texts": ["t"] * 9})
        assert many.status_code == 413
        assert "9 texts" in many.json()["error"]
        assert "--max-client-batch" in many.json()["error"]
        assert _post(url, "/embed", {"inputs": ["t"] * 9}).status_code == 413
        big = _post(url, "/rerank", {"query": "q", "texts": ["x" * 4000]})
        assert big.status_code == 413
        assert "--max-request-bytes" in big.json()["message"]

        def chunked() -> Iterator[bytes]:  # no Content-Length: the limit counts received bytes
            yield b'{"query": "q", "texts": ["'
            for _ in range(10):
                yield b"y" * 500
            yield b'"]}'

        streamed = httpx.post(
            url + "/rerank",
            content=chunked(),
            headers={"content-type": "application/json"},
            timeout=30,
        )
        assert streamed.status_code == 413
        assert _post(url, "/rerank", {"query": "q", "texts": ["t"] * 8}).status_code == 200
        assert state.metrics.rejected["too_large"] == 4  # two with too many texts, two too big


@pytest.mark.parametrize(
    ("path", "body", "needle"),
    [
        ("/rerank", {"texts": ["a"]}, "query: Field required"),
        ("/rerank", {"query": "q", "texts": []}, "at least one text"),
        ("/rerank", {"query": "q", "texts": [1, 2]}, "texts.0"),
        ("/rerank", {"query": "q"}, "'texts' (TEI) or 'documents'"),
        ("/v1/rerank", {"query": "q", "documents": ["a"], "top_n": 0}, "top_n"),
        ("/embeddings", {"input": ["a"], "encoding_format": "base85"}, "encoding_format"),
        # Unsupported (valid but not honoured here): 400, see tests/test_wire_strict.py.
        ("/rerank", {"query": "q", "texts": ["a"], "raw_scores": True}, "raw_scores"),
        ("/embed", {"inputs": ["a"], "prompt_name": "weird"}, "prompt_name"),
        ("/v1/embed", {"texts": ["a"], "embedding_types": ["int8"]}, "embedding_types"),
        ("/v1/embed", {"texts": ["a"], "input_type": "nonsense"}, "input_type"),
    ],
)
def test_422_names_the_problem(fake_url: str, path: str, body: dict, needle: str) -> None:
    response = _post(fake_url, path, body)
    unsupported = ("raw_scores", "prompt_name", "embedding_types", "input_type")
    # OpenAI's paths answer 400 for every invalid request (the openai SDK's BadRequestError).
    bad_request = needle in unsupported or path.endswith("embeddings")
    assert response.status_code == (400 if bad_request else 422), response.text
    payload = response.json()
    error = payload["error"]["message"] if path.endswith("embeddings") else payload["error"]
    assert needle in error
    assert error == payload["message"]
    assert payload["error_type"] in ("Validation", "Empty")


def test_422_for_invalid_json(fake_url: str) -> None:
    response = httpx.post(
        fake_url + "/rerank",
        content=b"{not json",
        headers={"content-type": "application/json"},
        timeout=10,
    )
    assert response.status_code == 422
    assert "not valid JSON" in response.json()["error"]


def test_404_when_the_model_name_is_ambiguous_or_missing() -> None:
    second = {**FAKE, "name": "fake-2"}
    with fake_server([FAKE, second]) as (url, _state):
        ok = _post(url, "/rerank", {"model": "fake-2", "query": "a", "texts": ["a"]})
        assert ok.status_code == 200
        unknown = _post(url, "/rerank", {"model": "nope", "query": "a", "texts": ["a"]})
        assert unknown.status_code == 404
        assert "fake, fake-2" in unknown.json()["error"].replace(" (reranker)", "")
        no_embedder = _post(url, "/embed", {"inputs": ["a"]})
        assert no_embedder.status_code == 404
        assert "serves no embedder" in no_embedder.json()["error"]


# -- 401 ---------------------------------------------------------------------------------------


def test_401_without_the_right_bearer_token() -> None:
    with fake_server(api_key="s3cret-token") as (url, state):
        body = {"query": "a", "texts": ["a"]}
        missing = _post(url, "/rerank", body)
        assert missing.status_code == 401
        assert missing.headers["www-authenticate"] == "Bearer"
        assert "Authorization: Bearer" in missing.json()["error"]
        wrong = _post(url, "/rerank", body, headers={"authorization": "Bearer nope"})
        assert wrong.status_code == 401
        good = _post(url, "/rerank", body, headers={"authorization": "Bearer s3cret-token"})
        assert good.status_code == 200
        assert httpx.get(url + "/health", timeout=10).status_code == 200, "probes need no token"
        assert httpx.get(url + "/metrics", timeout=10).status_code == 401
        assert state.metrics.rejected["auth"] == 3


# -- 429 ---------------------------------------------------------------------------------------


def test_429_with_retry_after_when_concurrency_and_queue_are_full() -> None:
    slow = {**FAKE, "options": {"delay_ms": 600}}
    with fake_server([slow], max_concurrency=1, max_pending=1) as (url, state):
        barrier = threading.Barrier(6, timeout=10)

        def call(_: int) -> httpx.Response:
            barrier.wait()
            return _post(url, "/rerank", {"query": "a", "texts": ["a"]})

        with ThreadPoolExecutor(6) as executor:
            responses = list(executor.map(call, range(6)))
        statuses = sorted(r.status_code for r in responses)
        assert set(statuses) <= {200, 429}, statuses
        assert statuses.count(200) >= 2, "one running plus one queued must be served"
        assert statuses.count(429) >= 1
        for response in responses:
            if response.status_code == 429:
                assert int(response.headers["retry-after"]) >= 1
                assert response.json()["error_type"] == "Overloaded"
                assert "--max-concurrency 1" in response.json()["error"]
        assert state.metrics.rejected["overloaded"] == statuses.count(429)
        assert state.admission.admitted == 0


def test_a_refused_request_is_refused_before_it_tokenizes(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """OpenAI's and Cohere's paths (and TEI's token counts) tokenize the body ahead of the model
    call: a request refused with 429 first tokenized all of it (2-9 s for a 2 MB body at the
    limits), taking the CPU from the admitted request."""
    from rag_rerank_plugins.server import state as state_module

    tokenized: list[int] = []
    real = state_module.text_tokens

    def counting(model: Any) -> Any:
        tokenized.append(1)
        return real(model)

    monkeypatch.setattr(state_module, "text_tokens", counting)
    slow = {**FAKE_EMB, "options": {"delay_ms": 800}}
    with fake_server([slow], max_concurrency=1, max_pending=0) as (url, state):
        body = {"model": "fake-emb", "input": ["a b c"] * 4}
        with ThreadPoolExecutor(1) as executor:
            running = executor.submit(_post, url, "/v1/embeddings", body)
            deadline = time.monotonic() + 10
            while state.admission.running == 0 and time.monotonic() < deadline:
                time.sleep(0.01)
            before = len(tokenized)
            refused = [_post(url, "/v1/embeddings", body) for _ in range(3)]
            assert [r.status_code for r in refused] == [429] * 3
            assert len(tokenized) == before  # none of them tokenized
            assert running.result().status_code == 200


# -- readiness, load failure, graceful shutdown ------------------------------------------------


def test_health_is_503_until_the_models_are_loaded_and_warm() -> None:
    _GATE.clear()
    gated = {"name": "gated", "model": "g", "backend": "test-gated-reranker", "device": "cpu"}
    with fake_server([gated], wait=False) as (url, state):
        health = httpx.get(url + "/health", timeout=10)
        assert health.status_code == 503
        assert health.json()["status"] == "loading"
        early = _post(url, "/rerank", {"query": "a", "texts": ["a"]})
        assert early.status_code == 503
        assert early.headers["retry-after"] == "1"
        _GATE.set()
        wait_until_healthy(url, timeout=30)
        assert _post(url, "/rerank", {"query": "a", "texts": ["a"]}).status_code == 200
        assert state.status == "ok"


def test_an_app_whose_models_were_preloaded_is_ready_without_a_second_warm_up() -> None:
    """The Ray Serve recipe (docs/deployment.md) preloads in the replica's ``__init__``, then
    the app's lifespan loads again: that used to run a second warm-up pass while ``/health``
    said "loading", so a replica Ray had marked ready answered 503s for one warm-up."""
    slow = {**FAKE, "options": {"delay_ms": 1500}}
    pool = ModelPool()
    app = create_app(ServerConfig(specs=[slow]), pool=pool)
    state = app.state.server
    pool.preload(*(m.spec for m in state.served), warmup=True)
    try:
        with ServerThread(app) as url:
            wait_until_healthy(url, timeout=1.0)  # one warm-up pass alone takes 1.5 s
            assert _post(url, "/rerank", {"query": "a", "texts": ["a"]}).status_code == 200
        stats = pool.spec_stats(state.served[0].spec)
        assert (stats["calls"], stats["warmups"]) == (1, 1)  # one request, one warm-up
    finally:
        pool.clear()


def test_a_model_that_fails_to_load_keeps_the_server_unready() -> None:
    broken = {"name": "broken", "model": "b", "backend": "test-failing-reranker", "device": "cpu"}
    pool = ModelPool()
    app = create_app(ServerConfig(specs=[broken]), pool=pool)
    fatal = threading.Event()
    app.state.server.on_fatal = fatal.set
    with ServerThread(app) as url:
        assert fatal.wait(10), "the CLI stops the server through on_fatal"
        health = httpx.get(url + "/health", timeout=10)
        assert health.status_code == 503
        assert health.json()["status"] == "failed"
        assert "weights are corrupt" in health.json()["error"]


def test_graceful_shutdown_finishes_in_flight_requests() -> None:
    slow = {**FAKE, "options": {"delay_ms": 800}}
    pool = ModelPool()
    app = create_app(ServerConfig(specs=[slow]), pool=pool)
    server = ServerThread(app)
    url = server.start()
    wait_until_healthy(url, timeout=30)
    state = app.state.server
    result: dict[str, Any] = {}

    def request() -> None:
        result["response"] = _post(url, "/rerank", {"query": "a b", "texts": ["a"]})

    thread = threading.Thread(target=request)
    thread.start()
    deadline = time.monotonic() + 10
    while state.admission.running == 0 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert state.admission.running == 1
    server.stop(timeout=20)
    thread.join(20)
    assert result["response"].status_code == 200
    assert result["response"].json() == [{"index": 0, "score": 0.5}]
    assert state.status == "draining"
    with pytest.raises(httpx.ConnectError):
        httpx.get(url + "/health", timeout=2)


def test_requests_cut_off_by_the_graceful_timeout_get_a_json_503(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """uvicorn cancels what is left when --graceful-timeout ends; queued requests got its
    plain-text 500 ('Internal Server Error', no error shape, no Retry-After) and an ERROR
    traceback each. They now get the documented shape: 503, Unhealthy, Retry-After."""
    slow = {**FAKE, "options": {"delay_ms": 400}}
    pool = ModelPool()
    app = create_app(ServerConfig(specs=[slow], max_concurrency=1, max_pending=16), pool=pool)
    server = ServerThread(app, graceful_timeout=1.0)
    url = server.start()
    wait_until_healthy(url, timeout=30)
    admission = app.state.server.admission
    with httpx.Client(timeout=30) as client, ThreadPoolExecutor(6) as ex:
        calls = [
            ex.submit(client.post, url + "/rerank", json={"query": "q", "texts": ["q a"]})
            for _ in range(6)
        ]
        deadline = time.monotonic() + 10
        while admission.admitted < 6 and time.monotonic() < deadline:
            time.sleep(0.01)
        stopper = threading.Thread(target=server.stop, kwargs={"timeout": 20})
        stopper.start()
        responses = [c.result(timeout=30) for c in calls]
        stopper.join(20)
    pool.clear()
    statuses = sorted(r.status_code for r in responses)
    assert statuses[0] == 200, "the running request finished within the graceful timeout"
    cut = [r for r in responses if r.status_code != 200]
    assert cut, "6 requests of 0.4 s, one at a time, cannot all finish in 1 s"
    for response in cut:
        assert response.status_code == 503
        assert response.headers["retry-after"] == "1"
        body = response.json()
        assert body["error_type"] == "Unhealthy"
        assert "shutting down" in body["error"]
    assert "Exception in ASGI application" not in caplog.text


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.mark.slow
def test_cli_serve_reads_env_and_stops_gracefully_on_sigterm(tmp_path) -> None:
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    key_file = tmp_path / "token"
    key_file.write_text("tok-123\n")
    spec = json.dumps({**FAKE, "options": {"delay_ms": 700}})
    env = {
        **os.environ,
        "RAG_RERANK_PORT": "1",  # the --port flag below must win over the variable
        "RAG_RERANK_MAX_PENDING": "5",
        "RAG_RERANK_MAX_CLIENT_BATCH": "7",
    }
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "rag_rerank_plugins.cli",
            "serve",
            "--spec",
            spec,
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--api-key-file",
            str(key_file),
            "--graceful-timeout",
            "20",
        ],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        wait_until_healthy(url, timeout=60)
        auth = {"authorization": "Bearer tok-123"}
        info = httpx.get(url + "/info", headers=auth, timeout=10).json()
        assert (info["max_pending"], info["max_client_batch_size"], info["auth"]) == (5, 7, True)
        result: dict[str, Any] = {}

        def request() -> None:
            result["response"] = _post(url, "/rerank", {"query": "a", "texts": ["a"]}, headers=auth)

        thread = threading.Thread(target=request)
        thread.start()
        time.sleep(0.3)
        proc.send_signal(signal.SIGTERM)
        thread.join(20)
        assert result["response"].status_code == 200, "in-flight request finished"
        # uvicorn re-raises the captured SIGTERM after its graceful shutdown.
        assert proc.wait(timeout=30) in (0, -signal.SIGTERM)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
    output = proc.stdout.read() if proc.stdout else ""
    assert f"rag-rerank serve: http://127.0.0.1:{port} serving fake" in output


def test_cli_serve_exits_1_when_a_model_fails_to_load() -> None:
    # Test loaders are registered in this process only: use a fake whose options cannot load.
    spec = json.dumps({"model": "e", "backend": "fake-embedder", "options": {"dim": "abc"}})
    proc = subprocess.run(
        [sys.executable, "-m", "rag_rerank_plugins.cli", "serve", "--spec", spec, "--port", "0"],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "RAG_RERANK_DEVICE": "cpu"},
    )
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "loading failed" in proc.stderr


# -- configuration -----------------------------------------------------------------------------


def test_config_precedence_flag_over_env_over_default() -> None:
    env = {
        "RAG_RERANK_PORT": "9001",
        "RAG_RERANK_RERANKERS": "a=/models/a, b=/models/b",
        "RAG_RERANK_EMBEDDERS": "sentence-transformers/all-MiniLM-L6-v2",
        "RAG_RERANK_MAX_CONCURRENCY": "3",
        "RAG_RERANK_WARMUP": "no",
        "RAG_RERANK_DEVICE": "cpu",
    }
    config = ServerConfig.from_env(env, port=9002, max_pending=None)
    assert (config.port, config.max_concurrency, config.max_pending, config.warmup) == (
        9002,
        3,
        32,
        False,
    )
    served = config.served_models()
    assert [(m.name, m.kind, m.spec.model) for m in served] == [
        ("a", "reranker", "/models/a"),
        ("b", "reranker", "/models/b"),
        (
            "sentence-transformers/all-MiniLM-L6-v2",
            "embedder",
            "sentence-transformers/all-MiniLM-L6-v2",
        ),
    ]
    assert all(m.spec.device == "cpu" for m in served)
    assert "api_key" not in repr(ServerConfig.from_env({"RAG_RERANK_API_KEY": "x", **env}))


@pytest.mark.parametrize(
    ("env", "needle"),
    [
        ({"RAG_RERANK_PORT": "http"}, "RAG_RERANK_PORT"),
        ({"RAG_RERANK_RERANKERS": "x", "RAG_RERANK_WARMUP": "maybe"}, "true or false"),
        ({}, "No model to serve"),
        ({"RAG_RERANK_RERANKERS": "a=x,a=y"}, "Two served models are named 'a'"),
        ({"RAG_RERANK_RERANKERS": "x", "RAG_RERANK_MAX_CLIENT_BATCH": "0"}, "max_client_batch"),
        ({"RAG_RERANK_SPECS": '[{"backend": "fake-reranker"}]'}, "needs at least a 'model'"),
        ({"RAG_RERANK_RERANKERS": "x", "RAG_RERANK_RERANKER_BACKEND": "nope"}, "Unknown backend"),
    ],
)
def test_bad_config_is_a_clear_error(env: dict[str, str], needle: str) -> None:
    with pytest.raises(ConfigurationError, match=re.escape(needle)):
        ServerConfig.from_env(env)


def test_serve_help_explains_the_three_deployment_shapes() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "rag_rerank_plugins.cli", "serve", "--help"],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    ).stdout
    needles = ("in-process", "one per machine", "load balancer", "RAG_RERANK_", "--max-pending")
    for needle in needles:
        assert needle in out


def test_importing_the_cli_and_config_stays_light() -> None:
    # Building the parsers (every CLI command does) reads no protocol module either: the
    # endpoint list of `serve --help` is filled in when that help is printed.
    code = (
        "import sys, rag_rerank_plugins.cli, rag_rerank_plugins.server.config\n"
        "import rag_rerank_plugins.backends.remote\n"
        "rag_rerank_plugins.cli.build_parser()\n"
        "heavy = ('fastapi', 'uvicorn', 'httpx', 'torch', 'rag_rerank_plugins.server.schemas')\n"
        "print(sorted(m for m in heavy if m in sys.modules))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True
    ).stdout
    assert out.strip() == "[]"
