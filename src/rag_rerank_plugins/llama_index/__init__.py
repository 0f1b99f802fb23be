"""LlamaIndex adapters backed by the shared pool (extra ``llama-index``).

* :class:`SharedRerankPostprocessor` - ``BaseNodePostprocessor`` for query engines.
* :class:`SharedEmbedding` - ``BaseEmbedding`` for indexes and retrievers.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from .._lazy import lazy_getattr

if TYPE_CHECKING:
    from .embedding import SharedEmbedding
    from .postprocessor import SharedRerankPostprocessor

__all__ = ["SharedEmbedding", "SharedRerankPostprocessor"]

_LAZY = {"SharedRerankPostprocessor": "postprocessor", "SharedEmbedding": "embedding"}


__getattr__ = lazy_getattr(__name__, _LAZY, globals())
