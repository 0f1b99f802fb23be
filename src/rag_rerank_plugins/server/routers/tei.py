"""TEI (huggingface/text-embeddings-inference): ``POST /rerank``, ``POST /embed`` and ``POST /``.

``/rerank`` also answers infinity's shape: ``documents`` instead of ``texts`` gets
``{"results": [...], "usage": ...}`` instead of a bare list (one path cannot belong to two
protocols). ``POST /`` is TEI's route for clients given the server's bare URL (such as
``huggingface_hub.InferenceClient(model="http://host:8080")``): ``inputs`` embed, ``query`` +
``texts`` rerank.

Truncation as TEI: inputs longer than the model's limit are cut (``truncate``, on unless the
client sends ``false``; then such an input is a 413), from the right end by default or the left
with ``truncation_direction: "Left"``; a (query, text) pair is cut the way Hugging Face
tokenizers cut pairs (longest first). ``raw_scores: true`` answers the model's logits: the
served scores with the sigmoid undone, when the server knows that is the model's activation.
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from ...ranking import rank
from ..endpoints import Endpoint, ServerProtocol
from ..errors import ApiError
from ..schemas import (
    EmbedRequest,
    InfinityRerankResponse,
    InfinityRerankResult,
    RerankRequest,
    TeiRank,
    TeiRootRequest,
    Usage,
    texts_of,
)
from ..wire import priority_of, shorten

if TYPE_CHECKING:  # the state (and the pool) are imported once an app is built
    from ..config import ServedModel
    from ..state import ServerState
    from ..tokens import Direction

__all__ = ["PROTOCOL"]

#: TEI's prompt_name -> is it a query?
_QUERY_PROMPTS = {"query": True, "search_query": True, "document": False, "passage": False}


#: What a client that gets :func:`_too_long` should send instead, in TEI's terms.
TEI_TRUNCATE_ADVICE = (
    "'truncate' is false. Send truncate=true (optionally with truncation_direction) or a "
    "shorter text."
)


def _too_long(
    what: str, index: int, limit: int | None, advice: str = TEI_TRUNCATE_ADVICE
) -> ApiError:
    return ApiError(
        413,
        f"Input validation error: {what} #{index} is longer than the model's {limit} tokens and "
        f"{advice}",
        "Validation",
    )


def _direction(value: str) -> Direction:
    return "left" if value.lower() == "left" else "right"


async def _fit_pairs(
    state: ServerState, model: ServedModel, body: RerankRequest, texts: list[str], usage: bool
) -> tuple[list[tuple[str, str]] | None, int]:
    """The pairs to score (None: the plain ones) and their token count (0 unless ``usage``)."""
    direction = _direction(body.truncation_direction)
    truncate = body.truncate is not False  # TEI's --auto-truncate: on here
    if truncate and direction == "right" and not usage:
        return None, 0  # the model cuts the right end itself: no tokenizing needed
    tokens = await state.tokens(model)

    def work() -> tuple[list[tuple[str, str]], list[int], int]:
        pairs, too_long = tokens.fit_pairs(body.query, texts, direction)
        counted = sum(tokens.pair_tokens(body.query, texts)) if usage else 0
        return pairs, too_long, counted

    pairs, too_long, counted = await asyncio.to_thread(work)
    if too_long and not truncate:
        raise _too_long("text", too_long[0], tokens.max_tokens)
    return (pairs if direction == "left" else None), counted


def _activation(model: ServedModel, loaded: Any) -> str | None:
    """``"sigmoid"`` or ``"identity"``: what turns the model's logit into its served score;
    None when the server cannot tell."""
    mode = model.spec.option("score_mode", None) or getattr(loaded, "score_mode", None)
    if mode in ("raw", "sigmoid"):
        return "identity" if mode == "raw" else "sigmoid"
    inner = getattr(loaded, "model", None)
    function = getattr(inner, "activation_fn", None) if inner is not None else None
    return {"Sigmoid": "sigmoid", "Identity": "identity"}.get(type(function).__name__)


def _logit(score: float) -> float:
    # A float32 sigmoid rounds to exactly 0 or 1 beyond |logit| ~ 17: the nearest float32 then.
    p = min(max(score, 5.960464477539063e-08), 1 - 5.960464477539063e-08)
    return math.log(p) - math.log1p(-p)


async def _raw(state: ServerState, model: ServedModel, scores: list[float]) -> list[float]:
    loaded = await asyncio.to_thread(state.loaded, model)
    activation = _activation(model, loaded)
    if activation == "identity":
        return scores
    if activation == "sigmoid":
        return [_logit(s) for s in scores]
    raise ApiError(
        400,
        f"raw_scores=true: model {model.name!r} applies an activation this server cannot undo. "
        "Serve it with the option score_mode='raw' (logits) or 'sigmoid', e.g. --spec "
        '\'{"model": "...", "backend": "cross-encoder", "options": {"score_mode": "sigmoid"}}\'.',
    )


async def rerank(
    body: RerankRequest, state: ServerState, headers: Mapping[str, str]
) -> list[TeiRank] | InfinityRerankResponse:
    """Scores best first; ties keep input order (a NaN score is answered as an error)."""
    priority = priority_of(body.priority, headers)
    model = state.pick("reranker", body.model)
    if body.texts is not None and body.documents is not None:
        raise ApiError(400, "Send the passages once: 'texts' (TEI) or 'documents' (infinity).")
    if body.texts is None and body.documents is None:
        raise ApiError(422, "Pass the passages as 'texts' (TEI) or 'documents' (infinity).")
    infinity = body.documents is not None
    if infinity and (body.return_text or body.truncate is not None):
        raise ApiError(400, "'return_text' and 'truncate' belong to TEI's 'texts' shape.")
    if not infinity and (body.return_documents or body.top_n is not None):
        raise ApiError(
            400, "'return_documents' and 'top_n' belong to infinity's 'documents' shape."
        )
    texts = body.texts if body.texts is not None else texts_of(body.documents or [])
    state.check_texts(texts, "documents" if infinity else "texts")
    pairs, counted = await _fit_pairs(state, model, body, texts, usage=infinity)
    scores = await state.scores(model, body.query, texts, priority=priority, pairs=pairs)
    if body.raw_scores:
        scores = await _raw(state, model, scores)
    if not infinity:
        return [
            TeiRank(index=r.index, score=r.score, text=texts[r.index])
            if body.return_text
            else TeiRank(index=r.index, score=r.score)
            for r in rank(scores, body.top_n)
        ]
    return InfinityRerankResponse(
        model=model.name,
        results=[
            InfinityRerankResult(index=r.index, relevance_score=r.score, document=texts[r.index])
            if body.return_documents
            else InfinityRerankResult(index=r.index, relevance_score=r.score)
            for r in rank(scores, body.top_n)
        ],
        usage=Usage(prompt_tokens=counted, total_tokens=counted),
    )


async def fit_single(
    state: ServerState,
    model: ServedModel,
    texts: list[str],
    truncate: bool,
    direction: Direction,
    advice: str = TEI_TRUNCATE_ADVICE,
) -> list[str]:
    """``texts`` cut to the embedder's limit from ``direction``'s end (413 for a too-long text
    when ``truncate`` is False, saying ``advice`` in the caller's protocol's terms). The right
    end is the model's own cut: nothing to do then."""
    if truncate and direction == "right":
        return texts
    tokens = await state.tokens(model)
    cut, too_long = await asyncio.to_thread(tokens.fit_single, texts, direction)
    if too_long and not truncate:
        raise _too_long("input", too_long[0], tokens.max_tokens, advice)
    return cut


