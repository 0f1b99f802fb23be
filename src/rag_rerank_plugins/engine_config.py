"""`EngineConfig`: how a pool schedules, batches, bounds and caches work for its models.

Defaults are chosen for correctness under load first: a bounded queue (memory cannot grow without
limit), no added latency (``max_wait_ms`` 0: requests that arrive while the device runs a pass are
merged into the next passes anyway, so waiting only delays a lone request), the prepare/forward
pipeline on (tokenising never stalls the device), the score cache off (scores of changing
documents must never be stale unless asked for) and a small query-embedding cache on.

Every field can be set with a ``RAG_RERANK_<FIELD>`` environment variable (upper case);
:meth:`EngineConfig.from_env` is the one parser of them (``rag_rerank_plugins.settings.Settings``
uses it for its ``engine`` field).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, fields, replace
from typing import Any

from .exceptions import ConfigurationError

__all__ = ["EngineConfig"]

_ENV_PREFIX = "RAG_RERANK_"


@dataclass(frozen=True)
class EngineConfig:
    #: Most items (pairs or texts) in one forward pass.
    max_batch_size: int = 64
    #: Most padded tokens (items x longest item) in one forward pass; None = 4096 on CPU (where
    #: big batches only cost cache misses; measured best there), 16384 on GPUs.
    token_budget: int | None = None
    #: How long an idle worker waits for more requests to merge into its first pass (None: 0).
    max_wait_ms: float | None = None
    #: Tokenise the next micro-batches on a prepare thread while the device runs the current one
    #: (False: the device worker prepares each batch itself, in sequence).
    pipeline: bool = True
    #: Bulk requests (``priority="bulk"``) that have waited this long are served like
    #: interactive ones, so a steady stream of interactive traffic never starves them.
    bulk_aging_ms: float = 2000.0
    #: Requests waiting per model before new ones are refused with QueueFullError.
    max_queue: int = 1024
    #: With a full queue, wait this long for room instead of failing at once (None: fail at once).
    queue_timeout_s: float | None = None
    #: Default caller timeout for one request (None: wait as long as it takes).
    request_timeout_s: float | None = None
    #: (query, passage) -> score cache entries per model; 0 disables it.
    score_cache_size: int = 0
    score_cache_ttl_s: float = 600.0
    #: Query-embedding cache entries per model; 0 disables it.
    query_cache_size: int = 1024
    query_cache_ttl_s: float = 600.0
    #: Latency/queue-wait samples kept per model for p50/p95.
    metrics_window: int = 2048

    def __post_init__(self) -> None:
        positive = ("max_batch_size", "token_budget", "max_queue", "metrics_window")
        for name in positive:
            value = getattr(self, name)
            if value is None and name == "token_budget":
                continue
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ConfigurationError(
                    f"EngineConfig.{name} must be a positive int, got {value!r}"
                )
        for name in ("score_cache_size", "query_cache_size"):
            if getattr(self, name) < 0:
                raise ConfigurationError(f"EngineConfig.{name} must be >= 0")
        for name in ("max_wait_ms", "queue_timeout_s", "request_timeout_s", "bulk_aging_ms"):
            value = getattr(self, name)
            if value is not None and value < 0:
                raise ConfigurationError(f"EngineConfig.{name} must be >= 0 or None")

    def tokens_per_batch(self, device: str) -> int:
        if self.token_budget is not None:
            return self.token_budget
        return 4096 if device == "cpu" else 16384

    def wait_seconds(self, device: str) -> float:
        if self.max_wait_ms is not None:
            return self.max_wait_ms / 1000
        return 0.0

    def with_changes(self, **changes: Any) -> EngineConfig:
        return replace(self, **changes)

    @classmethod
    def from_env(cls, environ: dict[str, str] | None = None) -> EngineConfig:
        """Defaults overridden by ``RAG_RERANK_*`` variables (e.g. RAG_RERANK_TOKEN_BUDGET=4096)."""
        env = os.environ if environ is None else environ
        values: dict[str, Any] = {}
        for f in fields(cls):
            raw = env.get(_ENV_PREFIX + f.name.upper())
            if raw is None or raw == "":
                continue
            if "bool" in str(f.type):
                values[f.name] = _parse_bool(f.name, raw)
                continue
            try:
                if raw.lower() == "none":
                    values[f.name] = None
                elif "float" in str(f.type):
                    values[f.name] = float(raw)
                else:
                    values[f.name] = int(raw)
            except ValueError:
                raise ConfigurationError(
                    f"{_ENV_PREFIX}{f.name.upper()}={raw!r} is not a number"
                ) from None
        return cls(**values)


def _parse_bool(name: str, raw: str) -> bool:
    value = raw.strip().lower()
    if value in ("1", "true", "yes", "on"):
        return True
    if value in ("0", "false", "no", "off"):
        return False
    raise ConfigurationError(
        f"{_ENV_PREFIX}{name.upper()}={raw!r} is not a boolean (1/0, true/false)"
    )
