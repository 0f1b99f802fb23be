"""``rag-rerank serve``: the shared pool over HTTP (extra ``server``).

* :func:`create_app` - the FastAPI app (mount it, or run it with any ASGI server).
* :class:`ServerConfig` - settings from CLI flags and ``RAG_RERANK_*`` environment variables.
* :func:`serve` - run the app with uvicorn (what the CLI does); graceful on SIGTERM/SIGINT.

FastAPI and uvicorn are imported only when an app is built or served, so reading the config
(as ``rag-rerank serve --help`` does) stays cheap.
"""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .app import ServerState, create_app
    from .config import ServedModel, ServerConfig
    from .run import serve

__all__ = ["ServedModel", "ServerConfig", "ServerState", "create_app", "serve"]

_LAZY = {
    "create_app": "app",
    "ServerState": "app",
    "ServerConfig": "config",
    "ServedModel": "config",
    "serve": "run",
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value
