"""The ``causal-lm-reranker`` backend: any causal LM scored by P(yes) after a prompt template.

A decoder LLM reranks by reading one (query, document) prompt and looking at the logits of the
*next* token. The two phases (left-padded prompts, a pass that keeps only the last position's
logits, one device->host copy) are :class:`~._last_token.LastTokenReranker`'s, shared with
:mod:`.flag_llm`; this module adds the prompt and the yes/no head.

``causal-lm-reranker`` loads any ``AutoModelForCausalLM`` and its tokenizer and builds the prompt
from a template whose defaults are the published Qwen3-Reranker one::

    {prefix: system slot}  <|im_start|>system\\n{system}<|im_end|>\\n<|im_start|>user\\n
    {template}             <Instruct>: {instruction}\\n<Query>: {query}\\n<Document>: {document}
    {suffix}               <|im_end|>\\n<|im_start|>assistant\\n<think>\\n\\n</think>\\n\\n

The score is ``softmax([logit(no), logit(yes)])[1]`` (``score_mode="sigmoid"``, the default: the
same number as ``sigmoid(logit(yes) - logit(no))``) or the logit difference itself
(``score_mode="raw"``), computed in FP32. As in the model card, the template part between prefix
and suffix is truncated from the end (the document's tail) so the whole prompt fits ``max_length``;
with text after ``{document}`` (a template with ``{query}`` last), only the document's tokens are
cut, so that text and the query stay whole (:meth:`CausalLMReranker.encode`). An explicit
``max_length`` is capped at a learned absolute position table (GPT-2, OPT) with a warning.
"""

from __future__ import annotations

import string
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from ..exceptions import ConfigurationError
from ._common import score_mode_of
from ._last_token import LastTokenReranker, check_answer_token, load_causal_lm
from ._torch_common import (
    DECODER_POSITION_TABLES,
    loading_errors,
    position_table_limit,
    warn_past_positions,
)
from .base import ModelProvider
from .options import HF_LOADING

if TYPE_CHECKING:
    from ..spec import ModelSpec

