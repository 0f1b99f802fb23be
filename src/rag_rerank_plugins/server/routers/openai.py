"""OpenAI / infinity embeddings: ``POST /embeddings`` and ``POST /v1/embeddings``."""

from __future__ import annotations

from typing import TYPE_CHECKING

from ..endpoints import Endpoint, ServerProtocol
from ..errors import ApiError
from ..schemas import OpenAIEmbedding, OpenAIEmbedRequest, OpenAIEmbedResponse

if TYPE_CHECKING:  # the state (and the pool) are imported once an app is built
    from ..state import ServerState

__all__ = ["PROTOCOL"]


async def embeddings(body: OpenAIEmbedRequest, state: ServerState) -> OpenAIEmbedResponse:
    """Unit vectors of documents, in input order."""
    if body.encoding_format != "float":
        raise ApiError(422, "Only encoding_format='float' is supported.")
    model = state.pick("embedder", body.model)
    texts = [body.input] if isinstance(body.input, str) else body.input
    vectors = await state.vectors(model, texts, "input", is_query=False, normalize=True)
    # model_construct: the pool's vectors need no validation (256 x 1024 floats: ~5 ms).
    return OpenAIEmbedResponse(
        data=[OpenAIEmbedding.model_construct(embedding=v, index=i) for i, v in enumerate(vectors)],
        model=model.name,
    )


_SUMMARY = "{model, input} -> {data: [{index, embedding}]}"

PROTOCOL = ServerProtocol(
    name="openai",
    title="OpenAI/infinity-compatible",
    endpoints=(
        Endpoint("POST", "/embeddings", embeddings, _SUMMARY),
        Endpoint("POST", "/v1/embeddings", embeddings, _SUMMARY),
    ),
)
