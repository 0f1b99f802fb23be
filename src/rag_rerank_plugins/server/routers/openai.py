"""OpenAI / infinity: ``POST /embeddings``, ``POST /v1/embeddings``, ``GET /v1/models`` (and
``GET /models``), ``GET /v1/models/{id}``.

What the ``openai`` client sends is honoured: ``encoding_format="base64"`` (little-endian
float32 bytes, base64-encoded, as OpenAI answers; the client decodes them itself),
``dimensions`` (the first components, normalised to unit length again, as OpenAI does for its
matryoshka models; more than the model has is a 400) and ``user`` (accepted, no effect).
``usage`` counts the model's own tokens (special tokens included, capped at the model's limit).
Token arrays as ``input`` are refused: their ids belong to OpenAI's tokenizer, not the model's.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from typing import TYPE_CHECKING

from ..endpoints import Endpoint, ServerProtocol
from ..errors import ApiError
from ..schemas import (
    OpenAIEmbedding,
    OpenAIEmbedRequest,
    OpenAIEmbedResponse,
    OpenAIModel,
    OpenAIModelList,
    Usage,
)
from ..wire import base64_vector, priority_of, shorten

if TYPE_CHECKING:  # the state (and the pool) are imported once an app is built
    from ..config import ServedModel
    from ..state import ServerState

__all__ = ["PROTOCOL"]


async def embeddings(
    body: OpenAIEmbedRequest, state: ServerState, headers: Mapping[str, str]
) -> OpenAIEmbedResponse:
    """Unit vectors of documents, in input order."""
    priority = priority_of(body.priority, headers)
    model = state.pick("embedder", body.model)
    raw = [body.input] if isinstance(body.input, str) else body.input
    if any(not isinstance(item, str) for item in raw):
        raise ApiError(
            400,
            "'input' as token ids is not supported: ids belong to one tokenizer, and this "
            "model's is not OpenAI's. Send the text instead.",
        )
    texts: list[str] = [str(item) for item in raw]
    state.check_texts(texts, "input")
    tokens = await state.tokens(model)
    counted = sum(await asyncio.to_thread(tokens.input_tokens, texts))
    vectors = await state.vectors(
        model, texts, "input", is_query=False, normalize=True, priority=priority
    )
    vectors = shorten(vectors, body.dimensions, "dimensions")
    if body.encoding_format == "base64":
        data = [
            OpenAIEmbedding.model_construct(embedding=base64_vector(v), index=i)
            for i, v in enumerate(vectors)
        ]
    else:
        # model_construct: the pool's vectors need no validation (256 x 1024 floats: ~5 ms).
        data = [
            OpenAIEmbedding.model_construct(embedding=v, index=i) for i, v in enumerate(vectors)
        ]
    return OpenAIEmbedResponse(
        data=data,
        model=model.name,
        usage=Usage(prompt_tokens=counted, total_tokens=counted),
    )


def _model(state: ServerState, served: ServedModel) -> OpenAIModel:
    return OpenAIModel(id=served.name, created=state.created, owned_by="rag-rerank")


async def models(state: ServerState) -> OpenAIModelList:
    """Every served model (rerankers and embedders), as OpenAI lists models."""
    return OpenAIModelList(data=[_model(state, m) for m in state.served])


async def model(model_id: str, state: ServerState) -> OpenAIModel:
    """One served model by name; 404 when it is not served here."""
    for served in state.served:
        if model_id in (served.name, served.spec.model):
            return _model(state, served)
    names = ", ".join(m.name for m in state.served)
    raise ApiError(404, f"Model {model_id!r} is not served here; served: {names}.", "NotFound")


_SUMMARY = "{model, input, encoding_format, dimensions} -> {data: [{index, embedding}], usage}"

PROTOCOL = ServerProtocol(
    name="openai",
    title="OpenAI/infinity-compatible",
    endpoints=(
        Endpoint("POST", "/embeddings", embeddings, _SUMMARY),
        Endpoint("POST", "/v1/embeddings", embeddings, _SUMMARY),
        Endpoint("GET", "/models", models, "{data: [{id, object, created, owned_by}]}"),
        Endpoint("GET", "/v1/models", models, "{data: [{id, object, created, owned_by}]}"),
        Endpoint("GET", "/v1/models/{model_id:path}", model, "{id, object, created, owned_by}"),
    ),
)
