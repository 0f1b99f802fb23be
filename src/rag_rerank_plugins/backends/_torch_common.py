"""Shared steps of torch-based backends: loading, and the device plumbing of the two phases.

Every torch backend loads the same way: import lazily (clear error if the extra is missing or
installed but not importable), put the weights on one device in the policy's dtype, switch to
``eval()`` with gradients off, cap the token limit at what the position table holds
(:func:`cap_to_positions`), and turn "not found offline" into :class:`ModelNotFoundError` with
instructions. transformers builds under a process-wide default dtype, so its switches take turns
across threads (:func:`guard_dtype_switch`). Two-phase backends (see :mod:`.base`) pin their
prepared tensors, copy them to the device without blocking, and start one device->host copy per
pass (:class:`HostCopy`); on the CPU a prepared batch is first padded to its bucket length
(:func:`pad_to_bucket`, issue 21: a small fixed set of pass shapes, so oneDNN's per-shape kernel
caches stop growing).

On the CPU, :func:`cpu_kernels` swaps in the faster kernels of :mod:`._cpu_attention` and
:mod:`._cpu_linear` (backend option ``cpu_kernels``); on every device, :func:`prune_last_layer`
makes a cross-encoder's last layer compute only the first token (:mod:`._first_token`, option
``prune_last_layer``). :func:`reranker_kernels` applies both and reports them in one line for
``stats()["kernels"]``.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import logging
from collections.abc import Iterator
from types import ModuleType
from typing import Any

from .._forksafe import ForkSafeLock
from ..exceptions import (
    ConfigurationError,
    MissingDependencyError,
    ModelLoadError,
    ModelNotFoundError,
)
from ..spec import ModelSpec
from ._common import quantize_mode
from .base import Prepared

__all__ = [
    "DECODER_POSITION_TABLES",
    "HostCopy",
    "bind_torch_worker",
    "building",
    "cap_to_positions",
    "cpu_kernels",
    "cpu_kernels_option",
    "features_to",
    "guard_dtype_switch",
    "import_optional",
    "loading_errors",
    "model_kwargs_for",
    "module_bytes",
    "pad_to_bucket",
    "right_aligned",
    "padded_tokens",
    "pin_features",
    "position_table_limit",
    "prepared_batch",
    "prepare_module",
    "steady_default_dtype",
    "torch_dtype",
    "warn_past_positions",
    "warm_tokenizer",
]


logger = logging.getLogger(__name__)


def import_optional(module: str, package: str, extra: str, purpose: str) -> ModuleType:
    """Import ``module`` or raise MissingDependencyError naming the extra to install.

    When ``module`` is installed but its own imports fail (FlagEmbedding 1.4.2 under
    transformers 5.24 imports a module that release removed), the error says so and quotes the
    import error, rather than claiming the package is missing or surfacing a bare
    ModuleNotFoundError about another package."""
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        top = module.split(".")[0]
        if exc.name and exc.name.split(".")[0] != top and importlib.util.find_spec(top):
            raise MissingDependencyError(package, extra, purpose, broken=exc) from exc
        raise MissingDependencyError(package, extra, purpose) from exc


def torch_dtype(name: str) -> Any:
    import torch

    return {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}[name]


def model_kwargs_for(dtype: str, given: dict[str, Any] | None = None) -> dict[str, Any]:
    """``from_pretrained`` kwargs that load weights directly in ``dtype`` (no FP32 detour),
    under the name the installed transformers reads (``dtype`` from 4.56, ``torch_dtype``
    before), on top of the user's own transformers ``model_kwargs`` (option ``model_kwargs``,
    e.g. ``attn_implementation``). The dtype is the spec's: a dtype inside ``given`` is refused
    (the adapters move ``model_kwargs={"dtype": ...}`` to ``dtype=`` before this)."""
    import transformers

    major, minor = (int(x) for x in transformers.__version__.split(".")[:2])
    key = "dtype" if (major, minor) >= (4, 56) else "torch_dtype"
    given = dict(given or {})
    for name in ("dtype", "torch_dtype"):
        if name in given and str(given[name]) != "auto":
            raise ConfigurationError(
                f"model_kwargs[{name!r}]={given[name]!r}: the precision is the spec's dtype= "
                f"(e.g. dtype={str(given[name]).removeprefix('torch.')!r}), so that models "
                "loaded in one precision share one pool entry."
            )
        given.pop(name, None)
    return {**given, key: torch_dtype(dtype)}


def prepare_module(module: Any, dtype: str) -> Any:
    """eval() + no grad on every parameter + the chosen dtype. Returns the module."""
    module.eval()
    for param in module.parameters():
        param.requires_grad_(False)
    current = next(iter(module.parameters()), None)
    wanted = torch_dtype(dtype)
    if current is not None and current.dtype != wanted:
        module.to(wanted)
    return module


def module_bytes(*objects: Any) -> int | None:
    """Bytes of the parameters and buffers of the torch modules among ``objects`` (each counted
    once, even when shared); None when none of them is a module. Packed int8 weights of
    dynamically quantized layers are not parameters, so a quantized model is undercounted."""
    seen: set[int] = set()
    total = 0
    found = False
    for obj in objects:
        parameters = getattr(obj, "parameters", None)
        buffers = getattr(obj, "buffers", None)
        if not (callable(parameters) and callable(buffers)):
            continue
        found = True
        for tensor in (*parameters(), *buffers()):
            if id(tensor) in seen:
                continue
            seen.add(id(tensor))
            total += tensor.numel() * tensor.element_size()
    return total if found else None


#: Attribute names of learned absolute position tables in decoder LMs as well as encoders:
#: BERT-style ``position_embeddings``, GPT-2 / GPT-Neo / StarCoder ``wpe``, OPT / BioGPT
#: ``embed_positions``. Rotary and ALiBi models (Llama, Qwen, Gemma, Mistral, BLOOM) have none.
DECODER_POSITION_TABLES = ("position_embeddings", "wpe", "embed_positions")


def position_table_limit(
    module: Any, names: tuple[str, ...] = ("position_embeddings",)
) -> int | None:
    """Longest input the first learned position table inside ``module`` can index, or None
    when it has none (rotary / relative positions: no hard limit).

    ``names`` are the attributes that may hold the table (an ``nn.Embedding``); the default is
    the encoders' one, :data:`DECODER_POSITION_TABLES` adds the decoders'. BERT-style tables take
    ``num_embeddings`` positions; RoBERTa-style ones (XLM-R, CamemBERT, MPNet, Longformer: the
    table has a ``padding_idx``) count positions from ``padding_idx + 1``, so XLM-R's 514 rows
    hold 512 tokens; OPT-style ones add a fixed ``offset`` (2) to every position, so OPT's 2050
    rows hold 2048."""
    import torch

    for sub in module.modules():
        for name in names:
            table = getattr(sub, name, None)
            if isinstance(table, torch.nn.Embedding):
                offset = table.padding_idx + 1 if table.padding_idx is not None else 0
                shift = getattr(table, "offset", 0)
                offset += shift if isinstance(shift, int) and not isinstance(shift, bool) else 0
                return int(table.num_embeddings) - offset
    return None


def warn_past_positions(requested: int | None, limit: int, label: str) -> None:
    """The one warning that ``requested`` (a ``max_length`` asked for) is past the ``limit`` of
    ``label``'s position table, so inputs are truncated there (every backend that caps)."""
    if requested is not None and requested > limit:
        logger.warning(
            "rag-rerank: max_length=%d is more than %s's position table holds (%d tokens); "
            "longer inputs are truncated at %d tokens.",
            requested,
            label,
            limit,
            limit,
        )


