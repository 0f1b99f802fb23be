"""The server's protocols, in one list: what the app mounts, the guard counts, the CLI lists.

A protocol (TEI, Cohere, OpenAI, the operations endpoints, or your own) is one module that builds
a :class:`ServerProtocol`: a name, a title and its :class:`Endpoint` s, each a plain
``async def handler(body, state)`` (or ``handler(state)`` for a GET). :func:`register_protocol`
adds one to :data:`PROTOCOLS`; everything else reads that list:

* :func:`~.app.create_app` mounts one FastAPI ``APIRouter`` per protocol
  (:meth:`ServerProtocol.router`),
* the guard middleware counts requests per known path (:func:`known_paths`) and lets
  :func:`public_paths` through without a token,
* ``rag-rerank serve --help`` prints :func:`describe`, and a test checks that the endpoint table
  of ``docs/deployment.md`` lists the same endpoints.

Importing this module (and the protocol modules) imports neither FastAPI nor the pool: handlers
are plain functions of their body model and the :class:`~.state.ServerState` (which a protocol
module may import under ``TYPE_CHECKING`` only), bound to a route only when an app is built. That
keeps ``rag-rerank --help`` fast and lets handlers be called in tests without HTTP.
"""

from __future__ import annotations

import argparse
import importlib
import inspect
import typing
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ..exceptions import ConfigurationError

if TYPE_CHECKING:
    from fastapi import APIRouter

__all__ = [
    "PROTOCOLS",
    "Endpoint",
    "EndpointsHelpFormatter",
    "ServerProtocol",
    "describe",
    "known_paths",
    "protocols",
    "public_paths",
    "register_protocol",
    "unregister_protocol",
]

Handler = Callable[..., Awaitable[Any]]


@dataclass(frozen=True)
class Endpoint:
    """One route: ``method path``, the handler answering it, and a one-line description.

    The handler's parameters are the request body (a pydantic model, for POST) and ``state``
    (:class:`~.state.ServerState`); its return annotation is the response model, which the
    handler returns an instance of: it is written as JSON as is, not validated again (``Any``:
    the handler returns a Starlette ``Response`` itself).
    """

    method: str
    path: str
    handler: Handler
    summary: str
    #: Answered without the bearer token (load balancers and orchestrators probe it).
    public: bool = False


@dataclass(frozen=True)
class ServerProtocol:
    """A wire protocol the server speaks: a name, a title for help texts, its endpoints."""

    name: str
    title: str
    endpoints: tuple[Endpoint, ...]

    @property
    def paths(self) -> tuple[str, ...]:
        return tuple(e.path for e in self.endpoints)

    def router(self) -> APIRouter:
        """A FastAPI ``APIRouter`` with one route per endpoint (imports FastAPI)."""
        from fastapi import APIRouter

        router = APIRouter(tags=[self.name])
        for endpoint in self.endpoints:
            route, response_model = _bind(endpoint.handler)
            router.add_api_route(
                endpoint.path,
                route,
                methods=[endpoint.method],
                summary=endpoint.summary,
                response_model=response_model,
                name=f"{self.name}.{endpoint.handler.__name__}",
            )
        return router


