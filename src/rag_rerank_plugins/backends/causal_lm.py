"""Decoder-LLM rerankers scored at the last token: ``causal-lm-reranker`` and the shared machinery.

A decoder LLM reranks by reading one (query, document) prompt and looking at the logits of the
*next* token: the Qwen3-Reranker family compares "yes" with "no", FlagEmbedding's LLM rerankers
read the logit of "Yes". :class:`LastTokenReranker` is that recipe in the two phases of
:mod:`.base`, shared by this module and :mod:`.flag_llm`:

* ``prepare`` (CPU): the subclass turns pairs into token ids (:meth:`LastTokenReranker.encode`);
  the batch is **left-padded** to a multiple of 8, with position ids counted from the first real
  token, so every prompt ends at the last column and its positions are those of the unpadded
  prompt (results do not depend on which other prompts share the batch).
* ``forward`` (device): one pass that keeps only the last position's logits
  (``logits_to_keep=1`` where the model supports it: a 150k-token vocabulary times every position
  would cost more memory than the model), the subclass's score head, one device->host copy.
* ``finish``: floats.

``causal-lm-reranker`` loads any ``AutoModelForCausalLM`` and its tokenizer and builds the prompt
from a template whose defaults are the published Qwen3-Reranker one::

    {prefix: system slot}  <|im_start|>system\\n{system}<|im_end|>\\n<|im_start|>user\\n
    {template}             <Instruct>: {instruction}\\n<Query>: {query}\\n<Document>: {document}
    {suffix}               <|im_end|>\\n<|im_start|>assistant\\n<think>\\n\\n</think>\\n\\n

The score is ``softmax([logit(no), logit(yes)])[1]`` (``score_mode="sigmoid"``, the default: the
same number as ``sigmoid(logit(yes) - logit(no))``) or the logit difference itself
(``score_mode="raw"``), computed in FP32. As in the model card, the template part between prefix
and suffix is truncated from the end (the document's tail) so the whole prompt fits ``max_length``.
"""

from __future__ import annotations

import string
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from ..exceptions import ConfigurationError
from ._torch_common import (
    HostCopy,
    features_to,
    import_optional,
    loading_errors,
    module_bytes,
    prepare_module,
    prepared_batch,
)
from .base import SCORE, ModelProvider, Prepared, RerankerModel, Task
from .flag import score_mode_of
from .options import CAUSAL_LM_OPTIONS, CAUSAL_LM_PROMPT, HF_LOADING

if TYPE_CHECKING:
    from ..spec import ModelSpec

__all__ = [
    "DEFAULT_INSTRUCTION",
    "DEFAULT_PREFIX",
    "DEFAULT_SUFFIX",
    "DEFAULT_SYSTEM",
    "DEFAULT_TEMPLATE",
    "CausalLMReranker",
    "LastTokenReranker",
    "load",
    "load_causal_lm",
]

#: The Qwen3-Reranker model card's prompt, split into the slots the options can replace.
DEFAULT_SYSTEM = (
    "Judge whether the Document meets the requirements based on the Query and the Instruct "
    'provided. Note that the answer can only be "yes" or "no".'
)
DEFAULT_PREFIX = "<|im_start|>system\n{system}<|im_end|>\n<|im_start|>user\n"
DEFAULT_TEMPLATE = "<Instruct>: {instruction}\n<Query>: {query}\n<Document>: {document}"
DEFAULT_SUFFIX = "<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n"
DEFAULT_INSTRUCTION = "Given a web search query, retrieve relevant passages that answer the query"
#: The model card's ``max_length``; capped by the model's position table when that is shorter.
DEFAULT_MAX_LENGTH = 8192
#: Left-padded batches are rounded up to this many columns (as FlagEmbedding's collater does):
#: fewer distinct shapes for the kernels, at most 7 pad tokens per prompt.
PAD_TO_MULTIPLE_OF = 8


