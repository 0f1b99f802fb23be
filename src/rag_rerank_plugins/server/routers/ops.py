"""Operations: ``GET /`` (what this server is), ``GET /health`` (readiness), ``GET /info``
(models and limits), ``GET /metrics`` (Prometheus text)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ... import __version__
from ..endpoints import Endpoint, ServerProtocol
from ..schemas import HealthResponse, InfoResponse, ModelInfo, ServiceDescription

if TYPE_CHECKING:  # the state (and the pool) are imported once an app is built
    from ..state import ServerState

__all__ = ["PROTOCOL"]


async def describe(state: ServerState) -> ServiceDescription:
    """A small JSON description: service, version, status, served models, endpoints, docs.
    200 whatever the status (``GET /health`` is the readiness probe)."""
    return ServiceDescription(
        version=__version__,
        status=state.status,
        ready=state.ready,
        models=[{"name": m.name, "kind": m.kind} for m in state.served],
        endpoints=list(state.endpoints),
    )


async def health(state: ServerState) -> Any:
    """200 once every model is loaded and warmed up; 503 while loading, failed or draining."""
    from starlette.responses import JSONResponse

    body = HealthResponse(status=state.status, error=state.error)
    if state.ready:
        body.models = [m.name for m in state.served]
        return JSONResponse(body.model_dump(exclude_none=True))
    return JSONResponse(
        body.model_dump(exclude_none=True), status_code=503, headers={"retry-after": "1"}
    )


async def info(state: ServerState) -> InfoResponse:
    """The served models (device, dtype and why) and the limits clients split requests by."""
    config = state.config
    models = [state.model_info(m) for m in state.served]
    first = models[0]
    model_type: dict[str, Any] = (
        {"reranker": {"id2label": {"0": "LABEL_0"}}}
        if first["kind"] == "reranker"
        else {"embedding": {"pooling": "model"}}
    )
    return InfoResponse(
        version=__version__,
        status=state.status,
        models=[ModelInfo(**m) for m in models],
        model_id=first["name"],
        model_dtype=first["dtype"],
        model_type=model_type,
        max_concurrent_requests=config.max_concurrency,
        max_pending=config.max_pending,
        max_client_batch_size=config.max_client_batch,
        max_request_bytes=config.max_request_bytes,
        batch_size=config.batch_size,
        auth=config.api_key is not None,
    )


async def metrics(state: ServerState) -> Any:
    """Prometheus text exposition of the pool, the scheduler and the HTTP counters."""
    from starlette.responses import Response

    from ..metrics import CONTENT_TYPE, render

    return Response(render(state), media_type=CONTENT_TYPE)


PROTOCOL = ServerProtocol(
    name="ops",
    title="Operations",
    endpoints=(
        Endpoint("GET", "/", describe, "{service, version, status, models, endpoints}"),
        Endpoint(
            "GET",
            "/health",
            health,
            "200 once the models are loaded and warmed up; 503 while loading/draining",
            public=True,
        ),
        Endpoint("GET", "/info", info, "served models (device, dtype, backend) and the limits"),
        Endpoint("GET", "/metrics", metrics, "Prometheus text: pool, latency histograms, requests"),
    ),
)
