"""Request and response bodies of every built-in protocol (pydantic; no FastAPI needed).

Requests ignore unknown fields, as the servers they imitate do. Responses are what
``GET /openapi.json`` advertises; extras a client asks for (``text``, ``document``) are left out
of the JSON when they were not asked for. A NaN or infinite score or vector component cannot be
written as JSON: the routes refuse to write it (:func:`~.endpoints.json_bytes` answers 500
instead of a ``null``).
"""

from __future__ import annotations

from typing import Any, ClassVar

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SerializerFunctionWrapHandler,
    model_serializer,
)

__all__ = [
    "CohereEmbedRequest",
    "CohereEmbedResponse",
    "CohereRerankRequest",
    "CohereRerankResponse",
    "CohereRerankResult",
    "Document",
    "EmbedRequest",
    "HealthResponse",
    "InfinityRerankResponse",
    "InfinityRerankResult",
    "InfoResponse",
    "ModelInfo",
    "OpenAIEmbedRequest",
    "OpenAIEmbedding",
    "OpenAIEmbedResponse",
    "RerankRequest",
    "TeiRank",
    "Usage",
    "texts_of",
]


class _Schema(BaseModel):
    model_config = ConfigDict(protected_namespaces=())  # fields named model_*


class _Body(_Schema):
    model_config = ConfigDict(extra="ignore")


#: A score in a response: finite (a NaN or infinity is refused when the answer is written).
Score = float


# -- requests --------------------------------------------------------------------------------


class Document(_Body):
    text: str


class RerankRequest(_Body):
    """TEI ``/rerank`` (``texts``) or infinity ``/rerank`` (``documents``)."""

    query: str
    texts: list[str] | None = None
    documents: list[str | Document] | None = None
    model: str | None = None
    raw_scores: bool = False
    return_text: bool = False
    return_documents: bool = False
    top_n: int | None = Field(default=None, ge=1)
    truncate: bool | None = None


class CohereRerankRequest(_Body):
    query: str
    documents: list[str | Document]
    model: str | None = None
    top_n: int | None = Field(default=None, ge=1)
    return_documents: bool = False


class EmbedRequest(_Body):
    """TEI ``/embed``."""

    inputs: str | list[str]
    normalize: bool = True
    truncate: bool | None = None
    prompt_name: str | None = None
    model: str | None = None


class CohereEmbedRequest(_Body):
    texts: list[str]
    model: str | None = None
    input_type: str | None = None
    embedding_types: list[str] | None = None
    truncate: str | None = None


class OpenAIEmbedRequest(_Body):
    input: str | list[str]
    model: str | None = None
    encoding_format: str = "float"


# -- responses -------------------------------------------------------------------------------


class _Scored(_Schema):
    """A ranked item; the fields in ``_omit_if_none`` are left out of the JSON when None."""

    _omit_if_none: ClassVar[tuple[str, ...]] = ("text", "document")

    index: int

    @model_serializer(mode="wrap")
    def _omit(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        data: dict[str, Any] = handler(self)
        for name in self._omit_if_none:
            if data.get(name, 0) is None:
                del data[name]
        return data


class TeiRank(_Scored):
    """One TEI ``/rerank`` item; ``text`` with ``return_text``."""

    score: Score
    text: str | None = None


class InfinityRerankResult(_Scored):
    relevance_score: Score
    document: str | None = None


class Usage(_Schema):
    prompt_tokens: int = 0
    total_tokens: int = 0


class InfinityRerankResponse(_Schema):
    object: str = "rerank"
    model: str
    results: list[InfinityRerankResult]
    usage: Usage = Field(default_factory=Usage)


class CohereRerankResult(_Scored):
    relevance_score: Score
    document: Document | None = None


class CohereRerankResponse(_Schema):
    id: str
    results: list[CohereRerankResult]
    meta: dict[str, Any]


class CohereEmbedResponse(_Schema):
    id: str
    #: ``[[float]]``, or ``{"float": [[float]]}`` when ``embedding_types`` was given.
    embeddings: list[list[float]] | dict[str, list[list[float]]]
    texts: list[str]
    meta: dict[str, Any]


class OpenAIEmbedding(_Schema):
    object: str = "embedding"
    embedding: list[float]
    index: int


class OpenAIEmbedResponse(_Schema):
    object: str = "list"
    data: list[OpenAIEmbedding]
    model: str
    usage: Usage = Field(default_factory=Usage)


class HealthResponse(_Schema):
    status: str
    models: list[str] | None = None
    error: str | None = None


class ModelInfo(_Schema):
    name: str
    kind: str
    model: str
    backend: str
    device: str
    dtype: str
    dtype_reason: str
    max_length: int | None
    loaded: bool


class InfoResponse(_Schema):
    """The served models and limits; TEI's own field names describe the first model."""

    version: str
    status: str
    models: list[ModelInfo]
    model_id: str
    model_dtype: str
    model_type: dict[str, Any]
    max_concurrent_requests: int
    max_pending: int
    max_client_batch_size: int
    max_request_bytes: int
    batch_size: int
    auth: bool


def texts_of(documents: list[str | Document]) -> list[str]:
    """The passages of a ``documents`` list (strings or ``{"text": ...}`` objects)."""
    return [d if isinstance(d, str) else d.text for d in documents]
