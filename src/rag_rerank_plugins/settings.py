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
``python -m rag_rerank_plugins.settings`` prints the table of ``docs/configuration.md``.
"""

from __future__ import annotations

from functools import lru_cache
from typing import Any, ClassVar

from pydantic import BaseModel, Field
from pydantic.fields import FieldInfo
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict

from ._config import ENV_PREFIX, AdapterConfig, env_values, flag_text, format_default
from .engine_config import EngineConfig, PoolConfig
from .server.config import SERVE_SECTIONS, ServerConfig

__all__ = ["ENV_PREFIX", "SECTIONS", "Settings", "config_table", "get_settings", "serve_flags"]


class _SectionsSource(PydanticBaseSettingsSource):
    """Reads ``RAG_RERANK_*`` for the root's own fields and builds each nested section from its
    own variables (``from_env``), so errors name the variable to fix."""

    def get_field_value(self, field: FieldInfo, field_name: str) -> tuple[Any, str, bool]:
        return None, field_name, False  # unused: __call__ builds the whole dict

    def __call__(self) -> dict[str, Any]:
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
    Variables that name no setting (``RAG_RERANK_CPU_BF16``, ...) are ignored here.
    """

    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX,
        extra="ignore",
        frozen=True,
        env_ignore_empty=True,
        protected_namespaces=(),
    )
    cli_group: ClassVar[str] = "adapters"

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