def cap_to_positions(model: Any, requested: int | None, label: str) -> None:
    """Cap a sentence-transformers model's token limit (``max_seq_length``) at what its position
    table holds.

    Why: sentence-transformers caps the tokenizer at ``config.max_position_embeddings`` only
    when no limit is given, and that number is 2 too many for RoBERTa-style tables; a
    ``max_length`` above the table (``max_length=1024`` on a 512-position BERT, or an XLM-R
    whose tokenizer has no ``model_max_length``) made every pass holding a long input fail deep
    in torch ("index out of range in self", "The size of tensor a (1024) must match ..."),
    failing the other requests batched with it too. Inputs are truncated at the table instead
    (a warning says so when ``requested``, the spec's ``max_length``, asked for more)."""
    limit = position_table_limit(model)
    current = getattr(model, "max_seq_length", None)
    if limit is None or limit <= 0 or (isinstance(current, int) and 0 < current <= limit):
        return
    warn_past_positions(requested, limit, label)
    for name in ("max_seq_length", "max_length"):  # sentence-transformers 6 / older CrossEncoder
        if isinstance(getattr(type(model), name, None), property):
            setattr(model, name, limit)
            return
    tokenizer = getattr(model, "tokenizer", None)
    if tokenizer is not None:
        tokenizer.model_max_length = limit


