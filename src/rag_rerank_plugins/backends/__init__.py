"""Backend registry: one row per backend, the one option check, and the load path.

A backend is **one module plus one row**. The module holds the loader (``(spec, provider) ->
LoadedModel``, see :mod:`.base`) and the model class; the row (a :class:`BackendInfo` in
:data:`_BUILTINS` below, or a :func:`register_backend` call in user code) says everything the
engine needs to know without importing that module:

* ``target``: where the loader is (``"module:function"``, imported on first load, so naming a
  backend costs nothing and heavy libraries load only with the model);
* ``kind``, ``description``;
* ``uses_torch``: False when resolving a spec must never import torch ("auto" means the CPU);
* ``options``: every option name the loader reads, so a typo fails where it was written;
* ``forwards_options``: for a backend that hands its other options to another backend.

:func:`check_options` is the one check of option names. Adapters call it when they are built;
the load path (:func:`load_backend`, and the loaders :func:`get_loader` returns) calls it again
for every spec, however the spec was made, so loaders never re-check names: they only read
values (shared value helpers are in :mod:`._common`).

Backend modules never import one another: what two of them share lives in a private helper
module (``_common``, ``_torch_common``, ``_onnx_common``, ``_flag_common``, ``_last_token``).
"""

from __future__ import annotations

import importlib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from .._forksafe import ForkSafeLock
from ..exceptions import ConfigurationError, UnknownBackendError
from .base import EmbedderModel, Kind, LoadedModel, Loader, ModelProvider, RerankerModel
from .options import (
    CLASSIFIER_SCORES,
    HF_LOADING,
    ONNX_EXPORT,
    REMOTE_OPTIONS,
    ST_CROSS_ENCODER,
    ST_EMBEDDER,
)

if TYPE_CHECKING:
    from ..spec import ModelSpec

__all__ = [
    "BackendInfo",
    "EmbedderModel",
    "LoadedModel",
    "Loader",
    "RerankerModel",
    "backend_info",
    "available_backends",
    "check_options",
    "get_loader",
    "load_backend",
    "register_backend",
]


@dataclass(frozen=True)
class BackendInfo:
    """One registry row: what the engine knows about a backend without importing it."""

    name: str
    kind: Kind
    #: ``"module:function"`` (imported on first load) or the loader itself.
    target: str | Loader
    description: str = ""
    #: False for backends with no local weights (remote, fakes): "auto" then means "cpu" and
    #: resolving a spec never imports torch (~650 MB in a client process).
    uses_torch: bool = True
    #: Option names the loader reads; any other name is a mistake that would only surface at load
    #: time. None accepts every name (user-registered backends that declare nothing).
    options: frozenset[str] | None = None
    #: ``(option, default)`` for backends that hand their other options to another backend:
    #: the bi-encoder passes them to the embedder backend named by ``embedder_backend``.
    forwards_options: tuple[str, str] | None = None
    #: True for a backend without torch weights that still computes BF16 natively on the CPU
    #: (OpenVINO): ``dtype="auto"`` then follows the CPU policy (bfloat16 on AVX512-BF16/AMX CPUs,
    #: float32 elsewhere) instead of meaning float32.
    cpu_bf16: bool = False


def _row(
    name: str,
    kind: Kind,
    target: str,
    description: str,
    *,
    options: Iterable[str],
    uses_torch: bool = True,
    forwards_options: tuple[str, str] | None = None,
    cpu_bf16: bool = False,
) -> BackendInfo:
    """A built-in row; ``target`` is relative to this package (``".module:function"``)."""
    return BackendInfo(
        name,
        kind,
        __name__ + target if target.startswith(".") else target,
        description,
        uses_torch,
        frozenset(options),
        forwards_options,
        cpu_bf16,
    )


#: The fakes stand in for real models in users' tests, so they take (and ignore) the loading
#: options a real model would get: switching a test to backend="fake-..." changes nothing else.
#: ``delay_ms`` simulates a forward pass, ``footprint_mb`` the size a pool with a memory budget
#: sees.
_FAKE = ST_CROSS_ENCODER | ST_EMBEDDER | CLASSIFIER_SCORES | {"delay_ms", "footprint_mb"}

