"""LlamaIndex adapters backed by the shared pool (extra ``llama-index``).

* :class:`SharedRerankPostprocessor` - ``BaseNodePostprocessor`` for query engines.
* :class:`SharedEmbedding` - ``BaseEmbedding`` for indexes and retrievers.
* :class:`SemanticCacheQueryEngine` - a query engine answering repeated questions from the
  guarded semantic cache.

Importing this package imports no LlamaIndex code; the first access to an adapter does, after the
dependency guard (:mod:`._compat`), so a missing ``llama-index-core`` is reported as
:class:`~rag_rerank_plugins.exceptions.MissingDependencyError` naming the extra to install rather
than as a bare ``ModuleNotFoundError`` from deep inside a submodule.
"""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING, Any

from .._lazy import lazy_dir, lazy_getattr

if TYPE_CHECKING:
    from .embedding import SharedEmbedding
    from .postprocessor import SharedRerankPostprocessor
    from .query_engine import SemanticCacheQueryEngine

__all__ = ["SemanticCacheQueryEngine", "SharedEmbedding", "SharedRerankPostprocessor"]

_LAZY = {
    "SharedRerankPostprocessor": "postprocessor",
    "SharedEmbedding": "embedding",
    "SemanticCacheQueryEngine": "query_engine",
}

_lazy = lazy_getattr(__name__, _LAZY, globals())
__dir__ = lazy_dir(globals(), __all__)  # dir() and tab completion list the lazy adapters


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import_module("._compat", __name__)  # raises MissingDependencyError without llama-index
    return _lazy(name)
