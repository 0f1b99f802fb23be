"""The whole configuration as one pydantic-settings model, and the docs table generated from it.

:class:`Settings` is the root: the adapters' defaults (which reranker and embedder to load, on
which device and dtype, the batch size, torch threads) as its own fields, and the other sections
nested under it: ``engine`` (:class:`~rag_rerank_plugins.engine_config.EngineConfig`), ``pool``
(:class:`~rag_rerank_plugins.engine_config.PoolConfig`) and ``server``
(:class:`~rag_rerank_plugins.server.config.ServerConfig`). Every section reads its variables
(``RAG_RERANK_<FIELD>``, the pool's ``RAG_RERANK_POOL_<FIELD>``) with the one parser in
:mod:`rag_rerank_plugins._config`, so ``Settings().engine == EngineConfig.from_env()`` always.

This module imports pydantic-settings; ``import rag_rerank_plugins`` does not import it.
:func:`get_settings` reads the environment once per process and caches the result
(:func:`get_settings.cache_clear` makes the next call read it again).
A ``RAG_RERANK_*`` variable that nothing reads (a typo: ``RAG_RERANK_MAX_QUEU``) is reported
with a :class:`UserWarning` that suggests the closest name (:func:`unknown_variables`); a name
made by ``serve --help``'s ``RAG_RERANK_<FLAG>`` rule from a flag whose variable is another
(``--threads``: ``RAG_RERANK_TORCH_THREADS``) is told that variable, however little the two
names look alike.
``python -m rag_rerank_plugins.settings`` prints the table of ``docs/configuration.md``.
"""

from __future__ import annotations

import difflib
import os
import warnings
from collections.abc import Mapping
from functools import lru_cache
from typing import Any, ClassVar, cast

from pydantic import BaseModel, Field, ValidationInfo, field_validator
from pydantic.fields import FieldInfo
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict

from ._config import (
    _SOURCES,
    ENV_PREFIX,
    AdapterConfig,
    ConfigModel,
    env_values,
    flag_text,
    format_default,
)
from .engine_config import EngineConfig, PoolConfig
from .server.config import API_KEY_FILE_VAR, SERVE_SECTIONS, ServerConfig

__all__ = [
    "ENV_PREFIX",
    "OTHER_VARIABLES",
    "SECTIONS",
    "Settings",
    "config_table",
    "describe_unknown",
    "get_settings",
    "known_variables",
    "serve_flags",
    "unknown_variables",
    "warn_unknown_variables",
]


class _SectionsSource(PydanticBaseSettingsSource):
    """Reads ``RAG_RERANK_*`` for the root's own fields and builds each nested section from its
    own variables (``from_env``), so errors name the variable to fix."""

    def get_field_value(self, field: FieldInfo, field_name: str) -> tuple[Any, str, bool]:
        return None, field_name, False  # unused: __call__ builds the whole dict

    def __call__(self) -> dict[str, Any]:
        warn_unknown_variables()
        values = env_values(self.settings_cls)
        for name, info in self.settings_cls.model_fields.items():
            section = info.annotation
            if isinstance(section, type) and issubclass(section, (EngineConfig, PoolConfig)):
                values[name] = section.from_env()
            elif section is ServerConfig:
                # Not ServerConfig.from_env: a process that serves nothing is not an error here.
                values[name] = ServerConfig.from_sources()
        return values


