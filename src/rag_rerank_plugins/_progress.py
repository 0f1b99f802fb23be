"""Optional tqdm progress bars for bulk work (off unless an adapter asks for one).

tqdm is imported only when a bar is shown. Without tqdm, or when tqdm cannot make a bar (a Jupyter
kernel without ipywidgets, where tqdm.auto picks the widget bar), the work runs unchanged and one
warning is logged: a missing progress bar is never a reason to fail an embedding call.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, Protocol

__all__ = ["Progress", "chunks", "progress_bar"]

logger = logging.getLogger(__name__)
_warned = False


class Progress(Protocol):
    def update(self, n: int = 1) -> Any: ...


class _NoBar:
    def update(self, n: int = 1) -> None:
        return None


@contextmanager
def progress_bar(total: int, desc: str, enabled: bool) -> Iterator[Progress]:
    """A tqdm bar over ``total`` items (on stderr), or a no-op when disabled, when tqdm is absent
    or when it cannot make a bar (see the module docstring)."""
    global _warned
    if not enabled:
        yield _NoBar()
        return
    try:
        from tqdm.auto import tqdm
    except ImportError:
        if not _warned:
            _warned = True
            logger.warning("rag-rerank: show_progress=True but tqdm is not installed; no bar.")
        yield _NoBar()
        return
    try:
        # In a Jupyter kernel tqdm.auto may pick the widget bar, whose constructor raises
        # ImportError("IProgress not found ...") without ipywidgets (tqdm before its own
        # fallback, or a broken widget install). Only the bar's creation is guarded: errors of
        # the work inside the ``with`` still propagate.
        bar = tqdm(total=total, desc=desc, unit="text")
    except Exception as exc:
        if not _warned:
            _warned = True
            logger.warning(
                "rag-rerank: show_progress=True but no progress bar (%s); no bar.", str(exc)
            )
        yield _NoBar()
        return
    with bar:
        yield bar


def chunks(items: list[str], size: int) -> Iterator[list[str]]:
    """``items`` in consecutive slices of at most ``size``."""
    for start in range(0, len(items), size):
        yield items[start : start + size]