def _bind(handler: Handler) -> tuple[Callable[..., Awaitable[Any]], Any]:
    """A FastAPI route calling ``handler(**params, state=request.app.state.server)``, and the
    response model for the OpenAPI schema.

    FastAPI reads a route's parameters from its signature; the route's signature is the
    handler's own minus ``state``, plus the request (resolved annotations, so FastAPI sees the
    body models). The result is written as JSON by pydantic in one pass (FastAPI would dump it,
    validate it again and encode it: +45% time for 256 vectors of 1024 floats).
    """
    from pydantic import TypeAdapter
    from starlette.requests import Request
    from starlette.responses import Response

    from .state import ServerState

    # Protocol modules may import ServerState under TYPE_CHECKING only (it imports the pool).
    hints = typing.get_type_hints(handler, localns={"ServerState": ServerState})
    params = [
        p.replace(annotation=hints.get(p.name, p.annotation))
        for p in inspect.signature(handler).parameters.values()
        if p.name != "state"
    ]
    request_param = inspect.Parameter(
        "_request", inspect.Parameter.KEYWORD_ONLY, annotation=Request
    )

    returns = hints.get("return")
    # Any (or no annotation): the handler returns a Starlette Response itself.
    response_model = None if returns in (None, Any, type(None)) else returns
    adapter: TypeAdapter[Any] | None = (
        None if response_model is None else TypeAdapter(response_model)
    )

    async def route(_request: Request, **kwargs: Any) -> Any:
        result = await handler(**kwargs, state=_request.app.state.server)
        if adapter is None or isinstance(result, Response):
            return result
        return Response(adapter.dump_json(result), media_type="application/json")

    route.__signature__ = inspect.Signature([*params, request_param])  # type: ignore[attr-defined]
    route.__name__ = handler.__name__
    route.__doc__ = handler.__doc__
    return route, response_model


#: Modules holding the built-in protocols (each defines ``PROTOCOL``), in mounting order.
_BUILTIN = ("tei", "cohere", "openai", "ops")

#: Every protocol the next :func:`~.app.create_app` mounts. Use :func:`protocols` to read it
#: (it loads the built-ins on first use) and :func:`register_protocol` to add one.
PROTOCOLS: list[ServerProtocol] = []


def protocols() -> list[ServerProtocol]:
    """The registered protocols, built-ins first."""
    if not PROTOCOLS:
        for name in _BUILTIN:
            module = importlib.import_module(f"{__package__}.routers.{name}")
            PROTOCOLS.append(module.PROTOCOL)
    return list(PROTOCOLS)


def register_protocol(protocol: ServerProtocol, *, replace: bool = False) -> None:
    """Serve ``protocol`` from every app built afterwards (``create_app``, ``rag-rerank serve``).

    A route (method and path) may belong to one protocol only; ``replace=True`` swaps a protocol
    of the same name (e.g. reloading in a notebook).
    """
    current = protocols()
    if replace:
        current = [p for p in current if p.name != protocol.name]
    elif any(p.name == protocol.name for p in current):
        raise ConfigurationError(
            f"A server protocol named {protocol.name!r} is registered already; pick another "
            "name, or pass replace=True."
        )
    taken = {(e.method, e.path): p.name for p in current for e in p.endpoints}
    for endpoint in protocol.endpoints:
        owner = taken.get((endpoint.method, endpoint.path))
        if owner is not None:
            raise ConfigurationError(
                f"{endpoint.method} {endpoint.path} of protocol {protocol.name!r} is served by "
                f"protocol {owner!r} already; use another path."
            )
    PROTOCOLS[:] = [*current, protocol]


def unregister_protocol(name: str) -> None:
    """Remove the protocol ``name`` (tests; built-ins can be removed too)."""
    PROTOCOLS[:] = [p for p in protocols() if p.name != name]


def known_paths() -> frozenset[str]:
    """Every registered path: counted under its own name in ``/metrics``."""
    return frozenset(path for p in protocols() for path in p.paths)


def public_paths() -> frozenset[str]:
    """Paths answered without a token."""
    return frozenset(e.path for p in protocols() for e in p.endpoints if e.public)


def describe() -> str:
    """One line per endpoint, grouped by protocol: the CLI's help and the docs' table."""
    lines = []
    for protocol in protocols():
        lines.append(f"{protocol.title}:")
        for e in protocol.endpoints:
            lines.append(f"  {e.method:<4} {e.path:<15} {e.summary}")
    return "\n".join(lines)


class EndpointsHelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Fills ``{endpoints}`` in a parser's description with :func:`describe` when the help is
    printed, so building the CLI's parsers imports no protocol module."""

    def add_text(self, text: str | None) -> None:
        if text and "{endpoints}" in text:
            text = text.replace("{endpoints}", describe())
        super().add_text(text)
