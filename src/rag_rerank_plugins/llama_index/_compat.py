"""Import guard: a clear 'install the llama-index extra' error instead of a bare ImportError."""

from __future__ import annotations

from ..exceptions import MissingDependencyError

try:
    import llama_index.core  # noqa: F401
except ImportError as exc:  # pragma: no cover - exercised in an environment without llama-index
    raise MissingDependencyError(
        "llama-index-core", "llama-index", "rag_rerank_plugins.llama_index"
    ) from exc
