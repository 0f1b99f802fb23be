"""A semantic cache for RAG answers, guarded against the near misses of dense-only caches.

::

    from rag_rerank_plugins.semantic_cache import SemanticCache

    cache = SemanticCache()                      # hybrid guard, in memory, the shared MiniLM
    cache.put("O que diz o Art. 72?", answer, namespace="gpt-4o|legal-chain")
    cache.lookup("O que diz o artigo 72?", namespace="gpt-4o|legal-chain")   # CacheHit
    cache.lookup("O que diz o Art. 75?", namespace="gpt-4o|legal-chain")     # None

Importing this package loads numpy, not torch: the models load through the pool on first use.
"""

from ._helpers import CacheHit
from .core import SemanticCache
from .guards import DEFAULT_THRESHOLDS, GUARDS
from .sqlite import SQLiteStore
from .stores import MemoryStore, Store

__all__ = [
    "DEFAULT_THRESHOLDS",
    "GUARDS",
    "CacheHit",
    "MemoryStore",
    "SQLiteStore",
    "SemanticCache",
    "Store",
]
