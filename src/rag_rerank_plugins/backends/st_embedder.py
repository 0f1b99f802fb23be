"""sentence-transformers ``SentenceTransformer`` backend (``backend="sentence-transformers"``).

Vectors equal ``encode_query`` (queries) and ``encode_document`` (documents), so models with
query/document prompts (E5, BGE, ...) get the right prompt; an explicit ``prompt`` replaces it,
as ``encode(prompt=...)`` does, and ``prompt=""`` means no prompt at all. The model's
``prompts`` and ``default_prompt_name`` are exposed so an adapter can resolve prompts as
``encode()`` does (LangChain's ``HuggingFaceEmbeddings``: no query/document prompt). With
sentence-transformers 6 (``preprocess``) the backend runs in
two phases like the cross-encoder (tokenise on the CPU; forward and one device->host copy on the
device worker); normalisation happens in FP32 (normalising BF16 vectors left norms off by up to
0.4 %). Older versions fall back to ``encode_query``/``encode_document`` per micro-batch.
``max_seq_length`` (the spec's ``max_length``, else the model's) is capped at what the model's
position table holds (``_torch_common.cap_to_positions``): longer texts are truncated there
instead of failing deep in torch.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from .._stock import check_truncate_dim
from ._torch_common import (
    HostCopy,
    bind_torch_worker,
    building,
    cap_to_positions,
    cpu_kernels,
    cpu_kernels_option,
    cpu_token_budget,
    features_to,
    import_optional,
    loading_errors,
    model_kwargs_for,
    module_bytes,
    prepare_module,
    prepared_batch,
    quantize_module,
    warm_tokenizer,
)
from .base import EmbedderModel, ModelProvider, Prepared, Task

if TYPE_CHECKING:
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
        self.max_tokens = getattr(model, "max_seq_length", None)
        self._two_phase = callable(getattr(model, "preprocess", None)) and callable(
            getattr(model, "_resolve_prompt", None)
        )
        # torch modules in inference mode keep no state between calls: passes may run at once.
        self.parallel_forward = self._two_phase and device == "cpu"
        if self._two_phase:
            self.concurrent_prepare = warm_tokenizer(model.preprocess, ["passage"])

    @property
    def dimension(self) -> int:
        return self._dimension

    @property
    def prompts(self) -> dict[str, str]:
        """The model's named prompts (its config's, or the ``prompts`` option): adapters resolve
        ``prompt_name`` with them, as ``SentenceTransformer.encode`` does."""
        return dict(self.model.prompts or {})

    @property
    def default_prompt_name(self) -> str | None:
        """The prompt ``SentenceTransformer.encode`` applies when given none (None: no prompt)."""
        name = self.model.default_prompt_name
        return name if isinstance(name, str) else None

    def _prompt_and_task(self, is_query: bool, prompt: str | None) -> tuple[str | None, str]:
        """What ``encode_query``/``encode_document`` resolve: the explicit prompt, else the
        model's "query"/"document" prompt, else its default prompt; and the router task."""
        task = "query" if is_query else "document"
        if prompt is not None:
            return prompt, task
        name = task if task in (self.model.prompts or {}) else None
        return self.model._resolve_prompt(None, name), task

    def embed(
        self,
        texts: Sequence[str],
        *,
        batch_size: int,
        is_query: bool,
        normalize: bool = False,
        prompt: str | None = None,
    ) -> list[list[float]]:
        import torch

        encode = self.model.encode
        if hasattr(self.model, "encode_query"):
            encode = self.model.encode_query if is_query else self.model.encode_document
        with torch.inference_mode():
            vectors = encode(
                list(texts),
                prompt=prompt,
                batch_size=batch_size,
                show_progress_bar=False,
                convert_to_numpy=True,
                normalize_embeddings=False,
            )
        return _rows(torch.from_numpy(vectors.astype("float32", copy=False)), normalize)

    def prepare(self, task: Task, items: Sequence[Any]) -> Prepared:
        if not self._two_phase:
            return super().prepare(task, items)
        prompt, router_task = self._prompt_and_task(task.is_query, task.prompt)
        features = self.model.preprocess(list(items), prompt=prompt, task=router_task)
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

        router_task = "query" if task.is_query else "document"
        with torch.inference_mode():
            out = self.model(features_to(batch.payload, self.device), task=router_task)
            vectors = out["sentence_embedding"]
            if self.model.truncate_dim is not None:
                vectors = vectors[:, : self.model.truncate_dim]
            return HostCopy(vectors.float()), task.normalize

    def finish(self, task: Task, pending: Any) -> list[Any]:
        if not isinstance(pending, tuple):
            return super().finish(task, pending)
        copy, normalize = pending
        return _rows(copy.result(), normalize)

    def bind_worker_thread(self, threads: int) -> None:
        bind_torch_worker(threads)

    def footprint_bytes(self) -> int | None:
        return module_bytes(self.model)

    def close(self) -> None:
        self.model = None


def _rows(vectors: Any, normalize: bool) -> list[list[float]]:
    """FP32 host tensor -> lists, unit length when asked (computed in FP32)."""
    import torch

    if normalize:
        vectors = torch.nn.functional.normalize(vectors.float(), p=2, dim=1)
    result: list[list[float]] = vectors.tolist()
    return result


def load(spec: ModelSpec, provider: ModelProvider) -> SentenceTransformerEmbedder:
    st = import_optional(
        "sentence_transformers",
        "sentence-transformers",
        "st",
        "The 'sentence-transformers' backend",
    )
    options = spec.options_dict  # names checked by the registry (its row) before this runs
    # Before the weights load: a bad value otherwise failed at the first call, deep in torch.
    check_truncate_dim(options.get("truncate_dim"), "truncate_dim")
    quantize = options.pop("quantize", None)
    kernels = cpu_kernels_option(options)
    with loading_errors(spec):
        with building():
            model = st.SentenceTransformer(
                spec.model,
                device=spec.device,
                model_kwargs=model_kwargs_for(spec.dtype, options.pop("model_kwargs", None)),
                **options,
            )
        if spec.max_length is not None:
            model.max_seq_length = spec.max_length
        cap_to_positions(model, spec.max_length, spec.model)
        prepare_module(model, spec.dtype)
        quantize_module(model, quantize, spec.device, spec.dtype)
        in_use = cpu_kernels(model, spec.device, kernels)
    embedder = SentenceTransformerEmbedder(model, spec.device, spec.dtype)
    embedder.kernels = in_use
    embedder.cpu_token_budget = cpu_token_budget(embedder.device, embedder.dtype, kernels, model)
    return embedder
