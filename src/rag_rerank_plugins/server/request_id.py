"""One id per HTTP request: in the ``X-Request-ID`` response header, 500 messages and the log.

The guard middleware (:mod:`.limits`) calls :func:`assign_request_id` first thing: the
client's own ``X-Request-ID`` when it sends a plausible one (so one request can be followed
across a proxy, the client and this server), else a fresh random one. The id is kept in the ASGI
scope's ``state`` (``request.state.request_id`` in Starlette terms), where the error handler and
the guard read it with :func:`request_id_of`: a client that got a 500 can quote the id, and the
server log has the traceback under it.

This module imports nothing of the server, so every layer of it may use it.
"""

from __future__ import annotations

import re
import uuid
from collections.abc import MutableMapping
from typing import Any

__all__ = ["HEADER", "assign_request_id", "request_id_of"]

#: The header the id is read from and answered in (lower case, as ASGI spells header names).
HEADER = "x-request-id"

_HEADER_BYTES = HEADER.encode()
#: What a client's id may look like: short, printable, nothing that could forge a log line.
_PLAUSIBLE = re.compile(rb"[A-Za-z0-9._:/+=@-]{1,128}")


def assign_request_id(scope: MutableMapping[str, Any]) -> str:
    """The id of the request of ``scope`` (the client's or a new one), stored in its state."""
    request_id = None
    for name, value in scope.get("headers", ()):
        if name == _HEADER_BYTES:
            if _PLAUSIBLE.fullmatch(value):
                request_id = value.decode("ascii")
            break
    if request_id is None:
        request_id = uuid.uuid4().hex
    # The server gives each request its own copy of the lifespan state (ASGI spec), so this
    # never leaks into another request.
    scope.setdefault("state", {})["request_id"] = request_id
    return request_id


def request_id_of(scope: MutableMapping[str, Any]) -> str:
    """The id :func:`assign_request_id` gave this request; ``"-"`` if it never ran (an app
    mounted without the guard middleware)."""
    state = scope.get("state") or {}
    return str(state.get("request_id", "-"))
