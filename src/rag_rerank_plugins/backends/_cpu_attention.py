"""Self-attention for encoder models on the CPU: tiled matmul -> softmax -> matmul.

Why it exists: rerankers and embedders of the MiniLM / BERT / XLM-R family have 32-64 wide heads.
torch's CPU flash-attention kernel (what ``sdpa`` runs) calls a small GEMM per (sequence, head,
query block), so on such heads it spends most of its time in per-call overhead: on a MiniLM-L6
cross-encoder it took ~40 % of a BF16 request for ~10 % of the FLOPs. Here the scores of as many
(sequence, head) rows as fit a ~1 MB tile (one core's L2) are computed with one batched GEMM, the
softmax runs on that tile while it is still in cache, and a second batched GEMM writes the output.
On the 1 x 50 mixed-passage request that is ~1.9x faster attention and ~10-15 % off the request
(measured on an AVX512-BF16 EPYC).

**Which CPUs.** On AMX CPUs the flash kernel's GEMMs run on the tile units and the balance turns:
there torch's ``sdpa`` beat the tiled kernel from 48 keys on (2-core AMX Xeon, torch 2.13,
[batch, 12 heads, L, 32], ~1024 tokens a pass; time tiled / sdpa, BF16 with 2 threads: L=24 0.66,
48 1.06, 96 2.06, 192 3.03, 384 3.22; FP32: 0.62, 1.17, 1.33, 1.45, 1.33). The tiled kernel's
scores, FP32 softmax and casts are memory passes that the fused kernel does not make; it took
~60 % of a BF16 1 x 50 SciFact request there. So :func:`tiled_attention` hands passes with at
least :data:`SDPA_FROM_KEYS` keys for the CPU kind (:func:`rag_rerank_plugins._cpu.cpu_kind`,
``RAG_RERANK_CPU_KIND`` overrides) to torch's ``sdpa`` (:mod:`._cpu_sdpa`, which also cuts long
padded passes sequence by sequence and builds the one-row padding masks both kernels read), and
keeps the tiled kernel for the rest and for every CPU kind where sdpa was not measured faster.

**AVX512-BF16 without AMX** (AMD Zen 4 EPYC, family 25 model 17, 2 cores, torch 2.13), measured
again 2026-12-05, each setting in its own process, two alternating runs: passes of 48+ keys on
``sdpa`` (and so on packed rows, :mod:`._cpu_packed`) against the tiled kernel at every length,
MiniLM-L6 cross-encoder 1 x 50 SciFact: BF16 1632 / 1652 vs 1834 / 1886 ms, FP32 2513 / 2452 vs
2889 / 2852 ms; 1 x 50 short mixed passages BF16 695 / 718 vs 726 / 740 ms; XLM-R large 1 x 20
SciFact BF16 15.3 / 15.0 vs 16.1 / 15.5 s. The tiled kernel had won on an earlier EPYC image
with an older torch; it no longer does, so that kind takes ``sdpa`` from 48 keys too. AVX2-only
and other CPUs keep the tiled kernel (not measured on such a machine).

Numerics: scores come out of the GEMM in the model's dtype (as in transformers' ``eager``
attention), the softmax is computed in FP32, the probabilities are rounded to the model's dtype
for the second GEMM (as the flash kernel does). In FP32 this equals ``sdpa`` to ~1e-6; in BF16
the request-level error is set by the linear layers, not by attention (tested on SciFact pairs).

Scope: only bidirectional encoders on the CPU, in inference. The loaders call
:func:`use_cpu_attention`, which leaves every other model (decoders, GPU, models that do not
dispatch through transformers' ``AttentionInterface``, models loaded with another attention than
``sdpa``) on the implementation transformers chose. It is registered with transformers under
:data:`ATTENTION_NAME` the first time a model is switched to it.
"""

from __future__ import annotations

import threading
from typing import Any

from .._forksafe import ForkSafeLock
from ._cpu_sdpa import (  # light: torch is imported inside
    PER_SEQUENCE_FROM_KEYS,
    active,
    own_terms,
    packed_attention,
    padding_mask,
    sdpa_attention,
)

__all__ = ["ATTENTION_NAME", "SDPA_FROM_KEYS", "describe", "tiled_attention", "use_cpu_attention"]