def quantize_module(module: Any, mode: str | None, device: str, dtype: str) -> Any:
    """Opt-in dynamic int8 quantization of every ``nn.Linear`` (CPU, float32 models only).

    Weights become int8 and activations are quantized on the fly, so scores differ from float32:
    on a cross-encoder with real MiniLM weights by up to 34 % of the score range (Spearman 0.92
    on SciFact pairs), enough to reorder results. The gain depends on the CPU (VNNI helps; ~1.3x
    pairs/s on an AVX2 EPYC): measure speed and ranking before turning it on. Uses
    ``torch.ao.quantization.quantize_dynamic``, which torch deprecates in favour of torchao (it
    warns); the option stays opt-in until torchao is a dependency worth adding.
    """
    if quantize_mode(mode) is None:
        return module
    if device != "cpu" or dtype != "float32":
        raise ConfigurationError(
            f"quantize='int8' needs device='cpu' and dtype float32 (got {device}/{dtype}); "
            "on GPUs use dtype='float16' instead."
        )
    import torch

    with steady_default_dtype():
        return torch.ao.quantization.quantize_dynamic(
            module, {torch.nn.Linear}, dtype=torch.qint8, inplace=True
        )


def cpu_kernels_option(options: dict[str, Any]) -> bool:
    """Pop and check the ``cpu_kernels`` backend option (default True)."""
    return _bool_option(
        options,
        "cpu_kernels",
        "True (the default: tiled attention and packed oneDNN linears on the CPU) or False "
        "(transformers' own kernels)",
    )


def prune_last_layer_option(options: dict[str, Any]) -> bool:
    """Pop and check the ``prune_last_layer`` backend option (default True)."""
    return _bool_option(
        options,
        "prune_last_layer",
        "True (the default: a classifier's last layer computes only the first token, the one "
        "its head reads) or False (every position)",
    )


def _bool_option(options: dict[str, Any], name: str, choices: str) -> bool:
    value = options.pop(name, True)
    if not isinstance(value, bool):
        raise ConfigurationError(f"{name}={value!r}: use {choices}.")
    return value


def prune_last_layer(module: Any, enabled: bool) -> str:
    """Make a cross-encoder's last layer compute only the position its head reads (see
    ``_first_token``); return the words for ``stats()["kernels"]`` ("" when nothing changed)."""
    if not enabled:
        return ""
    from ._first_token import first_token_last_layer

    return "last layer for the first token only" if first_token_last_layer(module) else ""


