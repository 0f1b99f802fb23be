"""``SharedEmbedding``: a LlamaIndex ``BaseEmbedding`` on a shared embedder handle."""

from __future__ import annotations

from typing import Any

# The guard first: without llama-index-core, a MissingDependencyError naming the extra.
from . import _compat  # noqa: F401

# isort: split

from llama_index.core.base.embeddings.base import BaseEmbedding, Embedding
from pydantic import ConfigDict, Field

from ..adapter_base import SharedModelFields, from_settings

__all__ = ["SharedEmbedding"]


class SharedEmbedding(SharedModelFields, BaseEmbedding):
    """Embeddings for LlamaIndex indexes; one model per process however many instances.

    Same arguments as ``HuggingFaceEmbedding`` where they apply (``model_name``, ``device``,
    ``embed_batch_size``, ``normalize``, ``max_length``). ``embed_batch_size`` is both LlamaIndex's
    chunk size and the forward-pass batch size.
    """

    model_config = ConfigDict(arbitrary_types_allowed=True, protected_namespaces=())
    _kind = "embedder"
    _model_field = "model_name"

    model_name: str = Field(
        default_factory=from_settings("embedder_model"),
        description="Hub name or local path (default: RAG_RERANK_EMBEDDER_MODEL).",
    )
    backend: str = Field(default_factory=from_settings("embedder_backend"))
    embed_batch_size: int = Field(default_factory=from_settings("batch_size"), gt=0, le=2048)
    normalize: bool = Field(default=True, description="Scale vectors to unit length.")
    show_progress: bool = Field(
        default=False,
        description="Default for get_text_embedding_batch(show_progress=...): a tqdm bar while "
        "bulk texts are embedded (index building). Either one switches the bar on.",
    )

    @classmethod
    def class_name(cls) -> str:
        return "SharedEmbedding"

    def get_text_embedding_batch(
        self, texts: list[str], show_progress: bool = False, **kwargs: Any
    ) -> list[Embedding]:
        """LlamaIndex's batched embedding (its own tqdm bar), on when either flag asks for it."""
        return super().get_text_embedding_batch(
            texts, show_progress=show_progress or self.show_progress, **kwargs
        )

    async def aget_text_embedding_batch(
        self, texts: list[str], show_progress: bool = False, **kwargs: Any
    ) -> list[Embedding]:
        return await super().aget_text_embedding_batch(
            texts, show_progress=show_progress or self.show_progress, **kwargs
        )

    def _embed(self, texts: list[str], is_query: bool) -> list[Embedding]:
        return self._pool().embed(
            self.spec, texts, self.embed_batch_size, is_query=is_query, normalize=self.normalize
        )

    async def _aembed(self, texts: list[str], is_query: bool) -> list[Embedding]:
        return await self._pool().aembed(
            self.spec, texts, self.embed_batch_size, is_query=is_query, normalize=self.normalize
        )

    def _get_query_embedding(self, query: str) -> Embedding:
        return self._embed([query], is_query=True)[0]

    async def _aget_query_embedding(self, query: str) -> Embedding:
        return (await self._aembed([query], is_query=True))[0]

    def _get_text_embedding(self, text: str) -> Embedding:
        return self._embed([text], is_query=False)[0]

    async def _aget_text_embedding(self, text: str) -> Embedding:
        return (await self._aembed([text], is_query=False))[0]

    def _get_text_embeddings(self, texts: list[str]) -> list[Embedding]:
        return self._embed(texts, is_query=False)

    async def _aget_text_embeddings(self, texts: list[str]) -> list[Embedding]:
        return await self._aembed(texts, is_query=False)
