"""Cohere: ``POST /v1/rerank``, ``POST /v2/rerank``, ``POST /v1/embed`` and ``POST /v2/embed``
(what Cohere's SDKs, ``cohere.Client`` and ``cohere.ClientV2``, and our remote backend's
``cohere`` protocol send).

Every field is honoured or refused with 400:

* v1 rerank: documents as strings or objects; ``rank_fields`` ranks objects on those fields,
  written one ``field: value`` line each in the order given (Cohere's own way of reading
  semi-structured documents); ``max_chunks_per_doc`` scores each document in up to that many
  consecutive windows of the model's input and keeps the best (our long-document windows);
  ``return_documents`` echoes the document as sent.
* v2 rerank: ``max_tokens_per_doc`` cuts each document to that many of the model's tokens;
  ``relevant_spans`` only as ``{"mode": "disabled"}`` (another key in it is a 400).
* embed: ``truncate`` ``END`` (default; the model's own cut), ``START`` (the start is dropped) or
  ``NONE`` (a too-long text is a 400); v2's ``output_dimension`` (first components, unit length
  again) and ``max_tokens``.
* ``meta.billed_units``: ``search_units`` (one per 100 documents or chunks) for rerank,
  ``input_tokens`` (the model's tokens) for embed. The integer ``priority`` of the v2 SDK maps to
  the engine lanes (0 interactive, more bulk).
"""

from __future__ import annotations

import asyncio
import dataclasses
import uuid
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from ...ranking import rank
from ..endpoints import Endpoint, ServerProtocol
from ..errors import ApiError
from ..schemas import (
    CohereEmbedRequest,
    CohereEmbedResponse,
    CohereRerankRequest,
    CohereRerankResponse,
    CohereRerankResult,
    CohereV2EmbedRequest,
    CohereV2RerankRequest,
    CohereV2RerankResponse,
    CohereV2RerankResult,
    Document,
)
from ..wire import priority_of, search_units, shorten

if TYPE_CHECKING:  # the state (and the pool) are imported once an app is built
    from ..config import ServedModel
    from ..state import ServerState

__all__ = ["PROTOCOL"]

#: Cohere's input_type -> is it a query?
_INPUT_TYPES = {
    "search_query": True,
    "search_document": False,
    "classification": False,
    "clustering": False,
}
#: The 413 of a too-long text under ``truncate: "NONE"``, in Cohere's terms.
_NO_TRUNCATE_ADVICE = (
    "'truncate' is 'NONE'. Send truncate='END' (the default: the end is cut) or 'START' (the "
    "start is cut), or a shorter text."
)
#: Cohere's embed ``truncate`` -> TEI's direction (None: refuse a too-long text).
_TRUNCATE = {"END": "right", "START": "left", "NONE": None}


def _document_text(index: int, document: str | dict[str, Any], fields: list[str] | None) -> str:
    """What the model reads of one v1 document."""
    if isinstance(document, str):
        if fields is not None and fields != ["text"]:
            raise ApiError(
                400,
                f"documents[{index}] is a string, but rank_fields names fields: send every "
                "document as an object with those fields, or drop rank_fields.",
            )
        return document
    names = fields if fields is not None else ["text"]
    missing = [name for name in names if name not in document]
    if missing:
        hint = "" if fields is not None else " (or name the fields to rank on in rank_fields)"
        raise ApiError(
            400, f"documents[{index}] has no field {missing[0]!r}{hint}: add it to the document."
        )
    values = [document[name] for name in names]
    for name, value in zip(names, values, strict=True):
        if not isinstance(value, str):
            raise ApiError(
                400,
                f"documents[{index}].{name} is {type(value).__name__}; ranked fields must be "
                "strings (convert it, e.g. to YAML or JSON text).",
            )
    if fields is None or fields == ["text"]:
        # rank_fields=["text"] names the default field: read as without it, and as a string
        # document (which is {"text": ...}) is read.
        return str(values[0])
    return "\n".join(f"{name}: {value}" for name, value in zip(names, values, strict=True))