def cpu_kernels(module: Any, device: str, enabled: bool = True) -> str:
    """Switch a loaded torch model to this package's CPU kernels; return what now runs.

    Every Hugging Face model inside ``module`` (a sentence-transformers model holds one) gets
    tiled attention if it is a bidirectional encoder, and its ``nn.Linear`` layers are packed for
    oneDNN (GELU and BERT-style residual adds fused into them). Called after the dtype is final;
    dynamically quantized layers are not ``nn.Linear`` and stay as they are. The returned text
    ends up in the load log and in ``stats()``.
    """
    if not enabled or not str(device).startswith("cpu"):
        return "" if enabled else "transformers' kernels (cpu_kernels=False)"
    from transformers import PreTrainedModel

    from ._cpu_attention import ATTENTION_NAME, describe, use_cpu_attention
    from ._cpu_linear import fuse_residual_adds, pack_linears

    models = [m for m in module.modules() if isinstance(m, PreTrainedModel)]
    inner = {id(c) for m in models for c in m.modules() if c is not m}
    attention = {use_cpu_attention(m, device) for m in models if id(m) not in inner}
    packed = pack_linears(module)
    parts = []
    if ATTENTION_NAME in attention:
        from ._cpu_packed import PACK_FROM_KEYS, pack_encoders

        parts.append(describe(PACK_FROM_KEYS if pack_encoders(module) else None))
    if packed:
        fused = fuse_residual_adds(module)
        adds = f" ({fused} with their residual add)" if fused else ""
        parts.append(f"{packed} packed oneDNN linear layers{adds}")
    return ", ".join(parts) or "transformers' kernels (none of ours applies to this model)"


#: Padded tokens per CPU pass for a model on our kernels in BF16 on an AMX CPU (the engine's CPU
#: default is 1024). The tile units run the linear layers better on more rows, and with padded
#: keys cut from attention (``_cpu_sdpa``) and packed rows (``_cpu_packed``) a bigger pass costs
#: attention nothing; but a large model's activations outgrow the caches sooner. 2-core AMX
#: Xeon, same process, pools alternating, budgets 1536 / 2048 / 2560 (/ 3072): MiniLM-L6
#: cross-encoder 1 x 50 SciFact 577 / 554 / - / 583 ms (another run 609 / 553 / 550), short
#: passages 240 / 233 / 225, XLM-R large 1 x 20 3676 / 3932 / 3647 / 4438; 1536 -> 2048 alone:
#: MiniLM 608 -> 586, all-MiniLM-L6-v2 64 passages 465 -> 442, a BERT-base-shaped
#: cross-encoder 2980 -> 2848. FP32 (AVX-512 linears) is best at 1024 (1800 vs 1854 ms) and
#: keeps the default.
AMX_BF16_TOKEN_BUDGET = 2048
#: Hidden sizes above this (XLM-R large, bge-reranker-v2-m3: 1024) keep 1536-token passes.
AMX_BF16_LARGE_HIDDEN = 768
AMX_BF16_LARGE_TOKEN_BUDGET = 1536


def cpu_token_budget(device: str, dtype: str, kernels_on: bool, module: Any = None) -> int | None:
    """What a torch model's CPU passes should hold (``LoadedModel.cpu_token_budget``); ``module``
    (the loaded model) tells its hidden size, unknown counting as large."""
    if not (kernels_on and str(device).startswith("cpu") and dtype == "bfloat16"):
        return None
    from .._cpu import cpu_kind

    if cpu_kind() != "amx":
        return None
    hidden = hidden_size(module)
    if hidden is None or hidden > AMX_BF16_LARGE_HIDDEN:
        return AMX_BF16_LARGE_TOKEN_BUDGET
    return AMX_BF16_TOKEN_BUDGET


def hidden_size(module: Any) -> int | None:
    """The ``config.hidden_size`` of the first transformers model inside ``module``, if any."""
    modules = getattr(module, "modules", None)
    for sub in modules() if callable(modules) else ():
        size = getattr(getattr(sub, "config", None), "hidden_size", None)
        if isinstance(size, int) and not isinstance(size, bool):
            return size
    return None


def reranker_kernels(module: Any, device: str, cpu: bool, prune: bool) -> str:
    """A reranker's :func:`cpu_kernels` and :func:`prune_last_layer`, as one line for the load
    log and ``stats()["kernels"]``."""
    parts = (cpu_kernels(module, device, cpu), prune_last_layer(module, prune))
    return ", ".join(part for part in parts if part)


