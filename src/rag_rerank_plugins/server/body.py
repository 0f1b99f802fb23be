"""Reading a request body as JSON strictly: what Python's ``json.loads`` lets through silently.

FastAPI reads a JSON body with Starlette's ``Request.json`` (``json.loads`` on the bytes). Three
things then pass that a client must hear about, each a ``422`` (``400`` on OpenAI's paths), before
any model work:

- **A key twice in one object** (``{"texts": ["a", "b"], "texts": ["z"]}``): ``json.loads`` keeps
  the last value, so the first list was dropped without a word. TEI (serde) refuses it as a
  duplicate field; we say which key.
- **Bytes that are UTF-16 or UTF-32**: ``json.loads`` on bytes guesses those encodings, so such a
  body was read, although the docs (and RFC 8259) say a JSON body is UTF-8. A UTF-8 byte order
  mark is skipped, as ``json.loads`` skips it.
- **An integer of more than 4300 digits**: Python's int limit raised ``ValueError``, which FastAPI
  answered as a bare ``400 There was an error parsing the body``.

Syntax errors stay FastAPI's own (``json.JSONDecodeError``, answered by ``errors`` as a ``422``
naming the position). :class:`StrictJSONRoute` is the route class of every router the server
builds (``endpoints.ServerProtocol.router``).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Coroutine
from typing import Any

from fastapi import Request, Response
from fastapi.routing import APIRoute

from .errors import BodyRefused

__all__ = ["BodyRefused", "StrictJSONRoute", "strict_loads"]

_BOM = b"\xef\xbb\xbf"


def _no_repeated_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    obj = dict(pairs)
    if len(obj) != len(pairs):
        seen: set[str] = set()
        for key, _value in pairs:
            if key in seen:
                raise BodyRefused(
                    f"the key {key!r} appears twice in one object of the body; JSON readers "
                    "disagree on which value wins, so send it once."
                )
            seen.add(key)
    return obj


def strict_loads(body: bytes) -> Any:
    """``body`` parsed as UTF-8 JSON; :class:`BodyRefused` for a repeated key or an integer too
    long to read, ``UnicodeDecodeError`` for bytes that are not UTF-8, ``json.JSONDecodeError``
    for bad syntax."""
    if body.startswith(_BOM):
        body = body[len(_BOM) :]
    text = body.decode("utf-8")  # strict: UTF-16/32 and Latin-1 bodies fail here
    try:
        return json.loads(text, object_pairs_hook=_no_repeated_keys)
    except json.JSONDecodeError:
        raise
    except BodyRefused:
        raise
    except ValueError as exc:  # int() past sys.get_int_max_str_digits()
        raise BodyRefused(
            f"a number in the body cannot be read ({exc}). Send numbers of ordinary size."
        ) from None


class _StrictJSONRequest(Request):
    async def json(self) -> Any:
        if not hasattr(self, "_json"):
            self._json = strict_loads(await self.body())
        return self._json


class StrictJSONRoute(APIRoute):
    """An ``APIRoute`` whose request body is read by :func:`strict_loads`."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()

        async def strict(request: Request) -> Response:
            return await handler(_StrictJSONRequest(request.scope, request.receive))

        return strict
