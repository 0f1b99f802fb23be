"""The checked seam between a backend's output and the callers: validated once, here.

Every result list a backend returns, scheduled or direct, passes :func:`check_results` before any
caller sees it. A wrong count, a result of the wrong type, or a non-finite number is an
:class:`~rag_rerank_plugins.exceptions.InferenceError` naming the model, never a short list, a
coerced string, or a NaN that ``sorted`` places anywhere (and ``+inf`` first).

NaN and infinity have one behaviour everywhere: they are rejected here. A score of NaN has no
rank, and JSON has no way to write it; a model that produces one is broken for that input
(an FP16 overflow, a corrupt checkpoint), and saying so beats ranking by it.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

from ..backends.base import Task
from ..exceptions import InferenceError

__all__ = ["check_results"]


def _bad(name: str, what: str) -> InferenceError:
    return InferenceError(
        f"{name} returned {what}. This is a bug in the backend or the model (for a non-finite "
        "value: an FP16/BF16 overflow or broken weights; try dtype='float32'); the request was "
        "failed instead of returning it."
    )


def _as_list(name: str, results: Any, count: int) -> list[Any]:
    if results is None or isinstance(results, (str, bytes)) or not isinstance(results, Iterable):
        raise _bad(name, f"{type(results).__name__} instead of {count} results")
    listed = list(results)  # a generator (or array) of the right length is fine
    if len(listed) != count:
        raise _bad(name, f"{len(listed)} results for {count} items")
    return listed


def _score(name: str, value: Any, index: int) -> float:
    if value is None or isinstance(value, (str, bytes)):  # float("1.5") would hide a bug
        raise _bad(name, f"a {type(value).__name__} as the score of item #{index}")
    try:
        score = float(value)  # Python, NumPy and 0-d tensor scalars
    except (TypeError, ValueError):
        raise _bad(name, f"a {type(value).__name__} as the score of item #{index}") from None
    if not math.isfinite(score):
        raise _bad(name, f"a non-finite score ({score}) for item #{index}")
    return score


def _vector(name: str, value: Any, index: int, dimension: int | None) -> list[Any]:
    if value is None or isinstance(value, (str, bytes)) or not isinstance(value, Iterable):
        raise _bad(name, f"a {type(value).__name__} as the vector of text #{index}")
    vector = value if isinstance(value, list) else getattr(value, "tolist", lambda: list(value))()
    try:
        total = float(sum(vector))  # one C loop; NaN or inf anywhere makes the sum non-finite
    except (TypeError, ValueError):
        raise _bad(name, f"a vector with non-numeric values for text #{index}") from None
    if dimension is not None and len(vector) != dimension:
        raise _bad(name, f"a {len(vector)}-dimensional vector for text #{index}, not {dimension}")
    if not math.isfinite(total):
        raise _bad(name, f"a vector with non-finite values for text #{index}")
    return vector if isinstance(vector, list) else list(vector)


def check_results(
    name: str, task: Task, results: Any, count: int, dimension: int | None = None
) -> list[Any]:
    """``results`` as a list of ``count`` floats (scores) or float lists (vectors), else
    :class:`InferenceError` naming ``name``. ``dimension``: expected vector length, if known."""
    listed = _as_list(name, results, count)
    if task.op == "score":
        return [_score(name, value, i) for i, value in enumerate(listed)]
    return [_vector(name, value, i, dimension) for i, value in enumerate(listed)]