#: Held while torch's process-wide default dtype may differ from the one our work expects:
#: inside transformers' switch of it around a model's construction (:func:`guard_dtype_switch`),
#: and around our own work that reads it (:func:`steady_default_dtype`). Re-entrant (a model's
#: ``__init__`` may build another), and new in a forked child (a parent thread may hold it).
_DTYPE_SWITCH = ForkSafeLock(reentrant=True)
_GUARD_INSTALL = ForkSafeLock()


#: How long a build waits for another thread's default-dtype switch before it switches anyway
#: (with a warning): a model whose ``__init__`` waits on a thread that builds another model
#: would otherwise deadlock. Instantiation takes seconds even for large models.
SWITCH_WAIT_S = 60.0


def guard_dtype_switch() -> bool:
    """Make transformers' ``local_torch_dtype`` hold :data:`_DTYPE_SWITCH` (once per process;
    again if something replaced it). False where transformers has no such function (before
    4.5x it switched the default inline): :func:`building` then holds the lock itself.

    Why: transformers builds a model under ``local_torch_dtype``, which sets torch's
    *process-wide* default dtype for the model's instantiation and restores the one it saw on
    entry. The pool loads different specs in parallel, and two builds in two threads interleaved
    those set/restore pairs: a bfloat16 model came out with some float32 weights (its calls then
    failed deep in torch, or ran in float32 while ``stats()`` said bfloat16), a float32 one with
    bfloat16-rounded weights, and the process could keep bfloat16 as its default dtype. Holding
    the lock inside that switch makes the switches take turns and covers only the instantiation:
    downloads, weight reads, kernel packing and warm-up of different specs still run in parallel
    (a lock around the whole constructor let one stalled download hold every other load), and a
    transformers build in a thread of the user's own takes turns too. A switch that waits more
    than :data:`SWITCH_WAIT_S` goes ahead unguarded, with a warning, rather than hang."""
    try:
        from transformers import modeling_utils
    except ImportError:
        return False
    with _GUARD_INSTALL:
        switch = getattr(modeling_utils, "local_torch_dtype", None)
        if switch is None:
            return False
        if getattr(switch, "_rag_rerank_guarded", False):
            return True

        @contextlib.contextmanager
        def guarded(*args: Any, **kwargs: Any) -> Iterator[None]:
            held = _DTYPE_SWITCH.acquire(timeout=SWITCH_WAIT_S)
            if not held:
                logger.warning(
                    "a model build waited %.0f s for another thread's switch of torch's default "
                    "dtype and goes ahead; if both build at once, check their weights' dtypes",
                    SWITCH_WAIT_S,
                )
            try:
                with switch(*args, **kwargs):
                    yield
            finally:
                if held:
                    _DTYPE_SWITCH.release()

        guarded._rag_rerank_guarded = True  # type: ignore[attr-defined]
        modeling_utils.local_torch_dtype = guarded
        return True


@contextlib.contextmanager
def building() -> Iterator[None]:
    """Around the construction of a transformers model (``from_pretrained``, or the
    sentence-transformers / FlagEmbedding constructors that call it): transformers' default-dtype
    switch takes turns with every other build's (:func:`guard_dtype_switch`). A transformers
    without that switch sets the default inline, and does not restore it when a load fails: the
    whole construction then holds the lock, and the default dtype seen on entry is put back."""
    if guard_dtype_switch():
        yield
        return
    import torch

    with _DTYPE_SWITCH:
        before = torch.get_default_dtype()
        try:
            yield
        finally:
            if torch.get_default_dtype() != before:
                torch.set_default_dtype(before)


