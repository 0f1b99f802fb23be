"""sentence-transformers ``CrossEncoder`` backend (``backend="cross-encoder"``, extra ``st``).

Scores are exactly ``CrossEncoder.predict`` on the same model. With sentence-transformers 6
(``CrossEncoder.preprocess``) the backend runs in two phases: ``prepare`` tokenises a micro-batch
on the CPU (pinned on CUDA), ``forward`` copies it to the device without blocking, runs the model,
applies predict's upcast and activation and starts one device->host copy; ``finish`` reads it.
Older versions fall back to ``predict`` per micro-batch.

Option ``score_mode``: absent = the model's own default activation (sigmoid for single-label
rerankers such as ms-marco-MiniLM and bge-reranker); ``"sigmoid"`` = sigmoid of the first logit;
``"raw"`` = the logit. Logits are upcast to FP32 before the activation (as in ``predict``), so the
modes mean the same as for the ``flag-reranker`` backend.

Option ``score_label`` (index or ``config.id2label`` name): which logit is the score. Absent: the
only one of a single-label model, label 1 ("relevant") of a two-label model, as LangChain's
``HuggingFaceCrossEncoder`` takes ``predict(...)[:, 1]``; a model with more labels must name one
(see ``_common.label_index``). The activation applies to the model's logits as in ``predict``,
then the label's column is taken.
``max_length`` is fixed at load time and never changed per call (changing tokenizer settings on a
shared model gives wrong results). It is capped at what the model's position table holds
(``_torch_common.cap_to_positions``): longer inputs are truncated there, where ``CrossEncoder``
fails deep in torch on them (and our pass would fail every request batched with them).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from ._common import label_index, score_mode_of
from ._torch_common import (
    HostCopy,
    bind_torch_worker,
    building,
    cap_to_positions,
    cpu_kernels_option,
    cpu_token_budget,
    features_to,
    import_optional,
    loading_errors,
    model_kwargs_for,
    module_bytes,
    prepare_module,
    prepared_batch,
    prune_last_layer_option,
    quantize_module,
    reranker_kernels,
    warm_tokenizer,
)
from .base import ModelProvider, Prepared, RerankerModel, Task

if TYPE_CHECKING:
    from ..spec import ModelSpec

__all__ = ["CrossEncoderReranker", "load"]


class CrossEncoderReranker(RerankerModel):
    def __init__(
        self,
        model: Any,
        device: str,
        dtype: str,
        score_mode: str | None = None,
        label: int = 0,
    ) -> None:
        self.model = model
        self.device = device
        self.dtype = dtype
        self.score_mode = score_mode
        self.label = label  # the logit column scored by (``score_label``, resolved)
        self.max_tokens = _max_length(model)
        # Two phases need CrossEncoder.preprocess (sentence-transformers >= 6).
        self._two_phase = callable(getattr(model, "preprocess", None))
        resolve = getattr(model, "_resolve_prompt", None)
        self._prompt = resolve(None, None) if callable(resolve) else None
        # Tokens the default prompt adds in front of every query (long-document windows leave
        # room for them); counted now, before prepare threads share the tokenizer.
        tokenizer = getattr(model, "tokenizer", None)
        self._prompt_tokens = (
            len(tokenizer(self._prompt, add_special_tokens=False)["input_ids"])
            if self._prompt and callable(tokenizer)
            else 0
        )
        # torch modules in inference mode keep no state between calls: passes may run at once.
        self.parallel_forward = self._two_phase and device == "cpu"
        if self._two_phase:
            self.concurrent_prepare = warm_tokenizer(
                lambda pairs: model.preprocess(pairs, prompt=self._prompt), [("query", "passage")]
            )

    def _activation(self) -> Any:
        import torch

        if self.score_mode == "raw":
            return torch.nn.Identity()
        if self.score_mode == "sigmoid":
            return torch.nn.Sigmoid()
        return None  # predict's default: the model's own activation

    def prepare(self, task: Task, items: Sequence[Any]) -> Prepared:
        if not self._two_phase:
            return super().prepare(task, items)
        features = self.model.preprocess(list(items), prompt=self._prompt)
        return prepared_batch(
            features,
            len(items),
            self.device,
            tokenizer=self.model.tokenizer,
            max_tokens=self.max_tokens,
        )

    def forward(self, task: Task, batch: Prepared) -> Any:
        if not self._two_phase:
            return super().forward(task, batch)
        import torch

        with torch.inference_mode():
            scores = self.model(features_to(batch.payload, self.device))["scores"]
            # As predict: upcast sub-FP32 logits, then the activation, then the label's column.
            if torch.is_floating_point(scores) and torch.finfo(scores.dtype).bits < 32:
                scores = scores.float()
            activation = self._activation()
            if activation is None:
                activation = self.model.activation_fn
            if activation is not None:
                scores = activation(scores)
            return HostCopy(scores.reshape(batch.size, -1)[:, self.label].float())

    def finish(self, task: Task, pending: Any) -> list[Any]:
        if not isinstance(pending, HostCopy):
            return super().finish(task, pending)
        return [float(s) for s in pending.result().tolist()]

    def window_source(self) -> tuple[Any, int] | None:
        # The model's default prompt is prepended to every query (sentence-transformers 6
        # ``prompts``/``default_prompt_name``): windows get what is left after it, so a
        # (prompt + query, window) input is not truncated at the window's end.
        limit = self.max_tokens or int(self.model.tokenizer.model_max_length)
        return self.model.tokenizer, limit - self._prompt_tokens

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
        return [float(s) for s in scores.reshape(len(pairs), -1)[:, self.label]]

    def bind_worker_thread(self, threads: int) -> None:
        bind_torch_worker(threads)

    def footprint_bytes(self) -> int | None:
        return module_bytes(self.model)

    def close(self) -> None:
        self.model = None


def _max_length(model: Any) -> int | None:
    limit = getattr(model, "max_seq_length", None)
    if limit is None:
        limit = getattr(getattr(model, "tokenizer", None), "model_max_length", None)
    return int(limit) if isinstance(limit, int) and 0 < limit < 1_000_000 else None


def _id2label(model: Any) -> dict[Any, Any] | None:
    """The label names of the CrossEncoder's transformers model (None without one)."""
    config = getattr(getattr(model, "model", None), "config", None)
    names = getattr(config, "id2label", None)
    return dict(names) if isinstance(names, dict) else None


