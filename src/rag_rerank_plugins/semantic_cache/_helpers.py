"""The small pieces around :class:`~.core.SemanticCache`: the hit it returns, input checks,
value encoding, spec resolution and store opening (kept apart so the core stays one read).
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass
from typing import Any

from ..exceptions import ConfigurationError, InvalidInputError
from ..spec import ModelSpec, redact_urls
from .guards import GUARDS
from .identity import nfc
from .sqlite import SQLiteStore
from .stores import Entry, MemoryStore, Store

__all__ = ["CacheHit", "SharedResource", "cache_identity", "open_store"]


class SharedResource:
    """A cache is a process-wide resource, like a connection (a store, an index, locks): a
    deep copy shares it, as the adapters share their pool. Why: LangChain deep-copies a chat
    model with its ``cache`` (``model_copy(deep=True)``, ``copy.deepcopy``), and that raised
    "cannot pickle '_thread.lock' object". A pickle says what to do instead."""

    def __copy__(self) -> Any:
        return self

    def __deepcopy__(self, memo: dict[int, Any]) -> Any:
        return self

    def __reduce_ex__(self, protocol: Any) -> Any:
        raise TypeError(
            f"{type(self).__name__} cannot be pickled: it holds connections and locks of this "
            "process. Build one in each process (a SQLite store path or a RemoteSemanticCache "
            "URL shares the entries), or attach the cache after unpickling."
        )


@dataclass(frozen=True)
class CacheHit:
    """A cached answer: the stored ``value``, the cached ``query`` it was stored under, the
    guard's ``score``, the ``namespace`` and the entry's age in seconds."""

    value: Any
    query: str
    score: float
    namespace: str
    age_s: float


def _spec(model: str | ModelSpec, kind: str) -> ModelSpec:
    from ..backend_choice import choose_backend, is_auto
    from ..backends import backend_info
    from ..settings import get_settings

    if isinstance(model, ModelSpec):
        spec = model
    elif isinstance(model, str) and model.strip():
        settings = get_settings()
        backend = settings.embedder_backend if kind == "embedder" else settings.reranker_backend
        if is_auto(backend):  # RAG_RERANK_*_BACKEND=auto: the pick, as the adapters make it
            backend = choose_backend(kind, (), settings.device, settings.dtype, model)
        spec = ModelSpec(model, backend=backend, device=settings.device, dtype=settings.dtype)
    else:
        raise ConfigurationError(f"{kind} must be a model name or a ModelSpec; got {model!r}.")
    if backend_info(spec.backend).kind != kind:
        raise ConfigurationError(
            f"SemanticCache's {kind} needs a{'n' if kind == 'embedder' else ''} {kind} backend; "
            f"{spec.backend!r} is not one."
        )
    return spec


#: PBKDF2 rounds of :func:`cache_identity`'s digest (about 50 ms, once per cache).
_IDENTITY_ROUNDS = 100_000


def _canonical(value: Any) -> str:
    """``value`` (a frozen spec option) as text that is the same in every process: a set's
    ``repr`` follows string hashing, which differs between processes."""
    if isinstance(value, (set, frozenset)):
        return "{" + ", ".join(sorted(_canonical(v) for v in value)) + "}"
    if isinstance(value, tuple):  # FrozenMap, FrozenList, (key, value) pairs
        return f"{type(value).__name__}(" + ", ".join(_canonical(v) for v in value) + ")"
    return repr(value)


def cache_identity(spec: ModelSpec) -> str:
    """The embedder identity stored with every entry: a cache only compares vectors of its own.

    Why not the label alone: the label is for display, and hides the userinfo, query string and
    fragment of every URL in it (they may carry credentials), so two remote embedders at
    ``http://gw/embed?deployment=small-v1`` and ``...?deployment=multilingual-v2`` had one
    label, and one answered from the other's entries. When the label shows the whole spec
    (nothing redacted: local and hub models) it stays the identity, so entries stored by
    earlier versions stay readable; otherwise the identity is the label plus a digest of the
    full spec (backend, model, device, dtype, max_length, options; not the token, which changes
    no vector). PBKDF2 rather than one SHA-256: the digest covers a password a URL may hold,
    and the cache file must not make it cheap to guess."""
    shown = [spec.model, *(str(value) for _, value in spec.options)]
    if all(redact_urls(text) == text for text in shown):
        return spec.label
    full = _canonical((spec.backend, spec.model, spec.device, spec.dtype, spec.max_length,
                       spec.options))  # fmt: skip
    salt = b"rag-rerank-plugins semantic cache identity"
    digest = hashlib.pbkdf2_hmac("sha256", full.encode("utf-8"), salt, _IDENTITY_ROUNDS)
    return f"{spec.label}#{digest.hex()[:32]}"


def _encode(value: Any) -> tuple[bytes, bool]:
    if isinstance(value, (bytes, bytearray, memoryview)):
        return bytes(value), True
    try:
        text = json.dumps(value, ensure_ascii=False, allow_nan=False, separators=(",", ":"))
        data = text.encode("utf-8")  # a lone surrogate ("\ud800") fails here: not valid text
    except (TypeError, ValueError) as exc:  # UnicodeEncodeError is a ValueError
        raise InvalidInputError(
            f"SemanticCache values must be JSON-serialisable (dict, list, str, number, bool, "
            f"None) or bytes; got {type(value).__name__} ({exc}). Convert it first, e.g. "
            "model.model_dump(), or store pickle.dumps(value) as bytes."
        ) from None
    return data, False


def _decode(entry: Entry) -> Any:
    return entry.payload if entry.is_bytes else json.loads(entry.payload)


def _valid_text(text: str, what: str) -> None:
    """Refuse a lone surrogate ("\\ud800", from a bad decode): it cannot be stored in a SQLite
    file or sent to a server, so it would fail there, store-dependently, as a skipped put."""
    if text.isascii():
        return
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise InvalidInputError(
            f"SemanticCache {what} is not valid text: it holds a lone surrogate "
            f"({text[exc.start]!r} at position {exc.start}), as a wrong decode leaves. Decode the "
            "bytes with the right codec, or drop them with .encode('utf-8', 'replace').decode()."
        ) from None


def _check_namespace(namespace: Any) -> str:
    if not isinstance(namespace, str) or not namespace.strip():
        raise InvalidInputError(
            f"SemanticCache namespace must be a non-empty str (e.g. the LLM's identity string); "
            f"got {namespace!r} ({type(namespace).__name__})."
        )
    _valid_text(namespace, "namespace")
    return namespace


def _check(query: Any, namespace: Any) -> str:
    """``query`` in NFC, once both are checked. Why NFC: the same question typed on one keyboard
    ("ã", one code point) and pasted from a PDF or a macOS file name ("a" + a combining tilde,
    NFD) is the same text, so it hits as an identical question. A namespace is an opaque key
    and stays as given."""
    if not isinstance(query, str) or not query.strip():
        raise InvalidInputError(f"SemanticCache query must be a non-empty str; got {query!r}.")
    _valid_text(query, "query")
    _check_namespace(namespace)
    return nfc(query)


def open_store(store: str | Store) -> Store:
    """``"memory"``, ``"sqlite:///path/to/file.db"`` (or ``"sqlite:///:memory:"``), or a
    :class:`Store` object as is."""
    if isinstance(store, Store):
        return store
    if store == "memory":
        return MemoryStore()
    if isinstance(store, str) and store.startswith("sqlite:///"):
        path = store.removeprefix("sqlite:///")
        if path:
            return SQLiteStore(path)
    raise ConfigurationError(
        f"store must be 'memory', 'sqlite:///path/to/file.db' or a Store object; got {store!r}."
    )


def check_settings(
    guard: str, threshold: float | None, ttl: float | None, max_entries: int | None
) -> None:
    """SemanticCache's settings, refused with a ConfigurationError before anything is opened."""
    if guard not in GUARDS:
        raise ConfigurationError(f"guard must be one of {', '.join(GUARDS)}; got {guard!r}.")
    for name, value in (("threshold", threshold), ("ttl", ttl)):
        bad = isinstance(value, bool) or not isinstance(value, int | float)
        if value is not None and (bad or not math.isfinite(value)):
            # NaN compares false with everything: a NaN threshold never hits, a NaN ttl
            # expires every entry as it is stored.
            raise ConfigurationError(f"{name} must be a finite number or None; got {value!r}.")
    if threshold is not None and guard != "rerank" and not 0.0 <= threshold <= 1.0:
        raise ConfigurationError(
            f"threshold of the {guard} guard must be in [0, 1] (the range of its score); "
            f"got {threshold!r}."
        )
    if ttl is not None and ttl <= 0:
        raise ConfigurationError(f"ttl must be > 0 seconds or None; got {ttl!r}.")
    if max_entries is not None and (
        isinstance(max_entries, bool) or not isinstance(max_entries, int) or max_entries < 1
    ):
        raise ConfigurationError(
            f"max_entries must be a positive int or None; got {max_entries!r}."
        )
