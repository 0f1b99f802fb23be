"""Request and response bodies of every built-in protocol (pydantic; no FastAPI needed).

Requests are strict: a field the endpoint does not know is refused with 400 naming it (a
client must learn that its option is not honoured, never get a silently different answer);
every field that is accepted is honoured (docs/wire-protocols.md has the table per protocol).
Every request body also takes ``priority`` (``"interactive"``/``"bulk"``, or Cohere's integer,
0 = highest), like the ``X-Priority`` header (:func:`~.wire.priority_of`). Responses are what
``GET /openapi.json`` advertises; extras a client asks for (``text``, ``document``) are left out
of the JSON when they were not asked for. A NaN or infinite score or vector component cannot be
written as JSON: the routes refuse to write it (:func:`~.endpoints.json_bytes` answers 500
instead of a ``null``).

A string holding a lone surrogate escape (``"\\ud800"``: valid JSON syntax, but no Unicode text)
is refused with the request, before any model work (:func:`refuse_invalid_unicode`): it cannot
be tokenized, nor written back in an answer that echoes it. So is a value nested deeper than
:data:`MAX_DEPTH`, which no answer could be written that deep.
"""

from __future__ import annotations

import math
import re
from typing import Annotated, Any, ClassVar, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Discriminator,
    Field,
    SerializerFunctionWrapHandler,
    StrictBool,
    StrictInt,
    StrictStr,
    Tag,
    model_serializer,
    model_validator,
)
from pydantic_core import PydanticCustomError

__all__ = [
    "CohereEmbedRequest",
    "CohereEmbedResponse",
    "CohereRerankRequest",
    "CohereRerankResponse",
    "CohereRerankResult",
    "CohereV2EmbedRequest",
    "CohereV2RerankRequest",
    "CohereV2RerankResponse",
    "CohereV2RerankResult",
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
    "OpenAIModel",
    "OpenAIModelList",
    "RerankRequest",
    "ServiceDescription",
    "TeiRank",
    "TeiRootRequest",
    "TruncationDirection",
    "Usage",
    "refuse_invalid_unicode",
    "texts_of",
]

#: A UTF-16 surrogate code point: never part of valid Unicode text on its own.
_SURROGATE = re.compile("[\ud800-\udfff]")


#: Deepest nesting a body may have: pydantic writes an answer at most ~255 levels deep, and an
#: answer that echoes a value (``return_documents``, a semantic cache's stored value) nests it
#: a few levels down. Python's parser reads ~990 levels, so deeper bodies passed the parse and
#: failed with a 500 after the model work (a cached value: on every later hit).
MAX_DEPTH = 128


def _unwritable_at(data: Any) -> tuple[str, str] | None:
    """The first value of parsed JSON ``data`` that no answer could echo: ``(where, what)``,
    ``what`` being "surrogate" (a string, value or key, holding a lone surrogate),
    "non-finite" (``NaN``/``Infinity``, which Python's parser accepts but JSON has not) or
    "too-deep" (nested past :data:`MAX_DEPTH`); where is ``texts[0]``, ``documents[1].title``.
    None when there is none. Iterative: no recursion limit to hit."""
    stack: list[tuple[Any, str, int]] = [(data, "", 0)]
    while stack:
        item, path, depth = stack.pop()
        if isinstance(item, str):
            if not item.isascii() and _SURROGATE.search(item):
                return path or "the body", "surrogate"
        elif isinstance(item, float):
            if not math.isfinite(item):
                return path or "the body", "non-finite"
        elif isinstance(item, dict | list) and depth >= MAX_DEPTH:
            return path or "the body", "too-deep"
        elif isinstance(item, dict):
            children = []
            for key, value in item.items():
                where = f"{path}.{key}" if path else str(key)
                if isinstance(key, str) and not key.isascii() and _SURROGATE.search(key):
                    return f"a key in {path or 'the body'}", "surrogate"
                children.append((value, where, depth + 1))
            stack.extend(reversed(children))
        elif isinstance(item, list):
            stack.extend(
                (value, f"{path}[{i}]", depth + 1) for i, value in reversed(list(enumerate(item)))
            )
    return None