#: The built-in backends, one row each. A new built-in backend is its module plus a row here.
_BUILTINS = (
    _row(
        "cross-encoder",
        "reranker",
        ".st_cross_encoder:load",
        "sentence-transformers CrossEncoder (extra: st)",
        # ST_CROSS_ENCODER goes to CrossEncoder(...); the rest is ours.
        options=ST_CROSS_ENCODER
        | CLASSIFIER_SCORES
        | {"quantize", "cpu_kernels", "prune_last_layer"},
    ),
    _row(
        "onnx-cross-encoder",
        "reranker",
        ".onnx:load",
        "CrossEncoder exported once to ONNX, run by onnxruntime on the CPU (extra: onnx)",
        # file_name: run one of the repository's own ONNX files instead of our export.
        options=ONNX_EXPORT | CLASSIFIER_SCORES | {"prune_last_layer", "file_name"},
        # Torch only for the one-time export: "auto" means the CPU and float32 (ONNX Runtime's
        # CPU provider has no fast BF16), and a cached export loads without importing torch.
        uses_torch=False,
    ),
    _row(
        "openvino-cross-encoder",
        "reranker",
        ".openvino_cross_encoder:load",
        "onnx-cross-encoder's export run by OpenVINO: BF16/FP32, NNCF INT8 (extra: openvino)",
        # The ONNX twin's options (forwarded to it), and ours: quantize (NNCF INT8), calibration,
        # ov_config (OpenVINO compile settings).
        options=ONNX_EXPORT
        | CLASSIFIER_SCORES
        | {"prune_last_layer", "file_name", "calibration", "ov_config"},
        uses_torch=False,  # torch only for the one-time export; a cached IR loads without it
        cpu_bf16=True,
    ),
    _row(
        "sentence-transformers",
        "embedder",
        ".st_embedder:load",
        "sentence-transformers SentenceTransformer (extra: st)",
        # All but ours (quantize, cpu_kernels) go to SentenceTransformer(...).
        options=ST_EMBEDDER | {"quantize", "cpu_kernels"},
    ),
    _row(
        "onnx-sentence-transformers",
        "embedder",
        ".onnx_embedder:load",
        "SentenceTransformer's encoder exported once to ONNX, run by onnxruntime (extra: onnx)",
        # The sentence-transformers embedder's own two, applied at run time (not exported).
        options=ONNX_EXPORT | {"truncate_dim", "default_prompt_name", "file_name"},
        uses_torch=False,  # as onnx-cross-encoder: torch only for the one-time export
    ),
    _row(
        "openvino-embedder",
        "embedder",
        ".openvino_embedder:load",
        "onnx-sentence-transformers' export run by OpenVINO: BF16/FP32/INT8 (extra: openvino)",
        options=ONNX_EXPORT
        | {"truncate_dim", "default_prompt_name", "file_name", "calibration", "ov_config"},
        uses_torch=False,
        cpu_bf16=True,
    ),
    _row(
        "bi-encoder",
        "reranker",
        ".bi_encoder:load",
        "cosine similarity of shared embedder vectors (extra: st)",
        options={"embedder_backend"},
        forwards_options=("embedder_backend", "sentence-transformers"),
    ),
    _row(
        "flag-reranker",
        "reranker",
        ".flag:load_reranker",
        "FlagEmbedding FlagReranker, e.g. bge-reranker-v2-m3 (extra: flag)",
        # FlagReranker keyword arguments, and ours: score_mode/score_label, prune_last_layer,
        # cpu_kernels.
        options=CLASSIFIER_SCORES
        | {
            "prune_last_layer",
            "cpu_kernels",
            "query_max_length",
            "query_instruction_for_rerank",
            "query_instruction_format",
            "passage_instruction_for_rerank",
            "passage_instruction_format",
            "trust_remote_code",
            "cache_dir",
        },
    ),
    _row(
        "flag-bge-m3",
        "embedder",
        ".flag:load_m3",
        "FlagEmbedding BGEM3FlagModel dense vectors, e.g. BAAI/bge-m3 (extra: flag)",
        # BGEM3FlagModel keyword arguments, and ours: cpu_kernels.
        options={
            "cpu_kernels",
            "query_max_length",
            "query_instruction_for_retrieval",
            "query_instruction_format",
            "normalize_embeddings",
            "pooling_method",
            "colbert_dim",
            "trust_remote_code",
            "cache_dir",
        },
    ),
    _row(
        "flag-llm-reranker",
        "reranker",
        ".flag_llm:load",
        "FlagEmbedding LLM rerankers: bge-reranker-v2-gemma, -minicpm-layerwise (extra: flag)",
        # Ours (score_mode, which model class, the layer to read) and FlagEmbedding's
        # pre-processing (FlagLLMReranker keyword arguments).
        options=HF_LOADING
        | {
            "score_mode",
            "model_class",
            "cutoff_layers",
            "prompt",
            "query_max_length",
            "query_instruction_for_rerank",
            "query_instruction_format",
            "passage_instruction_for_rerank",
            "passage_instruction_format",
        },
    ),
    _row(
        "causal-lm-reranker",
        "reranker",
        ".causal_lm:load",
        "any causal LM scored by P(yes) after a prompt, e.g. Qwen3-Reranker (extra: st)",
        # score_mode, and the prompt's slots and answer tokens (CausalLMReranker keywords).
        options=HF_LOADING
        | {
            "score_mode",
            "system",
            "prefix",
            "template",
            "suffix",
            "instruction",
            "yes_token",
            "no_token",
        },
    ),
    _row(
        "remote-reranker",
        "reranker",
        ".remote:load_reranker",
        "a rerank server over HTTP: TEI, Cohere or infinity protocol (extra: remote)",
        options=REMOTE_OPTIONS,
        uses_torch=False,
    ),
    _row(
        "remote-embedder",
        "embedder",
        ".remote:load_embedder",
        "an embedding server over HTTP: TEI, Cohere or infinity protocol (extra: remote)",
        options=REMOTE_OPTIONS,
        uses_torch=False,
    ),
    _row(
        "fake-reranker",
        "reranker",
        "rag_rerank_plugins.testing:load_fake_reranker",
        "deterministic word-overlap reranker for tests, no dependencies",
        options=_FAKE,
        uses_torch=False,
    ),
    _row(
        "fake-embedder",
        "embedder",
        "rag_rerank_plugins.testing:load_fake_embedder",
        "deterministic hashing embedder for tests, no dependencies",
        options=_FAKE | {"dim"},
        uses_torch=False,
    ),
)

