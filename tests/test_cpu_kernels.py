"""The CPU kernels of the sentence-transformers backends (option ``cpu_kernels``, default on):
tiled attention and packed oneDNN linears give the scores and vectors of transformers' own
kernels, on padded mixed-length batches, under threads; they stay off where they do not apply
(decoders, quantized layers, ``cpu_kernels=False``); stats say what runs. On AMX CPUs passes of
48 keys or more go to torch's ``sdpa`` (faster there); the CPU kind comes from
``RAG_RERANK_CPU_KIND`` in these tests, never from the host.

Float32 comparisons are exact to 1e-5. BF16 is checked against issue 12's quality bound on real
MiniLM weights (max error <= 2 % of the FP32 score range, Spearman >= 0.99).
"""

from __future__ import annotations

import concurrent.futures as cf
from pathlib import Path
from typing import Any

import numpy as np
import pytest

pytest.importorskip("torch")
pytest.importorskip("sentence_transformers")

import torch

from rag_rerank_plugins import ModelPool, ModelSpec
from rag_rerank_plugins.backends import _cpu_attention
from rag_rerank_plugins.backends._cpu_attention import tiled_attention, use_cpu_attention
from rag_rerank_plugins.backends._cpu_linear import (
    PackedLinear,
    fuse_residual_adds,
    pack_linears,
    packing_supported,
)
from rag_rerank_plugins.backends._first_token import CLASSIFIERS, first_token_last_layer
from rag_rerank_plugins.exceptions import ConfigurationError

F = torch.nn.functional
SCIFACT = Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "scifact"


def qkv(batch: int, heads: int, length: int, dim: int, dtype: Any = torch.float32) -> list[Any]:
    gen = torch.Generator().manual_seed(batch * 1000 + length)
    # The layout transformers hands over: [batch, length, heads, dim] viewed as [b, h, l, d].
    return [
        (torch.randn(batch, length, heads, dim, generator=gen) * 2).to(dtype).transpose(1, 2)
        for _ in range(3)
    ]


def reference(q: Any, k: Any, v: Any, mask: Any) -> Any:
    """FP32 SDPA, returned in transformers' [batch, length, heads, dim] layout."""
    out = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), attn_mask=mask)
    return out.transpose(1, 2)


def padding_mask(lengths: list[int], total: int) -> Any:
    """The boolean [batch, 1, q, kv] mask transformers' sdpa masks build for padded encoders."""
    keep = torch.arange(total)[None, :] < torch.tensor(lengths)[:, None]
    return keep[:, None, None, :].expand(len(lengths), 1, total, total).contiguous()


class _Module(torch.nn.Module):
    pass


MODULE = _Module().eval()


@pytest.fixture
def tiled_everywhere(monkeypatch: pytest.MonkeyPatch) -> None:
    """A CPU kind whose attention is the tiled kernel at every length."""
    monkeypatch.setenv("RAG_RERANK_CPU_KIND", "avx2")


@pytest.mark.parametrize("tile_bytes", [1 << 20, 3000])  # one tile, and one row per tile
def test_tiled_attention_equals_sdpa_for_every_mask_form(
    monkeypatch: pytest.MonkeyPatch, tile_bytes: int, tiled_everywhere: None
) -> None:
    monkeypatch.setattr(_cpu_attention, "TILE_BYTES", tile_bytes)
    q, k, v = qkv(3, 4, 9, 8)
    key_mask = padding_mask([9, 4, 1], 9)
    per_query = key_mask.clone()
    per_query[1, 0, 2, :2] = False  # rows differ: not a pure padding mask
    additive = torch.zeros(3, 1, 1, 9).masked_fill(~key_mask[:, :, :1, :], float("-inf"))
    for mask, want_mask in [
        (None, None),
        (key_mask, key_mask),
        (per_query, per_query),
        (additive, additive),
        (key_mask[:, 0, 0, :], key_mask),  # a 2-D [batch, kv] padding mask
    ]:
        got, weights = tiled_attention(MODULE, q, k, v, mask)
        assert weights is None
        assert got.shape == (3, 9, 4, 8)
        torch.testing.assert_close(got, reference(q, k, v, want_mask), atol=1e-5, rtol=1e-5)


