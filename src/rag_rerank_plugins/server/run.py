"""Run the server with uvicorn: graceful shutdown, and a non-zero exit when loading fails.

Uvicorn handles SIGTERM/SIGINT: it stops accepting connections, lets in-flight requests finish
(up to ``graceful_timeout`` seconds), then runs the app's lifespan shutdown. When a model cannot
be loaded the server stops with exit status 1, so a supervisor (systemd, Kubernetes) restarts it
or reports the failure instead of keeping a replica that never becomes ready.
"""

from __future__ import annotations

import logging

from ..exceptions import MissingDependencyError
from ..pool import ModelPool
from .config import ServerConfig

__all__ = ["serve"]

logger = logging.getLogger(__name__)


def serve(config: ServerConfig, *, pool: ModelPool | None = None) -> int:
    """Serve until stopped. Returns the process exit status (1 when a model failed to load,
    0 when the server stopped by itself). Stopped by SIGTERM or SIGINT, uvicorn drains the
    requests in flight and then re-raises the signal, so the process ends by that signal
    (exit status 143 for SIGTERM in a shell; systemd and Kubernetes read it as a normal stop)
    and this does not return."""
    try:
        import uvicorn
    except ImportError:
        raise MissingDependencyError("uvicorn", "server", "rag-rerank serve") from None
    try:
        import fastapi  # noqa: F401
    except ImportError:
        raise MissingDependencyError("fastapi", "server", "rag-rerank serve") from None

    from .app import create_app

    app = create_app(config, pool=pool)
    uv_config = uvicorn.Config(
        app,
        host=config.host,
        port=config.port,
        log_level=config.log_level,
        lifespan="on",
        # uvicorn annotates int, but only passes it to asyncio.wait_for (floats work).
        timeout_graceful_shutdown=config.graceful_timeout,  # type: ignore[arg-type]
        access_log=config.log_level_number <= logging.DEBUG,  # debug, and uvicorn's trace
    )
    server = uvicorn.Server(uv_config)
    state = app.state.server

    def stop() -> None:
        server.should_exit = True

    state.on_fatal = stop
    server.run()
    if state.error is not None:
        logger.error("rag-rerank serve: exiting because a model failed to load: %s", state.error)
        return 1
    return 0
