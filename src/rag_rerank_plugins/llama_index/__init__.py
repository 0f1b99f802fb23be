"""LlamaIndex adapters backed by the shared pool (extra ``llama-index``).

* :class:`SharedRerankPostprocessor` - ``BaseNodePostprocessor`` for query engines.
* :class:`SharedEmbedding` - ``BaseEmbedding`` for indexes and retrievers.
"""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .embedding import SharedEmbedding
    from .postprocessor import SharedRerankPostprocessor

__all__ = ["SharedEmbedding", "SharedRerankPostprocessor"]

_LAZY = {"SharedRerankPostprocessor": "postprocessor", "SharedEmbedding": "embedding"}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value
