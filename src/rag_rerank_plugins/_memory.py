"""Returning memory to the operating system after a model is released.

Dropping the last reference is not enough for RSS to fall: freed tensors stay in glibc's arenas
and in torch's CUDA caching allocator. ``free_memory`` runs the collector, empties the CUDA/MPS
caches when torch is already imported, and asks glibc to trim its heap.

When the last CPU model of a pool goes, two process-wide leftovers kept RSS 20-30 % above the
pre-load figure after ``release()`` (MiniLM-L6 reranker, 300 requests, issue 21):

* oneDNN's primitive cache (~70 MiB of compiled kernels): ``free_memory(kernel_caches=True)``
  empties it (:mod:`rag_rerank_plugins._onednn`);
* glibc's per-thread arenas. The engine's threads allocate activations in their own arenas, and
  ``malloc_trim`` never shrinks the top of a thread's arena; glibc only does that on a large
  ``free`` when the top exceeds the trim threshold, which its dynamic rule raises to 2x the largest
  freed mmapped block (up to 64 MiB per arena). Reloading models grew RSS by 20-40 MiB per cycle.
  :func:`release_window` lowers the trim threshold while the model's memory is freed, so each
  arena's top goes back as it is freed, then sets the thresholds to the values glibc's dynamic
  rule reaches under load (mmap 32 MiB, trim 64 MiB): setting either switches that rule off for
  the process, and a frozen small mmap threshold would make every activation an ``mmap``.

``RAG_RERANK_RELEASE_PROCESS_MEMORY=0`` leaves both alone (the process's own ``MALLOC_*`` settings
then stay untouched too; they always do when the process set ``MALLOC_TRIM_THRESHOLD_`` or
``MALLOC_MMAP_THRESHOLD_`` itself).
"""

from __future__ import annotations

import contextlib
import functools
import gc
import os
import sys
from collections.abc import Iterator
from typing import Any

__all__ = ["free_memory", "release_window", "rss_bytes"]

_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # mallopt parameters (malloc.h)
_RELEASE_TRIM = 128 * 1024  # glibc's default trim threshold
_SERVING_MMAP = 32 * 1024 * 1024  # glibc's DEFAULT_MMAP_THRESHOLD_MAX on 64-bit
_SERVING_TRIM = 2 * _SERVING_MMAP  # what the dynamic rule pairs with it


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


def process_memory_enabled() -> bool:
    """False when ``RAG_RERANK_RELEASE_PROCESS_MEMORY=0``: leave process-wide caches alone."""
    value = os.environ.get("RAG_RERANK_RELEASE_PROCESS_MEMORY", "1").strip().lower()
    return value not in {"0", "false", "no", "off"}


@functools.lru_cache(maxsize=1)
def _glibc_mallopt() -> Any:
    """glibc's ``mallopt``, or None (another libc, or the process tuned malloc itself)."""
    if any(name in os.environ for name in ("MALLOC_TRIM_THRESHOLD_", "MALLOC_MMAP_THRESHOLD_")):
        return None
    libc = _libc()
    if libc is None or not hasattr(libc, "gnu_get_libc_version") or not hasattr(libc, "mallopt"):
        return None
    return libc.mallopt


@contextlib.contextmanager
def release_window(last_cpu_model: bool) -> Iterator[None]:
    """Free a model's memory inside this block so glibc returns its arenas' tops (see above).

    A no-op unless ``last_cpu_model`` (other CPU models would pay for trimmed arenas with page
    faults), on glibc, and not switched off."""
    mallopt = _glibc_mallopt() if last_cpu_model and process_memory_enabled() else None
    if mallopt is not None:
        mallopt(_M_TRIM_THRESHOLD, _RELEASE_TRIM)
    try:
        yield
    finally:
        if mallopt is not None:
            mallopt(_M_MMAP_THRESHOLD, _SERVING_MMAP)
            mallopt(_M_TRIM_THRESHOLD, _SERVING_TRIM)


def free_memory(device: str = "cpu", *, kernel_caches: bool = False) -> None:
    """Collect garbage and give cached memory back (CUDA/MPS cache, oneDNN kernels, glibc heap)."""
    gc.collect()
    torch = sys.modules.get("torch")
    if torch is not None:
        if device.startswith("cuda") and torch.cuda.is_available() and torch.cuda.is_initialized():
            torch.cuda.synchronize()
            torch.cuda.empty_cache()
            torch.cuda.ipc_collect()
        elif device == "mps" and hasattr(torch, "mps"):
            torch.mps.empty_cache()
        elif device == "cpu" and kernel_caches and process_memory_enabled():
            from ._onednn import flush_primitive_cache

            flush_primitive_cache()
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
