"""Locks that are new in a forked child, and hooks for caches that must not cross a fork.

Why: a lock that a parent thread held at ``fork()`` stays held in the child forever (that thread
does not exist there), so the child's first call taking it hangs. The pool renews its own locks
(:mod:`.pool.process`); every other lock on a call path (a device worker's CPU thread binding, a
window planner's tokenizer, an ONNX session opening, the backend registry, a model's
construction) is a :class:`ForkSafeLock`, renewed here by one hook. A cache whose entries a
parent thread may have been using at the fork (a window planner's tokenizer copy) registers a
hook with :func:`at_fork` that empties it in the child.
"""

from __future__ import annotations

import os
import threading
import weakref
from collections.abc import Callable
from typing import Any

__all__ = ["ForkSafeLock", "at_fork"]


class ForkSafeLock:
    """A :class:`threading.Lock` (``with``, ``acquire``, ``release``, ``locked``), or with
    ``reentrant=True`` a :class:`threading.RLock` (``locked`` then unavailable), that is a new,
    unheld lock in a forked child."""

    __slots__ = ("__weakref__", "_lock", "_reentrant")

    def __init__(self, reentrant: bool = False) -> None:
        self._reentrant = reentrant
        self._lock: Any = threading.RLock() if reentrant else threading.Lock()
        _LOCKS.add(self)

    def acquire(self, blocking: bool = True, timeout: float = -1) -> bool:
        return self._lock.acquire(blocking, timeout)

    def release(self) -> None:
        self._lock.release()

    def locked(self) -> bool:
        return self._lock.locked()

    def __enter__(self) -> bool:
        return self._lock.acquire()

    def __exit__(self, *exc: Any) -> None:
        self._lock.release()

    def _renew(self) -> None:
        self._lock = threading.RLock() if self._reentrant else threading.Lock()


# Kept across a module reload (a notebook's %autoreload): locks made before it are renewed too.
_LOCKS: weakref.WeakSet[ForkSafeLock] = globals().get("_LOCKS") or weakref.WeakSet()
_HOOKS: list[Callable[[], None]] = globals().get("_HOOKS") or []


def at_fork(hook: Callable[[], None]) -> Callable[[], None]:
    """Run ``hook`` in every forked child (after the locks are renewed); returns it."""
    _HOOKS.append(hook)
    return hook


def _after_fork_in_child() -> None:
    for lock in list(_LOCKS):
        lock._renew()
    for hook in list(_HOOKS):
        hook()


if hasattr(os, "register_at_fork") and not globals().get("_registered"):
    os.register_at_fork(after_in_child=_after_fork_in_child)
    _registered = True
