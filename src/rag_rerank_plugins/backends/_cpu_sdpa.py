"""Long CPU attention passes through torch's fused kernel, and the padding masks both kernels read.

Why it exists: on AMX and AVX512-BF16 CPUs :mod:`._cpu_attention` hands passes of many keys to
torch's flash kernel (``scaled_dot_product_attention``). Two things made that kernel spend time
on padding:

* **The mask.** For a bidirectional encoder transformers builds a [batch, 1, q_len, kv_len]
  boolean mask: one padding row repeated q_len times, built on every forward (~3.5 % of a MiniLM
  BF16 pass) and read per (query block, key block) by the kernel. :func:`padding_mask`, the mask
  function registered for our attention name, returns the padding row alone ([batch, 1, 1,
  kv_len], broadcast by both kernels), or None when nothing is padded.
* **The padded keys.** A pass is padded to a bucket length (``_shapes``: a bounded set of shapes
  keeps the kernels' per-shape caches small), and the flash kernel computes the scores and
  exponentials of masked keys like real ones. :func:`sdpa_attention` runs a long pass sequence
  by sequence, each cut to its own length rounded up to :data:`PER_SEQUENCE_STEP` keys, when that
  removes enough of the score work (:func:`per_sequence_pays`). BERT-family encoders go one
  step further and drop the padding rows of such passes before their layers
  (:mod:`._cpu_packed`); :func:`packed_attention` is their attention, one call per sequence on
  its own rows, and :class:`Packing` says where each sequence's rows are (per device thread,
  :func:`active`).

Measured (2-core AMX Xeon, torch 2.13, BF16, MiniLM-L6 cross-encoder, 1 query x 50 SciFact
passages, requests alternating in one process): 645 -> 598 ms (1.08x); FP32 1822 -> 1745 ms,
equal to 2e-7. 1 x 50 short passages: level (the per-sequence floor of 256 keys keeps them
batched). XLM-R large 1 x 20: level (attention is ~25 % there).

Exactness: a masked key contributes exp(-inf) = 0 to its row, so cutting it off changes only
the kernel's summation order. Query rows of padding positions are left zero: no real token
attends to them (they are masked or cut off as keys) and the heads read real positions only.

Standard transformers / torch imports happen inside the functions: importing this module is light.
"""

from __future__ import annotations

import itertools
import threading
from typing import Any

__all__ = [
    "BLOCK_STEP",
    "PER_SEQUENCE_FROM_KEYS",
    "PER_SEQUENCE_MAX_COST",
    "PER_SEQUENCE_STEP",
    "Packing",
    "active",
    "own_terms",
    "packed_attention",
    "packing_state",
    "padding_mask",
    "per_sequence_pays",
    "prefix_lengths",
    "sdpa_attention",
]

#: Passes handed to sdpa with at least this many keys run sequence by sequence when that cuts
#: the score work to at most PER_SEQUENCE_MAX_COST of the padded pass (:func:`per_sequence_pays`).
#: Shorter passes hold many sequences, and a call each cost more than the padding (1 x 50 short
#: passages: 2.5 % slower without this floor).
PER_SEQUENCE_FROM_KEYS = 256
PER_SEQUENCE_MAX_COST = 0.9
#: Sequences are cut to a multiple of this many keys: torch's flash kernel is fast on whole
#: 16-key tiles (AMX tiles hold 16 rows) and ~1.6x slower on a ragged tail.
PER_SEQUENCE_STEP = 16

#: Per device-worker thread: the last padding mask seen and its sequences' real lengths.
#: transformers hands the same mask tensor to every layer of one forward.
_last_lengths = threading.local()


