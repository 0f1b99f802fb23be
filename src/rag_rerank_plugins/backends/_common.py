"""Option values and score helpers that several backends share (no heavy imports).

Backends never import each other: what two of them share lives in a private helper module. This
one holds the pieces every kind of backend uses (torch, ONNX Runtime, FlagEmbedding): the meaning
of ``score_mode``, ``score_label`` and ``quantize``, and the float64 sigmoid. Torch loading steps
are in :mod:`._torch_common`, the ONNX export cache in :mod:`._onnx_common`, FlagEmbedding's
pre-processing helpers in :mod:`._flag_common`, the last-token LLM reranker in
:mod:`._last_token`.

Option *names* are checked once, by the registry (``check_options`` in :mod:`.`), before any
loader runs; the helpers here check option *values*, which only the loading backend knows how to
read.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from ..exceptions import ConfigurationError

if TYPE_CHECKING:
    from ..spec import ModelSpec

__all__ = [
    "QUANTIZE_MODES",
    "SCORE_MODES",
    "label_index",
    "quantize_mode",
    "score_mode_of",
    "sigmoid",
]

#: Accepted values of the ``score_mode`` backend option (rerankers). The same names mean the
#: same thing on every reranker: ``"sigmoid"`` = sigmoid of the FP32 logit, ``"raw"`` = the logit.
SCORE_MODES = ("raw", "sigmoid")
#: Accepted values of the ``quantize`` backend option (absent = no quantization).
QUANTIZE_MODES = ("int8",)


def score_mode_of(spec: ModelSpec, default: str | None) -> str | None:
    """The spec's ``score_mode`` option, validated (``default`` when absent)."""
    mode = spec.option("score_mode", default)
    if mode is not None and mode not in SCORE_MODES:
        raise ConfigurationError(
            f"score_mode must be 'raw' (logits) or 'sigmoid' (sigmoid of the logit), got {mode!r}."
        )
    return mode


def label_index(value: Any, num_labels: int, id2label: Mapping[Any, Any] | None, model: str) -> int:
    """The logit column a classification reranker scores by: the ``score_label`` option, resolved.

    The rule is the same on every reranker backend (``cross-encoder``, ``onnx-cross-encoder``,
    ``flag-reranker``; windows and the server go through them):

    * one label: that logit (``score_label`` may only name it);
    * two labels: label 1, the "relevant" one of (not relevant, relevant) models such as many
      msmarco rerankers, as LangChain's ``HuggingFaceCrossEncoder`` does (it takes
      ``scores[:, 1]``), whatever the labels are called;
    * more: ``score_label`` is required, else :class:`ConfigurationError` at load.

    ``value`` is an index (``0 <= value < num_labels``) or a label name from the model's
    ``config.id2label`` (a string of digits that names no label is read as an index, for
    settings that arrive as text). The score mode then applies to that one logit.
    """
    names = {int(k): str(v) for k, v in (id2label or {}).items()}
    if sorted(names) != list(range(num_labels)):
        names = {i: f"LABEL_{i}" for i in range(num_labels)}  # transformers' default names
    listed = ", ".join(f"{i}={names[i]!r}" for i in range(num_labels))
    how = (
        "Choose one with the backend option score_label=<index or label name>, e.g. "
        "model_kwargs={'score_label': 1} on an adapter or options={'score_label': 1} on a spec."
    )
    if num_labels < 1:
        raise ConfigurationError(f"{model!r} has no output label to score by.")
    if value is None:
        if num_labels <= 2:
            return num_labels - 1
        raise ConfigurationError(
            f"{model!r} is a classifier with {num_labels} labels ({listed}): which one is the "
            f"relevance score is not known. {how}"
        )
    if isinstance(value, str) and value in names.values():
        matches = [i for i, name in names.items() if name == value]
        if len(matches) > 1:
            raise ConfigurationError(
                f"score_label={value!r} names labels {matches} of {model!r}; use the index."
            )
        return matches[0]
    if isinstance(value, str) and value.strip().isdigit():
        value = int(value)
    if isinstance(value, int) and not isinstance(value, bool) and 0 <= value < num_labels:
        return value
    raise ConfigurationError(
        f"score_label={value!r} is not a label of {model!r}, whose labels are {listed}. Use an "
        "index from that list or one of the names."
    )


def quantize_mode(value: Any) -> str | None:
    """The ``quantize`` option's value, validated: None (absent) or one of
    :data:`QUANTIZE_MODES`. Whether the device and dtype allow it is the backend's to check."""
    if value is None:
        return None
    if value not in QUANTIZE_MODES:
        raise ConfigurationError(
            f"quantize={value!r} is not supported; use 'int8' or leave it out."
        )
    return str(value)


def sigmoid(x: float) -> float:
    """Numerically stable logistic function in float64 (same values as FlagEmbedding's)."""
    if x >= 0:
        return 1.0 / (1.0 + math.exp(-x))
    z = math.exp(x)
    return z / (1.0 + z)
