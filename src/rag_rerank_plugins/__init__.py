"""rag-rerank-plugins: shared, thread-safe reranker and embedder handles for RAG apps.

Importing the package is cheap: names resolve on first use (as in langchain_core), so torch,
transformers, sentence-transformers, LangChain and LlamaIndex load only when a model or adapter
that needs them is used.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING

from . import _cpu as _cpu  # ~5 ms, no torch: registers its fork hook (fork_safe_threads)
from ._environ_checks import CHECKS as _ENVIRON_CHECKS
from ._lazy import lazy_dir, lazy_getattr

__version__ = "0.1.0"


def _warn_misspelt_variables(environ: Mapping[str, str]) -> None:
    """``ModelPool()`` reads its settings below the modules that know every variable: warn of
    a misspelt ``RAG_RERANK_*`` variable from here, as ``get_settings()`` does (only when one
    is set: reading the full list imports pydantic-settings)."""
    if any(var.startswith("RAG_RERANK_") for var in environ):
        from .settings import warn_unknown_variables

        warn_unknown_variables(environ)


_ENVIRON_CHECKS.append(_warn_misspelt_variables)

if TYPE_CHECKING:
    from .engine_config import EngineConfig, PoolConfig
    from .exceptions import (
        ConfigurationError,
        InferenceError,
        InvalidInputError,
        MissingDependencyError,
        ModelLoadError,
        ModelNotFoundError,
        ModelReleasedError,
        OutOfMemoryError,
        QueueFullError,
        RagRerankError,
        RemoteAuthError,
        RemoteError,
        RemoteRequestError,
        RemoteTimeoutError,
        RemoteUnavailableError,
        RequestTimeoutError,
        UnknownBackendError,
    )
    from .handle import ModelHandle
    from .pool import ModelPool, get_pool
    from .spec import DEFAULT_EMBEDDER, DEFAULT_RERANKER, ModelSpec

_LAZY: dict[str, str] = {
    "ModelSpec": "spec",
    "DEFAULT_RERANKER": "spec",
    "DEFAULT_EMBEDDER": "spec",
    "ModelPool": "pool",
    "ModelHandle": "handle",
    "get_pool": "pool",
    "RagRerankError": "exceptions",
    "ConfigurationError": "exceptions",
    "UnknownBackendError": "exceptions",
    "InvalidInputError": "exceptions",
    "MissingDependencyError": "exceptions",
    "ModelLoadError": "exceptions",
    "ModelNotFoundError": "exceptions",
    "ModelReleasedError": "exceptions",
    "InferenceError": "exceptions",
    "OutOfMemoryError": "exceptions",
    "QueueFullError": "exceptions",
    "RequestTimeoutError": "exceptions",
    "RemoteUnavailableError": "exceptions",
    "RemoteTimeoutError": "exceptions",
    "RemoteRequestError": "exceptions",
    "RemoteError": "exceptions",
    "RemoteAuthError": "exceptions",
    "EngineConfig": "engine_config",
    "PoolConfig": "engine_config",
}

__all__ = [
    "DEFAULT_EMBEDDER",
    "DEFAULT_RERANKER",
    "ConfigurationError",
    "EngineConfig",
    "InferenceError",
    "InvalidInputError",
    "MissingDependencyError",
    "ModelHandle",
    "ModelLoadError",
    "ModelNotFoundError",
    "ModelPool",
    "PoolConfig",
    "ModelReleasedError",
    "ModelSpec",
    "OutOfMemoryError",
    "QueueFullError",
    "RagRerankError",
    "RemoteAuthError",
    "RemoteError",
    "RemoteRequestError",
    "RemoteTimeoutError",
    "RemoteUnavailableError",
    "RequestTimeoutError",
    "UnknownBackendError",
    "__version__",
    "get_pool",
]


#: Names users look for at the top level that live in a subpackage (the error says where).
_ELSEWHERE: dict[str, str] = {
    **dict.fromkeys(
        ("SharedRerankCompressor", "SharedCrossEncoder", "SharedEmbeddings"),
        "rag_rerank_plugins.langchain",
    ),
    **dict.fromkeys(
        ("SharedRerankPostprocessor", "SharedEmbedding", "SemanticCacheQueryEngine"),
        "rag_rerank_plugins.llama_index",
    ),
    **dict.fromkeys(("ServerConfig", "serve", "create_app"), "rag_rerank_plugins.server"),
    **dict.fromkeys(("Settings", "get_settings"), "rag_rerank_plugins.settings"),
    "SemanticCache": "rag_rerank_plugins.semantic_cache",
}

__getattr__ = lazy_getattr(__name__, _LAZY, globals(), _ELSEWHERE)
__dir__ = lazy_dir(globals(), __all__)