def test_tiled_attention_bfloat16_is_as_close_as_transformers_eager_attention(
    tiled_everywhere: None,
) -> None:
    """BF16 scores, FP32 softmax: the numerics of transformers' eager attention (the flash
    kernel keeps FP32 scores; at the model level both stay within BF16's quality bound)."""
    from transformers.models.bert.modeling_bert import eager_attention_forward

    q, k, v = qkv(2, 12, 120, 32, torch.bfloat16)
    mask = padding_mask([120, 77], 120)
    want = reference(q, k, v, mask)
    got, _ = tiled_attention(MODULE, q, k, v, mask)
    additive = torch.zeros(mask.shape, dtype=torch.bfloat16).masked_fill(~mask, -1e30)
    eager, _ = eager_attention_forward(MODULE, q, k, v, additive)
    ours = (got.float() - want).abs().max().item()
    theirs = (eager.float() - want).abs().max().item()
    assert got.dtype == torch.bfloat16
    assert ours <= 1.5 * theirs, (ours, theirs)


@pytest.mark.parametrize(
    ("kind", "keys", "sdpa_calls"),
    [
        ("amx", 47, 0),
        ("amx", 48, 1),
        ("amx", 300, 1),
        ("avx512_bf16", 47, 0),
        ("avx512_bf16", 48, 1),  # measured faster on a Zen 4 EPYC (see _cpu_attention)
        ("avx2", 300, 0),
        ("other", 300, 0),
    ],
)
def test_long_passes_run_torch_sdpa_only_where_it_was_measured_faster(
    monkeypatch: pytest.MonkeyPatch, kind: str, keys: int, sdpa_calls: int
) -> None:
    from transformers.integrations import sdpa_attention

    calls: list[int] = []
    real = sdpa_attention.sdpa_attention_forward

    def spy(*args: Any, **kwargs: Any) -> Any:
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(sdpa_attention, "sdpa_attention_forward", spy)
    monkeypatch.setenv("RAG_RERANK_CPU_KIND", kind)
    q, k, v = qkv(3, 4, keys, 8)
    mask = padding_mask([keys, keys // 2, 1], keys)
    got, weights = tiled_attention(MODULE, q, k, v, mask)
    assert len(calls) == sdpa_calls
    assert weights is None
    assert got.shape == (3, keys, 4, 8)
    # Both paths give transformers' layout and sdpa's values; padded queries are don't-care.
    live = mask[:, 0, 0, :]
    want = reference(q, k, v, mask)
    torch.testing.assert_close(got[live], want[live], atol=1e-5, rtol=1e-5)
    sdpa_kinds = ("amx", "avx512_bf16")
    expected = "below 48 keys, torch's sdpa from 48" if kind in sdpa_kinds else "tiled attention"
    assert expected in _cpu_attention.describe()


def test_packed_linear_equals_linear_and_fuses_exact_gelu() -> None:
    if not packing_supported("float32"):
        pytest.skip("this torch build has no oneDNN linear operators")
    torch.manual_seed(0)
    linear = torch.nn.Linear(96, 80).eval()
    x = torch.randn(2, 7, 96)
    with torch.inference_mode():
        want = linear(x)
        torch.testing.assert_close(PackedLinear(linear)(x), want, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(
            PackedLinear(linear, gelu=True)(x), F.gelu(want), atol=1e-5, rtol=1e-5
        )
        for rows in (1, 3, 1500):  # any row count, not only the packing hint
            xs = torch.randn(rows, 96)
            torch.testing.assert_close(PackedLinear(linear)(xs), linear(xs), atol=1e-5, rtol=1e-5)


def _tiny_bert(hidden_act: str = "gelu") -> Any:
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=100,
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=128,
        hidden_act=hidden_act,
        num_labels=1,
    )
    return BertForSequenceClassification(config).eval()


def test_pack_linears_keeps_outputs_and_fuses_only_exact_gelu() -> None:
    if not packing_supported("float32"):
        pytest.skip("this torch build has no oneDNN linear operators")
    ids = torch.randint(0, 100, (3, 11), generator=torch.Generator().manual_seed(1))
    attention = (torch.arange(11)[None, :] < torch.tensor([[11], [6], [2]])).long()
    for act, fused in [("gelu", 2), ("gelu_new", 0)]:
        model = _tiny_bert(act)
        with torch.inference_mode():
            want = model(input_ids=ids, attention_mask=attention).logits
            # 2 layers x (q, k, v, attention output, intermediate, output) + pooler; the
            # one-logit classifier is too narrow to gain anything and stays nn.Linear.
            assert pack_linears(model) == 13
            got = model(input_ids=ids, attention_mask=attention).logits
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
        packed = [m for m in model.modules() if isinstance(m, PackedLinear)]
        assert sum(m.gelu for m in packed) == fused
        assert isinstance(model.classifier, torch.nn.Linear)


def _tiny_classifier(name: str) -> Any:
    import transformers

    config = getattr(transformers, name.replace("ForSequenceClassification", "Config"))(
        vocab_size=100,
        hidden_size=64,
        num_hidden_layers=3,
        num_attention_heads=4,
        intermediate_size=96,
        max_position_embeddings=40,
        num_labels=1,
    )
    torch.manual_seed(0)
    return getattr(transformers, name)(config).eval()


@pytest.mark.parametrize("prune", [False, True])
@pytest.mark.parametrize("name", sorted(CLASSIFIERS))
def test_residual_adds_fuse_into_every_family_and_keep_the_logits(name: str, prune: bool) -> None:
    """Each layer's two add-and-norm blocks take the fused add; the logits stay those of the
    unpacked model, padded or not, with and without the pruned last layer (its blocks read a
    first-row slice as the residual)."""
    if not packing_supported("float32"):
        pytest.skip("this torch build has no oneDNN linear operators")
    model = _tiny_classifier(name)
    ids = torch.randint(5, 100, (3, 13), generator=torch.Generator().manual_seed(2))
    mask = (torch.arange(13)[None, :] < torch.tensor([[13], [7], [1]])).long()
    with torch.inference_mode():
        want = model(input_ids=ids, attention_mask=mask).logits
        assert pack_linears(model) > 0
        assert fuse_residual_adds(model) == 2 * 3
        assert fuse_residual_adds(model) == 0  # a second call changes nothing
        if prune:
            assert first_token_last_layer(model) == 1
        calls: list[int] = []
        real_add = PackedLinear.forward_add

        def counted(self: PackedLinear, x: Any, other: Any) -> Any:
            calls.append(1)
            return real_add(self, x, other)

        PackedLinear.forward_add = counted  # type: ignore[method-assign]
        try:
            got = model(input_ids=ids, attention_mask=mask).logits
        finally:
            PackedLinear.forward_add = real_add  # type: ignore[method-assign]
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    assert len(calls) == 2 * 3


def _fused_output_block() -> Any:
    """The first layer's ``BertOutput`` of a tiny classifier, packed with its add fused."""
    if not packing_supported("float32"):
        pytest.skip("this torch build has no oneDNN linear operators")
    model = _tiny_classifier("BertForSequenceClassification")
    pack_linears(model)
    fuse_residual_adds(model)
    return model.bert.encoder.layer[0].output


def test_fused_add_blocks_run_their_own_forward_in_training_mode() -> None:
    """Dropout belongs to training; a model put back in training mode must not skip it."""
    block = _fused_output_block()
    x, residual = torch.randn(2, 5, 96), torch.randn(2, 5, 64)
    block.train()
    torch.manual_seed(3)
    with torch.no_grad():
        trained = block(x, residual)
        torch.manual_seed(3)
        dense = block.dense(x)
        torch.manual_seed(3)
        expected = block.LayerNorm(block.dropout(dense) + residual)
    block.eval()
    torch.manual_seed(3)
    with torch.no_grad():
        torch.testing.assert_close(trained, expected)
        torch.testing.assert_close(
            block(x, residual), block.LayerNorm(dense + residual), atol=1e-5, rtol=1e-5
        )


def test_fused_add_blocks_leave_mixed_dtypes_and_broadcasts_to_their_own_forward() -> None:
    """What the plain ``dense(x) + residual`` would promote or broadcast is not the oneDNN
    operator's to guess: such calls run the block's class forward and give its result."""
    block = _fused_output_block()
    x = torch.randn(2, 5, 96)
    with torch.inference_mode():
        dense = block.dense(x)
        for residual in (torch.randn(2, 5, 64, dtype=torch.bfloat16), torch.randn(2, 1, 64)):
            want = block.LayerNorm(dense + residual)
            torch.testing.assert_close(block(x, residual), want)


def test_nothing_is_packed_where_oneDNN_is_missing(monkeypatch: pytest.MonkeyPatch) -> None:
    from rag_rerank_plugins.backends import _cpu_linear

    monkeypatch.setattr(_cpu_linear, "packing_supported", lambda dtype: False)
    model = _tiny_bert()
    assert pack_linears(model) == 0
    assert not any(isinstance(m, PackedLinear) for m in model.modules())


def test_attention_is_left_alone_on_decoders_and_other_devices() -> None:
    from transformers import GPT2Config, GPT2LMHeadModel

    decoder = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=50))
    decoder.set_attn_implementation("sdpa")
    assert use_cpu_attention(decoder, "cpu") == "sdpa"
    encoder = _tiny_bert()
    encoder.set_attn_implementation("sdpa")
    assert use_cpu_attention(encoder, "cuda:0") == "sdpa"
    assert use_cpu_attention(encoder, "cpu") == _cpu_attention.ATTENTION_NAME


