"""`dtype="auto"` end to end, under whichever CPU policy this run asks for.

The whole suite runs with ``RAG_RERANK_CPU_BF16=0`` unless told otherwise (see conftest); CI runs
the ``dtype_policy`` tests a second time with ``RAG_RERANK_CPU_BF16=1``, so the BF16 default of
AVX512-BF16 CPUs is exercised on every machine (tiny models are fast enough where BF16 is only
emulated). Each test derives its tolerance from the dtype the policy actually chose; tests that
pin ``dtype="bfloat16"`` check the BF16 path whatever the policy.

The cross-encoder here has the packaged MiniLM's real encoder weights and a seeded head
(``build_cross_encoder_from_encoder``), so its activations have realistic ranges and the BF16
error on scores is representative, unlike a tiny random model whose scores all sit near 0.5.
"""

from __future__ import annotations

import json
from importlib import resources

import numpy as np
import pytest

pytest.importorskip("sentence_transformers")

from rag_rerank_plugins import ModelPool, ModelSpec
from rag_rerank_plugins.policy import cpu_has_native_bf16, decide_dtype

pytestmark = pytest.mark.dtype_policy

#: Largest score error, as a share of the FP32 score range, that a dtype may cause.
RANGE_SHARE = {"float32": 1e-5, "bfloat16": 0.03, "float16": 0.01}
#: Smallest Spearman rank correlation with FP32 scores that a dtype must keep.
MIN_SPEARMAN = {"float32": 0.9999, "bfloat16": 0.98, "float16": 0.99}
#: Smallest cosine between a vector and its FP32 twin.
MIN_COSINE = {"float32": 0.999999, "bfloat16": 0.999, "float16": 0.9999}

QUERIES = ["how do heat pumps work?", "which planet is the largest?", "what causes tides?"]


@pytest.fixture(scope="module")
def corpus() -> list[str]:
    text = resources.files("rag_rerank_plugins.data").joinpath("sample_corpus.jsonl").read_text()
    return [json.loads(line)["text"] for line in text.splitlines() if line.strip()][:30]


def _spearman(a: np.ndarray, b: np.ndarray) -> float:
    ra = np.argsort(np.argsort(a)).astype(float)
    rb = np.argsort(np.argsort(b)).astype(float)
    return float(np.corrcoef(ra, rb)[0, 1])


def _raw_spec(path: str, dtype: str) -> ModelSpec:
    return ModelSpec(path, device="cpu", dtype=dtype, options={"score_mode": "raw"})


def _check_scores(ours: np.ndarray, ref: np.ndarray, dtype: str) -> None:
    spread = float(ref.max() - ref.min())
    assert spread > 0.5, "the reference must spread scores out for the check to mean anything"
    error = float(np.abs(ours - ref).max())
    assert error <= RANGE_SHARE[dtype] * spread, (dtype, error, spread)
    assert _spearman(ours, ref) >= MIN_SPEARMAN[dtype]


def test_auto_resolves_to_the_policys_dtype_and_reports_why(
    pool: ModelPool, real_ce_path: str
) -> None:
    import torch

    decision = decide_dtype("auto", "cpu")
    assert decision.dtype == ("bfloat16" if cpu_has_native_bf16() else "float32")
    handle = pool.get(ModelSpec(real_ce_path, device="cpu"))
    stats = pool.spec_stats(ModelSpec(real_ce_path, device="cpu"))
    assert (stats["dtype"], stats["dtype_reason"]) == (decision.dtype, decision.reason)
    params = {p.dtype for p in handle.model.model.model.parameters()}
    assert params == {getattr(torch, decision.dtype)}


def test_each_spec_sharing_a_model_reports_its_own_reason(
    pool: ModelPool, tiny_ce_path: str
) -> None:
    """float16 on a CPU and float32 share one float32 model; spec_stats showed whichever spec
    loaded first, so a float16 caller read "requested explicitly"."""
    fp32 = ModelSpec(tiny_ce_path, device="cpu", dtype="float32")
    fp16 = ModelSpec(tiny_ce_path, device="cpu", dtype="float16")
    pool.score_pairs(fp32, [("q", "p")])
    assert pool.key(fp16) == pool.key(fp32)
    assert pool.spec_stats(fp32)["dtype_reason"] == "requested explicitly"
    assert "float16 requested on CPU" in pool.spec_stats(fp16)["dtype_reason"]
    assert pool.spec_stats(fp16)["dtype"] == "float32"


