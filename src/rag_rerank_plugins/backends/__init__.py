"""Backend registry: backend name -> kind, (lazily imported) loader and accepted options.

Built-in backends are listed by module path so that naming one costs nothing until it loads;
heavy libraries (torch, sentence-transformers, FlagEmbedding) are imported by the loader only.
Each built-in also declares the option names its loader reads, so adapters can reject a typo or
an unsupported option when they are built instead of at the first call (the load).
"""

from __future__ import annotations

import importlib
import threading
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from ..exceptions import ConfigurationError, UnknownBackendError
from .base import EmbedderModel, Kind, LoadedModel, Loader, RerankerModel
from .options import (
    CAUSAL_LM_OPTIONS,
    CROSS_ENCODER_OPTIONS,
    FAKE_OPTIONS,
    FLAG_LLM_OPTIONS,
    FLAG_M3_OPTIONS,
    FLAG_RERANKER_OPTIONS,
    ONNX_EMBEDDER_OPTIONS,
    ONNX_OPTIONS,
    REMOTE_OPTIONS,
    ST_EMBEDDER_OPTIONS,
)

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
    "register_backend",
]


@dataclass(frozen=True)
class BackendInfo:
    name: str
    kind: Kind
    target: str | Loader  # "module:function" for built-ins, a callable for registered ones
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
    "token": "Never put a token in a spec (specs are shown in stats, metrics and logs): the hub "
    "reads HF_TOKEN or the login saved by `hf auth login` by itself.",
}
_DICT_VALUED = (
    "model_kwargs",
    "config_kwargs",
    "tokenizer_kwargs",
    "processor_kwargs",
    "prompts",
)


_lock = threading.Lock()
_REGISTRY: dict[str, BackendInfo] = {}


def _builtin(
    name: str,
    kind: Kind,
    target: str,
    description: str,
    *,
    options: frozenset[str],
    uses_torch: bool = True,
    forwards_options: tuple[str, str] | None = None,
) -> None:
    _REGISTRY[name] = BackendInfo(
        name, kind, target, description, uses_torch, options, forwards_options
    )


