"""Device, dtype and thread policy: decided once per load, never per call.

Why a policy at all: the fastest dtype depends on the hardware, and the wrong one is a trap.
FP16 halves memory and doubles speed on CUDA/MPS, but on a CPU it runs through a scalar path
(~2.6 GFLOP/s measured, ~40x slower than FP32). BF16 is ~3-4x faster than FP32 on CPUs with native
BF16 units (AVX512-BF16 / AMX) and ~150x *slower* on AVX2-only CPUs (measured on an AMD EPYC).
So ``dtype="auto"`` means float16 on CUDA/MPS, bfloat16 on CPUs that have native BF16, else float32.
"""

from __future__ import annotations

import functools
import logging
import os
import sys
from dataclasses import dataclass
from typing import Any

from .exceptions import ConfigurationError, MissingDependencyError
from .spec import ModelSpec

__all__ = [
    "DtypeDecision",
    "configure_torch_threads",
    "requested_torch_threads",
    "cpu_has_native_bf16",
    "decide_dtype",
    "resolve_device",
    "resolve_spec",
    "torch_available",
]

logger = logging.getLogger(__name__)

#: Environment variable that sets torch's intra-op thread count at the first load.
THREADS_ENV = "RAG_RERANK_TORCH_THREADS"


def torch_available() -> bool:
    """True when torch can be imported (without importing it)."""
    import importlib.util

    return importlib.util.find_spec("torch") is not None


def require_torch(purpose: str) -> None:
    if not torch_available():
        raise MissingDependencyError("torch", "st", purpose)


#: ``RAG_RERANK_CPU_BF16``: the CPU's detected native BF16 support, overridden.
BF16_ENV = "RAG_RERANK_CPU_BF16"
_ON = ("1", "true", "yes", "on")
_OFF = ("0", "false", "no", "off")


@functools.lru_cache(maxsize=1)
def cpu_has_native_bf16() -> bool:
    """True when the CPU computes BF16 natively (AVX512-BF16 or AMX-BF16; Apple/ARM: bf16 flag).

    ``RAG_RERANK_CPU_BF16`` overrides the flags. Set but empty counts as unset (as
    ``RAG_RERANK_CPU_KIND``; ``VAR=`` in a compose file or a shell script), and a value that is
    neither on nor off is refused: read as "off", it silently ran BF16-capable hosts in float32
    (~3x slower), and ``on`` did the same."""
    override = os.environ.get(BF16_ENV, "").strip().lower()
    if override in _ON:
        return True
    if override in _OFF:
        return False
    if override:
        raise ConfigurationError(
            f"{BF16_ENV} must be 1 or 0 (true/false, yes/no, on/off), got "
            f"{os.environ[BF16_ENV]!r}; unset it to use the CPU's own BF16 support."
        )
    from ._cpu import _cpu_flags  # the one reader of /proc/cpuinfo (also cpu_kind's)

    return bool({"avx512_bf16", "amx_bf16", "bf16"} & _cpu_flags())


@functools.cache
def resolve_device(requested: str) -> str:
    """Turn ``"auto"`` into a concrete device, and check that an explicit one exists.

    "auto" picks cuda:0, then mps, then cpu. It never spreads one model over several GPUs:
    one spec, one device.
    """
    if requested == "cpu":
        return "cpu"
    if requested == "auto" and not torch_available():
        return "cpu"  # torch-free backends (fakes, remote) run "on the CPU"
    require_torch(f"Device {requested!r}")
    import torch

    if requested == "auto" or requested.startswith("cuda"):
        _refuse_cuda_after_fork(torch, requested)
    if requested == "auto":
        if torch.cuda.is_available():
            return "cuda:0"
        mps = getattr(torch.backends, "mps", None)
        if mps is not None and mps.is_available():
            return "mps"
        return "cpu"
    if requested.startswith("cuda"):
        if not torch.cuda.is_available():
            raise ConfigurationError(
                f"device={requested!r} was requested but CUDA is not available in this process "
                "(CPU-only torch build, no driver, or CUDA_VISIBLE_DEVICES hides the GPUs). "
                "Use device='auto' to fall back to the CPU."
            )
        index = int(requested.split(":", 1)[1])
        if index >= torch.cuda.device_count():
            raise ConfigurationError(
                f"device={requested!r} does not exist: {torch.cuda.device_count()} CUDA device(s) "
                "are visible."
            )
        return requested
    if requested == "mps":
        mps = getattr(torch.backends, "mps", None)
        if mps is None or not mps.is_available():
            raise ConfigurationError("device='mps' was requested but MPS is not available.")
        return "mps"
    raise ConfigurationError(f"Unsupported device {requested!r}.")


def _refuse_cuda_after_fork(torch: Any, requested: str) -> None:
    """A process forked from one that had initialised CUDA can never use CUDA itself (torch
    raises "Cannot re-initialize CUDA in forked subprocess" deep inside the first load). Say so
    before any load, with the fix. ``"auto"`` is refused too: the GPU is there but unusable, and
    silently running a GPU service's models on the CPU would be a worse surprise."""
    in_bad_fork = getattr(torch.cuda, "_is_in_bad_fork", None)
    if in_bad_fork is None or not in_bad_fork():
        return
    raise ConfigurationError(
        f"device={requested!r} cannot use CUDA in this process: it was forked from a process "
        "that had already initialised CUDA, and CUDA does not survive fork. Start the workers "
        "with the 'spawn' method (multiprocessing.get_context('spawn')), or do not touch the GPU "
        "in the parent (no GPU model loaded before gunicorn --preload forks its workers); pass "
        "device='cpu' to run on the CPU in this process."
    )


