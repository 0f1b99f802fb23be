"""Rerankers score by the model's labels, the same way on every backend (issue 25).

Many msmarco rerankers on the hub are two-label classifiers with logits (not relevant,
relevant). LangChain's stock ``HuggingFaceCrossEncoder`` ranks them by label 1
(``predict(...)[:, 1]``); we used to take label 0 and rank them backwards. The rule now, on the
``cross-encoder``, ``onnx-cross-encoder`` and ``flag-reranker`` backends, with windows and
through the server: one label -> that logit; two -> label 1; more -> a ConfigurationError at
load unless the backend option ``score_label`` (index or ``config.id2label`` name) names one.

Everything is checked side by side with the real stock ``HuggingFaceCrossEncoder`` (and
``CrossEncoderReranker`` from langchain-classic) on tiny random classifiers whose label-0 and
label-1 orders differ, FP32, to 1e-5.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from rag_rerank_plugins import ConfigurationError, ModelPool, ModelSpec
from rag_rerank_plugins.backends import check_options
from rag_rerank_plugins.backends._common import label_index

pytest.importorskip("sentence_transformers")
pytest.importorskip("langchain_community.cross_encoders")

from langchain_community.cross_encoders import HuggingFaceCrossEncoder

QUERY = "which organelle produces the energy of the cell?"
PASSAGES = [
    "The mitochondria is the powerhouse of the cell and produces ATP.",
    "Paris is the capital of France and is known for the Eiffel Tower.",
    "Python is a programming language that emphasises readability.",
    "Photosynthesis converts light energy into chemical energy in plants.",
    "Cats are small domesticated carnivorous mammals that often sleep all day.",
    "A short one.",
    "Quantum computers use qubits that can be in superposition of states.",
    "Ribosomes build proteins; the nucleus keeps the genome of the cell.",
]
PAIRS = [(QUERY, p) for p in PASSAGES]
THREE = {0: "irrelevant", 1: "partly", 2: "relevant"}

BACKENDS = ["cross-encoder", "onnx-cross-encoder", "flag-reranker"]


def _sigmoid(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x))


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory, minilm_path: str) -> dict[str, str]:
    from rag_rerank_plugins.testing import build_cross_encoder

    root = tmp_path_factory.mktemp("labels")
    size = {"hidden_size": 64, "intermediate_size": 128}
    return {
        "two": str(build_cross_encoder(root / "two", num_labels=2, seed=3, **size)),
        "three": str(
            build_cross_encoder(root / "three", num_labels=3, id2label=THREE, seed=4, **size)
        ),
        "one": str(build_cross_encoder(root / "one", seed=5, **size)),
    }


@pytest.fixture(scope="module")
def stock(models: dict[str, str]) -> HuggingFaceCrossEncoder:
    """The stock LangChain class on the two-label model: the reference."""
    return HuggingFaceCrossEncoder(model_name=models["two"], model_kwargs={"device": "cpu"})


@pytest.fixture(scope="module")
def logits(models: dict[str, str]) -> dict[str, np.ndarray]:
    """Every label's FP32 logit per pair, from sentence-transformers directly."""
    import torch
    from sentence_transformers import CrossEncoder

    out = {}
    for name in ("two", "three"):
        ce = CrossEncoder(models[name], device="cpu", activation_fn=torch.nn.Identity())
        out[name] = np.asarray(ce.predict(PAIRS)).reshape(len(PAIRS), -1)
    return out


@pytest.fixture(scope="module")
def shared_pool() -> Iterator[ModelPool]:
    pool = ModelPool()
    yield pool
    pool.clear()


def _options(backend: str, tmp: Path, **extra: Any) -> dict[str, Any]:
    options: dict[str, Any] = dict(extra)
    if backend == "onnx-cross-encoder":
        options["cache_dir"] = str(tmp)
    if backend == "flag-reranker":
        pytest.importorskip("FlagEmbedding")
        options.setdefault("score_mode", "raw")  # its default is sigmoid; the stock's the logit
    return options


@pytest.fixture(scope="module")
def onnx_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    pytest.importorskip("onnxruntime")
    return tmp_path_factory.mktemp("onnx-cache")


@pytest.fixture(params=BACKENDS)
def backend(request: pytest.FixtureRequest) -> str:
    name = str(request.param)
    if name == "onnx-cross-encoder":
        pytest.importorskip("onnxruntime")
    if name == "flag-reranker":
        pytest.importorskip("FlagEmbedding")
    return name


