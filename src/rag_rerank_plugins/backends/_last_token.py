"""The recipe both decoder-LLM rerankers share: score from the logits at the last prompt token.

A decoder LLM reranks by reading one (query, document) prompt and looking at the logits of the
*next* token: the Qwen3-Reranker family compares "yes" with "no" (:mod:`.causal_lm`),
FlagEmbedding's LLM rerankers read the logit of "Yes" (:mod:`.flag_llm`).
:class:`LastTokenReranker` is that recipe in the two phases of :mod:`.base`:

* ``prepare`` (CPU): the subclass turns pairs into token ids (:meth:`LastTokenReranker.encode`);
  the batch is **left-padded** to a multiple of 8, with position ids counted from the first real
  token, so every prompt ends at the last column and its positions are those of the unpadded
  prompt (results do not depend on which other prompts share the batch).
* ``forward`` (device): one pass that keeps only the last position's logits
  (``logits_to_keep=1`` where the model supports it: a 150k-token vocabulary times every position
  would cost more memory than the model), the subclass's score head, one device->host copy.
* ``finish``: floats.

:func:`load_causal_lm` loads the tokenizer and weights both backends start from.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from ..exceptions import ConfigurationError
from ._torch_common import (
    HostCopy,
    building,
    features_to,
    import_optional,
    loading_errors,
    model_kwargs_for,
    module_bytes,
    prepare_module,
    prepared_batch,
)
from .base import SCORE, Prepared, RerankerModel, Task
from .options import HF_LOADING

if TYPE_CHECKING:
    from ..spec import ModelSpec

__all__ = ["PAD_TO_MULTIPLE_OF", "LastTokenReranker", "check_answer_token", "load_causal_lm"]

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


def output_vocabulary(model: Any) -> int | None:
    """Rows of the logits the model returns (its output embedding), or None when unknown."""
    get = getattr(model, "get_output_embeddings", None)
    head = get() if callable(get) else None
    rows = getattr(head, "out_features", None)
    if isinstance(rows, int) and rows > 0:
        return rows
    vocab = getattr(getattr(model, "config", None), "vocab_size", None)
    return vocab if isinstance(vocab, int) and vocab > 0 else None


def check_answer_token(model: Any, token_id: int, what: str) -> None:
    """ConfigurationError at load when the answer token has no logit in this model.

    Why: a tokenizer can hold more tokens than the model's output layer (tokens added to the
    tokenizer, the model never resized, or a tokenizer from another model). The answer token's
    id then indexed past the logits: an IndexError deep in torch in every request."""
    rows = output_vocabulary(model)
    if rows is not None and not 0 <= token_id < rows:
        raise ConfigurationError(
            f"The answer token {what} has id {token_id}, but this model's output has {rows} "
            "logits (ids 0.."
            f"{rows - 1}): the tokenizer does not belong to the model, or the token was added to "
            "the tokenizer without resizing the model. Use the model's own tokenizer or a token "
            "of its vocabulary."
        )


def _accepts(model: Any, name: str) -> bool:
    import inspect

    try:
        return name in inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return False


def load_causal_lm(spec: ModelSpec, options: dict[str, Any], model_class: Any = None) -> Any:
    """``(model, tokenizer)``: weights read directly in the spec's dtype, on its device, in
    ``eval()`` with gradients off. Of ``options`` it reads the Hugging Face loading options
    (:data:`~.options.HF_LOADING`) and ignores the rest; ``model_class`` defaults to
    ``AutoModelForCausalLM``."""
    transformers = import_optional(
        "transformers", "transformers", "st", f"The {spec.backend!r} backend"
    )
    loading = {k: options[k] for k in HF_LOADING if k in options}
    cls = model_class or transformers.AutoModelForCausalLM
    with loading_errors(spec):
        tokenizer = transformers.AutoTokenizer.from_pretrained(spec.model, **loading)
        with building():
            model = cls.from_pretrained(spec.model, **model_kwargs_for(spec.dtype), **loading)
        prepare_module(model, spec.dtype)
        model.to(spec.device)
    return model, tokenizer
