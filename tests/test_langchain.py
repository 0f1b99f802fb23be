"""LangChain adapters: drop-in behaviour, shared handles, no mutation, async off the loop."""

from __future__ import annotations

import asyncio
import copy
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

pytest.importorskip("langchain_core")

from langchain_core.documents import Document
from pydantic import ValidationError

from rag_rerank_plugins import InvalidInputError, ModelPool
from rag_rerank_plugins.langchain import (
    SharedCrossEncoder,
    SharedEmbeddings,
    SharedRerankCompressor,
)

QUERY = "which organelle produces ATP?"


def _docs(passages: list[str]) -> list[Document]:
    return [
        Document(page_content=p, metadata={"source": f"s{i}", "nested": {"k": i}}, id=f"doc-{i}")
        for i, p in enumerate(passages)
    ]


def test_compressor_orders_by_the_models_scores(
    pool: ModelPool, tiny_ce_path: str, direct_cross_encoder, passages: list[str]
) -> None:
    docs = _docs(passages)
    before = copy.deepcopy(docs)
    comp = SharedRerankCompressor(
        model=tiny_ce_path, device="cpu", dtype="float32", top_n=None, pool=pool
    )
    out = comp.compress_documents(docs, QUERY)

    ref = direct_cross_encoder.predict([(QUERY, p) for p in passages], show_progress_bar=False)
    expected_order = sorted(range(len(passages)), key=lambda i: (-ref[i], i))
    assert [d.id for d in out] == [f"doc-{i}" for i in expected_order]
    for doc in out:
        i = int(doc.id.split("-")[1])
        assert isinstance(doc.metadata["relevance_score"], float)
        assert doc.metadata["relevance_score"] == pytest.approx(float(ref[i]), abs=1e-5)
        assert doc.metadata["source"] == f"s{i}"
        assert doc.page_content == passages[i]
    assert docs == before, "input documents must not be mutated"
    assert all("relevance_score" not in d.metadata for d in docs)
    assert all(o is not d for o in out for d in docs)


def test_top_n_and_threshold(pool: ModelPool, passages: list[str]) -> None:
    docs = _docs(passages)
    comp = SharedRerankCompressor(model="f", backend="fake-reranker", top_n=2, pool=pool)
    out = comp.compress_documents(docs, "energy cell powerhouse")
    assert len(out) == 2
    assert out[0].id == "doc-0"
    keep_all = SharedRerankCompressor(
        model="f", backend="fake-reranker", top_n=None, score_threshold=0.5, pool=pool
    )
    kept = keep_all.compress_documents(docs, "energy cell powerhouse")
    assert [d.id for d in kept] == ["doc-0"]
    assert comp.model_copy(update={"top_n": 100}).compress_documents(docs, "x") != []


def test_empty_and_bad_input(pool: ModelPool) -> None:
    comp = SharedRerankCompressor(model="f", backend="fake-reranker", pool=pool)
    assert comp.compress_documents([], "q") == []
    assert not pool.loaded_specs(), "an empty call must not even load the model"
    with pytest.raises(InvalidInputError, match="query"):
        comp.compress_documents([Document(page_content="x")], None)  # type: ignore[arg-type]
    with pytest.raises(InvalidInputError, match="documents\\[1\\]"):
        comp.compress_documents([Document(page_content="x"), "raw string"], "q")  # type: ignore[list-item]


@pytest.mark.parametrize(
    "kwargs",
    [
        {"top_n": 0},
        {"top_n": -1},
        {"batch_size": 0},
        {"dtype": "int4"},
        {"backend": "sentence-transformers"},  # an embedder cannot rerank
        {"backend": "nope"},
        {"unknown_field": 1},
    ],
)
def test_invalid_configuration_fails_at_construction(kwargs: dict) -> None:
    with pytest.raises((ValidationError, ValueError)):
        SharedRerankCompressor(**kwargs)


def test_construction_never_loads(pool: ModelPool, tiny_ce_path: str) -> None:
    for _ in range(100):
        SharedRerankCompressor(model=tiny_ce_path, pool=pool)
    assert pool.loaded_specs() == []