_builtin(
    "cross-encoder",
    "reranker",
    "rag_rerank_plugins.backends.st_cross_encoder:load",
    "sentence-transformers CrossEncoder (extra: st)",
    options=CROSS_ENCODER_OPTIONS,
)
_builtin(
    "onnx-cross-encoder",
    "reranker",
    "rag_rerank_plugins.backends.onnx:load",
    "CrossEncoder exported once to ONNX, run by onnxruntime on the CPU (extra: onnx)",
    options=ONNX_OPTIONS,
    # Torch only for the one-time export: "auto" means the CPU and float32 (ONNX Runtime's CPU
    # provider has no fast BF16), and a cached export loads without importing torch.
    uses_torch=False,
)
_builtin(
    "sentence-transformers",
    "embedder",
    "rag_rerank_plugins.backends.st_embedder:load",
    "sentence-transformers SentenceTransformer (extra: st)",
    options=ST_EMBEDDER_OPTIONS,
)
_builtin(
    "onnx-sentence-transformers",
    "embedder",
    "rag_rerank_plugins.backends.onnx_embedder:load",
    "SentenceTransformer's encoder exported once to ONNX, run by onnxruntime (extra: onnx)",
    options=ONNX_EMBEDDER_OPTIONS,
    uses_torch=False,  # as onnx-cross-encoder: torch only for the one-time export
)
_builtin(
    "bi-encoder",
    "reranker",
    "rag_rerank_plugins.backends.bi_encoder:load",
    "cosine similarity of shared embedder vectors (extra: st)",
    options=frozenset({"embedder_backend"}),
    forwards_options=("embedder_backend", "sentence-transformers"),
)
_builtin(
    "flag-reranker",
    "reranker",
    "rag_rerank_plugins.backends.flag:load_reranker",
    "FlagEmbedding FlagReranker, e.g. bge-reranker-v2-m3 (extra: flag)",
    options=FLAG_RERANKER_OPTIONS,
)
_builtin(
    "flag-bge-m3",
    "embedder",
    "rag_rerank_plugins.backends.flag:load_m3",
    "FlagEmbedding BGEM3FlagModel dense vectors, e.g. BAAI/bge-m3 (extra: flag)",
    options=FLAG_M3_OPTIONS,
)
_builtin(
    "flag-llm-reranker",
    "reranker",
    "rag_rerank_plugins.backends.flag_llm:load",
    "FlagEmbedding LLM rerankers: bge-reranker-v2-gemma, -minicpm-layerwise (extra: flag)",
    options=FLAG_LLM_OPTIONS,
)
_builtin(
    "causal-lm-reranker",
    "reranker",
    "rag_rerank_plugins.backends.causal_lm:load",
    "any causal LM scored by P(yes) after a prompt, e.g. Qwen3-Reranker (extra: st)",
    options=CAUSAL_LM_OPTIONS,
)
_builtin(
    "remote-reranker",
    "reranker",
    "rag_rerank_plugins.backends.remote:load_reranker",
    "a rerank server over HTTP: TEI, Cohere or infinity protocol (extra: remote)",
    options=REMOTE_OPTIONS,
    uses_torch=False,
)
_builtin(
    "remote-embedder",
    "embedder",
    "rag_rerank_plugins.backends.remote:load_embedder",
    "an embedding server over HTTP: TEI, Cohere or infinity protocol (extra: remote)",
    options=REMOTE_OPTIONS,
    uses_torch=False,
)
_builtin(
    "fake-reranker",
    "reranker",
    "rag_rerank_plugins.testing:load_fake_reranker",
    "deterministic word-overlap reranker for tests, no dependencies",
    options=FAKE_OPTIONS | {"delay_ms", "footprint_mb"},
    uses_torch=False,
)
_builtin(
    "fake-embedder",
    "embedder",
    "rag_rerank_plugins.testing:load_fake_embedder",
    "deterministic hashing embedder for tests, no dependencies",
    options=FAKE_OPTIONS | {"dim", "delay_ms", "footprint_mb"},
    uses_torch=False,
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
    """Add a backend. ``loader(spec, pool)`` returns a RerankerModel or EmbedderModel.

    Pass ``uses_torch=False`` for backends without local weights, so resolving their specs
    never imports torch. Pass ``options`` (the option names your loader reads) to have adapters
    reject other names when they are built; None (the default) accepts any name.
    """
    if kind not in ("reranker", "embedder"):
        raise ValueError(f"kind must be 'reranker' or 'embedder', got {kind!r}")
    accepted = None if options is None else frozenset(options)
    with _lock:
        if name in _REGISTRY and not replace:
            raise ValueError(f"Backend {name!r} is already registered; pass replace=True.")
        _REGISTRY[name] = BackendInfo(name, kind, loader, description, uses_torch, accepted)


def available_backends() -> dict[str, BackendInfo]:
    return dict(_REGISTRY)


def backend_info(name: str) -> BackendInfo:
    try:
        return _REGISTRY[name]
    except KeyError:
        raise UnknownBackendError(name, list(_REGISTRY)) from None


def check_options(name: str, options: Mapping[str, Any]) -> None:
    """Raise :class:`ConfigurationError` if backend ``name`` does not read one of ``options``.

    Cheap (set arithmetic, no imports), so adapters call it at construction: a typo or an
    unsupported option then fails where it was written, not at the first request's load. The
    message lists the accepted names. Backends registered without ``options`` accept anything.
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
    hints = {_HINTS[u] for u in unknown if u in _HINTS}
    if any(u in _DICT_VALUED for u in unknown):
        hints.add(
            "Dict-valued backend options cannot be passed through yet: a spec freezes them into "
            "a tuple, which the library's loader rejects."
        )
    raise ConfigurationError(
        f"{where} does not accept option(s) {', '.join(map(repr, unknown))} "
        f"(model_kwargs or an adapter field). Accepted: {', '.join(sorted(accepted))}."
        + "".join(f" {hint}" for hint in sorted(hints))
    )


def get_loader(name: str) -> Loader:
    """The loader callable for ``name``; imports the backend module on first use."""
    target = backend_info(name).target
    if callable(target):
        return target
    module_name, func_name = target.split(":")
    loader: Loader = getattr(importlib.import_module(module_name), func_name)
    return loader
