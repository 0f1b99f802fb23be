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
from pathlib import Path
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


#: IR weights above this many bytes make a large model (XLM-R large, bge-reranker-v2-m3: 2.2 GB
#: in FP32; base models ~0.44 GB, MiniLM 0.09 GB).
LARGE_IR_BYTES = 1_000_000_000
#: Padded tokens per pass for such a model in BF16 on an AVX512-BF16 CPU without AMX.
LARGE_TOKEN_BUDGET = 512


def cpu_token_budget(dtype: str, weights: Path) -> int | None:
    """The pass size for this model (``LoadedModel.cpu_token_budget``; None: the engine's 1024).

    Why smaller passes for large models: SciFact passages are ~400 tokens, so a 1024-token pass
    holds two, padded to the longer, while OpenVINO's per-token cost barely changes between one
    row and two at these matrix sizes. XLM-R large 1 x 20 SciFact, BF16, 2-core AMD EPYC, one
    process alternating with real token counts learned: 512 tokens 12.94 s, 1024 13.73 s
    (1.06x). MiniLM-L6 1 x 50 was level (512: 1441 ms, 1024: 1449), its small matrices gaining
    more from two rows. Not measured on AMX CPUs, which keep the default.
    """
    from .._cpu import cpu_kind

    if dtype != "bfloat16" or cpu_kind() != "avx512_bf16":
        return None
    try:
        size = weights.stat().st_size
    except OSError:
        return None
    return LARGE_TOKEN_BUDGET if size > LARGE_IR_BYTES else None


def load(spec: ModelSpec, provider: ModelProvider) -> OpenVinoCrossEncoder:
    model = OpenVinoCrossEncoder(*load_openvino(spec, provider, "onnx-cross-encoder", "reranker"))
    if model.dtype in ("bfloat16", "float32"):  # an INT8 IR keeps the default (not measured)
        model.cpu_token_budget = cpu_token_budget(model.dtype, model.entry / "model.bin")
    return model
