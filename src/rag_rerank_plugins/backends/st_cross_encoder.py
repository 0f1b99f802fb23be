"""sentence-transformers ``CrossEncoder`` backend (``backend="cross-encoder"``, extra ``st``).

Scores are exactly ``CrossEncoder.predict`` on the same model, computed with length-sorted batches
under ``torch.inference_mode``. Option ``score_mode``: absent = the model's own default activation
(sigmoid for single-label rerankers such as ms-marco-MiniLM and bge-reranker); ``"sigmoid"`` =
sigmoid of the first logit; ``"raw"`` = the logit. Logits are upcast to FP32 before the activation
(as in ``predict``), so the modes mean the same as for the ``flag-reranker`` backend.
``max_length`` is fixed at load time and never changed per call (changing tokenizer settings on a
shared model gives wrong results).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from ._torch_common import (
    import_optional,
    loading_errors,
    prepare_module,
    quantize_module,
    torch_dtype,
)
from .base import RerankerModel
from .flag import score_mode_of  # light: flag.py imports FlagEmbedding only inside its loaders

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
    def __init__(self, model: Any, device: str, dtype: str, score_mode: str | None = None) -> None:
        self.model = model
        self.device = device
        self.dtype = dtype
        self.score_mode = score_mode

    def _activation(self) -> Any:
        import torch

        if self.score_mode == "raw":
            return torch.nn.Identity()
        if self.score_mode == "sigmoid":
            return torch.nn.Sigmoid()
        return None  # predict's default: the model's own activation

    def window_source(self) -> tuple[Any, int] | None:
        tokenizer = self.model.tokenizer
        limit = getattr(self.model, "max_seq_length", None) or tokenizer.model_max_length
        return tokenizer, int(limit)

    def score_pairs(self, pairs: Sequence[tuple[str, str]], batch_size: int) -> list[float]:
        import torch

        with torch.inference_mode():
            scores = self.model.predict(
                list(pairs),
                batch_size=batch_size,
                show_progress_bar=False,
                convert_to_numpy=True,
                activation_fn=self._activation(),
            )
        return [float(s) for s in scores.reshape(len(pairs), -1)[:, 0]]

    def close(self) -> None:
        self.model = None


def load(spec: ModelSpec, pool: ModelPool) -> CrossEncoderReranker:
    st = import_optional(
        "sentence_transformers", "sentence-transformers", "st", "The 'cross-encoder' backend"
    )
    options = spec.options_dict
    mode = score_mode_of(spec, None)
    options.pop("score_mode", None)
    quantize = options.pop("quantize", None)
    with loading_errors(spec):
        model = st.CrossEncoder(
            spec.model,
            device=spec.device,
            max_length=spec.max_length,
            model_kwargs=model_kwargs_for(spec.dtype),
            **options,
        )
        prepare_module(model, spec.dtype)
        quantize_module(model, quantize, spec.device, spec.dtype)
    return CrossEncoderReranker(model, spec.device, spec.dtype, mode)