# -- through the pool ---------------------------------------------------------------------------


def _spec(
    path: str, dtype: str = "float32", max_length: int | None = None, **options: Any
) -> ModelSpec:
    return ModelSpec(
        path,
        device="cpu",
        dtype=dtype,
        max_length=max_length,
        options={"score_mode": "raw", **options},
    )


def mixed_pairs() -> list[tuple[str, str]]:
    long = " ".join(["the cell converts energy from food into ATP"] * 80)  # truncated
    passages = [
        "Paris is the capital of France.",
        "Photosynthesis converts light energy into chemical energy in plants and algae.",
        "A",
        long,
        "Qubits can be in superposition; classical bits are either zero or one.",
    ]
    queries = ["what produces energy in cells", "capital of France", "Qu'est-ce qu'un qubit ?"]
    return [(q, p) for q in queries for p in passages]


@pytest.mark.parametrize("kind", ["avx2", "amx"])  # tiled everywhere / sdpa for long passes
def test_cross_encoder_scores_equal_transformers_kernels_and_stats_say_which_run(
    real_ce_path: str, pool: ModelPool, monkeypatch: pytest.MonkeyPatch, kind: str
) -> None:
    monkeypatch.setenv("RAG_RERANK_CPU_KIND", kind)
    pairs = mixed_pairs()
    plain = _spec(real_ce_path, cpu_kernels=False, prune_last_layer=False)
    want = pool.score_pairs(plain, pairs)
    got = pool.score_pairs(_spec(real_ce_path, prune_last_layer=False), pairs)
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-5)
    ours = pool.spec_stats(_spec(real_ce_path, prune_last_layer=False))["kernels"]
    assert ours.startswith("tiled attention")
    assert ("torch's sdpa from 48" in ours) == (kind == "amx"), ours
    # 6 layers x (q, k, v, attention output, intermediate, output) + pooler; the one-logit
    # classifier stays nn.Linear.
    assert ("37 packed oneDNN linear layers" in ours) == packing_supported("float32"), ours
    off = pool.spec_stats(plain)["kernels"]
    assert off == "transformers' kernels (cpu_kernels=False)"