def refuse_invalid_unicode(data: Any) -> Any:
    """``data`` (a request body as parsed JSON) unchanged; a validation error naming the string
    when one holds a lone surrogate escape such as ``"\\ud800"``.

    JSON's ``\\uXXXX`` escapes can spell half of a surrogate pair alone: the parser accepts it,
    but it is no Unicode character. Such a string cannot be encoded as UTF-8, so a tokenizer
    fails on it and an answer echoing it (``return_documents``, ``return_text``, Cohere's
    ``texts``) cannot be written: refused here, before any model work, instead of a 500 after it.
    Likewise a ``NaN`` or ``Infinity`` literal anywhere in the body (a document field Cohere's
    ``return_documents`` echoes): JSON has no such numbers, and the answer could not carry it.
    """
    found = _unwritable_at(data)
    if found is not None and found[1] == "non-finite":
        raise PydanticCustomError(
            "non_finite_number",
            "{where} is not a finite number: JSON has no NaN or Infinity (Python's json writes "
            "them, but they are not JSON). Send a finite number, or null.",
            {"where": found[0]},
        )
    if found is not None and found[1] == "too-deep":
        raise PydanticCustomError(
            "nested_too_deeply",
            "{where} is nested more than {depth} levels deep; no answer could be written that "
            "deep. Send a flatter body (e.g. a deep value as a JSON string).",
            {
                "where": found[0] if len(found[0]) < 80 else f"{found[0][:60]}...",
                "depth": MAX_DEPTH,
            },
        )
    if found is not None:
        where = found[0]
        raise PydanticCustomError(
            "invalid_unicode",
            "{where} is not valid Unicode: it holds a lone surrogate escape (\\ud800-\\udfff "
            "without its pair). Send valid UTF-8 text: write the characters themselves, or escape "
            "a character beyond U+FFFF as its full surrogate pair (\\ud83d\\ude00).",
            {"where": where},
        )
    return data


class _Schema(BaseModel):
    model_config = ConfigDict(protected_namespaces=())  # fields named model_*


class _Strict(_Schema):
    model_config = ConfigDict(extra="forbid", protected_namespaces=())


class _Body(_Strict):
    #: The engine lane ("interactive" | "bulk", or Cohere's integer: 0 = highest, more = bulk);
    #: wins over the ``X-Priority`` header. Strict, as every boolean and integer field of a
    #: request: ``true`` or ``1.0`` are refused, not read as ``1`` (nor ``"off"`` as false).
    priority: StrictStr | StrictInt | None = None

    @model_validator(mode="before")
    @classmethod
    def _valid_unicode(cls, data: Any) -> Any:
        return refuse_invalid_unicode(data)


#: A score in a response: finite (a NaN or infinity is refused when the answer is written).
Score = float
#: TEI's ``truncation_direction`` (TEI writes ``Right``/``Left``; huggingface_hub sends lowercase).
TruncationDirection = Literal["Right", "Left", "right", "left"]


# -- requests --------------------------------------------------------------------------------


class Document(_Strict):
    text: str


class RerankRequest(_Body):
    """TEI ``/rerank`` (``texts``) or infinity ``/rerank`` (``documents``)."""

    query: str
    texts: list[str] | None = None
    documents: list[str | Document] | None = None
    model: str | None = None
    raw_scores: StrictBool = False
    return_text: StrictBool = False
    return_documents: StrictBool = False
    top_n: StrictInt | None = Field(default=None, ge=1)
    truncate: StrictBool | None = None
    truncation_direction: TruncationDirection = "Right"


class CohereRerankRequest(_Body):
    """Cohere v1 ``/v1/rerank``: documents are strings or objects (``text``, or the
    ``rank_fields``); ``max_chunks_per_doc`` scores long documents in windows."""

    query: str
    documents: list[str | dict[str, Any]]
    model: str | None = None
    top_n: StrictInt | None = Field(default=None, ge=1)
    return_documents: StrictBool = False
    rank_fields: list[str] | None = None
    max_chunks_per_doc: StrictInt | None = Field(default=None, ge=1)


class CohereV2RerankRequest(_Body):
    """Cohere v2 ``/v2/rerank``: string documents, each cut to ``max_tokens_per_doc`` tokens."""

    query: str
    documents: list[str]
    model: str | None = None
    top_n: StrictInt | None = Field(default=None, ge=1)
    max_tokens_per_doc: StrictInt | None = Field(default=None, ge=1)
    return_documents: StrictBool = False
    relevant_spans: dict[str, Any] | None = None


