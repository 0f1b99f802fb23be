"""What a server protocol is made of, and how its handlers become routes that write strict JSON.

* :class:`Endpoint` - one route: method, path, a plain ``async def handler(body, state)`` (or
  ``handler(state)`` for a GET) and a one-line summary.
* :class:`ServerProtocol` - a name, a title and its endpoints; :meth:`ServerProtocol.router`
  binds them to a FastAPI ``APIRouter`` when an app is built (a ``GET`` endpoint answers
  ``HEAD`` too).
* :func:`json_bytes` - how a handler's result is written: in one pydantic pass, and never with a
  NaN or an infinity in it (JSON has neither; pydantic would write ``null``, which a client
  takes for a missing value or fails to parse). A non-finite number becomes an
  :class:`~rag_rerank_plugins.exceptions.InferenceError`, which the error table answers as 500.

The list of protocols the server mounts is :mod:`.registry`; the built-in ones are
:mod:`.routers`. This module imports nothing of the server, so protocol modules can import it
while the registry imports them; it never imports the pool, and FastAPI only once a router is
built. Handlers annotate ``state`` with :class:`~.state.ServerState`, which a protocol module may
import under ``TYPE_CHECKING`` only: that annotation is never resolved here.
"""

from __future__ import annotations

import inspect
import math
import types
import typing
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ..exceptions import InferenceError

if TYPE_CHECKING:
    from fastapi import APIRouter
    from pydantic import TypeAdapter

__all__ = ["Endpoint", "Handler", "ServerProtocol", "json_bytes"]

Handler = Callable[..., Awaitable[Any]]


@dataclass(frozen=True)
class Endpoint:
    """One route: ``method path``, the handler answering it, and a one-line description.

    The handler's parameters are the request body (a pydantic model, for POST), path
    parameters, ``state`` (:class:`~.state.ServerState`) and, when it declares one, ``headers``
    (the request's headers, a read-only mapping with lowercase keys); its return annotation
    is the response model, which the handler returns an instance of: it is written by
    :func:`json_bytes`, not validated again (``Any``: the handler returns a Starlette
    ``Response`` itself).
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

        from .body import StrictJSONRoute

        router = APIRouter(tags=[self.name], route_class=StrictJSONRoute)
        for endpoint in self.endpoints:
            route, response_model = _bind(endpoint.handler)
            name = f"{self.name}.{endpoint.handler.__name__}"
            router.add_api_route(
                endpoint.path,
                route,
                methods=[endpoint.method],
                summary=endpoint.summary,
                response_model=response_model,
                name=name,
            )
            if endpoint.method == "GET":
                # RFC 9110 9.1: HEAD wherever GET is (uptime checkers probe HEAD /health). The
                # same handler; the server sends its headers without the body. Left out of the
                # OpenAPI schema, which would list every GET twice.
                router.add_api_route(
                    endpoint.path,
                    route,
                    methods=["HEAD"],
                    response_model=response_model,
                    name=f"{name}.head",
                    include_in_schema=False,
                )
        return router


#: Handler parameters the route fills itself (never read from the request by FastAPI).
_INJECTED = ("state", "headers")


def _hints(handler: Handler) -> dict[str, Any]:
    """The handler's resolved annotations, except ``state``'s: a protocol module may import
    ``ServerState`` under ``TYPE_CHECKING`` only, and the route never needs that type."""
    function = inspect.unwrap(handler)
    annotations = {
        name: value
        for name, value in getattr(function, "__annotations__", {}).items()
        if name not in _INJECTED
    }
    holder = types.SimpleNamespace(__annotations__=annotations)
    return typing.get_type_hints(
        holder, globalns=getattr(function, "__globals__", {}), include_extras=True
    )


def _bind(handler: Handler) -> tuple[Callable[..., Awaitable[Any]], Any]:
    """A FastAPI route calling ``handler(**params, state=request.app.state.server)``, and the
    response model for the OpenAPI schema.

    FastAPI reads a route's parameters from its signature; the route's signature is the
    handler's own minus ``state`` and ``headers``, plus the request (resolved annotations, so
    FastAPI sees the body models). The result is written by :func:`json_bytes` (FastAPI would
    dump it, validate it again and encode it: +45% time for 256 vectors of 1024 floats).
    """
    from pydantic import TypeAdapter
    from starlette.requests import Request
    from starlette.responses import Response

    hints = _hints(handler)
    signature = inspect.signature(handler).parameters
    params = [
        p.replace(annotation=hints.get(p.name, p.annotation))
        for p in signature.values()
        if p.name not in _INJECTED
    ]
    wants_headers = "headers" in signature
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
        if wants_headers:
            kwargs["headers"] = _request.headers
        result = await handler(**kwargs, state=_request.app.state.server)
        if adapter is None or isinstance(result, Response):
            return result
        return Response(json_bytes(adapter, result), media_type="application/json")

    route.__signature__ = inspect.Signature([*params, request_param])  # type: ignore[attr-defined]
    route.__name__ = handler.__name__
    route.__doc__ = handler.__doc__
    return route, response_model


def json_bytes(adapter: TypeAdapter[Any], result: Any) -> bytes:
    """``result`` as JSON; :class:`~rag_rerank_plugins.exceptions.InferenceError` when a number
    in it is NaN or infinite.

    JSON has no NaN or infinity, and pydantic writes them as ``null``: a score or vector
    component a client takes for "missing" (or fails to parse as a float). So the values the
    serializers produce are checked first, then written in the usual one pass. They are read
    in Python mode: in JSON mode a model with a wrap serializer (``_Scored`` in
    :mod:`.schemas`) already turns NaN into None. The check costs 4-7 ms for 256 vectors of
    1024 floats (writing them: 10-30 ms), about 1.5 ms for 1000 ranked items.
    """
    where = _first_non_finite(adapter.dump_python(result), ())
    if where is not None:
        path, value = where
        raise InferenceError(
            f"The answer has a non-finite number ({_describe(value)}) at {_format(path)}, "
            "which JSON cannot carry: the model returned NaN or infinity for this input (or the "
            "endpoint computed one). Check this input and the model; a model whose activations "
            "overflow in float16 may need dtype='float32'."
        )
    return adapter.dump_json(result)


_Path = tuple[str | int, ...]


def _first_non_finite(data: Any, path: _Path) -> tuple[_Path, float] | None:
    """The path and value of the first NaN or infinity in serialized ``data``, else None."""
    if isinstance(data, float):
        return None if math.isfinite(data) else (path, data)
    if isinstance(data, (list, tuple, set, frozenset)):
        try:
            # Numbers are checked at C speed: their sum is finite unless one of them is not (or
            # the sum overflows: then they are looked at one by one).
            if math.isfinite(sum(data)):
                return None
        except (TypeError, OverflowError):
            pass
        for index, item in enumerate(data):
            found = _first_non_finite(item, (*path, index))
            if found is not None:
                return found
        return None
    if isinstance(data, dict):
        for key, item in data.items():
            found = _first_non_finite(item, (*path, str(key)))
            if found is not None:
                return found
    return None


def _describe(value: float) -> str:
    if math.isnan(value):
        return "NaN"
    return "infinity" if value > 0 else "-infinity"


def _format(path: _Path) -> str:
    """``results[0].relevance_score`` style; ``the top level`` for the body itself."""
    text = "".join(f"[{part}]" if isinstance(part, int) else f".{part}" for part in path)
    return text.lstrip(".") or "the top level"
