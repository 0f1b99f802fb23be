"""OpenVINO cross-encoder backend (``backend="openvino-cross-encoder"``, extra ``openvino``).

Scores are ``CrossEncoder.predict``'s, computed by OpenVINO's CPU plugin from the checked ONNX
export of ``onnx-cross-encoder`` (see :mod:`._openvino_common` for why, the IR cache, precision
and INT8 calibration). Everything but the runtime is the ONNX backend's: the tokenizer, the passes
padded to the engine's bucket lengths, the pruned last layer (option ``prune_last_layer``,
default True), the score label and activation (``score_label``, ``score_mode``), the tokenizer
that cuts long-document windows (:meth:`OnnxCrossEncoder.window_source
<rag_rerank_plugins.backends.onnx.OnnxCrossEncoder.window_source>`).

What it runs: ``dtype="auto"`` is BF16 on CPUs that compute it natively (AVX512-BF16, AMX),
FP32 elsewhere; ``quantize="int8"`` adds NNCF's calibrated static INT8 (``calibration``: a
JSON-lines file of ``{"query", "passage"}`` objects or a sequence of pairs; default: 300 pairs
built from the packaged sample corpus). The choice, and whether the IR came from the cache, is in
``stats()["kernels"]`` and the load log.

A cached IR (and its ONNX entry) loads without importing torch; the first load of a model exports
it with sentence-transformers (extra ``st``) and onnxruntime (extra ``onnx``), then converts it.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from ._openvino_common import OpenVinoModel, load_openvino
from .base import ModelProvider, RerankerModel

if TYPE_CHECKING:
    from ..spec import ModelSpec

__all__ = ["OpenVinoCrossEncoder", "load"]


class OpenVinoCrossEncoder(OpenVinoModel, RerankerModel):
    """The ONNX cross-encoder's phases on an OpenVINO compiled model."""

    def score_pairs(self, pairs: Sequence[tuple[str, str]], batch_size: int) -> list[float]:
        return self.inner.score_pairs(pairs, batch_size)

    def window_source(self) -> tuple[Any, int] | None:
        """The ONNX twin's: the export's tokenizer and the model's input limit."""
        return self.inner.window_source()


def load(spec: ModelSpec, provider: ModelProvider) -> OpenVinoCrossEncoder:
    return OpenVinoCrossEncoder(*load_openvino(spec, provider, "onnx-cross-encoder", "reranker"))
