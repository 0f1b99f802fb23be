"""`EngineConfig`: how a pool schedules, batches, bounds and caches work for its models;
`PoolConfig`: how much memory the pool's models may take on each device.

Defaults are chosen for correctness under load first: a bounded queue (memory cannot grow without
limit), no added latency (``max_wait_ms`` 0: requests that arrive while the device runs a pass are
merged into the next passes anyway, so waiting only delays a lone request), the prepare/forward
pipeline on (tokenising never stalls the device), the score cache off (scores of changing
documents must never be stale unless asked for) and a small query-embedding cache on.

Every field can be set with a ``RAG_RERANK_<FIELD>`` environment variable (upper case);
:meth:`EngineConfig.from_env` is the one parser of them (``rag_rerank_plugins.settings.Settings``
uses it for its ``engine`` field). :meth:`PoolConfig.from_env` reads the pool's memory settings
from ``RAG_RERANK_POOL_<FIELD>`` with the same rules.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, fields, replace
from typing import Any, Literal

from .exceptions import ConfigurationError

__all__ = ["EngineConfig", "PoolConfig"]

_ENV_PREFIX = "RAG_RERANK_"


@dataclass(frozen=True)
class EngineConfig:
    #: Most items (pairs or texts) in one forward pass.
    max_batch_size: int = 64
    #: Most padded tokens (items x longest item) in one forward pass; None = 1024 on CPU (small
    #: passes pad less and spread over the CPU device workers; 1 x 50 mixed passages on a 2-core
    #: EPYC: 1024 -> 445 ms, 2048 -> 538 ms, 4096 -> 623 ms with 2 workers), 16384 on GPUs.
    token_budget: int | None = None
    #: How long an idle worker waits for more requests to merge into its first pass (None: 0).
    max_wait_ms: float | None = None
    #: Tokenise the next micro-batches on a prepare thread while the device runs the current one
    #: (False: the device worker prepares each batch itself, in sequence).
    pipeline: bool = True
    #: Threads that prepare (tokenise, collate) micro-batches for one model, for backends whose
    #: ``prepare`` may run concurrently (TEI's pool of tokenisation workers). Worth raising (2-4)
    #: for a small model on a GPU host with idle cores, where tokenising, not the GPU, is the
    #: limit. Not by default: the Python half of tokenising holds the GIL, and on a busy 2-core
    #: box a second thread lost 10-20 % pairs/s (benchmarks/simulated.py).
    prepare_workers: int = 1
    #: Device workers for a model on the CPU whose backend may run passes in parallel (the
    #: sentence-transformers backends): each runs whole passes with usable cores / workers torch
    #: threads. Several single-threaded passes beat one pass spread over every core, whose small
    #: matmuls wait on each other (2-core EPYC, MiniLM-L6 BF16, 1 x 50 mixed passages: 445 ms
    #: vs 785 ms). None: the usable physical cores (affinity and cgroup quota), at most 8.
    cpu_workers: int | None = None
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
        for name in (*positive, "prepare_workers", "cpu_workers"):
            value = getattr(self, name)
            if value is None and name in ("token_budget", "cpu_workers"):
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
        return 1024 if device == "cpu" else 16384

    def cpu_device_workers(self) -> tuple[int, int]:
        """(device workers, torch threads each) for a CPU model that allows parallel passes.

        The threads to share are the usable physical cores, or ``RAG_RERANK_TORCH_THREADS``
        when set (the process's torch thread budget)."""
        from ._cpu import usable_cores

        env = os.environ.get("RAG_RERANK_TORCH_THREADS", "").strip()
        total = int(env) if env.isdigit() and int(env) > 0 else usable_cores()
        workers = self.cpu_workers if self.cpu_workers is not None else min(total, 8)
        return workers, max(1, total // workers)

    def wait_seconds(self, device: str) -> float:
        if self.max_wait_ms is not None:
            return self.max_wait_ms / 1000
        return 0.0

    def with_changes(self, **changes: Any) -> EngineConfig:
        return replace(self, **changes)

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> EngineConfig:
        """Defaults overridden by ``RAG_RERANK_*`` variables (e.g. RAG_RERANK_TOKEN_BUDGET=4096)."""
        return cls(**_values_from_env(cls, _ENV_PREFIX, environ))


#: What ``memory_budget_mb`` may be: one budget for every device, or one per device.
MemoryBudget = int | float | Mapping[str, int | float] | None


@dataclass(frozen=True)
class PoolConfig:
    """Memory management of a :class:`~rag_rerank_plugins.pool.ModelPool` on a shared machine.

    Every field can be set with ``RAG_RERANK_POOL_<FIELD>`` (upper case), read by
    :meth:`from_env`; arguments given to ``ModelPool(...)`` win.
    """

    #: Most megabytes the pool's loaded models may take on a device (parameters and buffers;
    #: on CUDA the allocator's growth at load). A number applies to every device separately; a
    #: mapping such as ``{"cpu": 2000, "cuda:0": 6000}`` sets one per device (a key ``"cuda"``
    #: applies to each CUDA device without its own key). None: no budget.
    #: Env: ``RAG_RERANK_POOL_MEMORY_BUDGET_MB=6000`` or ``=cpu=2000,cuda:0=6000``.
    memory_budget_mb: MemoryBudget = None
    #: Release a model nobody has called for this many seconds (a background reaper thread).
    #: None: never.
    idle_unload_s: float | None = None
    #: A model that alone exceeds its device's budget: "warn" loads it anyway (and logs a
    #: warning), "raise" refuses it with ConfigurationError.
    over_budget: Literal["warn", "raise"] = "warn"

    def __post_init__(self) -> None:
        budget = self.memory_budget_mb
        if isinstance(budget, Mapping):
            for device, value in budget.items():
                _check_budget(f"memory_budget_mb[{device!r}]", value)
            object.__setattr__(self, "memory_budget_mb", dict(budget))
        elif budget is not None:
            _check_budget("memory_budget_mb", budget)
        idle = self.idle_unload_s
        if idle is not None and (isinstance(idle, bool) or not idle > 0):
            raise ConfigurationError(f"PoolConfig.idle_unload_s must be > 0 or None, got {idle!r}")
        if self.over_budget not in ("warn", "raise"):
            raise ConfigurationError(
                f"PoolConfig.over_budget must be 'warn' or 'raise', got {self.over_budget!r}"
            )

    def budget_bytes(self, device: str) -> int | None:
        """The budget of ``device`` in bytes (None: unlimited)."""
        budget = self.memory_budget_mb
        if budget is None:
            return None
        if isinstance(budget, Mapping):
            value = budget.get(device)
            if value is None:
                value = budget.get(device.split(":", 1)[0])
            if value is None:
                return None
        else:
            value = budget
        return int(value * 1024 * 1024)

    @property
    def manages_memory(self) -> bool:
        return self.memory_budget_mb is not None

    def with_changes(self, **changes: Any) -> PoolConfig:
        return replace(self, **changes)

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> PoolConfig:
        """Defaults overridden by ``RAG_RERANK_POOL_*`` variables."""
        return cls(**_values_from_env(cls, _ENV_PREFIX + "POOL_", environ))


def _check_budget(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
        raise ConfigurationError(
            f"PoolConfig.{name} must be a positive number of MB, got {value!r}"
        )


def _parse_budget(var: str, raw: str) -> Any:
    """``6000`` (every device) or ``cpu=2000,cuda:0=6000`` (per device)."""
    try:
        if "=" not in raw:
            return float(raw) if "." in raw else int(raw)
        budget: dict[str, float] = {}
        for part in raw.split(","):
            if not part.strip():
                continue
            device, _, value = part.partition("=")
            budget[device.strip()] = float(value)
        return budget
    except ValueError:
        raise ConfigurationError(
            f"{var}={raw!r} is not a number of MB or a list like 'cpu=2000,cuda:0=6000'"
        ) from None


def _values_from_env(cls: Any, prefix: str, environ: Mapping[str, str] | None) -> dict[str, Any]:
    """The one parser of ``RAG_RERANK_*`` variables for config dataclasses: each field
    ``name`` is read from ``prefix + NAME``; the field's type says how to parse it."""
    env = os.environ if environ is None else environ
    values: dict[str, Any] = {}
    for f in fields(cls):
        var = prefix + f.name.upper()
        raw = env.get(var)
        if raw is None or raw == "":
            continue
        kind = str(f.type)
        if "bool" in kind:
            values[f.name] = _parse_bool(var, raw)
        elif raw.lower() == "none":
            values[f.name] = None
        elif "MemoryBudget" in kind:
            values[f.name] = _parse_budget(var, raw)
        elif "Literal" in kind:
            values[f.name] = raw.strip().lower()
        else:
            try:
                values[f.name] = float(raw) if "float" in kind else int(raw)
            except ValueError:
                raise ConfigurationError(f"{var}={raw!r} is not a number") from None
    return values


def _parse_bool(var: str, raw: str) -> bool:
    value = raw.strip().lower()
    if value in ("1", "true", "yes", "on"):
        return True
    if value in ("0", "false", "no", "off"):
        return False
    raise ConfigurationError(f"{var}={raw!r} is not a boolean (1/0, true/false)")
