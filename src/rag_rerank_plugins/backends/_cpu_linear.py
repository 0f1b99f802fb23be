"""Linear layers on the CPU as oneDNN matmuls with weights packed once at load.

Why it exists: ``nn.Linear`` on the CPU re-lays out its weight for the GEMM kernel on every call,
and in FP32 it goes to a BLAS that, on some CPUs (AMD's, with MKL), does not use AVX-512. oneDNN
with a weight packed once for the host's kernel is faster everywhere we measured: on a 2-core AMD
EPYC, 384x1536 layers ran 1.06x faster in BF16 and 2.2x faster in FP32. The encoder's GELU is
fused into the matmul that feeds it (computed on the FP32 accumulator before rounding, which also
makes BF16 slightly more exact), saving one pass over the widest activation; likewise the residual
add in front of each sub-layer's layer norm (BERT's ``SelfOutput`` / ``Output`` blocks), which
otherwise reads and writes every row once more (an add was 3.6 % of a BF16 MiniLM request).

This is what intel-extension-for-pytorch's ``optimize`` and torch.compile's CPU "freezing" do with
the same oneDNN operators (``torch.ops.mkldnn._reorder_linear_weight`` / ``_linear_pointwise``);
here without a compiler, a graph capture or an extra package. :func:`pack_linears` probes the
operators once per (dtype) and does nothing where they are missing or fail, so a torch build
without oneDNN keeps plain ``nn.Linear``.
"""

from __future__ import annotations

import functools
import inspect
import logging
import re
import threading
import types
from typing import Any

import torch  # this module is imported only by the torch backends' loaders

from ._first_token import BERT_FAMILIES

__all__ = ["PackedLinear", "fuse_residual_adds", "pack_linears", "packing_supported"]

log = logging.getLogger("rag_rerank_plugins")

#: Row-count hint for the packed layout; any number of rows works at run time. A CPU pass holds
#: about this many tokens (EngineConfig's CPU token budget).
BATCH_HINT = 1024
#: Layers narrower than this (classifier heads, 1-8 outputs) gain nothing from packing.
MIN_FEATURES = 64


@functools.cache
def packing_supported(dtype_name: str) -> bool:
    """Whether this torch build runs packed oneDNN linears (with GELU or a residual add fused)
    in ``dtype_name`` on this CPU, checked once with a tiny layer against ``nn.functional``."""
    try:
        if not torch.backends.mkldnn.is_available():
            return False
        dtype = getattr(torch, dtype_name)
        gen = torch.Generator().manual_seed(0)
        weight = torch.randn(64, 64, generator=gen).to(dtype)
        bias = torch.randn(64, generator=gen).to(dtype)
        x = torch.randn(3, 64, generator=gen).to(dtype)
        packed = torch.ops.mkldnn._reorder_linear_weight(weight, BATCH_HINT)
        with torch.inference_mode():
            got = torch.ops.mkldnn._linear_pointwise(x, packed, bias, "gelu", [], "none")
            want = torch.nn.functional.gelu(torch.nn.functional.linear(x, weight, bias))
            added = torch.ops.mkldnn._linear_pointwise.binary(x, x, packed, bias, "add")
            want_added = torch.nn.functional.linear(x, weight, bias) + x
        tolerance = 1e-4 if dtype == torch.float32 else 0.1
        return all(
            torch.allclose(a.float(), b.float(), atol=tolerance, rtol=tolerance)
            for a, b in ((got, want), (added, want_added))
        )
    except Exception as exc:  # a build without these operators, or a CPU oneDNN refuses
        log.debug("rag-rerank: packed oneDNN linears unavailable for %s: %r", dtype_name, exc)
        return False


