"""Import guard: a clear 'install the langchain extra' error instead of a bare ImportError."""

from __future__ import annotations

from ..exceptions import MissingDependencyError

try:
    import langchain_core  # noqa: F401
except ImportError as exc:  # pragma: no cover - exercised in an environment without langchain
    raise MissingDependencyError(
        "langchain-core", "langchain", "rag_rerank_plugins.langchain"
    ) from exc
