"""Long CPU passes on packed rows (``backends/_cpu_packed.py``): an encoder drops the padding rows
of a long right-padded pass before its layers and scatters the result back.

What a user relies on: the same logits and embeddings as the padded model (float32 to 1e-5), for
every supported family, with and without the pruned last layer, for any mix of lengths; the
packed path really runs where it should (CPU kind with sdpa, passes of 64+ keys) and nowhere
else (short passes, left padding, hidden states recorded, training, other CPU kinds).
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
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from rag_rerank_plugins import ModelPool, ModelSpec
from rag_rerank_plugins.backends import _cpu_packed, _cpu_sdpa
from rag_rerank_plugins.backends._cpu_attention import use_cpu_attention
from rag_rerank_plugins.backends._cpu_packed import pack_encoders
from rag_rerank_plugins.backends._first_token import CLASSIFIERS, first_token_last_layer

SIZES = {
    "hidden_size": 32,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "intermediate_size": 48,
    "vocab_size": 120,
    "max_position_embeddings": 340,
    "num_labels": 1,
}
#: Every classifier family the pruned last layer serves, with its config class.
FAMILIES = {
    name: getattr(transformers, name.replace("ForSequenceClassification", "Config"))
    for name in CLASSIFIERS
}


@pytest.fixture(autouse=True)
def amx(monkeypatch: pytest.MonkeyPatch) -> None:
    """The CPU kind whose long passes go to torch's sdpa (the packed path's condition)."""
    monkeypatch.setenv("RAG_RERANK_CPU_KIND", "amx")


def models(name: str, prune: bool, seed: int = 0) -> tuple[Any, Any]:
    """(reference on transformers' sdpa, the same weights on our kernels with packed rows)."""
    cfg = FAMILIES[name](**SIZES)
    cfg._attn_implementation = "sdpa"
    torch.manual_seed(seed)
    reference = getattr(transformers, name)(cfg).eval()
    ours = copy.deepcopy(reference)
    use_cpu_attention(ours, "cpu")
    assert pack_encoders(ours) == 1
    if prune:
        assert first_token_last_layer(ours) == 1
    return reference, ours


def batch_of(lengths: list[int], total: int, seed: int = 0, pad_id: int = 1) -> dict[str, Any]:
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, SIZES["vocab_size"], (len(lengths), total), generator=gen)
    mask = torch.zeros_like(ids)
    for row, n in enumerate(lengths):
        mask[row, :n] = 1
    return {"input_ids": ids * mask + pad_id * (1 - mask), "attention_mask": mask}


