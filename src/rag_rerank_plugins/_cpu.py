"""How many CPU cores this process may really use, what kind of CPU it is, and per-thread torch
threading.

``usable_cores`` counts physical cores in the process's affinity mask (SMT siblings once), capped
by a cgroup v2 CPU quota: the number that matters for compute-bound work in a container, where
``os.cpu_count()`` reports the host. ``compute_threads`` caps that by ``OMP_NUM_THREADS``, the
variable torch and the stock libraries honour (a deployment of N worker processes sets it to
cores / N; before, our engine ignored it and ran every core in each).
``set_thread_torch_threads`` gives one engine thread its own intra-op thread count without
changing torch's default for every other thread; ``fork_safe_threads`` keeps a forked child's
forking thread off the OpenMP team it inherited. ``cpu_kind``
names the CPU's matrix units (AMX, AVX512-BF16, AVX2), which decide the fastest backend
(``backend_choice``) and attention kernel (``backends._cpu_attention``); ``RAG_RERANK_CPU_KIND``
overrides it, so tests never depend on the host.
"""

from __future__ import annotations

import contextlib
import functools
import math
import os
import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Literal, TypeVar

from ._forksafe import ForkSafeLock, at_fork
from .exceptions import ConfigurationError

__all__ = [
    "CPU_KINDS",
    "CpuKind",
    "cgroup_cpu_limit",
    "compute_threads",
    "cpu_kind",
    "fork_safe_threads",
    "omp_threads",
    "set_thread_torch_threads",
    "usable_cores",
]

CpuKind = Literal["amx", "avx512_bf16", "avx2", "other"]
CPU_KINDS: tuple[CpuKind, ...] = ("amx", "avx512_bf16", "avx2", "other")
KIND_ENV = "RAG_RERANK_CPU_KIND"


def cgroup_cpu_limit() -> int | None:
    """Whole CPUs allowed by a cgroup v2 ``cpu.max`` quota, rounded up; None without a quota."""
    try:
        quota, period = Path("/sys/fs/cgroup/cpu.max").read_text().split()[:2]
    except (OSError, ValueError):
        return None
    if quota == "max":
        return None
    try:
        return max(1, math.ceil(int(quota) / int(period)))
    except (ValueError, ZeroDivisionError):
        return None


