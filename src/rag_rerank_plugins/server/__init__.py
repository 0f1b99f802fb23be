"""``rag-rerank serve``: the shared pool over HTTP (extra ``server``).

* :func:`create_app` - the FastAPI app (mount it, or run it with any ASGI server).
* :class:`ServerConfig` - settings from CLI flags and ``RAG_RERANK_*`` environment variables.
* :func:`serve` - run the app with uvicorn (what the CLI does); graceful on SIGTERM/SIGINT.
* :func:`register_protocol`, :class:`ServerProtocol`, :class:`Endpoint` - serve another wire
  protocol (see the extending guide): one module plus one registration.

FastAPI and uvicorn are imported only when an app is built or served, so reading the config
(as ``rag-rerank serve --help`` does) stays cheap.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from .._lazy import lazy_dir, lazy_getattr

if TYPE_CHECKING:
    from .app import ServerState, create_app
    from .config import ServedModel, ServerConfig
    from .endpoints import Endpoint, ServerProtocol
    from .registry import register_protocol
    from .run import serve

__all__ = [
    "Endpoint",
    "ServedModel",
    "ServerConfig",
    "ServerProtocol",
    "ServerState",
    "create_app",
    "register_protocol",
    "serve",
]

_LAZY = {
    "create_app": "app",
    "ServerState": "state",
    "Endpoint": "endpoints",
    "ServerProtocol": "endpoints",
    "register_protocol": "registry",
    "ServerConfig": "config",
    "ServedModel": "config",
    "serve": "run",
}


__getattr__ = lazy_getattr(__name__, _LAZY, globals())
__dir__ = lazy_dir(globals(), __all__)
