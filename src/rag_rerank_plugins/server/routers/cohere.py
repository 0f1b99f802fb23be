"""Cohere: ``POST /v1/rerank`` and ``POST /v1/embed`` (what Cohere's SDKs and our remote
backend's ``cohere`` protocol send)."""

from __future__ import annotations

import uuid
from typing import TYPE_CHECKING

from ...ranking import rank
from ..endpoints import Endpoint, ServerProtocol
from ..errors import ApiError
from ..schemas import (
    CohereEmbedRequest,
    CohereEmbedResponse,
    CohereRerankRequest,
    CohereRerankResponse,
    CohereRerankResult,
    Document,
    texts_of,
)

if TYPE_CHECKING:  # the state (and the pool) are imported once an app is built
    from ..state import ServerState

__all__ = ["PROTOCOL"]

#: Cohere's input_type -> is it a query?
_INPUT_TYPES = {
    "search_query": True,
    "search_document": False,
    "classification": False,
    "clustering": False,
}


async def rerank(body: CohereRerankRequest, state: ServerState) -> CohereRerankResponse:
    """Results best first; ``top_n`` cuts them (a NaN score is answered as an error)."""
    model = state.pick("reranker", body.model)
    texts = texts_of(body.documents)
    scores = await state.scores(model, body.query, texts)
    return CohereRerankResponse(
        id=str(uuid.uuid4()),
        results=[
            CohereRerankResult(
                index=r.index, relevance_score=r.score, document=Document(text=texts[r.index])
            )
            if body.return_documents
            else CohereRerankResult(index=r.index, relevance_score=r.score)
            for r in rank(scores, body.top_n)
        ],
        meta={"api_version": {"version": "1"}, "billed_units": {"search_units": 1}},
    )


async def embed(body: CohereEmbedRequest, state: ServerState) -> CohereEmbedResponse:
    """Unit vectors; ``input_type: "search_query"`` embeds queries."""
    model = state.pick("embedder", body.model)
    input_type = body.input_type or "search_document"
    if input_type not in _INPUT_TYPES:
        allowed = ", ".join(_INPUT_TYPES)
        raise ApiError(422, f"input_type must be one of {allowed}, got {input_type!r}.")
    if body.embedding_types is not None and body.embedding_types != ["float"]:
        raise ApiError(422, "Only embedding_types=['float'] is supported.")
    vectors = await state.vectors(
        model, body.texts, "texts", is_query=_INPUT_TYPES[input_type], normalize=True
    )
    # model_construct: the pool's vectors need no validation (256 x 1024 floats: ~5 ms).
    return CohereEmbedResponse.model_construct(
        id=str(uuid.uuid4()),
        embeddings={"float": vectors} if body.embedding_types else vectors,
        texts=body.texts,
        meta={"api_version": {"version": "1"}},
    )


PROTOCOL = ServerProtocol(
    name="cohere",
    title="Cohere-compatible",
    endpoints=(
        Endpoint(
            "POST",
            "/v1/rerank",
            rerank,
            "{model, query, documents, top_n} -> {id, results, meta}",
        ),
        Endpoint(
            "POST", "/v1/embed", embed, "{model, texts, input_type} -> {id, embeddings, meta}"
        ),
    ),
)