async def embed(
    body: EmbedRequest, state: ServerState, headers: Mapping[str, str]
) -> list[list[float]]:
    """One vector per input; ``prompt_name: "query"`` embeds queries."""
    priority = priority_of(body.priority, headers)
    model = state.pick("embedder", body.model)
    is_query = False
    if body.prompt_name is not None:
        if body.prompt_name not in _QUERY_PROMPTS:
            raise ApiError(
                400,
                f"prompt_name {body.prompt_name!r} is not supported; use 'query' for queries "
                "or 'document' (or omit it) for documents.",
            )
        is_query = _QUERY_PROMPTS[body.prompt_name]
    texts = [body.inputs] if isinstance(body.inputs, str) else body.inputs
    state.check_texts(texts, "inputs")
    texts = await fit_single(
        state, model, texts, body.truncate is not False, _direction(body.truncation_direction)
    )
    vectors = await state.vectors(
        model, texts, "inputs", is_query=is_query, normalize=body.normalize, priority=priority
    )
    return shorten(vectors, body.dimensions, "dimensions", renormalize=body.normalize)


async def root(
    body: TeiRootRequest, state: ServerState, headers: Mapping[str, str]
) -> list[list[float]] | list[TeiRank] | InfinityRerankResponse:
    """TEI's ``POST /``: ``inputs`` -> ``/embed``, ``query`` + ``texts`` -> ``/rerank``."""
    if isinstance(body, EmbedRequest):
        return await embed(body, state, headers)
    return await rerank(body, state, headers)


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
        Endpoint("POST", "/embed", embed, "{inputs, normalize, truncate} -> [[float]]"),
        Endpoint("POST", "/", root, "TEI's bare-URL route: {inputs} embeds, {query, texts} ranks"),
    ),
)
