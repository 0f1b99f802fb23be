"""Long-document reranking: split passages into overlapping token windows, score, aggregate.

Why: every cross-encoder truncates its input (512 tokens for most rerankers), so a passage whose
relevant sentence sits at token 3,000 is scored on its first page only. With windows on, a passage
longer than one window becomes several ``(query, window)`` pairs scored by the same model through
the same pool (so the scheduler batches them with everything else), and the passage score is the
``max`` (default), ``mean`` or ``first`` of its window scores. Passages that fit in one window are
scored unchanged.

Sizes are in the *model's* tokens, from a private copy of the model's own tokenizer (the model's
prepare thread tokenizes with the original; fast tokenizers must not be shared across threads). The
query is kept whole in every window as long as it fits in ``query_tokens``; a longer query is cut
to that budget, or to the model's own query limit where that is lower (below).
``tokens="auto"`` fills the model's input (``max_length`` minus query and special tokens); an
explicit size is capped to that. Windows start every ``stride`` tokens (default half a
window) and the last one ends at the passage's end. Window texts are exact slices of the passage
(character offsets from the tokenizer), so the model sees the passage's own text. A slice that
re-tokenizes longer than its token range (cut inside a word or a multi-byte character) is
narrowed until it fits, so the model never truncates a window (``Windower._fit``).

Which window decided the score (the best one for ``max``/``mean``, the first for ``first``) is
reported per passage as a :class:`WindowInfo` (adapters put it in result metadata).

**What a backend provides** (:func:`windower_for`): ``RerankerModel.window_source()`` returns
``(tokenizer, max tokens of one query + passage input)``. A reranker that cuts the query on its
own, before the pair (FlagEmbedding's LLM rerankers keep at most ``query_max_length`` tokens of
``"A: " + query``), may also define ``window_query_limit() -> int | None``: the most tokens of
the bare query (counted as the windower counts them) that reach the model; None or no such
method means no limit of its own. The query is then cut to the lower of that and
``query_tokens``. Why: cut only to ``query_tokens``, the query's tail was silently dropped by
the model while every window gave up room for it (at ``max_length=64``, a 600-token passage
became 200 windows of 6 tokens).
"""

from __future__ import annotations

import copy
import math
import weakref
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any, Literal

from ._forksafe import ForkSafeLock, at_fork
from .backends.base import LoadedModel, RerankerModel
from .exceptions import ConfigurationError, InvalidInputError
from .inputs import clean_text

__all__ = [
    "AGGREGATES",
    "Window",
    "WindowInfo",
    "WindowPlan",
    "WindowSettings",
    "Windower",
    "aggregate_scores",
    "windower_for",
]

Aggregate = Literal["max", "mean", "first"]
AGGREGATES: tuple[str, ...] = ("max", "mean", "first")

#: Tokenizer limits above this mean "no real limit" (HF uses 1e30): windows need a real one.
_NO_LIMIT = 1_000_000


@dataclass(frozen=True)
class WindowSettings:
    """How to window long passages. Per-call settings: never part of the model's pool key."""

    tokens: int | Literal["auto"] = "auto"
    stride: int | None = None
    query_tokens: int = 64
    aggregate: Aggregate = "max"

    def __post_init__(self) -> None:
        if self.tokens != "auto" and (
            isinstance(self.tokens, bool) or not isinstance(self.tokens, int) or self.tokens <= 0
        ):
            raise ConfigurationError(
                f"window_tokens must be a positive int, 'auto' or None (off), got {self.tokens!r}."
            )
        if self.stride is not None and (
            isinstance(self.stride, bool) or not isinstance(self.stride, int) or self.stride <= 0
        ):
            raise ConfigurationError(
                f"window_stride must be a positive int or None, got {self.stride!r}."
            )
        if isinstance(self.tokens, int) and self.stride is not None and self.stride > self.tokens:
            raise ConfigurationError(
                f"window_stride ({self.stride}) must not exceed window_tokens ({self.tokens}): "
                "the text between windows would never be scored."
            )
        if (
            isinstance(self.query_tokens, bool)
            or not isinstance(self.query_tokens, int)
            or self.query_tokens <= 0
        ):
            raise ConfigurationError(
                f"window_query_tokens must be a positive int, got {self.query_tokens!r}."
            )
        if self.aggregate not in AGGREGATES:
            raise ConfigurationError(
                f"window_aggregate must be one of {AGGREGATES}, got {self.aggregate!r}."
            )


