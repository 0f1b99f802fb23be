"""`EngineConfig`: how a pool schedules, batches, bounds and caches work for its models;
`PoolConfig`: how much memory the pool's models may take on each device.

Defaults are chosen for correctness under load first: a bounded queue (memory cannot grow without
limit), no added latency (``max_wait_ms`` 0: requests that arrive while the device runs a pass are
merged into the next passes anyway, so waiting only delays a lone request), the prepare/forward
pipeline on (tokenising never stalls the device), the score cache off (scores of changing
documents must never be stale unless asked for) and a small query-embedding cache on.

Both are sections of the one configuration (:mod:`rag_rerank_plugins._config`): every field is
``RAG_RERANK_<FIELD>`` (EngineConfig) or ``RAG_RERANK_POOL_<FIELD>`` (PoolConfig), a
``rag-rerank serve`` flag, and a row of the table in ``docs/configuration.md``.
:meth:`~rag_rerank_plugins._config.ConfigModel.from_env` reads the variables with the same parser
:class:`rag_rerank_plugins.settings.Settings` uses for its ``engine`` and ``pool`` fields.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from typing import Annotated, Any, ClassVar, Literal

from pydantic import Field, ValidationInfo, field_validator

from ._config import ENV_PREFIX, Cli, ConfigModel, TextParser

__all__ = [
    "MAX_METRICS_WINDOW",
    "MAX_WAIT_MS",
    "NO_LIMIT_S",
    "EngineConfig",
    "MemoryBudget",
    "PoolConfig",
    "no_limit",
]

#: Seconds from which a timeout means "no limit" (about 31 years): well below
#: ``threading.TIMEOUT_MAX``, past which ``Condition.wait`` and ``Future.result`` raise.
NO_LIMIT_S = 1e9
#: The longest batching wait: a lone request waits this long, so more is never what one wants.
MAX_WAIT_MS = 60_000.0
#: The most latency samples kept per model: each ``stats()`` sorts them, and past ``sys.maxsize``
#: the window's deque could not even be created (OverflowError at the first load).
MAX_METRICS_WINDOW = 1_000_000


def no_limit(seconds: float | None) -> float | None:
    """``seconds``, or None (no limit) for inf and anything from :data:`NO_LIMIT_S` on."""
    return None if seconds is not None and seconds >= NO_LIMIT_S else seconds


class EngineConfig(ConfigModel):
    """Scheduling, batching, queue and cache settings for every model of a pool."""

    cli_group: ClassVar[str] = "engine"

    max_batch_size: int = Field(
        default=64, gt=0, description="Most items (pairs or texts) in one forward pass."
    )
    token_budget: int | None = Field(
        default=None,
        gt=0,
        description="Most padded tokens (items x longest item) in one forward pass; none: 1024 "
        "on CPU (small passes pad less and spread over the CPU device workers; 1 x 50 mixed "
        "passages, 2-core EPYC, 2 workers: 1024 -> 445 ms, 4096 -> 623 ms), for our BF16 "
        "kernels on AMX CPUs 2048 up to 768-wide models and 1536 above (MiniLM 1 x 50 SciFact, "
        "same process: 1536 608 ms, 2048 586), for openvino-cross-encoder's large models in "
        "BF16 on AVX512-BF16 CPUs without AMX 512 (XLM-R large 1 x 20: 13.08 s against 13.76 "
        "at 1024), 16384 on GPUs.",
    )
    max_wait_ms: float | None = Field(
        default=None,
        ge=0,
        le=MAX_WAIT_MS,
        description="How long an idle worker waits for more requests to merge into its first "
        "pass (a lone request waits this long too), at most a minute; none: 0.",
    )
    pipeline: bool = Field(
        default=True,
        description="Tokenise the next micro-batches on a prepare thread while the device runs "
        "the current one (false: the device worker prepares each batch itself, in sequence).",
    )
    prepare_workers: int | None = Field(
        default=None,
        gt=0,
        description="Threads that prepare (tokenise, collate) micro-batches for one model whose "
        "backend allows it (TEI's tokenisation workers); none: 4 for a CUDA model on a host with "
        "8 or more usable cores, else 1. On a GPU a small model is limited by tokenising (H200, "
        "16 cores, 16 callers x 4-10 requests x 20 passages, three runs: MiniLM-L6 1.3-2.4x the "
        "pairs/s of one thread, XLM-R large 0.9-1.7x); on a busy 2-core CPU box a second thread "
        "lost 10-20 % pairs/s.",
    )
    cpu_workers: int | None = Field(
        default=None,
        gt=0,
        description="Device workers for a CPU model whose backend may run passes in parallel "
        "(sentence-transformers): each runs whole passes with usable cores / workers torch "
        "threads, which beats one pass spread over every core (MiniLM-L6 BF16, 2 cores: 445 ms vs "
        "785 ms); none: the usable physical cores (affinity, cgroup quota), capped by "
        "`OMP_NUM_THREADS` when set, at most 8.",
    )
    bulk_aging_ms: float = Field(
        default=2000.0,
        ge=0,
        description="Bulk requests (priority='bulk') that have waited this long are served like "
        "interactive ones, so steady interactive traffic never starves them (a finite number).",
    )
    max_queue: int = Field(
        default=1024,
        gt=0,
        description="Requests waiting per model before new ones are refused with QueueFullError.",
    )
    queue_timeout_s: float | None = Field(
        default=None,
        ge=0,
        description="With a full queue, wait this long for room instead of failing (a finite "
        "number); none: fail at once.",
    )
    request_timeout_s: float | None = Field(
        default=None,
        gt=0,
        description=(
            "Default caller timeout for one request, the wait for a cold model's load included; "
            "none (or inf): wait as long as it takes."
        ),
    )
    score_cache_size: int = Field(
        default=0, ge=0, description="(query, passage) -> score cache entries per model; 0: off."
    )
    score_cache_ttl_s: float = Field(
        default=600.0, gt=0, description="Seconds a cached score stays valid (a finite number)."
    )
    query_cache_size: int = Field(
        default=1024, ge=0, description="Query-embedding cache entries per model; 0: off."
    )
    query_cache_ttl_s: float = Field(
        default=600.0,
        gt=0,
        description="Seconds a cached query embedding stays valid (a finite number).",
    )
    metrics_window: int = Field(
        default=2048,
        gt=0,
        le=MAX_METRICS_WINDOW,
        description="Latency and queue-wait samples kept per model for p50/p95, at most 1000000.",
    )

    @field_validator("request_timeout_s")
    @classmethod
    def _no_limit(cls, seconds: float | None) -> float | None:
        """inf (or ~31 years and more) is no limit: None, which every wait understands (waits
        on threads overflow past ``threading.TIMEOUT_MAX``: the worker crashed)."""
        return no_limit(seconds)

    @field_validator(
        "queue_timeout_s", "bulk_aging_ms", "score_cache_ttl_s", "query_cache_ttl_s", mode="after"
    )
    @classmethod
    def _finite(cls, value: float | None, info: ValidationInfo) -> float | None:
        """Durations that have no 'never' meaning here must be finite, and short enough for
        thread waits (``inf`` crashed the worker with an ``OverflowError``)."""
        limit = NO_LIMIT_S * (1000 if str(info.field_name).endswith("_ms") else 1)
        if value is not None and not value < limit:
            raise ValueError(f"must be a finite number below {limit:g}")
        return value

    def tokens_per_batch(self, device: str, preferred: int | None = None) -> int:
        """Padded tokens one forward pass may hold on ``device``: ``token_budget`` when set, else
        on the CPU what the model's kernels prefer (``preferred``, e.g. 2048 for our BF16 kernels
        on AMX CPUs) or 1024, and 16384 on GPUs."""
        if self.token_budget is not None:
            return self.token_budget
        if device != "cpu":
            return 16384
        return preferred if preferred is not None and preferred > 0 else 1024

    def cpu_threads(self) -> int:
        """Compute threads the CPU models' passes share: ``RAG_RERANK_TORCH_THREADS`` when set
        (the process's torch thread budget), else the usable physical cores capped by
        ``OMP_NUM_THREADS`` (:func:`._cpu.compute_threads`)."""
        from ._cpu import compute_threads
        from .policy import requested_torch_threads

        requested = requested_torch_threads()
        return requested if requested is not None and requested > 0 else compute_threads()

    def prepare_threads(self, device: str) -> int:
        """Prepare threads for a model on ``device`` whose backend allows concurrent prepare
        (:attr:`prepare_workers`; none: 4 on CUDA with >= 8 usable cores, else 1)."""
        if self.prepare_workers is not None:
            return self.prepare_workers
        from ._cpu import usable_cores

        return 4 if str(device).startswith("cuda") and usable_cores() >= 8 else 1

    def cpu_device_workers(self) -> tuple[int, int]:
        """(device workers, torch threads each when all are busy) for a CPU model that allows
        parallel passes."""
        total = self.cpu_threads()
        workers = self.cpu_workers if self.cpu_workers is not None else min(total, 8)
        return workers, max(1, total // workers)

    def wait_seconds(self, device: str) -> float:
        """Seconds an idle worker waits to merge requests into its first pass."""
        if self.max_wait_ms is not None:
            return self.max_wait_ms / 1000
        return 0.0


def _budget_number(text: str) -> int | float:
    """One budget as the numeric fields read it: ``6000``, ``1_000``, ``1e3``, ``2.5`` or ``inf``
    (no limit); never nan, and only ASCII digits (Python's ``int`` also reads ``"١٢"``)."""
    text = text.strip()
    if not text.isascii() or text.lower().lstrip("+-") == "nan":
        raise ValueError(text)
    try:
        return int(text)
    except ValueError:
        return float(text)


def _parse_budget(text: str) -> Any:
    """``6000`` (every device) or ``cpu=2000,cuda:0=6000`` (per device)."""
    parts = [part.partition("=") for part in text.split(",") if part.strip()]
    try:
        if "=" not in text:
            return _budget_number(text)
        pairs = [(device, _budget_number(value)) for device, _, value in parts]
    except ValueError:
        raise ValueError(
            "is not a number of MB (e.g. 6000, or inf: no limit) or a list like "
            "'cpu=2000,cuda:0=6000'"
        ) from None
    return _per_device(pairs)  # the pairs, not a dict: a repeated device is seen


def _per_device(pairs: Iterable[tuple[Any, Any]]) -> dict[str, int | float]:
    """Per-device budgets keyed as the pool names devices; a device named twice (``cpu`` and
    ``CPU``, or ``cpu`` twice in a variable) is an error, not the last value silently."""
    devices: dict[str, int | float] = {}
    for device, value in pairs:
        _check_budget(value)
        name = _budget_device(device)
        if name in devices:
            raise ValueError(f"names the device {name!r} twice")
        devices[name] = value
    return devices


#: What ``memory_budget_mb`` may be: one budget for every device, or one per device.
MemoryBudget = int | float | Mapping[str, int | float] | None


class PoolConfig(ConfigModel):
    """Memory management of a :class:`~rag_rerank_plugins.pool.ModelPool` on a shared machine.

    Arguments given to ``ModelPool(...)`` win over these settings.
    """

    env_prefix: ClassVar[str] = ENV_PREFIX + "POOL_"
    cli_group: ClassVar[str] = "pool"

    memory_budget_mb: Annotated[MemoryBudget, TextParser(_parse_budget), Cli(metavar="MB")] = Field(
        default=None,
        description="Most MB the pool's loaded models may take on a device (parameters and "
        "buffers; on CUDA the allocator's growth at load): one number for every device, or "
        "cpu=2000,cuda:0=6000 per device (keys cpu, mps, cuda:N, or cuda for each CUDA device "
        "without its own; any other key is refused); inf: no limit on that device; none: no "
        "budget.",
    )
    idle_unload_s: float | None = Field(
        default=None,
        gt=0,
        description="Release a model nobody has called for this many seconds (a background "
        "reaper thread); none: never.",
    )
    over_budget: Literal["warn", "raise"] = Field(
        default="warn",
        description="A model that alone exceeds its device's budget: warn loads it anyway (and "
        "logs a warning), raise refuses it with ConfigurationError.",
    )
    mps_high_watermark_ratio: float | None = Field(
        default=None,
        ge=0,
        le=2,
        description="Cap of the MPS allocator (Apple GPUs) as a ratio of Metal's recommended "
        "working set, as torch's PYTORCH_MPS_HIGH_WATERMARK_RATIO (0: no limit; torch's default "
        "1.7): set as that variable when the pool is created before torch is imported, else "
        "with torch.mps.set_per_process_memory_fraction (logged). Per process; none: torch's.",
    )
    mps_empty_cache: bool = Field(
        default=False,
        description="Empty the MPS allocator's cache after every call to a model on 'mps' "
        "(memory back to macOS at once, at some cost per call); off: only on release and OOM.",
    )

    @field_validator("memory_budget_mb")
    @classmethod
    def _positive_budget(cls, budget: MemoryBudget) -> MemoryBudget:
        if isinstance(budget, Mapping):
            return _per_device(budget.items())
        if budget is not None:
            _check_budget(budget)
        return budget

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
        if math.isinf(value):
            return None  # inf: no limit on this device, as elsewhere (no_limit)
        return int(value * 1024 * 1024)

    @property
    def manages_memory(self) -> bool:
        """True when a budget is set (the pool then evicts least recently used models)."""
        return self.memory_budget_mb is not None


def _budget_device(device: Any) -> str:
    """A budget's device key as the pool names devices (``"CUDA:0 "`` -> ``"cuda:0"``); a key no
    model can ever be on (``"gpu"``, ``"cuda0"``) is an error, not a budget silently ignored."""
    name = str(device).strip().lower()
    if name in ("cpu:0", "mps:0"):  # torch's names of the one CPU / MPS device
        name = name[:-2]
    family, sep, index = name.partition(":")
    if family in ("cpu", "mps", "cuda") and not sep:
        return name
    if family == "cuda" and index.isascii() and index.isdigit():  # not "abc", "-1", Arabic digits
        return f"cuda:{int(index)}"  # "cuda:01" is the device the pool calls "cuda:1"
    raise ValueError(
        f"has no device {device!r}: use 'cpu', 'mps', 'cuda' (every CUDA device without its own "
        "budget) or 'cuda:N'"
    )


def _check_budget(value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
        raise ValueError("must be a positive number of MB (for every device)")