def sdpa_attention(
    module: Any,
    query: Any,
    key: Any,
    value: Any,
    attention_mask: Any,
    scaling: float | None = None,
    dropout: float = 0.0,
    **kwargs: Any,
) -> tuple[Any, None]:
    """transformers ``AttentionInterface`` signature: torch's sdpa, sequence by sequence when
    :func:`per_sequence_pays`, else transformers' own ``sdpa_attention_forward``."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    kv_len = key.shape[2]
    usable = not (
        module.training
        or kwargs.get("is_causal")
        or getattr(module, "is_causal", False)
        or own_terms(query, key, kwargs)
    )
    lengths = _cached_lengths(attention_mask, key.shape[0]) if usable else None
    if lengths is not None and per_sequence_pays(lengths, kv_len):
        return _per_sequence_sdpa(query, key, value, lengths, attention_mask, scaling), None
    return sdpa_attention_forward(
        module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, **kwargs
    )


#: Attention-function arguments that change the result and that only transformers' own functions
#: apply (a relative-position bias, logit soft-capping, attention sinks).
_EXTRA_TERMS = ("position_bias", "softcap", "s_aux", "sinks")


def own_terms(query: Any, key: Any, kwargs: dict[str, Any]) -> bool:
    """Whether a call needs transformers' ``sdpa_attention_forward`` itself: grouped-query
    attention (fewer key than query heads, e.g. EmbeddingGemma's bidirectional Gemma 3; it
    repeats the key heads) or one of :data:`_EXTRA_TERMS`. Our kernels compute plain masked
    attention over equal head counts and would crash on the first or drop the second."""
    return key.shape[1] != query.shape[1] or any(
        kwargs.get(name) is not None for name in _EXTRA_TERMS
    )


def per_sequence_pays(lengths: list[int], kv_len: int) -> bool:
    """Whether :func:`_per_sequence_sdpa` beats one masked call for a pass whose sequences
    have ``lengths`` real tokens out of ``kv_len``: long passes (few sequences, so the per-call
    cost is small) whose score work shrinks by at least :data:`PER_SEQUENCE_MAX_COST`."""
    if kv_len < PER_SEQUENCE_FROM_KEYS:
        return False
    trimmed = sum(min(kv_len, _round_up(n)) ** 2 for n in lengths)
    return trimmed <= PER_SEQUENCE_MAX_COST * len(lengths) * kv_len**2


def _round_up(length: int) -> int:
    step = PER_SEQUENCE_STEP
    return -(-length // step) * step


def _per_sequence_sdpa(
    query: Any, key: Any, value: Any, lengths: list[int], mask: Any, scaling: float | None
) -> Any:
    """torch's sdpa on each sequence's own keys: [batch, q_len, heads, head_dim].

    Why: a pass is padded to a bucket length (``_shapes``), and the flash kernel spends the
    padded keys' scores and exponentials like real ones. Cut to the sequence's length rounded
    up to :data:`PER_SEQUENCE_STEP` keys (the kernel's tiles: 465 keys took 1.6x as long as
    464), a sequence costs its own length, and one whose length is a multiple of the step needs
    no mask. Query rows past a sequence's keys are padding positions: no real token attends to
    them, and the heads read only real positions, so they are left zero. The results are the
    masked call's (FP32: ~1e-7)."""
    import torch
    import torch.nn.functional as F

    batch, heads, q_len, head_dim = query.shape
    kv_len = key.shape[2]
    out = torch.zeros((batch, q_len, heads, head_dim), dtype=query.dtype, device=query.device)
    flat = mask.reshape(batch, kv_len)
    for i, length in enumerate(lengths):
        keys = min(kv_len, _round_up(length))
        rows = keys if q_len == kv_len else q_len  # the pruned last layer has one query row
        sub_mask = None if keys == length else flat[i, :keys].view(1, 1, 1, keys)
        got = F.scaled_dot_product_attention(
            query[i : i + 1, :, :rows],
            key[i : i + 1, :, :keys],
            value[i : i + 1, :, :keys],
            attn_mask=sub_mask,
            scale=scaling,
        )
        out[i, :rows] = got[0].transpose(0, 1)
    return out


def _cached_lengths(mask: Any, batch: int) -> list[int] | None:
    """:func:`prefix_lengths`, reused while the same mask tensor comes back (the next layers)."""
    if mask is None:
        return None
    if getattr(_last_lengths, "mask", None) is mask:
        return _last_lengths.lengths
    lengths = prefix_lengths(mask, batch)
    _last_lengths.mask, _last_lengths.lengths = mask, lengths
    return lengths


def prefix_lengths(mask: Any, batch: int) -> list[int] | None:
    """Each sequence's real length when ``mask`` is a right-padding mask as :func:`padding_mask`
    returns it (boolean [batch, 1, 1, kv_len] whose True entries form a non-empty prefix of
    each row), else None (left padding, holes, or another mask form: the masked call runs)."""
    import torch

    if mask.dtype != torch.bool or mask.dim() != 4 or tuple(mask.shape[1:3]) != (1, 1):
        return None
    flat = mask[:, 0, 0, :]
    if flat.shape[0] != batch:
        return None
    lengths = flat.sum(dim=-1)
    positions = torch.arange(flat.shape[-1], device=flat.device)
    if not bool((flat == (positions[None, :] < lengths[:, None])).all()):
        return None
    if not bool((lengths > 0).all()):
        return None
    return [int(n) for n in lengths.tolist()]


