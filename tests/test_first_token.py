"""Option ``prune_last_layer`` (default on): a cross-encoder's last layer computes only the first
token, the one the classification head reads. Scores must not change: equal to
``CrossEncoder.predict`` / the unpruned model to 1e-5 in float32, for every supported family
and attention implementation, on padded mixed-length batches. Where pruning would change what a
caller sees (hidden states or attentions recorded, training, unsupported heads), the model runs
its own forward.
"""

from __future__ import annotations

import copy
from typing import Any

import numpy as np
import pytest

pytest.importorskip("torch")
pytest.importorskip("sentence_transformers")

import torch
import transformers

from rag_rerank_plugins import ModelPool, ModelSpec
from rag_rerank_plugins.backends._cpu_attention import use_cpu_attention
from rag_rerank_plugins.backends._first_token import CLASSIFIERS, first_token_last_layer
from rag_rerank_plugins.exceptions import ConfigurationError

SIZES = {
    "hidden_size": 64,
    "num_hidden_layers": 3,
    "num_attention_heads": 4,
    "intermediate_size": 96,
    "vocab_size": 120,
    "max_position_embeddings": 80,
    "num_labels": 1,
}
FAMILIES = {
    "BertForSequenceClassification": transformers.BertConfig,
    "RobertaForSequenceClassification": transformers.RobertaConfig,
    "XLMRobertaForSequenceClassification": transformers.XLMRobertaConfig,
    "CamembertForSequenceClassification": transformers.CamembertConfig,
    "ElectraForSequenceClassification": transformers.ElectraConfig,
}


def tiny(name: str, attention: str, seed: int = 0, **config: Any) -> Any:
    cfg = FAMILIES[name](**{**SIZES, **config})
    cfg._attn_implementation = attention
    torch.manual_seed(seed)
    return getattr(transformers, name)(cfg).eval()


def padded_batch(seed: int = 0) -> dict[str, Any]:
    """Six sequences of 3-60 tokens, right-padded: the shape of a length-sorted rerank pass."""
    gen = torch.Generator().manual_seed(seed)
    lengths = [60, 41, 17, 9, 5, 3]
    ids = torch.randint(5, SIZES["vocab_size"], (len(lengths), max(lengths)), generator=gen)
    mask = torch.zeros_like(ids)
    for row, n in enumerate(lengths):
        mask[row, :n] = 1
    return {"input_ids": ids * mask + (1 - mask), "attention_mask": mask}


def test_every_supported_family_is_covered_here() -> None:
    assert set(FAMILIES) == CLASSIFIERS


@pytest.mark.parametrize("attention", ["sdpa", "eager", "ours"])
@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_pruned_logits_equal_the_full_model(name: str, attention: str) -> None:
    full = tiny(name, "eager" if attention == "eager" else "sdpa")
    if attention == "ours":
        use_cpu_attention(full, "cpu")
    pruned = copy.deepcopy(full)
    assert first_token_last_layer(pruned) == 1
    batch = padded_batch()
    with torch.inference_mode():
        want = full(**batch).logits
        got = pruned(**batch).logits
        unpadded = pruned(input_ids=batch["input_ids"][:1]).logits  # no mask at all
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(unpadded, want[:1], atol=1e-5, rtol=1e-5)
    # The saving is real: the last layer produced one position per sequence.
    with torch.inference_mode():
        assert pruned.base_model(**batch).last_hidden_state.shape[1] == 1


def test_switching_twice_wraps_once_and_bf16_stays_close() -> None:
    full = tiny("BertForSequenceClassification", "sdpa").to(torch.bfloat16)
    pruned = copy.deepcopy(full)
    assert first_token_last_layer(pruned) == first_token_last_layer(pruned) == 1
    batch = padded_batch(1)
    with torch.inference_mode():
        want, got = full(**batch).logits.float(), pruned(**batch).logits.float()
    # Different GEMM row counts may round a BF16 value differently: one BF16 step at most.
    torch.testing.assert_close(got, want, atol=2e-2 * float(want.abs().max()) + 1e-3, rtol=0)


def test_hidden_states_and_training_get_the_full_layer() -> None:
    """A caller who asks the model for hidden states or attentions, or trains it, sees every
    position of the last layer, as without pruning."""
    full = tiny("BertForSequenceClassification", "sdpa")
    pruned = copy.deepcopy(full)
    first_token_last_layer(pruned)
    batch = padded_batch()
    with torch.inference_mode():
        want = full(**batch, output_hidden_states=True).hidden_states[-1]
        got = pruned(**batch, output_hidden_states=True).hidden_states[-1]
    assert got.shape == want.shape == (6, 60, SIZES["hidden_size"])
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    pruned.train()
    torch.manual_seed(0)
    out = pruned.base_model(**batch).last_hidden_state
    assert out.shape[1] == 60


def test_models_whose_head_reads_every_position_are_left_alone() -> None:
    cfg = transformers.BertConfig(**SIZES)
    for cls in (transformers.BertForTokenClassification, transformers.BertModel):
        assert first_token_last_layer(cls(cfg).eval()) == 0
    decoder = tiny("BertForSequenceClassification", "sdpa", is_decoder=True)
    assert first_token_last_layer(decoder) == 0


def _spec(path: str, **options: Any) -> ModelSpec:
    return ModelSpec(path, device="cpu", dtype="float32", options={"score_mode": "raw", **options})


def test_backend_scores_equal_cross_encoder_predict_and_stats_say_so(
    real_ce_path: str, pool: ModelPool
) -> None:
    """Real MiniLM weights, padded mixed lengths incl. truncation, our CPU kernels on and off."""
    from sentence_transformers import CrossEncoder

    long = " ".join(["the cell converts energy from food into ATP"] * 80)
    passages = ["Paris is the capital of France.", "A", long, "Mitochondria make ATP. " * 9]
    pairs = [(q, p) for q in ("what produces energy in cells", "capital?") for p in passages]
    reference = CrossEncoder(real_ce_path, device="cpu", activation_fn=torch.nn.Identity())
    want = reference.predict(pairs, batch_size=8)
    for options in ({}, {"cpu_kernels": False}):
        spec = _spec(real_ce_path, **options)
        np.testing.assert_allclose(pool.score_pairs(spec, pairs), want, atol=1e-5, rtol=1e-5)
        assert "last layer for the first token only" in pool.spec_stats(spec)["kernels"]
    kept = _spec(real_ce_path, prune_last_layer=False)
    np.testing.assert_allclose(pool.score_pairs(kept, pairs), want, atol=1e-5, rtol=1e-5)
    assert "first token" not in pool.spec_stats(kept)["kernels"]


@pytest.mark.parametrize("value", ["no", 0, None])
def test_option_must_be_a_bool(real_ce_path: str, pool: ModelPool, value: Any) -> None:
    with pytest.raises(ConfigurationError, match=r"prune_last_layer=.*use True"):
        pool.score_pairs(_spec(real_ce_path, prune_last_layer=value), [("q", "p")])
