"""User-visible HTTP contracts of ``rag-rerank serve`` and of the remote backend talking to it.

* Text that is not Unicode (a JSON string holding a lone surrogate escape such as ``"\\ud800"``)
  is bad input: a 4xx before any model work, on every endpoint (echoing ones and tokenizing
  ones alike) and the semantic cache, never a 500 after inference.
* Methods: a 405 lists in ``Allow`` every method of every route on the path (``/`` has GET and
  POST); every GET endpoint answers HEAD (RFC 9110), without a body and outside the OpenAPI
  schema.
* Values are taken as sent or refused: ``priority: true`` is not read as ``1``, an unknown key
  in Cohere v2's ``relevant_spans`` is a 400 naming it, a JSON body sent as another content
  type (or none) is a 415 naming ``application/json``.
* OpenAI's paths answer an invalid request with 400 (``openai.BadRequestError``), never 422,
  with ``error.param`` naming the field.
* Remote backend: a 413 about the model's tokens (``truncate=False``) says so and keeps the
  server's limits; ``truncate=False`` is refused at load time by protocols whose request cannot
  carry it (the server would cut silently).

Every server listens on 127.0.0.1 and every wait is bounded.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

from rag_rerank_plugins import ModelPool, ModelSpec
from rag_rerank_plugins.exceptions import ConfigurationError, RemoteRequestError
from rag_rerank_plugins.server import ServerConfig, create_app
from rag_rerank_plugins.server.testing import ServerThread, wait_until_healthy

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
httpx = pytest.importorskip("httpx")

RERANKER = {"name": "fr", "model": "f", "backend": "fake-reranker", "device": "cpu"}
EMBEDDER = {"name": "fe", "model": "e", "backend": "fake-embedder", "device": "cpu"}
JSON = {"content-type": "application/json"}


@pytest.fixture(scope="module")
def fake_server() -> Iterator[Any]:
    pool = ModelPool()
    config = ServerConfig(specs=[RERANKER, EMBEDDER], max_client_batch=8, semantic_cache="memory")
    app = create_app(config, pool=pool)
    with ServerThread(app) as url:
        wait_until_healthy(url, timeout=30)
        with httpx.Client(base_url=url, timeout=10) as client:
            client.pool = pool  # type: ignore[attr-defined]
            yield client
    pool.clear()


def _calls(pool: ModelPool) -> int:
    """Model calls the server's fake models have answered so far."""
    specs = [
        ModelSpec(s["model"], backend=s["backend"], device="cpu") for s in (RERANKER, EMBEDDER)
    ]
    return sum(int(pool.spec_stats(spec)["calls"]) for spec in specs)


# -- text that is not Unicode ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("path", "body"),
    [
        ("/v1/embed", b'{"texts": ["a\\ud800b"]}'),
        ("/v2/rerank", b'{"query": "q", "documents": ["a\\ud800b"], "return_documents": true}'),
        ("/rerank", b'{"query": "q", "texts": ["a\\ud800b"], "return_text": true}'),
        ("/", b'{"inputs": ["\\udfff"]}'),
        (
            "/v1/rerank",
            b'{"query": "q", "documents": [{"text": "x", "m": "\\udc00"}],'
            b' "return_documents": true}',
        ),
        ("/v1/rerank", b'{"query": "q", "documents": [{"text": "x", "\\ud800": "k"}]}'),
        ("/v1/semantic-cache/put", b'{"query": "q", "value": {"answer": "\\ud800"}}'),
    ],
)
def test_a_lone_surrogate_is_refused_before_any_model_work(
    fake_server: Any, path: str, body: bytes
) -> None:
    """``"\\ud800"`` is a valid JSON escape but not a Unicode character: the model would run,
    then writing the echoed text would fail (a 500, retried by our own remote client)."""
    before = _calls(fake_server.pool)
    response = fake_server.post(path, content=body, headers=JSON)
    assert response.status_code == 422, response.text
    assert "valid UTF-8" in response.json()["message"]
    assert _calls(fake_server.pool) == before


def test_a_surrogate_pair_is_a_character_a_reversed_pair_is_two_lone_halves(
    fake_server: Any,
) -> None:
    pair = b'{"query": "q", "texts": ["a\\ud83d\\ude00"], "return_text": true}'
    response = fake_server.post("/rerank", content=pair, headers=JSON)
    assert response.status_code == 200, response.text
    assert response.json()[0]["text"] == "a\U0001f600"
    reversed_pair = pair.replace(b"\\ud83d\\ude00", b"\\ude00\\ud83d")
    assert fake_server.post("/rerank", content=reversed_pair, headers=JSON).status_code == 422