def test_the_models_rank_differently_by_label(logits: dict[str, np.ndarray]) -> None:
    """The fixture can catch a backend scoring the wrong label."""
    two = logits["two"]
    assert list(np.argsort(-two[:, 0])) != list(np.argsort(-two[:, 1]))
    three = logits["three"]
    orders = {tuple(np.argsort(-three[:, i])) for i in range(3)}
    assert len(orders) == 3


def test_stock_langchain_takes_label_one(
    stock: HuggingFaceCrossEncoder, logits: dict[str, np.ndarray]
) -> None:
    np.testing.assert_allclose(list(stock.score(PAIRS)), logits["two"][:, 1], atol=1e-5, rtol=0)


# -- every backend, every adapter: the stock class's order and scores -------------------------


def test_shared_cross_encoder_equals_stock(
    backend: str,
    models: dict[str, str],
    stock: HuggingFaceCrossEncoder,
    shared_pool: ModelPool,
    onnx_cache: Path,
) -> None:
    from rag_rerank_plugins.langchain import SharedCrossEncoder

    ours = SharedCrossEncoder(
        model_name=models["two"],
        backend=backend,
        device="cpu",
        dtype="float32",
        model_kwargs=_options(backend, onnx_cache),
        pool=shared_pool,
    )
    want = [float(s) for s in stock.score(PAIRS)]
    got = ours.score(PAIRS)
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=0)
    assert list(np.argsort(got, kind="stable")) == list(np.argsort(want, kind="stable"))


def test_compressor_equals_stock_cross_encoder_reranker(
    backend: str,
    models: dict[str, str],
    stock: HuggingFaceCrossEncoder,
    shared_pool: ModelPool,
    onnx_cache: Path,
) -> None:
    pytest.importorskip("langchain_classic.retrievers")
    from langchain_classic.retrievers.document_compressors import CrossEncoderReranker
    from langchain_core.documents import Document

    from rag_rerank_plugins.langchain import SharedRerankCompressor

    docs = [Document(page_content=p, metadata={"i": i}) for i, p in enumerate(PASSAGES)]
    reference = CrossEncoderReranker(model=stock, top_n=5).compress_documents(docs, QUERY)
    ours = SharedRerankCompressor(
        model=models["two"],
        backend=backend,
        device="cpu",
        dtype="float32",
        top_n=5,
        model_kwargs=_options(backend, onnx_cache),
        pool=shared_pool,
    ).compress_documents(docs, QUERY)
    assert [d.metadata["i"] for d in ours] == [d.metadata["i"] for d in reference]
    want = [float(s) for s in stock.score([(QUERY, d.page_content) for d in reference])]
    got = [d.metadata["relevance_score"] for d in ours]
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=0)


def test_postprocessor_equals_stock(
    backend: str,
    models: dict[str, str],
    stock: HuggingFaceCrossEncoder,
    shared_pool: ModelPool,
    onnx_cache: Path,
) -> None:
    pytest.importorskip("llama_index.core")
    from llama_index.core.schema import NodeWithScore, QueryBundle, TextNode

    from rag_rerank_plugins.llama_index import SharedRerankPostprocessor

    nodes = [NodeWithScore(node=TextNode(text=p, id_=str(i))) for i, p in enumerate(PASSAGES)]
    ours = SharedRerankPostprocessor(
        model=models["two"],
        backend=backend,
        device="cpu",
        dtype="float32",
        top_n=None,
        model_kwargs=_options(backend, onnx_cache),
        pool=shared_pool,
    ).postprocess_nodes(nodes, query_bundle=QueryBundle(QUERY))
    want = [float(s) for s in stock.score(PAIRS)]
    order = sorted(range(len(want)), key=lambda i: -want[i])
    assert [int(n.node.node_id) for n in ours] == order
    np.testing.assert_allclose([n.score for n in ours], [want[i] for i in order], atol=1e-5)


@pytest.mark.parametrize("backend", ["cross-encoder", "flag-reranker"])  # ONNX: no windows
def test_windows_score_by_the_same_label(
    backend: str,
    models: dict[str, str],
    stock: HuggingFaceCrossEncoder,
    shared_pool: ModelPool,
    onnx_cache: Path,
) -> None:
    """A long passage split into windows: the reported window's score is the stock score of
    (query, that window's text), and it decides the passage (max over windows)."""
    if backend == "flag-reranker":
        pytest.importorskip("FlagEmbedding")
    from langchain_core.documents import Document

    from rag_rerank_plugins.langchain import SharedRerankCompressor

    long_text = " ".join(PASSAGES * 3)
    docs = [Document(page_content=long_text), Document(page_content=PASSAGES[0])]
    ours = SharedRerankCompressor(
        model=models["two"],
        backend=backend,
        device="cpu",
        dtype="float32",
        top_n=None,
        window_tokens=24,
        window_query_tokens=16,
        model_kwargs=_options(backend, onnx_cache),
        pool=shared_pool,
    ).compress_documents(docs, QUERY)
    windowed = next(d for d in ours if d.page_content == long_text)
    info = windowed.metadata["rerank_window"]
    assert info["count"] > 2
    text = long_text[info["char_start"] : info["char_end"]]
    want = float(next(iter(stock.score([(QUERY, text)]))))
    assert windowed.metadata["relevance_score"] == pytest.approx(want, abs=1e-5)
    assert info["score"] == pytest.approx(want, abs=1e-5)


