"""Long CPU attention passes (``_cpu_sdpa``): the one-row padding mask our attention name gets
from transformers, and padded passes cut sequence by sequence before torch's sdpa.

What a user relies on: the scores are sdpa's (FP32 to 1e-5, generated shapes, lengths and
padding), every mask form that is not a plain right-padding mask goes the old way (transformers'
own mask, one masked call), and a real cross-encoder pass on an AMX CPU kind takes the cut path
and still equals transformers' kernels. The CPU kind comes from ``RAG_RERANK_CPU_KIND``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

pytest.importorskip("torch")
pytest.importorskip("transformers")

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from transformers.masking_utils import (
    bidirectional_mask_function,
    causal_mask_function,
    sdpa_mask,
)

from rag_rerank_plugins import ModelPool, ModelSpec
from rag_rerank_plugins.backends import _cpu_packed, _cpu_sdpa
from rag_rerank_plugins.backends._cpu_attention import tiled_attention
from rag_rerank_plugins.backends._cpu_sdpa import (
    padding_mask,
    per_sequence_pays,
    prefix_lengths,
    sdpa_attention,
)

F = torch.nn.functional
SCIFACT = Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "scifact"


class _Module(torch.nn.Module):
    pass


EVAL = _Module().eval()


def qkv(batch: int, heads: int, q_len: int, kv_len: int, dim: int, seed: int, dtype: Any) -> Any:
    gen = torch.Generator().manual_seed(seed)

    def one(length: int) -> Any:  # transformers' layout: [batch, length, heads, dim] viewed
        return (torch.randn(batch, length, heads, dim, generator=gen) * 2).to(dtype).transpose(1, 2)

    return one(q_len), one(kv_len), one(kv_len)


def right_padding(lengths: list[int], total: int) -> Any:
    keep = torch.arange(total)[None, :] < torch.tensor(lengths)[:, None]
    return keep[:, None, None, :]


def reference(q: Any, k: Any, v: Any, mask: Any) -> Any:
    out = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), attn_mask=mask)
    return out.transpose(1, 2)


# -- the mask function ---------------------------------------------------------------------------


def test_padding_mask_is_the_padding_row_or_none() -> None:
    attention = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    got = padding_mask(2, 5, 5, mask_function=bidirectional_mask_function, attention_mask=attention)
    assert got.dtype == torch.bool
    assert got.shape == (2, 1, 1, 5)
    assert torch.equal(got[:, 0, 0, :], attention.bool())
    # transformers' 4-D mask is this row repeated for every query
    full = sdpa_mask(2, 5, 5, mask_function=bidirectional_mask_function, attention_mask=attention)
    assert torch.equal(got.expand_as(full), full)
    unpadded = torch.ones(2, 5, dtype=torch.long)
    assert (
        padding_mask(2, 5, 5, mask_function=bidirectional_mask_function, attention_mask=unpadded)
        is None
    )
    assert padding_mask(2, 5, 5, mask_function=bidirectional_mask_function) is None


@pytest.mark.parametrize(
    "kwargs",
    [
        {"mask_function": causal_mask_function},
        {"mask_function": bidirectional_mask_function, "local_size": 2},
        {"mask_function": bidirectional_mask_function, "q_offset": 1, "kv_offset": 1},
    ],
    ids=["causal", "local", "offset"],
)
def test_every_other_mask_is_built_as_transformers_builds_it(kwargs: dict[str, Any]) -> None:
    attention = torch.tensor([[1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1]])
    got = padding_mask(2, 5, 6, attention_mask=attention, **kwargs)
    want = sdpa_mask(2, 5, 6, attention_mask=attention, **kwargs)
    assert (got is None) == (want is None)
    if want is not None:
        assert torch.equal(got, want)


# -- which masks are cut -------------------------------------------------------------------------


def test_prefix_lengths_reads_right_padding_only() -> None:
    assert prefix_lengths(right_padding([5, 2, 1], 5), 3) == [5, 2, 1]
    left = torch.tensor([[False, True, True]])[:, None, None, :]
    holes = torch.tensor([[True, False, True]])[:, None, None, :]
    empty = torch.tensor([[False, False, False]])[:, None, None, :]
    assert prefix_lengths(left, 1) is None
    assert prefix_lengths(holes, 1) is None
    assert prefix_lengths(empty, 1) is None  # a row with no key: leave it to sdpa
    full = right_padding([3, 2], 3).expand(2, 1, 3, 3)  # per-query rows: another mask form
    assert prefix_lengths(full, 2) is None
    additive = torch.zeros(2, 1, 1, 3)
    assert prefix_lengths(additive, 2) is None
    assert prefix_lengths(right_padding([3, 2], 3), 4) is None  # broadcast over the batch


def test_only_long_passes_that_lose_enough_padding_are_cut() -> None:
    assert not per_sequence_pays([100, 20], 128)  # short: a call per sequence costs more
    assert per_sequence_pays([512, 300], 512)
    assert not per_sequence_pays([512, 500], 512)  # 500 -> 512: nothing to cut
    assert not per_sequence_pays([512, 512, 512, 480], 512)  # under 10 % of the work


# -- values --------------------------------------------------------------------------------------


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    lengths=st.lists(st.integers(1, 300), min_size=1, max_size=4),
    pad=st.integers(0, 40),
    heads=st.sampled_from([1, 2, 4]),
    dim=st.sampled_from([8, 16]),
    first_token_only=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_sdpa_attention_equals_masked_sdpa(
    lengths: list[int], pad: int, heads: int, dim: int, first_token_only: bool, seed: int
) -> None:
    """Generated right-padded passes (cut or not), full query rows or the pruned last layer's
    single first-token row: the real positions equal one masked FP32 sdpa call."""
    kv_len = max(lengths) + pad
    q_len = 1 if first_token_only else kv_len
    q, k, v = qkv(len(lengths), heads, q_len, kv_len, dim, seed, torch.float32)
    mask = right_padding(lengths, kv_len)
    got, weights = sdpa_attention(EVAL, q, k, v, mask)
    assert weights is None
    assert got.shape == (len(lengths), q_len, heads, dim)
    want = reference(q, k, v, mask)
    live = mask[:, 0, 0, :q_len]
    torch.testing.assert_close(got[live], want[live], atol=1e-5, rtol=1e-5)
    assert bool(torch.isfinite(got).all())


def test_a_long_padded_pass_runs_one_call_per_sequence(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[tuple[int, ...]] = []
    real = F.scaled_dot_product_attention

    def spy(q: Any, k: Any, v: Any, **kwargs: Any) -> Any:
        calls.append((q.shape[0], k.shape[2]))
        return real(q, k, v, **kwargs)

    monkeypatch.setattr(F, "scaled_dot_product_attention", spy)
    q, k, v = qkv(3, 4, 512, 512, 8, 0, torch.float32)
    mask = right_padding([512, 301, 40], 512)
    got, _ = sdpa_attention(EVAL, q, k, v, mask)
    # each sequence on its own keys, rounded up to whole 16-key tiles
    assert calls == [(1, 512), (1, 304), (1, 48)]
    live = mask[:, 0, 0, :]
    torch.testing.assert_close(got[live], reference(q, k, v, mask)[live], atol=1e-5, rtol=1e-5)
    calls.clear()
    mask = right_padding([512, 510, 500], 512)  # little to cut: one masked call
    sdpa_attention(EVAL, q, k, v, mask)
    assert calls == [(3, 512)]


def test_training_and_causal_modules_keep_one_masked_call(monkeypatch: pytest.MonkeyPatch) -> None:
    cut: list[int] = []
    real = _cpu_sdpa._per_sequence_sdpa
    monkeypatch.setattr(
        _cpu_sdpa, "_per_sequence_sdpa", lambda *a, **kw: cut.append(1) or real(*a, **kw)
    )
    q, k, v = qkv(2, 2, 300, 300, 8, 1, torch.float32)
    mask = right_padding([300, 30], 300)
    causal = _Module().eval()
    causal.is_causal = True
    training = _Module().train()
    for module in (training, causal):
        sdpa_attention(module, q, k, v, mask)
    assert cut == []
    sdpa_attention(EVAL, q, k, v, mask)
    assert cut == [1]


def test_bfloat16_cut_pass_is_as_close_to_fp32_as_the_masked_call() -> None:
    q, k, v = qkv(2, 12, 512, 512, 32, 3, torch.bfloat16)
    mask = right_padding([512, 333], 512)
    want = reference(q, k, v, mask)
    got, _ = sdpa_attention(EVAL, q, k, v, mask)
    masked = F.scaled_dot_product_attention(q, k, v, attn_mask=mask).transpose(1, 2)
    live = mask[:, 0, 0, :]
    ours = (got[live].float() - want[live]).abs().max().item()
    theirs = (masked[live].float() - want[live]).abs().max().item()
    assert got.dtype == torch.bfloat16
    assert ours <= 1.5 * theirs + 1e-3, (ours, theirs)


def test_the_tiled_kernel_reads_the_one_row_mask(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RAG_RERANK_CPU_KIND", "avx2")  # tiled at every length
    q, k, v = qkv(3, 4, 40, 40, 8, 2, torch.float32)
    mask = right_padding([40, 17, 1], 40)
    got, _ = tiled_attention(EVAL, q, k, v, mask)
    live = mask[:, 0, 0, :]
    torch.testing.assert_close(got[live], reference(q, k, v, mask)[live], atol=1e-5, rtol=1e-5)


# -- a real model --------------------------------------------------------------------------------


def long_pairs() -> list[tuple[str, str]]:
    if (SCIFACT / "corpus.jsonl").exists():
        from rag_rerank_plugins.testing import beir_pairs

        return beir_pairs(SCIFACT, 1, 12)
    sentence = "the mitochondria convert energy from food into ATP for the cell"
    return [("what makes ATP", " ".join([sentence] * (1 + 2 * i))) for i in range(12)]


def test_cross_encoder_on_amx_cuts_long_passes_and_keeps_the_scores(
    real_ce_path: str, pool: ModelPool, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("RAG_RERANK_CPU_KIND", "amx")
    # BERT-family encoders run such passes on packed rows (test_cpu_packed.py); the padded cut
    # serves every other encoder on our attention: switch packing off to reach it here.
    monkeypatch.setattr(_cpu_packed, "_packable", lambda *a: None)
    cut: list[int] = []
    real = _cpu_sdpa._per_sequence_sdpa
    monkeypatch.setattr(
        _cpu_sdpa, "_per_sequence_sdpa", lambda *a, **kw: cut.append(1) or real(*a, **kw)
    )
    pairs = long_pairs()

    def spec(**options: Any) -> ModelSpec:
        options = {"score_mode": "raw", "prune_last_layer": False, **options}
        return ModelSpec(real_ce_path, device="cpu", dtype="float32", options=options)

    want = pool.score_pairs(spec(cpu_kernels=False), pairs)
    assert cut == []
    got = pool.score_pairs(spec(), pairs)
    assert cut, "no pass was cut: the test's passages are not long and uneven enough"
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-5)
    pruned = pool.score_pairs(spec(prune_last_layer=True), pairs)
    np.testing.assert_allclose(pruned, want, atol=1e-5, rtol=1e-5)


# -- the CPU pass size that goes with these kernels ----------------------------------------------


class _Encoder:
    """Just enough of a loaded model for :func:`cpu_token_budget`: a module tree with a config."""

    def __init__(self, hidden: object) -> None:
        self.config = type("Config", (), {"hidden_size": hidden})()

    def modules(self) -> list[object]:
        return [object(), self]


@pytest.mark.parametrize(
    ("kind", "dtype", "kernels", "device", "hidden", "want"),
    [
        ("amx", "bfloat16", True, "cpu", 384, 2048),  # MiniLM
        ("amx", "bfloat16", True, "cpu", 768, 2048),  # BERT-base
        ("amx", "bfloat16", True, "cpu", 1024, 1536),  # XLM-R large, bge-reranker-v2-m3
        ("amx", "bfloat16", True, "cpu", None, 1536),  # no config: counted as large
        ("amx", "bfloat16", True, "cpu", True, 1536),  # not a size
        ("amx", "float32", True, "cpu", 384, None),  # AVX-512 FP32 linears: best at the default
        ("amx", "bfloat16", False, "cpu", 384, None),  # transformers' kernels: not measured
        ("avx512_bf16", "bfloat16", True, "cpu", 384, None),  # not measured there
        ("avx2", "bfloat16", True, "cpu", 384, None),
        ("amx", "bfloat16", True, "cuda:0", 384, None),
    ],
)
def test_torch_models_prefer_bigger_cpu_passes_only_in_bf16_on_amx(
    monkeypatch: pytest.MonkeyPatch,
    kind: str,
    dtype: str,
    kernels: bool,
    device: str,
    hidden: object,
    want: int | None,
) -> None:
    from rag_rerank_plugins.backends._torch_common import cpu_token_budget

    monkeypatch.setenv("RAG_RERANK_CPU_KIND", kind)
    assert cpu_token_budget(device, dtype, kernels, _Encoder(hidden)) == want
    if want is not None:
        assert cpu_token_budget(device, dtype, kernels) == 1536, "no module: the large budget"


@pytest.mark.parametrize(("kind", "budget"), [("amx", 2048), ("avx2", 1024)])
def test_the_pool_runs_the_models_preferred_budget_unless_told_otherwise(
    real_ce_path: str, monkeypatch: pytest.MonkeyPatch, kind: str, budget: int
) -> None:
    from rag_rerank_plugins.engine_config import EngineConfig

    monkeypatch.setenv("RAG_RERANK_CPU_KIND", kind)
    spec = ModelSpec(real_ce_path, device="cpu", dtype="bfloat16")
    pairs = long_pairs()[:4]
    default = ModelPool()
    default.score_pairs(spec, pairs)
    assert default.spec_stats(spec)["token_budget"] == budget
    told = ModelPool(config=EngineConfig(token_budget=700))
    told.score_pairs(spec, pairs)
    assert told.spec_stats(spec)["token_budget"] == 700
    fp32 = ModelSpec(real_ce_path, device="cpu", dtype="float32")
    default.score_pairs(fp32, pairs)
    assert default.spec_stats(fp32)["token_budget"] == 1024
    default.clear()
    told.clear()
