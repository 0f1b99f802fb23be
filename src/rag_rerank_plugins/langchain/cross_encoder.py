"""``SharedCrossEncoder``: LangChain's ``BaseCrossEncoder`` interface on a shared handle.

For code that already uses LangChain's ``CrossEncoderReranker(model=HuggingFaceCrossEncoder(...))``:
swap in ``SharedCrossEncoder(model_name=...)`` and the model is loaded once per process.
"""

from __future__ import annotations

# First: a clear MissingDependencyError when langchain-core is missing, not a bare ImportError.
from . import _compat  # noqa: F401  # isort: skip

from langchain_core.cross_encoders import BaseCrossEncoder
from pydantic import AliasChoices, ConfigDict, Field

from ..adapter_base import SharedModelFields, from_settings

__all__ = ["SharedCrossEncoder"]


class SharedCrossEncoder(SharedModelFields, BaseCrossEncoder):
    """``score(pairs)`` via the shared pool; takes ``model_name=`` like HuggingFaceCrossEncoder."""

    model_config = ConfigDict(
        arbitrary_types_allowed=True,
        protected_namespaces=(),
        populate_by_name=True,
        extra="forbid",
    )

    model: str = Field(
        default_factory=from_settings("reranker_model"),
        validation_alias=AliasChoices("model", "model_name"),
        description="Hub name or local path.",
    )
    backend: str = Field(default_factory=from_settings("reranker_backend"))
    batch_size: int = Field(default_factory=from_settings("batch_size"), gt=0)

    def score(self, text_pairs: list[tuple[str, str]]) -> list[float]:
        """One relevance score per (query, passage) pair, in input order."""
        return self._pool().score_pairs(self.spec, text_pairs, self.batch_size)