@contextlib.contextmanager
def steady_default_dtype() -> Iterator[None]:
    """Hold while our torch work reads the default dtype: no build in another thread switches
    it meanwhile. Dynamic int8 quantization's observers and the ONNX exporter's traced constants
    take it: overlapping a bfloat16 build, the first quantized a float32 model differently
    (scores moved silently) and the second traced bfloat16 constants (the export failed its
    check)."""
    guard_dtype_switch()
    with _DTYPE_SWITCH:
        yield


@contextlib.contextmanager
def loading_errors(spec: ModelSpec) -> Iterator[None]:
    """Map library errors at load time to this package's exceptions."""
    try:
        yield
    except (MissingDependencyError, ModelLoadError, ConfigurationError):
        raise
    except OSError as exc:
        if spec.is_local_path:
            raise ModelLoadError(spec.model, spec.backend, exc) from exc
        raise ModelNotFoundError(spec.model, spec.backend, exc) from exc
    except Exception as exc:
        raise ModelLoadError(spec.model, spec.backend, exc) from exc


# -- the two-phase protocol's device plumbing (prepare on the CPU, forward on the device) --------


def pin_features(features: dict[str, Any], device: str) -> dict[str, Any]:
    """Page-locked copies of the tensors for a CUDA device (so host->device copies can run
    asynchronously); unchanged elsewhere. Runs in the prepare thread, off the device worker."""
    if not device.startswith("cuda"):
        return features
    import torch

    return {k: v.pin_memory() if isinstance(v, torch.Tensor) else v for k, v in features.items()}


def features_to(features: dict[str, Any], device: str) -> dict[str, Any]:
    """The tensors on ``device``; non-blocking (pinned sources make that asynchronous on CUDA)."""
    import torch

    return {
        k: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v
        for k, v in features.items()
    }


def padded_tokens(features: dict[str, Any]) -> int | None:
    """Real padded token count of a tokenised batch (for stats), if it has ``input_ids``."""
    ids: Any = features.get("input_ids")
    return int(ids.numel()) if ids is not None and hasattr(ids, "numel") else None


def pad_to_bucket(
    features: dict[str, Any], tokenizer: Any, max_tokens: int | None, device: str
) -> dict[str, Any]:
    """Pad a tokenised CPU batch to its bucket length (see :mod:`rag_rerank_plugins._shapes`).

    oneDNN keeps a compiled kernel per matmul shape, so passes padded to their own longest item
    make the process grow for thousands of requests (issue 21); a few fixed lengths bound that.
    Every ``[items, length]`` tensor gets the tokenizer's pad id (``input_ids``), pad type id
    (``token_type_ids``) or 0 (``attention_mask`` and the rest) on the right, whatever the
    tokenizer's padding side: padding added on the left moved every real token's position, so
    a BERT (absolute positions) given a left-padding tokenizer scored even a single text
    differently from the stock classes (0.15 on a vector). Pooling and sequence-classification
    heads find the real tokens by the mask or the pad id, so the side of the extra padding
    changes nothing else; masked positions change FP32 scores by float rounding only (~1e-7).
    Unchanged on other
    devices, without a known ``max_tokens`` (padding must never pass the position table), or
    when turned off (``RAG_RERANK_SHAPE_BUCKETS=0``).
    """
    from .._shapes import bucket_length, buckets_enabled

    ids: Any = features.get("input_ids")
    if (
        not str(device).startswith("cpu")
        or not max_tokens
        or ids is None
        or getattr(ids, "dim", lambda: 0)() != 2
        or not buckets_enabled()
    ):
        return features
    rows, width = (int(n) for n in ids.shape)
    extra = bucket_length(width, max_tokens) - width
    if extra <= 0:
        return features
    import torch

    fills = {
        "input_ids": int(getattr(tokenizer, "pad_token_id", None) or 0),
        "token_type_ids": int(getattr(tokenizer, "pad_token_type_id", None) or 0),
    }
    sides = (0, extra)
    out = dict(features)
    for key, value in features.items():
        if isinstance(value, torch.Tensor) and tuple(value.shape) == (rows, width):
            out[key] = torch.nn.functional.pad(value, sides, value=fills.get(key, 0))
    return out


