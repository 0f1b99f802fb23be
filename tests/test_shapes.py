"""engine.shapes: the bounded set of pass lengths, and the micro-batch cutting rule (issue 21)."""

from __future__ import annotations

import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from rag_rerank_plugins.engine.shapes import (
    BALANCE_PASSES_PER_PART,
    balanced_budget,
    batch_size_bucket,
    bucket_length,
    buckets_enabled,
    cut_batches,
)


def test_bucket_lengths_are_a_small_fixed_set() -> None:
    buckets = {bucket_length(n, 512) for n in range(1, 513)}
    assert len(buckets) <= 16
    assert max(buckets) == 512
    assert all(b % 16 == 0 for b in buckets)


@pytest.mark.parametrize("max_tokens", [None, 128, 300, 512, 514, 8192])
def test_bucket_covers_the_pass_and_respects_the_cap(max_tokens: int | None) -> None:
    for n in range(1, 3000):
        b = bucket_length(n, max_tokens)
        assert b >= n
        if max_tokens is not None and n <= max_tokens:
            assert b <= max_tokens
        if max_tokens is not None and n > max_tokens:
            assert b == n  # never pads past what the tokenizer produced
        if n > 128 and (max_tokens is None or b < max_tokens):
            assert (b - n) / n <= 1 / 4  # at most 25 % on top above the fine range
        if n <= 128:
            assert b - n < 16


def test_bucket_is_monotonic() -> None:
    values = [bucket_length(n, 512) for n in range(1, 600)]
    assert values == sorted(values)