def test_embedder_vectors_equal_transformers_kernels(minilm_path: str, pool: ModelPool) -> None:
    texts = [p for _, p in mixed_pairs()[:5]]
    base = ModelSpec(minilm_path, backend="sentence-transformers", device="cpu", dtype="float32")
    off = ModelSpec(
        minilm_path,
        backend="sentence-transformers",
        device="cpu",
        dtype="float32",
        options={"cpu_kernels": False},
    )
    want = pool.embed(off, texts)
    got = pool.embed(base, texts)
    np.testing.assert_allclose(np.array(got), np.array(want), atol=1e-5)


def test_sixteen_threads_get_the_sequential_scores(real_ce_path: str, pool: ModelPool) -> None:
    pairs = mixed_pairs()
    spec = _spec(real_ce_path)
    requests = [pairs[i % 5 :] + pairs[: i % 5] for i in range(16)]
    want = [pool.score_pairs(spec, r) for r in requests]
    with cf.ThreadPoolExecutor(16) as ex:
        got = list(ex.map(lambda r: pool.score_pairs(spec, r), requests))
    np.testing.assert_allclose(np.array(got), np.array(want), atol=1e-5, rtol=1e-5)
    assert pool.spec_stats(spec)["loads"] == 1


@pytest.mark.parametrize("value", ["yes", 1, None])
def test_cpu_kernels_option_must_be_a_bool(real_ce_path: str, pool: ModelPool, value: Any) -> None:
    with pytest.raises(ConfigurationError, match="cpu_kernels"):
        pool.score_pairs(_spec(real_ce_path, cpu_kernels=value), [("q", "p")])