@dataclass(frozen=True)
class Window:
    """One slice of a passage: token range ``[token_start, token_end)`` and its characters."""

    text: str
    token_start: int
    token_end: int
    char_start: int | None
    char_end: int | None


@dataclass(frozen=True)
class WindowInfo:
    """The window that decided a passage's score, as reported in result metadata."""

    index: int  # which window (0-based) of ``count``
    count: int
    token_start: int
    token_end: int
    char_start: int | None  # None with slow tokenizers (no offsets)
    char_end: int | None
    score: float  # that window's own score
    aggregate: str
    window_tokens: int  # the effective window size used for this passage's query
    stride: int

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def aggregate_scores(scores: Sequence[float], how: str) -> tuple[float, int]:
    """``(passage score, index of the reported window)``. NaN windows are ignored unless all are."""
    if how == "first":
        return float(scores[0]), 0
    valid = [(s, i) for i, s in enumerate(scores) if not math.isnan(s)]
    if not valid:
        return math.nan, 0
    best_score, best = max(valid, key=lambda si: (si[0], -si[1]))  # ties: the earliest window
    if how == "max":
        return float(best_score), best
    if how == "mean":
        return math.fsum(s for s, _ in valid) / len(valid), best
    raise ConfigurationError(f"window_aggregate must be one of {AGGREGATES}, got {how!r}.")


@dataclass(frozen=True)
class WindowPlan:
    """The (query, window) pairs for one rerank call and how to fold their scores back."""

    query: str  # cut to window_query_tokens (or the model's lower query limit) for the windows
    windows: tuple[tuple[Window, ...], ...]  # per passage, at least one
    settings: WindowSettings
    window_tokens: int
    stride: int
    #: The query each passage is scored with: the whole one for a passage that fits one
    #: window and the model's input beside it (scored exactly as without windows), else
    #: ``query``.
    queries: tuple[str, ...] = ()

    @property
    def pairs(self) -> list[tuple[str, str]]:
        queries = self.queries or (self.query,) * len(self.windows)
        return [(q, w.text) for q, doc in zip(queries, self.windows, strict=True) for w in doc]

    def aggregate(self, scores: Sequence[float]) -> tuple[list[float], list[WindowInfo]]:
        """Passage scores (input order) and the reporting window of each."""
        expected = sum(len(doc) for doc in self.windows)
        if len(scores) != expected:
            raise ValueError(f"expected {expected} window scores, got {len(scores)}")
        out: list[float] = []
        infos: list[WindowInfo] = []
        pos = 0
        for doc in self.windows:
            doc_scores = [float(s) for s in scores[pos : pos + len(doc)]]
            pos += len(doc)
            score, index = aggregate_scores(doc_scores, self.settings.aggregate)
            w = doc[index]
            out.append(score)
            infos.append(
                WindowInfo(
                    index=index,
                    count=len(doc),
                    token_start=w.token_start,
                    token_end=w.token_end,
                    char_start=w.char_start,
                    char_end=w.char_end,
                    score=doc_scores[index],
                    aggregate=self.settings.aggregate,
                    window_tokens=self.window_tokens,
                    stride=self.stride,
                )
            )
        return out, infos


def _starts(n_tokens: int, size: int, stride: int) -> list[int]:
    """Window starts covering ``n_tokens``: every ``stride``, the last one ending at the end."""
    if n_tokens <= size:
        return [0]
    starts = list(range(0, n_tokens - size + 1, stride))
    if starts[-1] + size < n_tokens:
        starts.append(n_tokens - size)
    return starts


