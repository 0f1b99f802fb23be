"""Adding a client protocol is one module plus one registry line: a toy protocol, end to end.

The toy server speaks a wire format of its own (``POST /v0/score``, ``POST /v0/vectors``, no
``GET /info``); it is an ``httpx.MockTransport`` whose answers come from the library's fakes, so
whatever goes through the remote backend must equal the fakes loaded in process. The protocol
is registered with the public ``register_protocol`` and selected with ``protocol="toy"``; pool
handles, async paths and adapters then use it like the built-in ones, with the same request
splitting, retries and error wording.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import pytest

pytest.importorskip("httpx")

import httpx

from rag_rerank_plugins import ConfigurationError, ModelPool, ModelSpec
from rag_rerank_plugins.backends.remote import (
    PROTOCOLS,
    Call,
    Protocol,
    RemoteSettings,
    UnexpectedResponse,
    register_protocol,
    use_transport,
)
from rag_rerank_plugins.exceptions import RemoteAuthError, RemoteError, RemoteUnavailableError
from rag_rerank_plugins.testing import FakeEmbedder, FakeReranker

URL = "http://toy.test"
QUERY = "which organelle produces ATP"
PASSAGES = [
    "The mitochondria produces ATP for the cell.",
    "Paris is the capital of France.",
    "ATP is the energy currency of every cell.",
]


class ToyProtocol(Protocol):
    """The toy server's wire format: what a user's own protocol module would hold."""

    info_path = None  # the toy server advertises no limits: the defaults and options apply

    def rerank(self, settings: RemoteSettings, query: str, texts: Sequence[str]) -> Call:
        n = len(texts)

        def parse(body: Any) -> list[float]:
            scores = body.get("scores") if isinstance(body, dict) else None
            if not isinstance(scores, list) or len(scores) != n:
                raise UnexpectedResponse(f"{{'scores': [{n} numbers]}}")
            return [float(score) for score in scores]

        return Call("/v0/score", {"query": query, "passages": list(texts)}, parse)

    def embed(
        self, settings: RemoteSettings, texts: Sequence[str], *, is_query: bool, normalize: bool
    ) -> Call:
        kind = "query" if is_query else "passage"
        return Call(
            "/v0/vectors",
            {"texts": list(texts), "kind": kind},
            lambda body: [[float(x) for x in v] for v in body["vectors"]],
        )


register_protocol("toy", ToyProtocol())


@dataclass
class ToyServer:
    """The toy server: answers from the fakes, records every request, and can fail first."""

    failures: list[int] = field(default_factory=list)  # statuses to answer before succeeding
    requests: list[tuple[str, str, dict[str, Any]]] = field(default_factory=list)
    reranker: FakeReranker = field(default_factory=FakeReranker)
    embedder: FakeEmbedder = field(default_factory=FakeEmbedder)

    def __call__(self, request: httpx.Request) -> httpx.Response:
        body = json.loads(request.content) if request.content else {}
        self.requests.append((request.method, request.url.path, body))
        if self.failures:
            return httpx.Response(self.failures.pop(0), json={"error": "warming up"})
        if request.url.path == "/v0/score":
            pairs = [(body["query"], passage) for passage in body["passages"]]
            return httpx.Response(200, json={"scores": self.reranker.score_pairs(pairs, 32)})
        if request.url.path == "/v0/vectors":
            vectors = self.embedder.embed(body["texts"], batch_size=32, is_query=False)
            return httpx.Response(200, json={"vectors": vectors})
        return httpx.Response(404, json={"error": f"no route {request.url.path}"})


@pytest.fixture
def toy() -> Iterator[ToyServer]:
    server = ToyServer()
    with use_transport(URL, httpx.MockTransport(server)):
        yield server


def toy_spec(backend: str, **options: Any) -> ModelSpec:
    options = {"protocol": "toy", "backoff": 0.01, "max_backoff": 0.02, **options}
    return ModelSpec(URL, backend=backend, device="cpu", options=options)


def local_fakes(pool: ModelPool) -> tuple[list[float], list[list[float]]]:
    scores = pool.score_pairs(
        ModelSpec("f", backend="fake-reranker"), [(QUERY, p) for p in PASSAGES]
    )
    vectors = pool.embed(ModelSpec("f", backend="fake-embedder"), PASSAGES)
    return scores, vectors


def test_the_protocol_is_registered_and_selected_by_name(pool: ModelPool) -> None:
    assert isinstance(PROTOCOLS["toy"], ToyProtocol)
    assert list(PROTOCOLS)[:3] == ["tei", "cohere", "infinity"]
    with pytest.raises(ConfigurationError, match=r"Unknown remote protocol 'toy2'.*toy"):
        pool.get(toy_spec("remote-reranker", protocol="toy2"))


async def test_a_toy_protocol_reranks_and_embeds_through_pool_handles(
    pool: ModelPool, toy: ToyServer
) -> None:
    want_scores, want_vectors = local_fakes(pool)
    pairs = [(QUERY, p) for p in PASSAGES]
    reranker = pool.get(toy_spec("remote-reranker"))
    embedder = pool.get(toy_spec("remote-embedder"))
    assert reranker.score_pairs(pairs) == pytest.approx(want_scores)
    assert await reranker.ascore_pairs(pairs) == pytest.approx(want_scores)
    assert embedder.embed(PASSAGES) == [pytest.approx(v) for v in want_vectors]
    assert await embedder.aembed(PASSAGES) == [pytest.approx(v) for v in want_vectors]
    assert embedder.dimension == 64
    assert toy.requests[0] == ("POST", "/v0/score", {"query": QUERY, "passages": PASSAGES})
    assert ("POST", "/v0/vectors", {"texts": PASSAGES, "kind": "passage"}) in toy.requests
    assert all(method == "POST" for method, _, _ in toy.requests), "no GET /info: info_path=None"


def test_requests_are_split_by_count_and_bytes_for_any_protocol(
    pool: ModelPool, toy: ToyServer
) -> None:
    texts = [f"passage {i} " + "x" * 900 for i in range(5)]
    spec = toy_spec("remote-reranker", max_request_bytes=2048)
    scores = pool.score_pairs(spec, [(QUERY, t) for t in texts], batch_size=4)
    assert scores == pool.score_pairs(
        ModelSpec("f", backend="fake-reranker"), [(QUERY, t) for t in texts]
    )
    sent = [body["passages"] for _, _, body in toy.requests]
    assert [len(chunk) for chunk in sent] == [2, 2, 1], "~910 bytes each: two per 2 KiB"
    assert [t for chunk in sent for t in chunk] == texts
    pool.score_pairs(spec, [(QUERY, t) for t in ["a", "b", "c"]], batch_size=2)
    assert [len(body["passages"]) for _, _, body in toy.requests[3:]] == [2, 1], "by count"


def test_retries_and_error_wording_are_the_clients(pool: ModelPool, toy: ToyServer) -> None:
    toy.failures = [503, 429]
    assert pool.embed(toy_spec("remote-embedder", retries=2), ["a b"]) == pool.embed(
        ModelSpec("f", backend="fake-embedder"), ["a b"]
    )
    assert len(toy.requests) == 3
    toy.failures = [503] * 3
    with pytest.raises(RemoteUnavailableError, match="HTTP 503 to all 2 attempt"):
        pool.score_pairs(toy_spec("remote-reranker", retries=1), [("q", "a")])


async def test_the_async_path_retries_and_maps_errors_alike(
    pool: ModelPool, toy: ToyServer
) -> None:
    toy.failures = [502, 429]
    handle = pool.get(toy_spec("remote-reranker", retries=2))
    assert await handle.ascore_pairs([("a b", "a")]) == [0.5]
    assert len(toy.requests) == 3
    toy.failures = [401]
    with pytest.raises(RemoteAuthError, match=r"HTTP 401 .*bearer token"):
        await handle.ascore_pairs([("c d", "c")])
    assert len(toy.requests) == 4, "401 is not retried"


def test_an_answer_the_protocol_does_not_expect_is_a_clear_error(pool: ModelPool) -> None:
    def wrong(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, json={"results": []})

    with use_transport(URL, httpx.MockTransport(wrong)):
        with pytest.raises(
            RemoteError, match=r"expected \{'scores': \[2 numbers\]\}.*infinity, toy\)"
        ):
            pool.score_pairs(toy_spec("remote-reranker"), [("q", "a"), ("q", "b")])
        pool.clear()


def test_adapters_use_a_registered_protocol(pool: ModelPool, toy: ToyServer) -> None:
    pytest.importorskip("langchain_core")
    from langchain_core.documents import Document

    from rag_rerank_plugins.langchain import SharedEmbeddings, SharedRerankCompressor

    want_scores, want_vectors = local_fakes(pool)
    kwargs = {"protocol": "toy", "retries": 0}
    compressor = SharedRerankCompressor(
        model=URL, backend="remote-reranker", top_n=None, model_kwargs=kwargs, pool=pool
    )
    docs = [Document(page_content=p, metadata={"i": i}) for i, p in enumerate(PASSAGES)]
    ranked = compressor.compress_documents(docs, QUERY)
    assert [d.metadata["relevance_score"] for d in ranked] == pytest.approx(
        sorted(want_scores, reverse=True)
    )
    embeddings = SharedEmbeddings(
        model=URL, backend="remote-embedder", model_kwargs=kwargs, pool=pool
    )
    assert embeddings.embed_documents(PASSAGES) == [pytest.approx(v) for v in want_vectors]


@pytest.mark.parametrize(
    ("name", "protocol", "needle"),
    [
        ("Toy", ToyProtocol(), "lowercase"),
        ("tei", ToyProtocol(), "already registered"),
        ("toy3", object(), "Protocol subclass"),
    ],
)
def test_register_protocol_refuses_bad_registrations(name: str, protocol: Any, needle: str) -> None:
    with pytest.raises(ConfigurationError, match=needle):
        register_protocol(name, protocol)
    assert type(PROTOCOLS["tei"]).__name__ == "TEIProtocol", "nothing replaced"
