"""Configuration of ``rag-rerank serve``: CLI flags over ``RAG_RERANK_*`` variables over defaults.

Plain dataclass plus explicit env parsing (no pydantic-settings dependency), so the precedence
is easy to read: a CLI flag that is given wins, else the environment variable, else the default.
Importing this module is cheap (no FastAPI): the CLI uses it to validate flags before starting.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from typing import Any

from ..exceptions import ConfigurationError
from ..spec import ModelSpec

__all__ = ["ENV_PREFIX", "ServedModel", "ServerConfig"]

ENV_PREFIX = "RAG_RERANK_"


@dataclass(frozen=True)
class ServedModel:
    """One model the server answers for: the name clients use, and the pool spec behind it."""

    name: str
    spec: ModelSpec
    kind: str


def _split(value: str) -> list[str]:
    return [item.strip() for item in value.replace("\n", ",").split(",") if item.strip()]


def _bool(value: str, name: str) -> bool:
    text = value.strip().lower()
    if text in ("1", "true", "yes", "on"):
        return True
    if text in ("0", "false", "no", "off"):
        return False
    raise ConfigurationError(f"{name} must be true or false, got {value!r}.")


#: Setting -> how its RAG_RERANK_* variable is parsed ("json": a JSON list of spec dicts).
_ENV_TYPES: dict[str, Any] = {
    "host": str,
    "port": int,
    "rerankers": list,
    "embedders": list,
    "specs": "json",
    "reranker_backend": str,
    "embedder_backend": str,
    "device": str,
    "dtype": str,
    "max_length": int,
    "max_concurrency": int,
    "max_pending": int,
    "max_client_batch": int,
    "max_request_bytes": int,
    "batch_size": int,
    "api_key": str,
    "warmup": bool,
    "graceful_timeout": float,
    "body_timeout": float,
    "retry_after": int,
    "log_level": str,
}


@dataclass
class ServerConfig:
    """Everything ``rag-rerank serve`` needs. Build with :meth:`from_env` to read the environment.

    Models: ``rerankers``/``embedders`` are ``[NAME=]MODEL`` strings (MODEL a hub name or local
    path; NAME, default MODEL, is what clients send as ``model``), loaded with
    ``reranker_backend``/``embedder_backend``. ``specs`` are dicts with ``name``, ``model``,
    ``backend`` and optionally ``device``, ``dtype``, ``max_length``, ``options`` for anything else.
    """

    host: str = "127.0.0.1"
    port: int = 8080
    rerankers: list[str] = field(default_factory=list)
    embedders: list[str] = field(default_factory=list)
    specs: list[dict[str, Any]] = field(default_factory=list)
    reranker_backend: str = "cross-encoder"
    embedder_backend: str = "sentence-transformers"
    device: str = "auto"
    dtype: str = "auto"
    max_length: int | None = None
    #: Model calls running at once; more requests wait in the queue.
    max_concurrency: int = 4
    #: Requests allowed to wait; beyond concurrency + queue the answer is 429 + Retry-After.
    max_pending: int = 32
    #: Texts (documents or inputs) per request; more is 413 (TEI's max_client_batch_size).
    max_client_batch: int = 256
    #: Bytes of one request body; more is 413.
    max_request_bytes: int = 2 * 1024 * 1024
    #: Forward-pass batch size used for every request.
    batch_size: int = 32
    #: Bearer token clients must send; None serves without authentication.
    api_key: str | None = field(default=None, repr=False)
    warmup: bool = True
    #: Seconds a shutdown waits for in-flight requests before closing connections.
    graceful_timeout: float = 30.0
    #: Seconds a client may take to send a request body after its headers; then 408.
    body_timeout: float = 30.0
    #: Retry-After seconds on 429; None estimates it from recent request durations.
    retry_after: int | None = None
    log_level: str = "info"

    @classmethod
    def env_names(cls) -> dict[str, str]:
        """Field name -> environment variable (``RAG_RERANK_<FIELD>``)."""
        return {name: ENV_PREFIX + name.upper() for name in _ENV_TYPES}

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None, **overrides: Any) -> ServerConfig:
        """Defaults, then ``RAG_RERANK_*`` variables, then ``overrides`` that are not None."""
        env = os.environ if environ is None else environ
        values: dict[str, Any] = {}
        for name, var in cls.env_names().items():
            raw = env.get(var)
            if raw is None or raw == "":
                continue
            kind = _ENV_TYPES[name]
            try:
                if kind is list:
                    values[name] = _split(raw)
                elif kind == "json":
                    parsed = json.loads(raw)
                    values[name] = parsed if isinstance(parsed, list) else [parsed]
                elif kind is bool:
                    values[name] = _bool(raw, var)
                else:
                    values[name] = kind(raw)
            except (ValueError, TypeError) as exc:
                raise ConfigurationError(f"{var}={raw!r} is invalid: {exc}") from None
        values.update({k: v for k, v in overrides.items() if v is not None})
        known = {f.name for f in fields(cls)}
        unknown = set(values) - known
        if unknown:
            raise ConfigurationError(f"Unknown server setting(s): {', '.join(sorted(unknown))}")
        config = cls(**values)
        config.validate()
        return config

    def validate(self) -> None:
        for name in ("max_concurrency", "max_client_batch", "max_request_bytes", "batch_size"):
            if getattr(self, name) < 1:
                raise ConfigurationError(f"{name} must be at least 1, got {getattr(self, name)}.")
        if self.max_pending < 0:
            raise ConfigurationError(f"max_pending must not be negative, got {self.max_pending}.")
        if not 0 <= self.port <= 65535:
            raise ConfigurationError(f"port must be 0..65535, got {self.port}.")
        if self.graceful_timeout < 0:
            raise ConfigurationError("graceful_timeout must not be negative.")
        if not self.body_timeout > 0:
            raise ConfigurationError(f"body_timeout must be positive, got {self.body_timeout}.")
        self.served_models()

    def served_models(self) -> list[ServedModel]:
        """The models to load, each with its public name; checks names are unique."""
        from ..backends import backend_info

        served: list[ServedModel] = []

        def add(name: str, spec: ModelSpec) -> None:
            kind = backend_info(spec.backend).kind
            if any(m.name == name for m in served):
                raise ConfigurationError(
                    f"Two served models are named {name!r}; give one a name with NAME=MODEL."
                )
            served.append(ServedModel(name, spec, kind))

        for items, backend in (
            (self.rerankers, self.reranker_backend),
            (self.embedders, self.embedder_backend),
        ):
            for item in items:
                name, sep, model = item.partition("=")
                if not sep:
                    name, model = item, item
                add(
                    name.strip(),
                    ModelSpec(
                        model.strip(),
                        backend=backend,
                        device=self.device,
                        dtype=self.dtype,
                        max_length=self.max_length,
                    ),
                )
        for entry in self.specs:
            if not isinstance(entry, dict) or "model" not in entry:
                raise ConfigurationError(
                    f"Each spec needs at least a 'model' (and usually 'backend'), got {entry!r}."
                )
            entry = dict(entry)
            name = str(entry.pop("name", entry["model"]))
            entry.setdefault("device", self.device)
            entry.setdefault("dtype", self.dtype)
            try:
                spec = ModelSpec(**entry)
            except TypeError as exc:
                raise ConfigurationError(f"Invalid spec {entry!r}: {exc}") from None
            add(name, spec)
        if not served:
            raise ConfigurationError(
                "No model to serve. Pass --reranker MODEL and/or --embedder MODEL (or set "
                "RAG_RERANK_RERANKERS / RAG_RERANK_EMBEDDERS)."
            )
        return served
