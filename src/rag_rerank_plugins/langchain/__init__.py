"""LangChain adapters backed by the shared pool (extra ``langchain``).

* :class:`SharedRerankCompressor` - document compressor for ``ContextualCompressionRetriever``.
* :class:`SharedCrossEncoder` - ``BaseCrossEncoder`` for LangChain's own ``CrossEncoderReranker``.
* :class:`SharedEmbeddings` - ``Embeddings`` (sync + async) for vector stores.
* :class:`SharedSemanticCache` - ``BaseCache`` for ``set_llm_cache``: the guarded semantic cache.
"""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING, Any

from .._lazy import lazy_dir, lazy_getattr

if TYPE_CHECKING:
    from .compressor import SharedRerankCompressor
    from .cross_encoder import SharedCrossEncoder
    from .embeddings import SharedEmbeddings
    from .semantic_cache import SharedSemanticCache

__all__ = [
    "SharedCrossEncoder",
    "SharedEmbeddings",
    "SharedRerankCompressor",
    "SharedSemanticCache",
]

_LAZY = {
    "SharedRerankCompressor": "compressor",
    "SharedCrossEncoder": "cross_encoder",
    "SharedEmbeddings": "embeddings",
    "SharedSemanticCache": "semantic_cache",
}


_lazy_getattr = lazy_getattr(__name__, _LAZY, globals())


def __getattr__(name: str) -> Any:
    """Resolve an adapter lazily, checking for langchain-core *first*.

    The adapter modules import langchain_core at their top, so without this check a missing
    extra surfaced as a bare ``ModuleNotFoundError`` instead of ``MissingDependencyError``
    naming the extra. The check runs on attribute access, never on ``import
    rag_rerank_plugins.langchain`` itself, which stays free of LangChain imports.
    """
    if name in _LAZY:
        import_module("._compat", __name__)
    return _lazy_getattr(name)


__dir__ = lazy_dir(globals(), __all__)
