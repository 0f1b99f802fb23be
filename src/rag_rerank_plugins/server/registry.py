"""The server's protocols, in one list: what the app mounts, the guard counts, the CLI lists.

A protocol (TEI, Cohere, OpenAI, the operations endpoints, or your own) is one module that builds
a :class:`ServerProtocol`: a name, a title and its :class:`Endpoint` s, each a plain
``async def handler(body, state)`` (or ``handler(state)`` for a GET). Both classes live in
:mod:`.endpoints` and are importable from here too. :func:`register_protocol` adds a protocol
to :data:`PROTOCOLS`; everything else reads that list:

* :func:`~.app.create_app` mounts one FastAPI ``APIRouter`` per protocol
  (:meth:`ServerProtocol.router`), and gives the guard middleware the paths to count
  per endpoint (:func:`known_paths`) and to let through without a token (:func:`public_paths`),
* ``rag-rerank serve --help`` prints :func:`describe`, and a test checks that the endpoint table
  of ``docs/deployment.md`` lists the same endpoints.

Importing this module (and the protocol modules) imports neither FastAPI nor the pool: handlers
are plain functions of their body model and the :class:`~.state.ServerState`, bound to a route
only when an app is built. That keeps ``rag-rerank --help`` fast and lets handlers be called in
tests without HTTP. The built-in protocol modules (:mod:`.routers`) import :mod:`.endpoints`,
never this module, so loading them from here is no import circle.
"""

from __future__ import annotations

import argparse
import importlib

from ..exceptions import ConfigurationError
from .endpoints import Endpoint, Handler, ServerProtocol

__all__ = [
    "PROTOCOLS",
    "Endpoint",
    "EndpointsHelpFormatter",
    "Handler",
    "ServerProtocol",
    "describe",
    "known_paths",
    "protocols",
    "public_paths",
    "register_protocol",
    "unregister_protocol",
]


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
