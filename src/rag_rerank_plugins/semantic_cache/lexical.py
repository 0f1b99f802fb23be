"""BM25 over the cached queries of one namespace: the lexical half of the ``hybrid`` guard.

Why: dense similarity says two questions are about the same topic; lexical overlap, weighted by
how rare each word is among the cached questions (BM25's IDF), says whether they use the same
distinctive words. Fused, they reject near misses that a dense threshold alone lets through.

Tokens are folded words (:func:`.identity.words`) with structural markers canonicalised ("Art."
and "artigo" are one token) and numbers normalised ("1.000" = "1000"). Scripts written without
spaces (Chinese, Japanese kana, Thai, Lao, Khmer, Myanmar) count one token per character, as
character n-gram indexes of those languages do: split on spaces and punctuation alone, a
Chinese clause was one "word", so two questions differing by a name shared no token at all, and
a 1,300-character Chinese RAG prompt counted 33 words, under the long-query rule's 160
(:data:`.guards.MAX_SEMANTIC_WORDS`). The corpus statistics
(document frequencies, average length) are kept incrementally per namespace, so a put or a
removal costs a few dictionary updates, and scoring a handful of candidates is microseconds.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Sequence

from .identity import _NUMBER, MARKERS, normalize_number, words

__all__ = ["BM25Corpus", "tokens"]

K1 = 1.2
B = 0.75


#: Scripts written without spaces between words: CJK ideographs (with extensions and
#: compatibility forms), Hiragana, Katakana (with its extensions and half-width forms), Thai, Lao,
#: Myanmar, Khmer.
_SPACELESS = (
    "\u0e00-\u0eff\u1000-\u109f\u1780-\u17ff\u3040-\u30ff\u31f0-\u31ff\u3400-\u4dbf"
    "\u4e00-\u9fff\uf900-\ufaff\uff66-\uff9f\U00020000-\U0003134f"
)
#: One character of those scripts, or a run of anything else ("gpt4模型" -> "gpt4", "模", "型").
_PIECE = re.compile(f"[{_SPACELESS}]|[^{_SPACELESS}]+")


def tokens(text: str) -> list[str]:
    """The BM25 tokens of ``text`` (see the module docstring)."""
    out: list[str] = []
    for whole in words(text):
        for word in [whole] if whole.isascii() else _PIECE.findall(whole):
            if word in MARKERS:
                out.append(f"§{MARKERS[word]}")
            elif _NUMBER.fullmatch(word):
                out.append(normalize_number(word))
            else:
                out.append(word)
    return out


class BM25Corpus:
    """Document frequencies of one namespace's cached queries. Not locked: the cache calls it
    under its own lock."""

    def __init__(self) -> None:
        self.df: Counter[str] = Counter()
        self.docs = 0
        self.total_len = 0

    def add(self, toks: Sequence[str]) -> None:
        self.df.update(set(toks))
        self.docs += 1
        self.total_len += len(toks)

    def remove(self, toks: Sequence[str]) -> None:
        self.df.subtract(set(toks))
        self.docs = max(0, self.docs - 1)
        self.total_len = max(0, self.total_len - len(toks))

    def idf(self, term: str) -> float:
        # +1 counts the new query itself, so a term no cached query has keeps a finite weight.
        n = self.docs + 1
        df = max(0, self.df.get(term, 0)) + 1
        return math.log(1.0 + (n - df + 0.5) / (df + 0.5))

    def score(self, query: Sequence[str], doc: Sequence[str]) -> float:
        """Okapi BM25 of ``doc`` for ``query``."""
        if not query or not doc:
            return 0.0
        avgdl = (self.total_len + len(query)) / (self.docs + 1)
        tf = Counter(doc)
        norm = K1 * (1 - B + B * len(doc) / avgdl)
        return sum(self.idf(t) * tf[t] * (K1 + 1) / (tf[t] + norm) for t in query if t in tf)

    def similarity(self, query: Sequence[str], doc: Sequence[str]) -> float:
        """BM25 of ``doc`` divided by BM25 of the query against itself, in [0, 1]: 1 when the
        cached query has every query word (as often), 0 when it shares none. Symmetrised (the
        mean of both directions) so extra words on either side lower it."""
        forward = self.score(query, doc) / (self.score(query, query) or 1.0)
        backward = self.score(doc, query) / (self.score(doc, doc) or 1.0)
        return max(0.0, min(1.0, (forward + backward) / 2))
