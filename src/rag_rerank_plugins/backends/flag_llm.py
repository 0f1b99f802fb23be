"""FlagEmbedding's LLM rerankers (``backend="flag-llm-reranker"``, extra ``flag``).

Two model classes, chosen by the ``model_class`` option or read from the model's config:

* ``"decoder-only-base"`` (``FlagLLMReranker``, e.g. BAAI/bge-reranker-v2-gemma): a causal LM;
  the score is the logit of ``"Yes"`` after ``[bos] A: query \\n B: passage \\n prompt``.
* ``"decoder-only-layerwise"`` (``LayerWiseFlagLLMReranker``, BAAI/bge-reranker-v2-minicpm-
  layerwise): FlagEmbedding's MiniCPM class with one score head per layer from ``start_layer``;
  option ``cutoff_layers`` picks the layer whose head scores (one layer: a reranker returns one
  score per pair; the model card suggests 28 of 40 for speed). The default is the last layer.

Why not call ``compute_score``: as with ``flag-reranker`` (see :mod:`.flag`), FlagEmbedding casts
and moves the model inside every call and retries any RuntimeError with a smaller batch forever.
Here the tokenizer and weights are loaded once, in the policy's dtype (no FP32 detour), and the
scheduler runs the two phases of :class:`~._last_token.LastTokenReranker`: prepare reproduces
``compute_score``'s pre-processing (instructions, query/passage truncation, ``bos``, separator,
prompt), forward keeps only the last position's logits instead of FlagEmbedding's full
``[batch, length, vocab]`` tensor (256k-token vocabulary for Gemma). Batches are left-padded with
the positions of the unpadded prompt, so scores equal ``compute_score``'s whatever the tokenizer's
padding side (tested to 1e-5 in FP32). ``score_mode``: ``"sigmoid"`` (default, as
``flag-reranker``) = ``compute_score(normalize=True)``; ``"raw"`` = ``compute_score()``.

FlagEmbedding 1.4.2's layer-wise class was written for transformers 4 and does not load as shipped
under transformers 5; :func:`load_layerwise_model` applies the four load-time fixes it needs
(listed there). The LightWeight (``compress_ratio``/``compress_layers``, bge-reranker-v2.5-gemma2-
lightweight) class is not supported.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from ..exceptions import ConfigurationError
from ._common import score_mode_of
from ._flag_common import (
    FLAG_DEFAULT_MAX_LENGTH,
    check_preprocessing_options,
    import_flag,
    instruction_tokens,
    tokenizer_helpers,
    unescape_format,
)
from ._last_token import LastTokenReranker, check_answer_token, load_causal_lm
from .base import ModelProvider
from .options import HF_LOADING

if TYPE_CHECKING:
    from ..spec import ModelSpec

__all__ = [
    "DEFAULT_PROMPT",
    "MODEL_CLASSES",
    "FlagLLMReranker",
    "LayerWiseFlagLLMReranker",
    "layerwise_model_class",
    "load",
    "load_layerwise_model",
]

#: FlagEmbedding's default prompt of both LLM rerankers.
DEFAULT_PROMPT = (
    "Given a query A and a passage B, determine whether the passage contains an answer to the "
    "query by providing a prediction of either 'Yes' or 'No'."
)
MODEL_CLASSES = ("decoder-only-base", "decoder-only-layerwise")
_LAYERWISE_ARCH = "LayerWiseMiniCPMForCausalLM"


class FlagLLMReranker(LastTokenReranker):
    """``FlagLLMReranker``'s scores (bge-reranker-v2-gemma): the ``"Yes"`` logit at the end."""

    def __init__(
        self,
        model: Any,
        tokenizer: Any,
        device: str,
        dtype: str,
        max_length: int,
        *,
        score_mode: str = "sigmoid",
        prompt: str | None = None,
        query_max_length: int | None = None,
        query_instruction_for_rerank: str | None = "A: ",
        query_instruction_format: str = "{}{}",
        passage_instruction_for_rerank: str | None = "B: ",
        passage_instruction_format: str = "{}{}",
    ) -> None:
        self.passage_max_length = max_length
        self.query_max_length = query_max_length or max_length * 3 // 4
        self._prepare_ids = tokenizer_helpers()[0]
        # FlagEmbedding replaces only a missing prompt (None): prompt="" means no prompt.
        text = DEFAULT_PROMPT if prompt is None else prompt
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        self.prompt_ids = list(ids)
        self.sep_ids = list(tokenizer("\n", add_special_tokens=False)["input_ids"])
        # compute_score's longest [bos] query sep passage before the final sep + prompt.
        self.encode_max_length = max_length + len(self.sep_ids) + len(self.prompt_ids)
        super().__init__(
            model,
            tokenizer,
            device,
            dtype,
            self.encode_max_length + len(self.sep_ids) + len(self.prompt_ids),
        )
        self.score_mode = score_mode
        # FlagEmbedding's choice, kept for equal scores: the first token of "Yes" (its only
        # token for the Gemma and MiniCPM tokenizers).
        self.yes_id = int(tokenizer("Yes", add_special_tokens=False)["input_ids"][0])
        self.instructions = (
            (query_instruction_for_rerank, unescape_format(query_instruction_format)),
            (passage_instruction_for_rerank, unescape_format(passage_instruction_format)),
        )
        bos = tokenizer.bos_token_id
        self.bos_ids = [bos] if bos is not None and bos != tokenizer.pad_token_id else []

    def _texts(self, texts: Sequence[str], which: int) -> list[str]:
        instruction, fmt = self.instructions[which]
        if instruction is None:
            return list(texts)
        return [fmt.format(instruction, text) for text in texts]

    def encode(self, pairs: Sequence[tuple[str, str]]) -> list[list[int]]:
        # compute_score_single_gpu's pre-processing (FlagEmbedding 1.4.2), step by step.
        tok = self.tokenizer
        queries = self._texts([q for q, _ in pairs], 0)
        passages = self._texts([p for _, p in pairs], 1)
        q_ids = tok(
            queries, add_special_tokens=False, max_length=self.query_max_length, truncation=True
        )["input_ids"]
        p_ids = tok(
            passages,
            add_special_tokens=False,
            max_length=self.passage_max_length,
            truncation=True,
        )["input_ids"]
        out = []
        for q, p in zip(q_ids, p_ids, strict=True):
            item = self._prepare_ids(
                tok,
                self.bos_ids + list(q),
                self.sep_ids + list(p),
                truncation="only_second",
                max_length=self.encode_max_length,
                padding=False,
                return_attention_mask=False,
                return_token_type_ids=False,
                add_special_tokens=False,
            )
            out.append(list(item["input_ids"]) + self.sep_ids + self.prompt_ids)
        return out

    def head(self, last: Any) -> Any:
        import torch

        logit = last[:, self.yes_id].float()
        return torch.sigmoid(logit) if self.score_mode == "sigmoid" else logit

    def window_source(self) -> tuple[Any, int] | None:
        """The tokenizer and the (query + window) tokens that reach the model untruncated.

        The windower gives a window ``limit - query tokens`` tokens, counting the bare texts.
        FlagEmbedding's truncation sees more: the passage instruction (``"B: "``) counts against
        the passage ``max_length``, and ``[bos] + A: query + sep + B: passage`` against
        ``max_length + sep + prompt`` (the prompt's room is lent to the pair). Without those
        tokens in the limit, every window of a short query (under 2 tokens), a long instruction
        or a short prompt lost its tail to truncation, silently (the part of the passage never
        scored)."""
        (q_instruction, q_fmt), (p_instruction, p_fmt) = self.instructions
        tok = self.tokenizer
        passage_extra = instruction_tokens(tok, p_instruction, p_fmt)
        pair_extra = len(self.bos_ids) + instruction_tokens(tok, q_instruction, q_fmt)
        limit = self.passage_max_length - passage_extra - max(0, pair_extra - len(self.prompt_ids))
        return tok, max(1, limit)

    def window_query_limit(self) -> int:
        """The most tokens of the bare query that reach the model (the windower's optional
        query limit, see :mod:`rag_rerank_plugins.windows`): FlagEmbedding cuts
        ``query instruction + query`` to ``query_max_length`` (3/4 of ``max_length`` unless
        set) before the pair is built, so the instruction (``"A: "``) comes off that.

        Why: the windower kept the query whole up to ``window_query_tokens`` (64); past this
        limit its tail never reached the model, silently, while every window still gave up room
        for it."""
        q_instruction, q_fmt = self.instructions[0]
        extra = instruction_tokens(self.tokenizer, q_instruction, q_fmt)
        return max(1, self.query_max_length - extra)