ATTENTION_NAME = "rag_rerank_cpu"
#: Bytes of FP32 scores per tile: about one core's L2 (1 MB on Zen 4, 1-2 MB on recent Xeons).
#: Larger tiles spill to L3 and the softmax becomes memory-bound (measured 2x slower at 4 MB).
TILE_BYTES = 1 << 20
#: Per CPU kind: the key length from which torch's ``sdpa`` kernel is faster than the tiled one
#: (see above). A kind not listed keeps the tiled kernel at every length.
SDPA_FROM_KEYS: dict[str, int] = {"amx": 48, "avx512_bf16": 48}

_registered = False
_register_lock = ForkSafeLock()
#: Per device-worker thread: the last mask seen and its bias. transformers builds the mask once
#: per forward and hands the same tensor to every layer, so the bias is built once per forward.
_last_bias = threading.local()


def tiled_attention(
    module: Any,
    query: Any,
    key: Any,
    value: Any,
    attention_mask: Any,
    scaling: float | None = None,
    dropout: float = 0.0,
    **kwargs: Any,
) -> tuple[Any, None]:
    """transformers ``AttentionInterface`` function: ``query``/``key``/``value`` are
    [batch, heads, length, head_dim]; ``attention_mask`` is None, an additive float mask or a
    boolean mask broadcastable to [batch, 1, q_len, kv_len]. Returns [batch, q_len, heads,
    head_dim] (what transformers' attention functions return) and no weights."""
    import torch

    packing = active()
    if packing is not None and key.shape[0] == 1 and attention_mask is None:
        return packed_attention(packing, query, key, value, scaling), None
    kv_len = key.shape[2]
    sdpa_from = _sdpa_from_keys()
    if (
        (module.training and dropout > 0.0)
        or kwargs.get("is_causal")
        or module_is_causal(module)
        or (sdpa_from is not None and kv_len >= sdpa_from)
        or own_terms(query, key, kwargs)
    ):
        # Training and causal masking are not what this kernel is for, on some CPUs long
        # passes are faster in torch's own kernel, and grouped-query heads or extra score terms
        # need transformers' own function (which sdpa_attention hands them to).
        return sdpa_attention(
            module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, **kwargs
        )
    batch, heads, q_len, head_dim = query.shape
    if scaling is None:
        scaling = head_dim**-0.5
    rows = batch * heads
    q = query.reshape(rows, q_len, head_dim)
    k = key.reshape(rows, kv_len, head_dim).transpose(1, 2)
    v = value.reshape(rows, kv_len, head_dim)
    out = torch.empty((rows, q_len, head_dim), dtype=query.dtype, device=query.device)
    bias = _cached_bias(attention_mask, batch, heads, q_len, kv_len, query.dtype)
    per_tile = max(1, TILE_BYTES // (4 * q_len * kv_len))
    for start in range(0, rows, per_tile):
        stop = min(rows, start + per_tile)
        if bias is None:
            scores = torch.bmm(q[start:stop], k[start:stop]).mul_(scaling)
        else:
            scores = torch.baddbmm(bias[start:stop], q[start:stop], k[start:stop], alpha=scaling)
        probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(value.dtype)
        torch.bmm(probs, v[start:stop], out=out[start:stop])
    return out.view(batch, heads, q_len, head_dim).transpose(1, 2), None


def _sdpa_from_keys() -> int | None:
    from .._cpu import cpu_kind

    return SDPA_FROM_KEYS.get(cpu_kind())


def describe(packed_from: int | None = None) -> str:
    """What runs attention on this CPU kind, for ``stats()["kernels"]``; ``packed_from``: the
    model's encoders run passes of that many keys and more on packed rows (:mod:`._cpu_packed`)."""
    sdpa_from = _sdpa_from_keys()
    if sdpa_from is None:
        return "tiled attention"
    if packed_from is not None:
        how = f"passes of {max(sdpa_from, packed_from)}+ keys on packed rows, per sequence"
    else:
        how = f"padded passes of {PER_SEQUENCE_FROM_KEYS}+ keys per sequence"
    return f"tiled attention below {sdpa_from} keys, torch's sdpa from {sdpa_from} ({how})"


def module_is_causal(module: Any) -> bool:
    """transformers' attention modules carry ``is_causal`` (True in decoders)."""
    return bool(getattr(module, "is_causal", False))


def _cached_bias(mask: Any, batch: int, heads: int, q_len: int, kv_len: int, dtype: Any) -> Any:
    """:func:`_additive_bias`, reused while the same mask tensor comes back (the next layers)."""
    key = (batch, heads, q_len, kv_len, dtype)
    if mask is not None and getattr(_last_bias, "mask", None) is mask and _last_bias.key == key:
        return _last_bias.bias
    bias = _additive_bias(mask, batch, heads, q_len, kv_len, dtype)
    _last_bias.mask, _last_bias.key, _last_bias.bias = mask, key, bias
    return bias


def _additive_bias(mask: Any, batch: int, heads: int, q_len: int, kv_len: int, dtype: Any) -> Any:
    """The mask as an additive bias of shape [batch * heads, q_len or 1, kv_len] (or None).

    Padding masks of encoders only ever hide keys, so a mask whose rows are all alike is reduced
    to one row: [batch * heads, 1, kv_len] broadcasts over queries for free, where the full
    [batch, 1, q_len, kv_len] mask transformers builds would be copied once per head."""
    import torch

    if mask is None:
        return None
    if mask.dim() == 2:  # [batch, kv_len] padding mask
        mask = mask[:, None, None, :]
    if mask.shape[-2] > 1 and bool((mask == mask[..., :1, :]).all()):
        mask = mask[..., :1, :]
    if mask.dtype == torch.bool:
        bias = torch.zeros(mask.shape, dtype=dtype, device=mask.device)
        bias.masked_fill_(~mask, torch.finfo(dtype).min)
    else:
        bias = mask.to(dtype)
    rows = bias.shape[-2]
    return bias.expand(batch, heads, rows, kv_len).reshape(batch * heads, rows, kv_len)


def _grouped_query(config: Any) -> bool:
    """Whether the config gives fewer key/value heads than query heads (grouped-query attention,
    e.g. EmbeddingGemma's bidirectional Gemma 3): every call would go to transformers' function
    anyway (:func:`._cpu_sdpa.own_terms`), so the model keeps ``sdpa`` and its stats say so."""
    kv_heads = getattr(config, "num_key_value_heads", None)
    heads = getattr(config, "num_attention_heads", None)
    return isinstance(kv_heads, int) and isinstance(heads, int) and kv_heads != heads


def _register() -> None:
    """Make :data:`ATTENTION_NAME` known to transformers (once per process)."""
    global _registered
    with _register_lock:
        if _registered:
            return
        from transformers import AttentionInterface
        from transformers.masking_utils import AttentionMaskInterface

        AttentionInterface.register(ATTENTION_NAME, tiled_attention)
        AttentionMaskInterface.register(ATTENTION_NAME, padding_mask)
        _registered = True


def use_cpu_attention(model: Any, device: str) -> str:
    """Switch a transformers model to :func:`tiled_attention` where it applies; return the
    attention implementation the model now uses.

    It applies to bidirectional encoders on the CPU, loaded with ``sdpa`` (transformers'
    default), that dispatch through transformers' AttentionInterface, with as many key/value
    heads as query heads and no relative-position bias (T5-family encoders pass one to every
    call: :func:`._cpu_sdpa.own_terms` would hand each to transformers anyway). Every other
    model is left as loaded.
    """
    config = getattr(model, "config", None)
    current = str(getattr(config, "_attn_implementation", None))
    can_set = getattr(model, "_can_set_attn_implementation", None)
    suitable = (
        str(device).startswith("cpu")
        and current == "sdpa"
        and not getattr(config, "is_decoder", False)
        and not getattr(config, "is_encoder_decoder", False)
        and not any(module_is_causal(m) for m in model.modules())
        and not _grouped_query(config)
        and not any(hasattr(m, "relative_attention_bias") for m in model.modules())
        and callable(can_set)
        and bool(can_set())
    )
    if not suitable:
        return current
    _register()
    model.set_attn_implementation(ATTENTION_NAME)
    return str(model.config._attn_implementation)