@pytest.mark.parametrize(
    ("path", "body"),
    [
        ("/v1/embeddings", b'{"input": "a\\ud800b", "model": "minilm"}'),
        ("/rerank", b'{"query": "q", "texts": ["a\\ud800b"], "truncation_direction": "Left"}'),
    ],
)
def test_a_lone_surrogate_never_reaches_a_real_tokenizer(
    model_server: Any, path: str, body: bytes
) -> None:
    """Endpoints that echo nothing but tokenize (usage, left truncation) failed in the
    tokenizer (TypeError -> 500)."""
    response = httpx.post(model_server.url + path, content=body, headers=JSON, timeout=30)
    assert response.status_code == (400 if path == "/v1/embeddings" else 422), response.text
    assert "lone surrogate" in response.json()["message"]


# -- methods --------------------------------------------------------------------------------


def test_405_allow_lists_every_method_of_the_path(fake_server: Any) -> None:
    """RFC 9110 15.5.6; Starlette named the first partially matching route's methods only."""
    cases = [
        ("PUT", "/", "GET, HEAD, POST"),
        ("PUT", "/health", "GET, HEAD"),
        ("DELETE", "/v1/models/fe", "GET, HEAD"),
        ("GET", "/rerank", "POST"),
    ]
    for method, path, allow in cases:
        response = fake_server.request(method, path)
        assert response.status_code == 405
        assert response.headers["allow"] == allow, (method, path)
        assert set(response.json()) == {"error", "error_type", "message"}


def test_every_get_endpoint_answers_head(fake_server: Any) -> None:
    """RFC 9110 9.1: HEAD wherever GET is; uptime checkers and load balancers probe it. The
    HEAD routes stay out of the OpenAPI schema (every GET would be listed twice)."""
    for path in ("/", "/health", "/info", "/metrics", "/v1/models", "/v1/models/fe"):
        got = fake_server.get(path)
        head = fake_server.head(path)
        assert head.status_code == got.status_code == 200, path
        assert head.content == b""
        assert head.headers["content-type"] == got.headers["content-type"]
    paths = fake_server.get("/openapi.json").json()["paths"]
    assert "get" in paths["/health"]
    assert all("head" not in operations for operations in paths.values())


# -- values taken as sent or refused ----------------------------------------------------------


@pytest.mark.parametrize("value", [True, False, 1.0])
def test_priority_is_not_coerced(fake_server: Any, value: object) -> None:
    """``wire._lane`` refuses bools on purpose; pydantic's lax ``int`` turned ``true`` into
    ``1`` (bulk) before it could."""
    body = {"query": "a", "texts": ["x"], "priority": value}
    response = fake_server.post("/rerank", json=body)
    assert response.status_code == 422, response.text
    assert "priority" in response.json()["message"]


#: (path, a valid body, the field, a value pydantic's lax mode used to coerce) for every boolean
#: and integer field of every request model.
_COERCED = [
    ("/v1/rerank", {"query": "a", "documents": ["a", "b"]}, "top_n", True),
    ("/v1/rerank", {"query": "a", "documents": ["a", "b"]}, "top_n", "2"),
    ("/v2/rerank", {"query": "a", "documents": ["a", "b"]}, "top_n", 2.0),
    ("/v1/rerank", {"query": "a", "documents": ["a"]}, "return_documents", "yes"),
    ("/v1/rerank", {"query": "a", "documents": ["a"]}, "max_chunks_per_doc", "3"),
    ("/v2/rerank", {"query": "a", "documents": ["a"]}, "max_tokens_per_doc", 8.0),
    ("/v2/rerank", {"query": "a", "documents": ["a"]}, "return_documents", 1),
    ("/rerank", {"query": "a", "texts": ["a"]}, "truncate", 0),
    ("/rerank", {"query": "a", "texts": ["a"]}, "raw_scores", "false"),
    ("/rerank", {"query": "a", "texts": ["a"]}, "return_text", 1),
    ("/rerank", {"query": "a", "documents": ["a"]}, "top_n", "1"),
    ("/embed", {"inputs": "a b"}, "normalize", "off"),
    ("/embed", {"inputs": "a b"}, "dimensions", "3"),
    ("/", {"inputs": "a b"}, "normalize", 0),
    ("/v2/embed", {"texts": ["a"], "input_type": "search_query"}, "output_dimension", "3"),
    ("/v2/embed", {"texts": ["a"], "input_type": "search_query"}, "max_tokens", 4.0),
    ("/v1/embeddings", {"input": "a b"}, "dimensions", "3"),
]