def test_switch(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("RAG_RERANK_SHAPE_BUCKETS", raising=False)
    assert buckets_enabled()
    monkeypatch.setenv("RAG_RERANK_SHAPE_BUCKETS", "0")
    assert not buckets_enabled()


def _reference(lengths: list[int], caps: list[int], budget: int) -> list[int]:
    """The rule as the old scheduler wrote it (Scheduler._micro_batches)."""
    sizes: list[int] = []
    n = longest = cap = 0
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


def test_cut_batches_keeps_the_rule() -> None:
    rng = random.Random(0)
    for _ in range(3000):
        count = rng.randint(0, 80)
        lengths = sorted((rng.randint(1, 600) for _ in range(count)), reverse=True)
        caps = [rng.choice([1, 2, 5, 32, 64]) for _ in range(count)]
        budget = rng.choice([100, 1024, 4096])
        sizes = cut_batches(lengths, caps, budget, bucket_sizes=False)
        assert sizes == _reference(lengths, caps, budget)
        assert sum(sizes) == count
        assert all(s >= 1 for s in sizes)
        rounded = cut_batches(lengths, caps, budget, bucket_sizes=True)
        assert sum(rounded) == count
        assert all(batch_size_bucket(s) == s for s in rounded)
        assert all(s <= c for s, c in zip(rounded, _firsts(rounded, caps), strict=True))


def _firsts(sizes: list[int], caps: list[int]) -> list[int]:
    """The smallest cap of each pass."""
    out, start = [], 0
    for size in sizes:
        out.append(min(caps[start : start + size]))
        start += size
    return out


def test_batch_size_buckets() -> None:
    assert [batch_size_bucket(n) for n in range(1, 14)] == [1, 2, 3, 4, 4, 6, 6, 8, 8, 8, 8, 12, 12]
    sizes = {batch_size_bucket(n) for n in range(1, 257)}
    assert sizes == {1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64, 96, 128, 192, 256}


def test_cut_batches_examples(monkeypatch: pytest.MonkeyPatch) -> None:
    assert cut_batches([], [], 1024) == []
    assert cut_batches([2000], [32], 1024) == [1]  # one item always fits
    assert cut_batches([300] * 7, [32] * 7, 1024) == [3, 3, 1]
    assert cut_batches([10] * 5, [2] * 5, 1024) == [2, 2, 1]
    assert cut_batches([50] * 20, [32] * 20, 1024) == [16, 4]  # 20 fit; sizes are bucketed
    assert cut_batches([50] * 20, [32] * 20, 1024, bucket_sizes=False) == [20]
    monkeypatch.setenv("RAG_RERANK_SHAPE_BUCKETS", "0")
    assert cut_batches([50] * 20, [32] * 20, 1024) == [20]
    with pytest.raises(ValueError, match="caps"):
        cut_batches([1, 2], [1], 1024)


# -- passes evened out over parallel workers -------------------------------------------------------


def _costs(sizes: list[int], lengths: list[int]) -> list[int]:
    """Padded tokens of each pass (its longest item times its size)."""
    out, start = [], 0
    for size in sizes:
        out.append(max(lengths[start : start + size]) * size)
        start += size
    return out


@settings(max_examples=400, deadline=None)
@given(
    st.lists(st.integers(1, 600), max_size=80).map(lambda xs: sorted(xs, reverse=True)),
    st.data(),
    st.sampled_from([300, 1024, 2048]),
    st.integers(2, 4),
    st.booleans(),
)
def test_balanced_cut_is_the_even_split_into_whole_rounds_of_workers(
    lengths: list[int], data: st.DataObject, budget: int, parts: int, buckets: bool
) -> None:
    caps = data.draw(
        st.lists(st.sampled_from([1, 2, 5, 32]), min_size=len(lengths), max_size=len(lengths))
    )
    greedy = cut_batches(lengths, caps, budget, bucket_sizes=buckets)
    even = cut_batches(lengths, caps, budget, bucket_sizes=buckets, parts=parts)
    assert sum(even) == len(lengths)
    assert all(size >= 1 for size in even)
    assert all(s <= c for s, c in zip(even, _firsts(even, caps), strict=True)), "caps hold"
    if buckets:
        assert all(batch_size_bucket(s) == s for s in even)
    if len(greedy) > BALANCE_PASSES_PER_PART * parts:
        assert even == greedy, "many passes: the tail is small, the greedy cut stays"
        return
    # never more passes than the greedy cut's count rounded up to whole rounds of workers
    assert len(even) <= -(-len(greedy) // parts) * parts
    # it is the greedy cut under a smaller budget, so no pass grows
    smaller = balanced_budget(lengths, caps, budget, parts, bucket_sizes=buckets)
    assert smaller <= budget
    assert even == cut_batches(lengths, caps, smaller, bucket_sizes=buckets)
    if lengths:
        assert max(_costs(even, lengths)) <= max(_costs(greedy, lengths))
    # and the smallest such budget: one token less needs more passes
    if smaller > 1 and len(lengths) > 1:
        tighter = cut_batches(lengths, caps, smaller - 1, bucket_sizes=buckets)
        assert len(tighter) > -(-len(greedy) // parts) * parts


def test_balanced_cut_examples() -> None:
    # 7 equal items, 2 workers: 3 + 3 + 1 leaves one worker a lone last pass; 2 + 2 + 2 + 1 not
    assert cut_batches([300] * 7, [32] * 7, 1024, bucket_sizes=False) == [3, 3, 1]
    assert cut_batches([300] * 7, [32] * 7, 1024, bucket_sizes=False, parts=2) == [2, 2, 2, 1]
    # a full pass and a small leftover: the longest pass shrinks (1600 -> 1200 padded tokens)
    lengths = [400] * 3 + [100] * 2
    assert cut_batches(lengths, [32] * 5, 1600, bucket_sizes=False) == [4, 1]
    even = cut_batches(lengths, [32] * 5, 1600, bucket_sizes=False, parts=2)
    assert even == [3, 2]
    assert _costs(even, lengths) == [1200, 200]
    # one pass on two workers: split in two
    assert cut_batches([200] * 4, [32] * 4, 1024, bucket_sizes=False, parts=2) == [2, 2]
    # what cannot be split stays whole; one worker changes nothing
    assert cut_batches([900], [32], 1024, parts=2) == [1]
    assert cut_batches([300] * 7, [32] * 7, 1024, bucket_sizes=False, parts=1) == [3, 3, 1]
    assert balanced_budget([], [], 1024, 2, bucket_sizes=True) == 1024
    # 17 passes of 1 on 2 workers: more than 8 a worker, the greedy cut stays
    assert cut_batches([900] * 17, [32] * 17, 1024, parts=2) == [1] * 17
    assert cut_batches([900] * 15, [32] * 15, 1024, parts=2) == [1] * 15  # can't split further
