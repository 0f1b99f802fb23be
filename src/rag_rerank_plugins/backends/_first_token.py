"""The last encoder layer of a cross-encoder, computed for the first token only.

Why it exists: a BERT-family sequence classifier (ms-marco MiniLM, bge-reranker's XLM-R, ...)
reads one position of the last layer, the first token ([CLS] / <s>): BERT's pooler and the
RoBERTa / XLM-R / ELECTRA classification heads all take ``hidden_states[:, 0]``. Every other
position of the last layer is computed and thrown away. In that layer only the keys and values
need every position (the first token attends to all of them); the query, the attention output
projection, both feed-forward matmuls and the two layer norms need one row per sequence. That
removes ~10/12 of the last layer's matmul FLOPs: ~14 % of a 6-layer MiniLM request, ~3.5 % of a
24-layer XLM-R large, on every device.

Exact by construction (the same operations on the same inputs; only GEMM row counts differ, so
FP32 results agree to rounding, ~1e-6). The hidden state the model returns is then one position
long, so it is applied only where the backend owns the model and reads nothing but the logits:
the ``cross-encoder`` and ``flag-reranker`` backends' sequence classifiers and the
``onnx-cross-encoder`` export, on transformers 5, in inference, with an attention
implementation whose masks we know (``sdpa``, ``eager`` and this package's CPU kernel). A call
that records hidden states or attentions (``output_hidden_states`` / ``output_attentions``, by
argument or config) runs the layer's own forward. Backend option ``prune_last_layer=False``
keeps transformers' forward throughout.
"""

from __future__ import annotations

import inspect
import sys
import types
from typing import Any

from ._cpu_attention import ATTENTION_NAME  # light: torch is imported inside its functions
from ._cpu_sdpa import active

__all__ = ["BERT_FAMILIES", "CLASSIFIERS", "first_token_last_layer"]

#: transformers' model families whose encoder layers have BERT's structure (attention.self.
#: {query,key,value}, attention.output, intermediate, output; MiniLM checkpoints are BERT): the
#: class-name prefixes the pruned last layer, packed rows and fused residual adds recognise.
BERT_FAMILIES = ("Bert", "Roberta", "XLMRoberta", "Camembert", "Electra")
#: Sequence classifiers of those families: their head reads only position 0 of the last layer.
CLASSIFIERS = frozenset(f"{family}ForSequenceClassification" for family in BERT_FAMILIES)
#: Attention implementations whose 4-D masks are [batch, 1, q_len, kv_len] (or None), so the
#: first query row is a slice. Flash / flex attention take other mask forms: left alone.
_MASK_FORMS = frozenset({"sdpa", "eager", ATTENTION_NAME})


def first_token_last_layer(model: Any) -> int:
    """Make the last encoder layer of every supported classifier inside ``model`` compute only
    the first position; return how many layers were switched (0 when none applies)."""
    import transformers

    if int(transformers.__version__.split(".")[0]) < 5:
        return 0  # 4.x layers take other arguments and return tuples: not worth a second path
    switched = 0
    for module in model.modules():
        if type(module).__name__ not in CLASSIFIERS:
            continue
        config = module.config
        if config.is_decoder or getattr(config, "add_cross_attention", False):
            continue
        layers = getattr(getattr(module.base_model, "encoder", None), "layer", None)
        if not layers or not _bert_shaped(layers[-1]):
            continue
        layer = layers[-1]
        if not hasattr(layer, "_rag_rerank_full_forward"):
            # The layer's own parameter names (5.24 renamed past_key_values to cache): calls
            # are bound against them, so a renamed or new argument is never passed twice.
            signature = inspect.signature(layer.forward)
            layer._rag_rerank_signature = signature
            layer._rag_rerank_var_keyword = next(
                (p.name for p in signature.parameters.values() if p.kind is p.VAR_KEYWORD), None
            )
            layer._rag_rerank_full_forward = layer.forward
            layer.forward = types.MethodType(_first_token_forward, layer)
        switched += 1
    return switched