@pytest.mark.parametrize(("path", "body", "field", "value"), _COERCED)
def test_no_field_is_coerced(
    fake_server: Any, path: str, body: dict[str, Any], field: str, value: object
) -> None:
    """docs/wire-protocols.md: values are taken as sent or refused, never coerced. pydantic's
    lax mode read ``top_n: true`` as 1, ``"2"`` as 2 and ``normalize: "off"`` as false (an
    unnormalised vector, silently); only ``priority`` was strict."""
    assert fake_server.post(path, json=body).status_code == 200  # the body itself is fine
    response = fake_server.post(path, json={**body, field: value})
    assert response.status_code == (400 if path == "/v1/embeddings" else 422), response.text
    assert field in response.json()["message"]


@pytest.mark.parametrize("value", ["²", "①", "٣", "1.5", "-1"])
def test_priority_strings_int_refuses_are_400_not_500(fake_server: Any, value: str) -> None:
    """``str.isdigit`` is true for "²" and "①", which ``int()`` refuses: that was a 500."""
    response = fake_server.post("/rerank", json={"query": "a", "texts": ["x"], "priority": value})
    assert response.status_code == 400, response.text
    assert "priority" in response.json()["message"]
    response = fake_server.post(
        "/rerank", json={"query": "a", "texts": ["x"]}, headers={"X-Priority": value.encode()}
    )
    assert response.status_code == 400, response.text


@pytest.mark.parametrize("literal", [b"NaN", b"Infinity", b"-Infinity"])
@pytest.mark.parametrize("echo", [True, False])
def test_non_finite_number_in_a_body_is_refused_before_model_work(
    fake_server: Any, literal: bytes, echo: bool
) -> None:
    """Python's parser reads ``NaN``/``Infinity``, which JSON has not. Echoed by Cohere's
    ``return_documents`` it was a 500 blaming the model ("the model returned NaN")."""
    before = _calls(fake_server.pool)
    body = b'{"query": "a", "documents": [{"text": "a", "rating": ' + literal + b"}]"
    body += b', "return_documents": true}' if echo else b"}"
    response = fake_server.post(
        "/v1/rerank", content=body, headers={"content-type": "application/json"}
    )
    assert response.status_code == 422, response.text
    assert "documents[0].rating is not a finite number" in response.json()["message"]
    assert _calls(fake_server.pool) == before


@pytest.mark.parametrize(
    ("body", "status", "says"),
    [
        (
            {"query": "a", "texts": ["a"], "top_k": 1},
            400,
            "Unknown or unsupported field(s) 'top_k'",
        ),
        ({"inputs": "a", "top_k": 1}, 400, "Unknown or unsupported field(s) 'top_k'"),
        ({"inputs": 5}, 422, "inputs"),
        ({"query": "a", "texts": "a"}, 422, "texts: Input should be a valid list"),
        ({"texts": ["a"]}, 422, "query: Field required"),
        ([1], 422, "body: Input should be a valid dictionary"),
    ],
)
def test_tei_root_route_reports_as_the_endpoint_it_serves(
    fake_server: Any, body: Any, status: int, says: str
) -> None:
    """TEI's ``POST /`` (huggingface_hub's ``InferenceClient(model=url)``) validated the body
    against both shapes and merged their errors: ``query`` and ``texts`` were "unknown"."""
    response = fake_server.post("/", json=body)
    assert response.status_code == status, response.text
    message = response.json()["message"]
    assert says in message
    for required in ("query", "texts", "inputs"):
        assert f"'{required}'" not in message  # never told to remove a field it needs


@pytest.mark.parametrize(
    ("path", "body", "field"),
    [
        ("/rerank", {"query": "a", "texts": ["a"], "TopN": 1}, "TopN"),
        ("/v1/embeddings", {"input": "a", "Model": "e"}, "Model"),
        (
            "/v1/rerank",
            {"query": "a", "documents": ["a"], "ReturnDocuments": True},
            "ReturnDocuments",
        ),
    ],
)
def test_a_capitalised_unknown_field_is_named(
    fake_server: Any, path: str, body: dict[str, Any], field: str
) -> None:
    """Union branch names (``RerankRequest``) are dropped from error paths; a client's own
    capitalised field was dropped with them and reported as ``'body'``."""
    response = fake_server.post(path, json=body)
    assert response.status_code == 400, response.text
    assert f"'{field}'" in response.json()["message"]
    if path == "/v1/embeddings":
        assert response.json()["error"]["param"] == field