def load(spec: ModelSpec, provider: ModelProvider) -> CrossEncoderReranker:
    st = import_optional(
        "sentence_transformers", "sentence-transformers", "st", "The 'cross-encoder' backend"
    )
    options = spec.options_dict  # names checked by the registry (its row) before this runs
    mode = score_mode_of(spec, None)
    options.pop("score_mode", None)
    wanted_label = options.pop("score_label", None)
    quantize = options.pop("quantize", None)
    kernels = cpu_kernels_option(options)
    prune = prune_last_layer_option(options)
    with loading_errors(spec):
        with building():
            model = st.CrossEncoder(
                spec.model,
                device=spec.device,
                max_length=spec.max_length,
                model_kwargs=model_kwargs_for(spec.dtype, options.pop("model_kwargs", None)),
                **options,
            )
        cap_to_positions(model, spec.max_length, spec.model)
        prepare_module(model, spec.dtype)
        quantize_module(model, quantize, spec.device, spec.dtype)
        label = label_index(wanted_label, int(model.num_labels), _id2label(model), spec.model)
        in_use = reranker_kernels(model, spec.device, kernels, prune)
    reranker = CrossEncoderReranker(model, spec.device, spec.dtype, mode, label)
    reranker.kernels = in_use
    reranker.cpu_token_budget = cpu_token_budget(reranker.device, reranker.dtype, kernels, model)
    return reranker
