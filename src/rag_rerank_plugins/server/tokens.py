"""Counting and cutting request texts in a served model's own tokens.

Why: the wire protocols speak in tokens. TEI's ``truncate``/``truncation_direction`` say which
end of a too-long input to drop (the model itself only ever drops the right end), Cohere v2's
``max_tokens_per_doc`` caps each document, and OpenAI's ``usage``, infinity's ``usage`` and
Cohere's ``billed_units`` report token counts. All of them must be counted with the tokenizer
of the model that answers, not guessed from characters.

:func:`text_tokens` finds the tokenizer of a loaded model (a reranker's ``window_source``, an
embedder's ``tokenizer`` or its sentence-transformers model's) and wraps a *private copy*: the
model's own tokenizer belongs to its prepare thread, and a fast tokenizer must not be used by
two threads at once (the copy is guarded by a lock, as :mod:`rag_rerank_plugins.windows`
does). A backend with no tokenizer (fakes, a remote model) is counted in whitespace-separated
words, which :attr:`TextTokens.exact` reports as False.

Cuts are slices of the text's own characters (the tokenizer's offsets), so the model sees the
user's text, not a decoded approximation; a slow tokenizer without offsets decodes instead.
"""

from __future__ import annotations

import copy
import re
import weakref
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

from .._forksafe import ForkSafeLock

__all__ = ["Direction", "TextTokens", "longest_first", "text_tokens"]

Direction = Literal["right", "left"]

#: Tokenizer limits above this mean "no real limit" (HF uses 1e30).
_NO_LIMIT = 1_000_000
_WORD = re.compile(r"\S+")

_Encoded = tuple[int, list[tuple[int, int]] | None, list[int] | None]


@dataclass
class _Cut:
    text: str
    tokens: int


class TextTokens:
    """A served model's tokens: how many a text has, and the text cut to ``n`` of them."""

    def __init__(self, tokenizer: Any | None, max_tokens: int | None) -> None:
        self._lock = ForkSafeLock()
        self._kind = _kind_of(tokenizer)
        own = getattr(tokenizer, "model_max_length", None) if self._kind == "hf" else None
        private: Any = copy.deepcopy(tokenizer) if self._kind != "words" else None
        if self._kind == "hf":
            private.model_max_length = _NO_LIMIT * 1000  # whole texts, no length warnings
        self._tok: Any = private
        limit = max_tokens if max_tokens and max_tokens < _NO_LIMIT else None
        if limit is None and isinstance(own, int) and 0 < own < _NO_LIMIT:
            limit = own
        #: Tokens of one model input (special tokens included); None: no known limit.
        self.max_tokens: int | None = limit
        self.single_special = self._specials(pair=False)
        self.pair_special = self._specials(pair=True)

    @property
    def exact(self) -> bool:
        """True when counts come from the model's tokenizer (False: whitespace words)."""
        return self._kind != "words"

    def _specials(self, *, pair: bool) -> int:
        if self._kind == "hf":
            return int(self._tok.num_special_tokens_to_add(pair=pair))
        if self._kind == "tokenizers":
            processor = getattr(self._tok, "post_processor", None)
            if processor is not None:
                return int(processor.num_special_tokens_to_add(pair))
        return 0

    def _encode(self, texts: Sequence[str]) -> list[_Encoded]:
        """``(token count, character offsets or None, ids or None)`` per text, no specials."""
        if not texts:
            return []
        if self._kind == "words":
            out: list[_Encoded] = []
            for text in texts:
                spans = [m.span() for m in _WORD.finditer(text)]
                out.append((len(spans), spans, None))
            return out
        with self._lock:
            if self._kind == "tokenizers":
                encodings = self._tok.encode_batch(list(texts), add_special_tokens=False)
                return [(len(e.ids), [tuple(o) for o in e.offsets], list(e.ids)) for e in encodings]
            fast = bool(getattr(self._tok, "is_fast", False))
            enc = self._tok(list(texts), add_special_tokens=False, return_offsets_mapping=fast)
            offsets = enc["offset_mapping"] if fast else [None] * len(texts)
            return [
                (len(ids), [tuple(o) for o in offs] if offs is not None else None, list(ids))
                for ids, offs in zip(enc["input_ids"], offsets, strict=True)
            ]

    def lengths(self, texts: Sequence[str]) -> list[int]:
        """Tokens of each text alone, special tokens not counted."""
        return [n for n, _, _ in self._encode(texts)]

    def input_tokens(self, texts: Sequence[str]) -> list[int]:
        """Tokens the model reads for each text embedded alone: its tokens plus the special
        ones, capped at the model's limit (what ``tokenizer(text, truncation=True)`` gives)."""
        return [self._cap(n + self.single_special) for n in self.lengths(texts)]

    def pair_tokens(self, query: str, texts: Sequence[str]) -> list[int]:
        """Tokens the model reads for each (query, text) pair, capped at its limit."""
        q, *rest = self.lengths([query, *texts])
        return [self._cap(q + n + self.pair_special) for n in rest]

    def _cap(self, n: int) -> int:
        return min(n, self.max_tokens) if self.max_tokens is not None else n

    def cut(self, texts: Sequence[str], keep: Sequence[int], direction: Direction) -> list[str]:
        """Each text cut to its first (``right``: the right end is dropped) or last (``left``)
        ``keep[i]`` tokens; texts that fit come back unchanged."""
        return [c.text for c in self._cut(texts, keep, direction)]

    def _cut(self, texts: Sequence[str], keep: Sequence[int], direction: Direction) -> list[_Cut]:
        out: list[_Cut] = []
        for text, n_keep, (n, offsets, ids) in zip(texts, keep, self._encode(texts), strict=True):
            n_keep = max(0, int(n_keep))
            if n <= n_keep:
                out.append(_Cut(text, n))
                continue
            start, stop = (0, n_keep) if direction == "right" else (n - n_keep, n)
            piece = self._slice(text, offsets, ids, start, stop)
            # A cut inside a word can re-tokenize longer (a word's tail read as a word start):
            # then the model would cut again, from the end, which a left cut exists to keep.
            # So drop one more token from the cut side until the piece fits.
            count = self._encode([piece])[0][0]
            while start < stop and count > n_keep:
                start, stop = (start, stop - 1) if direction == "right" else (start + 1, stop)
                piece = self._slice(text, offsets, ids, start, stop)
                count = self._encode([piece])[0][0]
            out.append(_Cut(piece, count))
        return out

    def _slice(
        self,
        text: str,
        offsets: list[tuple[int, int]] | None,
        ids: list[int] | None,
        start: int,
        stop: int,
    ) -> str:
        if start >= stop:
            return ""
        if offsets is not None:
            return text[offsets[start][0] : offsets[stop - 1][1]]
        assert ids is not None
        with self._lock:
            return str(self._tok.decode(ids[start:stop], skip_special_tokens=True))

    def fit_single(self, texts: Sequence[str], direction: Direction) -> tuple[list[str], list[int]]:
        """Texts cut so each fits the model's input alone; and which ones were too long."""
        if self.max_tokens is None:
            return list(texts), []
        room = max(0, self.max_tokens - self.single_special)
        lengths = self.lengths(texts)
        too_long = [i for i, n in enumerate(lengths) if n > room]
        if not too_long:
            return list(texts), []
        return self.cut(texts, [room] * len(texts), direction), too_long

    def fit_pairs(
        self, query: str, texts: Sequence[str], direction: Direction
    ) -> tuple[list[tuple[str, str]], list[int]]:
        """``(query, text)`` pairs cut the way Hugging Face tokenizers truncate a pair
        (``longest_first``: the longer side loses tokens first) from ``direction``'s end, so
        each fits the model's input; and which texts did not fit whole."""
        if self.max_tokens is None:
            return [(query, t) for t in texts], []
        room = max(0, self.max_tokens - self.pair_special)
        q_len, *lengths = self.lengths([query, *texts])
        pairs: list[tuple[str, str]] = []
        too_long: list[int] = []
        query_cuts: dict[int, str] = {}
        for i, (text, t_len) in enumerate(zip(texts, lengths, strict=True)):
            if q_len + t_len <= room:
                pairs.append((query, text))
                continue
            too_long.append(i)
            q_keep, t_keep = longest_first(q_len, t_len, room)
            if q_keep not in query_cuts:
                query_cuts[q_keep] = self.cut([query], [q_keep], direction)[0]
            pairs.append((query_cuts[q_keep], self.cut([text], [t_keep], direction)[0]))
        return pairs, too_long


