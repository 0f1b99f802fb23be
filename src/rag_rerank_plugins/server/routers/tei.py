"""TEI (huggingface/text-embeddings-inference): ``POST /rerank`` and ``POST /embed``.

``/rerank`` also answers infinity's shape: ``documents`` instead of ``texts`` gets
``{"results": [...]}`` instead of a bare list (one path cannot belong to two protocols).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ...ranking import rank
from ..endpoints import Endpoint, ServerProtocol
from ..errors import ApiError
from ..schemas import (
    EmbedRequest,
    InfinityRerankResponse,
    InfinityRerankResult,
    RerankRequest,
    TeiRank,
    texts_of,
)

if TYPE_CHECKING:  # the state (and the pool) are imported once an app is built
    from ..state import ServerState

__all__ = ["PROTOCOL"]

#: TEI's prompt_name -> is it a query?
_QUERY_PROMPTS = {"query": True, "search_query": True, "document": False, "passage": False}


async def rerank(body: RerankRequest, state: ServerState) -> list[TeiRank] | InfinityRerankResponse:
    """Scores best first; ties keep input order (a NaN score is answered as an error)."""
    if body.raw_scores:
        raise ApiError(
            422,
            "raw_scores=true is not supported: scores are the model's own activation, as "
            "sentence-transformers' CrossEncoder.predict returns them.",
        )
    model = state.pick("reranker", body.model)
    if body.texts is not None:
        texts = body.texts
        scores = await state.scores(model, body.query, texts)
        return [
            TeiRank(index=r.index, score=r.score, text=texts[r.index])
            if body.return_text
            else TeiRank(index=r.index, score=r.score)
            for r in rank(scores, body.top_n)
        ]
    if body.documents is None:
        raise ApiError(422, "Pass the passages as 'texts' (TEI) or 'documents' (infinity).")
    texts = texts_of(body.documents)
    scores = await state.scores(model, body.query, texts)
    return InfinityRerankResponse(
        model=model.name,
        results=[
            InfinityRerankResult(index=r.index, relevance_score=r.score, document=texts[r.index])
            if body.return_documents
            else InfinityRerankResult(index=r.index, relevance_score=r.score)
            for r in rank(scores, body.top_n)
        ],
    )


async def embed(body: EmbedRequest, state: ServerState) -> list[list[float]]:
    """One vector per input; ``prompt_name: "query"`` embeds queries."""
    model = state.pick("embedder", body.model)
    is_query = False
    if body.prompt_name is not None:
        if body.prompt_name not in _QUERY_PROMPTS:
            raise ApiError(
                422,
                f"prompt_name {body.prompt_name!r} is not supported; use 'query' for queries "
                "or 'document' (or omit it) for documents.",
            )
        is_query = _QUERY_PROMPTS[body.prompt_name]
    texts = [body.inputs] if isinstance(body.inputs, str) else body.inputs
    return await state.vectors(model, texts, "inputs", is_query=is_query, normalize=body.normalize)


PROTOCOL = ServerProtocol(
    name="tei",
    title="TEI-compatible (and infinity's /rerank shape)",
    endpoints=(
        Endpoint(
            "POST",
            "/rerank",
            rerank,
            "{query, texts} -> [{index, score}] best first; 'documents': infinity's shape",
        ),
        Endpoint("POST", "/embed", embed, "{inputs, normalize, prompt_name} -> [[float]]"),
    ),
)
