"""One builder per cache entry across processes: the others wait, then load what it built.

Why: the export cache (:mod:`._onnx_common`) and the IR cache (:mod:`._openvino_common`) are
shared by every process on a host, and a service's workers start together (``gunicorn -w 4``,
``uvicorn --workers 4``, one process per pod on a shared volume). Each worker that found no entry
used to build its own: the atomic rename kept the result correct (the first publish wins, the
rest are thrown away), but every builder held the torch model plus the exporter's copies at once:
N workers peaked at N exports' memory, on the boxes the mission is about, and spent the CPU of N
exports to keep one (``benchmarks/cold_start_workers.py`` measures it).

What: :func:`build_lock` is held around the second look and the build of one entry: an
advisory ``flock`` on ``.lock-<entry name>`` beside the entry, which the kernel releases when
its holder exits, however it exits: a builder killed mid-export (SIGKILL, the OOM killer) never
leaves the others waiting. A waiter logs that it waits, keeps waiting while the builder lives (a
conversion of a large model takes minutes), then looks again and loads the published entry.

The holder removes the lock file before it lets go, so a cache holds no lock files once its
builds are done (users and tests list their cache folders). That is why this is not
``filelock``: its files must stay, since a process waiting on a removed file would lock an inode
no newcomer sees. Here a process that got the lock checks that the file it locked is still the
one at the path, and tries again if not, so removing it is safe.

Threads of one process first take a per-entry thread lock here (so many threads loading specs
that share an entry build it once, also where no ``flock`` can be taken); it replaced the two
per-cache registries of thread locks the ONNX and IR caches each kept.

Only builds take it. A cached entry loads without it, so a read-only cache still loads. Where
the lock cannot be taken (a folder the process may not write: the build then fails naming the
folder; a file system without ``flock``; Windows), the build runs unlocked, as before: correct
(the first rename wins), only wasteful.

Standard library only.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import time
from collections.abc import Iterator
from pathlib import Path

from .._forksafe import ForkSafeLock, at_fork

__all__ = ["LOCK_PREFIX", "POLL_S", "WAIT_LOG_S", "build_lock", "lock_path"]

logger = logging.getLogger("rag_rerank_plugins")

#: The lock file of entry ``X`` is ``.lock-X`` in the same folder.
LOCK_PREFIX = ".lock-"
#: A waiter logs again after every this many seconds of waiting.
WAIT_LOG_S = 30.0
#: How often a waiter tries the lock (a build takes seconds to minutes).
POLL_S = 0.1

_thread_locks: dict[Path, threading.Lock] = {}
_thread_locks_guard = ForkSafeLock()
#: A child does not hold its parent's builds: their per-entry locks start over there.
at_fork(_thread_locks.clear)


def lock_path(entry: Path) -> Path:
    """The lock file that guards building ``entry``."""
    return entry.parent / f"{LOCK_PREFIX}{entry.name}"


@contextlib.contextmanager
def build_lock(entry: Path, what: str) -> Iterator[bool]:
    """Hold the cross-process lock for building ``entry`` (``what`` names it in the log).

    Yields whether the lock is held (False: it could not be taken, and the caller builds
    unlocked, as every process did before). Blocks while another process builds the entry; the
    caller must look for the entry again inside the block before building it. Threads of this
    process wait on the entry's thread lock first, so at most one of them holds or waits for the
    file lock.
    """
    with _thread_locks_guard:
        in_process = _thread_locks.setdefault(entry, threading.Lock())
    with in_process:
        path = lock_path(entry)
        try:
            fd = _acquire(path, entry, what)
        except OSError as exc:  # a folder we may not write, a file system without flock
            logger.debug("rag-rerank: building %s unlocked (%s)", entry, exc)
            fd = None
        try:
            yield fd is not None
        finally:
            if fd is not None:
                _release(path, fd)


def _acquire(path: Path, entry: Path, what: str) -> int | None:
    """The descriptor of the locked lock file, once this process holds it; None without
    ``flock`` (Windows)."""
    try:
        import fcntl
    except ImportError:
        return None
    path.parent.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    logged = 0.0
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)  # less the umask, as the entries
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            waited = time.monotonic() - started
            if not logged:
                logger.info(
                    "rag-rerank: another process is building the %s %s: waiting for it",
                    what,
                    entry,
                )
                logged = waited or 1e-9
            elif waited - logged >= WAIT_LOG_S:
                logger.info("rag-rerank: still waiting for the %s %s (%.0f s)", what, entry, waited)
                logged = waited
            time.sleep(POLL_S)
            continue
        except BaseException:
            os.close(fd)
            raise
        if _still_at(path, fd):
            return fd
        os.close(fd)  # its holder removed it on release: lock the file now at the path


def _still_at(path: Path, fd: int) -> bool:
    """Whether the locked file ``fd`` is the one at ``path`` (not removed or replaced since it
    was opened)."""
    try:
        there = os.stat(path)
    except FileNotFoundError:
        return False
    mine = os.fstat(fd)
    return (there.st_dev, there.st_ino) == (mine.st_dev, mine.st_ino)


def _release(path: Path, fd: int) -> None:
    """Remove the lock file while still holding it (a waiter that then gets it sees it gone and
    tries again on a fresh one), then let go."""
    try:
        with contextlib.suppress(OSError):
            os.unlink(path)
    finally:
        os.close(fd)  # releases the flock
