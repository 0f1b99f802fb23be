"""sentence-transformers ``SentenceTransformer`` backend (``backend="sentence-transformers"``).

Queries go through ``encode_query`` and documents through ``encode_document`` when the library
has them, so models with query/document prompts (E5, BGE, ...) get the right prompt.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from ._torch_common import import_optional, loading_errors, prepare_module, quantize_module
from .base import EmbedderModel
from .st_cross_encoder import model_kwargs_for

if TYPE_CHECKING:
    from ..pool import ModelPool
    from ..spec import ModelSpec

__all__ = ["SentenceTransformerEmbedder", "load"]


class SentenceTransformerEmbedder(EmbedderModel):
    def __init__(self, model: Any, device: str, dtype: str) -> None:
        self.model = model
        self.device = device
        self.dtype = dtype
        dim = (
            getattr(model, "get_embedding_dimension", None)
            or model.get_sentence_embedding_dimension
        )
        self._dimension = int(dim())

    @property
    def dimension(self) -> int:
        return self._dimension

    def embed(
        self,
        texts: Sequence[str],
        *,
        batch_size: int,
        is_query: bool,
        normalize: bool = False,
        prompt: str | None = None,
    ) -> list[list[float]]:
        import numpy as np
        import torch

        encode = self.model.encode
        if hasattr(self.model, "encode_query"):
            encode = self.model.encode_query if is_query else self.model.encode_document
        with torch.inference_mode():
            vectors = encode(
                list(texts),
                batch_size=batch_size,
                show_progress_bar=False,
                convert_to_numpy=True,
                normalize_embeddings=False,
                prompt=prompt,  # given: used instead of the model's query/document prompt
            )
        vectors = vectors.astype("float32", copy=False)
        if normalize:  # in FP32: normalising BF16 vectors left norms off by up to 0.4 %
            norms = np.linalg.norm(vectors, axis=1, keepdims=True)
            vectors = vectors / np.maximum(norms, 1e-12)
        result: list[list[float]] = vectors.tolist()
        return result

    def close(self) -> None:
        self.model = None


def load(spec: ModelSpec, pool: ModelPool) -> SentenceTransformerEmbedder:
    st = import_optional(
        "sentence_transformers",
        "sentence-transformers",
        "st",
        "The 'sentence-transformers' backend",
    )
    options = spec.options_dict
    quantize = options.pop("quantize", None)
    with loading_errors(spec):
        model = st.SentenceTransformer(
            spec.model,
            device=spec.device,
            model_kwargs=model_kwargs_for(spec.dtype),
            **options,
        )
        if spec.max_length is not None:
            model.max_seq_length = spec.max_length
        prepare_module(model, spec.dtype)
        quantize_module(model, quantize, spec.device, spec.dtype)
    return SentenceTransformerEmbedder(model, spec.device, spec.dtype)