class Settings(BaseSettings, AdapterConfig):
    """The process's configuration: adapter defaults, and the ``engine``, ``pool`` and
    ``server`` sections. Every field is ``RAG_RERANK_<FIELD>`` (the pool's
    ``RAG_RERANK_POOL_<FIELD>``); arguments given to an adapter or pool always win.
    Variables read elsewhere (``RAG_RERANK_CPU_BF16``, ...) are ignored here; a variable that
    nothing reads is warned about. A section given as a dict (``Settings(engine={"max_queue":
    8})``) overrides only the fields it names: the section's variables still set the others.
    A keyword that names no setting is an error (``Settings(batch_sise=8)``), as for the sections.
    """

    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX,
        extra="forbid",
        frozen=True,
        env_ignore_empty=True,
        protected_namespaces=(),
    )
    cli_group: ClassVar[str] = "adapters"

    def __init__(self, **values: Any) -> None:
        # Errors name the variable a bad value came from, as each section's do
        # ("(from RAG_RERANK_TORCH_THREADS='abc')", not "got 'abc'").
        env = os.environ
        sources = {
            name: f"{var}={env[var]!r}"
            for name, var in AdapterConfig.env_names().items()
            if name not in values and env.get(var, "").strip()
        }
        token = _SOURCES.set(sources)
        try:
            super().__init__(**values)
        finally:
            _SOURCES.reset(token)

    engine: EngineConfig = Field(
        default_factory=EngineConfig,
        description="Scheduling, queue and cache settings (RAG_RERANK_<ENGINECONFIG FIELD>).",
    )
    pool: PoolConfig = Field(
        default_factory=PoolConfig,
        description="Memory budget and idle unload of pools (RAG_RERANK_POOL_<POOLCONFIG FIELD>).",
    )
    server: ServerConfig = Field(
        default_factory=ServerConfig,
        description="What `rag-rerank serve` serves, and its limits (RAG_RERANK_<FIELD>).",
    )

    @field_validator("engine", "pool", "server", mode="before")
    @classmethod
    def _section_over_its_variables(cls, value: Any, info: ValidationInfo) -> Any:
        """A dict given for a section: its fields over the section's variables (a dict stood for
        the whole section before, so ``engine={"max_batch_size": 8}`` lost RAG_RERANK_MAX_QUEUE)."""
        if not isinstance(value, Mapping):
            return value
        field = str(info.field_name)
        section = cast("type[ConfigModel]", cls.model_fields[field].annotation)
        return section.from_sources(
            None, value, given_by=lambda name: f"Settings({field}={{{name!r}: ...}})"
        )

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        return init_settings, _SectionsSource(settings_cls)


#: The sections of the docs table, in its order: (model, the fields it owns there).
SECTIONS: tuple[type[BaseModel], ...] = (AdapterConfig, EngineConfig, PoolConfig, ServerConfig)


#: ``RAG_RERANK_*`` variables read where they are used, not through a settings model (the
#: "Other variables" of docs/configuration.md): known, so never reported as unknown.
OTHER_VARIABLES: tuple[str, ...] = (
    "RAG_RERANK_CPU_BF16",
    "RAG_RERANK_CPU_KIND",
    "RAG_RERANK_SHAPE_BUCKETS",
    "RAG_RERANK_ORT_THREADS",
    "RAG_RERANK_ONNX_CACHE",
    "RAG_RERANK_RELEASE_PROCESS_MEMORY",
    "RAG_RERANK_ONEDNN_FLUSH",
)


def known_variables() -> set[str]:
    """Every ``RAG_RERANK_*`` variable this package reads."""
    known = {*OTHER_VARIABLES, API_KEY_FILE_VAR}
    for section in SECTIONS:
        known.update(section.env_names().values())  # type: ignore[attr-defined]
    return known


def _flag_named_variables() -> dict[str, tuple[str, str, bool]]:
    """``RAG_RERANK_<FLAG>`` names that ``serve --help``'s rule suggests but that are no
    variable -> (the flag, the variable it has, whether the flag is a ``--no-`` one).

    ``--reranker`` is ``RAG_RERANK_RERANKERS``, ``--threads`` is ``RAG_RERANK_TORCH_THREADS``,
    ``--no-warmup`` is ``RAG_RERANK_WARMUP=false``: an operator who made a name from
    ``--threads`` by that rule is told the right one, where difflib's cutoff found none and
    said nothing. (The names are derived, never written here: every ``RAG_RERANK_*`` name in
    the source must be a variable the package reads.)"""
    known = known_variables()
    found: dict[str, tuple[str, str, bool]] = {}
    for section, only in SERVE_SECTIONS:
        prefix: str = getattr(section, "env_prefix", ENV_PREFIX)
        for name in only if only is not None else section.model_fields:
            var = prefix + name.upper()
            for flag in flag_text(section, name).split(" / "):
                derived = ENV_PREFIX + flag.removeprefix("--").upper().replace("-", "_")
                if derived not in known:
                    found.setdefault(derived, (flag, var, flag.startswith("--no-")))
    return found


