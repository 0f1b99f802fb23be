"""``SharedEmbeddings``: LangChain ``Embeddings`` on a shared embedder handle."""

from __future__ import annotations

# First: a clear MissingDependencyError when langchain-core is missing, not a bare ImportError.
from . import _compat  # noqa: F401  # isort: skip

from langchain_core.embeddings import Embeddings
from pydantic import AliasChoices, ConfigDict, Field

from .._progress import chunks, progress_bar
from ..adapter_base import SharedModelFields, from_settings

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
        default_factory=from_settings("embedder_model"),
        validation_alias=AliasChoices("model", "model_name"),
        description="Hub name or local path.",
    )
    backend: str = Field(default_factory=from_settings("embedder_backend"))
    batch_size: int = Field(default_factory=from_settings("batch_size"), gt=0)
    normalize_embeddings: bool = Field(default=False, description="Scale vectors to unit length.")
    show_progress: bool = Field(
        default=False,
        description="Show a tqdm bar (on stderr) while embed_documents works through the texts.",
    )

    def embed_documents(self, texts: list[str]) -> list[list[float]]:
        if not self.show_progress:
            return self._pool().embed(
                self.spec, texts, self.batch_size, normalize=self.normalize_embeddings
            )
        spec, vectors = self.spec, []
        with progress_bar(len(texts), "Embedding documents", enabled=True) as bar:
            for chunk in chunks(texts, self.batch_size):
                vectors.extend(
                    self._pool().embed(
                        spec, chunk, self.batch_size, normalize=self.normalize_embeddings
                    )
                )
                bar.update(len(chunk))
        return vectors

    def embed_query(self, text: str) -> list[float]:
        return self._pool().embed(
            self.spec, [text], self.batch_size, is_query=True, normalize=self.normalize_embeddings
        )[0]

    async def aembed_documents(self, texts: list[str]) -> list[list[float]]:
        if not self.show_progress:
            return await self._pool().aembed(
                self.spec, texts, self.batch_size, normalize=self.normalize_embeddings
            )
        spec, vectors = self.spec, []
        with progress_bar(len(texts), "Embedding documents", enabled=True) as bar:
            for chunk in chunks(texts, self.batch_size):
                vectors.extend(
                    await self._pool().aembed(
                        spec, chunk, self.batch_size, normalize=self.normalize_embeddings
                    )
                )
                bar.update(len(chunk))
        return vectors

    async def aembed_query(self, text: str) -> list[float]:
        vectors = await self._pool().aembed(
            self.spec, [text], self.batch_size, is_query=True, normalize=self.normalize_embeddings
        )
        return vectors[0]
