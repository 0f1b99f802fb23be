"""Returning memory to the operating system after a model is released.

Dropping the last reference is not enough for RSS to fall: freed tensors stay in glibc's arenas
and in torch's CUDA caching allocator. ``free_memory`` runs the collector, empties the CUDA/MPS
caches when torch is already imported, and asks glibc to trim its heap.
"""

from __future__ import annotations

import functools
import gc
import os
import sys
from typing import Any

__all__ = ["free_memory", "rss_bytes"]


@functools.lru_cache(maxsize=1)
def _libc() -> Any:
    if not sys.platform.startswith("linux"):
        return None
    import ctypes
    import ctypes.util

    name = ctypes.util.find_library("c")
    try:
        return ctypes.CDLL(name) if name else None
    except OSError:
        return None


def free_memory(device: str = "cpu") -> None:
    """Collect garbage and give cached memory back (CUDA/MPS cache, glibc heap)."""
    gc.collect()
    torch = sys.modules.get("torch")
    if torch is not None:
        if device.startswith("cuda") and torch.cuda.is_available() and torch.cuda.is_initialized():
            torch.cuda.synchronize()
            torch.cuda.empty_cache()
            torch.cuda.ipc_collect()
        elif device == "mps" and hasattr(torch, "mps"):
            torch.mps.empty_cache()
    libc = _libc()
    if libc is not None and hasattr(libc, "malloc_trim"):
        libc.malloc_trim(0)


def rss_bytes() -> int:
    """Resident set size of this process, in bytes (Linux /proc; psutil elsewhere)."""
    try:
        with open("/proc/self/statm", encoding="ascii") as fh:
            return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError):
        import psutil

        return int(psutil.Process().memory_info().rss)
