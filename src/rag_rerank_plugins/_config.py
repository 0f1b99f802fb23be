"""The one configuration machinery: base model of every settings section, and the one parser of
``RAG_RERANK_*`` text (environment variables and ``rag-rerank serve`` flags alike).

Every section (:class:`AdapterConfig` here, :class:`~rag_rerank_plugins.engine_config.EngineConfig`
and :class:`~rag_rerank_plugins.engine_config.PoolConfig`,
:class:`~rag_rerank_plugins.server.config.ServerConfig`) is a frozen pydantic model derived from
:class:`ConfigModel`. A field's name, type, default and ``description`` are all there is to know
about a setting: its variable is ``<section env_prefix><FIELD>``, its ``rag-rerank serve`` flag is
that variable without ``RAG_RERANK_`` in lower case with dashes (unless a :class:`Cli` marker says
otherwise), and the docs table (``docs/configuration.md``) is generated from the same fields by
:func:`rag_rerank_plugins.settings.config_table`; ``tests/test_config.py`` fails when any of them
disagree.

Only pydantic is imported here (the package needs it anyway); pydantic-settings is imported by
:mod:`rag_rerank_plugins.settings`, whose :class:`~rag_rerank_plugins.settings.Settings` nests
the sections and reads them through :func:`env_values`, so a section's ``from_env()`` and
``Settings()`` always agree without ``import rag_rerank_plugins`` paying for pydantic-settings.
"""

from __future__ import annotations

import difflib
import json
import math
import os
import types
from collections.abc import Callable, Iterable, Mapping
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Annotated, Any, ClassVar, Literal, Union, get_args, get_origin

from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator
from pydantic.fields import FieldInfo
from typing_extensions import Self

from ._environ_checks import check_environ
from .exceptions import ConfigurationError
from .spec import (
    DEFAULT_EMBEDDER,
    DEFAULT_RERANKER,
    _normalize_device,
    _normalize_dtype,
    redact_urls,
)

__all__ = [
    "ENV_PREFIX",
    "AdapterConfig",
    "Cli",
    "ConfigModel",
    "ModelDefaults",
    "TextParser",
    "format_default",
]

ENV_PREFIX = "RAG_RERANK_"
#: More torch threads than any host has cores is a typo; past 2**31 torch itself fails to parse it.
MAX_TORCH_THREADS = 4096


@dataclass(frozen=True)
class Cli:
    """Field marker (``Annotated[..., Cli(...)]``): how a setting appears as a ``rag-rerank
    serve`` option where the naming rule (variable without ``RAG_RERANK_``, dashed) does not fit.

    ``repeat``: a list given one item per flag (``--reranker a --reranker b``).
    ``secret_file``: the flag names a file holding the value (a secret never sits in ``ps``);
    the section reads the file its ``<VARIABLE>_FILE`` names the same way
    (:meth:`rag_rerank_plugins.server.config.ServerConfig.from_sources`).
    ``group``: the ``--help`` section (default: the model's ``cli_group``).
    """

    flag: str | None = None
    aliases: tuple[str, ...] = ()
    metavar: str | None = None
    repeat: bool = False
    secret_file: bool = False
    group: str | None = None


@dataclass(frozen=True)
class TextParser:
    """Field marker: how the text of a variable or flag becomes the field's value, where the
    type alone does not say (comma lists, JSON, ``cpu=2000,cuda:0=6000``). Raises ValueError."""

    parse: Callable[[str], Any]


def split_list(text: str) -> list[str]:
    """``a, b`` or one item per line -> ``["a", "b"]`` (empty items dropped)."""
    return [item.strip() for item in text.replace("\n", ",").split(",") if item.strip()]


def json_list(text: str) -> list[Any]:
    """A JSON list, or one JSON value taken as a list of one."""
    try:
        parsed = json.loads(text)
    except ValueError as exc:
        raise ValueError(f"is not JSON ({exc}); expected a JSON list, or one JSON value") from None
    return parsed if isinstance(parsed, list) else [parsed]


def _marker(info: FieldInfo, kind: type[Any]) -> Any:
    return next((item for item in info.metadata if isinstance(item, kind)), None)


def cli_of(info: FieldInfo) -> Cli:
    """The field's :class:`Cli` marker, or the default one."""
    found = _marker(info, Cli)
    return found if found is not None else Cli()


