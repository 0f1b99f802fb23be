"""Contract tests: the official clients (``cohere``, ``openai``, ``huggingface_hub``) against a
live ``rag-rerank serve`` on loopback, compared with the models loaded directly.

The server (uvicorn on loopback) serves a cross-encoder on MiniLM's real encoder weights with a
seeded head (``ce``: realistic score ranges) and the packaged all-MiniLM-L6-v2 (``minilm``) in
float32; the references are
sentence-transformers' ``CrossEncoder.predict`` and ``SentenceTransformer.encode`` on the same
files. What a migrating user relies on: the client parses our answers, every option it sends
changes the answer as the vendor documents, token counts equal the model tokenizer's, and a
priority sent by the client reaches the engine's lanes.
"""

from __future__ import annotations

import base64
import math
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest

pytest.importorskip("fastapi")
cohere = pytest.importorskip("cohere")
openai = pytest.importorskip("openai")
huggingface_hub = pytest.importorskip("huggingface_hub")

from rag_rerank_plugins.windows import Windower, WindowSettings  # noqa: E402

QUERY = "what produces energy in the cell"
DOCS = [
    "The mitochondria is the powerhouse of the cell and produces ATP.",
    "Paris is the capital of France and is known for the Eiffel Tower.",
    "Photosynthesis converts light energy into chemical energy in plants.",
    "A short one.",
]
#: Long enough for several windows of the tiny cross-encoder (512 tokens).
LONG = " ".join(["Filler words about an unrelated topic, such as the weather."] * 90) + (
    " The mitochondria produce most of the energy of the cell."
)
ATOL = 1e-5


@pytest.fixture(scope="module")
def model_server(real_ce_path: str, minilm_path: str) -> Iterator[Any]:
    from types import SimpleNamespace

    from rag_rerank_plugins import ModelPool
    from rag_rerank_plugins.server import ServerConfig, create_app
    from rag_rerank_plugins.server.testing import ServerThread, wait_until_healthy

    pool = ModelPool()
    config = ServerConfig(
        rerankers=[f"ce={real_ce_path}"],
        embedders=[f"minilm={minilm_path}"],
        device="cpu",
        dtype="float32",
        max_client_batch=64,
    )
    server = ServerThread(create_app(config, pool=pool))
    url = server.start()
    try:
        wait_until_healthy(url, timeout=180)
        yield SimpleNamespace(url=url, pool=pool)
    finally:
        server.stop()
        pool.clear()


@pytest.fixture(scope="module")
def direct_cross_encoder(real_ce_path: str) -> Any:
    from sentence_transformers import CrossEncoder

    return CrossEncoder(real_ce_path, device="cpu")


@pytest.fixture
def hub_online(monkeypatch: pytest.MonkeyPatch) -> None:
    """huggingface_hub refuses every URL, loopback included, when HF_HUB_OFFLINE is set (the
    suite sets it); these calls only reach our server on 127.0.0.1."""
    monkeypatch.setattr(huggingface_hub.constants, "is_offline_mode", lambda: False)


@pytest.fixture(scope="module")
def co_v2(model_server: Any) -> Any:
    return cohere.ClientV2(api_key="unused", base_url=model_server.url, max_retries=0)


@pytest.fixture(scope="module")
def co_v1(model_server: Any) -> Any:
    return cohere.Client(api_key="unused", base_url=model_server.url, max_retries=0)


@pytest.fixture(scope="module")
def oa(model_server: Any) -> Any:
    return openai.OpenAI(api_key="unused", base_url=model_server.url + "/v1", max_retries=0)


