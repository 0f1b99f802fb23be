"""Guards: the test a cached query must pass before its answer is returned for a new query.

Why: the nearest cached query is always *some* query; whether it asks the same thing is a second
decision, and dense similarity alone gets it wrong exactly where it matters ("Art. 72" vs
"Art. 75" at cosine 0.96). Three guards, chosen by name:

* ``hybrid`` (default): ``score = 0.7 * dense + 0.3 * lexical`` (lexical: symmetrised BM25 over
  the namespace's cached queries, :mod:`.lexical`) must reach the threshold, **and** the identity
  tokens (:mod:`.identity`: numbers, articles, dates, codes, versions, entities, negation) must
  agree. No model call beyond the query embedding.
* ``rerank``: the shared cross-encoder's score of (new query, cached query) must reach the
  threshold (its scale: a sigmoid probability for single-logit models). One cross-encoder call
  per lookup with candidates.
* ``dense``: cosine similarity alone, as LangChain's ``RedisSemanticCache`` and GPTCache's default
  do; kept for comparison.

An identical query text always passes (whatever the guard says about it), and is returned before
any other candidate, whatever a score tie or a rounding above 1.0 says.

Long queries (more than :data:`MAX_SEMANTIC_WORDS` lexical tokens on either side: words, and
each character of a script written without spaces, :func:`.lexical.tokens`) only hit on identical
text: such a query is mostly not the question (LangChain's LLM cache sees a RAG prompt, the
retrieved context with the question at its end), and no guard can tell two of them apart.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from .identity import Identity, disagreement, extract
from .lexical import BM25Corpus, tokens

__all__ = [
    "DEFAULT_THRESHOLDS",
    "GUARDS",
    "MAX_SEMANTIC_WORDS",
    "Candidate",
    "Verdict",
    "judge",
    "too_long",
]

#: Guard names.
GUARDS: tuple[str, ...] = ("hybrid", "rerank", "dense")

#: Default threshold per guard. ``hybrid``: the fused score (tuned on the shipped labelled pairs
#: with all-MiniLM-L6-v2: benchmarks/semantic_cache_eval.py); ``dense``: a common cosine
#: threshold of dense-only caches; ``rerank``: a sigmoid probability of 0.5.
DEFAULT_THRESHOLDS: dict[str, float] = {"hybrid": 0.75, "rerank": 0.5, "dense": 0.9}

#: Past this many words (:func:`.lexical.tokens`) on either side, only an identical text is a
#: hit (reason ``"length"``). A query that long is mostly not the question: a RAG prompt is the
#: retrieved context with the question at its end. Two such prompts over the same context score
#: as one question on every guard: the embedder truncates its input (all-MiniLM-L6-v2 reads 256
#: word pieces, about 200 English words), so the question often never reaches it (cosine
#: 1.0), and the shared context dominates the lexical score too (hybrid 0.997 measured).
#: A fixed number of words rather than the embedder's window: the window is not known until the
#: model loads (and not at all behind a remote backend), and even within it the shared context
#: outweighs the question. 160 words is far above a question's length (the labelled pairs the
#: guards were tuned on have at most 14) and short of where MiniLM's window ends.
MAX_SEMANTIC_WORDS = 160

#: Weight of the dense score in the ``hybrid`` fusion (the rest is lexical).
DENSE_WEIGHT = 0.7


@dataclass
class Candidate:
    """A cached query near the new one."""

    id: int
    query: str
    dense: float
    tokens: list[str] = field(default_factory=list)
    identity: Identity | None = None


@dataclass(frozen=True)
class Verdict:
    """A guard's decision about one candidate: ``score`` on the guard's scale; ``reason`` why it
    failed ("threshold", "numbers", "codes", "entities", "negation", "contrast", "length", or,
    from ``SemanticCache.explain`` only, "floor": a cosine below the candidate floor, cut before
    the guard), None when it passed."""

    candidate: Candidate
    score: float
    lexical: float | None = None
    reason: str | None = None
    #: ``hybrid`` only: which identity tokens disagree (whatever the score), None if none do.
    identity: str | None = None

    @property
    def passed(self) -> bool:
        return self.reason is None


def judge(
    guard: str,
    query: str,
    candidates: list[Candidate],
    threshold: float,
    *,
    corpus: BM25Corpus | None = None,
    rerank_scores: list[float] | None = None,
) -> list[Verdict]:
    """A verdict per candidate: the identical text first, then best score first."""
    verdicts = []
    mine: Identity | None = None
    query_tokens = tokens(query)
    long_query = too_long(query_tokens)
    for i, cand in enumerate(candidates):
        if cand.query == query:
            verdicts.append(Verdict(cand, 1.0, 1.0 if guard == "hybrid" else None))
            continue
        if long_query or too_long(cand.tokens or tokens(cand.query)):
            verdicts.append(Verdict(cand, cand.dense, None, "length"))
            continue
        if guard == "dense":
            score, lexical = cand.dense, None
        elif guard == "rerank":
            assert rerank_scores is not None
            score, lexical = float(rerank_scores[i]), None
        else:
            lexical = (corpus or BM25Corpus()).similarity(query_tokens, cand.tokens)
            score = DENSE_WEIGHT * cand.dense + (1 - DENSE_WEIGHT) * lexical
        identity = None
        if guard == "hybrid":
            mine = mine or extract(query)
            identity = disagreement(mine, cand.identity or extract(cand.query))
        reason = identity or (None if score >= threshold else "threshold")
        verdicts.append(Verdict(cand, score, lexical, reason, identity))
    # The identical text first, whatever a tie or a rounding above 1.0 says (stable otherwise).
    verdicts.sort(key=lambda v: (v.candidate.query != query, -v.score))
    return verdicts


def too_long(query_tokens: list[str]) -> bool:
    """Whether a query of these tokens only hits on identical text (:data:`MAX_SEMANTIC_WORDS`)."""
    return len(query_tokens) > MAX_SEMANTIC_WORDS
