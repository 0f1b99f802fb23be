"""Helpers every benchmark shares, so the figures they print are computed one way.

* :func:`spearman`: rank correlation with ties given their average rank. The scripts used to rank
  with ``argsort(argsort(x))``, which breaks ties by position: with tied scores (INT8 and BF16
  modes tie often) the figure depended on the passage order, not on the scores.
* :func:`pin_threads` / :func:`threads_line`: one thread budget, set explicitly and identically
  for every system a script compares (ours, LangChain, sentence-transformers, ...). An inherited
  ``OMP_NUM_THREADS=1`` once gave the stock peers one thread and our engine two; each report now
  says which budget it ran under.

Imports only the standard library at the top: ``peer_worker.py`` may run under ``.venv-peers``.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence

#: The variables that set a process's compute threads: OpenMP (torch, ONNX Runtime's default
#: pool) and our engine's own (``RAG_RERANK_TORCH_THREADS``).
THREAD_VARIABLES = ("OMP_NUM_THREADS", "RAG_RERANK_TORCH_THREADS")


def spearman(got: Sequence[float], want: Sequence[float]) -> float:
    """Spearman's rho of ``got`` against ``want``, tied values sharing their average rank
    (``scipy.stats.spearmanr``); NaN when either side is constant."""
    import warnings

    from scipy.stats import spearmanr

    if len(got) != len(want):
        raise ValueError(f"{len(got)} scores against {len(want)}: score the same pairs")
    with warnings.catch_warnings():  # a constant input: NaN, which the tables print as is
        warnings.simplefilter("ignore")
        return float(spearmanr(list(got), list(want)).statistic)


def usable_cores() -> int:
    """The cores this process may run on (its CPU affinity), at least 1."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not Linux
        return max(1, os.cpu_count() or 1)


def pin_threads(threads: int | None = None) -> int:
    """Give this process and every child it starts the same compute thread budget.

    Sets each of :data:`THREAD_VARIABLES` to ``threads`` (default: the usable cores), whatever
    was inherited, and torch's intra-op threads when torch is already imported (it reads
    ``OMP_NUM_THREADS`` only at import). Call it at the start of ``main``, before any system is
    built, so that stock libraries and our engine compute on the same number of threads.
    Returns the budget.
    """
    n = threads if threads is not None and threads > 0 else usable_cores()
    for name in THREAD_VARIABLES:
        os.environ[name] = str(n)
    torch = sys.modules.get("torch")
    if torch is not None:
        torch.set_num_threads(n)
    return n


def torch_threads() -> int | None:
    """``torch.get_num_threads()`` when torch is imported here, else None (no import for it)."""
    torch = sys.modules.get("torch")
    return int(torch.get_num_threads()) if torch is not None else None


def threads_line(torch_threads_seen: object = None) -> str:
    """The report header line naming the thread budget: the variables as set, and
    ``torch.get_num_threads()`` (``torch_threads_seen`` when given, e.g. per child process)."""
    seen = torch_threads() if torch_threads_seen is None else torch_threads_seen
    names = ", ".join(f"{name}={os.environ.get(name, 'unset')}" for name in THREAD_VARIABLES)
    return f"threads: {names}, torch.get_num_threads()={seen}"
