"""What a typed user writes from the docs, checked with ``mypy --strict`` by
tests/test_typing_user_code.py: every line here must type-check as it runs.

Each block names the doc it follows. A false error here is one every typed user of that doc hits.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from rag_rerank_plugins import ModelPool, ModelSpec
from rag_rerank_plugins.backends.remote import (
    Call,
    CallSettings,
    Protocol,
    UnexpectedResponse,
)

# docs/guides/extending.md: options as a dict (frozen into pairs by ModelSpec).
spec = ModelSpec("fake", backend="fake-reranker", options={"delay_ms": 1})
pairs_spec = ModelSpec("fake", backend="fake-reranker", options=[("delay_ms", 1)])
pool = ModelPool()
scores: list[float] = pool.score_pairs(spec, [("q", "p")])


# docs/guides/extending.md: a worked remote protocol.
class AcmeProtocol(Protocol):
    needs_model_name = True
    info_path = None

    def rerank(self, settings: CallSettings, query: str, texts: Sequence[str]) -> Call:
        n = len(texts)

        def parse(body: Any) -> list[float]:
            found = body.get("scores") if isinstance(body, dict) else None
            if not isinstance(found, list) or len(found) != n:
                raise UnexpectedResponse(f"{{'scores': [{n} numbers]}}")
            return [float(s) for s in found]

        payload = {"model": settings.model_name, "query": query, "passages": list(texts)}
        return Call("/v2/score", payload, parse)

    def embed(
        self, settings: CallSettings, texts: Sequence[str], *, is_query: bool, normalize: bool
    ) -> Call:
        def parse(body: Any) -> list[list[float]]:
            return [[float(x) for x in v] for v in body["embeddings"]]

        return Call("/v2/encode", {"inputs": list(texts)}, parse)