class Spy:
    """Counts the passes that ran packed, and their block sizes."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.blocks: list[int] = []
        real = _cpu_packed._packable

        def spy(*args: Any) -> Any:
            packing = real(*args)
            if packing is not None:
                self.blocks.append(packing.total)
            return packing

        monkeypatch.setattr(_cpu_packed, "_packable", spy)


@pytest.mark.parametrize("prune", [False, True])
@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_packed_logits_equal_the_padded_model(
    name: str, prune: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    spy = Spy(monkeypatch)
    reference, ours = models(name, prune)
    batch = batch_of([300, 257, 120, 33, 17, 2], 320)
    with torch.inference_mode():
        want = reference(**batch).logits
        got = ours(**batch).logits
    assert spy.blocks, "the pass did not run packed"
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    # Packed rows: each sequence rounded up to 16, the block to a multiple of 64.
    assert spy.blocks == [_cpu_sdpa.BLOCK_STEP * 13]  # 304 + 272 + 128 + 48 + 32 + 16 = 800
    assert all(block % _cpu_sdpa.BLOCK_STEP == 0 for block in spy.blocks)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    lengths=st.lists(st.integers(1, 330), min_size=1, max_size=5),
    extra=st.integers(0, 10),
    prune=st.booleans(),
    name=st.sampled_from(sorted(FAMILIES)),
)
def test_any_mix_of_lengths_gives_the_padded_results(
    lengths: list[int], extra: int, prune: bool, name: str
) -> None:
    reference, ours = models(name, prune)
    total = min(SIZES["max_position_embeddings"] - 2, max(lengths) + extra)
    lengths = sorted((min(n, total) for n in lengths), reverse=True)
    batch = batch_of(lengths, total, seed=len(lengths))
    with torch.inference_mode():
        want = reference(**batch).logits
        got = ours(**batch).logits
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_hidden_states_come_back_in_the_padded_layout() -> None:
    """An encoder's caller (an embedder's pooling) gets [batch, length, hidden]: the real rows as
    the padded model computes them; padding positions hold finite values no pooling reads (as
    in the padded model, whose padding rows are computed too)."""
    reference, ours = models("BertForSequenceClassification", prune=False)
    lengths = [290, 260, 7]
    batch = batch_of(lengths, 300)
    with torch.inference_mode():
        want = reference.base_model(**batch).last_hidden_state
        got = ours.base_model(**batch).last_hidden_state
    assert got.shape == want.shape
    for row, n in enumerate(lengths):
        torch.testing.assert_close(got[row, :n], want[row, :n], atol=1e-5, rtol=1e-5)
    assert bool(torch.isfinite(got).all())


def test_where_packing_does_not_apply_the_encoder_runs_its_own_forward(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    spy = Spy(monkeypatch)
    reference, ours = models("BertForSequenceClassification", prune=True)
    assert _cpu_packed.PACK_FROM_KEYS > 60
    long = batch_of([300, 120, 10], 300)
    short = batch_of([60, 33, 10], 60)  # under PACK_FROM_KEYS: the padded layout
    left = {k: v.flip(-1) for k, v in long.items()}  # left padding
    with torch.inference_mode():
        for batch in (short, left):
            got, want = ours(**batch).logits, reference(**batch).logits
            torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
        recorded = ours(**long, output_hidden_states=True)
        assert len(recorded.hidden_states) == SIZES["num_hidden_layers"] + 1
        assert recorded.hidden_states[-1].shape[1] == 300
        unpadded = ours(input_ids=long["input_ids"][:1]).logits  # no mask at all
        torch.testing.assert_close(
            unpadded, reference(input_ids=long["input_ids"][:1]).logits, atol=1e-5, rtol=1e-5
        )
    assert spy.blocks == []
    monkeypatch.setenv("RAG_RERANK_CPU_KIND", "avx2")  # the tiled kernel's kinds: not packed
    with torch.inference_mode():
        ours(**long)
    ours.train()
    ours(**long)
    assert spy.blocks == []
    monkeypatch.setenv("RAG_RERANK_CPU_KIND", "amx")
    ours.eval()
    with torch.inference_mode():
        ours(**long)
    assert len(spy.blocks) == 1


def test_switching_twice_wraps_once() -> None:
    _, ours = models("XLMRobertaForSequenceClassification", prune=True)
    encoder = ours.base_model.encoder
    wrapped = encoder.forward
    assert pack_encoders(ours) == 1
    assert encoder.forward == wrapped


def test_a_packed_pass_leaves_no_state_behind_when_it_fails() -> None:
    _, ours = models("BertForSequenceClassification", prune=False)
    layer = ours.base_model.encoder.layer[1]

    def broken(*args: Any, **kwargs: Any) -> Any:
        raise RuntimeError("injected")

    layer.forward = broken
    with torch.inference_mode(), pytest.raises(RuntimeError, match="injected"):
        ours(**batch_of([300, 30], 300))
    assert _cpu_sdpa.active() is None


# -- through the pool: the backends' default kernels -------------------------------------------


def long_pairs() -> list[tuple[str, str]]:
    sentence = "the mitochondria convert energy from food into ATP for the cell"
    return [("what makes ATP", " ".join([sentence] * (8 + 5 * i))) for i in range(8)]


def test_cross_encoder_and_embedder_keep_their_results_and_say_so(
    real_ce_path: str, minilm_path: str, pool: ModelPool, monkeypatch: pytest.MonkeyPatch
) -> None:
    spy = Spy(monkeypatch)
    pairs = long_pairs()

    def ce(**options: Any) -> ModelSpec:
        return ModelSpec(
            real_ce_path,
            device="cpu",
            dtype="float32",
            options={"score_mode": "raw", **options},
        )

    want = pool.score_pairs(ce(cpu_kernels=False), pairs)
    assert spy.blocks == []
    got = pool.score_pairs(ce(), pairs)
    assert spy.blocks, "no pass ran packed: the passages are not long enough"
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-5)
    assert "64+ keys on packed rows, per sequence" in pool.spec_stats(ce())["kernels"]

    spy.blocks.clear()
    texts = [p for _, p in pairs]

    def emb(**options: Any) -> ModelSpec:
        return ModelSpec(
            minilm_path,
            backend="sentence-transformers",
            device="cpu",
            dtype="float32",
            options=options,
        )

    want_vectors = np.asarray(pool.embed(emb(cpu_kernels=False), texts))
    got_vectors = np.asarray(pool.embed(emb(), texts))
    assert spy.blocks, "no embedder pass ran packed"
    np.testing.assert_allclose(got_vectors, want_vectors, atol=1e-5, rtol=1e-5)
