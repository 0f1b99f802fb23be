"""Encoder layers on packed tokens: long CPU passes without their padding rows.

Why it exists: a CPU pass is padded to a bucket length (:mod:`rag_rerank_plugins._shapes`), and
every linear layer, layer norm and residual add of every encoder layer spends the pad rows like
real ones. On SciFact (1 query x 50 passages, MiniLM-L6 cross-encoder, BF16) 16 % of the rows
were padding; attention already skipped them (:mod:`._cpu_sdpa` runs long passes sequence by
sequence). Here the encoder packs the real rows of such a pass into one row block, each
sequence rounded up to :data:`._cpu_sdpa.PER_SEQUENCE_STEP` rows (the flash kernel's tile) and
the block to :data:`._cpu_sdpa.BLOCK_STEP` rows (few distinct shapes for oneDNN's caches, issue
21); runs its layers on it; and scatters the last layer's rows back: [batch, length, hidden] in
and out, so embeddings, poolers, heads and sentence-transformers' modules run as before.
Attention runs per sequence on its own rows (:func:`._cpu_sdpa.packed_attention`); the pruned
last layer (:mod:`._first_token`) reads each sequence's first row. Padding positions of the
returned hidden states hold finite values no pooling reads (as the padded layout's do).

Where: the classifiers and encoders the CPU attention serves (``rag_rerank_cpu``), on the CPU
kinds where torch's sdpa runs long passes (:data:`._cpu_attention.SDPA_FROM_KEYS`), for passes
of :data:`PACK_FROM_KEYS`+ keys with a right-padding mask; anything else
(short passes, left padding, hidden states or attentions recorded, a KV cache, training) runs
the encoder's own forward. Exact: the same operations on the same rows (FP32 agrees to ~1e-6).
"""

from __future__ import annotations

import types
from typing import Any

from ._cpu_attention import ATTENTION_NAME, _sdpa_from_keys
from ._cpu_sdpa import Packing, active, packing_state, prefix_lengths
from ._first_token import _STATEFUL as LAYER_STATEFUL
from ._first_token import BERT_FAMILIES, _recording_outputs

__all__ = ["pack_encoders", "sequence_rows"]

#: Passes padded to fewer keys keep the padded layout (and the tiled attention kernel). 1 x 50
#: short mixed passages, BF16, packing from 256 / 128 / 64 / 48 keys against 64 in one process:
#: 270.7 vs 260.3 ms, 256.6 vs 253.9, -, 253.4 vs 253.3; SciFact 1 x 50 level.
PACK_FROM_KEYS = 64
#: Arguments that carry state from elsewhere (cross-attention, a KV cache): the own forward.
_STATEFUL = (*LAYER_STATEFUL, "use_cache")


def sequence_rows(packing: Packing, kv_len: int, device: Any) -> Any:
    """Indices, in the flattened [batch * kv_len] padded layout, of the packed rows."""
    import torch

    return torch.cat(
        [torch.arange(rows, device=device) + i * kv_len for i, rows in enumerate(packing.rows)]
    )


def pack_encoders(model: Any) -> int:
    """Give every BERT-shaped encoder inside ``model`` (BERT, RoBERTa, XLM-R, ELECTRA,
    CamemBERT: a module with a ``layer`` list whose layers have BERT's structure) the packed
    forward; return how many were switched."""
    import transformers

    if int(transformers.__version__.split(".")[0]) < 5:
        return 0
    switched = 0
    for module in model.modules():
        layers = getattr(module, "layer", None)
        if type(module).__name__ not in _ENCODERS or not layers:
            continue
        config = getattr(module, "config", None)
        if getattr(config, "is_decoder", False) or getattr(config, "add_cross_attention", False):
            continue
        if not hasattr(module, "_rag_rerank_padded_forward"):
            module._rag_rerank_padded_forward = module.forward
            module.forward = types.MethodType(_packed_forward, module)
        switched += 1
    return switched


_ENCODERS = frozenset(f"{family}Encoder" for family in BERT_FAMILIES)


def _packable(module: Any, hidden_states: Any, attention_mask: Any, extra: dict[str, Any]) -> Any:
    """The pass's :class:`Packing` when the packed forward applies, else None."""
    if (
        attention_mask is None
        or module.training
        or active() is not None
        or getattr(module.config, "_attn_implementation", None) != ATTENTION_NAME
        or any(extra.get(k) for k in _STATEFUL)
        or hidden_states.dim() != 3
        or hidden_states.device.type != "cpu"
    ):
        return None
    batch, kv_len = hidden_states.shape[:2]
    sdpa_from = _sdpa_from_keys()
    if sdpa_from is None or kv_len < max(sdpa_from, PACK_FROM_KEYS):
        return None
    import torch

    if _recording_outputs() or torch.jit.is_tracing() or torch.compiler.is_compiling():
        return None  # a graph capture (ONNX / OpenVINO export) must see the padded forward
    lengths = prefix_lengths(attention_mask, batch)
    if lengths is None:
        return None
    packing = Packing(lengths, kv_len)
    return packing if packing.total < batch * kv_len else None


def _packed_forward(
    self: Any, hidden_states: Any, attention_mask: Any = None, *args: Any, **kwargs: Any
) -> Any:
    """The encoder's forward on the packed rows of a long right-padded pass (see the module
    docstring); every other call goes to the encoder's own forward untouched."""
    packing = None if args else _packable(self, hidden_states, attention_mask, kwargs)
    if packing is None:
        return self._rag_rerank_padded_forward(hidden_states, attention_mask, *args, **kwargs)
    batch, kv_len, width = hidden_states.shape
    index = sequence_rows(packing, kv_len, hidden_states.device)
    packed = hidden_states.new_zeros((1, packing.total, width))
    packed[0, : packing.used] = hidden_states.reshape(batch * kv_len, width).index_select(0, index)
    packing_state.packing = packing
    try:
        out = self._rag_rerank_padded_forward(packed, None, **kwargs)
    finally:
        packing_state.packing = None
    last = out.last_hidden_state
    if last.shape[0] == batch and last.shape[1] == 1:
        return out  # the pruned last layer already gave each sequence's first row
    full = last.new_zeros((batch * kv_len, width))
    full.index_copy_(0, index, last[0, : packing.used])
    out.last_hidden_state = full.view(batch, kv_len, width)
    return out