@pytest.mark.parametrize("path", ["/rerank", "/v1/rerank", "/v1/embeddings", "/embed"])
def test_a_body_not_encoded_as_utf8_is_a_validation_error(fake_server: Any, path: str) -> None:
    """docs/wire-protocols.md: text that is not Unicode is a 422 (400 on OpenAI's paths) that
    says to send UTF-8. A Latin-1 body got FastAPI's bare 400 "error parsing the body"."""
    text = {"/rerank": '{"query": "café", "texts": ["crème"]}'}.get(
        path, '{"query": "café", "documents": ["crème"], "input": "café", "inputs": "café"}'
    )
    response = fake_server.post(
        path, content=text.encode("latin-1"), headers={"content-type": "application/json"}
    )
    assert response.status_code == (400 if path == "/v1/embeddings" else 422), response.text
    assert "not valid UTF-8" in response.json()["message"]


def test_a_body_nested_too_deeply_is_a_validation_error(fake_server: Any) -> None:
    body = b'{"query": "a", "texts": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"
    response = fake_server.post(
        "/rerank", content=body, headers={"content-type": "application/json"}
    )
    assert response.status_code == 422, response.text
    assert "nested too deeply" in response.json()["message"]


def _deep(levels: int) -> bytes:
    return b"[" * levels + b"]" * levels


@pytest.mark.parametrize(
    ("path", "body", "says"),
    [
        # json.loads keeps a repeated key's last value: the first list was dropped silently.
        (
            "/rerank",
            b'{"query": "q", "texts": ["a", "b"], "texts": ["z"]}',
            "'texts' appears twice",
        ),
        ("/v1/embeddings", b'{"input": "a", "dimensions": 2, "dimensions": 4}', "'dimensions'"),
        (
            "/v1/rerank",
            b'{"query": "q", "documents": [{"text": "a", "text": "b"}]}',
            "'text' appears twice",
        ),
        # Python reads a 5000-digit integer as a ValueError: FastAPI's bare 400 "error parsing".
        (
            "/v1/rerank",
            b'{"query": "q", "documents": ["a"], "top_n": ' + b"9" * 5000 + b"}",
            "number",
        ),
        # Parsed (Python reads ~990 levels) but deeper than an answer can be written: a 500 after
        # the model work when return_documents echoed it.
        (
            "/v1/rerank",
            b'{"query": "q", "return_documents": true, "documents": [{"text": "a", "meta": '
            + _deep(300)
            + b"}]}",
            "nested more than",
        ),
    ],
)
def test_bodies_json_loads_reads_loosely_are_refused(
    fake_server: Any, path: str, body: bytes, says: str
) -> None:
    response = fake_server.post(path, content=body, headers={"content-type": "application/json"})
    assert response.status_code == (400 if path == "/v1/embeddings" else 422), response.text
    assert says in response.json()["message"]


@pytest.mark.parametrize("encoding", ["utf-16", "utf-16-le", "utf-32"])
def test_a_utf16_or_utf32_body_is_refused(fake_server: Any, encoding: str) -> None:
    """json.loads on bytes guesses UTF-16/32, so such a body was read; the docs say UTF-8."""
    body = '{"query": "q", "texts": ["a"]}'.encode(encoding)
    response = fake_server.post(
        "/rerank", content=body, headers={"content-type": "application/json"}
    )
    assert response.status_code == 422, response.text
    message = response.json()["message"]
    # Without a byte order mark, UTF-16-LE ASCII is valid UTF-8 with NULs: not JSON then.
    assert "not valid UTF-8" in message or "not valid JSON" in message


def test_a_utf8_bom_and_modest_nesting_are_read(fake_server: Any) -> None:
    body = b'\xef\xbb\xbf{"query": "q", "texts": ["a", "b"]}'
    response = fake_server.post(
        "/rerank", content=body, headers={"content-type": "application/json"}
    )
    assert response.status_code == 200, response.text
    meta = b'{"query": "q", "return_documents": true, "documents": [{"text": "a", "m": '
    response = fake_server.post(
        "/v1/rerank",
        content=meta + _deep(100) + b"}]}",
        headers={"content-type": "application/json"},
    )
    assert response.status_code == 200, response.text
    assert response.json()["results"][0]["document"]["m"] is not None


def test_openai_invalid_json_names_no_param(fake_server: Any) -> None:
    """error.param is a body field; it was the parser's character offset ("9")."""
    response = fake_server.post(
        "/v1/embeddings", content=b'{"input":', headers={"content-type": "application/json"}
    )
    assert response.status_code == 400, response.text
    assert response.json()["error"]["param"] is None


