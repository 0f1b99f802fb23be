"""sentence-transformers backends give exactly the library's own results, in eval/no-grad mode."""

from __future__ import annotations

import numpy as np
import pytest

from rag_rerank_plugins import ModelPool, ModelSpec

pytest.importorskip("sentence_transformers")


def test_cross_encoder_matches_direct_predict(
    pool: ModelPool, ce_spec: ModelSpec, direct_cross_encoder, passages: list[str]
) -> None:
    pairs = [("how do plants make energy?", p) for p in passages]
    ours = pool.score_pairs(ce_spec, pairs, batch_size=3)
    ref = direct_cross_encoder.predict(pairs, batch_size=32, show_progress_bar=False)
    np.testing.assert_allclose(ours, ref, atol=1e-5, rtol=0)
    assert list(np.argsort(ours)) == list(np.argsort(ref))
    assert len(set(np.round(ours, 6))) > 1, "the tiny model must separate passages"


def test_model_is_in_eval_mode_without_gradients(pool: ModelPool, ce_spec: ModelSpec) -> None:
    model = pool.get(ce_spec).model.model  # CrossEncoderReranker -> CrossEncoder
    assert not model.training
    assert not any(p.requires_grad for p in model.parameters())


def test_max_length_is_fixed_at_load_and_changes_the_key(
    pool: ModelPool, tiny_ce_path: str
) -> None:
    short = ModelSpec(tiny_ce_path, device="cpu", dtype="float32", max_length=8)
    full = ModelSpec(tiny_ce_path, device="cpu", dtype="float32")
    long_text = "energy " * 200
    s_short = pool.score_pairs(short, [("q", long_text), ("q", "energy")])
    s_full = pool.score_pairs(full, [("q", long_text), ("q", "energy")])
    assert pool.get(short) is not pool.get(full)
    assert s_short[0] != pytest.approx(s_full[0], abs=1e-6)  # truncated at 8 tokens
    assert s_short[1] == pytest.approx(s_full[1], abs=1e-5)  # fits either way


def test_explicit_bfloat16_loads_in_bfloat16(pool: ModelPool, tiny_ce_path: str) -> None:
    import torch

    spec = ModelSpec(tiny_ce_path, device="cpu", dtype="bfloat16")
    handle = pool.get(spec)
    assert handle.dtype == "bfloat16"
    assert next(handle.model.model.parameters()).dtype == torch.bfloat16
    scores = pool.score_pairs(spec, [("a", "b")])
    assert isinstance(scores[0], float)


def test_embedder_matches_direct_encode(
    pool: ModelPool, emb_spec: ModelSpec, direct_embedder, passages: list[str]
) -> None:
    ours = np.array(pool.embed(emb_spec, passages, batch_size=4))
    ref = direct_embedder.encode_document(passages, show_progress_bar=False)
    np.testing.assert_allclose(ours, ref, atol=1e-5)
    query = np.array(pool.embed(emb_spec, ["a question"], is_query=True))
    np.testing.assert_allclose(
        query, direct_embedder.encode_query(["a question"], show_progress_bar=False), atol=1e-5
    )
    assert pool.get(emb_spec).dimension == 384


def test_bi_encoder_scores_are_cosines_of_the_shared_embedder(
    pool: ModelPool, minilm_path: str, direct_embedder, passages: list[str]
) -> None:
    spec = ModelSpec(minilm_path, backend="bi-encoder", device="cpu", dtype="float32")
    query = "which organelle produces ATP?"
    scores = pool.score_pairs(spec, [(query, p) for p in passages])
    q = direct_embedder.encode_query([query], normalize_embeddings=True)[0]
    d = direct_embedder.encode_document(passages, normalize_embeddings=True)
    np.testing.assert_allclose(scores, d @ q, atol=1e-5)
    assert int(np.argmax(scores)) == 0  # the mitochondria passage: real relevance, offline
    # It reused the embedder handle rather than loading a second copy.
    emb = ModelSpec(minilm_path, backend="sentence-transformers", device="cpu", dtype="float32")
    assert pool.spec_stats(emb)["loads"] == 1


def test_opt_in_int8_quantization_stays_close_to_float32(
    pool: ModelPool, tiny_ce_path: str, passages: list[str]
) -> None:
    from rag_rerank_plugins import ConfigurationError, ModelLoadError

    pairs = [("how do plants make energy?", p) for p in passages]
    fp32 = pool.score_pairs(ModelSpec(tiny_ce_path, device="cpu", dtype="float32"), pairs)
    int8_spec = ModelSpec(tiny_ce_path, device="cpu", dtype="float32", options={"quantize": "int8"})
    int8 = pool.score_pairs(int8_spec, pairs)
    np.testing.assert_allclose(int8, fp32, atol=0.02)
    linear_types = {type(m).__name__ for m in pool.get(int8_spec).model.model.modules()}
    assert "LinearPackedParams" in linear_types  # really quantized, not silently ignored
    with pytest.raises((ConfigurationError, ModelLoadError), match="int4"):
        pool.get(
            ModelSpec(tiny_ce_path, device="cpu", dtype="float32", options={"quantize": "int4"})
        )
