"""The FastAPI app of ``rag-rerank serve``: the registered protocols, mounted on the shared pool.

One process loads each configured spec once (in the lifespan, in the background, so ``/health``
can say "loading" and then "ok"), and every request goes through the shared pool, exactly like an
in-process adapter call. The endpoints are those of :func:`.registry.protocols` (TEI, Cohere,
OpenAI/infinity and the operations endpoints, plus any :func:`~.registry.register_protocol`
added); ``rag-rerank serve --help`` lists them.

Status codes: 401 (bearer token), 404 (unknown path or model name), 405 (wrong method), 408 (body
too slow), 413 (body bytes or number of texts), 415 (a body not sent as JSON, or compressed),
422 (invalid request; 400 on OpenAI's paths, as OpenAI answers), 429 + Retry-After
(concurrency and queue full), 503 (not ready), 500 (the model failed, a NaN or infinity in its
output included, or a bug). Every error body is :func:`~.errors.error_body`: ``error``,
``error_type`` (TEI) and ``message``. Every response has an ``X-Request-ID`` (the server log
names it next to a 500's traceback), and a 500 leaves the keep-alive connection usable.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from .. import __version__
from ..backends._torch_common import import_optional

try:
    from fastapi import FastAPI
except ImportError:  # name the extra, as serve() does; a broken fastapi's own error is quoted
    import_optional("fastapi", "fastapi", "server", "rag_rerank_plugins.server")
    raise

from ..pool import ModelPool, get_pool
from .config import ServerConfig, check_api_key
from .errors import error_response, handled_exceptions
from .limits import GuardMiddleware
from .registry import known_paths, protocols, public_paths
from .routers import semantic_cache
from .state import ServerState

__all__ = ["ServerState", "create_app"]

logger = logging.getLogger(__name__)


def _lifespan(state: ServerState):  # type: ignore[no-untyped-def]  # FastAPI's lifespan type
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

    return lifespan


def create_app(config: ServerConfig | None = None, *, pool: ModelPool | None = None) -> FastAPI:
    """The ASGI app for ``config`` (default: from ``RAG_RERANK_*``) on ``pool`` (default: the
    process-wide pool). ``app.state.server`` is the :class:`ServerState`."""
    config = config if config is not None else ServerConfig.from_env()
    check_api_key(config.api_key)
    # As ``rag-rerank serve`` does: an app served by ``uvicorn module:app`` (or mounted in the
    # user's own) would otherwise turn ready and answer every cache request with a 500.
    config.check_semantic_cache_models()
    state = ServerState(config, pool if pool is not None else get_pool())
    app = FastAPI(
        title="rag-rerank serve",
        version=__version__,
        description="Shared rerankers and embedders over HTTP (TEI, Cohere, infinity shapes).",
        lifespan=_lifespan(state),
        # "/rerank/" is a 404 in the documented error shape, not a bodiless 307 whose Location
        # is built from the client's Host header (an open redirect behind a proxy).
        redirect_slashes=False,
    )
    app.state.server = state
    for exc_class in handled_exceptions():
        app.add_exception_handler(exc_class, error_response)
    # The semantic cache's endpoints exist only when --semantic-cache enables them.
    optional = [p for p in (semantic_cache.protocol_for(config),) if p is not None]
    for protocol in [*protocols(), *optional]:
        app.include_router(protocol.router())
        state.endpoints.extend(f"{e.method} {e.path}" for e in protocol.endpoints)
    app.add_middleware(
        GuardMiddleware,
        api_key=config.api_key,
        max_request_bytes=config.max_request_bytes,
        metrics=state.metrics,
        known_paths=known_paths() | {path for p in optional for path in p.paths},
        public_paths=public_paths(),
        body_timeout=config.body_timeout,
    )
    return app
