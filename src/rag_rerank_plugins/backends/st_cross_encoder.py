"""sentence-transformers ``CrossEncoder`` backend (``backend="cross-encoder"``, extra ``st``).

Scores are exactly ``CrossEncoder.predict`` on the same model: the model's own default activation
(sigmoid for single-label rerankers such as ms-marco-MiniLM and bge-reranker), computed with
length-sorted batches under ``torch.inference_mode``. ``max_length`` is fixed at load time and
never changed per call (changing tokenizer settings on a shared model gives wrong results).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from ._torch_common import import_optional, loading_errors, prepare_module, torch_dtype
from .base import RerankerModel

if TYPE_CHECKING:
    from ..pool import ModelPool
    from ..spec import ModelSpec

__all__ = ["CrossEncoderReranker", "load", "model_kwargs_for"]


def model_kwargs_for(dtype: str) -> dict[str, Any]:
    """``from_pretrained`` kwargs that load weights directly in ``dtype`` (no FP32 detour)."""
    import transformers

    major, minor = (int(x) for x in transformers.__version__.split(".")[:2])
    key = "dtype" if (major, minor) >= (4, 56) else "torch_dtype"
    return {key: torch_dtype(dtype)}


class CrossEncoderReranker(RerankerModel):
    def __init__(self, model: Any, device: str, dtype: str) -> None:
        self.model = model
        self.device = device
        self.dtype = dtype

    def score_pairs(self, pairs: Sequence[tuple[str, str]], batch_size: int) -> list[float]:
        import torch

        with torch.inference_mode():
            scores = self.model.predict(
                list(pairs),
                batch_size=batch_size,
                show_progress_bar=False,
                convert_to_numpy=True,
            )
        return [float(s) for s in scores.reshape(len(pairs), -1)[:, 0]]

    def close(self) -> None:
        self.model = None


def load(spec: ModelSpec, pool: ModelPool) -> CrossEncoderReranker:
    st = import_optional(
        "sentence_transformers", "sentence-transformers", "st", "The 'cross-encoder' backend"
    )
    options = spec.options_dict
    with loading_errors(spec):
        model = st.CrossEncoder(
            spec.model,
            device=spec.device,
            max_length=spec.max_length,
            model_kwargs=model_kwargs_for(spec.dtype),
            **options,
        )
        prepare_module(model, spec.dtype)
    return CrossEncoderReranker(model, spec.device, spec.dtype)
