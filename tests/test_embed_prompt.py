"""Per-call ``prompt`` for embedding: threaded through pool, handle, scheduler and backends.

It is what LlamaIndex's ``query_instruction`` / ``text_instruction`` become: a text put before
every input *instead of* the model's own query/document prompt, for one call, on a shared model.
"""

from __future__ import annotations

import asyncio
import json
import threading
import uuid
from concurrent.futures import ThreadPoolExecutor
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pytest

from rag_rerank_plugins import InvalidInputError, ModelPool, ModelSpec
from rag_rerank_plugins.backends import register_backend
from rag_rerank_plugins.testing import FakeEmbedder, fake_embedder_spec

PROMPT = "Represent this question for searching relevant passages: "
TEXTS = ["which organelle produces ATP?", "the capital of France", "a short one"]


def test_fake_backend_puts_the_prompt_before_each_text(pool: ModelPool) -> None:
    spec = fake_embedder_spec()
    prompted = pool.embed(spec, TEXTS, prompt="topic alpha ")
    assert prompted == pool.embed(spec, [f"topic alpha {t}" for t in TEXTS])
    assert prompted != pool.embed(spec, TEXTS)
    assert pool.embed(spec, TEXTS, prompt=None) == pool.embed(spec, TEXTS)
    assert asyncio.run(pool.aembed(spec, TEXTS, prompt="topic alpha ")) == prompted


def test_query_cache_is_keyed_by_prompt(pool: ModelPool) -> None:
    spec = fake_embedder_spec()
    plain = pool.embed(spec, ["what is up"], is_query=True)
    prompted = pool.embed(spec, ["what is up"], is_query=True, prompt="topic alpha ")
    assert prompted != plain, "a cached vector of another prompt must never be returned"
    assert pool.embed(spec, ["what is up"], is_query=True, prompt="topic alpha ") == prompted
    assert pool.embed(spec, ["what is up"], is_query=True) == plain
    stats = pool.spec_stats(spec)
    assert (stats["cache_hits"], stats["cache_misses"]) == (2, 2)


def test_requests_with_different_prompts_never_share_a_forward_pass() -> None:
    class Scheduled(FakeEmbedder):
        """Not thread-safe, so every call goes through the model's scheduler, which merges
        queued requests into shared forward passes."""

        thread_safe = False

    name = f"sched-emb-{uuid.uuid4().hex[:8]}"
    register_backend(name, lambda spec, pool: Scheduled(delay_ms=5), "embedder", uses_torch=False)
    pool = ModelPool()
    spec = ModelSpec("m", backend=name, device="cpu")
    reference = ModelPool()
    prompts = [None, "topic alpha ", "topic beta "] * 8
    expected = {p: reference.embed(fake_embedder_spec(), TEXTS, prompt=p) for p in set(prompts)}
    with ThreadPoolExecutor(8) as ex:
        results = list(ex.map(lambda p: pool.embed(spec, TEXTS, prompt=p), prompts))
    assert results == [expected[p] for p in prompts]
    pool.clear()
    reference.clear()


def test_backend_without_prompt_parameter_still_works_without_a_prompt() -> None:
    class OldEmbedder(FakeEmbedder):
        """A custom backend written before ``prompt`` existed."""

        thread_safe = False

        def embed(self, texts, *, batch_size, is_query, normalize=False):
            return super().embed(texts, batch_size=batch_size, is_query=is_query)

    name = f"old-emb-{uuid.uuid4().hex[:8]}"
    register_backend(name, lambda spec, pool: OldEmbedder(), "embedder", uses_torch=False)
    pool = ModelPool()
    spec = ModelSpec("m", backend=name, device="cpu")
    assert pool.embed(spec, TEXTS) == pool.embed(fake_embedder_spec(), TEXTS)
    assert asyncio.run(pool.aembed(spec, TEXTS, is_query=True)) == pool.embed(
        fake_embedder_spec(), TEXTS, is_query=True
    )
    pool.clear()


@pytest.mark.parametrize("prompt", [1, b"bytes", ["a"]], ids=repr)
def test_non_str_prompt_is_invalid_input(pool: ModelPool, prompt) -> None:
    with pytest.raises(InvalidInputError, match="prompt must be a str"):
        pool.embed(fake_embedder_spec(), TEXTS, prompt=prompt)


@pytest.mark.parametrize("is_query", [True, False])
def test_sentence_transformers_prompt_equals_encode_with_prompt(
    pool: ModelPool, minilm_path: str, direct_embedder, is_query: bool
) -> None:
    spec = ModelSpec(minilm_path, backend="sentence-transformers", device="cpu", dtype="float32")
    ref = direct_embedder.encode(TEXTS, prompt=PROMPT, normalize_embeddings=True)
    got = pool.embed(spec, TEXTS, 2, is_query=is_query, normalize=True, prompt=PROMPT)
    np.testing.assert_allclose(got, ref, atol=1e-5)
    agot = asyncio.run(pool.aembed(spec, TEXTS, is_query=is_query, normalize=True, prompt=PROMPT))
    np.testing.assert_allclose(agot, ref, atol=1e-5)
    plain = pool.embed(spec, TEXTS, is_query=is_query, normalize=True)
    assert np.abs(np.array(plain) - ref).max() > 1e-3, "the prompt changes the vectors"


def test_flag_m3_prompt_replaces_the_instruction(pool: ModelPool, minilm_path: str) -> None:
    pytest.importorskip("FlagEmbedding")
    options = {"query_instruction_for_retrieval": "query: "}
    spec = ModelSpec(minilm_path, backend="flag-bge-m3", device="cpu", options=options)
    plain = ModelSpec(minilm_path, backend="flag-bge-m3", device="cpu")
    got = pool.embed(spec, TEXTS, is_query=True, prompt=PROMPT)
    want = pool.embed(plain, [PROMPT + t for t in TEXTS], is_query=True)
    np.testing.assert_allclose(got, want, atol=1e-5)
    docs = pool.embed(spec, TEXTS, prompt="passage: ")
    np.testing.assert_allclose(docs, pool.embed(plain, [f"passage: {t}" for t in TEXTS]), atol=1e-5)


def test_remote_embedder_sends_the_prompt_in_front_of_each_text(pool: ModelPool) -> None:
    pytest.importorskip("httpx")
    received: list[list[str]] = []

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args: object) -> None:
            pass

        def do_POST(self) -> None:
            body = json.loads(self.rfile.read(int(self.headers["content-length"])))
            received.append(body["inputs"])
            raw = json.dumps([[1.0, 0.0] for _ in body["inputs"]]).encode()
            self.send_response(200)
            self.send_header("content-length", str(len(raw)))
            self.end_headers()
            self.wfile.write(raw)

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}).start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}"
        spec = ModelSpec(url, backend="remote-embedder", device="cpu", options={"timeout": 5})
        pool.embed(spec, TEXTS, batch_size=2, prompt="p: ")
        asyncio.run(pool.aembed(spec, TEXTS[:1], is_query=True, prompt="q: "))
        pool.embed(spec, TEXTS[:1])
    finally:
        server.shutdown()
        server.server_close()
    assert received == [
        [f"p: {t}" for t in TEXTS[:2]],
        [f"p: {TEXTS[2]}"],
        [f"q: {TEXTS[0]}"],
        TEXTS[:1],
    ]