class LastTokenReranker(RerankerModel):
    """A causal LM scored from the logits at the last prompt position (see the module docstring).

    Subclasses provide :meth:`encode` (pairs -> token ids, CPU) and :meth:`head` (last-position
    logits -> one FP32 score per row, device). Not thread-safe: the tokenizer is used by the
    scheduler's one prepare thread, the model by its one device worker.
    """

    def __init__(
        self, model: Any, tokenizer: Any, device: str, dtype: str, max_length: int
    ) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.device = device
        self.dtype = dtype
        self.max_tokens = max_length
        pad = tokenizer.pad_token_id
        if pad is None:
            pad = tokenizer.eos_token_id
        if pad is None:
            raise ConfigurationError(
                "The tokenizer has neither a pad token nor an EOS token to pad with; save the "
                "model with a tokenizer that sets pad_token."
            )
        self.pad_id = int(pad)
        # transformers >= 4.50 names it logits_to_keep, 4.45-4.49 num_logits_to_keep.
        self._keep_last = next(
            (n for n in ("logits_to_keep", "num_logits_to_keep") if _accepts(model, n)), None
        )

    # -- what a subclass provides ---------------------------------------------------------------

    def encode(self, pairs: Sequence[tuple[str, str]]) -> list[list[int]]:
        """Token ids of each pair's whole prompt, in input order (CPU, prepare thread)."""
        raise NotImplementedError

    def head(self, last: Any) -> Any:
        """One FP32 score per row of ``last`` (the ``[batch, vocab]`` last-position logits)."""
        raise NotImplementedError

    def last_logits(self, features: dict[str, Any]) -> Any:
        """Logits at the last position, ``[batch, vocab]``: one pass, nothing else kept."""
        extra = {self._keep_last: 1} if self._keep_last else {}
        logits = self.model(**features, use_cache=False, **extra).logits
        return logits[:, -1, :]

    # -- the two phases -------------------------------------------------------------------------

    def collate(self, ids: list[list[int]]) -> dict[str, Any]:
        """Left-padded ``input_ids``/``attention_mask`` and positions of the unpadded prompts."""
        import torch

        width = max(len(x) for x in ids)
        width = -(-width // PAD_TO_MULTIPLE_OF) * PAD_TO_MULTIPLE_OF
        input_ids = torch.full((len(ids), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(ids), width), dtype=torch.long)
        for row, seq in enumerate(ids):
            if seq:
                input_ids[row, width - len(seq) :] = torch.tensor(seq, dtype=torch.long)
                mask[row, width - len(seq) :] = 1
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        return {"input_ids": input_ids, "attention_mask": mask, "position_ids": positions}

    def prepare(self, task: Task, items: Sequence[Any]) -> Prepared:
        ids = self.encode(items)
        return prepared_batch(self.collate(ids), len(items), self.device)

    def forward(self, task: Task, batch: Prepared) -> Any:
        import torch

        with torch.inference_mode():
            scores = self.head(self.last_logits(features_to(batch.payload, self.device)))
            return HostCopy(scores.float())

    def finish(self, task: Task, pending: Any) -> list[Any]:
        return [float(s) for s in pending.result().tolist()]

    def score_pairs(self, pairs: Sequence[tuple[str, str]], batch_size: int) -> list[float]:
        """The one-shot path: the same three phases, micro-batch after micro-batch."""
        out: list[float] = []
        for start in range(0, len(pairs), max(1, batch_size)):
            chunk = pairs[start : start + max(1, batch_size)]
            pending = self.forward(SCORE, self.prepare(SCORE, chunk))
            out.extend(self.finish(SCORE, pending))
        return out

    def footprint_bytes(self) -> int | None:
        return module_bytes(self.model)

    def close(self) -> None:
        self.model = None
        self.tokenizer = None


def _accepts(model: Any, name: str) -> bool:
    import inspect

    try:
        return name in inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return False


def _fields(text: str) -> set[str]:
    return {name for _, name, _, _ in string.Formatter().parse(text) if name is not None}


def _check_slots(option: str, text: str, allowed: set[str], required: set[str]) -> str:
    if not isinstance(text, str):
        raise ConfigurationError(f"{option} must be a string, got {type(text).__name__}.")
    try:
        names = _fields(text)
    except ValueError as exc:
        raise ConfigurationError(f"{option} is not a valid format string ({exc}).") from exc
    unknown = names - allowed
    missing = required - names
    if unknown or missing:
        raise ConfigurationError(
            f"{option}={text!r}: "
            + (f"unknown slot(s) {sorted(unknown)}; " if unknown else "")
            + (f"missing slot(s) {sorted(missing)}; " if missing else "")
            + f"it may use {sorted(allowed)}. Write a literal brace as {{{{ or }}}}."
        )
    return text


def token_id(tokenizer: Any, token: str, option: str) -> int:
    """The id of ``token``: a vocabulary entry, or a text that encodes to exactly one token."""
    unk = tokenizer.unk_token_id
    found = tokenizer.convert_tokens_to_ids(token)
    if isinstance(found, int) and found != unk and found >= 0:
        return found
    ids = tokenizer(token, add_special_tokens=False)["input_ids"]
    if len(ids) == 1:
        return int(ids[0])
    raise ConfigurationError(
        f"{option}={token!r} is not one token of this tokenizer (it encodes to {len(ids)}: "
        f"{ids}). Set {option} to a single vocabulary entry, e.g. 'yes' / 'no'."
    )


def position_limit(model: Any, requested: int | None, default: int) -> int:
    """``requested``, else ``default`` capped by the model's position table (when it has one)."""
    if requested:
        return int(requested)
    cap = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    return min(default, cap) if isinstance(cap, int) and cap > 0 else default


class CausalLMReranker(LastTokenReranker):
    """Any ``AutoModelForCausalLM`` scored by P(yes) after a prompt template (Qwen3-Reranker)."""

    def __init__(
        self,
        model: Any,
        tokenizer: Any,
        device: str,
        dtype: str,
        max_length: int,
        *,
        system: str = DEFAULT_SYSTEM,
        prefix: str = DEFAULT_PREFIX,
        template: str = DEFAULT_TEMPLATE,
        suffix: str = DEFAULT_SUFFIX,
        instruction: str = DEFAULT_INSTRUCTION,
        yes_token: str = "yes",
        no_token: str = "no",
        score_mode: str = "sigmoid",
    ) -> None:
        super().__init__(model, tokenizer, device, dtype, max_length)
        _check_slots("prefix", prefix, {"system"}, set())
        _check_slots("suffix", suffix, set(), set())
        _check_slots("template", template, {"instruction", "query", "document"}, {"query"})
        if "document" not in _fields(template):
            raise ConfigurationError(
                f"template={template!r} has no {{document}} slot: every document would score "
                "the same. Add {document}."
            )
        self.template = template
        self.instruction = instruction
        self.score_mode = score_mode
        self.yes_id = token_id(tokenizer, yes_token, "yes_token")
        self.no_id = token_id(tokenizer, no_token, "no_token")
        if self.yes_id == self.no_id:
            raise ConfigurationError(
                f"yes_token={yes_token!r} and no_token={no_token!r} are the same token."
            )
        self.prefix_ids = self._ids(prefix.format(system=system))
        self.suffix_ids = self._ids(suffix)
        self.room = max_length - len(self.prefix_ids) - len(self.suffix_ids)
        if self.room <= 0:
            raise ConfigurationError(
                f"max_length={max_length} leaves no room after the prompt's prefix and suffix "
                f"({len(self.prefix_ids) + len(self.suffix_ids)} tokens): raise max_length."
            )
        fixed = template.format(instruction=instruction, query="", document="")
        self._template_tokens = len(self._ids(fixed))

    def _ids(self, text: str) -> list[int]:
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def encode(self, pairs: Sequence[tuple[str, str]]) -> list[list[int]]:
        texts = [
            self.template.format(instruction=self.instruction, query=q, document=d)
            for q, d in pairs
        ]
        body = self.tokenizer(
            texts, add_special_tokens=False, truncation=True, max_length=self.room
        )["input_ids"]
        return [self.prefix_ids + list(ids) + self.suffix_ids for ids in body]

    def head(self, last: Any) -> Any:
        import torch

        pair = last[:, [self.no_id, self.yes_id]].float()
        if self.score_mode == "raw":
            return pair[:, 1] - pair[:, 0]
        return torch.log_softmax(pair, dim=-1)[:, 1].exp()

    def window_source(self) -> tuple[Any, int] | None:
        # Windows split the document so query + document fit the template's free room.
        return self.tokenizer, max(1, self.room - self._template_tokens)


# -- loading ------------------------------------------------------------------------------------


def load_causal_lm(spec: ModelSpec, options: dict[str, Any], model_class: Any = None) -> Any:
    """``(model, tokenizer)``: weights read directly in the spec's dtype, on its device, in
    ``eval()`` with gradients off. ``options`` holds only the Hugging Face loading options
    (:data:`~.options.HF_LOADING`); ``model_class`` defaults to ``AutoModelForCausalLM``."""
    from .st_cross_encoder import model_kwargs_for

    transformers = import_optional(
        "transformers", "transformers", "st", f"The {spec.backend!r} backend"
    )
    loading = {k: options[k] for k in HF_LOADING if k in options}
    cls = model_class or transformers.AutoModelForCausalLM
    with loading_errors(spec):
        tokenizer = transformers.AutoTokenizer.from_pretrained(spec.model, **loading)
        model = cls.from_pretrained(spec.model, **model_kwargs_for(spec.dtype), **loading)
        prepare_module(model, spec.dtype)
        model.to(spec.device)
    return model, tokenizer


def check_options(spec: ModelSpec, allowed: frozenset[str]) -> dict[str, Any]:
    """The spec's options, or a ConfigurationError naming the ones this backend does not read."""
    options = spec.options_dict
    unknown = sorted(set(options) - allowed)
    if unknown:
        raise ConfigurationError(
            f"Backend {spec.backend!r} does not accept option(s) {unknown}. Accepted: "
            f"{sorted(allowed)}."
        )
    return options


def load(spec: ModelSpec, provider: ModelProvider) -> CausalLMReranker:
    """Loader of ``backend="causal-lm-reranker"``."""
    options = check_options(spec, CAUSAL_LM_OPTIONS)
    mode = score_mode_of(spec, "sigmoid")
    assert mode is not None
    model, tokenizer = load_causal_lm(spec, options)
    prompt = {k: options[k] for k in CAUSAL_LM_PROMPT if k in options}
    max_length = position_limit(model, spec.max_length, DEFAULT_MAX_LENGTH)
    with loading_errors(spec):
        return CausalLMReranker(
            model, tokenizer, spec.device, spec.dtype, max_length, score_mode=mode, **prompt
        )
