"""The wire protocols are strict and exact: unknown or unsupported fields are a 400 naming them,
truncation and token counts follow the model's own tokenizer, and priorities travel from client
to engine lane (also from our remote backend through a live server).

Fake models (no tokenizer: counted in words) for the request rules; the tiny cross-encoder and
packaged MiniLM where tokens matter, compared with the Hugging Face tokenizer itself.
"""

from __future__ import annotations

import base64
import math
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

pytest.importorskip("fastapi")
import httpx
from fastapi.testclient import TestClient

from rag_rerank_plugins import ModelPool, ModelSpec
from rag_rerank_plugins.server import ServerConfig, create_app
from rag_rerank_plugins.server.errors import ApiError
from rag_rerank_plugins.server.testing import ServerThread, wait_until_healthy
from rag_rerank_plugins.server.tokens import TextTokens, longest_first
from rag_rerank_plugins.server.wire import base64_vector, priority_of, search_units, shorten

FAKES = [
    {"name": "r", "model": "f", "backend": "fake-reranker", "device": "cpu"},
    {"name": "e", "model": "g", "backend": "fake-embedder", "device": "cpu"},
]

#: One valid body per POST endpoint.
VALID: dict[str, dict[str, Any]] = {
    "/rerank": {"query": "a b", "texts": ["a", "b"]},
    "/embed": {"inputs": ["a b"]},
    "/": {"inputs": "a b"},
    "/v1/rerank": {"query": "a b", "documents": ["a", "b"]},
    "/v2/rerank": {"model": "r", "query": "a b", "documents": ["a", "b"]},
    "/v1/embed": {"texts": ["a b"]},
    "/v2/embed": {"texts": ["a b"], "input_type": "search_document"},
    "/embeddings": {"input": ["a b"]},
    "/v1/embeddings": {"input": ["a b"], "model": "e"},
}


@pytest.fixture(scope="module")
def client() -> Iterator[TestClient]:
    pool = ModelPool()
    app = create_app(ServerConfig(specs=FAKES), pool=pool)
    with TestClient(app) as c:
        for _ in range(200):
            if c.get("/health").status_code == 200:
                break
        yield c
    pool.clear()


def _message(response: httpx.Response) -> str:
    return str(response.json()["message"])


# -- strictness ------------------------------------------------------------------------------


@pytest.mark.parametrize("path", sorted(VALID))
def test_every_endpoint_answers_its_valid_body(client: TestClient, path: str) -> None:
    assert client.post(path, json=VALID[path]).status_code == 200


@settings(max_examples=25, deadline=None)
@given(
    path=st.sampled_from(sorted(VALID)),
    field=st.from_regex(r"[a-z][a-z_]{2,20}", fullmatch=True),
)
def test_unknown_fields_are_400_naming_them(client: TestClient, path: str, field: str) -> None:
    body = VALID[path]
    if field in body or field in _KNOWN:
        return
    response = client.post(path, json={**body, field: 1})
    assert response.status_code == 400, response.text
    assert f"'{field}'" in _message(response)


#: Every field some endpoint accepts (a generated name that happens to be one is skipped).
_KNOWN = {
    "query", "texts", "documents", "model", "raw_scores", "return_text", "return_documents",
    "top_n", "truncate", "truncation_direction", "inputs", "normalize", "prompt_name",
    "dimensions", "rank_fields", "max_chunks_per_doc", "max_tokens_per_doc", "relevant_spans",
    "input_type", "embedding_types", "output_dimension", "max_tokens", "input",
    "encoding_format", "user", "priority",
}  # fmt: skip


