"""Option values and score helpers that several backends share (no heavy imports).

Backends never import each other: what two of them share lives in a private helper module. This
one holds the pieces every kind of backend uses (torch, ONNX Runtime, FlagEmbedding): the meaning
of ``score_mode`` and of ``quantize``, and the float64 sigmoid. Torch loading steps are in
:mod:`._torch_common`, the ONNX export cache in :mod:`._onnx_common`, FlagEmbedding's
pre-processing helpers in :mod:`._flag_common`, the last-token LLM reranker in
:mod:`._last_token`.

Option *names* are checked once, by the registry (``check_options`` in :mod:`.`), before any
loader runs; the helpers here check option *values*, which only the loading backend knows how to
read.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

from ..exceptions import ConfigurationError

if TYPE_CHECKING:
    from ..spec import ModelSpec

__all__ = ["QUANTIZE_MODES", "SCORE_MODES", "quantize_mode", "score_mode_of", "sigmoid"]

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
