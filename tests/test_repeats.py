"""Repeated items in one call are computed once, and every copy gets the same answer.

What a user relies on: a retriever that returns the same chunk twice (two sources, overlapping
indexes) gets both copies back with exactly equal scores, so the copies rank in input order as
stock's stable sort ranks them (before, copies scored in passes of other shapes could differ in
their last bits and swap, run to run); the model does each distinct item's work once; every
copy of a vector is a list of its own; stats count what the caller asked for.
"""

from __future__ import annotations

import asyncio
import threading
import time
import uuid
from collections.abc import Sequence
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from rag_rerank_plugins import ModelPool, ModelSpec
from rag_rerank_plugins.backends import EmbedderModel, RerankerModel, register_backend
from rag_rerank_plugins.cache import distinct, spread
from rag_rerank_plugins.engine_config import EngineConfig
from rag_rerank_plugins.exceptions import InferenceError, RequestTimeoutError
from rag_rerank_plugins.testing import FakeEmbedder, FakeReranker


class SeenReranker(RerankerModel):
    """A scheduled reranker that records every pair its passes receive."""

    thread_safe = False

    def __init__(self) -> None:
        self.seen: list[tuple[str, str]] = []
        self._fake = FakeReranker()

    def score_pairs(self, pairs: Sequence[tuple[str, str]], batch_size: int) -> list[float]:
        self.seen.extend(pairs)
        return self._fake.score_pairs(pairs, batch_size)


class SeenEmbedder(FakeEmbedder):
    """A thread-safe embedder (the direct stage) that records every text it embeds."""

    def __init__(self) -> None:
        super().__init__(dim=8)
        self.seen: list[str] = []
        self._lock = threading.Lock()

    def embed(self, texts: Sequence[str], **kwargs: Any) -> list[list[float]]:
        with self._lock:
            self.seen.extend(texts)
        return super().embed(texts, **kwargs)


def _spec(model: RerankerModel | EmbedderModel, kind: str) -> ModelSpec:
    name = f"seen-{uuid.uuid4().hex[:8]}"
    register_backend(name, lambda spec, pool: model, kind)
    return ModelSpec("m", backend=name, device="cpu")


@settings(max_examples=200, deadline=None)
@given(st.lists(st.sampled_from(["a", "b", "c", ("q", "a"), ("q", "b"), "", ("", "")])))
def test_distinct_then_spread_gives_every_item_its_own_result(items: list) -> None:
    unique, slots = distinct(items)
    assert len(set(unique)) == len(unique) == len(set(items))  # each distinct item once
    assert [unique[s] for s in slots] == items  # every item maps back to itself
    results = [[repr(u)] for u in unique]  # list results, as vectors are
    out = spread(results, slots)
    assert out == [[repr(i)] for i in items]
    assert len({id(v) for v in out}) == len(out)  # no two items share one list object


def test_no_repeats_costs_no_copy() -> None:
    items = [("q", "a"), ("q", "b")]
    unique, slots = distinct(items)
    results = [1.0, 2.0]
    assert unique is items
    assert spread(results, slots) is results


@pytest.mark.parametrize("run_async", [False, True])
def test_repeated_pairs_are_scored_once_and_every_copy_answered(run_async: bool) -> None:
    model = SeenReranker()
    pool = ModelPool()
    spec = _spec(model, "reranker")
    passages = ["cats purr", "dogs bark", "cats purr", "", "paris", "dogs bark", "cats purr"]
    pairs = [("pets", p) for p in passages]
    try:
        if run_async:
            scores = asyncio.run(pool.ascore_pairs(spec, pairs))
        else:
            scores = pool.score_pairs(spec, pairs)
        assert scores == FakeReranker().score_pairs(pairs, 1)  # input order, every copy
        assert sorted(model.seen) == sorted(set(pairs))  # the model saw each pair once
        assert scores[0] == scores[2] == scores[6]
        assert scores[1] == scores[5]
        stats = pool.spec_stats(spec)
        assert stats["items"] == len(pairs)  # what the caller asked for
        assert stats["calls"] == 1
    finally:
        pool.clear()


def test_repeats_and_the_score_cache_together() -> None:
    """A repeat inside a call and a cache hit from an earlier call: both answered, the model
    sees only what neither covers."""
    model = SeenReranker()
    pool = ModelPool(config=EngineConfig(score_cache_size=100))
    spec = _spec(model, "reranker")
    try:
        first = pool.score_pairs(spec, [("q", "a"), ("q", "b")])
        model.seen.clear()
        second = pool.score_pairs(spec, [("q", "b"), ("q", "c"), ("q", "c"), ("q", "a")])
        assert model.seen == [("q", "c")]
        assert second[0] == first[1]
        assert second[3] == first[0]
        assert second[1] == second[2]
    finally:
        pool.clear()


@pytest.mark.parametrize("run_async", [False, True])
def test_repeated_texts_are_embedded_once_and_copies_are_independent(run_async: bool) -> None:
    model = SeenEmbedder()
    pool = ModelPool()
    spec = _spec(model, "embedder")
    texts = ["alpha", "beta", "alpha", "alpha", "gamma", "beta"]
    try:
        vectors = asyncio.run(pool.aembed(spec, texts)) if run_async else pool.embed(spec, texts)
        want = FakeEmbedder(dim=8).embed(texts, batch_size=32, is_query=False)
        assert vectors == want
        assert sorted(model.seen) == ["alpha", "beta", "gamma"]
        vectors[0][0] = 123.0  # a caller edits one vector in place
        assert vectors[2] == vectors[3] == want[2]
        assert vectors[2][0] != 123.0
        assert pool.spec_stats(spec)["items"] == len(texts)
    finally:
        pool.clear()