@pytest.mark.parametrize("value", ["0", "1"])
def test_the_reason_names_the_variable_when_it_decided(
    monkeypatch: pytest.MonkeyPatch, value: str
) -> None:
    """With RAG_RERANK_CPU_BF16=0 on an AMX host the reason said "CPU without native BF16"."""
    monkeypatch.setenv("RAG_RERANK_CPU_BF16", value)
    reason = decide_dtype("auto", "cpu").reason
    assert f"RAG_RERANK_CPU_BF16={value}" in reason
    assert "CPU without" not in reason
    assert "CPU has" not in reason


def test_cross_encoder_under_the_policy_scores_within_the_dtypes_bound(
    pool: ModelPool, real_ce_path: str, corpus: list[str]
) -> None:
    dtype = decide_dtype("auto", "cpu").dtype
    for query in QUERIES:
        pairs = [(query, text) for text in corpus]
        ours = np.array(pool.score_pairs(_raw_spec(real_ce_path, "auto"), pairs))
        ref = np.array(pool.score_pairs(_raw_spec(real_ce_path, "float32"), pairs))
        _check_scores(ours, ref, dtype)


def test_explicit_bfloat16_stays_within_the_bound_on_any_cpu(
    pool: ModelPool, real_ce_path: str, corpus: list[str]
) -> None:
    pairs = [(QUERIES[0], text) for text in corpus]
    ours = np.array(pool.score_pairs(_raw_spec(real_ce_path, "bfloat16"), pairs))
    ref = np.array(pool.score_pairs(_raw_spec(real_ce_path, "float32"), pairs))
    assert pool.spec_stats(_raw_spec(real_ce_path, "bfloat16"))["dtype"] == "bfloat16"
    _check_scores(ours, ref, "bfloat16")


def test_embedder_under_the_policy_keeps_vectors_close(
    pool: ModelPool, minilm_path: str, corpus: list[str]
) -> None:
    dtype = decide_dtype("auto", "cpu").dtype
    auto = ModelSpec(minilm_path, backend="sentence-transformers", device="cpu")
    fp32 = ModelSpec(minilm_path, backend="sentence-transformers", device="cpu", dtype="float32")
    ours = np.array(pool.embed(auto, corpus, normalize=True))
    ref = np.array(pool.embed(fp32, corpus, normalize=True))
    assert pool.spec_stats(auto)["dtype"] == dtype
    cosines = (ours * ref).sum(axis=1)
    assert cosines.min() >= MIN_COSINE[dtype], cosines.min()


def test_langchain_top_n_under_the_policy_agrees_with_fp32_up_to_near_ties(
    pool: ModelPool, real_ce_path: str, corpus: list[str]
) -> None:
    from langchain_core.documents import Document

    from rag_rerank_plugins.langchain import SharedRerankCompressor

    dtype = decide_dtype("auto", "cpu").dtype
    docs = [Document(page_content=text, id=str(i)) for i, text in enumerate(corpus)]
    pairs = [(QUERIES[1], text) for text in corpus]
    ref = np.array(pool.score_pairs(_raw_spec(real_ce_path, "float32"), pairs))
    comp = SharedRerankCompressor(
        model=real_ce_path, device="cpu", score_mode="raw", top_n=5, pool=pool
    )
    out = comp.compress_documents(docs, QUERIES[1])
    assert len(out) == 5
    scores = [d.metadata["relevance_score"] for d in out]
    assert scores == sorted(scores, reverse=True)
    # Each kept document is within the dtype's error of FP32's 5th best: no real demotion.
    slack = RANGE_SHARE[dtype] * float(ref.max() - ref.min()) * 2
    fifth = float(np.sort(ref)[::-1][4])
    assert all(ref[int(d.id)] >= fifth - slack for d in out)
    if dtype == "float32":
        assert [int(d.id) for d in out] == list(np.argsort(-ref, kind="stable")[:5])


def test_normalized_vectors_are_unit_length_in_bfloat16(
    pool: ModelPool, minilm_path: str, corpus: list[str]
) -> None:
    spec = ModelSpec(minilm_path, backend="sentence-transformers", device="cpu", dtype="bfloat16")
    vectors = np.array(pool.embed(spec, corpus[:8], normalize=True))
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