def test_200_adapters_in_16_threads_share_one_model_per_spec(
    pool: ModelPool,
    tiny_ce_path: str,
    minilm_path: str,
    direct_cross_encoder,
    direct_embedder,
    passages: list[str],
) -> None:
    docs = _docs(passages)

    def request(i: int):
        comp = SharedRerankCompressor(
            model=tiny_ce_path, dtype="float32", top_n=None, batch_size=4, pool=pool
        )
        emb = SharedEmbeddings(model=minilm_path, dtype="float32", pool=pool)
        ranked = comp.compress_documents(docs, f"{QUERY} {i % 3}")
        return i, [(d.id, d.metadata["relevance_score"]) for d in ranked], emb.embed_query(QUERY)

    with ThreadPoolExecutor(16) as ex:
        results = list(ex.map(request, range(200)))

    stats = pool.stats()
    assert len(stats) == 2
    assert all(s["loads"] == 1 for s in stats.values()), stats
    comp_stats = SharedRerankCompressor(model=tiny_ce_path, dtype="float32", pool=pool).stats()
    assert (comp_stats["loads"], comp_stats["calls"]) == (1, 200)
    ref_q = direct_embedder.encode_query([QUERY], show_progress_bar=False)[0]
    for i, ranked, vector in results:
        query = f"{QUERY} {i % 3}"
        ref = direct_cross_encoder.predict([(query, p) for p in passages], show_progress_bar=False)
        order = sorted(range(len(passages)), key=lambda j: (-ref[j], j))
        assert [doc_id for doc_id, _ in ranked] == [f"doc-{j}" for j in order]
        got = dict(ranked)
        np.testing.assert_allclose([got[f"doc-{j}"] for j in range(len(passages))], ref, atol=1e-5)
        np.testing.assert_allclose(vector, ref_q, atol=1e-5)


def test_shared_cross_encoder_in_langchains_own_reranker(
    pool: ModelPool, tiny_ce_path: str, direct_cross_encoder, passages: list[str]
) -> None:
    reranker_mod = pytest.importorskip(
        "langchain_classic.retrievers.document_compressors.cross_encoder_rerank"
    )
    model = SharedCrossEncoder(
        model_name=tiny_ce_path, model_kwargs={"device": "cpu"}, dtype="float32", pool=pool
    )
    assert model.device == "cpu"
    assert model.model_kwargs == {}
    reranker = reranker_mod.CrossEncoderReranker(model=model, top_n=3)
    out = reranker.compress_documents(_docs(passages), QUERY)
    ref = direct_cross_encoder.predict([(QUERY, p) for p in passages], show_progress_bar=False)
    assert [d.page_content for d in out] == [passages[i] for i in np.argsort(-ref)[:3]]
    np.testing.assert_allclose(model.score([(QUERY, p) for p in passages]), ref, atol=1e-5)


def test_contextual_compression_retriever_end_to_end(
    pool: ModelPool, minilm_path: str, passages: list[str]
) -> None:
    retrievers = pytest.importorskip("langchain_classic.retrievers")
    from langchain_core.vectorstores import InMemoryVectorStore

    embeddings = SharedEmbeddings(model=minilm_path, pool=pool)
    store = InMemoryVectorStore.from_documents(_docs(passages), embeddings)
    retriever = retrievers.ContextualCompressionRetriever(
        base_compressor=SharedRerankCompressor(
            model=minilm_path, backend="bi-encoder", top_n=2, pool=pool
        ),
        base_retriever=store.as_retriever(search_kwargs={"k": 5}),
    )
    out = retriever.invoke(QUERY)
    assert len(out) == 2
    assert out[0].id == "doc-0"
    assert out[0].metadata["relevance_score"] >= out[1].metadata["relevance_score"]
    aout = asyncio.run(retriever.ainvoke(QUERY))
    assert [d.id for d in aout] == [d.id for d in out]
    # Embedder and bi-encoder reranker share one loaded MiniLM.
    loads = {s["backend"]: s["loads"] for s in pool.stats().values()}
    assert loads == {"sentence-transformers": 1, "bi-encoder": 1}


def test_embeddings_match_sentence_transformers(
    pool: ModelPool, minilm_path: str, direct_embedder, passages: list[str]
) -> None:
    emb = SharedEmbeddings(model_name=minilm_path, dtype="float32", pool=pool, batch_size=3)
    np.testing.assert_allclose(
        emb.embed_documents(passages),
        direct_embedder.encode_document(passages, show_progress_bar=False),
        atol=1e-5,
    )
    adocs = asyncio.run(emb.aembed_documents(passages))
    np.testing.assert_allclose(adocs, emb.embed_documents(passages), atol=1e-6)
    aq = asyncio.run(emb.aembed_query("q"))
    np.testing.assert_allclose(aq, emb.embed_query("q"), atol=1e-6)
    assert emb.embed_documents([]) == []


async def test_acompress_does_not_block_the_event_loop(pool: ModelPool) -> None:
    comp = SharedRerankCompressor(
        model="slow", backend="fake-reranker", model_kwargs={"delay_ms": 300}, pool=pool
    )
    ticks = 0

    async def ticker() -> None:
        nonlocal ticks
        while True:
            await asyncio.sleep(0.01)
            ticks += 1

    task = asyncio.create_task(ticker())
    start = time.perf_counter()
    out = await comp.acompress_documents([Document(page_content="a b")], "a")
    elapsed = time.perf_counter() - start
    task.cancel()
    assert out[0].metadata["relevance_score"] == 1.0
    assert elapsed >= 0.3
    assert ticks >= 10, "the event loop was blocked during the forward pass"


