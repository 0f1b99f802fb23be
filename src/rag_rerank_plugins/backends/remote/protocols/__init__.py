"""The protocol registry: wire protocol name (the spec's ``protocol`` option) -> :class:`Protocol`.

One module per built-in protocol, one registry line each (at the bottom of this module):

* ``tei`` (:mod:`.tei`): text-embeddings-inference, ``/rerank`` and ``/embed``.
* ``cohere`` (:mod:`.cohere`): Cohere's ``/v1/rerank`` and ``/v1/embed``.
* ``infinity`` (:mod:`.openai`): infinity's ``/rerank`` and OpenAI-style ``/embeddings``.

A new protocol is a :class:`Protocol` subclass (see :mod:`.base`) plus one
:func:`register_protocol` call, here for a built-in one or in the user's code for their own
(docs/guides/extending.md, "Adding a client protocol"). Register before loading a spec that
names it: the name is checked when the spec loads.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from types import MappingProxyType

from ....exceptions import ConfigurationError
from .base import (
    Call,
    CallSettings,
    Protocol,
    ServerInfo,
    UnexpectedResponse,
    documents_rerank,
    scores_by_index,
    vector_list,
)
from .cohere import CohereProtocol
from .openai import InfinityProtocol
from .tei import TEIProtocol

__all__ = [
    "PROTOCOLS",
    "Call",
    "CallSettings",
    "CohereProtocol",
    "InfinityProtocol",
    "Protocol",
    "ServerInfo",
    "TEIProtocol",
    "UnexpectedResponse",
    "documents_rerank",
    "get_protocol",
    "register_protocol",
    "scores_by_index",
    "vector_list",
]

_REGISTRY: dict[str, Protocol] = {}
#: The registered protocols by name (read-only; add with :func:`register_protocol`).
PROTOCOLS: Mapping[str, Protocol] = MappingProxyType(_REGISTRY)
_NAME = re.compile(r"[a-z][a-z0-9_.-]*")


def register_protocol(name: str, protocol: Protocol, *, replace: bool = False) -> None:
    """Make ``protocol`` selectable as ``options={"protocol": name}`` on remote specs.

    Names are lowercase (the option is lowercased before lookup). Registering a taken name is an
    error unless ``replace=True``, so two libraries cannot silently swap each other's protocol.
    """
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        raise ConfigurationError(
            f"Protocol names are lowercase identifiers such as 'my-server' (letters, digits, "
            f"'_', '.', '-'; starting with a letter), got {name!r}."
        )
    if not isinstance(protocol, Protocol):
        raise ConfigurationError(
            f"register_protocol({name!r}, ...) needs an instance of a Protocol subclass, got "
            f"{type(protocol).__name__}: subclass rag_rerank_plugins.backends.remote.Protocol."
        )
    if name in _REGISTRY and not replace and _REGISTRY[name] is not protocol:
        raise ConfigurationError(
            f"A remote protocol named {name!r} is already registered "
            f"({type(_REGISTRY[name]).__name__}); pick another name or pass replace=True."
        )
    _REGISTRY[name] = protocol


def get_protocol(name: str) -> Protocol:
    """The protocol registered as ``name``; a :class:`ConfigurationError` naming the choices."""
    protocol = _REGISTRY.get(name)
    if protocol is None:
        raise ConfigurationError(
            f"Unknown remote protocol {name!r}; use one of {', '.join(_REGISTRY)} (or register "
            "yours with rag_rerank_plugins.backends.remote.register_protocol)."
        )
    return protocol


register_protocol("tei", TEIProtocol())
register_protocol("cohere", CohereProtocol())
register_protocol("infinity", InfinityProtocol())
