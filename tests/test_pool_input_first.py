"""The pool's own call methods check their input before they look the model up.

A user calling ``pool.embed(spec, [None])`` or ``pool.score_pairs(spec, [("q", 5)])`` on a cold
spec used to wait for the model's load (seconds to minutes for a real model) before hearing that
the input was bad. The adapters checked first; the pool did not. Every call now refuses bad
input (texts, pairs, batch size, priority) before any load: the spec stays unloaded and no load
is counted. Sync and async alike.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import pytest

from rag_rerank_plugins import ModelPool
from rag_rerank_plugins.exceptions import InvalidInputError
from rag_rerank_plugins.testing import fake_embedder_spec, fake_reranker_spec

BAD_TEXTS: list[Any] = [[None], ["ok", 5], "one string", [b"bytes"]]
BAD_PAIRS: list[Any] = [[("q", None)], [("q",)], ["qp"], [{"q": "p"}], "qp"]


def _no_load(pool: ModelPool, spec: Any, call: Callable[[], Any]) -> None:
    with pytest.raises(InvalidInputError):
        call()
    assert not pool.is_loaded(spec)
    assert pool.stats() == {} or all(s.get("loads", 0) == 0 for s in pool.stats().values())


@pytest.mark.parametrize("texts", BAD_TEXTS)
def test_embed_refuses_bad_texts_before_loading(texts: Any) -> None:
    pool, spec = ModelPool(), fake_embedder_spec("input-first-embed")
    _no_load(pool, spec, lambda: pool.embed(spec, texts))
    _no_load(pool, spec, lambda: asyncio.run(pool.aembed(spec, texts)))


@pytest.mark.parametrize("pairs", BAD_PAIRS)
def test_score_pairs_refuses_bad_pairs_before_loading(pairs: Any) -> None:
    pool, spec = ModelPool(), fake_reranker_spec("input-first-score")
    _no_load(pool, spec, lambda: pool.score_pairs(spec, pairs))
    _no_load(pool, spec, lambda: asyncio.run(pool.ascore_pairs(spec, pairs)))


@pytest.mark.parametrize(
    "kwargs", [{"batch_size": 0}, {"batch_size": 2.5}, {"batch_size": True}, {"priority": "vip"}]
)
def test_bad_batch_size_or_priority_is_refused_before_loading(kwargs: dict[str, Any]) -> None:
    pool = ModelPool()
    emb, rer = fake_embedder_spec("input-first-e"), fake_reranker_spec("input-first-r")
    _no_load(pool, emb, lambda: pool.embed(emb, ["a"], **kwargs))
    _no_load(pool, rer, lambda: pool.score_pairs(rer, [("q", "p")], **kwargs))


def test_good_input_still_loads_once_and_answers() -> None:
    """The checks do not change what a good call gets: a generator of pairs is read once."""
    pool = ModelPool()
    emb, rer = fake_embedder_spec("input-first-ok-e"), fake_reranker_spec("input-first-ok-r")
    vectors = pool.embed(emb, ["a b", "c"])
    assert len(vectors) == 2
    scores = pool.score_pairs(rer, (pair for pair in [("q", "q p"), ("q", "x")]))
    assert len(scores) == 2
    assert scores[0] > scores[1]
    assert pool.spec_stats(emb)["loads"] == 1
    assert pool.spec_stats(rer)["loads"] == 1
    # Lone surrogates are cleaned as before (not refused).
    assert len(pool.embed(emb, ["\ud800 text"])) == 1
