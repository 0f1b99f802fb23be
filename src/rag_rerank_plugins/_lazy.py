"""Lazy attribute loading for package ``__init__`` modules (langchain_core's pattern).

Each package lists ``name -> submodule`` and gets a module ``__getattr__`` that imports the
submodule on first access and caches the value, so importing the package stays cheap. A name
the package does not have is an :class:`AttributeError` that says what to use instead: the
closest public name (``modelpool`` -> ``ModelPool``), or the module a name lives in
(``rag_rerank_plugins.SharedRerankCompressor`` -> ``rag_rerank_plugins.langchain``).
"""

from __future__ import annotations

import difflib
from collections.abc import Callable, Mapping
from importlib import import_module
from typing import Any

__all__ = ["lazy_dir", "lazy_getattr"]


def lazy_getattr(
    package: str,
    table: dict[str, str],
    namespace: dict[str, Any],
    elsewhere: Mapping[str, str] | None = None,
) -> Callable[[str], Any]:
    """A module ``__getattr__`` for ``package`` resolving names through ``table``;
    ``elsewhere`` maps names users look for here to the module that has them."""

    def __getattr__(name: str) -> Any:
        module = table.get(name)
        if module is None:
            raise AttributeError(_missing(package, name, table, elsewhere or {}), name=name)
        value = getattr(import_module(f".{module}", package), name)
        namespace[name] = value
        return value

    return __getattr__


def lazy_dir(namespace: dict[str, Any], public: list[str]) -> Callable[[], list[str]]:
    """A module ``__dir__`` listing the public names (lazy ones too, before their first use) and
    the module's own dunder attributes (``__file__``, ``__name__``): what ``dir()`` and notebook
    tab completion show, without the package's private helpers."""

    def __dir__() -> list[str]:
        return sorted({*public, *(name for name in namespace if name.startswith("__"))})

    return __dir__


def _missing(
    package: str, name: str, table: Mapping[str, str], elsewhere: Mapping[str, str]
) -> str:
    """The message of a missing attribute, with what to use instead when something is close."""
    message = f"module {package!r} has no attribute {name!r}"
    if name.startswith("__"):  # probes by tools (__path__, __wrapped__): the plain message
        return message
    if name in elsewhere:
        where = elsewhere[name]
        return f"{message}; it is in {where}: from {where} import {name}"
    public = sorted({*table, *elsewhere})
    same = [candidate for candidate in public if candidate.lower() == name.lower()]
    close = same or difflib.get_close_matches(name, public, n=1, cutoff=0.75)
    if close:
        hint = close[0]
        home = elsewhere.get(hint)
        return f"{message}; did you mean {hint!r}" + (f" (in {home})?" if home else "?")
    return f"{message}; its public names are listed by dir({package})"