def flag_for(cls: type[BaseModel], name: str) -> str:
    """The CLI flag of field ``name``: its :class:`Cli` marker's, else the field's variable
    without ``RAG_RERANK_``, lower case, dashed (``RAG_RERANK_POOL_IDLE_UNLOAD_S`` ->
    ``--pool-idle-unload-s``), so a flag and its variable never need to be looked up."""
    flag = cli_of(cls.model_fields[name]).flag
    if flag is not None:
        return flag
    var = getattr(cls, "env_prefix", ENV_PREFIX) + name.upper()
    return "--" + var.removeprefix(ENV_PREFIX).lower().replace("_", "-")


def flag_text(cls: type[BaseModel], name: str) -> str:
    """The flag as the docs table shows it: with ``--no-`` for booleans and any aliases."""
    flag = flag_for(cls, name)
    info = cls.model_fields[name]
    text = f"{flag} / --no-{flag[2:]}" if info.annotation is bool else flag
    return " / ".join((text, *cli_of(info).aliases))


def _is_optional(annotation: Any) -> bool:
    return get_origin(annotation) in (Union, types.UnionType) and type(None) in get_args(annotation)


def parse_text(info: FieldInfo, text: str) -> Any:
    """The one parser of setting text (``RAG_RERANK_*`` values and CLI flags): ``none`` is None
    for optional fields, a :class:`TextParser` marker parses the rest, Literal values are
    case-insensitive, and everything else is left to pydantic's own conversion (``"8"`` -> 8,
    ``"yes"`` -> True) when the model is validated. Raises ValueError with what was expected."""
    annotation = info.annotation
    if _is_optional(annotation) and text.strip().lower() == "none":
        return None
    parser = _marker(info, TextParser)
    if parser is not None:
        return parser.parse(text)
    if get_origin(annotation) is Literal:
        return text.strip().lower()
    if get_origin(annotation) is list:
        return split_list(text)
    return text.strip()


def env_values(
    cls: type[BaseModel],
    environ: Mapping[str, str] | None = None,
    skip: Iterable[str] = (),
) -> dict[str, Any]:
    """The values of ``cls``'s fields found in ``environ`` (default ``os.environ``): each field
    ``name`` is read from ``cls.env_prefix + NAME``; empty or blank variables count as unset
    (``VAR=`` or ``VAR=" "`` in a compose file: a blank device or model name is never meant),
    except a blank secret (the API key), which is refused where it is checked.
    Fields that are themselves sections are left out (they read their own variables), and so
    are those in ``skip`` (given by a flag or argument, which wins: their variable is not
    read, so a bad one cannot fail a setting the flag overrides)."""
    env = os.environ if environ is None else environ
    prefix: str = getattr(cls, "env_prefix", ENV_PREFIX)
    skipped = set(skip)
    values: dict[str, Any] = {}
    for name, info in cls.model_fields.items():
        if _is_section(info) or name in skipped:
            continue
        var = prefix + name.upper()
        raw = env.get(var)
        if raw is None or raw == "" or (not raw.strip() and not cli_of(info).secret_file):
            # A secret given as blanks (a template that rendered whitespace) is kept, to be
            # refused where it is checked: read as unset, an API key would leave a server open.
            continue
        try:
            values[name] = parse_text(info, raw)
        except ValueError as exc:
            # The value is echoed to say what was wrong, but never a URL's password.
            raise ConfigurationError(redact_urls(f"{var}={raw!r} {exc}")) from None
    return values


def _is_nan(value: Any) -> bool:
    """True for a float nan and for text that pydantic would read as one (``"NaN"``)."""
    if isinstance(value, str):
        return value.strip().lower().lstrip("+-") == "nan"
    return isinstance(value, float) and math.isnan(value)


def _is_section(info: FieldInfo) -> bool:
    annotation = info.annotation
    return isinstance(annotation, type) and issubclass(annotation, BaseModel)


def format_default(value: Any) -> str:
    """A default as ``--help`` and the docs table show it (the text a variable would hold)."""
    if value is None:
        return "none"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, (list, tuple, dict)) and not value:
        return "empty"
    return str(value)