def test_relevant_spans_refuses_unknown_keys(fake_server: Any) -> None:
    """A typo'd key inside ``relevant_spans`` was ignored (read as the default "disabled")."""
    body = {"query": "a", "documents": ["x"], "relevant_spans": {"mdoe": "enabled"}}
    response = fake_server.post("/v2/rerank", json=body)
    assert response.status_code == 400
    assert "'relevant_spans.mdoe'" in response.json()["message"]
    ok = fake_server.post("/v2/rerank", json={**body, "relevant_spans": {"mode": "disabled"}})
    assert ok.status_code == 200


@pytest.mark.parametrize("content_type", ["text/plain", "application/x-www-form-urlencoded", None])
def test_a_json_body_sent_as_another_type_is_415(
    fake_server: Any, content_type: str | None
) -> None:
    """``curl -d`` sends form encoding: the answer names the header to send, instead of
    "Input should be a valid dictionary"."""
    headers = {"content-type": content_type} if content_type else {}
    body = b'{"query": "a", "texts": ["x"]}'
    response = fake_server.post("/rerank", content=body, headers=headers)
    assert response.status_code == 415, response.text
    assert "Content-Type: application/json" in response.json()["message"]


# -- OpenAI's status codes --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"input": "x", "encoding_format": "hex"}, "encoding_format"),
        ({"input": "x", "dimensions": 0}, "dimensions"),
        ({"model": "fe"}, "input"),
        ({"input": []}, None),
        ({"input": "x", "bogus": 1}, "bogus"),
    ],
)
def test_openai_invalid_params_are_400_with_param(
    fake_server: Any, body: dict, param: str | None
) -> None:
    """OpenAI answers every invalid parameter with 400 ``invalid_request_error``; the ``openai``
    SDK maps 422 to the unrelated ``UnprocessableEntityError``."""
    for path in ("/v1/embeddings", "/embeddings"):
        response = fake_server.post(path, json=body)
        assert response.status_code == 400, response.text
        error = response.json()["error"]
        assert error["type"] == "invalid_request_error"
        assert error["param"] == param
    # Other protocols keep FastAPI's 422 for an invalid body.
    assert fake_server.post("/embed", json={"inputs": "x", "dimensions": 0}).status_code == 422


# -- the remote backend -----------------------------------------------------------------------


def _remote(kind: str, url: str, **options: Any) -> ModelSpec:
    fast = {"backoff": 0.01, "max_backoff": 0.05, "timeout": 10, "connect_timeout": 1}
    return ModelSpec(url, backend=f"remote-{kind}", device="cpu", options={**fast, **options})


@pytest.mark.parametrize(
    ("kind", "protocol", "name"),
    [("reranker", "tei", None), ("embedder", "tei", None), ("embedder", "cohere", "minilm")],
)
def test_remote_too_many_tokens_413_says_tokens_not_bytes(
    pool: ModelPool, model_server: Any, kind: str, protocol: str, name: str | None
) -> None:
    """With ``truncate=False`` a too-long text is the server's 413 "longer than the model's N
    tokens"; the error named the byte limit (max_request_bytes/batch_size: the wrong fix)."""
    options = {"model_name": name} if name else {}
    spec = _remote(kind, model_server.url, truncate=False, protocol=protocol, **options)
    long_text = "mitochondria " * 2000  # ~26 KB: far under the body limit, far over 512 tokens

    def call() -> object:
        if kind == "reranker":
            return pool.score_pairs(spec, [("q", "short"), ("q", long_text)])
        return pool.embed(spec, ["short", long_text])

    with pytest.raises(RemoteRequestError) as caught:
        call()
    message = str(caught.value)
    assert "tokens" in message, message
    assert "truncate=True" in message, message
    assert "max_request_bytes" not in message, message


@pytest.mark.parametrize(
    ("kind", "protocol"),
    [("reranker", "cohere"), ("reranker", "infinity"), ("embedder", "infinity")],
)
def test_remote_truncate_false_is_refused_where_the_protocol_cannot_send_it(
    pool: ModelPool, kind: str, protocol: str
) -> None:
    """Cohere's rerank and infinity's requests have no truncation field: the server would cut a
    too-long text silently. Refused when the spec loads, before anything is sent."""
    spec = _remote(kind, "http://127.0.0.1:9", truncate=False, protocol=protocol, model_name="m")
    call = (
        (lambda: pool.score_pairs(spec, [("q", "a")]))
        if kind == "reranker"
        else (lambda: pool.embed(spec, ["a"]))
    )
    with pytest.raises(ConfigurationError, match=r"truncate=False .*'tei'"):
        call()