class PackedLinear(torch.nn.Module):
    """``nn.Linear`` (optionally followed by exact GELU) as one oneDNN matmul on a packed weight.

    The packed weight replaces the layer's weight (the same bytes, in oneDNN's blocked layout),
    so it is inference-only and not saved by ``state_dict``: the pool never saves models.
    """

    def __init__(self, linear: torch.nn.Linear, gelu: bool = False) -> None:
        super().__init__()
        self.in_features = linear.in_features
        self.out_features = linear.out_features
        self.gelu = gelu
        weight = linear.weight.detach()
        self.register_buffer(
            "packed_weight",
            torch.ops.mkldnn._reorder_linear_weight(weight, BATCH_HINT),
            persistent=False,
        )
        bias = linear.bias
        self.register_buffer("bias", None if bias is None else bias.detach(), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.gelu:
            return torch.ops.mkldnn._linear_pointwise(
                x, self.packed_weight, self.bias, "gelu", [], "none"
            )
        return torch.ops.mkldnn._linear_pointwise(x, self.packed_weight, self.bias, "none", [], "")

    def forward_add(self, x: torch.Tensor, other: torch.Tensor) -> torch.Tensor:
        """``linear(x) + other`` as one matmul: the add runs on the FP32 accumulator."""
        return torch.ops.mkldnn._linear_pointwise.binary(
            x, other, self.packed_weight, self.bias, "add"
        )

    def extra_repr(self) -> str:
        gelu = ", gelu" if self.gelu else ""
        return f"in_features={self.in_features}, out_features={self.out_features}{gelu}"


def _is_exact_gelu(act: Any) -> bool:
    """transformers' ``"gelu"`` activation (erf form) or ``nn.GELU()``; not the tanh variants."""
    if isinstance(act, torch.nn.GELU):
        return act.approximate == "none"
    try:
        from transformers.activations import GELUActivation
    except ImportError:  # pragma: no cover - transformers is always there for these backends
        return False
    return type(act) is GELUActivation and getattr(act, "act", None) is torch.nn.functional.gelu


#: transformers' blocks computing ``LayerNorm(dropout(dense(hidden)) + input)`` (read in
#: transformers 5.x) in the BERT-structured families.
_ADD_NORM_BLOCKS = frozenset(
    f"{family}{part}" for family in BERT_FAMILIES for part in ("SelfOutput", "Output")
)


def _dense_add_norm(self: Any, hidden_states: torch.Tensor, input_tensor: torch.Tensor) -> Any:
    """The block's forward with the residual add fused into its packed ``dense``; dropout is
    the identity at inference. A module put in training mode, and a residual of another dtype
    or shape than the layer's output (which the unfused add would promote or broadcast), run
    the class's forward."""
    if (
        self.training
        or input_tensor.dtype != hidden_states.dtype
        or input_tensor.shape[:-1] != hidden_states.shape[:-1]
    ):
        return type(self).forward(self, hidden_states, input_tensor)
    return self.LayerNorm(self.dense.forward_add(hidden_states, input_tensor))


def fuse_residual_adds(model: Any) -> int:
    """Fuse the residual add into the packed ``dense`` of every BERT-style add-and-norm block in
    ``model`` (after :func:`pack_linears`); return how many blocks changed."""
    fused = 0
    for block in model.modules():
        if (
            type(block).__name__ in _ADD_NORM_BLOCKS
            and type(getattr(block, "dense", None)) is PackedLinear
            and not block.dense.gelu
            and isinstance(getattr(block, "LayerNorm", None), torch.nn.LayerNorm)
            and "forward" not in vars(block)
        ):
            block.forward = types.MethodType(_dense_add_norm, block)
            fused += 1
    return fused


@functools.cache
def _weights_read_by(cls: type) -> frozenset[str]:
    """Names of the child layers whose ``weight`` or ``bias`` the code of ``cls`` (and its bases
    up to ``nn.Module``) reads, e.g. T5's feed-forward block casting to ``self.wo.weight.dtype``
    (T5 / MT5 / UMT5 / LongT5 encoders: sentence-t5, GTR). A :class:`PackedLinear` has no
    ``weight``, so such a layer stays ``nn.Linear``: packed, every pass raised AttributeError."""
    from transformers import PreTrainedModel

    names: set[str] = set()
    for base in cls.__mro__:
        if (
            not issubclass(base, torch.nn.Module)
            or base.__module__.partition(".")[0] == "torch"
            or base is PreTrainedModel  # generic loading code: reads no layer's weight per call
        ):
            continue
        source = _class_source(base)
        if source is None:  # no source (compiled, dynamic): nothing is known to read
            continue
        names.update(re.findall(r"self\.(\w+)\.(?:weight|bias)\b", source))
    return frozenset(names)


_SOURCES: dict[type, str | None] = {}
_SOURCE_LOCK = threading.Lock()


def _class_source(cls: type) -> str | None:
    """``inspect.getsource(cls)``, once per class and one at a time. Finding a class's source
    runs ``ast.parse`` on its whole module, which is not thread-safe on CPython 3.10/3.11
    (gh-106905: "SystemError: AST constructor recursion depth mismatch"): two models loading
    at once failed one load. Retried on that error, as the race is with other threads' parses.
    None when the class has no source."""
    with _SOURCE_LOCK:
        if cls in _SOURCES:
            return _SOURCES[cls]
        for _ in range(5):
            try:
                source: str | None = inspect.getsource(cls)
            except (OSError, TypeError):
                source = None
            except SystemError:  # a parse racing another thread's (not ours: we hold the lock)
                continue
            _SOURCES[cls] = source
            return source
        return inspect.getsource(cls)  # five races in a row: let the error speak


def pack_linears(model: Any) -> int:
    """Replace the CPU ``nn.Linear`` layers of ``model`` (in place) with :class:`PackedLinear`.

    Fuses GELU where a block holds ``dense`` followed by ``intermediate_act_fn`` (BERT, RoBERTa,
    XLM-R, MiniLM, ELECTRA and their kin); :func:`fuse_residual_adds` then fuses their residual
    adds. A layer whose ``weight`` or ``bias`` its parent's own code reads stays as it is
    (:func:`_weights_read_by`). Returns the number of layers packed; 0 when packing is not
    supported for the model's dtype, or the model is not on the CPU.
    """
    first = next(iter(model.parameters()), None)
    if first is None or first.device.type != "cpu":
        return 0
    if first.dtype not in (torch.float32, torch.bfloat16):
        return 0
    if not packing_supported(str(first.dtype).removeprefix("torch.")):
        return 0
    packed = 0
    for block in list(model.modules()):
        dense = getattr(block, "dense", None)
        act = getattr(block, "intermediate_act_fn", None)
        if (
            type(dense) is torch.nn.Linear
            and act is not None
            and _is_exact_gelu(act)
            and "dense" not in _weights_read_by(block.__class__)
        ):
            block.dense = PackedLinear(dense, gelu=True)
            block.intermediate_act_fn = torch.nn.Identity()
            packed += 1
    for block in list(model.modules()):
        candidates = [
            (name, child)
            for name, child in block.named_children()
            if type(child) is torch.nn.Linear
            and child.in_features >= MIN_FEATURES
            and child.out_features >= MIN_FEATURES
            and child.weight.dtype == first.dtype
        ]
        read = _weights_read_by(block.__class__) if candidates else frozenset()
        for name, child in candidates:
            if name not in read:
                setattr(block, name, PackedLinear(child))
                packed += 1
    return packed