def test_callbacks_argument_is_accepted(pool: ModelPool) -> None:
    from langchain_core.callbacks import CallbackManager

    comp = SharedRerankCompressor(model="f", backend="fake-reranker", pool=pool)
    out = comp.compress_documents([Document(page_content="a")], "a", callbacks=CallbackManager([]))
    assert len(out) == 1


# -- import guard ------------------------------------------------------------------------------

_BLOCK_LANGCHAIN = """
import importlib.abc, sys

class _NoLangChain(importlib.abc.MetaPathFinder):
    # Behaves as if langchain-core were not installed.
    def find_spec(self, name, path=None, target=None):
        if name == "langchain_core" or name.startswith("langchain_core."):
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
        return None

for name in [m for m in sys.modules if m.split(".")[0] == "langchain_core"]:
    del sys.modules[name]
sys.meta_path.insert(0, _NoLangChain())
"""


@pytest.mark.parametrize(
    "statement",
    [
        "from rag_rerank_plugins.langchain import SharedRerankCompressor",
        "from rag_rerank_plugins.langchain import SharedCrossEncoder",
        "from rag_rerank_plugins.langchain import SharedEmbeddings",
        "import rag_rerank_plugins.langchain as lc; lc.SharedEmbeddings",
        "import rag_rerank_plugins.langchain.compressor",
        "import rag_rerank_plugins.langchain.cross_encoder",
        "import rag_rerank_plugins.langchain.embeddings",
    ],
)
def test_missing_langchain_core_raises_missing_dependency_error(statement: str) -> None:
    import subprocess
    import sys

    probe = (
        f"{_BLOCK_LANGCHAIN}\n"
        "from rag_rerank_plugins import MissingDependencyError\n"
        "import rag_rerank_plugins.langchain  # the package itself imports fine\n"
        "try:\n"
        f"    {statement}\n"
        "except MissingDependencyError as exc:\n"
        "    print('MissingDependencyError:', exc)\n"
    )
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "MissingDependencyError:" in result.stdout
    assert "pip install 'rag-rerank-plugins[langchain]'" in result.stdout


# -- Document subclasses and look-alikes -------------------------------------------------------


class _ScoredDocument(Document):
    """A caller's Document subclass with a field of its own."""

    source_rank: int = 0


def test_document_subclasses_come_back_as_the_callers_type(pool: ModelPool) -> None:
    docs = [
        _ScoredDocument(page_content=text, metadata={"i": i}, id=f"d{i}", source_rank=10 + i)
        for i, text in enumerate(["pear", "red apple", "apple"])
    ]
    before = copy.deepcopy(docs)
    comp = SharedRerankCompressor(model="f", backend="fake-reranker", top_n=None, pool=pool)
    for out in (
        comp.compress_documents(docs, "red apple"),
        asyncio.run(comp.acompress_documents(docs, "red apple")),
    ):
        assert [type(d) for d in out] == [_ScoredDocument] * 3
        assert [(d.id, d.source_rank) for d in out] == [("d1", 11), ("d2", 12), ("d0", 10)]
        assert [d.metadata["i"] for d in out] == [1, 2, 0]
        assert all(isinstance(d.metadata["relevance_score"], float) for d in out)
        assert all(o is not d for o in out for d in docs)
    assert docs == before, "input documents must not be mutated"
    assert all("relevance_score" not in d.metadata for d in docs)


# -- numbers are numbers -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"top_n": True}, r"top_n must be .*int.*got True \(bool\)"),
        ({"top_n": "3"}, r"top_n must be .*int.*got '3' \(str\); pass top_n=3"),
        ({"top_n": 3.0}, r"top_n must be .*int.*got 3.0 \(float\)"),
        ({"score_threshold": "0.5"}, r"score_threshold must be a number.*pass score_threshold=0.5"),
        ({"score_threshold": True}, r"score_threshold must be a number.*\(bool\)"),
        ({"batch_size": "4"}, r"batch_size must be .*int.*pass batch_size=4"),
        ({"batch_size": True}, r"batch_size must be .*int.*\(bool\)"),
        ({"max_length": "128"}, r"max_length must be .*int.*pass max_length=128"),
        ({"window_tokens": "64"}, r"window_tokens must be .*int.*'auto'"),
    ],
)
def test_strings_and_bools_are_not_numbers(kwargs: dict, match: str) -> None:
    with pytest.raises(ValidationError, match=match):
        SharedRerankCompressor(model="f", backend="fake-reranker", **kwargs)


