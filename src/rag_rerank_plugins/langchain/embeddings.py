"""``SharedEmbeddings``: LangChain ``Embeddings`` on a shared embedder handle."""

from __future__ import annotations

from langchain_core.embeddings import Embeddings
from pydantic import AliasChoices, ConfigDict, Field

from ..adapter_base import SharedModelFields
from ..spec import DEFAULT_EMBEDDER
from . import _compat  # noqa: F401

__all__ = ["SharedEmbeddings"]


class SharedEmbeddings(SharedModelFields, Embeddings):
    """Embeddings for vector stores and retrievers; one model per process however many instances.

    Queries use the model's query prompt (``encode_query``) and documents its document prompt.
    ``model_name=`` is accepted for a one-line switch from ``HuggingFaceEmbeddings``.
    """

    model_config = ConfigDict(
        arbitrary_types_allowed=True,
        protected_namespaces=(),
        populate_by_name=True,
        extra="forbid",
    )
    _kind = "embedder"

    model: str = Field(
        default=DEFAULT_EMBEDDER,
        validation_alias=AliasChoices("model", "model_name"),
        description="Hub name or local path.",
    )
    backend: str = "sentence-transformers"
    batch_size: int = Field(default=32, gt=0)
    normalize_embeddings: bool = Field(default=False, description="Scale vectors to unit length.")

    def embed_documents(self, texts: list[str]) -> list[list[float]]:
        return self._pool().embed(
            self.spec, texts, self.batch_size, normalize=self.normalize_embeddings
        )

    def embed_query(self, text: str) -> list[float]:
        return self._pool().embed(
            self.spec, [text], self.batch_size, is_query=True, normalize=self.normalize_embeddings
        )[0]

    async def aembed_documents(self, texts: list[str]) -> list[list[float]]:
        return await self._pool().aembed(
            self.spec, texts, self.batch_size, normalize=self.normalize_embeddings
        )

    async def aembed_query(self, text: str) -> list[float]:
        vectors = await self._pool().aembed(
            self.spec, [text], self.batch_size, is_query=True, normalize=self.normalize_embeddings
        )
        return vectors[0]
