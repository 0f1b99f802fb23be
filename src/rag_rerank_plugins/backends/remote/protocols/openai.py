"""infinity (michaelfeil/infinity) and OpenAI-style servers: ``POST /rerank`` with
``documents``, and ``POST /embeddings`` in OpenAI's shape (``protocol="infinity"``;
``rag-rerank serve`` answers both too).

Every request names the model (``model_name``). Rerank asks for normalised scores
(``raw_scores: false``) and answers ``{"results": [{index, relevance_score}]}``; embeddings
answer ``{"data": [{index, embedding}]}``, put back in index order. Neither request can ask
the server not to cut a long text, so ``truncate=False`` is refused for this protocol.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from .base import Call, CallSettings, Protocol, UnexpectedResponse, documents_rerank, vector_list

__all__ = ["InfinityProtocol"]

_DATA = "{'data': [{index, embedding}]}"


class InfinityProtocol(Protocol):
    """infinity's rerank route and OpenAI's embeddings route."""

    needs_model_name = True
    #: Neither request has a truncation field: the server always cuts long texts.
    honours_no_truncate: frozenset[str] = frozenset()

    def rerank(self, settings: CallSettings, query: str, texts: Sequence[str]) -> Call:
        return documents_rerank(settings, "/rerank", query, texts, raw_scores=False)

    def embed(
        self, settings: CallSettings, texts: Sequence[str], *, is_query: bool, normalize: bool
    ) -> Call:
        n = len(texts)
        payload = {"input": list(texts), "encoding_format": "float", "model": settings.model_name}

        def parse(body: Any) -> list[list[float]]:
            data = body.get("data") if isinstance(body, dict) else None
            if not isinstance(data, list):
                raise UnexpectedResponse(_DATA)
            try:
                by_index = {item["index"]: item["embedding"] for item in data}
            except (KeyError, TypeError):
                raise UnexpectedResponse(_DATA) from None
            # Each index 0..n-1 exactly once: a duplicate or a missing one would put a vector
            # at another text's position.
            indices_ok = all(type(index) is int for index in by_index)  # not bool, not "1"
            if len(data) != n or not indices_ok or set(by_index) != set(range(n)):
                raise UnexpectedResponse(f"{n} embeddings with the indices 0..{n - 1}, once each")
            return vector_list([by_index[i] for i in range(n)], n)

        return Call("/embeddings", payload, parse)
