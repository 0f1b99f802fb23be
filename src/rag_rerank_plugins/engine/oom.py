"""Out-of-memory recovery: free the failed pass first, shrink the budget, split in halves.

The failed pass is dropped *before* anything is retried: its exception, traceback and the frames
holding its activations are released (the worker leaves the ``except`` block first, collects
garbage and empties the device cache), then the batch is split in halves, down to one item, run
one at a time. The budget shrinks to half the failed pass's padded tokens, so the next request
does not hit the same wall. An item that does not fit alone fails with ``OutOfMemoryError``.

A thread-safe model, called directly (no queue, no passes of ours: :func:`run_direct`), gets the
same treatment on its items: freed first, then halves, down to one item.
"""

from __future__ import annotations

import gc
import logging
import time
from collections.abc import Sequence
from typing import Any, Protocol

from .._exitsafe import native_section
from ..backends.base import LoadedModel, Prepared, Task
from ..exceptions import OutOfMemoryError
from ..stats import Metrics
from .batching import Batch
from .request import Entry

__all__ = ["OutOfMemory", "recover_from_oom", "run_alone", "run_direct"]

logger = logging.getLogger(__name__)


class OutOfMemory(Exception):
    """Internal signal: a pass ran out of memory (the original error is already dropped)."""


class Stages(Protocol):
    """What recovery needs of the worker (a protocol: no import edge back to the worker)."""

    name: str
    metrics: Metrics
    budget: int

    def model(self) -> LoadedModel: ...
    def prepare(self, task: Task, items: list[Any]) -> Prepared: ...
    def deliver(self, batch: Batch, results: Any) -> None: ...
    def fail(self, entries: list[Entry], exc: BaseException) -> None: ...


def release_memory(stages: Stages) -> None:
    gc.collect()  # tracebacks and activations of the failed pass may sit in cycles
    try:
        stages.model().free_cache()
    # BaseException too: raised on the worker thread it interrupts nobody (signals go to the
    # main thread), and the split below is still the best chance to serve the requests.
    except BaseException:
        logger.warning(
            "%s: free_cache() failed after running out of memory", stages.name, exc_info=True
        )


def shrink_budget(stages: Stages, failed: Batch) -> None:
    """Half the failed pass's padded tokens, but room for its longest item alone."""
    longest = max(req.lengths[i] for req, i in failed.entries)
    learned = max(longest, failed.padded_estimate // 2)
    if learned < stages.budget:
        logger.warning(
            "%s: token budget %d -> %d padded tokens per pass after running out of memory",
            stages.name,
            stages.budget,
            learned,
        )
        stages.budget = learned
        stages.metrics.token_budget = learned


def recover_from_oom(stages: Stages, batch: Batch) -> None:
    """Free the failed pass, shrink the budget, then run the batch in halves (iteratively: no
    frame of a failed pass stays alive while its halves run)."""
    release_memory(stages)
    shrink_budget(stages, batch)
    stack: list[list[Entry]] = [batch.entries]
    while stack:
        entries = [e for e in stack.pop() if not e[0].done]
        if not entries or not run_alone(stages, entries):
            continue
        if len(entries) == 1:
            request, index = entries[0]
            stages.fail(
                entries,
                OutOfMemoryError(
                    f"{stages.name}: out of memory on a single item "
                    f"({request.lengths[index]} tokens est.). Lower max_length, use a smaller "
                    "dtype, or move the model to a larger device."
                ),
            )
            continue
        stages.metrics.bump("oom_splits")
        logger.warning("%s: out of memory on %d items; splitting", stages.name, len(entries))
        half = len(entries) // 2
        stack.extend([entries[half:], entries[:half]])  # first half runs first


def run_alone(stages: Stages, entries: list[Entry]) -> bool:
    """Run one pass start to end; a failure fails ``entries`` (through ``stages.fail``). True
    when it ran out of memory (already cleaned up)."""
    batch = Batch(entries)
    try:
        try:
            model = stages.model()
            prepared = stages.prepare(batch.task, batch.items)
            start = time.perf_counter()
            pending = model.forward(batch.task, prepared)
            batch.measure(prepared)
            results = model.finish(batch.task, pending)
            batch.device_seconds = time.perf_counter() - start
            del pending, prepared
        except Exception as exc:
            if not stages.model().is_oom(exc):
                raise
            raise OutOfMemory from None
    except OutOfMemory:
        release_memory(stages)
        shrink_budget(stages, batch)
        return True
    except BaseException as exc:
        stages.fail(entries, exc)
        return False
    stages.deliver(batch, results)
    return False


def run_direct(
    model: LoadedModel,
    task: Task,
    items: Sequence[Any],
    batch_size: int,
    name: str,
    metrics: Metrics | None = None,
) -> Any:
    """``model.run`` on ``items`` (its result as it is, for the caller to validate); on
    out-of-memory the failed call is dropped, memory freed, and the items run in halves
    (iteratively), as a scheduled pass is. An item that does not fit alone raises
    ``OutOfMemoryError``. Before, such a call failed as a plain ``InferenceError`` where a
    scheduled model's was split."""
    results: list[Any] = []
    stack = [(0, len(items))]
    while stack:
        start, end = stack.pop()
        try:
            try:
                with native_section(model.native):  # not an HTTP call: exit waits for it
                    part = model.run(task, items[start:end], batch_size)
                if start == 0 and end == len(items):
                    return part  # the whole call: validated as it is (check_results)
                results.extend(part)
                continue
            except Exception as exc:
                if not model.is_oom(exc):
                    raise
                raise OutOfMemory from None  # drop the failed call's traceback and frames
        except OutOfMemory:
            pass
        gc.collect()
        try:
            model.free_cache()
        except BaseException:
            logger.warning(
                "%s: free_cache() failed after running out of memory", name, exc_info=True
            )
        if end - start == 1:
            raise OutOfMemoryError(
                f"{name}: out of memory on a single item. Lower max_length, use a smaller dtype, "
                "or move the model to a larger device."
            )
        logger.warning("%s: out of memory on %d items; splitting", name, end - start)
        if metrics is not None:  # counted as a scheduled pass's split is (stats, /metrics)
            metrics.bump("oom_splits")
        middle = (start + end) // 2
        stack.extend([(middle, end), (start, middle)])  # first half runs first
    return results
