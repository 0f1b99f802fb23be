"""Pass shapes: how sorted items are cut into micro-batches (placeholder: today's rule)."""

from __future__ import annotations

from collections.abc import Sequence

__all__ = ["cut_batches"]


def cut_batches(lengths: Sequence[int], caps: Sequence[int], budget: int) -> list[int]:
    """Sizes of consecutive micro-batches over items sorted longest first: a pass ends when an
    item's batch-size cap is reached or when ``longest * (n + 1)`` would pass ``budget``."""
    sizes: list[int] = []
    n = longest = 0
    cap = 0
    for length, item_cap in zip(lengths, caps, strict=True):
        longest_if_added = max(longest, length)
        cap_if_added = min(cap, item_cap) if n else item_cap
        if n and (n >= cap_if_added or longest_if_added * (n + 1) > budget):
            sizes.append(n)
            n, longest_if_added, cap_if_added = 0, length, item_cap
        n += 1
        longest, cap = longest_if_added, cap_if_added
    if n:
        sizes.append(n)
    return sizes
