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
    try:
        listed = list(results)  # a generator (or array) of the right length is fine
    except Exception as exc:  # a generator that raises midway, a tensor on a failed device
        raise _bad(name, f"results that could not be read ({type(exc).__name__}: {exc})") from exc
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
    except Exception as exc:  # a __float__ that fails (a device-side error surfacing here)
        what = f"a score for item #{index} that could not be read ({type(exc).__name__}: {exc})"
        raise _bad(name, what) from exc
    if not math.isfinite(score):
        raise _bad(name, f"a non-finite score ({score}) for item #{index}")
    return score


def _vector(name: str, value: Any, index: int, dimension: int | None) -> list[Any]:
    if value is None or isinstance(value, (str, bytes)) or not isinstance(value, Iterable):
        raise _bad(name, f"a {type(value).__name__} as the vector of text #{index}")
    try:
        vector = (
            value if isinstance(value, list) else getattr(value, "tolist", lambda: list(value))()
        )
        total = float(sum(vector))  # one C loop; NaN or inf anywhere makes the sum non-finite
        # ... and so can finite values whose sum overflows: then look at each one.
        finite = math.isfinite(total) or all(math.isfinite(float(v)) for v in vector)
    except (TypeError, ValueError):
        raise _bad(name, f"a vector with non-numeric values for text #{index}") from None
    except Exception as exc:
        what = f"a vector for text #{index} that could not be read ({type(exc).__name__}: {exc})"
        raise _bad(name, what) from exc
    if dimension is not None and len(vector) != dimension:
        raise _bad(name, f"a {len(vector)}-dimensional vector for text #{index}, not {dimension}")
    if not finite:
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
