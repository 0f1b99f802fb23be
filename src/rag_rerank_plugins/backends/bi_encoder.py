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

from .base import ModelProvider, RerankerModel, Task, current_call

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
        queries = list(dict.fromkeys(q for q, _ in pairs))
        texts = [t for _, t in pairs]
        embed = self._provider.embed
        call = current_call()  # the caller's lane and deadline hold through the embedder
        qvecs = embed(
            self.embedder,
            queries,
            batch_size,
            is_query=True,
            normalize=True,
            timeout=call.remaining(),
            priority=call.priority,
        )
        dvecs = embed(
            self.embedder,
            texts,
            batch_size,
            is_query=False,
            normalize=True,
            timeout=call.remaining(),
            priority=call.priority,
        )
        return _scores(pairs, queries, qvecs, dvecs)

    async def arun(self, task: Task, items: Sequence[Any], batch_size: int) -> list[Any]:
        """Awaits the shared embedder: a cancelled caller (a timeout, a client that hung up on
        the server) withdraws the embedder requests still queued. Run in a thread, such a call
        went on embedding for nobody, outside the server's --max-concurrency."""
        pairs: Sequence[tuple[str, str]] = items
        queries = list(dict.fromkeys(q for q, _ in pairs))
        call = current_call()
        aembed = self._provider.aembed
        qvecs = await aembed(
            self.embedder,
            queries,
            batch_size,
            is_query=True,
            normalize=True,
            timeout=call.remaining(),
            priority=call.priority,
        )
        dvecs = await aembed(
            self.embedder,
            [t for _, t in pairs],
            batch_size,
            is_query=False,
            normalize=True,
            timeout=call.remaining(),
            priority=call.priority,
        )
        return _scores(pairs, queries, qvecs, dvecs)


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
