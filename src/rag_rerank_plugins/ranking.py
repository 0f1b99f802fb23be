"""Turning scores into a ranking: one implementation shared by every adapter.

Rules (documented in the README, tested): order by descending score, ties keep retrieval order;
``top_n=None`` keeps all; ``score_threshold`` drops scores below it; NaN scores rank last and never
pass a threshold. Nothing else removes a document.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import NamedTuple

from .exceptions import ConfigurationError

__all__ = ["Ranked", "rank", "validate_top_n"]


class Ranked(NamedTuple):
    index: int  # type: ignore[assignment]  # position in the input (shadows tuple.index)
    score: float


def validate_top_n(top_n: int | None) -> int | None:
    """None keeps everything; otherwise a positive int (0 or negative is a mistake, not 'none')."""
    if top_n is None:
        return None
    if isinstance(top_n, bool) or not isinstance(top_n, int):
        raise ConfigurationError(f"top_n must be a positive int or None, got {top_n!r}.")
    if top_n <= 0:
        raise ConfigurationError(
            f"top_n must be >= 1 (or None to keep every document), got {top_n}."
        )
    return top_n


def validate_threshold(threshold: float | None) -> float | None:
    if threshold is None:
        return None
    if isinstance(threshold, bool) or not isinstance(threshold, (int, float)):
        raise ConfigurationError(f"score_threshold must be a number or None, got {threshold!r}.")
    if math.isnan(threshold):
        raise ConfigurationError("score_threshold must not be NaN.")
    return float(threshold)


def rank(
    scores: Sequence[float], top_n: int | None = None, score_threshold: float | None = None
) -> list[Ranked]:
    """Indices of ``scores`` best first, cut by ``score_threshold`` then ``top_n``."""
    ranked = sorted(
        (Ranked(i, float(s)) for i, s in enumerate(scores)),
        key=lambda r: (math.isnan(r.score), -r.score if not math.isnan(r.score) else 0.0, r.index),
    )
    if score_threshold is not None:
        ranked = [r for r in ranked if not math.isnan(r.score) and r.score >= score_threshold]
    return ranked if top_n is None else ranked[:top_n]