_lock = ForkSafeLock()
_REGISTRY: dict[str, BackendInfo] = {info.name: info for info in _BUILTINS}


#: What to use instead of an option name that is wrong on every backend.
_HINTS = {
    "device": "The device is chosen by device= (one device per spec).",
    "devices": "The device is chosen by device= (one device per spec).",
    "max_length": "Use max_length=.",
    "dtype": "Precision is chosen by dtype= ('auto', 'float32', 'float16', 'bfloat16').",
    "torch_dtype": "Precision is chosen by dtype= ('auto', 'float32', 'float16', 'bfloat16').",
    "use_fp16": "Precision is chosen by dtype= ('auto', 'float32', 'float16', 'bfloat16').",
    "use_bf16": "Precision is chosen by dtype= ('auto', 'float32', 'float16', 'bfloat16').",
    "activation_fn": "Use score_mode='sigmoid' or score_mode='raw'.",
    "default_activation_function": "Use score_mode='sigmoid' or score_mode='raw'.",
    "normalize": "Use score_mode='sigmoid' or score_mode='raw'.",
    "normalize_embeddings": "Use the embedder adapter's normalize_embeddings= / normalize= field.",
    "token": "This backend does not read a hub token: the hub reads HF_TOKEN or the login saved "
    "by `hf auth login` by itself (the sentence-transformers backends take token= and keep it "
    "out of stats, metrics and logs).",
}
#: Option names that look like a secret, on a backend that reads its secret from the
#: environment variable named by ``api_key_env`` (the remote ones).
_SECRETS = ("api_key", "token", "bearer", "password", "authorization")
_SECRET_HINT = (
    "Never put a secret in a spec (specs are shown in stats, metrics and logs): export it in an "
    "environment variable and name that with the option api_key_env='MY_TOKEN_VAR'."
)
_DICT_VALUED = (
    "model_kwargs",
    "config_kwargs",
    "tokenizer_kwargs",
    "processor_kwargs",
    "prompts",
)


def register_backend(
    name: str,
    loader: Loader,
    kind: Kind,
    *,
    description: str = "",
    replace: bool = False,
    uses_torch: bool = True,
    options: Iterable[str] | None = None,
) -> None:
    """Add a backend (a row, from user code). ``loader(spec, pool)`` returns a RerankerModel or
    EmbedderModel.

    Pass ``uses_torch=False`` for backends without local weights, so resolving their specs
    never imports torch. Pass ``options`` (the option names your loader reads) to have adapters
    reject other names when they are built, and every load refuse them before your loader runs;
    None (the default) accepts any name.
    """
    if kind not in ("reranker", "embedder"):
        raise ValueError(f"kind must be 'reranker' or 'embedder', got {kind!r}")
    accepted = None if options is None else frozenset(options)
    with _lock:
        if name in _REGISTRY and not replace:
            raise ValueError(f"Backend {name!r} is already registered; pass replace=True.")
        _REGISTRY[name] = BackendInfo(name, kind, loader, description, uses_torch, accepted)


