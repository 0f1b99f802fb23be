"""Configuration of ``rag-rerank serve``: CLI flags over ``RAG_RERANK_*`` variables over defaults.

:class:`ServerConfig` is a section of the one configuration (:mod:`rag_rerank_plugins._config`):
each field is a ``RAG_RERANK_<FIELD>`` variable, a ``rag-rerank serve`` option built from the
field (name, type, default, help), and a row of ``docs/configuration.md``. The device, dtype,
backends and batch size are shared with the in-process adapters (:class:`ModelDefaults`), so
one ``RAG_RERANK_DEVICE`` sets both. The bearer token is the one setting with two variables:
``RAG_RERANK_API_KEY`` holds the token, ``RAG_RERANK_API_KEY_FILE`` (the variable of its flag
``--api-key-file``) names a file holding it (:meth:`ServerConfig.from_sources`). Importing this
module is cheap (no FastAPI): the CLI uses it to build and validate its flags before starting.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Annotated, Any, ClassVar, Literal

from pydantic import Field, ValidationInfo, field_validator
from typing_extensions import Self

from .._config import (
    ENV_PREFIX,
    AdapterConfig,
    Cli,
    ConfigModel,
    ModelDefaults,
    TextParser,
    json_list,
)
from ..engine_config import EngineConfig, PoolConfig
from ..exceptions import ConfigurationError
from ..spec import ModelSpec, redact_urls

__all__ = [
    "API_KEY_FILE_VAR",
    "ENV_PREFIX",
    "LOG_LEVELS",
    "SERVE_SECTIONS",
    "ServedModel",
    "ServerConfig",
    "check_api_key",
    "read_api_key_file",
]

#: The variable of ``--api-key-file``: names a file holding the bearer token (a token in a file
#: never shows in ``ps`` or in the process's environment, e.g. a mounted Kubernetes secret).
API_KEY_FILE_VAR = ENV_PREFIX + "API_KEY_FILE"
_API_KEY_VAR = ENV_PREFIX + "API_KEY"

#: The log levels uvicorn takes (its ``--log-level`` choices), as numbers of :mod:`logging`
#: (uvicorn's ``trace`` is 5, below DEBUG). Any case is accepted; ``warn`` and ``fatal`` are the
#: standard library's aliases of ``warning`` and ``critical``.
LOG_LEVELS: dict[str, int] = {
    "critical": logging.CRITICAL,
    "error": logging.ERROR,
    "warning": logging.WARNING,
    "info": logging.INFO,
    "debug": logging.DEBUG,
    "trace": 5,
}
_LEVEL_ALIASES = {"warn": "warning", "fatal": "critical"}
#: What separates ``[NAME=]MODEL`` entries in RAG_RERANK_RERANKERS / EMBEDDERS: a comma or a
#: line break, with any spaces around it.
_ENTRY_SEPARATOR = re.compile(r"\s*[,\n]\s*")


def check_api_key(key: str | None, where: str = "RAG_RERANK_API_KEY / --api-key-file") -> None:
    """Refuse a bearer token no client could ever send, naming ``where`` it came from but never
    the token itself (error messages reach logs).

    A blank token would turn authentication off while ``/info`` still says ``auth: true`` (fail
    open: a secret template that rendered empty); a control character (a second line of a key
    file, a tab) or a non-ASCII character cannot travel in an HTTP header, so the server would
    refuse every request (fail closed, with nothing saying why). Both are configuration errors
    at start-up. None (unset) means no authentication."""
    if key is None:
        return
    if not key.strip():
        raise ConfigurationError(
            f"The API key ({where}) is empty or blank: that would leave the server open while "
            "it reports auth. Put the token in it, or unset it to run without authentication."
        )
    bad = sorted({repr(c) for c in key if not " " <= c <= "~"})
    if bad:
        raise ConfigurationError(
            f"The API key ({where}) contains {', '.join(bad[:5])}: clients cannot send such a "
            "character in an 'Authorization: Bearer' header, so every request would get 401. "
            "Use a single line of printable ASCII (e.g. `openssl rand -hex 32`)."
        )


def read_api_key_file(path: str, where: str) -> str:
    """The bearer token held in the file ``path`` (surrounding whitespace, the usual trailing
    newline included, removed), refused as :func:`check_api_key` refuses it. ``where`` names
    the flag or variable that gave the path, for the messages (never the token).

    The one reader of ``--api-key-file`` and ``RAG_RERANK_API_KEY_FILE``, so that both refuse
    the same files: a missing or unreadable file, an empty one (it would serve without
    authentication while the operator believes otherwise), one holding two lines."""
    try:
        with open(path, encoding="utf-8") as fh:
            secret = fh.read().strip()
    except OSError as exc:
        raise ConfigurationError(
            f"cannot read {where}: {exc.strerror or exc}. Name a readable file that holds the "
            "token."
        ) from None
    except UnicodeDecodeError:
        raise ConfigurationError(
            f"{where} is not UTF-8 text: put the token in it as one line of printable ASCII "
            "(e.g. `openssl rand -hex 32 > FILE`)."
        ) from None
    if not secret:
        raise ConfigurationError(
            f"{where} is empty: put the token in it, or leave it out to run without authentication."
        )
    check_api_key(secret, where)
    return secret


def _api_key_from_file_variable(env: Mapping[str, str]) -> str | None:
    """The token of the file ``RAG_RERANK_API_KEY_FILE`` names; None when that is unset."""
    path = env.get(API_KEY_FILE_VAR)
    if path is None or path == "":
        return None
    if not path.strip():
        # As for a blank RAG_RERANK_API_KEY: a template that rendered blanks would otherwise
        # leave the server open (fail open).
        raise ConfigurationError(
            f"{API_KEY_FILE_VAR} is blank: name the file that holds the token, or unset it to "
            "run without authentication."
        )
    if env.get(_API_KEY_VAR, "") != "":
        raise ConfigurationError(
            f"Both {_API_KEY_VAR} and {API_KEY_FILE_VAR} are set, so the token is ambiguous: "
            f"unset one of them ({API_KEY_FILE_VAR} keeps the token out of the environment)."
        )
    return read_api_key_file(path.strip(), f"{API_KEY_FILE_VAR}={path!r}")


@dataclass(frozen=True)
class ServedModel:
    """One model the server answers for: the name clients use, and the pool spec behind it."""

    name: str
    spec: ModelSpec
    kind: str


def _models_flag(flag: str) -> Cli:
    return Cli(flag=flag, metavar="[NAME=]MODEL", repeat=True, group="models")


def _model_entries(text: str) -> list[str]:
    """``a=/models/a, b=/models/b`` (or one entry per line) -> the entries. An empty entry
    (``a,,b``, a leading or trailing comma) is refused rather than dropped: it is a model
    deleted by mistake or a typo, and a server that starts without it says nothing."""
    entries = _ENTRY_SEPARATOR.split(text.strip())
    for number, entry in enumerate(entries, 1):
        if not entry:
            raise ValueError(
                f"has an empty entry (#{number} of {len(entries)}): remove the stray comma, "
                "or put the model there ([NAME=]MODEL, comma-separated)"
            )
    return entries


def split_model_entry(entry: str) -> tuple[str, str]:
    """``NAME=MODEL`` -> (NAME, MODEL); ``MODEL`` -> (MODEL, MODEL). Raises ValueError naming
    the entry when a part is empty (``=b`` served ``b`` under the name '', which no client can
    mean) or the ``=`` is doubled (``a==b`` loaded the model ``=b``)."""
    name, sep, model = entry.partition("=")
    name, model = name.strip(), model.strip()
    if not sep:
        model = name
    example = "e.g. bge=BAAI/bge-reranker-v2-m3, or the model alone"
    if not name and not model:
        raise ValueError(f"has an empty entry {entry!r}: give [NAME=]MODEL ({example})")
    if not name:
        raise ValueError(
            f"entry {entry!r} has an empty name before '=': write NAME=MODEL ({example})"
        )
    if not model:
        raise ValueError(f"entry {entry!r} has no model after '=': write NAME=MODEL ({example})")
    if model.startswith("="):
        raise ValueError(f"entry {entry!r} has a stray '=': write NAME=MODEL ({example})")
    return name, model


def _models_field(what: str) -> Any:
    return Field(
        default_factory=list,
        description=f"{what} to serve: hub name or local path, optionally named (repeatable; "
        "the variable takes a comma-separated list).",
    )


class ServerConfig(ModelDefaults):
    """Everything ``rag-rerank serve`` needs. Build with :meth:`from_env` to read the environment
    (and check that there is something to serve).

    Models: ``rerankers``/``embedders`` are ``[NAME=]MODEL`` strings (MODEL a hub name or local
    path; NAME, default MODEL, is what clients send as ``model``), loaded with
    ``reranker_backend``/``embedder_backend``. ``specs`` are dicts with ``name``, ``model``,
    ``backend`` and optionally ``device``, ``dtype``, ``max_length``, ``options`` for anything else.
    """

    cli_group: ClassVar[str] = "server"

    rerankers: Annotated[list[str], TextParser(_model_entries), _models_flag("--reranker")] = (
        _models_field("Rerankers")
    )
    embedders: Annotated[list[str], TextParser(_model_entries), _models_flag("--embedder")] = (
        _models_field("Embedders")
    )
    specs: Annotated[
        list[dict[str, Any]],
        TextParser(json_list),
        Cli(flag="--spec", metavar="JSON", repeat=True, group="models"),
    ] = Field(
        default_factory=list,
        description='Any spec as JSON, e.g. {"name": "r", "model": "m", "backend": '
        '"cross-encoder", "options": {"revision": "v2"}} (repeatable; the variable takes a JSON '
        "list).",
    )
    max_length: Annotated[int | None, Cli(group="models")] = Field(
        default=None, gt=0, description="Token limit of served models; none: the model's own."
    )
    host: str = Field(default="127.0.0.1", description="Address to bind (0.0.0.0 in a container).")
    port: int = Field(default=8080, ge=0, le=65535, description="Port to listen on.")
    api_key: Annotated[str | None, Cli(flag="--api-key-file", metavar="PATH", secret_file=True)] = (
        Field(
            default=None,
            repr=False,
            description="Bearer token clients must send; none: no authentication. The flag, "
            "like the variable RAG_RERANK_API_KEY_FILE, names a file holding it, so the token "
            "never shows in the process list.",
        )
    )
    warmup: bool = Field(
        default=True,
        description="Run a warm-up forward pass before /health turns ready (--no-warmup skips it).",
    )
    graceful_timeout: float = Field(
        default=30.0,
        ge=0,
        description="Seconds a shutdown waits for in-flight requests before closing connections.",
    )
    body_timeout: float = Field(
        default=30.0,
        gt=0,
        description="Seconds a client may take to send a request body after its headers; then 408.",
    )
    log_level: str = Field(
        default="info",
        description="uvicorn log level: critical, error, warning, info, debug or trace.",
    )
    max_concurrency: Annotated[int, Cli(group="limits")] = Field(
        default=4, ge=1, description="Model calls running at once; more requests wait."
    )
    max_pending: Annotated[int, Cli(group="limits")] = Field(
        default=32,
        ge=0,
        description="Requests allowed to wait beyond those running; more get 429 + Retry-After.",
    )
    max_client_batch: Annotated[int, Cli(group="limits")] = Field(
        default=256,
        ge=1,
        description="Texts (documents or inputs) per request; more get 413 (TEI's "
        "max_client_batch_size).",
    )
    max_request_bytes: Annotated[int, Cli(group="limits")] = Field(
        default=2 * 1024 * 1024, ge=1, description="Bytes of one request body; larger get 413."
    )
    retry_after: Annotated[int | None, Cli(group="limits")] = Field(
        default=None,
        ge=1,
        description="Retry-After seconds on 429; none: estimated from recent request durations.",
    )
    semantic_cache: Annotated[str | None, Cli(group="semantic cache")] = Field(
        default=None,
        description="Serve POST /v1/semantic-cache/* from this store: 'memory' or "
        "'sqlite:///path'; none: off.",
    )
    semantic_cache_guard: Annotated[
        Literal["hybrid", "rerank", "dense"], Cli(group="semantic cache")
    ] = Field(
        default="hybrid",
        description="What must agree before a hit: hybrid (dense + lexical + numbers and codes), "
        "rerank (the served cross-encoder) or dense (similarity alone).",
    )
    semantic_cache_threshold: Annotated[float | None, Cli(group="semantic cache")] = Field(
        default=None,
        allow_inf_nan=False,
        description="The guard's threshold (hybrid and dense: in [0, 1]); none: the guard's "
        "calibrated default.",
    )
    semantic_cache_ttl: Annotated[float | None, Cli(group="semantic cache")] = Field(
        default=None,
        gt=0,
        allow_inf_nan=False,
        description="Seconds an entry lives; none: until evicted.",
    )
    semantic_cache_max_entries: Annotated[int, Cli(group="semantic cache")] = Field(
        default=10_000, ge=1, description="Entries kept; the least recently used go first."
    )
    semantic_cache_embedder: Annotated[str | None, Cli(group="semantic cache")] = Field(
        default=None,
        description="Served embedder (its name) that embeds cached queries; none: the cache's "
        "default (the packaged all-MiniLM-L6-v2).",
    )

    @field_validator("rerankers", "embedders")
    @classmethod
    def _entries_well_formed(cls, entries: list[str]) -> list[str]:
        # Checked when the settings are built, so the error names the variable or flag.
        for entry in entries:
            split_model_entry(entry)
        return entries

    @field_validator("host")
    @classmethod
    def _host_not_blank(cls, host: str) -> str:
        # uvicorn binds every interface (0.0.0.0 and ::) for host "", while a blank
        # RAG_RERANK_HOST counts as unset (127.0.0.1): an empty --host exposed the server.
        if not host.strip():
            raise ValueError(
                "is blank (--host / RAG_RERANK_HOST): give an address such as 127.0.0.1 (this "
                "machine) or 0.0.0.0 (every interface)"
            )
        return host.strip()

    @field_validator("log_level")
    @classmethod
    def _known_log_level(cls, level: str) -> str:
        # Unchecked, 'verbose' passed until uvicorn's KeyError at start-up (or the CLI's
        # ValueError), and 'DEBUG' did not turn the access log on as 'debug' does.
        name = level.strip().lower()
        name = _LEVEL_ALIASES.get(name, name)
        if name not in LOG_LEVELS:
            raise ValueError(f"must be one of {', '.join(LOG_LEVELS)} (any case)")
        return name

    @property
    def log_level_number(self) -> int:
        """:attr:`log_level` as a :mod:`logging` level (``trace``, uvicorn's own, is 5)."""
        return LOG_LEVELS[self.log_level]

    @field_validator("semantic_cache")
    @classmethod
    def _semantic_cache_store_known(cls, store: str | None) -> str | None:
        # Checked at start-up: otherwise the server turns ready and every cache request is a 500.
        sqlite_path = store.removeprefix("sqlite:///") if store else ""
        if store is not None and store != "memory" and (sqlite_path == store or not sqlite_path):
            raise ValueError("must be 'memory' or 'sqlite:///path/to/file.db'")
        if store is not None and store != "memory":  # "memory" is no path to check
            from ..semantic_cache.sqlite import check_folder

            try:
                check_folder(sqlite_path)
            except ConfigurationError as exc:
                raise ValueError(str(exc)) from None
        return store

    @field_validator("semantic_cache_threshold")
    @classmethod
    def _semantic_cache_threshold_in_range(
        cls, threshold: float | None, info: ValidationInfo
    ) -> float | None:
        # The hybrid and dense scores are in [0, 1]; outside it a guard is silently off (below)
        # or exact-match only (above). A rerank score is on the cross-encoder's own scale.
        guard = info.data.get("semantic_cache_guard", "hybrid")
        if threshold is not None and guard != "rerank" and not 0.0 <= threshold <= 1.0:
            raise ValueError(f"must be in [0, 1] for the {guard} guard (the range of its score)")
        return threshold

    @classmethod
    def from_sources(
        cls,
        environ: Mapping[str, str] | None = None,
        given: Mapping[str, Any] | None = None,
        *,
        given_by: Callable[[str], str] | None = None,
    ) -> Self:
        """As :meth:`ConfigModel.from_sources`, and the token of the file
        ``RAG_RERANK_API_KEY_FILE`` names, read as ``--api-key-file`` reads its file. It was
        silently ignored before, and the server ran without authentication (fail open). A given
        ``api_key`` (the flag) wins and neither variable is read; both variables set is an
        error."""
        env = os.environ if environ is None else environ
        key = None if given and "api_key" in given else _api_key_from_file_variable(env)
        if key is None:
            return super().from_sources(environ, given, given_by=given_by)

        def source(name: str) -> str:
            if name == "api_key":
                return f"{API_KEY_FILE_VAR}={env[API_KEY_FILE_VAR]!r}"
            return given_by(name) if given_by is not None else f"argument {name}"

        return super().from_sources(environ, {**(given or {}), "api_key": key}, given_by=source)

    @classmethod
    def from_env(cls, environ: Any = None, **overrides: Any) -> ServerConfig:
        """Defaults, then ``RAG_RERANK_*`` variables, then ``overrides`` that are not None; then
        checks that the models to serve are valid (:meth:`served_models`)."""
        config = super().from_env(environ, **overrides)
        config.served_models()
        return config

    def served_models(self) -> list[ServedModel]:
        """The models to load, each with its public name; checks names are unique."""
        from ..backend_choice import choose_backend, is_auto
        from ..backends import backend_info
        from ..backends.remote.settings import _refuse_url_secrets

        served: list[ServedModel] = []

        def add(name: str, spec: ModelSpec) -> None:
            # Before anything shows the name or the model (the start-up line, /info, stats):
            # user:password@ in a URL is refused here, not when the remote backend loads it.
            for text in (name, spec.model, spec.option("url")):
                _refuse_url_secrets(text)
            kind = backend_info(spec.backend).kind
            same = next((m for m in served if m.name == name), None)
            if same is not None:
                raise ConfigurationError(
                    f"Two served models are named {name!r} ({same.spec.model!r} and "
                    f"{spec.model!r}); give one another name with NAME=MODEL."
                )
            served.append(ServedModel(name, spec, kind))

        for kind, items, backend in (
            ("reranker", self.rerankers, self.reranker_backend),
            ("embedder", self.embedders, self.embedder_backend),
        ):
            for item in items:
                try:
                    name, model = split_model_entry(item)
                except ValueError as exc:  # checked at construction; here for a mutated list
                    problem = redact_urls(f"ServerConfig.{kind}s {exc}.")
                else:
                    problem = ""
                if problem:
                    raise ConfigurationError(problem)
                add(
                    name,
                    ModelSpec(
                        model,
                        # "auto" (RAG_RERANK_*_BACKEND, as for the adapters): the pick for this
                        # CPU kind, device, dtype and model, made per model here.
                        backend=choose_backend(kind, (), self.device, self.dtype, model)
                        if is_auto(backend)
                        else backend,
                        device=self.device,
                        dtype=self.dtype,
                        max_length=self.max_length,
                    ),
                )
        for entry in self.specs:
            if not isinstance(entry, dict) or "model" not in entry:
                raise ConfigurationError(
                    "Each spec needs at least a 'model' (and usually 'backend'), got "
                    f"{redact_urls(repr(entry))}."
                )
            given, entry = entry, dict(entry)
            name = entry.pop("name", entry["model"])
            if not isinstance(name, str) or not name.strip():
                raise ConfigurationError(
                    f"The spec {redact_urls(repr(given))} has the name {name!r}: give it a "
                    "non-empty string name (what clients send as 'model'), or leave 'name' out "
                    "to use the model."
                )
            name = name.strip()
            entry.setdefault("device", self.device)
            entry.setdefault("dtype", self.dtype)
            try:
                spec = ModelSpec(**entry)
            except TypeError as exc:
                shown = redact_urls(f"{entry!r}: {exc}")
                raise ConfigurationError(f"Invalid spec {shown}") from None
            add(name, spec)
        if not served:
            raise ConfigurationError(
                "No model to serve. Pass --reranker MODEL and/or --embedder MODEL (or set "
                "RAG_RERANK_RERANKERS / RAG_RERANK_EMBEDDERS)."
            )
        return served

    def check_semantic_cache_models(self) -> None:
        """Raise :class:`ConfigurationError` unless the served models the semantic cache uses
        exist. ``rag-rerank serve`` and :func:`~.app.create_app` check this before anything
        starts: the cache is built on its first request, and a server that turns ready and then
        answers every cache request with a 500 hides the mistake until traffic comes."""
        if not self.semantic_cache:
            return
        served = self.served_models()
        names = ", ".join(f"{m.name} ({m.kind})" for m in served) or "nothing"
        wanted = self.semantic_cache_embedder
        embedders = [m for m in served if m.kind == "embedder"]
        if wanted and not any(wanted in (m.name, m.spec.model) for m in embedders):
            raise ConfigurationError(
                f"--semantic-cache-embedder {wanted!r} is not a served embedder; this server "
                f"serves: {names}. Name one of its embedders, or serve it with --embedder "
                f"{wanted}=MODEL."
            )
        rerankers = [m for m in served if m.kind == "reranker"]
        if self.semantic_cache_guard == "rerank" and len(rerankers) != 1:
            raise ConfigurationError(
                "--semantic-cache-guard rerank needs exactly one served reranker; this server "
                f"serves: {names}. Serve one with --reranker NAME=MODEL, or pick another guard."
            )


#: The sections ``rag-rerank serve`` takes options for (None: every field of the section): the
#: server's own, torch's threads, and the served pool's engine and memory settings.
SERVE_SECTIONS: tuple[tuple[type[ConfigModel], tuple[str, ...] | None], ...] = (
    (ServerConfig, None),
    (AdapterConfig, ("torch_threads",)),
    (EngineConfig, None),
    (PoolConfig, None),
)
