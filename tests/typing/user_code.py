"""What a typed user writes from the docs, checked with ``mypy --strict`` by
tests/test_typing_user_code.py: every line here must type-check as it runs.

Each block names the doc it follows. A false error here is one every typed user of that doc hits.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

from rag_rerank_plugins import ModelPool, ModelSpec
from rag_rerank_plugins.backends.remote import (
    Call,
    CallSettings,
    Protocol,
    UnexpectedResponse,
)
from rag_rerank_plugins.langchain import (
    SharedCrossEncoder,
    SharedEmbeddings,
    SharedRerankCompressor,
)
from rag_rerank_plugins.llama_index import SharedEmbedding, SharedRerankPostprocessor

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


# docs/migration.md, docs/guides/langchain.md: HuggingFaceCrossEncoder's and HuggingFaceEmbeddings'
# spelling (model_name=, cache_folder=), taken at runtime through validation aliases and
# validators, which type checkers do not read.
cross_encoder = SharedCrossEncoder(model_name="fake", backend="fake-reranker", model_kwargs={})
embeddings = SharedEmbeddings(
    model_name="fake",
    backend="fake-embedder",
    encode_kwargs={"normalize_embeddings": True},
    cache_folder=None,
)
same_embeddings = SharedEmbeddings(model="fake", backend="fake-embedder", pool=pool)
compressor = SharedRerankCompressor(model=cross_encoder, top_n=3)
windowed = SharedRerankCompressor(
    model="fake", backend="fake-reranker", top_n=None, window_tokens="auto", on_error="passthrough"
)


# docs/guides/langchain.md: embed_documents takes a list (or any iterable) of str.
def document_vectors(texts: Iterable[str]) -> list[list[float]]:
    return embeddings.embed_documents(t.strip() for t in texts)


async def adocument_vectors(texts: Iterable[str]) -> list[list[float]]:
    return await embeddings.aembed_documents(t.strip() for t in texts)


# docs/migration.md: SentenceTransformerRerank's and HuggingFaceEmbedding's arguments, positional
# too, and HuggingFaceEmbedding's **model_kwargs by name.
postprocessor = SharedRerankPostprocessor("fake", None, None, 3, backend="fake-reranker")
flag_style = SharedRerankPostprocessor(model="fake", backend="fake-reranker", use_fp16=False)
embed_model = SharedEmbedding("fake", backend="fake-embedder", embed_batch_size=64)
hf_style = SharedEmbedding(
    model_name="fake",
    backend="fake-embedder",
    query_instruction="query: ",
    show_progress_bar=False,
    revision="main",
    truncate_dim=8,
)