@pytest.mark.parametrize(
    ("path", "body", "needle"),
    [
        ("/v1/rerank", {"query": "q", "documents": [{"title": "t"}]}, "'text'"),
        ("/v1/rerank", {"query": "q", "documents": [{"a": "x"}], "rank_fields": ["b"]}, "'b'"),
        ("/v1/rerank", {"query": "q", "documents": [{"a": 3}], "rank_fields": ["a"]}, "strings"),
        ("/v1/rerank", {"query": "q", "documents": ["x"], "rank_fields": ["a"]}, "string"),
        ("/v1/rerank", {"query": "q", "documents": ["x"], "max_chunks_per_doc": 2}, "tokenizer"),
        (
            "/v2/rerank",
            {"query": "q", "documents": ["x"], "relevant_spans": {"mode": "enabled"}},
            "relevant_spans",
        ),
        (
            "/v1/rerank",
            {"query": "q", "documents": [{"text": "x", "y": "z"}], "images": []},
            "images",
        ),
        ("/v1/embed", {"texts": ["a"], "images": ["x"]}, "images"),
        ("/v2/embed", {"texts": ["a"], "embedding_types": ["int8"]}, "embedding_types"),
        ("/rerank", {"query": "q", "texts": ["a"], "documents": ["b"]}, "once"),
        ("/rerank", {"query": "q", "documents": ["a"], "return_text": True}, "return_text"),
        ("/rerank", {"query": "q", "texts": ["a"], "top_n": 1}, "top_n"),
        ("/rerank", {"query": "q", "texts": ["a"], "raw_scores": True}, "raw_scores"),
        ("/embeddings", {"input": [[1, 2]]}, "token ids"),
        ("/embeddings", {"input": ["a"], "dimensions": 65}, "64"),
        ("/embed", {"inputs": ["a"], "priority": "urgent"}, "priority"),
    ],
)
def test_unsupported_options_are_400(
    client: TestClient, path: str, body: dict, needle: str
) -> None:
    response = client.post(path, json=body)
    assert response.status_code == 400, response.text
    assert needle in _message(response)


def test_openai_paths_answer_openai_error_objects(client: TestClient) -> None:
    body = client.post("/v1/embeddings", json={"input": "a", "bogus": 1}).json()
    assert body["error"]["message"] == body["message"]
    assert body["error"]["type"] == "invalid_request_error"
    other = client.post("/embed", json={"inputs": "a", "bogus": 1}).json()
    assert other["error"] == other["message"]  # TEI and Cohere clients read a string


def test_get_root_describes_the_service(client: TestClient) -> None:
    body = client.get("/").json()
    assert (body["service"], body["status"], body["ready"]) == ("rag-rerank serve", "ok", True)
    assert {"name": "r", "kind": "reranker"} in body["models"]
    assert {"POST /v2/rerank", "GET /v1/models", "GET /"} <= set(body["endpoints"])


def test_priority_header_and_body(client: TestClient, monkeypatch: pytest.MonkeyPatch) -> None:
    state = client.app.state.server  # type: ignore[attr-defined]
    seen: list[str] = []
    original = state.pool.ascore_pairs

    async def spy(*args: Any, **kwargs: Any) -> Any:
        seen.append(kwargs["priority"])
        return await original(*args, **kwargs)

    monkeypatch.setattr(state.pool, "ascore_pairs", spy)
    body = VALID["/rerank"]
    client.post("/rerank", json=body, headers={"X-Priority": "bulk"})
    client.post("/rerank", json={**body, "priority": "interactive"}, headers={"X-Priority": "bulk"})
    client.post("/v2/rerank", json={**VALID["/v2/rerank"], "priority": 0})
    client.post("/v2/rerank", json={**VALID["/v2/rerank"], "priority": 5})
    assert seen == ["bulk", "interactive", "interactive", "bulk"]
    assert client.post("/rerank", json=body, headers={"X-Priority": "x"}).status_code == 400


def test_priority_of_table() -> None:
    assert priority_of(None, {}) == "interactive"
    assert priority_of(None, {"x-priority": " BULK "}) == "bulk"
    assert priority_of(3, {"x-priority": "interactive"}) == "bulk"
    assert priority_of("0", None) == "interactive"
    for bad in (-1, True, "soon", 1.5):
        with pytest.raises(ApiError):
            priority_of(bad, None)


# -- encodings and units ---------------------------------------------------------------------


@settings(max_examples=30, deadline=None)
@given(st.lists(st.floats(-1e3, 1e3, width=32), min_size=1, max_size=40))
def test_base64_is_little_endian_float32(vector: list[float]) -> None:
    decoded = np.frombuffer(base64.b64decode(base64_vector(vector)), dtype="<f4")
    np.testing.assert_array_equal(decoded, np.array(vector, dtype=np.float32))


