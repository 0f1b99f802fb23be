"""The FastAPI app of ``rag-rerank serve``: TEI, Cohere and infinity/OpenAI shapes on the pool.

One process loads each configured spec once (in the lifespan, in the background, so ``/health``
can say "loading" and then "ok"), and every request goes through the shared pool, exactly like an
in-process adapter call. Endpoints:

==================  =====================================================================
POST /rerank        TEI: ``{query, texts}`` -> ``[{index, score}]`` best first. With
                    ``documents`` instead of ``texts`` (infinity shape) -> ``{results: [...]}``
POST /v1/rerank     Cohere: ``{model, query, documents, top_n}`` -> ``{id, results, meta}``
POST /embed         TEI: ``{inputs, normalize, prompt_name}`` -> ``[[float]]``
POST /v1/embed      Cohere: ``{model, texts, input_type}`` -> ``{id, embeddings, texts, meta}``
POST /embeddings    OpenAI/infinity: ``{model, input}`` -> ``{data: [{index, embedding}]}``
GET  /health        200 once the models are loaded and warmed up; 503 while loading/draining
GET  /metrics       Prometheus text: pool stats per model, requests, rejections, queue
GET  /info          served models (device, dtype, backend) and the server's limits
==================  =====================================================================

Status codes: 401 (bearer token), 404 (unknown model name), 413 (body bytes or number of texts),
422 (invalid request), 429 + Retry-After (concurrency and queue full), 503 (not ready), 500
(the model failed). Error bodies carry ``error``, ``error_type`` (TEI) and ``message``.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse
from pydantic import BaseModel, ConfigDict, Field

from .. import __version__
from ..exceptions import (
    InvalidInputError,
    ModelLoadError,
    QueueFullError,
    RagRerankError,
    RequestTimeoutError,
)
from ..pool import ModelPool, get_pool
from .config import ServedModel, ServerConfig
from .limits import Admission, GuardMiddleware, Overloaded, error_body
from .metrics import CONTENT_TYPE, RequestMetrics, render

__all__ = ["ServerState", "create_app"]

logger = logging.getLogger(__name__)


class ApiError(Exception):
    """An error answered with ``status`` and the common error body."""

    def __init__(
        self,
        status: int,
        message: str,
        error_type: str = "Validation",
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.error_type = error_type
        self.headers = headers


# -- request bodies (unknown fields are ignored, as the real servers do) -------------------------


class _Body(BaseModel):
    model_config = ConfigDict(extra="ignore", protected_namespaces=())


class _Document(_Body):
    text: str


class RerankRequest(_Body):
    """TEI ``/rerank`` (``texts``) or infinity ``/rerank`` (``documents``)."""

    query: str
    texts: list[str] | None = None
    documents: list[str | _Document] | None = None
    model: str | None = None
    raw_scores: bool = False
    return_text: bool = False
    return_documents: bool = False
    top_n: int | None = Field(default=None, ge=1)
    truncate: bool | None = None


class CohereRerankRequest(_Body):
    query: str
    documents: list[str | _Document]
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


_QUERY_PROMPTS = {"query": True, "search_query": True, "document": False, "passage": False}
_COHERE_INPUT_TYPES = {
    "search_query": True,
    "search_document": False,
    "classification": False,
    "clustering": False,
}


class ServerState:
    """What the endpoints share: config, pool, served models, admission, counters, readiness."""

    def __init__(self, config: ServerConfig, pool: ModelPool) -> None:
        self.config = config
        self.pool = pool
        self.served: list[ServedModel] = config.served_models()
        self.admission = Admission(config.max_concurrency, config.max_pending, config.retry_after)
        self.metrics = RequestMetrics()
        self.status = "starting"  # starting -> loading -> ok | failed; -> draining at shutdown
        self.error: str | None = None
        #: Called when loading fails (the CLI stops the server so orchestration restarts it).
        self.on_fatal: Callable[[], None] | None = None

    @property
    def ready(self) -> bool:
        return self.status == "ok"

    def pick(self, kind: str, requested: str | None) -> ServedModel:
        """The served model: by name (or model path), else the only one of its kind."""
        candidates = [m for m in self.served if m.kind == kind]
        if requested:
            for m in candidates:
                if requested in (m.name, m.spec.model):
                    return m
        if len(candidates) == 1:
            return candidates[0]
        names = ", ".join(f"{m.name} ({m.kind})" for m in self.served)
        if not candidates:
            raise ApiError(
                404, f"This server serves no {kind}. Served models: {names}.", "NotFound"
            )
        raise ApiError(
            404,
            f"Model {requested!r} is not served here; pass one of these as 'model': {names}.",
            "NotFound",
        )

    def check_ready(self) -> None:
        if not self.ready:
            raise ApiError(
                503,
                f"Server is not ready ({self.status}); wait until GET /health answers 200.",
                "Unhealthy",
                {"retry-after": "1"},
            )

    def check_texts(self, texts: Sequence[str], field: str) -> None:
        if not texts:
            raise ApiError(422, f"'{field}' must contain at least one text.", "Empty")
        if len(texts) > self.config.max_client_batch:
            raise ApiError(
                413,
                f"{len(texts)} texts in '{field}' exceed the limit of "
                f"{self.config.max_client_batch} per request (--max-client-batch). Split them over "
                "several requests.",
                "Validation",
            )

    async def run(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """One admitted model call; 429 when full, 422/500/503 when the model refuses or fails."""
        self.check_ready()
        try:
            async with self.admission.enter():
                return await fn(*args, **kwargs)
        except Overloaded as exc:
            self.metrics.reject("overloaded")
            raise ApiError(
                429, str(exc), "Overloaded", {"retry-after": str(exc.retry_after)}
            ) from None
        except InvalidInputError as exc:
            raise ApiError(422, str(exc), "Validation") from None
        except QueueFullError as exc:  # the pool's own per-model queue (EngineConfig.max_queue)
            self.metrics.reject("overloaded")
            retry = str(self.admission.retry_after())
            raise ApiError(429, str(exc), "Overloaded", {"retry-after": retry}) from None
        except RequestTimeoutError as exc:
            raise ApiError(503, str(exc), "Overloaded", {"retry-after": "1"}) from None
        except ModelLoadError as exc:
            raise ApiError(503, str(exc), "Unhealthy", {"retry-after": "5"}) from None
        except RagRerankError as exc:
            raise ApiError(500, str(exc), "Backend") from None

    async def scores(self, model: ServedModel, query: str, texts: list[str]) -> list[float]:
        self.check_texts(texts, "texts")
        pairs = [(query, text) for text in texts]
        result: list[float] = await self.run(
            self.pool.ascore_pairs, model.spec, pairs, self.config.batch_size
        )
        return result

    async def vectors(
        self, model: ServedModel, texts: list[str], field: str, *, is_query: bool, normalize: bool
    ) -> list[list[float]]:
        self.check_texts(texts, field)
        result: list[list[float]] = await self.run(
            self.pool.aembed,
            model.spec,
            texts,
            self.config.batch_size,
            is_query=is_query,
            normalize=normalize,
        )
        return result

    async def load(self) -> None:
        self.status = "loading"
        specs = [m.spec for m in self.served]
        start = time.perf_counter()
        try:
            await asyncio.to_thread(self.pool.preload, *specs, warmup=self.config.warmup)
        except Exception as exc:
            self.status = "failed"
            self.error = f"{type(exc).__name__}: {exc}"
            logger.error("rag-rerank serve: loading failed: %s", self.error)
            if self.on_fatal is not None:
                self.on_fatal()
            return
        if self.status == "loading":
            self.status = "ok"
            logger.info(
                "rag-rerank serve: %d model(s) loaded and warmed up in %.1fs: %s",
                len(specs),
                time.perf_counter() - start,
                ", ".join(m.name for m in self.served),
            )

    def model_info(self, model: ServedModel) -> dict[str, Any]:
        stats = self.pool.spec_stats(model.spec)
        return {
            "name": model.name,
            "kind": model.kind,
            "model": model.spec.model,
            "backend": model.spec.backend,
            "device": stats["device"],
            "dtype": stats["dtype"],
            "dtype_reason": stats["dtype_reason"],
            "max_length": model.spec.max_length,
            "loaded": stats["loaded"],
        }


def _texts(documents: Sequence[str | _Document]) -> list[str]:
    return [d if isinstance(d, str) else d.text for d in documents]


def _ranked(scores: list[float], top_n: int | None) -> list[int]:
    order = sorted(range(len(scores)), key=lambda i: (-scores[i], i))
    return order[:top_n] if top_n is not None else order


def _error_response(exc: ApiError) -> JSONResponse:
    return JSONResponse(
        error_body(exc.message, exc.error_type), status_code=exc.status, headers=exc.headers
    )


def _validation_message(exc: RequestValidationError) -> str:
    parts = []
    for error in exc.errors():
        if error.get("type") == "json_invalid":
            detail = (error.get("ctx") or {}).get("error", "")
            return f"Request body is not valid JSON ({detail}). Send a JSON object."
        where = ".".join(str(p) for p in error.get("loc", ()) if p != "body") or "body"
        parts.append(f"{where}: {error.get('msg', 'invalid')}")
    return "Invalid request: " + "; ".join(parts[:5])


def create_app(config: ServerConfig | None = None, *, pool: ModelPool | None = None) -> FastAPI:
    """The ASGI app for ``config`` (default: from ``RAG_RERANK_*``) on ``pool`` (default: the
    process-wide pool). ``app.state.server`` is the :class:`ServerState`."""
    config = config if config is not None else ServerConfig.from_env()
    state = ServerState(config, pool if pool is not None else get_pool())

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        task = asyncio.create_task(state.load())
        try:
            yield
        finally:
            # Uvicorn calls this after in-flight requests finished (or the grace period ended).
            if state.status != "failed":
                state.status = "draining"
            if not task.done():
                logger.warning("rag-rerank serve: shutting down while models are still loading")
                await asyncio.shield(task)
            logger.info("rag-rerank serve: stopped")

    app = FastAPI(
        title="rag-rerank serve",
        version=__version__,
        description="Shared rerankers and embedders over HTTP (TEI, Cohere, infinity shapes).",
        lifespan=lifespan,
    )
    app.state.server = state

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, exc: ApiError) -> JSONResponse:
        return _error_response(exc)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        state.metrics.reject("invalid")
        return _error_response(ApiError(422, _validation_message(exc), "Validation"))

    @app.post("/rerank", response_model=None)
    async def rerank(body: RerankRequest) -> Any:
        if body.raw_scores:
            raise ApiError(
                422,
                "raw_scores=true is not supported: scores are the model's own activation, as "
                "sentence-transformers' CrossEncoder.predict returns them.",
            )
        model = state.pick("reranker", body.model)
        if body.texts is not None:
            scores = await state.scores(model, body.query, body.texts)
            out = []
            for i in _ranked(scores, body.top_n):
                item: dict[str, Any] = {"index": i, "score": scores[i]}
                if body.return_text:
                    item["text"] = body.texts[i]
                out.append(item)
            return out
        if body.documents is None:
            raise ApiError(422, "Pass the passages as 'texts' (TEI) or 'documents' (infinity).")
        texts = _texts(body.documents)
        scores = await state.scores(model, body.query, texts)
        results = []
        for i in _ranked(scores, body.top_n):
            result: dict[str, Any] = {"index": i, "relevance_score": scores[i]}
            if body.return_documents:
                result["document"] = texts[i]
            results.append(result)
        return {
            "object": "rerank",
            "model": model.name,
            "results": results,
            "usage": {"prompt_tokens": 0, "total_tokens": 0},
        }

    @app.post("/v1/rerank")
    async def cohere_rerank(body: CohereRerankRequest) -> dict[str, Any]:
        model = state.pick("reranker", body.model)
        texts = _texts(body.documents)
        scores = await state.scores(model, body.query, texts)
        results = []
        for i in _ranked(scores, body.top_n):
            result: dict[str, Any] = {"index": i, "relevance_score": scores[i]}
            if body.return_documents:
                result["document"] = {"text": texts[i]}
            results.append(result)
        return {
            "id": str(uuid.uuid4()),
            "results": results,
            "meta": {"api_version": {"version": "1"}, "billed_units": {"search_units": 1}},
        }

    @app.post("/embed")
    async def embed(body: EmbedRequest) -> list[list[float]]:
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
        return await state.vectors(
            model, texts, "inputs", is_query=is_query, normalize=body.normalize
        )

    @app.post("/v1/embed")
    async def cohere_embed(body: CohereEmbedRequest) -> dict[str, Any]:
        model = state.pick("embedder", body.model)
        input_type = body.input_type or "search_document"
        if input_type not in _COHERE_INPUT_TYPES:
            allowed = ", ".join(_COHERE_INPUT_TYPES)
            raise ApiError(422, f"input_type must be one of {allowed}, got {input_type!r}.")
        if body.embedding_types is not None and body.embedding_types != ["float"]:
            raise ApiError(422, "Only embedding_types=['float'] is supported.")
        vectors = await state.vectors(
            model, body.texts, "texts", is_query=_COHERE_INPUT_TYPES[input_type], normalize=True
        )
        embeddings: Any = {"float": vectors} if body.embedding_types else vectors
        return {
            "id": str(uuid.uuid4()),
            "embeddings": embeddings,
            "texts": body.texts,
            "meta": {"api_version": {"version": "1"}},
        }

    @app.post("/embeddings")
    @app.post("/v1/embeddings")
    async def openai_embeddings(body: OpenAIEmbedRequest) -> dict[str, Any]:
        if body.encoding_format != "float":
            raise ApiError(422, "Only encoding_format='float' is supported.")
        model = state.pick("embedder", body.model)
        texts = [body.input] if isinstance(body.input, str) else body.input
        vectors = await state.vectors(model, texts, "input", is_query=False, normalize=True)
        return {
            "object": "list",
            "data": [
                {"object": "embedding", "embedding": v, "index": i} for i, v in enumerate(vectors)
            ],
            "model": model.name,
            "usage": {"prompt_tokens": 0, "total_tokens": 0},
        }

    @app.get("/health")
    async def health() -> JSONResponse:
        body: dict[str, Any] = {"status": state.status}
        if state.error:
            body["error"] = state.error
        if state.ready:
            body["models"] = [m.name for m in state.served]
            return JSONResponse(body)
        return JSONResponse(body, status_code=503, headers={"retry-after": "1"})

    @app.get("/info")
    async def info() -> dict[str, Any]:
        models = [state.model_info(m) for m in state.served]
        first = models[0]
        model_type: dict[str, Any] = (
            {"reranker": {"id2label": {"0": "LABEL_0"}}}
            if first["kind"] == "reranker"
            else {"embedding": {"pooling": "model"}}
        )
        return {
            "version": __version__,
            "status": state.status,
            "models": models,
            # TEI's field names, describing the first served model:
            "model_id": first["name"],
            "model_dtype": first["dtype"],
            "model_type": model_type,
            "max_concurrent_requests": config.max_concurrency,
            "max_pending": config.max_pending,
            "max_client_batch_size": config.max_client_batch,
            "max_request_bytes": config.max_request_bytes,
            "batch_size": config.batch_size,
            "auth": config.api_key is not None,
        }

    @app.get("/metrics", response_class=PlainTextResponse)
    async def metrics() -> PlainTextResponse:
        names = {state.pool.key(m.spec).label: m.name for m in state.served}
        text = render(
            state.pool.stats(),
            names,
            state.metrics,
            {
                "rag_rerank_ready": (1.0 if state.ready else 0.0, "1 once models are warmed up"),
                "rag_rerank_requests_running": (
                    float(state.admission.running),
                    "Model calls running now",
                ),
                "rag_rerank_requests_queued": (
                    float(state.admission.queued),
                    "Requests waiting for a slot",
                ),
                "rag_rerank_max_concurrency": (float(config.max_concurrency), "Limit"),
                "rag_rerank_max_pending": (float(config.max_pending), "Limit"),
            },
        )
        return PlainTextResponse(text, media_type=CONTENT_TYPE)

    app.add_middleware(
        GuardMiddleware,
        api_key=config.api_key,
        max_request_bytes=config.max_request_bytes,
        metrics=state.metrics,
    )
    return app