# -- choosing a label, and models with more than two ------------------------------------------


def _score(pool: ModelPool, path: str, backend: str, cache: Path, **options: Any) -> list[float]:
    spec = ModelSpec(
        path,
        backend=backend,
        device="cpu",
        dtype="float32",
        options=_options(backend, cache, **options),
    )
    return pool.score_pairs(spec, PAIRS, 4)


@pytest.mark.parametrize("label", [0, "LABEL_0", 1, "LABEL_1", "1"])
def test_score_label_chooses_the_logit(
    backend: str,
    label: Any,
    models: dict[str, str],
    logits: dict[str, np.ndarray],
    shared_pool: ModelPool,
    onnx_cache: Path,
) -> None:
    column = int(str(label)[-1])
    got = _score(shared_pool, models["two"], backend, onnx_cache, score_label=label)
    np.testing.assert_allclose(got, logits["two"][:, column], atol=1e-5, rtol=0)


def test_sigmoid_applies_to_the_chosen_label(
    backend: str,
    models: dict[str, str],
    stock: HuggingFaceCrossEncoder,
    shared_pool: ModelPool,
    onnx_cache: Path,
) -> None:
    got = _score(shared_pool, models["two"], backend, onnx_cache, score_mode="sigmoid")
    want = [_sigmoid(float(s)) for s in stock.score(PAIRS)]
    np.testing.assert_allclose(got, want, atol=1e-6, rtol=0)


def test_more_than_two_labels_need_a_name(
    backend: str, models: dict[str, str], shared_pool: ModelPool, onnx_cache: Path
) -> None:
    with pytest.raises(ConfigurationError) as err:
        _score(shared_pool, models["three"], backend, onnx_cache)
    message = str(err.value)
    assert "3 labels" in message
    assert "'relevant'" in message
    assert "score_label" in message


@pytest.mark.parametrize("label", ["relevant", 2, "partly", 0])
def test_a_named_label_of_three(
    backend: str,
    label: Any,
    models: dict[str, str],
    logits: dict[str, np.ndarray],
    shared_pool: ModelPool,
    onnx_cache: Path,
) -> None:
    column = label if isinstance(label, int) else {v: k for k, v in THREE.items()}[label]
    got = _score(shared_pool, models["three"], backend, onnx_cache, score_label=label)
    np.testing.assert_allclose(got, logits["three"][:, column], atol=1e-5, rtol=0)


@pytest.mark.parametrize("label", [3, -1, "LABEL_2", "nope", True, 1.0, "relevant "])
def test_a_wrong_label_is_refused_at_load(
    backend: str, label: Any, models: dict[str, str], shared_pool: ModelPool, onnx_cache: Path
) -> None:
    with pytest.raises(ConfigurationError, match="score_label"):
        _score(shared_pool, models["three"], backend, onnx_cache, score_label=label)


def test_one_label_models_are_unchanged(
    backend: str, models: dict[str, str], shared_pool: ModelPool, onnx_cache: Path
) -> None:
    from sentence_transformers import CrossEncoder

    want = CrossEncoder(models["one"], device="cpu").predict(PAIRS)  # sigmoid of the one logit
    if backend == "flag-reranker":
        got = _score(shared_pool, models["one"], backend, onnx_cache, score_mode="sigmoid")
    else:
        got = _score(shared_pool, models["one"], backend, onnx_cache)
    np.testing.assert_allclose(got, want, atol=1e-6, rtol=0)
    named = _score(shared_pool, models["one"], backend, onnx_cache, score_label="LABEL_0")
    assert len(named) == len(PAIRS)
    with pytest.raises(ConfigurationError, match="score_label=1"):
        _score(shared_pool, models["one"], backend, onnx_cache, score_label=1)


def test_option_names_are_checked_where_written() -> None:
    for name in [*BACKENDS, "fake-reranker"]:
        check_options(name, {"score_label": 1})
    with pytest.raises(ConfigurationError, match="score_labels"):
        check_options("cross-encoder", {"score_labels": 1})
    with pytest.raises(ConfigurationError, match="score_label"):
        check_options("causal-lm-reranker", {"score_label": 1})