def right_aligned(features: dict[str, Any]) -> dict[str, Any]:
    """A left-padded batch (every mask row zeros, then ones) with each row's tokens moved to
    its start and the padding to its end; any other batch unchanged.

    Why: a tokenizer that pads on the left moved every real token's position by its row's
    padding, so with absolute positions (BERT) an item's FP32 vector or score depended on what
    shared its pass (0.065 on a vector, alone vs beside a long text or another caller's), which
    the batch-composition bound (1e-5) rules out. Right-aligned, every row reads as it does
    alone, which is what the stock classes give for one text. Pooling and sequence-
    classification heads find the real tokens by the mask or the pad id, never by the side.
    """
    import torch

    mask: Any = features.get("attention_mask")
    if not isinstance(mask, torch.Tensor) or mask.dim() != 2:
        return features
    rows, width = (int(n) for n in mask.shape)
    pads = width - mask.sum(dim=1)
    if not bool(pads.any()):
        return features
    columns = torch.arange(width).unsqueeze(0)
    if not torch.equal(mask.bool(), columns >= pads.unsqueeze(1)):
        return features  # not left padding: leave it as it is
    index = (columns + pads.unsqueeze(1)) % width
    out = dict(features)
    for key, value in features.items():
        if isinstance(value, torch.Tensor) and tuple(value.shape) == (rows, width):
            out[key] = value.gather(1, index)
    return out


def prepared_batch(
    features: dict[str, Any],
    size: int,
    device: str,
    *,
    tokenizer: Any = None,
    max_tokens: int | None = None,
) -> Prepared:
    """A tokenised batch ready for ``device`` (pinned on CUDA), with its real token counts.

    With a ``tokenizer`` (its pad ids and padding side) a left-padded batch is right-aligned
    first (:func:`right_aligned`), and with ``max_tokens`` a CPU batch is padded to its bucket
    length (:func:`pad_to_bucket`), so ``padded_tokens`` counts the bucket's columns."""
    if tokenizer is not None:
        if getattr(tokenizer, "padding_side", "right") == "left":
            features = right_aligned(features)
        features = pad_to_bucket(features, tokenizer, max_tokens, device)
    mask: Any = features.get("attention_mask")
    real = int(mask.sum()) if mask is not None and hasattr(mask, "sum") else None
    return Prepared(pin_features(features, device), size, padded_tokens(features), real)


class HostCopy:
    """One device->host copy of a pass's outputs, started without waiting.

    On CUDA the copy goes to a pinned buffer behind an event, so the worker can launch the next
    pass before it waits for this one; elsewhere it is an ordinary (synchronous) copy.
    """

    __slots__ = ("_event", "_host")

    def __init__(self, tensor: Any) -> None:
        import torch

        self._event: Any = None
        if tensor.device.type == "cuda":
            self._host = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=True)
            self._host.copy_(tensor, non_blocking=True)
            self._event = torch.cuda.Event()
            self._event.record()
        else:
            self._host = tensor.to("cpu")

    def result(self) -> Any:
        """The host tensor, once the copy has landed."""
        if self._event is not None:
            self._event.synchronize()
        return self._host


def warm_tokenizer(preprocess: Any, sample: list[Any]) -> bool:
    """Tokenise ``sample`` once, so the tokenizer's truncation and padding settings are fixed
    before several prepare threads use it (a fast tokenizer changes them under a mutable borrow
    on first use, and two threads doing that at once fail with "Already borrowed"; later calls
    with the same settings only read them). True when it worked, so prepare may run
    concurrently; False (one prepare thread) for a tokenizer that cannot take the sample."""
    try:
        preprocess(sample)
    except Exception:  # an unusual model: keep the single prepare thread, fail later if real
        return False
    return True


def bind_torch_worker(threads: int) -> None:
    """A CPU device worker's torch threads (torch backends' ``bind_worker_thread``)."""
    from .._cpu import set_thread_torch_threads

    set_thread_torch_threads(threads)