def available_backends() -> dict[str, BackendInfo]:
    """Every registered backend's row, by name (a copy)."""
    return dict(_REGISTRY)


def backend_info(name: str) -> BackendInfo:
    """The row of backend ``name``; :class:`UnknownBackendError` lists the known names."""
    try:
        return _REGISTRY[name]
    except KeyError:
        if name == "auto":  # only adapters know whether a reranker or an embedder is meant
            raise ConfigurationError(
                "backend='auto' is resolved by the adapters, which know the model kind. For a "
                "ModelSpec, name the backend: rag_rerank_plugins.backend_choice.choose_backend("
                "'reranker') (or 'embedder') returns the one 'auto' would pick here."
            ) from None
        raise UnknownBackendError(name, list(_REGISTRY)) from None


def check_options(name: str, options: Mapping[str, Any]) -> None:
    """Raise :class:`ConfigurationError` if backend ``name`` does not read one of ``options``.

    The one check of option names. Cheap (set arithmetic, no imports), so adapters call it at
    construction: a typo or an unsupported option then fails where it was written, not at the
    first request's load. The load path calls it too (:func:`load_backend`), for specs built
    without an adapter. The message lists the accepted names. Backends registered without
    ``options`` accept anything.
    """
    info = backend_info(name)
    if info.options is None:
        return
    accepted = info.options
    names = set(options)
    where = f"Backend {name!r}"
    if info.forwards_options is not None:
        key, default = info.forwards_options
        target = options.get(key, default)
        target_info = backend_info(target)
        if target_info.kind != "embedder":
            raise ConfigurationError(
                f"Option {key}={target!r} of backend {name!r} must name an embedder backend, but "
                f"{target!r} is a {target_info.kind}."
            )
        if target_info.options is None:
            return
        accepted = accepted | target_info.options
        where = f"Backend {name!r} (its other options go to the embedder backend {target!r})"
    unknown = sorted(names - accepted)
    if not unknown:
        return
    reads_secrets = "api_key_env" in accepted
    hints = {
        _HINTS[u] for u in unknown if u in _HINTS and not (reads_secrets and u.lower() in _SECRETS)
    }
    if reads_secrets and any(u.lower() in _SECRETS for u in unknown):
        hints.add(_SECRET_HINT)
    if any(u in _DICT_VALUED for u in unknown):
        hints.add(
            "The sentence-transformers backends ('cross-encoder', 'sentence-transformers') take "
            "the dict-valued ones (model_kwargs, config_kwargs, processor_kwargs, prompts)."
        )
    raise ConfigurationError(
        f"{where} does not accept option(s) {', '.join(map(repr, unknown))} "
        f"(model_kwargs or an adapter field). Accepted: {', '.join(sorted(accepted))}."
        + "".join(f" {hint}" for hint in sorted(hints))
    )


@dataclass(frozen=True)
class _CheckedLoader:
    """A backend's loader behind the registry's option check: what the load path calls."""

    name: str
    loader: Loader

    def __call__(self, spec: ModelSpec, provider: ModelProvider) -> LoadedModel:
        check_options(self.name, spec.options_dict)
        return self.loader(spec, provider)


def get_loader(name: str) -> Loader:
    """The loader for ``name``, with :func:`check_options` in front of it; imports the backend
    module on first use. Calling it is :func:`load_backend`: a spec whose options the backend
    does not read is refused before the backend's own code runs."""
    target = backend_info(name).target
    if callable(target):
        return _CheckedLoader(name, target)
    module_name, func_name = target.split(":")
    loader: Loader = getattr(importlib.import_module(module_name), func_name)
    return _CheckedLoader(name, loader)


def load_backend(spec: ModelSpec, provider: ModelProvider) -> LoadedModel:
    """Load ``spec`` with its backend: the one load path. Checks the option names against the
    backend's row (:func:`check_options`), imports the backend module if needed, then runs
    its loader."""
    return get_loader(spec.backend)(spec, provider)