# -- the rule itself ---------------------------------------------------------------------------


@given(st.integers(1, 8), st.data())
def test_label_index_rule(num_labels: int, data: st.DataObject) -> None:
    names = {i: f"name{i}" for i in range(num_labels)}
    default = {1: 0, 2: 1}.get(num_labels)
    if default is None:
        with pytest.raises(ConfigurationError, match=f"{num_labels} labels"):
            label_index(None, num_labels, names, "m")
    else:
        assert label_index(None, num_labels, names, "m") == default
    i = data.draw(st.integers(0, num_labels - 1))
    assert label_index(i, num_labels, names, "m") == i
    assert label_index(f"name{i}", num_labels, {str(k): v for k, v in names.items()}, "m") == i
    assert label_index(str(i), num_labels, names, "m") == i
    bad = data.draw(st.one_of(st.integers(num_labels, 99), st.integers(-99, -1)))
    with pytest.raises(ConfigurationError):
        label_index(bad, num_labels, names, "m")


def test_label_names_that_do_not_fit_fall_back_to_transformers_defaults() -> None:
    # A head whose size differs from config.id2label (a Dense head): the default names.
    assert label_index("LABEL_1", 2, {0: "only"}, "m") == 1
    assert label_index(None, 2, None, "m") == 1
    with pytest.raises(ConfigurationError, match="no output label"):
        label_index(None, 0, None, "m")


# -- the server's answers -----------------------------------------------------------------------


def test_server_rerank_equals_stock(
    models: dict[str, str], stock: HuggingFaceCrossEncoder, onnx_cache: Path
) -> None:
    pytest.importorskip("fastapi")
    httpx = pytest.importorskip("httpx")
    from rag_rerank_plugins.server import ServerConfig, create_app
    from rag_rerank_plugins.server.testing import ServerThread, wait_until_healthy

    specs: list[dict[str, Any]] = [
        {"name": "two-ce", "model": models["two"], "backend": "cross-encoder"},
        {
            "name": "two-onnx",
            "model": models["two"],
            "backend": "onnx-cross-encoder",
            "options": {"cache_dir": str(onnx_cache)},
        },
        {
            "name": "three-named",
            "model": models["three"],
            "backend": "cross-encoder",
            "options": {"score_label": "relevant"},
        },
    ]
    for spec in specs:
        spec.update(device="cpu", dtype="float32")
    want = [float(s) for s in stock.score(PAIRS)]
    order = sorted(range(len(want)), key=lambda i: -want[i])
    pool = ModelPool()
    app = create_app(ServerConfig(specs=specs, warmup=False), pool=pool)
    try:
        with ServerThread(app) as url:
            wait_until_healthy(url, timeout=120)
            for name in ("two-ce", "two-onnx"):
                body = {"query": QUERY, "texts": PASSAGES, "model": name}
                response = httpx.post(f"{url}/rerank", json=body, timeout=60)
                assert response.status_code == 200, response.text
                ranks = response.json()
                assert [r["index"] for r in ranks] == order
                got = [r["score"] for r in ranks]
                np.testing.assert_allclose(got, [want[i] for i in order], atol=1e-5, rtol=0)
            body = {"query": QUERY, "texts": PASSAGES, "model": "three-named"}
            ranks = httpx.post(f"{url}/rerank", json=body, timeout=60).json()
            three = HuggingFaceCrossEncoder(model_name=models["three"])
            relevant = three.client.predict(PAIRS)[:, 2]
            assert [r["index"] for r in ranks] == list(np.argsort(-relevant, kind="stable"))
    finally:
        pool.clear()


def test_server_refuses_a_three_label_model_without_a_name(models: dict[str, str]) -> None:
    pytest.importorskip("fastapi")
    from rag_rerank_plugins.server import ServerConfig, create_app
    from rag_rerank_plugins.server.testing import ServerThread

    pool = ModelPool()
    spec = {"name": "three", "model": models["three"], "backend": "cross-encoder", "device": "cpu"}
    app = create_app(ServerConfig(specs=[spec]), pool=pool)
    httpx = pytest.importorskip("httpx")
    try:
        with ServerThread(app) as url:
            for _ in range(600):
                health = httpx.get(f"{url}/health", timeout=10).json()
                if health["status"] != "loading":
                    break
                time.sleep(0.05)
            assert health["status"] != "ready"
            assert "score_label" in (health.get("error") or "")
    finally:
        pool.clear()