def padding_mask(
    batch_size: int,
    q_length: int,
    kv_length: int,
    q_offset: int = 0,
    kv_offset: int = 0,
    mask_function: Any = None,
    attention_mask: Any = None,
    local_size: int | None = None,
    **kwargs: Any,
) -> Any:
    """transformers mask function for :data:`ATTENTION_NAME`: an encoder's padding mask as a
    boolean [batch, 1, 1, kv_len] (None when nothing is padded); any other mask as ``sdpa`` builds
    it.

    Why: for a bidirectional encoder the 4-D [batch, 1, q_len, kv_len] mask transformers builds
    is the padding row repeated q_len times. Building it cost ~3.5 % of a MiniLM BF16 pass, and
    torch's flash kernel reads it per (query block, key block): with one broadcast row the
    kernel ran 1.16x faster (2 x 12 heads x 512 keys, BF16, AMX Xeon), with no mask 1.37x
    faster. Both kernels here read a broadcast row (:func:`_additive_bias` keeps it one row).
    """
    import torch
    from transformers.masking_utils import (
        bidirectional_mask_function,
        prepare_padding_mask,
        sdpa_mask,
    )

    plain = (
        mask_function is bidirectional_mask_function
        and local_size is None
        and q_offset == 0
        and kv_offset == 0
        and not torch.jit.is_tracing()
        and not torch.compiler.is_compiling()
    )
    padding = prepare_padding_mask(attention_mask, kv_length, kv_offset) if plain else None
    odd = padding is not None and (padding.dim() != 2 or padding.shape[0] != batch_size)
    if not plain or odd:
        return sdpa_mask(
            batch_size,
            q_length,
            kv_length,
            q_offset=q_offset,
            kv_offset=kv_offset,
            mask_function=mask_function,
            attention_mask=attention_mask,
            local_size=local_size,
            **kwargs,
        )
    if padding is None or bool(padding.all()):
        return None
    return padding.to(torch.bool)[:, None, None, :]


#: Packed passes (:mod:`._cpu_packed`): the block is rounded up to a multiple of this, so passes
#: of up to 1536 tokens make at most 24 distinct row counts for oneDNN's per-shape caches.
BLOCK_STEP = 64
#: The thread's packed pass, set by :mod:`._cpu_packed` around its encoder's layers.
packing_state = threading.local()


class Packing:
    """Where each sequence of a packed pass lives: ``offsets[i]`` its first row, ``rows[i]``
    its rows (its ``lengths[i]`` real tokens rounded up to :data:`PER_SEQUENCE_STEP`, the flash
    kernel's tile), ``used`` their sum, ``total`` the block (``used`` rounded up to
    :data:`BLOCK_STEP`; the rows past ``used`` are zeros no sequence reads)."""

    def __init__(self, lengths: list[int], kv_len: int) -> None:
        self.lengths = lengths
        self.rows = [min(kv_len, _round_up(n)) for n in lengths]
        self.offsets = list(itertools.accumulate(self.rows[:-1], initial=0))
        self.used = sum(self.rows)
        self.total = -(-self.used // BLOCK_STEP) * BLOCK_STEP
        self._masks: dict[int, Any] = {}

    def key_mask(self, i: int, device: Any) -> Any:
        """Sequence ``i``'s key mask for sdpa ([1, 1, 1, rows], True on its real tokens), or
        None when it fills its rows; built once per pass, read by every layer."""
        if self.rows[i] == self.lengths[i]:
            return None
        if i not in self._masks:
            import torch

            keys = torch.arange(self.rows[i], device=device) < self.lengths[i]
            self._masks[i] = keys.view(1, 1, 1, self.rows[i])
        return self._masks[i]


def active() -> Packing | None:
    """The packing of the pass this thread is running (:mod:`._cpu_packed`), or None."""
    return getattr(packing_state, "packing", None)


def packed_attention(
    packing: Packing, query: Any, key: Any, value: Any, scaling: float | None
) -> Any:
    """torch's sdpa per sequence of a packed pass: ``key``/``value`` are [1, heads, total, dim];
    ``query`` is the same (every row) or [batch, heads, 1, dim] (each sequence's first row, the
    pruned last layer). Returns [1, total, heads, dim] or [batch, 1, heads, dim]; rows outside
    the sequences stay zero (no real token reads them)."""
    import torch.nn.functional as F

    heads, head_dim = query.shape[1], query.shape[3]
    first_only = query.shape[0] == len(packing.lengths) and query.shape[2] == 1
    if first_only:
        out = query.new_zeros((query.shape[0], 1, heads, head_dim))
    else:
        out = query.new_zeros((1, query.shape[2], heads, head_dim))
    for i, (start, rows) in enumerate(zip(packing.offsets, packing.rows, strict=True)):
        stop = start + rows
        mask = packing.key_mask(i, query.device)
        q = query[i : i + 1] if first_only else query[:, :, start:stop]
        got = F.scaled_dot_product_attention(
            q, key[:, :, start:stop], value[:, :, start:stop], attn_mask=mask, scale=scaling
        )
        if first_only:
            out[i] = got[0].transpose(0, 1)
        else:
            out[0, start:stop] = got[0].transpose(0, 1)
    return out
