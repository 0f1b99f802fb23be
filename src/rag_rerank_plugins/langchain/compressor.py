"""``SharedRerankCompressor``: a LangChain document compressor on a shared reranker handle."""

from __future__ import annotations

# First: a clear MissingDependencyError when langchain-core is missing, not a bare ImportError.
from . import _compat  # noqa: F401  # isort: skip

import time
from collections.abc import Iterable, Sequence
from typing import Any

from langchain_core.callbacks import Callbacks
from langchain_core.callbacks.manager import AsyncCallbackManager, CallbackManager
from langchain_core.documents import BaseDocumentCompressor, Document
from pydantic import ConfigDict, Field

from ..adapter_base import RerankSettings, from_settings
from ..exceptions import InvalidInputError
from ..ranking import Ranked
from ..windows import WindowInfo

__all__ = ["SharedRerankCompressor"]

#: Metadata key of the score on returned documents (same as LangChain's Cohere/Jina rerankers).
SCORE_KEY = "relevance_score"
#: Metadata key of the deciding window (a dict, see WindowInfo) when long-document windows are on.
WINDOW_KEY = "rerank_window"
#: Metadata key set (to a short message) on documents passed through unscored (on_error).
ERROR_KEY = "rerank_error"
#: Name of the custom callback event sent to ``callbacks`` after each rerank (``on_custom_event``).
EVENT_NAME = "rag_rerank"


def _document_list(documents: Any) -> list[Document]:
    """``documents`` read once into a list (a generator cannot be indexed after scoring).

    A single Document or str is iterable too (pydantic models iterate over their fields), so
    each would be taken apart into confusing items; they and non-iterables fail here instead.
    """
    if isinstance(documents, (str, Document)) or not isinstance(documents, Iterable):
        raise InvalidInputError(
            "documents must be a list (or other iterable) of langchain_core Documents, got "
            f"{type(documents).__name__}. For one document pass [document]."
        )
    return list(documents)


class SharedRerankCompressor(RerankSettings, BaseDocumentCompressor):
    """Rerank retrieved documents with a model loaded once per process.

    Drop-in for ``ContextualCompressionRetriever(base_compressor=..., base_retriever=...)``.
    Build one per request if you like: construction validates a few fields and never loads.

    Returns new documents of the caller's class (a ``Document`` subclass keeps its type and extra
    fields: shallow copies), best first, each with ``metadata["relevance_score"]`` (float) and the
    input's ``id``; the input documents are never modified. With ``window_tokens`` set,
    ``metadata["rerank_window"]`` says which token window of the document decided its score.
    With ``on_error="passthrough"`` a failed scoring returns the first ``top_n`` documents in
    retrieval order with ``metadata["rerank_error"]`` set and no ``relevance_score`` key.
    """

    model_config = ConfigDict(arbitrary_types_allowed=True, protected_namespaces=(), extra="forbid")

    model: str = Field(
        default_factory=from_settings("reranker_model"),
        description="Hub name or local path (default: RAG_RERANK_RERANKER_MODEL).",
    )
    backend: str = Field(default_factory=from_settings("reranker_backend"))

    def _texts(self, documents: Sequence[Document]) -> list[str]:
        """The texts to score, checked before any model work.

        Only ``Document`` instances (subclasses included) are accepted: a look-alike (a dict, an
        object with a ``page_content`` attribute) could not be returned as what it is, since
        results are copies made with ``Document.model_copy``.
        """
        texts = []
        for i, doc in enumerate(documents):
            if not isinstance(doc, Document):
                raise InvalidInputError(
                    f"documents[{i}] is {type(doc).__name__}, not a langchain_core Document. "
                    "Wrap the text: Document(page_content=text, metadata={...})."
                )
            content = doc.page_content
            if not isinstance(content, str):
                raise InvalidInputError(
                    f"documents[{i}] has no text page_content ({type(content).__name__}); "
                    "page_content must be a str."
                )
            texts.append(content)
        return texts

    @staticmethod
    def _build(
        documents: Sequence[Document],
        ranked: list[Ranked],
        windows: list[WindowInfo] | None = None,
        error: str | None = None,
    ) -> list[Document]:
        out = []
        for index, score in ranked:
            doc = documents[index]
            if error is None:
                metadata = {**doc.metadata, SCORE_KEY: score}
            else:  # unscored: drop any earlier stage's score rather than pass it off as ours
                metadata = {k: v for k, v in doc.metadata.items() if k != SCORE_KEY}
                metadata[ERROR_KEY] = error
            if windows is not None:
                metadata[WINDOW_KEY] = windows[index].as_dict()
            # A copy of the caller's own class (subclass fields kept); the input stays untouched.
            out.append(doc.model_copy(update={"metadata": metadata}))
        return out

    def _event(self, n_in: int, n_out: int, seconds: float, error: str | None) -> dict[str, Any]:
        return {
            "model": self.model,
            "backend": self.backend,
            "documents_in": n_in,
            "documents_out": n_out,
            "seconds": seconds,
            "error": error,
        }

    def compress_documents(
        self,
        documents: Iterable[Document],
        query: str,
        callbacks: Callbacks | None = None,
    ) -> Sequence[Document]:
        """Rerank ``documents`` for ``query``; keep ``top_n`` scoring >= ``score_threshold``.

        ``documents`` may be any iterable (a generator too): it is read once, before scoring.
        With ``callbacks``, their handlers get ``on_custom_event("rag_rerank", data)`` after
        scoring, ``data`` = {model, backend, documents_in, documents_out, seconds, error}.
        """
        start = time.perf_counter()
        documents = _document_list(documents)
        ranked, windows, error = self.rank_texts_guarded(query, self._texts(documents))
        out = self._build(documents, ranked, windows, error)
        if callbacks is not None:
            manager = CallbackManager.configure(inheritable_callbacks=callbacks)
            data = self._event(len(documents), len(out), time.perf_counter() - start, error)
            manager.on_custom_event(EVENT_NAME, data, run_id=manager.parent_run_id)
        return out

    async def acompress_documents(
        self,
        documents: Iterable[Document],
        query: str,
        callbacks: Callbacks | None = None,
    ) -> Sequence[Document]:
        """Async version; the forward pass runs in a worker thread, never on the event loop."""
        start = time.perf_counter()
        documents = _document_list(documents)
        ranked, windows, error = await self.arank_texts_guarded(query, self._texts(documents))
        out = self._build(documents, ranked, windows, error)
        if callbacks is not None:
            manager = AsyncCallbackManager.configure(inheritable_callbacks=callbacks)
            data = self._event(len(documents), len(out), time.perf_counter() - start, error)
            await manager.on_custom_event(EVENT_NAME, data, run_id=manager.parent_run_id)
        return out
