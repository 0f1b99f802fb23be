"""Cohere's API shape: ``POST /v1/rerank`` and ``POST /v1/embed`` (``protocol="cohere"``;
``rag-rerank serve`` answers both too).

Every request names the model (``model_name``). Embeddings ask for ``float`` vectors and say
whether the texts are queries or documents (``input_type``); ``truncate`` maps to ``END``
(``START`` with ``truncation_direction="left"``) or ``NONE``. Rerank requests have no such field
(the server cuts long documents), so ``truncate=False`` is refused for a Cohere reranker.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from .base import Call, CallSettings, Protocol, documents_rerank, vector_list

__all__ = ["CohereProtocol"]


_TRUNCATE = {"right": "END", "left": "START"}


class CohereProtocol(Protocol):
    """Cohere's v1 routes: ``documents`` rerank, typed float embeddings."""

    needs_model_name = True
    #: Cohere's rerank request has no truncation field: the server always cuts documents.
    honours_no_truncate = frozenset({"embed"})

    def rerank(self, settings: CallSettings, query: str, texts: Sequence[str]) -> Call:
        return documents_rerank(settings, "/v1/rerank", query, texts)

    def embed(
        self, settings: CallSettings, texts: Sequence[str], *, is_query: bool, normalize: bool
    ) -> Call:
        n = len(texts)
        payload: dict[str, Any] = {
            "texts": list(texts),
            "input_type": "search_query" if is_query else "search_document",
            "embedding_types": ["float"],
            "truncate": _TRUNCATE[settings.truncation_direction] if settings.truncate else "NONE",
            "model": settings.model_name,
        }

        def parse(body: Any) -> list[list[float]]:
            # {"embeddings": {"float": [...]}} (embedding_types given), or {"embeddings": [...]}.
            vectors = body.get("embeddings") if isinstance(body, dict) else None
            if isinstance(vectors, dict):
                vectors = vectors.get("float")
            return vector_list(vectors, n)

        return Call("/v1/embed", payload, parse)