def usable_cores() -> int:
    """Physical cores this process may run on: its affinity mask with SMT siblings counted once,
    capped by a cgroup CPU quota. More compute threads than cores only adds contention."""
    try:
        cpus = sorted(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cpus = list(range(os.cpu_count() or 1))
    cores = set()
    for cpu in cpus:
        try:
            siblings = Path(
                f"/sys/devices/system/cpu/cpu{cpu}/topology/thread_siblings_list"
            ).read_text()
        except OSError:
            siblings = str(cpu)
        cores.add(siblings.strip())
    count = max(1, len(cores))
    limit = cgroup_cpu_limit()
    return min(count, limit) if limit else count


def omp_threads() -> int | None:
    """``OMP_NUM_THREADS`` as OpenMP reads it: the first level of a nested list (``"4,2"`` is 4);
    None when unset, blank or not a positive whole number (OpenMP ignores such a value too)."""
    text = os.environ.get("OMP_NUM_THREADS", "").split(",")[0].strip()
    if not (text.isascii() and text.isdigit()):
        return None
    value = int(text)
    return value if value > 0 else None


def compute_threads() -> int:
    """Threads this process's CPU passes may use in all: :func:`usable_cores`, capped by
    ``OMP_NUM_THREADS`` when it is set (never raised by it: more threads than cores only adds
    contention)."""
    cores = usable_cores()
    cap = omp_threads()
    return min(cores, cap) if cap is not None else cores


_T = TypeVar("_T")
#: Serialises :func:`set_thread_torch_threads` (it changes a process-wide value for a moment).
_bind_lock = ForkSafeLock()


def set_thread_torch_threads(threads: int) -> None:
    """Run this thread's torch ops with ``threads`` intra-op threads, leaving torch's default
    for other threads as it was.

    torch keeps the count per thread (OpenMP's per-thread setting) plus one process-wide value
    that threads adopt at their first torch call; ``torch.set_num_threads`` sets both. So the
    process-wide value is read from a short-lived thread (it adopts that value) and put back from
    another after this thread's own is set. Reading it in this thread instead restored this
    thread's old count: a device worker bound to 1 thread that later ran a lone pass with 2 left
    every new thread of the process on 1 (caught by a CI run). One binding at a time, so two
    workers binding at once cannot restore each other's counts.
    """
    import torch

    if torch.get_num_threads() == threads:  # also this thread's first call: it adopts the value
        return
    with _bind_lock:
        try:
            shared = _fresh_thread(torch.get_num_threads)
        except _NoThread:  # Python is exiting and refuses threads: the default goes too
            torch.set_num_threads(threads)
            return
        torch.set_num_threads(threads)
        with contextlib.suppress(_NoThread):
            _fresh_thread(lambda: torch.set_num_threads(shared))


def _forked_worker_thread() -> int | None:
    """At import, in a ``multiprocessing`` fork child whose parent had loaded torch (it is
    loaded here already): the thread that forked, which is this process's main thread now. For
    a child whose parent had not imported this package (so :func:`_note_forking_thread` was
    not registered there)."""
    if "torch" not in sys.modules:
        return None
    import multiprocessing

    if multiprocessing.parent_process() is None:
        return None
    if multiprocessing.get_start_method(allow_none=True) not in (None, "fork"):
        return None
    return threading.main_thread().ident


#: In a forked child of a process that had imported torch: the thread that called ``fork()``.
_forking_thread: int | None = _forked_worker_thread()


@at_fork
def _note_forking_thread() -> None:
    global _forking_thread
    _forking_thread = threading.get_ident() if "torch" in sys.modules else None


@contextlib.contextmanager
def fork_safe_threads() -> Iterator[None]:
    """Run this thread's torch ops on one thread inside, when it is the thread that forked this
    process; elsewhere do nothing.

    Why: GNU OpenMP (torch's CPU threading) keeps, per OS thread, the team of threads that
    thread's last parallel region used, and ``fork()`` copies that record into the child but not
    the threads. The child's forking thread then hung (or crashed) at its first parallel torch
    op: a ``multiprocessing`` fork worker that loaded a model its parent had not (the load packs
    the weights with oneDNN on the caller's thread) never answered. New threads start a new
    team, so device workers and callers on other threads keep their counts; only our work on
    the forking thread is confined, and its own count is put back afterwards."""
    if _forking_thread is None or _forking_thread != threading.get_ident():
        yield
        return
    import torch

    before = torch.get_num_threads()
    set_thread_torch_threads(1)
    try:
        yield
    finally:
        set_thread_torch_threads(before)


class _NoThread(Exception):
    """Python is exiting and refuses new threads (CPython 3.12.0-3.12.2)."""


def _fresh_thread(call: Callable[[], _T]) -> _T:
    """``call()`` on a new, short-lived thread (its torch thread count is the process-wide one)."""
    from ._exitsafe import start_thread  # asyncio: not at this module's (eager) import

    out: list[_T] = []
    thread = threading.Thread(target=lambda: out.append(call()), name="rag-rerank-torch-threads")
    if not start_thread(thread):
        raise _NoThread
    thread.join()
    if not out:
        raise RuntimeError("setting torch's thread count failed; see the thread's traceback above")
    return out[0]


@functools.lru_cache(maxsize=1)
def _cpu_flags() -> frozenset[str]:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as fh:
            for line in fh:
                if line.startswith(("flags", "Features")):
                    return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()


def cpu_kind() -> CpuKind:
    """This CPU's kind, for the backend and attention-kernel choices (``RAG_RERANK_CPU_KIND``
    overrides the flags)."""
    override = os.environ.get(KIND_ENV, "").strip().lower()
    if override:
        if override not in CPU_KINDS:
            raise ConfigurationError(
                f"{KIND_ENV} must be one of {', '.join(CPU_KINDS)}, got {override!r}."
            )
        return override
    flags = _cpu_flags()
    if "amx_bf16" in flags:
        return "amx"
    if "avx512_bf16" in flags:
        return "avx512_bf16"
    if "avx2" in flags:
        return "avx2"
    return "other"
