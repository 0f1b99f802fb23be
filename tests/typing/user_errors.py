"""Mistakes a typed user must hear about from ``mypy --strict`` before the code runs, as users of
the stock classes do (``CrossEncoderReranker(topn=3)`` is flagged there). Checked by
tests/test_typing_user_code.py: each line marked ``# E: <code> <text>`` must report that error code
with ``<text>`` in its message, no other line may report anything, and each marked line must
raise at runtime too (the type checker's refusal matches the constructor's).

Before, the constructors that take ``**data`` at runtime (for pydantic and LlamaIndex reasons)
told type checkers that any keyword was fine: a typo or a wrong type was found only when run.
"""

from __future__ import annotations

from rag_rerank_plugins.langchain import (
    SharedCrossEncoder,
    SharedEmbeddings,
    SharedRerankCompressor,
)
from rag_rerank_plugins.llama_index import SharedEmbedding, SharedRerankPostprocessor

# LangChain: a misspelt argument, a wrong type.
SharedRerankCompressor(model="m", backend="fake-reranker", topn=5)  # E: call-arg "topn"
SharedRerankCompressor(model="m", backend="fake-reranker", top_n="five")  # E: arg-type "top_n"
SharedCrossEncoder(model_name="m", backend="fake-reranker", batchsize=8)  # E: call-arg "batchsize"
SharedEmbeddings(
    model_name="m", backend="fake-embedder", multi_process=True
)  # E: arg-type "multi_process"

# LlamaIndex: docs/guides/llama_index.md's topn=5, and the older core class's top_n-first order.
SharedRerankPostprocessor(model="m", backend="fake-reranker", topn=5)  # E: call-arg "topn"
SharedRerankPostprocessor(model="m", backend="fake-reranker", top_n="five")  # E: arg-type "top_n"
SharedRerankPostprocessor(3, backend="fake-reranker")  # E: arg-type "int"
SharedEmbedding(
    model_name="m", backend="fake-embedder", embed_batchsize=8
)  # E: call-arg "embed_batchsize"
SharedEmbedding(
    "m", backend="fake-embedder", parallel_process=True
)  # E: arg-type "parallel_process"
