"""LangChain adapters backed by the shared pool (extra ``langchain``).

* :class:`SharedRerankCompressor` - document compressor for ``ContextualCompressionRetriever``.
* :class:`SharedCrossEncoder` - ``BaseCrossEncoder`` for LangChain's own ``CrossEncoderReranker``.
* :class:`SharedEmbeddings` - ``Embeddings`` (sync + async) for vector stores.
"""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .compressor import SharedRerankCompressor
    from .cross_encoder import SharedCrossEncoder
    from .embeddings import SharedEmbeddings

__all__ = ["SharedCrossEncoder", "SharedEmbeddings", "SharedRerankCompressor"]

_LAZY = {
    "SharedRerankCompressor": "compressor",
    "SharedCrossEncoder": "cross_encoder",
    "SharedEmbeddings": "embeddings",
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value