@dataclass(frozen=True)
class DtypeDecision:
    """The dtype the policy chose, and why (shown by `rag-rerank info` and in logs)."""

    dtype: str
    reason: str


def decide_dtype(requested: str, device: str) -> DtypeDecision:
    """Pick the dtype for ``device``. Explicit requests win, except FP16 on a CPU (module doc)."""
    on_cpu = device == "cpu"
    if requested == "auto":
        if not on_cpu:
            return DtypeDecision("float16", f"auto: half precision on {device}")
        # Say when the variable decided, not the CPU: with RAG_RERANK_CPU_BF16=0 on an AMX
        # host, "CPU without native BF16" was false.
        override = os.environ.get(BF16_ENV, "").strip()
        if cpu_has_native_bf16():
            if override:
                return DtypeDecision("bfloat16", f"auto: {BF16_ENV}={override} turns BF16 on")
            return DtypeDecision("bfloat16", "auto: CPU has native BF16 (avx512_bf16/amx)")
        if override:
            return DtypeDecision("float32", f"auto: {BF16_ENV}={override} turns BF16 off")
        return DtypeDecision("float32", "auto: CPU without native BF16, so float32")
    if requested == "float16" and on_cpu:
        return DtypeDecision(
            "float32",
            "float16 requested on CPU, where it is ~40x slower than float32: using float32",
        )
    if requested == "bfloat16" and on_cpu and not cpu_has_native_bf16():
        override = os.environ.get(BF16_ENV, "").strip()
        why = f"{BF16_ENV}={override} says" if override else "this CPU has"
        return DtypeDecision(
            "bfloat16",
            f"bfloat16 requested explicitly; {why} no native BF16, so it may be much "
            "slower than float32",
        )
    return DtypeDecision(requested, "requested explicitly")


def resolve_spec(
    spec: ModelSpec, uses_torch: bool = True, cpu_bf16: bool = False
) -> tuple[ModelSpec, DtypeDecision]:
    """The pool key for ``spec`` (concrete device and dtype, local paths made absolute) and why
    that dtype was chosen. ``cpu_bf16``: a backend without torch weights that computes BF16
    natively on the CPU (OpenVINO), whose "auto" dtype on the CPU follows :func:`decide_dtype`.

    Hub names that this installation ships offline (see :mod:`rag_rerank_plugins.offline`) become
    the packaged folder, so ``"sentence-transformers/all-MiniLM-L6-v2"`` works without a network.
    """
    from .offline import resolve_model_location

    if uses_torch:
        device = resolve_device(spec.device)
        decision = decide_dtype(spec.dtype, device)
    elif cpu_bf16 and spec.device in ("auto", "cpu"):  # OpenVINO: no torch import either
        device = "cpu"
        decision = decide_dtype(spec.dtype, device)
    else:  # no torch weights (remote, fakes, ONNX Runtime): nothing to place, no torch import
        device = "cpu" if spec.device == "auto" else spec.device
        dtype = "float32" if spec.dtype == "auto" else spec.dtype
        reason = "auto: float32" if spec.dtype == "auto" else "requested explicitly"
        decision = DtypeDecision(dtype, f"{reason} (backend without torch weights)")
    model = resolve_model_location(spec.model)
    if (device, decision.dtype, model) == (spec.device, spec.dtype, spec.model):
        return spec, decision
    return spec.with_options(device=device, dtype=decision.dtype, model=model), decision


def requested_torch_threads() -> int | None:
    """The torch thread count asked for with ``RAG_RERANK_TORCH_THREADS``; None when unset.
    The one parser of that variable (the loader and the CPU device workers both read it)."""
    env = os.environ.get(THREADS_ENV)
    if env is None:
        return None
    # The field's own parser: "none" (the documented default), " 2 " and "2.0" are read as
    # everywhere else, and 0 or -1 name the variable instead of failing in torch.
    from ._config import AdapterConfig

    return AdapterConfig.from_env({THREADS_ENV: env}).torch_threads


def configure_torch_threads(num_threads: int | None = None) -> None:
    """Set torch's intra-op thread count once per process (``RAG_RERANK_TORCH_THREADS``).

    Why a setting: on a shared 2-core box, 1 thread beat 2 when a neighbour was busy. Only applied
    when asked for; torch's default is left alone otherwise.
    """
    if num_threads is None:
        num_threads = requested_torch_threads()
        if num_threads is None:
            return
    if num_threads <= 0:
        raise ConfigurationError(f"torch thread count must be positive, got {num_threads}.")
    if "torch" not in sys.modules and not torch_available():
        return
    import torch

    if torch.get_num_threads() != num_threads:
        torch.set_num_threads(num_threads)
        logger.info("torch intra-op threads set to %d", num_threads)
