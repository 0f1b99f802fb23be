"""Process-wide defaults from ``RAG_RERANK_*`` environment variables (pydantic-settings).

:class:`Settings` holds the defaults adapters and pools start from: which reranker and embedder
to load, on which device and dtype, the batch size, torch threads, and the pool's
:class:`~rag_rerank_plugins.engine_config.EngineConfig` (queues, caches, batching). The engine
fields are read by :meth:`EngineConfig.from_env`, the one parser of those variables, so
``Settings().engine`` and ``EngineConfig.from_env()`` always agree (``Settings().pool`` and
``PoolConfig.from_env()`` likewise).

This module imports pydantic-settings; ``import rag_rerank_plugins`` does not import it.
:func:`get_settings` reads the environment once per process and caches the result
(:func:`get_settings.cache_clear` makes the next call read it again).
"""

from __future__ import annotations

import os
from functools import lru_cache

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

from .engine_config import EngineConfig, PoolConfig
from .spec import DEFAULT_EMBEDDER, DEFAULT_RERANKER

__all__ = ["ENV_PREFIX", "Settings", "get_settings"]

ENV_PREFIX = "RAG_RERANK_"


def _engine_from_env() -> EngineConfig:
    return EngineConfig.from_env(dict(os.environ))


def _pool_from_env() -> PoolConfig:
    return PoolConfig.from_env(dict(os.environ))


class Settings(BaseSettings):
    """Defaults for adapters and pools; every field is ``RAG_RERANK_<FIELD>`` (upper case).

    Arguments given to an adapter always win over these defaults. Other ``RAG_RERANK_*``
    variables (the server's, the engine's) are ignored here, not rejected.
    """

    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX,
        extra="ignore",
        frozen=True,
        env_ignore_empty=True,
        protected_namespaces=(),
    )

    reranker_model: str = Field(default=DEFAULT_RERANKER, description="Default reranker model.")
    reranker_backend: str = Field(default="cross-encoder", description="Default reranker backend.")
    embedder_model: str = Field(default=DEFAULT_EMBEDDER, description="Default embedder model.")
    embedder_backend: str = Field(
        default="sentence-transformers", description="Default embedder backend."
    )
    device: str = Field(default="auto", description="'auto', 'cpu', 'cuda', 'cuda:N' or 'mps'.")
    dtype: str = Field(default="auto", description="'auto', 'float32', 'float16' or 'bfloat16'.")
    batch_size: int = Field(default=32, gt=0, description="Pairs or texts per forward pass.")
    torch_threads: int | None = Field(
        default=None, gt=0, description="torch intra-op threads, set at the first model load."
    )
    engine: EngineConfig = Field(
        default_factory=_engine_from_env,
        description="Scheduling, queue and cache settings (RAG_RERANK_<ENGINECONFIG FIELD>).",
    )
    pool: PoolConfig = Field(
        default_factory=_pool_from_env,
        description="Memory budget and idle unload of pools (RAG_RERANK_POOL_<POOLCONFIG FIELD>).",
    )


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    """The process's :class:`Settings`, read from the environment on first use and cached."""
    return Settings()