@pytest.fixture
def lanes(model_server: Any, monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The ``priority`` of every pool call the server makes during the test."""
    seen: list[str] = []
    pool = model_server.pool
    score, embed = pool.ascore_pairs, pool.aembed

    async def ascore_pairs(*args: Any, **kwargs: Any) -> Any:
        seen.append(kwargs.get("priority", "interactive"))
        return await score(*args, **kwargs)

    async def aembed(*args: Any, **kwargs: Any) -> Any:
        seen.append(kwargs.get("priority", "interactive"))
        return await embed(*args, **kwargs)

    monkeypatch.setattr(pool, "ascore_pairs", ascore_pairs)
    monkeypatch.setattr(pool, "aembed", aembed)
    return seen


def _ranked(scores: list[float]) -> list[int]:
    return sorted(range(len(scores)), key=lambda i: (-scores[i], i))


def _unit(vectors: np.ndarray) -> np.ndarray:
    return vectors / np.linalg.norm(vectors, axis=1, keepdims=True)


# -- Cohere ----------------------------------------------------------------------------------


def test_cohere_v2_rerank_equals_cross_encoder(
    co_v2: Any, direct_cross_encoder: Any, lanes: list[str]
) -> None:
    response = co_v2.rerank(model="ce", query=QUERY, documents=DOCS, top_n=3, priority=2)
    expected = [float(s) for s in direct_cross_encoder.predict([(QUERY, d) for d in DOCS])]
    assert [r.index for r in response.results] == _ranked(expected)[:3]
    for r in response.results:
        assert math.isclose(r.relevance_score, expected[r.index], abs_tol=ATOL)
    assert response.meta.api_version.version == "2"
    assert response.meta.billed_units.search_units == 1
    assert lanes == ["bulk"]  # Cohere's priority 2 (0 is the highest) -> the bulk lane


def test_cohere_v2_max_tokens_per_doc_cuts_each_document(
    co_v2: Any, direct_cross_encoder: Any
) -> None:
    tok = direct_cross_encoder.tokenizer
    response = co_v2.rerank(model="ce", query=QUERY, documents=DOCS, max_tokens_per_doc=4)
    cut = [tok.decode(tok(d, add_special_tokens=False)["input_ids"][:4]) for d in DOCS]
    expected = [float(s) for s in direct_cross_encoder.predict([(QUERY, c) for c in cut])]
    got = {r.index: r.relevance_score for r in response.results}
    assert [r.index for r in response.results] == _ranked(expected)
    for i, score in got.items():
        assert math.isclose(score, expected[i], abs_tol=ATOL)
    full = [float(s) for s in direct_cross_encoder.predict([(QUERY, d) for d in DOCS])]
    assert any(abs(got[i] - full[i]) > 1e-3 for i in range(len(DOCS)))  # it did change scores


def test_cohere_v1_rank_fields_and_returned_documents(
    co_v1: Any, direct_cross_encoder: Any
) -> None:
    documents = [{"title": f"Doc {i}", "text": d, "id": str(i)} for i, d in enumerate(DOCS)]
    response = co_v1.rerank(
        model="ce",
        query=QUERY,
        documents=documents,
        rank_fields=["title", "text"],
        return_documents=True,
    )
    joined = [f"title: {d['title']}\ntext: {d['text']}" for d in documents]
    expected = [float(s) for s in direct_cross_encoder.predict([(QUERY, j) for j in joined])]
    assert [r.index for r in response.results] == _ranked(expected)
    for r in response.results:
        assert math.isclose(r.relevance_score, expected[r.index], abs_tol=ATOL)
        assert r.document.text == documents[r.index]["text"]
        assert r.document.dict()["id"] == documents[r.index]["id"]  # every field preserved
    assert response.meta.billed_units.search_units == 1


def test_cohere_v1_max_chunks_per_doc_scores_the_best_window(
    co_v1: Any, direct_cross_encoder: Any
) -> None:
    ce = direct_cross_encoder
    windower = Windower(ce.tokenizer, ce.tokenizer.model_max_length)
    settings = WindowSettings(tokens="auto", stride=1 << 30, aggregate="max")
    plan = windower.plan(QUERY, [LONG, DOCS[0]], settings)
    assert len(plan.windows[0]) >= 2
    for chunks in (1, 2):
        response = co_v1.rerank(
            model="ce", query=QUERY, documents=[LONG, DOCS[0]], max_chunks_per_doc=chunks
        )
        expected = [
            max(float(s) for s in ce.predict([(QUERY, w.text) for w in doc[:chunks]]))
            for doc in plan.windows
        ]
        got = {r.index: r.relevance_score for r in response.results}
        assert math.isclose(got[0], expected[0], abs_tol=ATOL)
        assert math.isclose(got[1], expected[1], abs_tol=ATOL)


def test_cohere_v1_max_chunks_per_doc_reads_a_long_query_whole(
    co_v1: Any, direct_cross_encoder: Any
) -> None:
    """The docs say the query is whole in each chunk: a query past the default window query
    budget (64 tokens) was cut, even for documents that fit whole."""
    query = " ".join(f"topic{i}" for i in range(60)) + " " + QUERY
    assert len(direct_cross_encoder.tokenizer(query)["input_ids"]) > 100
    response = co_v1.rerank(model="ce", query=query, documents=[LONG, *DOCS], max_chunks_per_doc=2)
    got = {r.index: r.relevance_score for r in response.results}
    expected = [float(s) for s in direct_cross_encoder.predict([(query, d) for d in DOCS])]
    for i, want in enumerate(expected):  # short documents: as without max_chunks_per_doc
        assert math.isclose(got[i + 1], want, abs_tol=ATOL)
    windower = Windower(
        direct_cross_encoder.tokenizer, direct_cross_encoder.tokenizer.model_max_length
    )
    settings = WindowSettings(tokens="auto", stride=1 << 30, aggregate="max", query_tokens=256)
    windows = windower.plan(query, [LONG], settings).windows[0][:2]
    long_score = max(
        float(s) for s in direct_cross_encoder.predict([(query, w.text) for w in windows])
    )
    assert math.isclose(got[0], long_score, abs_tol=ATOL)  # the long one: whole query, each window


def test_cohere_v1_rank_fields_text_alone_reads_as_the_default(co_v1: Any) -> None:
    """rank_fields=["text"] names Cohere's default field: a string and {"text": ...} read the
    same, with or without it."""
    documents: list[Any] = [DOCS[0], {"text": DOCS[0]}]
    plain = co_v1.rerank(model="ce", query=QUERY, documents=documents)
    named = co_v1.rerank(model="ce", query=QUERY, documents=documents, rank_fields=["text"])
    scores = {r.index: r.relevance_score for r in named.results}
    assert scores[0] == scores[1]
    assert scores == {r.index: r.relevance_score for r in plain.results}


def test_cohere_embed_v1_and_v2_equal_sentence_transformers(
    co_v1: Any, co_v2: Any, direct_embedder: Any
) -> None:
    expected = direct_embedder.encode(DOCS, normalize_embeddings=True)
    tok = direct_embedder.tokenizer
    tokens = sum(len(tok(d, truncation=True, max_length=256)["input_ids"]) for d in DOCS)
    v1 = co_v1.embed(texts=DOCS, model="minilm", input_type="search_document")
    np.testing.assert_allclose(np.array(v1.embeddings), expected, atol=ATOL)
    assert v1.meta.billed_units.input_tokens == tokens
    v2 = co_v2.embed(
        texts=DOCS,
        model="minilm",
        input_type="search_document",
        embedding_types=["float"],
        output_dimension=64,
    )
    np.testing.assert_allclose(np.array(v2.embeddings.float_), _unit(expected[:, :64]), atol=ATOL)
    assert v2.meta.billed_units.input_tokens == tokens


def test_cohere_client_sees_400_for_unsupported_options(co_v2: Any) -> None:
    with pytest.raises(cohere.errors.BadRequestError) as caught:
        co_v2.rerank(
            model="ce",
            query=QUERY,
            documents=DOCS,
            relevant_spans={"mode": "enabled"},
        )
    assert "relevant_spans" in str(caught.value.body)


# -- OpenAI ----------------------------------------------------------------------------------


def test_openai_embeddings_float_base64_and_default(oa: Any, direct_embedder: Any) -> None:
    expected = direct_embedder.encode(DOCS, normalize_embeddings=True)
    as_float = oa.embeddings.create(model="minilm", input=DOCS, encoding_format="float")
    np.testing.assert_allclose([d.embedding for d in as_float.data], expected, atol=ATOL)
    # The client's default asks for base64 and decodes it itself.
    default = oa.embeddings.create(model="minilm", input=DOCS)
    np.testing.assert_allclose([d.embedding for d in default.data], expected, atol=ATOL)
    raw = oa.embeddings.create(model="minilm", input=DOCS, encoding_format="base64")
    decoded = [np.frombuffer(base64.b64decode(d.embedding), dtype="<f4") for d in raw.data]
    np.testing.assert_allclose(decoded, expected, atol=ATOL)
    assert [d.index for d in raw.data] == list(range(len(DOCS)))
    assert raw.model == "minilm"


def test_openai_dimensions_truncate_and_renormalise(oa: Any, direct_embedder: Any) -> None:
    expected = _unit(direct_embedder.encode(DOCS, normalize_embeddings=True)[:, :32])
    response = oa.embeddings.create(model="minilm", input=DOCS, dimensions=32)
    got = np.array([d.embedding for d in response.data])
    assert got.shape == (len(DOCS), 32)
    np.testing.assert_allclose(got, expected, atol=ATOL)
    with pytest.raises(openai.BadRequestError, match="384"):
        oa.embeddings.create(model="minilm", input=DOCS, dimensions=385)


def test_openai_usage_counts_the_model_tokenizer(oa: Any, direct_embedder: Any) -> None:
    tok = direct_embedder.tokenizer
    texts = [*DOCS, LONG]  # the long one is capped at the model's 256 tokens
    expected = sum(len(tok(t, truncation=True, max_length=256)["input_ids"]) for t in texts)
    response = oa.embeddings.create(model="minilm", input=texts, encoding_format="float")
    assert response.usage.prompt_tokens == expected
    assert response.usage.total_tokens == expected


def test_openai_models_list_and_retrieve(oa: Any) -> None:
    ids = [m.id for m in oa.models.list()]
    assert ids == ["ce", "minilm"]
    model = oa.models.retrieve("minilm")
    assert (model.id, model.object) == ("minilm", "model")
    assert model.created > 0
    with pytest.raises(openai.NotFoundError):
        oa.models.retrieve("gpt-4")


def test_openai_priority_header_reaches_the_bulk_lane(oa: Any, lanes: list[str]) -> None:
    oa.embeddings.create(model="minilm", input=DOCS[:1], extra_headers={"X-Priority": "bulk"})
    oa.embeddings.create(model="minilm", input=DOCS[:1], extra_body={"priority": "bulk"})
    oa.embeddings.create(model="minilm", input=DOCS[:1])
    assert lanes == ["bulk", "bulk", "interactive"]


def test_openai_token_arrays_and_unknown_fields_are_400(oa: Any) -> None:
    with pytest.raises(openai.BadRequestError, match="token ids"):
        oa.embeddings.create(model="minilm", input=[[101, 102]])
    with pytest.raises(openai.BadRequestError, match="modality"):
        oa.embeddings.create(model="minilm", input=DOCS, extra_body={"modality": "text"})
    # An invalid value is OpenAI's 400 too (a 422 would be the SDK's UnprocessableEntityError).
    with pytest.raises(openai.BadRequestError, match="dimensions") as caught:
        oa.embeddings.create(model="minilm", input=DOCS[:1], dimensions=0)
    assert caught.value.param == "dimensions"


# -- huggingface_hub (TEI) -------------------------------------------------------------------


@pytest.mark.usefixtures("hub_online")
def test_inference_client_feature_extraction(model_server: Any, direct_embedder: Any) -> None:
    expected = direct_embedder.encode(DOCS, normalize_embeddings=True)
    for url in (model_server.url + "/embed", model_server.url):  # TEI's bare URL: POST /
        client = huggingface_hub.InferenceClient(model=url)
        got = client.feature_extraction(DOCS, normalize=True)
        np.testing.assert_allclose(got, expected, atol=ATOL)


@pytest.mark.usefixtures("hub_online")
def test_inference_client_left_truncation(model_server: Any, direct_embedder: Any) -> None:
    tok = direct_embedder.tokenizer
    client = huggingface_hub.InferenceClient(model=model_server.url + "/embed")
    got = client.feature_extraction(LONG, truncate=True, truncation_direction="left")
    ids = tok(LONG, add_special_tokens=False)["input_ids"]
    tail = tok.decode(ids[-(256 - 2) :])
    expected = direct_embedder.encode([tail], normalize_embeddings=True)
    np.testing.assert_allclose(got, expected, atol=1e-4)
    right = client.feature_extraction(LONG, truncate=True)
    assert float(np.abs(np.asarray(right) - np.asarray(got)).max()) > 1e-3
    with pytest.raises(huggingface_hub.errors.HfHubHTTPError) as caught:
        client.feature_extraction(LONG, truncate=False)
    assert caught.value.response.status_code == 413


@pytest.mark.usefixtures("hub_online")
def test_inference_client_info_and_health(model_server: Any) -> None:
    client = huggingface_hub.InferenceClient(model=model_server.url, provider="hf-inference")
    assert client.health_check() is True
    assert client.get_endpoint_info()["max_client_batch_size"] == 64