def _explain_error(error: Mapping[str, Any]) -> str:
    """pydantic's error -> 'must be ...' in this package's words."""
    kind = error["type"]
    ctx = error.get("ctx") or {}
    if kind == "greater_than":
        return "must be positive" if ctx.get("gt") == 0 else f"must be > {ctx.get('gt')}"
    if kind == "greater_than_equal":
        return f"must be at least {ctx.get('ge')}"
    if kind == "less_than_equal":
        return f"must be at most {ctx.get('le')}"
    if kind in ("bool_parsing", "bool_type"):
        return "must be true or false (a boolean: 1/0, yes/no, on/off)"
    if kind in ("int_parsing", "int_type", "int_from_float"):
        return "must be a whole number"
    if kind in ("float_parsing", "float_type"):
        return "must be a number"
    if kind == "extra_forbidden":
        return "is not a setting"
    message = str(error["msg"])
    for prefix in ("Value error, ", "Input "):
        message = message.removeprefix(prefix)
    return message


#: Where the values being validated came from (field -> "RAG_RERANK_X='...'" or "--flag"), set
#: by :meth:`ConfigModel.from_sources` so errors name the variable or flag to fix.
_SOURCES: ContextVar[Mapping[str, str] | None] = ContextVar("_SOURCES", default=None)


class ConfigModel(BaseModel):
    """Base of every settings section: frozen, unknown names refused, and every invalid value a
    :class:`~rag_rerank_plugins.exceptions.ConfigurationError` that names the setting (and the
    variable or flag it came from)."""

    model_config = ConfigDict(frozen=True, extra="forbid", protected_namespaces=())

    #: Variables of this section are ``env_prefix + FIELD`` (upper case).
    env_prefix: ClassVar[str] = ENV_PREFIX
    #: Heading of this section's options in ``rag-rerank serve --help`` and in the docs table.
    cli_group: ClassVar[str] = "settings"

    def __init__(self, **data: Any) -> None:
        try:
            super().__init__(**data)
        except ValidationError as exc:
            message = self._describe(exc, _SOURCES.get() or {})
        else:
            return
        # Raised outside the handler: pydantic's error, kept as __context__ even "from None",
        # quotes the input whole, a URL's password included (error trackers walk the chain).
        raise ConfigurationError(redact_urls(message))

    @field_validator("*", mode="before")
    @classmethod
    def _no_bool_for_numbers(cls, value: Any, info: ValidationInfo) -> Any:
        # pydantic takes True for 1; a flag or variable meant as a number never is a boolean.
        annotation = cls.model_fields[str(info.field_name)].annotation
        kinds = (annotation, *get_args(annotation))
        if int not in kinds and float not in kinds:
            return value
        if isinstance(value, bool) and bool not in kinds:
            raise ValueError("must be a number, not a boolean")
        # nan compares false with every bound: pydantic called it "must be at most 60000".
        if _is_nan(value):
            raise ValueError("must be a number, not nan")
        return value

    @classmethod
    def _describe(cls, exc: ValidationError, sources: Mapping[str, str]) -> str:
        parts = []
        for error in exc.errors():
            name = str(error["loc"][0]) if error["loc"] else ""
            nested = (error.get("ctx") or {}).get("error")
            if isinstance(nested, ConfigurationError):  # a section's own, complete message
                parts.append(f"{cls.__name__}.{name}: {str(nested).rstrip('.')}")
                continue
            where = (
                f" (from {sources[name]})" if name in sources else f", got {error.get('input')!r}"
            )
            hint = ""
            if error["type"] == "extra_forbidden":
                close = difflib.get_close_matches(name, list(cls.model_fields), n=1)
                hint = f" (did you mean {close[0]!r}?)" if close else ""
            parts.append(f"{cls.__name__}.{name} {_explain_error(error)}{hint}{where}")
        return "; ".join(parts) + "."

    @classmethod
    def env_names(cls) -> dict[str, str]:
        """Field name -> environment variable."""
        return {name: cls.env_prefix + name.upper() for name in cls.model_fields}

    @classmethod
    def from_sources(
        cls,
        environ: Mapping[str, str] | None = None,
        given: Mapping[str, Any] | None = None,
        *,
        given_by: Callable[[str], str] | None = None,
    ) -> Self:
        """Defaults, then ``RAG_RERANK_*`` variables of ``environ`` (default ``os.environ``),
        then ``given`` (flags or arguments: they win, None included). ``given_by(name)`` says
        where a given value came from, for error messages."""
        env = os.environ if environ is None else environ
        values = env_values(cls, env, skip=given or ())
        sources = {
            name: f"{var}={env[var]!r}" for name, var in cls.env_names().items() if name in values
        }
        for name, value in (given or {}).items():
            values[name] = value
            sources[name] = given_by(name) if given_by is not None else f"argument {name}"
        token = _SOURCES.set(sources)
        try:
            return cls(**values)
        finally:
            _SOURCES.reset(token)

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None, **overrides: Any) -> Self:
        """Defaults overridden by ``RAG_RERANK_*`` variables, then by ``overrides`` that are not
        None (e.g. ``EngineConfig.from_env(max_queue=8)``). Reading ``os.environ`` warns of
        misspelt ``RAG_RERANK_*`` variables (:mod:`._environ_checks`), as ``get_settings()``
        does."""
        if environ is None:
            check_environ(os.environ)
        return cls.from_sources(
            environ, {name: value for name, value in overrides.items() if value is not None}
        )

    def with_changes(self, **changes: Any) -> Self:
        """A copy with ``changes`` applied and validated like the constructor's arguments."""
        values = {name: getattr(self, name) for name in type(self).model_fields}
        return type(self)(**{**values, **changes})