class LayerWiseFlagLLMReranker(FlagLLMReranker):
    """``LayerWiseFlagLLMReranker``'s scores (bge-reranker-v2-minicpm-layerwise): the score head
    of one layer (``cutoff_layers``) at the last position."""

    def __init__(self, *args: Any, cutoff_layer: int | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        config = self.model.config
        first, last = int(config.start_layer), int(config.num_hidden_layers)
        layer = last if cutoff_layer is None else cutoff_layer
        if first > last:  # no layer-wise head: start_layer past the model's layers
            raise ConfigurationError(
                f"This model scores no layer (start_layer={first}, {last} layers): it is not a "
                "layer-wise reranker. Drop model_class='decoder-only-layerwise', or load a "
                "layer-wise model such as BAAI/bge-reranker-v2-minicpm-layerwise."
            )
        if not first <= layer <= last:
            raise ConfigurationError(
                f"cutoff_layers={layer} is outside this model's scored layers [{first}, {last}]."
            )
        self.cutoff_layer = layer
        bos = self.tokenizer.bos_token_id  # LayerWiseLLMReranker prepends it unconditionally
        self.bos_ids = [bos] if bos is not None else []

    def last_logits(self, features: dict[str, Any]) -> Any:
        # Head "simple": one value per position and layer ([batch, length]); the last column.
        out = self.model(**features, use_cache=False, cutoff_layers=[self.cutoff_layer])
        return out.logits[0][:, -1:]

    def head(self, last: Any) -> Any:
        import torch

        logit = last[:, 0].float()
        return torch.sigmoid(logit) if self.score_mode == "sigmoid" else logit


def _cutoff_layer(value: Any) -> int | None:
    """``cutoff_layers`` as one layer: an int, or a list/tuple of exactly one int."""
    if value is None:
        return None
    if isinstance(value, (list, tuple)) and len(value) == 1:
        value = value[0]
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigurationError(
            f"cutoff_layers={value!r}: give one layer (an int such as 28, or [28]). A reranker "
            "returns one score per pair, so several layers at once are not supported."
        )
    return value


def _model_class(spec: ModelSpec, options: dict[str, Any]) -> str:
    chosen = options.get("model_class")
    if chosen is not None:
        if chosen not in MODEL_CLASSES:
            raise ConfigurationError(
                f"model_class={chosen!r} is not supported; use one of {list(MODEL_CLASSES)} "
                "(FlagEmbedding's LightWeight rerankers are not supported)."
            )
        return str(chosen)
    from transformers import PretrainedConfig

    loading = {k: options[k] for k in ("revision", "cache_dir", "local_files_only") if k in options}
    config, _ = PretrainedConfig.get_config_dict(spec.model, **loading)
    # The layer-wise config is the only one with per-layer score heads from a start layer.
    layerwise = _LAYERWISE_ARCH in (config.get("architectures") or []) or (
        "start_layer" in config and "head_type" in config
    )
    return MODEL_CLASSES[1] if layerwise else MODEL_CLASSES[0]


def layerwise_model_class(single_vocab_head: bool = False) -> Any:
    """FlagEmbedding's ``LayerWiseMiniCPMForCausalLM`` with ``_tied_weights_keys`` as the mapping
    transformers 5 requires (the shipped list breaks building, saving and loading): the
    embeddings tie to ``lm_head`` only for a single vocabulary-sized head (``head_type="raw"``,
    not ``head_multi``); per-layer score heads tie to nothing."""
    from FlagEmbedding.inference.reranker.decoder_only.models.modeling_minicpm_reranker import (
        LayerWiseMiniCPMForCausalLM,
    )

    tied = {"lm_head.weight": "model.embed_tokens.weight"} if single_vocab_head else None
    return type(
        "LayerWiseMiniCPMForCausalLM",
        (LayerWiseMiniCPMForCausalLM,),
        {
            "_tied_weights_keys": tied,
            "__module__": __name__,
        },
    )


def load_layerwise_model(path: str, **kwargs: Any) -> Any:
    """FlagEmbedding's ``LayerWiseMiniCPMForCausalLM``, loaded so it runs under transformers 4
    and 5. Under transformers 5 the shipped class (FlagEmbedding 1.4.2) fails four ways, each fixed
    here without changing what it computes:

    1. the config's ``rope_scaling`` is now always a dict (``{"rope_type": "default", ...}``),
       which the model reads as legacy ``{"type", "factor"}``: default becomes None, others are
       translated;
    2. ``_tied_weights_keys`` must be a mapping: a subclass declares what ties (nothing for the
       per-layer score heads, whose shapes cannot tie with the embeddings);
    3. ``use_cache`` reaches ``DynamicCache.from_legacy_cache``, which is gone: reranking never
       needs a cache, so the config turns it off;
    4. rotary tables are non-persistent buffers that transformers 5 leaves uninitialised after
       loading: they are recomputed.
    """
    from FlagEmbedding.inference.reranker.decoder_only.models.configuration_minicpm_reranker import (  # noqa: E501
        LayerWiseMiniCPMConfig,
    )
    from FlagEmbedding.inference.reranker.decoder_only.models.modeling_minicpm_reranker import (
        MiniCPMRotaryEmbedding,
    )

    config_kwargs = {
        k: kwargs[k] for k in ("revision", "cache_dir", "local_files_only") if k in kwargs
    }
    config = LayerWiseMiniCPMConfig.from_pretrained(path, **config_kwargs)
    config.use_cache = False
    rope = config.rope_scaling
    if isinstance(rope, dict) and "type" not in rope:
        kind = rope.get("rope_type", "default")
        config.rope_scaling = None if kind == "default" else {"type": kind, **rope}
    single_vocab_head = config.head_type == "raw" and not config.head_multi
    if not single_vocab_head:
        config.tie_word_embeddings = False
    kwargs.pop("trust_remote_code", None)  # FlagEmbedding ships the code: nothing remote to run
    model = layerwise_model_class(single_vocab_head).from_pretrained(path, config=config, **kwargs)
    import torch

    for module in model.modules():
        if isinstance(module, MiniCPMRotaryEmbedding):
            device = module.inv_freq.device
            steps = torch.arange(0, module.dim, 2, dtype=torch.int64).float().to(device)
            module.inv_freq = 1.0 / (module.base ** (steps / module.dim))
            module._set_cos_sin_cache(module.max_position_embeddings, device, torch.float32)
    return model


def load(spec: ModelSpec, provider: ModelProvider) -> FlagLLMReranker:
    """Loader of ``backend="flag-llm-reranker"``.

    The registry checked the option names against this backend's row before this runs: besides
    the ones read here and the Hugging Face loading options, every option is a pre-processing
    keyword of :class:`FlagLLMReranker` (FlagEmbedding's own)."""
    options = spec.options_dict
    mode = score_mode_of(spec, "sigmoid")
    assert mode is not None
    import_flag(spec.backend)
    layer = _cutoff_layer(options.get("cutoff_layers"))
    kind = _model_class(spec, options)
    if kind == MODEL_CLASSES[0] and layer is not None:
        raise ConfigurationError(
            "cutoff_layers only applies to layer-wise models (model_class="
            "'decoder-only-layerwise', e.g. bge-reranker-v2-minicpm-layerwise)."
        )
    ours = {"score_mode", "model_class", "cutoff_layers"}
    settings = {k: v for k, v in options.items() if k not in ours and k not in HF_LOADING}
    check_preprocessing_options(settings, ("A: ", "B: "))  # before the weights are read
    if kind == MODEL_CLASSES[1]:
        model, tokenizer = load_causal_lm(spec, options, _LayerWiseLoader)
    else:
        model, tokenizer = load_causal_lm(spec, options)
    max_length = spec.max_length or FLAG_DEFAULT_MAX_LENGTH
    args = (model, tokenizer, spec.device, spec.dtype, max_length)
    if kind == MODEL_CLASSES[1]:
        return LayerWiseFlagLLMReranker(*args, score_mode=mode, cutoff_layer=layer, **settings)
    reranker = FlagLLMReranker(*args, score_mode=mode, **settings)
    check_answer_token(model, reranker.yes_id, "'Yes' (FlagEmbedding's answer token)")
    return reranker


class _LayerWiseLoader:
    """``from_pretrained`` for :func:`~._last_token.load_causal_lm`: the layer-wise class, fixed."""

    @staticmethod
    def from_pretrained(path: str, **kwargs: Any) -> Any:
        return load_layerwise_model(path, **kwargs)