class EmbedRequest(_Body):
    """TEI ``/embed``."""

    inputs: str | list[str]
    normalize: StrictBool = True
    truncate: StrictBool | None = None
    truncation_direction: TruncationDirection = "Right"
    prompt_name: str | None = None
    dimensions: StrictInt | None = Field(default=None, ge=1)
    model: str | None = None


def _tei_root_shape(data: Any) -> str:
    """TEI's bare-URL route: a body with ``inputs`` embeds; any other ranks. One branch is
    validated, so an error names what that endpoint needs, not both shapes' fields at once
    (``query`` reported "unknown" by the embed branch)."""
    if isinstance(data, EmbedRequest) or (isinstance(data, dict) and "inputs" in data):
        return "EmbedRequest"
    return "RerankRequest"


#: The body of TEI's ``POST /``. The tags are the class names, as pydantic's own union tags.
TeiRootRequest = Annotated[
    Annotated[EmbedRequest, Tag("EmbedRequest")] | Annotated[RerankRequest, Tag("RerankRequest")],
    Discriminator(_tei_root_shape),
]


class CohereEmbedRequest(_Body):
    """Cohere v1 ``/v1/embed``."""

    texts: list[str]
    model: str | None = None
    input_type: str | None = None
    embedding_types: list[str] | None = None
    truncate: Literal["NONE", "START", "END"] | None = None


class CohereV2EmbedRequest(_Body):
    """Cohere v2 ``/v2/embed`` (texts only)."""

    texts: list[str]
    model: str | None = None
    input_type: str | None = None
    embedding_types: list[str] | None = None
    truncate: Literal["NONE", "START", "END"] | None = None
    output_dimension: StrictInt | None = Field(default=None, ge=1)
    max_tokens: StrictInt | None = Field(default=None, ge=1)


class OpenAIEmbedRequest(_Body):
    """OpenAI ``/v1/embeddings`` (and infinity's ``/embeddings``)."""

    input: str | list[str] | list[int] | list[list[int]]
    model: str | None = None
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: StrictInt | None = Field(default=None, ge=1)
    #: OpenAI's end-user id, for their abuse monitoring: accepted, with no effect here.
    user: str | None = None


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
    #: The document as sent (``{"text": ...}`` for a string), with ``return_documents``.
    document: dict[str, Any] | None = None


class CohereRerankResponse(_Schema):
    id: str
    results: list[CohereRerankResult]
    meta: dict[str, Any]


class CohereV2RerankResult(_Scored):
    relevance_score: Score
    document: Document | None = None


class CohereV2RerankResponse(_Schema):
    id: str
    results: list[CohereV2RerankResult]
    meta: dict[str, Any]


class CohereEmbedResponse(_Schema):
    #: Cohere's discriminator: ``embeddings_floats`` (a bare list) or ``embeddings_by_type``.
    response_type: str = "embeddings_floats"
    id: str
    #: ``[[float]]``, or ``{"float": [[float]]}`` when ``embedding_types`` was given.
    embeddings: list[list[float]] | dict[str, list[list[float]]]
    texts: list[str]
    meta: dict[str, Any]


class OpenAIEmbedding(_Schema):
    object: str = "embedding"
    #: Floats, or base64 of little-endian float32 bytes (``encoding_format="base64"``).
    embedding: list[float] | str
    index: int


class OpenAIEmbedResponse(_Schema):
    object: str = "list"
    data: list[OpenAIEmbedding]
    model: str
    usage: Usage = Field(default_factory=Usage)


class OpenAIModel(_Schema):
    id: str
    object: str = "model"
    created: int
    owned_by: str = "rag-rerank"


class OpenAIModelList(_Schema):
    object: str = "list"
    data: list[OpenAIModel]


class ServiceDescription(_Schema):
    """``GET /``: what this server is, whether it is ready, what it serves and where."""

    service: str = "rag-rerank serve"
    version: str
    status: str
    ready: bool
    models: list[dict[str, str]]
    endpoints: list[str]
    docs: str = "/docs"


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


def texts_of(documents: list[str | Document] | list[str]) -> list[str]:
    """The passages of a ``documents`` list (strings or ``{"text": ...}`` objects)."""
    return [d if isinstance(d, str) else d.text for d in documents]
