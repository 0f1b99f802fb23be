"""``SharedEmbeddings``: LangChain ``Embeddings`` on a shared embedder handle."""

from __future__ import annotations

# First: a clear MissingDependencyError when langchain-core is missing, not a bare ImportError.
from . import _compat  # noqa: F401  # isort: skip

from collections.abc import Iterable
from typing import Any

from langchain_core.embeddings import Embeddings
from pydantic import AliasChoices, ConfigDict, Field

from .._progress import chunks, progress_bar
from ..adapter_base import SharedModelFields, from_settings
from ..exceptions import InvalidInputError

__all__ = ["SharedEmbeddings"]


def _document_texts(texts: Any) -> list[str]:
    """``texts`` as a list of str, checked before the model loads.

    A bare str is iterable too: without this check ``embed_documents("hello")`` returned five
    vectors, one per letter.
    """
    if isinstance(texts, str):
        example = repr(texts) if len(texts) <= 40 else "text"
        raise InvalidInputError(
            f"embed_documents takes a list of str, got a single str {texts[:40]!r}. Wrap it in a "
            f"list: embed_documents([{example}]) (or embed_query({example}) for a query)."
        )
    if not isinstance(texts, Iterable):
        raise InvalidInputError(f"embed_documents takes a list of str, got {type(texts).__name__}.")
    items = list(texts)
    for i, text in enumerate(items):
        if not isinstance(text, str):
            raise InvalidInputError(
                f"texts[{i}] is {type(text).__name__}, not str. Convert it to text first "
                "(rag-rerank-plugins never guesses how to stringify a document)."
            )
    return items


def _query_text(text: Any) -> str:
    if not isinstance(text, str):
        raise InvalidInputError(
            f"embed_query takes one str, got {type(text).__name__}. "
            "Use embed_documents for a list of texts."
        )
    return text


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
        texts = _document_texts(texts)
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
        text = _query_text(text)
        return self._pool().embed(
            self.spec, [text], self.batch_size, is_query=True, normalize=self.normalize_embeddings
        )[0]

    async def aembed_documents(self, texts: list[str]) -> list[list[float]]:
        texts = _document_texts(texts)
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
        text = _query_text(text)
        vectors = await self._pool().aembed(
            self.spec, [text], self.batch_size, is_query=True, normalize=self.normalize_embeddings
        )
        return vectors[0]
