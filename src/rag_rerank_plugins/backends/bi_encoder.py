"""Bi-encoder reranker (``backend="bi-encoder"``): cosine similarity of shared embeddings.

Why it exists: it reranks with any embedding model (no cross-encoder weights needed, so it works
offline with the packaged MiniLM), and it reuses the *same* pooled embedder handle that the
retriever already embeds with, so it costs no extra memory. Scores are cosines in [-1, 1].

``model`` names the embedding model; option ``embedder_backend`` (default
"sentence-transformers") picks the embedder backend. Other options go to the embedder spec.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from .base import CallContext, ModelProvider, RerankerModel, Task, current_call

if TYPE_CHECKING:
    from ..spec import ModelSpec

__all__ = ["BiEncoderReranker", "embedder_spec_for", "load"]


def embedder_spec_for(spec: ModelSpec) -> ModelSpec:
    """The embedder spec a bi-encoder spec scores with (same model, device, dtype, max_length)."""
    options = spec.options_dict
    backend = options.pop("embedder_backend", "sentence-transformers")
    return spec.with_options(backend=backend, options=options)


def _dot(a: Sequence[float], b: Sequence[float]) -> float:
    return float(sum(x * y for x, y in zip(a, b, strict=True)))


class BiEncoderReranker(RerankerModel):
    # Stateless: the embedder it calls goes through the pool, whose scheduler serialises that
    # model's forwards on its device worker; so concurrent calls here are safe.
    thread_safe = True

    def __init__(
        self, provider: ModelProvider, embedder: ModelSpec, device: str, dtype: str
    ) -> None:
        self._provider = provider
        self.embedder = embedder
        self.device = device
        self.dtype = dtype

    def score_pairs(self, pairs: Sequence[tuple[str, str]], batch_size: int) -> list[float]:
        queries, jobs = _jobs(pairs)
        call = current_call()  # the caller's lane and deadline hold through the embedder
        qvecs, dvecs = [
            self._provider.embed(self.embedder, texts, batch_size, **_options(call, is_query))
            for texts, is_query in jobs
        ]
        return _scores(pairs, queries, qvecs, dvecs)

    async def arun(self, task: Task, items: Sequence[Any], batch_size: int) -> list[Any]:
        """Awaits the shared embedder: a cancelled caller (a timeout, a client that hung up on
        the server) withdraws the embedder requests still queued. Run in a thread, such a call
        went on embedding for nobody, outside the server's --max-concurrency."""
        queries, jobs = _jobs(items)
        call = current_call()
        vectors = []
        for texts, is_query in jobs:  # one after the other, as the sync path
            options = _options(call, is_query)
            vectors.append(await self._provider.aembed(self.embedder, texts, batch_size, **options))
        return _scores(items, queries, *vectors)


def _options(call: CallContext, is_query: bool) -> dict[str, Any]:
    """One embedder call's options: unit vectors, the caller's lane and what is left of its
    deadline (read at each call)."""
    return {
        "is_query": is_query,
        "normalize": True,
        "timeout": call.remaining(),
        "priority": call.priority,
    }


def _jobs(pairs: Sequence[tuple[str, str]]) -> tuple[list[str], list[tuple[list[str], bool]]]:
    """The distinct queries, and the two embedder calls: (texts, is_query)."""
    queries = list(dict.fromkeys(q for q, _ in pairs))
    return queries, [(queries, True), ([t for _, t in pairs], False)]


def _scores(
    pairs: Sequence[tuple[str, str]],
    queries: list[str],
    qvecs: Sequence[Sequence[float]],
    dvecs: Sequence[Sequence[float]],
) -> list[float]:
    by_query = dict(zip(queries, qvecs, strict=True))
    return [_dot(by_query[q], d) for (q, _), d in zip(pairs, dvecs, strict=True)]


def load(spec: ModelSpec, provider: ModelProvider) -> BiEncoderReranker:
    embedder = embedder_spec_for(spec)
    device, dtype = provider.model_info(embedder)  # loads (once) or reuses the shared embedder
    return BiEncoderReranker(provider, embedder, device, dtype)