def scifact_pairs(n_queries: int, per_query: int) -> list[tuple[str, str]]:
    from rag_rerank_plugins.testing import beir_pairs

    if not (SCIFACT / "corpus.jsonl").exists():
        pytest.skip("../shared/data/scifact is not available")
    return beir_pairs(SCIFACT, n_queries, per_query)


def test_bfloat16_with_our_kernels_holds_issue_12_quality_bound(
    real_ce_path: str, pool: ModelPool
) -> None:
    """Runs on every CPU (BF16 is emulated, slowly, where it is not native: few pairs)."""
    pairs = scifact_pairs(6, 8)
    want = pool.score_pairs(_spec(real_ce_path, max_length=256), pairs)
    spread = max(want) - min(want)
    for kernels in (True, False):
        got = pool.score_pairs(
            _spec(real_ce_path, dtype="bfloat16", cpu_kernels=kernels, max_length=256), pairs
        )
        error = max(abs(a - b) for a, b in zip(got, want, strict=True)) / spread
        ra, rb = np.argsort(np.argsort(got)), np.argsort(np.argsort(want))
        assert error <= 0.02, (kernels, error)
        assert float(np.corrcoef(ra, rb)[0, 1]) >= 0.99, kernels


def test_a_source_lookup_racing_another_threads_parse_does_not_fail_the_load(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Finding a class's source runs ast.parse on its module, which CPython 3.10/3.11 cannot
    run in two threads at once ('SystemError: AST constructor recursion depth mismatch'):
    two models loading at once failed one load. The lookup is now serialised, cached and
    retried on that error."""
    import inspect

    from transformers.models.t5.modeling_t5 import T5DenseActDense

    from rag_rerank_plugins.backends import _cpu_linear

    real = inspect.getsource
    failures = iter([SystemError("AST constructor recursion depth mismatch")] * 2)

    def racing(obj: Any) -> str:
        error = next(failures, None)
        if error is not None:
            raise error
        return real(obj)

    monkeypatch.setattr(_cpu_linear, "_SOURCES", {})
    monkeypatch.setattr(inspect, "getsource", racing)
    assert "wo" in _cpu_linear._weights_read_by(T5DenseActDense)
    calls = []
    monkeypatch.setattr(inspect, "getsource", lambda obj: calls.append(obj) or real(obj))
    assert "wo" in _cpu_linear._weights_read_by(T5DenseActDense)
    assert T5DenseActDense not in calls, "a class's source is looked up once"