async def _chunked(
    state: ServerState,
    model: ServedModel,
    query: str,
    texts: list[str],
    chunks: int,
    priority: Any,
) -> tuple[list[float], int]:
    """Scores of documents read in up to ``chunks`` consecutive windows each (best window
    wins), and how many windows were scored."""
    from ...exceptions import ConfigurationError
    from ...windows import WindowPlan, WindowSettings, windower_for

    def plan() -> WindowPlan:
        windower = windower_for(state.loaded(model))
        # One window fills the model's input; windows follow each other (no overlap), as
        # chunks. The query is read whole up to half the model's input (the default window
        # budget of 64 tokens would cut a longer query, even for documents that fit whole).
        settings = WindowSettings(
            tokens="auto",
            stride=1 << 30,
            aggregate="max",
            query_tokens=max(windower.max_pair_tokens // 2, 1),
        )
        full = windower.plan(query, texts, settings)
        # Keep the plan's per-document queries: a document that fits one window is scored
        # with the whole query, exactly as without max_chunks_per_doc.
        return dataclasses.replace(full, windows=tuple(doc[:chunks] for doc in full.windows))

    state.admission.refuse_if_full()  # planning tokenizes every document: not for a 429
    try:
        windowed = await asyncio.to_thread(plan)
    except ConfigurationError as exc:
        raise ApiError(400, f"max_chunks_per_doc cannot be honoured here: {exc}") from None
    pairs = windowed.pairs
    window_scores = await state.scores(model, query, texts, priority=priority, pairs=pairs)
    scores, _infos = windowed.aggregate(window_scores)
    return scores, len(pairs)


def _meta(version: str, **billed: int) -> dict[str, Any]:
    return {"api_version": {"version": version}, "billed_units": billed}


async def rerank(
    body: CohereRerankRequest, state: ServerState, headers: Mapping[str, str]
) -> CohereRerankResponse:
    """Results best first; ``top_n`` cuts them (a NaN score is answered as an error)."""
    priority = priority_of(body.priority, headers)
    model = state.pick("reranker", body.model)
    if body.rank_fields is not None and not body.rank_fields:
        raise ApiError(400, "rank_fields is empty: name at least one field, or drop it.")
    texts = [_document_text(i, d, body.rank_fields) for i, d in enumerate(body.documents)]
    state.check_texts(texts, "documents")
    if body.max_chunks_per_doc is not None:
        scores, scored = await _chunked(
            state, model, body.query, texts, body.max_chunks_per_doc, priority
        )
    else:
        scores = await state.scores(model, body.query, texts, priority=priority)
        scored = len(texts)

    def document(index: int) -> dict[str, Any]:
        original = body.documents[index]
        return {"text": original} if isinstance(original, str) else dict(original)

    return CohereRerankResponse(
        id=str(uuid.uuid4()),
        results=[
            CohereRerankResult(index=r.index, relevance_score=r.score, document=document(r.index))
            if body.return_documents
            else CohereRerankResult(index=r.index, relevance_score=r.score)
            for r in rank(scores, body.top_n)
        ],
        meta=_meta("1", search_units=search_units(scored)),
    )


def _check_spans(spans: dict[str, Any] | None) -> None:
    """``relevant_spans``: only ``{"mode": "disabled"}`` (or ``{}``); any other key is refused
    like an unknown body field (a typo must not pass for "disabled")."""
    if spans is None:
        return
    unknown = [key for key in spans if key != "mode"]
    if unknown:
        names = ", ".join(f"'relevant_spans.{key}'" for key in unknown[:5])
        raise ApiError(
            400,
            f"Unknown or unsupported field(s) {names} for /v2/rerank: relevant_spans takes only "
            "'mode', and this server supports only {'mode': 'disabled'}.",
        )
    if spans.get("mode", "disabled") != "disabled":
        raise ApiError(
            400, "relevant_spans is not supported by this server: send {'mode': 'disabled'}."
        )


async def rerank_v2(
    body: CohereV2RerankRequest, state: ServerState, headers: Mapping[str, str]
) -> CohereV2RerankResponse:
    """Cohere v2: documents cut to ``max_tokens_per_doc`` tokens, results best first."""
    priority = priority_of(body.priority, headers)
    model = state.pick("reranker", body.model)
    _check_spans(body.relevant_spans)
    texts = body.documents
    state.check_texts(texts, "documents")
    pairs = None
    limit = body.max_tokens_per_doc
    if limit is not None:
        tokens = await state.tokens(model)
        cut = await asyncio.to_thread(tokens.cut, texts, [limit] * len(texts), "right")
        pairs = [(body.query, text) for text in cut]
    scores = await state.scores(model, body.query, texts, priority=priority, pairs=pairs)
    return CohereV2RerankResponse(
        id=str(uuid.uuid4()),
        results=[
            CohereV2RerankResult(
                index=r.index, relevance_score=r.score, document=Document(text=texts[r.index])
            )
            if body.return_documents
            else CohereV2RerankResult(index=r.index, relevance_score=r.score)
            for r in rank(scores, body.top_n)
        ],
        meta=_meta("2", search_units=search_units(len(texts))),
    )


async def _embed(
    body: CohereEmbedRequest | CohereV2EmbedRequest,
    state: ServerState,
    headers: Mapping[str, str],
) -> tuple[list[list[float]], int]:
    """Unit vectors of ``body.texts`` and their input tokens (both versions)."""
    from .tei import fit_single

    priority = priority_of(body.priority, headers)
    model = state.pick("embedder", body.model)
    input_type = body.input_type or "search_document"
    if input_type not in _INPUT_TYPES:
        allowed = ", ".join(_INPUT_TYPES)
        raise ApiError(400, f"input_type must be one of {allowed}, got {input_type!r}.")
    if body.embedding_types is not None and body.embedding_types != ["float"]:
        raise ApiError(400, "Only embedding_types=['float'] is supported by this server.")
    texts = body.texts
    state.check_texts(texts, "texts")
    direction = _TRUNCATE[body.truncate or "END"]
    tokens = await state.tokens(model)
    max_tokens = getattr(body, "max_tokens", None)
    if max_tokens is not None:
        texts = await asyncio.to_thread(tokens.cut, texts, [max_tokens] * len(texts), "right")
    if direction is None:
        texts = await fit_single(state, model, texts, False, "right", _NO_TRUNCATE_ADVICE)
    else:
        texts = await fit_single(state, model, texts, True, direction)  # type: ignore[arg-type]
    counted = sum(await asyncio.to_thread(tokens.input_tokens, texts))
    vectors = await state.vectors(
        model, texts, "texts", is_query=_INPUT_TYPES[input_type], normalize=True, priority=priority
    )
    return vectors, counted


async def embed(
    body: CohereEmbedRequest, state: ServerState, headers: Mapping[str, str]
) -> CohereEmbedResponse:
    """Unit vectors; ``input_type: "search_query"`` embeds queries."""
    vectors, counted = await _embed(body, state, headers)
    # model_construct: the pool's vectors need no validation (256 x 1024 floats: ~5 ms).
    return CohereEmbedResponse.model_construct(
        response_type="embeddings_by_type" if body.embedding_types else "embeddings_floats",
        id=str(uuid.uuid4()),
        embeddings={"float": vectors} if body.embedding_types else vectors,
        texts=body.texts,
        meta=_meta("1", input_tokens=counted),
    )


async def embed_v2(
    body: CohereV2EmbedRequest, state: ServerState, headers: Mapping[str, str]
) -> CohereEmbedResponse:
    """Cohere v2: ``{"embeddings": {"float": [...]}}``; ``output_dimension`` shortens."""
    vectors, counted = await _embed(body, state, headers)
    vectors = shorten(vectors, body.output_dimension, "output_dimension")
    return CohereEmbedResponse.model_construct(
        response_type="embeddings_by_type",
        id=str(uuid.uuid4()),
        embeddings={"float": vectors},
        texts=body.texts,
        meta=_meta("2", input_tokens=counted),
    )


PROTOCOL = ServerProtocol(
    name="cohere",
    title="Cohere-compatible",
    endpoints=(
        Endpoint(
            "POST",
            "/v1/rerank",
            rerank,
            "{model, query, documents, top_n, rank_fields, max_chunks_per_doc} -> {id, results}",
        ),
        Endpoint(
            "POST",
            "/v2/rerank",
            rerank_v2,
            "{model, query, documents, top_n, max_tokens_per_doc} -> {id, results, meta}",
        ),
        Endpoint(
            "POST", "/v1/embed", embed, "{model, texts, input_type} -> {id, embeddings, meta}"
        ),
        Endpoint(
            "POST",
            "/v2/embed",
            embed_v2,
            "{model, texts, input_type, output_dimension} -> {id, embeddings: {float}}",
        ),
    ),
)
