"""Backend registry: backend name -> kind and (lazily imported) loader.

Built-in backends are listed by module path so that naming one costs nothing until it loads;
heavy libraries (torch, sentence-transformers, FlagEmbedding) are imported by the loader only.
"""

from __future__ import annotations

import importlib
import threading
from dataclasses import dataclass

from ..exceptions import UnknownBackendError
from .base import EmbedderModel, Kind, LoadedModel, Loader, RerankerModel

__all__ = [
    "BackendInfo",
    "EmbedderModel",
    "LoadedModel",
    "Loader",
    "RerankerModel",
    "backend_info",
    "available_backends",
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


_lock = threading.Lock()
_REGISTRY: dict[str, BackendInfo] = {}


def _builtin(
    name: str, kind: Kind, target: str, description: str, *, uses_torch: bool = True
) -> None:
    _REGISTRY[name] = BackendInfo(name, kind, target, description, uses_torch)


_builtin(
    "cross-encoder",
    "reranker",
    "rag_rerank_plugins.backends.st_cross_encoder:load",
    "sentence-transformers CrossEncoder (extra: st)",
)
_builtin(
    "sentence-transformers",
    "embedder",
    "rag_rerank_plugins.backends.st_embedder:load",
    "sentence-transformers SentenceTransformer (extra: st)",
)
_builtin(
    "bi-encoder",
    "reranker",
    "rag_rerank_plugins.backends.bi_encoder:load",
    "cosine similarity of shared embedder vectors (extra: st)",
)
_builtin(
    "flag-reranker",
    "reranker",
    "rag_rerank_plugins.backends.flag:load_reranker",
    "FlagEmbedding FlagReranker, e.g. bge-reranker-v2-m3 (extra: flag)",
)
_builtin(
    "flag-bge-m3",
    "embedder",
    "rag_rerank_plugins.backends.flag:load_m3",
    "FlagEmbedding BGEM3FlagModel dense vectors, e.g. BAAI/bge-m3 (extra: flag)",
)
_builtin(
    "remote-reranker",
    "reranker",
    "rag_rerank_plugins.backends.remote:load_reranker",
    "a rerank server over HTTP: TEI, Cohere or infinity protocol (extra: remote)",
    uses_torch=False,
)
_builtin(
    "remote-embedder",
    "embedder",
    "rag_rerank_plugins.backends.remote:load_embedder",
    "an embedding server over HTTP: TEI, Cohere or infinity protocol (extra: remote)",
    uses_torch=False,
)
_builtin(
    "fake-reranker",
    "reranker",
    "rag_rerank_plugins.testing:load_fake_reranker",
    "deterministic word-overlap reranker for tests, no dependencies",
    uses_torch=False,
)
_builtin(
    "fake-embedder",
    "embedder",
    "rag_rerank_plugins.testing:load_fake_embedder",
    "deterministic hashing embedder for tests, no dependencies",
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
) -> None:
    """Add a backend. ``loader(spec, pool)`` returns a RerankerModel or EmbedderModel.

    Pass ``uses_torch=False`` for backends without local weights, so resolving their specs
    never imports torch.
    """
    if kind not in ("reranker", "embedder"):
        raise ValueError(f"kind must be 'reranker' or 'embedder', got {kind!r}")
    with _lock:
        if name in _REGISTRY and not replace:
            raise ValueError(f"Backend {name!r} is already registered; pass replace=True.")
        _REGISTRY[name] = BackendInfo(name, kind, loader, description, uses_torch)


def available_backends() -> dict[str, BackendInfo]:
    return dict(_REGISTRY)


def backend_info(name: str) -> BackendInfo:
    try:
        return _REGISTRY[name]
    except KeyError:
        raise UnknownBackendError(name, list(_REGISTRY)) from None


def get_loader(name: str) -> Loader:
    """The loader callable for ``name``; imports the backend module on first use."""
    target = backend_info(name).target
    if callable(target):
        return target
    module_name, func_name = target.split(":")
    loader: Loader = getattr(importlib.import_module(module_name), func_name)
    return loader