def unknown_variables(environ: Mapping[str, str] | None = None) -> dict[str, str | None]:
    """``RAG_RERANK_*`` variables of ``environ`` (default ``os.environ``) that nothing reads ->
    the variable meant: that of the ``rag-rerank serve`` flag the name was made from
    (``--threads`` -> ``RAG_RERANK_TORCH_THREADS``), else the closest known name (a
    likely typo), else None. Empty ones are left out (they are unset)."""
    env = os.environ if environ is None else environ
    known = known_variables()
    from_flags = _flag_named_variables()
    # Compared without the shared prefix, which would make every name look alike.
    names = sorted(var.removeprefix(ENV_PREFIX) for var in known)
    found: dict[str, str | None] = {}
    for var in sorted(env):
        if var.startswith(ENV_PREFIX) and var not in known and env[var].strip():
            if var.upper() in from_flags:
                found[var] = from_flags[var.upper()][1]
                continue
            name = var.removeprefix(ENV_PREFIX).upper()
            close = difflib.get_close_matches(name, names, n=1, cutoff=0.75)
            found[var] = ENV_PREFIX + close[0] if close else None
    return found


def describe_unknown(var: str, suggestion: str | None) -> str:
    """One unknown variable in words, with what to set instead."""
    flag = _flag_named_variables().get(var.upper())
    if flag is not None and flag[1] == suggestion:
        option, real, negated = flag
        value = " (set it to false)" if negated else ""
        return f"{var} is not a setting and is ignored: the variable of {option} is {real}{value}."
    if suggestion is not None:
        return f"{var} is not a setting and is ignored: did you mean {suggestion}?"
    return (
        f"{var} is not a setting and is ignored (every setting: docs/configuration.md, or "
        "`python -m rag_rerank_plugins.settings`)."
    )


def warn_unknown_variables(environ: Mapping[str, str] | None = None) -> None:
    """A :class:`UserWarning` per ``RAG_RERANK_*`` variable that nothing reads but is close to
    a setting's name, or made from a serve flag whose variable is another: a typo in a
    deployment otherwise silently leaves the setting at its default. Names close to none (a
    tool's own variable under our prefix, a user's ``api_key_env`` variable) are not warned
    about; ``rag-rerank info`` lists them all."""
    for var, suggestion in unknown_variables(environ).items():
        if suggestion is not None:
            warnings.warn(describe_unknown(var, suggestion), UserWarning, stacklevel=2)


def serve_flags() -> dict[str, str]:
    """Variable -> its ``rag-rerank serve`` flag, for every setting serve has an option for."""
    flags: dict[str, str] = {}
    for section, only in SERVE_SECTIONS:
        prefix: str = getattr(section, "env_prefix", ENV_PREFIX)
        for name in only if only is not None else section.model_fields:
            flags[prefix + name.upper()] = flag_text(section, name)
    return flags


def config_rows() -> list[dict[str, str]]:
    """One row per variable: variable, serve flag, default, sections using it, description.
    A variable shared by several sections (``RAG_RERANK_DEVICE``) is one row."""
    rows: dict[str, dict[str, str]] = {}
    flags = serve_flags()
    for section in SECTIONS:
        prefix: str = getattr(section, "env_prefix", ENV_PREFIX)
        group: str = getattr(section, "cli_group", "")
        for name, info in section.model_fields.items():
            var = prefix + name.upper()
            if var in rows:
                rows[var]["used by"] += f", {group}"
                continue
            rows[var] = {
                "variable": var,
                "serve flag": flags.get(var, "-"),
                "default": format_default(info.get_default(call_default_factory=True)),
                "used by": group,
                "description": info.description or "",
            }
    return list(rows.values())


def config_table() -> str:
    """The Markdown table of every setting (``docs/configuration.md`` holds it verbatim)."""

    def cell(text: str, code: bool) -> str:
        text = text.replace("|", "\\|")
        return f"`{text}`" if code and text != "-" else text

    lines = [
        "| variable | `rag-rerank serve` flag | default | used by | description |",
        "|---|---|---|---|---|",
    ]
    for row in config_rows():
        lines.append(
            "| "
            + " | ".join(
                (
                    cell(row["variable"], True),
                    cell(row["serve flag"], True),
                    cell(row["default"], True),
                    cell(row["used by"], False),
                    cell(row["description"], False),
                )
            )
            + " |"
        )
    return "\n".join(lines) + "\n"


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    """The process's :class:`Settings`, read from the environment on first use and cached."""
    return Settings()


if __name__ == "__main__":
    print(config_table(), end="")