@settings(max_examples=30, deadline=None)
@given(st.lists(st.floats(-1, 1), min_size=5, max_size=32), st.integers(1, 4))
def test_shorten_is_the_renormalised_prefix(vector: list[float], n: int) -> None:
    head = np.array(vector[:n])
    scale = np.abs(head).max()  # scaled first: tiny components must not underflow the norm
    want = (head / scale) / np.linalg.norm(head / scale) if scale else head
    got = shorten([vector], n, "dimensions")[0]
    np.testing.assert_allclose(got, want, atol=1e-12)
    assert shorten([vector], n, "d", renormalize=False)[0] == vector[:n]
    # the model's own size is no shortening: the vector comes back as the model made it
    assert shorten([vector], len(vector), "dimensions") == [vector]


def test_search_units_per_hundred_documents() -> None:
    assert [search_units(n) for n in (1, 100, 101, 250)] == [1, 1, 2, 3]


# -- tokens: the model's tokenizer is the reference ------------------------------------------


@pytest.fixture(scope="module")
def ce_tokenizer(tiny_ce_path: str) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_ce_path)


@settings(max_examples=40, deadline=None)
@given(st.integers(1, 60), st.integers(1, 60), st.integers(3, 50))
def test_longest_first_equals_hugging_face(ce_tokenizer: Any, q: int, t: int, room: int) -> None:
    query, text = " ".join(["cell"] * q), " ".join(["tower"] * t)
    special = ce_tokenizer.num_special_tokens_to_add(pair=True)
    enc = ce_tokenizer(
        query, text, truncation="longest_first", max_length=room + special, return_length=True
    )
    types = enc["token_type_ids"]
    got_q = types.count(0) - 2  # [CLS] query [SEP]
    got_t = types.count(1) - 1  # text [SEP]
    assert longest_first(q, t, room) == (got_q, got_t)


@settings(max_examples=30, deadline=None)
@given(st.text(st.sampled_from("abc xyz,.é"), max_size=80), st.integers(0, 12))
def test_cut_keeps_the_characters_of_the_tokens_asked(
    ce_tokenizer: Any, text: str, keep: int
) -> None:
    tokens = TextTokens(ce_tokenizer, 512)
    offsets = ce_tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)[
        "offset_mapping"
    ]
    right = tokens.cut([text], [keep], "right")[0]
    left = tokens.cut([text], [keep], "left")[0]
    if len(offsets) <= keep:
        assert right == left == text
    elif keep == 0:
        assert right == left == ""
    else:
        # The characters of the tokens asked, or fewer where that piece re-tokenizes longer
        # (a cut inside a word): never more than keep tokens, which the model would cut again.
        assert text[offsets[0][0] : offsets[keep - 1][1]].startswith(right)
        assert text[offsets[-keep][0] : offsets[-1][1]].endswith(left)
        for piece in (right, left):
            assert len(ce_tokenizer(piece, add_special_tokens=False)["input_ids"]) <= keep
    assert tokens.lengths([text]) == [len(offsets)]


def test_a_left_cut_inside_a_word_keeps_no_token_more_than_room(ce_tokenizer: Any) -> None:
    """A left cut starting inside a word re-tokenized one token longer than the room, so the
    model then dropped the text's last token: the end a left cut exists to keep."""
    import random

    rng = random.Random(0)
    tokens = TextTokens(ce_tokenizer, 64)
    for _ in range(60):
        words = [
            "".join(rng.choice("abcdefghijklmnopqrstuvwxyzéü") for _ in range(rng.randint(3, 14)))
            for _ in range(60)
        ]
        text = " ".join(words)
        for direction in ("left", "right"):
            cut = tokens.cut([text], [40], direction)[0]
            assert len(ce_tokenizer(cut, add_special_tokens=False)["input_ids"]) <= 40
            assert text.endswith(cut) if direction == "left" else text.startswith(cut)


@pytest.fixture(scope="module")
def ce_server(real_ce_path: str) -> Iterator[str]:
    """A cross-encoder on MiniLM's real encoder weights: scores that move with the text."""
    pool = ModelPool()
    config = ServerConfig(rerankers=[f"ce={real_ce_path}"], device="cpu", dtype="float32")
    with ServerThread(create_app(config, pool=pool)) as url:
        wait_until_healthy(url, timeout=180)
        yield url
    pool.clear()