@pytest.mark.parametrize("cls", [SharedCrossEncoder, SharedEmbeddings])
@pytest.mark.parametrize("value", ["4", True, 4.0])
def test_batch_size_must_be_an_int_on_every_langchain_adapter(cls: type, value: object) -> None:
    backend = "fake-embedder" if cls is SharedEmbeddings else "fake-reranker"
    with pytest.raises(ValidationError, match="batch_size must be"):
        cls(model="f", backend=backend, batch_size=value)
    assert cls(model="f", backend=backend, batch_size=4).batch_size == 4


def test_numbers_of_the_right_type_are_kept() -> None:
    comp = SharedRerankCompressor(
        model="f", backend="fake-reranker", top_n=2, score_threshold=1, batch_size=8, max_length=64
    )
    assert (comp.top_n, comp.batch_size, comp.max_length) == (2, 8, 64)
    assert comp.score_threshold == 1.0
    assert isinstance(comp.score_threshold, float)
    assert SharedRerankCompressor(model="f", score_threshold=-0.25).score_threshold == -0.25
    assert SharedRerankCompressor(model="f", top_n=None, window_tokens="auto").top_n is None


# -- HuggingFaceEmbeddings arguments ---------------------------------------------------------------


def _recording_embedder() -> tuple[str, list[tuple[bool, bool]]]:
    """A registered fake embedder recording (is_query, normalize) of every call."""
    import uuid

    from rag_rerank_plugins.backends import register_backend
    from rag_rerank_plugins.testing import FakeEmbedder

    calls: list[tuple[bool, bool]] = []

    class Recording(FakeEmbedder):
        def embed(self, texts, *, batch_size, is_query, normalize=False):  # type: ignore[no-untyped-def]
            calls.append((is_query, normalize))
            return super().embed(texts, batch_size=batch_size, is_query=is_query)

    name = f"rec-{uuid.uuid4().hex[:8]}"
    register_backend(name, lambda spec, pool: Recording(), "embedder")
    return name, calls


def test_hugging_face_embeddings_encode_kwargs_are_mapped() -> None:
    emb = SharedEmbeddings(
        model_name="m",
        encode_kwargs={"normalize_embeddings": True, "batch_size": 8, "show_progress_bar": True},
        cache_folder="/tmp/hf-cache",
        multi_process=False,
        show_progress=True,
    )
    assert (emb.normalize_embeddings, emb.batch_size, emb.show_progress) == (True, 8, True)
    assert emb.model_kwargs == {"cache_folder": "/tmp/hf-cache"}
    assert emb.spec.option("cache_folder") == "/tmp/hf-cache"
    assert emb.query_normalize_embeddings is None
    plain = SharedEmbeddings(model_name="m", encode_kwargs={}, query_encode_kwargs={})
    assert plain.normalize_embeddings is False


def test_query_encode_kwargs_normalisation_is_honoured_for_queries() -> None:
    name, calls = _recording_embedder()
    emb = SharedEmbeddings(
        model="m",
        backend=name,
        encode_kwargs={"normalize_embeddings": False},
        query_encode_kwargs={"normalize_embeddings": True},
        pool=ModelPool(),
    )
    emb.embed_documents(["a document"])
    emb.embed_query("a query")
    asyncio.run(emb.aembed_query("another query"))
    asyncio.run(emb.aembed_documents(["another document"]))
    assert calls == [(False, False), (True, True), (True, True), (False, False)]
    calls.clear()
    same = SharedEmbeddings(model="m", backend=name, normalize_embeddings=True, pool=ModelPool())
    same.embed_documents(["a document"])
    same.embed_query("a query")
    assert calls == [(False, True), (True, True)]


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"multi_process": True}, r"already batches concurrent requests.*rag-rerank serve"),
        # prompt, precision, convert_to_tensor... are honoured now (issue 25, see
        # tests/test_stock_signatures_langchain.py); keys encode has not are still refused.
        ({"encode_kwargs": {"promt": "query: "}}, r"encode_kwargs.*'promt'.*Supported.*prompt"),
        ({"encode_kwargs": {"precision": "int4"}}, r"precision'\]='int4'.*float32, int8"),
        ({"query_encode_kwargs": {"processing_kwargs": {}}}, r"query_encode_kwargs.*'process"),
        (
            {"encode_kwargs": {"normalize_embeddings": True}, "normalize_embeddings": False},
            r"normalize_embeddings=False and encode_kwargs\['normalize_embeddings'\]=True",
        ),
        (
            {"cache_folder": "/a", "model_kwargs": {"cache_folder": "/b"}},
            r"cache_folder='/a' and model_kwargs\['cache_folder'\]='/b'",
        ),
        ({"encode_kwargs": "normalize"}, r"encode_kwargs must be a dict"),
    ],
)
def test_hugging_face_embeddings_arguments_without_a_meaning_here_say_what_to_do(
    kwargs: dict, match: str
) -> None:
    with pytest.raises(ValidationError, match=match):
        SharedEmbeddings(model_name="m", **kwargs)
