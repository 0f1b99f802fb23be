"""Ranking rules every adapter shares: order, ties, top_n, threshold, NaN."""

from __future__ import annotations

import math

import pytest

from rag_rerank_plugins import ConfigurationError
from rag_rerank_plugins.ranking import rank, validate_threshold, validate_top_n


def test_descending_with_ties_in_retrieval_order() -> None:
    assert [r.index for r in rank([0.1, 0.9, 0.5, 0.9])] == [1, 3, 2, 0]


def test_top_n_and_threshold_are_the_only_filters() -> None:
    scores = [0.1, 0.9, 0.5, 0.7]
    assert [r.index for r in rank(scores, top_n=2)] == [1, 3]
    assert [r.index for r in rank(scores, score_threshold=0.5)] == [1, 3, 2]
    assert [r.index for r in rank(scores, top_n=10)] == [1, 3, 2, 0]
    assert rank(scores, score_threshold=2.0) == []


def test_nan_scores_rank_last_and_never_pass_a_threshold() -> None:
    scores = [math.nan, 0.2, -math.inf, 0.4]
    assert [r.index for r in rank(scores)] == [3, 1, 2, 0]
    assert [r.index for r in rank(scores, score_threshold=-10)] == [3, 1]


@pytest.mark.parametrize("bad", [0, -1, 1.5, True, "3"])
def test_bad_top_n(bad: object) -> None:
    with pytest.raises(ConfigurationError):
        validate_top_n(bad)  # type: ignore[arg-type]


def test_bad_threshold() -> None:
    with pytest.raises(ConfigurationError):
        validate_threshold(math.nan)
    assert validate_threshold(1) == 1.0