#: Whole-word tokens in no pattern: a cut falls between words, and the two ends differ.
_WORDS = ["tower", "cell", "energy", "france", "river", "paris", "light", "plant", "water"]
LONG = " ".join(_WORDS[(i * 7919) % 97 % len(_WORDS)] for i in range(900))


def test_tei_rerank_left_truncation_equals_tokenizer_left_side(
    ce_server: str, real_ce_path: str
) -> None:
    from sentence_transformers import CrossEncoder

    texts = [LONG, "the cell"]
    ce = CrossEncoder(real_ce_path, device="cpu")
    right = [float(s) for s in ce.predict([("cell", t) for t in texts])]
    ce.tokenizer.truncation_side = "left"
    left = [float(s) for s in ce.predict([("cell", t) for t in texts])]
    assert abs(left[0] - right[0]) > 1e-4  # the model reads a different part of LONG
    body = {"query": "cell", "texts": texts, "truncation_direction": "Left"}
    got = {r["index"]: r["score"] for r in httpx.post(ce_server + "/rerank", json=body).json()}
    assert got == pytest.approx({0: left[0], 1: left[1]}, abs=1e-6)
    default = httpx.post(ce_server + "/rerank", json={"query": "cell", "texts": texts}).json()
    assert {r["index"]: r["score"] for r in default} == pytest.approx(
        {0: right[0], 1: right[1]}, abs=1e-6
    )
    refused = httpx.post(ce_server + "/rerank", json={**body, "truncate": False})
    assert refused.status_code == 413
    assert "#0" in refused.json()["message"]


def test_tei_raw_scores_are_the_logits(ce_server: str, real_ce_path: str) -> None:
    import torch
    from sentence_transformers import CrossEncoder

    ce = CrossEncoder(real_ce_path, device="cpu")
    texts = ["the cell", "a tower", "word1"]
    logits = [
        float(s)
        for s in ce.predict([("cell", t) for t in texts], activation_fn=torch.nn.Identity())
    ]
    body = {"query": "cell", "texts": texts, "raw_scores": True}
    got = {r["index"]: r["score"] for r in httpx.post(ce_server + "/rerank", json=body).json()}
    assert got == pytest.approx(dict(enumerate(logits)), abs=1e-5)


def test_infinity_usage_counts_pair_tokens(ce_server: str, real_ce_path: str) -> None:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(real_ce_path)
    texts = ["the cell", LONG]
    body = {"query": "cell", "documents": texts, "model": "ce"}
    usage = httpx.post(ce_server + "/rerank", json=body).json()["usage"]
    expected = sum(len(tokenizer("cell", t, truncation=True)["input_ids"]) for t in texts)
    assert usage == {"prompt_tokens": expected, "total_tokens": expected}


# -- the remote backend sends what the server understands ------------------------------------


def test_remote_backend_sends_priority_and_truncation_direction(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    pytest.importorskip("uvicorn")
    server_pool = ModelPool()
    seen: list[tuple[str, Any]] = []
    original = server_pool.ascore_pairs

    async def spy(spec: Any, pairs: Any, *args: Any, **kwargs: Any) -> Any:
        seen.append((kwargs["priority"], pairs))
        return await original(spec, pairs, *args, **kwargs)

    monkeypatch.setattr(server_pool, "ascore_pairs", spy)
    app = create_app(ServerConfig(specs=FAKES), pool=server_pool)
    local = ModelPool()
    try:
        with ServerThread(app) as url:
            wait_until_healthy(url, timeout=60)
            spec = ModelSpec(
                url,
                backend="remote-reranker",
                options={"truncation_direction": "left", "retries": 0},
            )
            scores = local.score_pairs(spec, [("a b", "a"), ("a b", "b c")], priority="bulk")
            local.score_pairs(spec, [("a b", "a")])
    finally:
        local.clear()
        server_pool.clear()
    assert scores == [0.5, 0.5]
    assert [lane for lane, _ in seen] == ["bulk", "interactive"]
    assert not math.isnan(scores[0])