def test_a_failed_call_with_repeats_fails_every_copy_once() -> None:
    """A repeat changes nothing about failures: the call raises, once."""

    class Failing(SeenReranker):
        def score_pairs(self, pairs: Sequence[tuple[str, str]], batch_size: int) -> list[float]:
            raise ValueError("simulated failure")

    pool = ModelPool()
    spec = _spec(Failing(), "reranker")
    try:
        with pytest.raises((InferenceError, ValueError)):
            pool.score_pairs(spec, [("q", "a"), ("q", "a")])
        assert pool.spec_stats(spec)["errors"] == 1
    finally:
        pool.clear()


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_copies_on_a_real_cross_encoder_tie_exactly_in_retrieval_order(
    real_ce_path: str, dtype: str
) -> None:
    """Copies of one passage that would land in passes of different shapes (caller batch size
    3, a longer passage sharing the first pass) still get one score, and rank in input order."""
    from langchain_core.documents import Document

    from rag_rerank_plugins.langchain import SharedRerankCompressor

    copy = "Aspirin lowers the risk of heart attack in adults over fifty."
    texts = [copy, "x " * 150 + "aspirin trial", copy, copy, "short", copy]
    docs = [Document(page_content=t, id=f"d{i}") for i, t in enumerate(texts)]
    pool = ModelPool()
    try:
        compressor = SharedRerankCompressor(
            model=real_ce_path, device="cpu", dtype=dtype, top_n=None, batch_size=3, pool=pool
        )
        out = compressor.compress_documents(docs, "does aspirin prevent heart attacks?")
        scores = {d.id: d.metadata["relevance_score"] for d in out}
        assert scores["d0"] == scores["d2"] == scores["d3"] == scores["d5"]
        copies = [d.id for d in out if d.page_content == copy]
        assert copies == ["d0", "d2", "d3", "d5"]
    finally:
        pool.clear()


class Broken(RerankerModel):
    """A scheduled reranker that answers wrong: NaN, one score too few, or too slowly."""

    thread_safe = False

    def __init__(self, how: str) -> None:
        self.how = how

    def score_pairs(self, pairs: Sequence[tuple[str, str]], batch_size: int) -> list[float]:
        if self.how == "slow":
            time.sleep(0.5)
        scores = [0.5] * len(pairs)
        if self.how == "nan":
            scores[0] = float("nan")
        return scores[:-1] if self.how == "short" else scores


@pytest.mark.parametrize(
    ("how", "error"),
    [("nan", InferenceError), ("short", InferenceError), ("slow", RequestTimeoutError)],
)
@pytest.mark.parametrize("run_async", [False, True])
def test_a_wrong_answer_or_a_timeout_with_repeats_fails_the_call(
    how: str, error: type[Exception], run_async: bool
) -> None:
    """Spreading results happens only after the engine checked them: a NaN, a short answer
    or a timeout fails the whole call, never leaves a copy without a score."""
    pool = ModelPool()
    spec = _spec(Broken(how), "reranker")
    pairs = [("q", "a"), ("q", "b"), ("q", "a")]
    try:

        def call() -> list[float]:
            if run_async:
                return asyncio.run(pool.ascore_pairs(spec, pairs, timeout=0.1))
            return pool.score_pairs(spec, pairs, timeout=0.1)

        with pytest.raises(error):
            call()
    finally:
        pool.clear()


def test_long_texts_are_cached_by_digest_not_held() -> None:
    """The caches are bounded by entry count, so a key must not hold a long text: 1024 queries
    of 1 MB pinned 1 GiB. Long texts are keyed by digest; hits, misses and near-twins still
    behave as with the text itself (a lone surrogate is a text too)."""
    import sys

    from rag_rerank_plugins.cache import LONG_TEXT, TTLCache

    cache = TTLCache(8, 60.0)
    big = "x" * 1_000_000
    cache.put((big, "task"), 1.0)
    cache.put(big + "\ud800", 2.0)
    assert cache.get(("x" * 1_000_000, "task")) == 1.0  # an equal text, another object
    assert cache.get(big + "\ud800") == 2.0
    assert cache.get(("x" * 999_999 + "y", "task")) is TTLCache.MISSING
    assert cache.get(("x" * (LONG_TEXT + 1), "task")) is TTLCache.MISSING
    parts = [p for key in cache._data for p in (key if isinstance(key, tuple) else (key,))]
    assert sum(sys.getsizeof(part) for part in parts) < 1000


def test_a_long_query_hits_the_query_cache_without_being_held() -> None:
    model = SeenEmbedder()
    pool = ModelPool()
    spec = _spec(model, "embedder")
    query = "word " * 100_000
    try:
        first = pool.embed(spec, [query], is_query=True)
        second = pool.embed(spec, ["word " * 100_000], is_query=True)
        assert second == first
        assert model.seen == [query]  # the second call was a cache hit
        assert all(len(key[0]) < 100 for key in pool.get(spec)._query_cache._data)
    finally:
        pool.clear()
