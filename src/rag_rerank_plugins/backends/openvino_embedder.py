"""OpenVINO sentence-transformers embedder (``backend="openvino-embedder"``, extra ``openvino``).

Vectors are the ``sentence-transformers`` backend's, computed by OpenVINO's CPU plugin from the
checked ONNX export of ``onnx-sentence-transformers`` (see :mod:`._openvino_common` for why, the
IR cache, precision and INT8 calibration). Everything but the runtime is the ONNX embedder's:
prompts (``default_prompt_name``), the tokenizer and the engine's bucket lengths, pooling and
normalisation in FP32 numpy, ``truncate_dim``.

``dtype="auto"`` is BF16 on CPUs that compute it natively, FP32 elsewhere; ``quantize="int8"``
adds NNCF's calibrated static INT8 (``calibration``: a JSON-lines file of ``{"text"}`` objects or
a sequence of texts; default: 150 texts from the packaged sample corpus). A cached IR loads
without importing torch.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from ._openvino_common import OpenVinoModel, load_openvino
from .base import EmbedderModel, ModelProvider

if TYPE_CHECKING:
    from ..spec import ModelSpec

__all__ = ["OpenVinoEmbedder", "load"]


class OpenVinoEmbedder(OpenVinoModel, EmbedderModel):
    """The ONNX embedder's phases on an OpenVINO compiled model."""

    @property
    def dimension(self) -> int:
        return int(self.inner.dimension)

    @property
    def prompts(self) -> dict[str, str]:
        """The model's named prompts (the ONNX embedder's): adapters resolve ``prompt_name``
        with them, as ``SentenceTransformer.encode`` does."""
        return dict(self.inner.prompts)

    @property
    def default_prompt_name(self) -> str | None:
        """The prompt applied when given none (None: no prompt), as the ONNX embedder's."""
        name = self.inner.default_prompt_name
        return name if isinstance(name, str) else None

    def embed(self, texts: Sequence[str], *args: Any, **kwargs: Any) -> list[list[float]]:
        return self.inner.embed(texts, *args, **kwargs)


def load(spec: ModelSpec, provider: ModelProvider) -> OpenVinoEmbedder:
    return OpenVinoEmbedder(
        *load_openvino(spec, provider, "onnx-sentence-transformers", "embedder")
    )