def longest_first(first: int, second: int, room: int) -> tuple[int, int]:
    """Lengths after Hugging Face ``tokenizers``' ``longest_first`` pair truncation to ``room``:
    the longer sequence is cut to leave the shorter whole when it can, else both get half
    (the second one the odd token)."""
    if first + second <= room:
        return first, second
    swap = first > second
    n1, n2 = (second, first) if swap else (first, second)
    n2 = n1 if n1 > room else max(n1, room - n1)
    if n1 + n2 > room:
        n1 = room // 2
        n2 = n1 + room % 2
    return (n2, n1) if swap else (n1, n2)


def _kind_of(tokenizer: Any) -> str:
    if tokenizer is None:
        return "words"
    if callable(getattr(tokenizer, "num_special_tokens_to_add", None)) and callable(tokenizer):
        return "hf"
    if callable(getattr(tokenizer, "encode_batch", None)):
        return "tokenizers"  # a ``tokenizers.Tokenizer`` (ONNX backends)
    return "words"


_cache_lock = ForkSafeLock()
_cache: weakref.WeakKeyDictionary[Any, TextTokens] = weakref.WeakKeyDictionary()


def _source(model: Any) -> tuple[Any | None, int | None]:
    """The model's tokenizer and its input limit in tokens, as far as the backend shows them."""
    window_source = getattr(model, "window_source", None)
    if callable(window_source):
        found = window_source()
        if found is not None:
            return found[0], int(found[1]) if found[1] else None
    inner = getattr(model, "model", None)
    tokenizer = getattr(model, "tokenizer", None)
    if tokenizer is None and inner is not None:
        tokenizer = getattr(inner, "tokenizer", None)
    limit = getattr(model, "max_tokens", None) or getattr(model, "max_length", None)
    if not isinstance(limit, int) and inner is not None:
        limit = getattr(inner, "max_seq_length", None)
    return tokenizer, limit if isinstance(limit, int) and limit > 0 else None


def text_tokens(model: Any) -> TextTokens:
    """The (cached) :class:`TextTokens` of a loaded model."""
    try:
        found = _cache.get(model)
    except TypeError:  # not weak-referenceable: no cache
        return TextTokens(*_source(model))
    if found is not None:
        return found
    with _cache_lock:
        found = _cache.get(model)
        if found is None:
            found = _cache[model] = TextTokens(*_source(model))
    return found
