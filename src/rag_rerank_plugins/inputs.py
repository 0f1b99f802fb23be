"""Checks on what callers pass, run before any model work: one place for every path.

Bad input gets a clear :class:`InvalidInputError` here, in the caller's thread, instead of a
crash deep in a tokenizer or torch after the request was queued.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from .engine.request import LANES
from .exceptions import InvalidInputError

__all__ = [
    "check_batch_size",
    "check_pairs",
    "check_priority",
    "check_texts",
    "check_timeout",
    "text_list",
    "clean_text",
    "require_strings",
]


_SURROGATE = re.compile("[\ud800-\udfff]")


def clean_text(text: str) -> str:
    """``text`` with lone surrogates (e.g. ``"\\ud800"``, not encodable as UTF-8) replaced by
    U+FFFD. Fast tokenizers raise on them, which would fail every request sharing the batch."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return _SURROGATE.sub("\ufffd", text)
    return text


def require_strings(texts: Sequence[Any], what: str) -> list[str]:
    """``texts`` checked to be str and cleaned with :func:`clean_text`."""
    for i, text in enumerate(texts):
        if not isinstance(text, str):
            raise InvalidInputError(
                f"{what} #{i} is {type(text).__name__}, not str. Convert it to text first "
                "(rag-rerank-plugins never guesses how to stringify a document)."
            )
    return [clean_text(text) for text in texts]


def text_list(texts: Any, call: str, single_str_hint: str) -> list[str]:
    """``texts`` given to an adapter's batch call (``call``), as a list of str, checked before
    any model work: any iterable of str is accepted (a generator too), but not a str, bytes or
    a mapping, which iterate as letters, ints or keys (``embed_documents("hello")`` returned
    five vectors, one per letter). A bad item is named by its index in ``texts``."""
    if isinstance(texts, str):
        raise InvalidInputError(
            f"{call} takes a list of str, got a single str {texts[:40]!r}. {single_str_hint}"
        )
    if not isinstance(texts, Iterable) or isinstance(texts, (bytes, bytearray, Mapping)):
        raise InvalidInputError(f"{call} takes a list of str, got {type(texts).__name__}.")
    items = list(texts)
    for i, text in enumerate(items):
        if not isinstance(text, str):
            raise InvalidInputError(
                f"texts[{i}] is {type(text).__name__}, not str. Convert it to text first "
                "(rag-rerank-plugins never guesses how to stringify a document)."
            )
    return items


def check_pairs(pairs: Sequence[Any]) -> list[tuple[str, str]]:
    """(query, text) pairs checked and cleaned. A pair is any iterable of two str but a str
    itself: ``tuple("qp")`` would score ``("q", "p")``, a dict would score its keys."""
    if isinstance(pairs, (str, bytes, Mapping)) or not isinstance(pairs, Iterable):
        raise InvalidInputError(
            f"pairs must be a list of (query, text) pairs, got a {type(pairs).__name__}."
        )
    checked = []
    for i, pair in enumerate(pairs):
        if isinstance(pair, (str, bytes, bytearray, Mapping)):
            raise InvalidInputError(
                f"pair #{i} is a {type(pair).__name__}, not a (query, text) pair: pass "
                "[(query, text), ...]."
            )
        try:
            pair = tuple(pair)
        except TypeError:
            raise InvalidInputError(
                f"pair #{i} is {type(pair).__name__}, not a (query, text) pair."
            ) from None
        if len(pair) != 2:
            raise InvalidInputError(f"pair #{i} has {len(pair)} items; expected (query, text).")
        query, text = require_strings(pair, f"pair #{i} item")
        checked.append((query, text))
    return checked


def check_priority(priority: str) -> None:
    if priority not in LANES:
        raise InvalidInputError(
            f"priority must be 'interactive' or 'bulk', got {priority!r}: interactive for "
            "query-time calls, bulk for corpus (re-)embedding."
        )


def check_batch_size(batch_size: int) -> None:
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size <= 0:
        raise InvalidInputError(f"batch_size must be a positive int, got {batch_size!r}.")


def check_texts(texts: Any, prompt: Any = None) -> list[str]:
    """Texts to embed, checked and cleaned, and an optional instruction prompt checked."""
    if isinstance(texts, str):  # list("hello") would embed five one-letter texts
        raise InvalidInputError(
            f"texts must be a list of str, got a single str {texts[:40]!r}; "
            "pass [text] to embed one text."
        )
    if not isinstance(texts, Iterable) or isinstance(texts, (bytes, bytearray, Mapping)):
        # None, 5: a bare TypeError; a mapping or bytes would embed its keys or ints
        raise InvalidInputError(f"texts must be a list of str, got {type(texts).__name__}.")
    if prompt is not None and not isinstance(prompt, str):
        raise InvalidInputError(f"prompt must be a str or None, got {type(prompt).__name__}.")
    return require_strings(list(texts), "text")


def check_timeout(timeout: Any) -> float | None:
    """None, or a positive number of seconds (``inf`` included: no limit, even where
    ``request_timeout_s`` sets one; callers pass the timeout they use through
    :func:`~rag_rerank_plugins.engine_config.no_limit`, since thread waits overflow past
    ``threading.TIMEOUT_MAX``)."""
    if timeout is None:
        return None
    if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not timeout > 0:
        raise InvalidInputError(f"timeout must be a positive number of seconds, got {timeout!r}.")
    return float(timeout)
