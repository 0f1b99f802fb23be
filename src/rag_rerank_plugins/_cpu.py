"""How many CPU cores this process may really use, and per-thread torch threading.

``usable_cores`` counts physical cores in the process's affinity mask (SMT siblings once), capped
by a cgroup v2 CPU quota: the number that matters for compute-bound work in a container, where
``os.cpu_count()`` reports the host. ``set_thread_torch_threads`` gives one engine thread its own
intra-op thread count without changing torch's default for every other thread.
"""

from __future__ import annotations

import math
import os
import threading
from pathlib import Path

__all__ = ["cgroup_cpu_limit", "set_thread_torch_threads", "usable_cores"]


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


def set_thread_torch_threads(threads: int) -> None:
    """Run this thread's torch ops with ``threads`` intra-op threads, leaving torch's default
    for other threads as it was.

    torch keeps the count per thread (OpenMP's per-thread setting) plus one process-wide value
    that threads adopt at their first parallel op; ``torch.set_num_threads`` sets both. The
    process-wide value is put back from a short-lived thread, whose own setting dies with it.
    """
    import torch

    previous = torch.get_num_threads()  # this thread adopts the process-wide value first
    if previous == threads:
        return
    torch.set_num_threads(threads)
    restore = threading.Thread(target=torch.set_num_threads, args=(previous,))
    restore.start()
    restore.join()
