"""Pass shapes: bounded batch sizes and the rule that cuts sorted items into passes.

oneDNN keeps a compiled kernel and its scratch memory per matmul shape, so the CPU passes must
come in a small fixed set of shapes for memory to level off (issue 21; the measurements are in
:mod:`rag_rerank_plugins._shapes`). Their lengths are the backends' part (each pads a pass to
:func:`bucket_length` of its longest item, re-exported here); the sizes are the engine's:

* :func:`batch_size_bucket`: passes hold 1, 2, 3, 4, 6, 8, 12, 16, 24, ... items. With short
  passages (many to a pass) this halved the distinct shapes of 300 SciFact requests (58 -> 29)
  at no measured cost; long ones (2-3 to a pass) are unaffected.
* :func:`cut_batches`: items sorted longest first; a pass ends when an item's batch-size cap is
  reached or when ``longest x (n + 1)`` would pass the token budget, and its size is then
  rounded down to a batch-size bucket (the rest start the next pass). With ``parts`` (the
  parallel CPU device workers), the passes are then evened out over the workers:
  :func:`balanced_budget`.

Measured with ``benchmarks/memory_plateau.py``. Standard library only.
"""

from __future__ import annotations

from collections.abc import Sequence

from .._shapes import bucket_length, buckets_enabled

__all__ = [
    "BALANCE_PASSES_PER_PART",
    "balanced_budget",
    "batch_size_bucket",
    "bucket_length",
    "buckets_enabled",
    "cut_batches",
]


def batch_size_bucket(n: int) -> int:
    """The largest allowed pass size <= ``n``: 1, 2, 3, 4, 6, 8, 12, 16, 24, ... (powers of two
    and 1.5x powers of two)."""
    if n <= 4:
        return n
    power = 1 << (n.bit_length() - 1)
    return power * 3 // 2 if n >= power * 3 // 2 else power


def cut_batches(
    lengths: Sequence[int],
    caps: Sequence[int],
    budget: int,
    *,
    bucket_sizes: bool | None = None,
    parts: int = 1,
) -> list[int]:
    """Sizes of consecutive micro-batches over items sorted longest first.

    ``lengths``: each item's estimated tokens, descending; ``caps``: each item's batch-size cap
    (its request's ``batch_size`` and ``max_batch_size``, whichever is smaller). A pass ends when
    the smallest cap among its items (the next one included) is reached or when
    ``longest x (n + 1)`` would pass ``budget``; a pass always takes at least one item. With
    ``bucket_sizes`` (None: :func:`buckets_enabled`) its size is then rounded down to
    :func:`batch_size_bucket` and the items left over start the next pass. With ``parts`` > 1
    the cut runs under :func:`balanced_budget` instead of ``budget``.
    """
    if bucket_sizes is None:
        bucket_sizes = buckets_enabled()
    if len(caps) != len(lengths):
        raise ValueError(f"{len(lengths)} lengths but {len(caps)} caps")
    if parts > 1:
        budget = balanced_budget(lengths, caps, budget, parts, bucket_sizes=bucket_sizes)
    return _greedy_cut(lengths, caps, budget, bucket_sizes)


#: A round of more passes than this per worker keeps its greedy cut: the tail is then at most
#: ~1/16 of the round, and the search costs ~11 greedy cuts (3000 tiny items: 19 ms).
BALANCE_PASSES_PER_PART = 8


def balanced_budget(
    lengths: Sequence[int], caps: Sequence[int], budget: int, parts: int, *, bucket_sizes: bool
) -> int:
    """The smallest budget <= ``budget`` whose cut has no more passes than ``budget``'s cut
    rounded up to a multiple of ``parts`` (``budget`` itself when that cut has more than
    :data:`BALANCE_PASSES_PER_PART` passes per part).

    Why: parallel CPU workers take passes as they come, so a request's last pass decides its
    latency. Cut greedily, 1 x 20 XLM-R passages made 3 passes at a 3072-token budget (one worker
    ran two, the other one: 4438 ms against 3647 at 2560) and the last pass of a request is often
    a small leftover. The greedy cut is the fewest passes under a budget, so the smallest budget
    allowing the rounded-up count is the even split into that many passes: e.g. 2 workers and
    passes of 1536 + 200 padded tokens become two of ~900.
    """
    if parts <= 1 or len(lengths) <= 1:
        return budget
    count = len(_greedy_cut(lengths, caps, budget, bucket_sizes))
    if count > BALANCE_PASSES_PER_PART * parts:
        return budget  # the last pass is a small part of the round; not worth ~11 more cuts
    target = -(-count // parts) * parts
    low, high = 1, budget  # the cut under ``high`` has at most ``target`` passes
    while low < high:
        middle = (low + high) // 2
        if len(_greedy_cut(lengths, caps, middle, bucket_sizes)) <= target:
            high = middle
        else:
            low = middle + 1
    return high


def _greedy_cut(
    lengths: Sequence[int], caps: Sequence[int], budget: int, bucket_sizes: bool
) -> list[int]:
    sizes: list[int] = []
    start, total = 0, len(lengths)
    while start < total:
        n, longest, cap = 1, lengths[start], caps[start]
        while start + n < total:
            longest_if_added = max(longest, lengths[start + n])
            cap_if_added = min(cap, caps[start + n])
            if n >= cap_if_added or longest_if_added * (n + 1) > budget:
                break
            n, longest, cap = n + 1, longest_if_added, cap_if_added
        if bucket_sizes:
            n = batch_size_bucket(n)
        sizes.append(n)
        start += n
    return sizes
