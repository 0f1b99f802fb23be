"""LangChain adapters backed by the shared pool (extra ``langchain``).

* :class:`SharedRerankCompressor` - document compressor for ``ContextualCompressionRetriever``.
* :class:`SharedCrossEncoder` - ``BaseCrossEncoder`` for LangChain's own ``CrossEncoderReranker``.
* :class:`SharedEmbeddings` - ``Embeddings`` (sync + async) for vector stores.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from .._lazy import lazy_getattr

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


__getattr__ = lazy_getattr(__name__, _LAZY, globals())