class Windower:
    """Splits passages with a private copy of the model's tokenizer.

    :meth:`plan` runs in the callers' threads, before the pairs reach the model's scheduler, and
    a fast tokenizer must not be used by two threads at once: one lock per windower guards the
    copy (the model's own tokenizer stays with its prepare thread, untouched).
    """

    def __init__(
        self, tokenizer: Any, max_pair_tokens: int, max_query_tokens: int | None = None
    ) -> None:
        """``max_query_tokens``: the model's own query limit (``window_query_limit``; None:
        none); the query is cut to the lower of it and ``WindowSettings.query_tokens``."""
        if not max_pair_tokens or max_pair_tokens >= _NO_LIMIT:
            raise ConfigurationError(
                "Long-document windows need the model's token limit, and this model has none. "
                "Set max_length= on the adapter or spec (e.g. 512)."
            )
        self._tok = copy.deepcopy(tokenizer)
        # The copy tokenizes whole passages on purpose: no "sequence too long" warnings.
        self._tok.model_max_length = _NO_LIMIT * 1000
        self._lock = ForkSafeLock()
        self.max_pair_tokens = int(max_pair_tokens)
        # At least one token: a query cut to nothing would score the window alone.
        self.max_query_tokens = None if max_query_tokens is None else max(1, int(max_query_tokens))
        self.special_tokens = int(self._tok.num_special_tokens_to_add(pair=True))
        self._offsets = bool(getattr(self._tok, "is_fast", False))

    def _tokenize(self, texts: list[str]) -> list[tuple[list[int], list[tuple[int, int]] | None]]:
        with self._lock:
            if self._offsets:
                enc = self._tok(texts, add_special_tokens=False, return_offsets_mapping=True)
                return [
                    (list(ids), [tuple(o) for o in offs])
                    for ids, offs in zip(enc["input_ids"], enc["offset_mapping"], strict=True)
                ]
            enc = self._tok(texts, add_special_tokens=False)
            return [(list(ids), None) for ids in enc["input_ids"]]

    def _slice(
        self, text: str, ids: list[int], offsets: list[tuple[int, int]] | None, start: int, end: int
    ) -> Window:
        if offsets is not None:
            c0, c1 = offsets[start][0], offsets[end - 1][1]
            return Window(text[c0:c1], start, end, c0, c1)
        with self._lock:
            piece = self._tok.decode(ids[start:end], skip_special_tokens=True)
        return Window(piece, start, end, None, None)

    def _count(self, texts: list[str]) -> list[int]:
        """Tokens of each text on its own (no special tokens), as the model will read it."""
        if not texts:
            return []
        with self._lock:
            return [len(ids) for ids in self._tok(texts, add_special_tokens=False)["input_ids"]]

    def _fit(
        self,
        text: str,
        ids: list[int],
        offsets: list[tuple[int, int]] | None,
        planned: list[int],
        size: int,
    ) -> tuple[Window, ...]:
        """The windows starting at ``planned``, each narrowed until its *text* re-tokenizes to at
        most ``size`` tokens, still covering the whole passage without gaps.

        Why: a window's text is a character slice, and a slice that starts inside a word or a
        multi-byte character (byte-level BPE gives each byte token the whole character's
        offsets) re-tokenizes to more tokens than its range (up to +3 seen with WordPiece and
        byte-level BPE). The model then truncated the pair, silently dropping the window's tail:
        for the last window, the end of the passage was never scored. A window is narrowed at
        its start while the previous one already covers those tokens (the last window keeps
        ending at the passage's end), else at its end; text it gives up gets one more window.
        Windows whose text fits (ordinary prose) keep their planned ranges.
        """
        n = len(ids)
        ranges = [(s, min(s + size, n)) for s in planned]
        windows = [self._slice(text, ids, offsets, s, e) for s, e in ranges]
        counts = self._count([w.text for w in windows])
        if all(c <= size for c in counts):
            return tuple(windows)
        out: list[Window] = []
        covered = 0  # tokens [0, covered) are in some window already
        pending = list(zip(ranges, windows, counts, strict=True))
        while covered < n:
            fitted: Window | None = None
            count = 0
            if pending:
                (start, end), fitted, count = pending.pop(0)
                if start > covered:  # an earlier window gave up its tail: no gap
                    start, fitted = covered, None
            else:  # the last window gave up text: one more, ending at the passage's end
                start, end = min(max(n - size, 0), covered), n
            while True:
                if fitted is None:
                    fitted = self._slice(text, ids, offsets, start, end)
                    count = self._count([fitted.text])[0]
                if count <= size or end - start <= 1:
                    break
                if start < covered:
                    start += 1
                else:
                    end -= 1
                fitted = None
            out.append(fitted)
            covered = end
        return tuple(out)

    def plan(self, query: str, texts: Sequence[str], settings: WindowSettings) -> WindowPlan:
        """Windows for every passage (input order) against ``query``."""
        for i, text in enumerate(texts):
            if not isinstance(text, str):
                raise InvalidInputError(
                    f"text #{i} is {type(text).__name__}, not str. Convert it to text first "
                    "(rag-rerank-plugins never guesses how to stringify a document)."
                )
        # Lone surrogates become U+FFFD here, as the handle does for every scored text (one code
        # unit for one: offsets and slices still index the caller's text); the fast tokenizer
        # raised TypeError on them, failing the whole call.
        query = clean_text(query) if isinstance(query, str) else query
        texts = [clean_text(text) for text in texts]
        tokenized = self._tokenize([query, *texts])
        q_ids, q_offsets = tokenized[0]
        q_len = whole_len = len(q_ids)
        whole_query = query
        # The model's own query limit, where lower: what it would cut off never reaches it,
        # and windows must not give up room for it (see the module docstring).
        budget = settings.query_tokens
        if self.max_query_tokens is not None:
            budget = min(budget, self.max_query_tokens)
        if q_len > budget:
            # Cut to the budget, measured on the cut text itself (see _fit): a cut inside a
            # word re-tokenizes longer, and the excess would come off the passage's room.
            whole, end = query, budget
            while True:
                query = self._slice(whole, q_ids, q_offsets, 0, end).text
                q_len = self._count([query])[0]
                if q_len <= budget or end <= 1:
                    break
                end -= 1
        room = self.max_pair_tokens - q_len - self.special_tokens
        if room <= 0:
            raise ConfigurationError(
                f"No room for passage tokens: the model takes {self.max_pair_tokens} tokens and "
                f"the query uses {q_len} (+{self.special_tokens} special). Lower "
                "window_query_tokens."
            )
        size = room if settings.tokens == "auto" else min(int(settings.tokens), room)
        stride = min(settings.stride or max(size // 2, 1), size)
        windows: list[tuple[Window, ...]] = []
        queries: list[str] = []
        for text, (ids, offsets) in zip(texts, tokenized[1:], strict=True):
            if len(ids) <= size:
                windows.append((Window(text, 0, len(ids), 0, len(text)),))
                # With the whole query where the whole pair fits the model: then scored
                # exactly as without windows (cutting a long query for other passages'
                # windows must not move this one's score). Where it does not fit, the model
                # would cut something; the cut query keeps this passage whole.
                fits = whole_len + len(ids) + self.special_tokens <= self.max_pair_tokens
                queries.append(whole_query if fits else query)
                continue
            windows.append(self._fit(text, ids, offsets, _starts(len(ids), size, stride), size))
            queries.append(query)
        return WindowPlan(query, tuple(windows), settings, size, stride, tuple(queries))


_cache_lock = ForkSafeLock()
_windowers: weakref.WeakKeyDictionary[Any, Windower] = weakref.WeakKeyDictionary()
#: A parent thread may have been tokenizing with a windower's tokenizer copy at the fork: the
#: child builds its own.
at_fork(_windowers.clear)


def windower_for(model: LoadedModel) -> Windower:
    """The (cached) windower of a loaded reranker; ConfigurationError when it has no tokenizer.

    Reads ``window_source()`` and, where the model defines it, ``window_query_limit()`` (an
    optional method: backends written before it keep working; see the module docstring)."""
    windower = _windowers.get(model)
    if windower is not None:
        return windower
    info = model.window_source() if isinstance(model, RerankerModel) else None
    if info is None:
        raise ConfigurationError(
            f"Long-document windows need a backend with a tokenizer; {type(model).__name__} has "
            "none. Use 'cross-encoder' or 'flag-reranker', or turn windows off "
            "(window_tokens=None)."
        )
    query_limit = getattr(model, "window_query_limit", None)
    max_query = query_limit() if callable(query_limit) else None
    with _cache_lock:
        windower = _windowers.get(model)
        if windower is None:
            windower = _windowers[model] = Windower(*info, max_query_tokens=max_query)
    return windower