__all__ = [
    "DEFAULT_INSTRUCTION",
    "DEFAULT_PREFIX",
    "DEFAULT_SUFFIX",
    "DEFAULT_SYSTEM",
    "DEFAULT_TEMPLATE",
    "CausalLMReranker",
    "load",
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
#: Stands for the document while a prompt is split around its ``{document}`` slot (a private-use
#: character: a query that contains it only falls back to truncating the whole body).
_DOCUMENT_MARK = "\ue000document\ue001"


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


def _text_option(option: str, value: Any, default: str) -> str:
    """A prompt text option: None means the default (the model card's ``format_instruction``
    does that for the instruction), anything but a string is refused. Without this,
    ``instruction=None`` put the word "None" in every prompt."""
    if value is None:
        return default
    if not isinstance(value, str):
        raise ConfigurationError(
            f"{option}={value!r}: give a string (or None for the default), not "
            f"{type(value).__name__}."
        )
    return value


def token_id(tokenizer: Any, token: str, option: str) -> int:
    """The id of ``token``: a vocabulary entry, or a text that encodes to exactly one token."""
    if not isinstance(token, str) or not token:
        raise ConfigurationError(
            f"{option}={token!r}: give the answer token as a non-empty string, e.g. 'yes' / 'no'."
        )
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


def position_limit(
    model: Any, requested: int | None, default: int, label: str = "the model"
) -> int:
    """``requested``, else ``default`` capped by the model's position table (when it has one).

    A ``requested`` length past a learned absolute table (GPT-2 ``wpe``, OPT ``embed_positions``)
    is capped there with the encoders' warning: uncapped, every pass holding a long prompt
    failed with "index out of range in self", and so did the requests batched with it. Rotary
    and ALiBi models (Llama, Qwen, Gemma, Mistral, BLOOM) have no table and keep ``requested``."""
    if requested:
        limit = position_table_limit(model, DECODER_POSITION_TABLES)
        if limit is not None and 0 < limit < int(requested):
            warn_past_positions(int(requested), limit, label)
            return limit
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
        system: str | None = DEFAULT_SYSTEM,
        prefix: str = DEFAULT_PREFIX,
        template: str = DEFAULT_TEMPLATE,
        suffix: str = DEFAULT_SUFFIX,
        instruction: str | None = DEFAULT_INSTRUCTION,
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
        system = _text_option("system", system, DEFAULT_SYSTEM)
        instruction = _text_option("instruction", instruction, DEFAULT_INSTRUCTION)
        self.template = template
        self.instruction = instruction
        self.score_mode = score_mode
        self.yes_id = token_id(tokenizer, yes_token, "yes_token")
        self.no_id = token_id(tokenizer, no_token, "no_token")
        if self.yes_id == self.no_id:
            raise ConfigurationError(
                f"yes_token={yes_token!r} and no_token={no_token!r} are the same token."
            )
        check_answer_token(model, self.yes_id, f"yes_token={yes_token!r}")
        check_answer_token(model, self.no_id, f"no_token={no_token!r}")
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
        if self.room <= self._template_tokens:
            # Only the document (then the query) is cut to fit ``room``: here no token of the
            # query or the document would be left, and every document would score the same.
            raise ConfigurationError(
                f"max_length={max_length} leaves {self.room} tokens for the template, which "
                f"alone takes {self._template_tokens} (instruction included) after the "
                f"prefix and suffix ({len(self.prefix_ids) + len(self.suffix_ids)} tokens): no "
                "token of the query or document would reach the model. Raise max_length or "
                "shorten the prompt."
            )

    def _ids(self, text: str, limit: int | None = None) -> list[int]:
        """Token ids of ``text``, the first ``limit`` of them when given (truncating in the
        tokenizer, which also keeps it from warning about texts past its model_max_length)."""
        cut = {"truncation": True, "max_length": limit} if limit is not None else {}
        return list(self.tokenizer(text, add_special_tokens=False, **cut)["input_ids"])

    def encode(self, pairs: Sequence[tuple[str, str]]) -> list[list[int]]:
        """Each pair's prompt ids, the template part cut to ``room`` by :meth:`_fit`."""
        texts = [
            self.template.format(instruction=self.instruction, query=q, document=d)
            for q, d in pairs
        ]
        # One token past the room tells a body that fits (kept as tokenized) from one that does not.
        body = self.tokenizer(
            texts, add_special_tokens=False, truncation=True, max_length=self.room + 1
        )["input_ids"]
        return [
            self.prefix_ids + self._fit(list(ids), q, d) + self.suffix_ids
            for ids, (q, d) in zip(body, pairs, strict=True)
        ]

    def _fit(self, ids: list[int], query: str, document: str) -> list[int]:
        """The template part in at most ``room`` tokens, cutting the document's tail only.

        ``ids`` is the whole body's tokenization (at most ``room + 1`` ids). When nothing follows
        the one ``{document}`` slot (the default template), cutting the body's end is cutting
        the document's tail: the model card's ids. Otherwise truncating the whole body from its
        end dropped whatever follows the document (with ``{query}`` last, the whole query, so
        every query scored the same): the text up to the document's end is cut to what the text
        after it leaves. When the query and fixed text alone take the room, the document is
        dropped and the rest is truncated from its end, as the model card does with a long
        query."""
        if len(ids) <= self.room:
            return ids
        marked = self.template.format(
            instruction=self.instruction, query=query, document=_DOCUMENT_MARK
        )
        parts = marked.split(_DOCUMENT_MARK)
        if len(parts) != 2 or not parts[1]:
            return ids[: self.room]
        head, tail = parts
        tail_ids = self._ids(tail, self.room + 1)
        keep = self.room - len(tail_ids)
        if keep <= 0 or keep <= len(self._ids(head, keep + 1)):  # no document token left
            return self._ids(head + tail, self.room)
        return self._ids(head + document, keep) + tail_ids

    def head(self, last: Any) -> Any:
        import torch

        pair = last[:, [self.no_id, self.yes_id]].float()
        if self.score_mode == "raw":
            return pair[:, 1] - pair[:, 0]
        return torch.log_softmax(pair, dim=-1)[:, 1].exp()

    def window_source(self) -> tuple[Any, int] | None:
        # Windows split the document so query + document fit the template's free room.
        return self.tokenizer, self.room - self._template_tokens


# -- loading ------------------------------------------------------------------------------------


def load(spec: ModelSpec, provider: ModelProvider) -> CausalLMReranker:
    """Loader of ``backend="causal-lm-reranker"``.

    The registry checked the option names against this backend's row before this runs: besides
    ``score_mode`` and the Hugging Face loading options, every option is a prompt keyword of
    :class:`CausalLMReranker`."""
    options = spec.options_dict
    mode = score_mode_of(spec, "sigmoid")
    assert mode is not None
    options.pop("score_mode", None)
    model, tokenizer = load_causal_lm(spec, options)
    prompt = {k: v for k, v in options.items() if k not in HF_LOADING}
    max_length = position_limit(model, spec.max_length, DEFAULT_MAX_LENGTH, spec.model)
    with loading_errors(spec):
        return CausalLMReranker(
            model, tokenizer, spec.device, spec.dtype, max_length, score_mode=mode, **prompt
        )