def _bert_shaped(layer: Any) -> bool:
    attention = getattr(layer, "attention", None)
    self_attention = getattr(attention, "self", None)
    return (
        all(hasattr(self_attention, name) for name in ("query", "key", "value", "scaling"))
        and hasattr(attention, "output")
        and hasattr(layer, "intermediate")
        and hasattr(layer, "output")
        and not getattr(layer, "chunk_size_feed_forward", 0)
        and not getattr(layer, "is_decoder", False)
    )


#: Layer arguments that carry state from elsewhere (cross-attention, a KV cache): a call with
#: any of them set runs the layer's own forward.
_STATEFUL = ("encoder_hidden_states", "past_key_values", "past_key_value", "cache")


def _first_token_forward(self: Any, *args: Any, **kwargs: Any) -> Any:
    """The layer's forward for position 0 only: [batch, seq, hidden] -> [batch, 1, hidden]. A
    call this does not cover goes to the layer's own forward, with its arguments untouched."""
    import torch

    attention = self.attention.self
    interface = _attention_function(attention)
    try:
        named = dict(self._rag_rerank_signature.bind(*args, **kwargs).arguments)
    except TypeError:  # not a call the layer itself would accept: let it say so
        return self._rag_rerank_full_forward(*args, **kwargs)
    if interface is None or self.training:
        return self._rag_rerank_full_forward(*args, **kwargs)
    var_keyword = self._rag_rerank_var_keyword
    extra = dict(named.pop(var_keyword, {})) if var_keyword else {}
    hidden_states = named.get("hidden_states")
    attention_mask = named.get("attention_mask")
    if (
        hidden_states is None
        or any(named.get(k) is not None or extra.get(k) is not None for k in _STATEFUL)
        or not (attention_mask is None or attention_mask.dim() == 4)
    ):
        return self._rag_rerank_full_forward(*args, **kwargs)
    for key in (*_STATEFUL, "encoder_attention_mask"):
        extra.pop(key, None)
    rows, length = hidden_states.shape[:2]  # [batch, seq] or, packed, [1, rows of the block]
    packing = active()
    if packing is not None and rows == 1 and attention_mask is None:
        # A packed pass (._cpu_packed): each sequence's first token is its first row.
        starts = torch.tensor(packing.offsets, device=hidden_states.device)
        first = hidden_states[0].index_select(0, starts).unsqueeze(1)
    else:
        first = hidden_states[:, :1]
    batch = first.shape[0]
    width = attention.attention_head_size
    query = attention.query(first).view(batch, 1, -1, width).transpose(1, 2)
    key = attention.key(hidden_states).view(rows, length, -1, width).transpose(1, 2)
    value = attention.value(hidden_states).view(rows, length, -1, width).transpose(1, 2)
    if attention_mask is not None and attention_mask.shape[-2] > 1:
        attention_mask = attention_mask[:, :, :1, :]
    scaling = attention.scaling
    context, _ = interface(
        attention, query, key, value, attention_mask, dropout=0.0, scaling=scaling, **extra
    )
    context = context.reshape(batch, 1, -1).contiguous()
    attended = self.attention.output(context, first)
    return self.output(self.intermediate(attended), attended)


def _attention_function(attention: Any) -> Any:
    """What the attention module itself would call, or None where this layer must not prune:
    a mask form we do not slice, or a call that records hidden states or attentions."""
    config = attention.config
    implementation = getattr(config, "_attn_implementation", None)
    if implementation not in _MASK_FORMS or _recording_outputs():
        return None
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    # "eager" is the function the model's own file defines; the rest are registered.
    eager = getattr(sys.modules[type(attention).__module__], "eager_attention_forward", None)
    return ALL_ATTENTION_FUNCTIONS.get_interface(implementation, eager)


def _recording_outputs() -> bool:
    """Whether the running forward records layer outputs (``output_hidden_states`` /
    ``output_attentions``, by argument or config): transformers 5 collects them with hooks on
    the layers, switched on by this context variable. When it cannot be read, assume it does."""
    try:
        from transformers.utils.output_capturing import _active_collector
    except ImportError:
        return True
    collected = _active_collector.get()
    return bool(collected) and any(key != "_hidden_states_layers" for key in collected)
