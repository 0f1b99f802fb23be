"""LangChain's own standard test suites (``langchain-tests``) run against our adapters.

These are the checks LangChain asks every integration package to pass, so a user swapping in
``SharedEmbeddings`` / ``SharedRerankCompressor`` / ``SharedCrossEncoder`` gets what LangChain
promises of an ``Embeddings`` or a retriever built from a reranker:

* ``EmbeddingsUnitTests`` and ``EmbeddingsIntegrationTests`` for :class:`SharedEmbeddings`: the
  fake backend for construction (and ``RAG_RERANK_*`` environment defaults), the packaged MiniLM
  for the sync and async embedding calls.
* ``RetrieversIntegrationTests`` for the retriever the README builds: a
  ``ContextualCompressionRetriever`` over an ``InMemoryVectorStore`` (SharedEmbeddings) with our
  compressor, and the same with LangChain's ``CrossEncoderReranker(model=SharedCrossEncoder)``.
  langchain-tests has no suite for document compressors or cross-encoders themselves, so they
  are tested through the retriever they exist for; the number of results is the compressor's
  ``top_n``.

A standard test that cannot apply is marked the way ``langchain-tests`` documents: an override
with ``@pytest.mark.xfail(reason=...)`` (its ``test_no_overrides_DO_NOT_OVERRIDE`` checks that).
Nothing is downloaded: the tiny cross-encoder and MiniLM come from the conftest fixtures.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import pytest

pytest.importorskip("langchain_core")
pytest.importorskip("langchain_tests")
pytest.importorskip("langchain_classic.retrievers")

from langchain_classic.retrievers import ContextualCompressionRetriever
from langchain_classic.retrievers.document_compressors import CrossEncoderReranker
from langchain_core.documents import Document
from langchain_core.documents.compressor import BaseDocumentCompressor
from langchain_core.retrievers import BaseRetriever
from langchain_core.vectorstores import InMemoryVectorStore
from langchain_tests.integration_tests import (
    EmbeddingsIntegrationTests,
    RetrieversIntegrationTests,
)
from langchain_tests.unit_tests import EmbeddingsUnitTests

from rag_rerank_plugins import ModelPool
from rag_rerank_plugins.langchain import (
    SharedCrossEncoder,
    SharedEmbeddings,
    SharedRerankCompressor,
)
from rag_rerank_plugins.settings import get_settings

QUERY = "which organelle produces ATP?"


@pytest.fixture
def fresh_settings() -> Iterator[None]:
    """Settings read from the environment afresh, as in a new process.

    :func:`get_settings` reads ``RAG_RERANK_*`` once per process; the standard
    ``test_init_from_env`` patches the environment and then builds an adapter, which is what a
    process started with those variables does.
    """
    get_settings.cache_clear()
    yield
    get_settings.cache_clear()


class TestSharedEmbeddingsUnit(EmbeddingsUnitTests):
    """Construction only: it never loads a model (the fake backend, for the record)."""

    @pytest.fixture(autouse=True)
    def _fresh(self, fresh_settings: None) -> None:
        pass

    @property
    def embeddings_class(self) -> type[SharedEmbeddings]:
        return SharedEmbeddings

    @property
    def embedding_model_params(self) -> dict[str, Any]:
        return {"model": "fake", "backend": "fake-embedder", "device": "cpu"}

    @property
    def init_from_env_params(
        self,
    ) -> tuple[dict[str, str], dict[str, Any], dict[str, Any]]:
        # Every default the adapter takes from the environment (RAG_RERANK_*).
        return (
            {
                "RAG_RERANK_EMBEDDER_MODEL": "my-embedder",
                "RAG_RERANK_EMBEDDER_BACKEND": "fake-embedder",
                "RAG_RERANK_DEVICE": "cpu",
                "RAG_RERANK_BATCH_SIZE": "7",
            },
            {},
            {"model": "my-embedder", "backend": "fake-embedder", "device": "cpu", "batch_size": 7},
        )


class TestSharedEmbeddingsIntegration(EmbeddingsIntegrationTests):
    """embed_query / embed_documents and their async versions on the packaged MiniLM."""

    @pytest.fixture(autouse=True)
    def _model(self, pool: ModelPool, minilm_path: str) -> None:
        self._params = {"model": minilm_path, "device": "cpu", "pool": pool}

    @property
    def embeddings_class(self) -> type[SharedEmbeddings]:
        return SharedEmbeddings

    @property
    def embedding_model_params(self) -> dict[str, Any]:
        return self._params


class _RerankedRetrieverTests(RetrieversIntegrationTests):
    """``ContextualCompressionRetriever``: 6 of 8 passages by vector search, reranked, top_n kept.

    ``retriever_constructor`` is a factory taking ``top_n`` (the suite only ever calls it with
    keyword arguments); subclasses say which compressor reranks.
    """

    @pytest.fixture(autouse=True)
    def _models(
        self, pool: ModelPool, tiny_ce_path: str, minilm_path: str, passages: list[str]
    ) -> None:
        self._pool, self._ce_path = pool, tiny_ce_path
        embeddings = SharedEmbeddings(model=minilm_path, device="cpu", pool=pool)
        documents = [Document(page_content=p, id=f"doc-{i}") for i, p in enumerate(passages)]
        self._store = InMemoryVectorStore.from_documents(documents, embeddings)

    def compressor(self, top_n: int) -> BaseDocumentCompressor:
        raise NotImplementedError

    @property
    def retriever_constructor(self) -> Callable[..., BaseRetriever]:  # type: ignore[override]
        def build(top_n: int = 3) -> BaseRetriever:
            return ContextualCompressionRetriever(
                base_compressor=self.compressor(top_n),
                base_retriever=self._store.as_retriever(search_kwargs={"k": 6}),
            )

        return build

    @property
    def retriever_query_example(self) -> str:
        return QUERY

    @property
    def num_results_arg_name(self) -> str:
        return "top_n"

    @pytest.mark.xfail(
        reason="ContextualCompressionRetriever passes invoke() keyword arguments to its base "
        "retriever, not to the compressor: the number of results is the compressor's top_n, "
        "set at construction (test_k_constructor_param).",
        strict=True,
    )
    def test_invoke_with_k_kwarg(self, retriever: BaseRetriever) -> None:
        super().test_invoke_with_k_kwarg(retriever)


class TestSharedRerankCompressorRetriever(_RerankedRetrieverTests):
    def compressor(self, top_n: int) -> BaseDocumentCompressor:
        return SharedRerankCompressor(
            model=self._ce_path, backend="cross-encoder", device="cpu", top_n=top_n, pool=self._pool
        )


class TestSharedCrossEncoderRetriever(_RerankedRetrieverTests):
    """LangChain's own ``CrossEncoderReranker`` with the shared cross-encoder as its model."""

    def compressor(self, top_n: int) -> BaseDocumentCompressor:
        model = SharedCrossEncoder(model=self._ce_path, device="cpu", pool=self._pool)
        return CrossEncoderReranker(model=model, top_n=top_n)
