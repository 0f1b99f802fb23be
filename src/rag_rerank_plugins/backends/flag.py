"""FlagEmbedding backends (extra ``flag``): ``flag-reranker`` (``FlagReranker``) and ``flag-bge-m3``
(``BGEM3FlagModel``, dense vectors).

Why not just call ``compute_score`` / ``encode``: FlagEmbedding 1.4.2 calls ``model.half()`` and
``model.to(device)`` inside *every* call (``.float()`` on CPU for BGE-M3), starts one process per
visible GPU when several are visible, and retries any ``RuntimeError`` with a smaller batch forever.
On a shared model that is slow at best and a crash at worst. So we let FlagEmbedding *load* (its
classes, its tokenizer, BGE-M3's ColBERT/sparse heads) with ``devices=[our device]``, put the
weights on our device in the dtype our policy chose, once, and then run the forward pass ourselves
with FlagEmbedding's own pre-processing (instruction formats, query/passage truncation,
``prepare_for_model`` pairs, padding). Results equal ``compute_score`` / ``encode_queries`` /
``encode_corpus`` on the same model (tested to 1e-5 in FP32). The reranker runs in two phases
(pre-processing in the prepare thread, parallel passes on the CPU) with our CPU kernels and the
pruned last layer (options ``cpu_kernels``, ``prune_last_layer``); BGE-M3 gets the CPU kernels.

Score mode (option ``score_mode``): ``"sigmoid"`` (default) = ``sigmoid(logit)``, i.e.
``compute_score(normalize=True)``; ``"raw"`` = the logit, i.e. ``compute_score()``. Logits are
upcast to FP32 before the activation. The same names mean the same thing for ``cross-encoder``.
Option ``score_label``: the logit scored, by the rule of every classification reranker
(``_common.label_index``): the only one, label 1 of two (LangChain's choice; FlagEmbedding's own
``compute_score`` flattens a two-label model's logits into twice as many scores), a named one of
more.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from ..exceptions import ConfigurationError
from ._common import SCORE_MODES, label_index, score_mode_of, sigmoid
from ._flag_common import (
    FLAG_DEFAULT_MAX_LENGTH,
    M3_INSTRUCTIONS,
    M3_POOLING,
    cap_max_length,
    check_preprocessing_options,
    import_flag,
    instruction_tokens,
    tokenizer_helpers,
)
from ._torch_common import (
    HostCopy,
    bind_torch_worker,
    building,
    cpu_kernels,
    cpu_kernels_option,
    cpu_token_budget,
    features_to,
    loading_errors,
    module_bytes,
    prepare_module,
    prepared_batch,
    prune_last_layer_option,
    reranker_kernels,
)
from .base import EmbedderModel, ModelProvider, Prepared, RerankerModel, Task

if TYPE_CHECKING:
    from ..spec import ModelSpec

__all__ = ["SCORE_MODES", "FlagM3Embedder", "FlagReranker", "load_m3", "load_reranker"]

logger = logging.getLogger(__name__)


def _length_sorted(items: list[dict[str, Any]]) -> list[int]:
    """Indices longest first (less padding), as FlagEmbedding orders its batches."""
    return sorted(range(len(items)), key=lambda i: -len(items[i]["input_ids"]))


class FlagReranker(RerankerModel):
    """``FlagEmbedding.FlagReranker`` (encoder-only, e.g. bge-reranker-v2-m3), loaded once.

    Two phases: ``prepare`` runs FlagEmbedding's pre-processing and pads the pass (one prepare
    thread: the tokenizer switches truncation settings between queries and passages, so it is
    not shared), ``forward`` runs the model and starts the copy of the first logits to the host,
    ``finish`` applies the score mode. On the CPU several passes run at once, one per device
    worker (``parallel_forward``), as for the ``cross-encoder`` backend.
    """

    def __init__(self, flag: Any, device: str, dtype: str, score_mode: str, label: int = 0) -> None:
        self._flag = flag
        self.label = label  # the logit column scored by (``score_label``, resolved)
        self.tokenizer = flag.tokenizer
        self.model = flag.model
        self.device = device
        self.dtype = dtype
        self.score_mode = score_mode
        self.max_length: int = int(flag.max_length)
        qmax = flag.query_max_length
        self.query_max_length: int = int(qmax) if qmax is not None else self.max_length * 3 // 4
        self._prepare, self._pad = tokenizer_helpers()
        # torch modules in inference mode keep no state between calls: passes may run at once.
        self.parallel_forward = device == "cpu"

    def prepare(self, task: Task, items: Sequence[Any]) -> Prepared:
        features = self._pad(self.tokenizer, self._encode(items), padding=True, return_tensors="pt")
        return prepared_batch(
            dict(features),
            len(items),
            self.device,
            tokenizer=self.tokenizer,
            max_tokens=self.max_length,
        )

    def forward(self, task: Task, batch: Prepared) -> Any:
        import torch

        with torch.inference_mode():
            inputs = features_to(batch.payload, self.device)
            logits = self.model(**inputs, return_dict=True).logits
            return HostCopy(logits.reshape(batch.size, -1)[:, self.label].float())

    def finish(self, task: Task, pending: Any) -> list[Any]:
        return self._scores([float(v) for v in pending.result().tolist()])

    def bind_worker_thread(self, threads: int) -> None:
        bind_torch_worker(threads)

    def window_source(self) -> tuple[Any, int] | None:
        """The tokenizer and the (query + window + special) tokens that reach the model whole.

        The windower counts the bare query and window; instructions
        (``query_instruction_for_rerank``, ``passage_instruction_for_rerank``) are added before
        the pair is cut to ``max_length`` (from the passage's end), so they come off the limit,
        or every window's tail would be silently dropped."""
        flag = self._flag
        extra = sum(
            instruction_tokens(
                self.tokenizer,
                getattr(flag, f"{which}_instruction_for_rerank"),
                getattr(flag, f"{which}_instruction_format"),
            )
            for which in ("query", "passage")
        )
        return self.tokenizer, max(1, self.max_length - extra)

    def window_query_limit(self) -> int:
        """The most tokens of the bare query that reach the model (the windower's optional query
        limit, :mod:`rag_rerank_plugins.windows`): FlagEmbedding cuts ``query instruction +
        query`` to ``query_max_length`` (3/4 of ``max_length`` unless set) before building the
        pair, so past this the query's tail never reached the model while every window still
        gave up room for it."""
        flag = self._flag
        extra = instruction_tokens(
            self.tokenizer, flag.query_instruction_for_rerank, flag.query_instruction_format
        )
        return max(1, self.query_max_length - extra)

    def _encode(self, pairs: Sequence[tuple[str, str]]) -> list[dict[str, Any]]:
        # FlagEmbedding's pre-processing, step by step (compute_score_single_gpu in 1.4.2).
        detailed = self._flag.get_detailed_inputs([[q, p] for q, p in pairs])
        tok = self.tokenizer
        q_ids = tok(
            [q for q, _ in detailed],
            return_tensors=None,
            add_special_tokens=False,
            max_length=self.query_max_length,
            truncation=True,
        )["input_ids"]
        p_ids = tok(
            [p for _, p in detailed],
            return_tensors=None,
            add_special_tokens=False,
            max_length=self.max_length,
            truncation=True,
        )["input_ids"]
        return [
            self._prepare(
                tok, q, d, truncation="only_second", max_length=self.max_length, padding=False
            )
            for q, d in zip(q_ids, p_ids, strict=True)
        ]

    def score_pairs(self, pairs: Sequence[tuple[str, str]], batch_size: int) -> list[float]:
        """The one-shot path (the engine runs the phases itself): the same phases, in passes of
        ``batch_size`` pairs."""
        task = Task("score")
        out: list[float] = []
        for start in range(0, len(pairs), batch_size):
            batch = self.prepare(task, pairs[start : start + batch_size])
            out += self.finish(task, self.forward(task, batch))
        return out

    def _scores(self, logits: list[float]) -> list[float]:
        if self.score_mode == "sigmoid":
            return [sigmoid(x) for x in logits]
        return logits

    def footprint_bytes(self) -> int | None:
        return module_bytes(self.model)

    def close(self) -> None:
        flag, self._flag = self._flag, None
        if flag is not None:
            # FlagEmbedding's __del__ moves the model to the CPU: drop it first so release never
            # copies GPU weights into host memory.
            flag.model = None
        self.model = None
        self.tokenizer = None


def load_reranker(spec: ModelSpec, provider: ModelProvider) -> FlagReranker:
    """Loader of ``backend="flag-reranker"``."""
    options = spec.options_dict  # names checked by the registry (its row) before this runs
    mode = score_mode_of(spec, "sigmoid")
    options.pop("score_mode", None)
    wanted_label = options.pop("score_label", None)
    prune = prune_last_layer_option(options)
    kernels_on = cpu_kernels_option(options)
    check_preprocessing_options(options)
    flag_mod = import_flag(spec.backend)
    with loading_errors(spec):
        with building():
            flag = flag_mod.FlagReranker(
                spec.model,
                use_fp16=False,  # our policy casts once, below; FlagEmbedding never casts per call
                devices=[spec.device],  # one device: never a process per visible GPU
                max_length=spec.max_length or FLAG_DEFAULT_MAX_LENGTH,
                **options,
            )
        flag.max_length = cap_max_length(flag.model, int(flag.max_length), spec.model)
        flag.query_max_length = _fitting_query_max_length(flag, spec.model)
        config = flag.model.config
        label = label_index(wanted_label, int(config.num_labels), config.id2label, spec.model)
        prepare_module(flag.model, spec.dtype)
        flag.model.to(spec.device)
        kernels = reranker_kernels(flag.model, spec.device, kernels_on, prune)
    assert mode is not None
    reranker = FlagReranker(flag, spec.device, spec.dtype, mode, label)
    reranker.kernels = kernels
    reranker.cpu_token_budget = cpu_token_budget(
        reranker.device, reranker.dtype, kernels_on, flag.model
    )
    return reranker


def _fitting_query_max_length(flag: Any, model: str) -> int | None:
    """FlagEmbedding's ``query_max_length`` made to fit ``max_length``, or ConfigurationError.

    Why: a query is cut to ``query_max_length`` and the pair then cut from the passage's end
    ("only_second"); a query that takes the whole ``max_length`` beside the special tokens
    failed every request it came in ("Sequence to truncate too short"), for instance after
    ``max_length=1024`` was capped to a 512-position table with ``query_max_length=600``. So it
    is lowered, with a warning, to FlagEmbedding's own default (3/4 of ``max_length``) or less,
    leaving the passage at least one token; a ``max_length`` without room for one query and
    one passage token is refused."""
    max_length = int(flag.max_length)
    room = max_length - int(flag.tokenizer.num_special_tokens_to_add(pair=True))
    if room < 2:
        raise ConfigurationError(
            f"max_length={max_length} leaves {max(room, 0)} token(s) beside {model}'s special "
            "tokens: no room for a query and a passage. Give max_length >= "
            f"{max_length - room + 2}."
        )
    given = flag.query_max_length
    wanted = int(given) if given is not None else max_length * 3 // 4
    if wanted < room:
        return given
    fitted = min(max(max_length * 3 // 4, 1), room - 1)
    if given is not None:
        logger.warning(
            "rag-rerank: query_max_length=%d leaves no room for the passage within max_length=%d "
            "of %s; queries are cut at %d tokens.",
            wanted,
            max_length,
            model,
            fitted,
        )
    return fitted


class FlagM3Embedder(EmbedderModel):
    """``FlagEmbedding.BGEM3FlagModel`` dense vectors (CLS pooling, normalised by default).

    Queries use ``query_max_length`` and the query instruction (``encode_queries``); documents use
    ``max_length`` (``encode_corpus``). ``normalize=True`` additionally L2-normalises (idempotent
    with the model's own ``normalize_embeddings=True``).
    """

    def __init__(self, flag: Any, device: str, dtype: str) -> None:
        self._flag = flag
        self.tokenizer = flag.tokenizer
        self.model = flag.model
        self.device = device
        self.dtype = dtype
        self.query_max_length = int(flag.query_max_length)
        self.passage_max_length = int(flag.passage_max_length)
        self.truncate_dim = getattr(flag, "truncate_dim", None)
        hidden = int(self.model.model.config.hidden_size)
        self._dimension = min(hidden, self.truncate_dim) if self.truncate_dim else hidden
        self._pad = tokenizer_helpers()[1]

    @property
    def dimension(self) -> int:
        return self._dimension

    def _texts(self, texts: Sequence[str], is_query: bool) -> list[str]:
        flag = self._flag
        if is_query and flag.query_instruction_for_retrieval is not None:
            fmt, instruction = flag.query_instruction_format, flag.query_instruction_for_retrieval
        elif not is_query and flag.kwargs.get("passage_instruction_for_retrieval") is not None:
            fmt = flag.kwargs.get("passage_instruction_format", "{}{}")
            instruction = flag.kwargs["passage_instruction_for_retrieval"]
        else:
            return list(texts)
        return [flag.get_detailed_instruct(fmt, instruction, t) for t in texts]

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

        max_length = self.query_max_length if is_query else self.passage_max_length
        # An explicit prompt replaces the model's configured instruction, as in sentence-
        # transformers' encode(prompt=...).
        if prompt is None:
            inputs_text = self._texts(texts, is_query)
        else:
            inputs_text = [prompt + t for t in texts]
        encoded = self.tokenizer(inputs_text, truncation=True, max_length=max_length)
        items = [{k: encoded[k][i] for k in encoded} for i in range(len(texts))]
        order = _length_sorted(items)
        out: list[list[float]] = [[] for _ in items]
        with torch.inference_mode():
            for start in range(0, len(order), batch_size):
                chunk = order[start : start + batch_size]
                inputs = self._pad(
                    self.tokenizer, [items[i] for i in chunk], padding=True, return_tensors="pt"
                ).to(self.device)
                dense = self.model(
                    inputs,
                    return_dense=True,
                    return_sparse=False,
                    return_colbert_vecs=False,
                    truncate_dim=self.truncate_dim,
                )["dense_vecs"].float()
                if normalize:
                    dense = torch.nn.functional.normalize(dense, dim=-1)
                for i, vec in zip(chunk, dense.cpu().tolist(), strict=True):
                    out[i] = vec
        return out

    def footprint_bytes(self) -> int | None:
        return module_bytes(self.model)

    def close(self) -> None:
        flag, self._flag = self._flag, None
        if flag is not None:
            flag.model = None  # see FlagReranker.close
        self.model = None
        self.tokenizer = None


def load_m3(spec: ModelSpec, provider: ModelProvider) -> FlagM3Embedder:
    """Loader of ``backend="flag-bge-m3"``."""
    options = spec.options_dict  # names checked by the registry (its row) before this runs
    kernels_on = cpu_kernels_option(options)
    check_preprocessing_options(options, instructions=M3_INSTRUCTIONS)
    pooling = options.get("pooling_method", "cls")
    if pooling not in M3_POOLING:
        raise ConfigurationError(
            f"pooling_method={pooling!r}: BGEM3FlagModel pools by one of "
            f"{', '.join(map(repr, M3_POOLING))}."
        )
    flag_mod = import_flag(spec.backend)
    max_length = spec.max_length or FLAG_DEFAULT_MAX_LENGTH
    options.setdefault("query_max_length", max_length)
    with loading_errors(spec):
        with building():
            flag = flag_mod.BGEM3FlagModel(
                spec.model,
                # Only selects the dtype the weights are *loaded* in (no FP32 detour); every
                # later cast and device move is ours, once, below.
                use_fp16=spec.dtype == "float16",
                use_bf16=spec.dtype == "bfloat16",
                devices=[spec.device],
                passage_max_length=max_length,
                **options,
            )
        # BGEM3FlagModel keeps its encoder in .model.model (the heads around it).
        encoder = getattr(flag.model, "model", flag.model)
        for attr in ("passage_max_length", "query_max_length"):
            setattr(flag, attr, cap_max_length(encoder, int(getattr(flag, attr)), spec.model))
        prepare_module(flag.model, spec.dtype)
        flag.model.to(spec.device)
        kernels = cpu_kernels(flag.model, spec.device, kernels_on)
    embedder = FlagM3Embedder(flag, spec.device, spec.dtype)
    embedder.kernels = kernels
    return embedder