class ModelDefaults(ConfigModel):
    """Which backends, device, dtype and batch size models are loaded with: the same variables
    set them for in-process adapters and for ``rag-rerank serve``."""

    reranker_backend: Annotated[str, Cli(group="models")] = Field(
        default="cross-encoder", description="Backend of rerankers named without one."
    )
    embedder_backend: Annotated[str, Cli(group="models")] = Field(
        default="sentence-transformers", description="Backend of embedders named without one."
    )
    device: Annotated[str, Cli(group="models")] = Field(
        default="auto", description="auto, cpu, cuda, cuda:N or mps."
    )
    dtype: Annotated[str, Cli(group="models")] = Field(
        default="auto", description="auto, float32, float16 or bfloat16."
    )
    batch_size: Annotated[int, Cli(group="models")] = Field(
        default=32, gt=0, description="Pairs or texts per forward pass."
    )

    @field_validator("reranker_backend", "embedder_backend")
    @classmethod
    def _backend_not_blank(cls, value: str) -> str:
        """A blank variable is unset, but a blank flag or argument reached the spec, whose
        error ("ModelSpec.backend must be a backend name, got ''") named neither."""
        if not value.strip():
            raise ValueError(
                "must be a backend name (e.g. cross-encoder), not blank; leave it out for the "
                "default"
            )
        return value

    @field_validator("device", "dtype")
    @classmethod
    def _known_device_or_dtype(cls, value: str, info: ValidationInfo) -> str:
        """Checked as a spec checks it, but here, so that the error names the variable or flag
        (``RAG_RERANK_DEVICE=tpu`` failed only at the first model, without saying where from).
        The text is kept: specs normalise it (``cuda`` -> ``cuda:0``)."""
        try:
            if info.field_name == "device":
                _normalize_device(value)
            else:
                _normalize_dtype(value)
        except ConfigurationError:
            allowed = (
                "auto, cpu, cuda, cuda:N or mps"
                if info.field_name == "device"
                else "auto, float32, float16 or bfloat16 (or fp32, fp16, half, bf16)"
            )
            raise ValueError(f"must be {allowed}") from None
        return value


class AdapterConfig(ModelDefaults):
    """Defaults of the LangChain and LlamaIndex adapters (arguments given to an adapter win)."""

    cli_group: ClassVar[str] = "adapters"

    reranker_model: str = Field(
        default=DEFAULT_RERANKER, description="Reranker an adapter loads when given no model."
    )
    embedder_model: str = Field(
        default=DEFAULT_EMBEDDER, description="Embedder an adapter loads when given no model."
    )
    torch_threads: Annotated[int | None, Cli(aliases=("--threads",), group="models")] = Field(
        default=None,
        gt=0,
        le=MAX_TORCH_THREADS,
        description="torch intra-op threads, set at the first model load (1 is often faster on "
        "a small, busy machine), at most 4096; none: torch's own. The engine's CPU passes "
        "share it; unset, they share the usable physical cores, capped by `OMP_NUM_THREADS` "
        "when it is set (as torch and the stock libraries honour it: run N worker processes "
        "with `OMP_NUM_THREADS=cores/N`).",
    )
