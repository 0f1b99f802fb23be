"""LangChain adapters under a migrating, hostile user: side by side with the stock classes.

A user swaps one import (``CrossEncoderReranker`` + ``HuggingFaceCrossEncoder``,
``HuggingFaceEmbeddings``) and keeps the rest of the code: the attributes it reads, the custom
cross-encoders it plugs in, the retrievers it builds. Each test runs the stock class next to ours
where it is installed; nothing is downloaded (tiny models from the conftest fixtures).
"""

from __future__ import annotations

import asyncio
import re
import subprocess
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pytest

pytest.importorskip("langchain_core")

from langchain_core.cross_encoders import BaseCrossEncoder
from langchain_core.documents import Document
from langchain_core.retrievers import BaseRetriever

from rag_rerank_plugins import ConfigurationError, InferenceError, ModelPool
from rag_rerank_plugins.langchain import (
    SharedCrossEncoder,
    SharedEmbeddings,
    SharedRerankCompressor,
)

QUERY = "which organelle produces ATP?"
TEXTS = ["a cat sat", "a dog ran", "a cat sat", "", "paris is in france", "a dog ran"]


@pytest.fixture(scope="module", autouse=True)
def _fp32(float32_policy: None) -> None:
    """Compared with the stock classes: FP32 in the BF16 run too (see conftest)."""


def _docs() -> list[Document]:
    return [
        Document(page_content=t, metadata={"i": i, "nested": {"k": i}}, id=f"d{i}")
        for i, t in enumerate(TEXTS)
    ]


def _stock(name: str) -> Any:
    """A stock LangChain class, or skip when its package is not installed."""
    modules = {
        "CrossEncoderReranker": "langchain_classic.retrievers.document_compressors",
        "ContextualCompressionRetriever": "langchain_classic.retrievers",
        "HuggingFaceCrossEncoder": "langchain_community.cross_encoders",
        "HuggingFaceEmbeddings": "langchain_huggingface",
    }
    module = pytest.importorskip(modules[name])
    return getattr(module, name)


def _quiet(cls: Any, **kwargs: Any) -> Any:
    with warnings.catch_warnings():  # langchain-community's deprecation notices
        warnings.simplefilter("ignore")
        return cls(**kwargs)


class _Scorer(BaseCrossEncoder):
    """A user's own cross-encoder, as LangChain's ``CrossEncoderReranker`` takes it."""

    def __init__(self, answer: Any) -> None:
        self.answer = answer

    def score(self, text_pairs: list[tuple[str, str]]) -> Any:
        return self.answer(text_pairs)


# -- custom cross-encoders: a wrong number of scores is an error, not a silent drop -------------


def _too_few(pairs: list[tuple[str, str]]) -> list[float]:
    return [float(len(p)) for _, p in pairs][:-1]


def _too_many(pairs: list[tuple[str, str]]) -> list[float]:
    return [float(len(p)) for _, p in pairs] + [99.0]


def _two_labels(pairs: list[tuple[str, str]]) -> np.ndarray:
    return np.ones((len(pairs), 2), dtype=np.float32)


def test_stock_reranker_silently_drops_documents_a_short_scorer_misses() -> None:
    """Why the check exists: stock zips scores with documents, so one is lost without a word."""
    stock = _stock("CrossEncoderReranker")(model=_Scorer(_too_few), top_n=10)
    assert len(stock.compress_documents(_docs(), QUERY)) == len(TEXTS) - 1


@pytest.mark.parametrize(
    ("answer", "match"),
    [
        (_too_few, r"returned 5 scores for 6 \(query, passage\) pairs"),
        (_too_many, r"returned 7 scores for 6 \(query, passage\) pairs"),
        (_two_labels, r"scores\[:, 1\]"),
        (lambda pairs: None, r"must return one number per .* it returned NoneType"),
    ],
    ids=["too-few", "too-many", "two-labels", "none"],
)
async def test_custom_cross_encoder_must_return_one_score_per_pair(answer: Any, match: str) -> None:
    compressor = SharedRerankCompressor(model=_Scorer(answer), top_n=None)
    with pytest.raises(InferenceError, match=match):
        compressor.compress_documents(_docs(), QUERY)
    with pytest.raises(InferenceError, match=match):
        await compressor.acompress_documents(_docs(), QUERY)

    # A scorer fault, so on_error="passthrough" degrades to retrieval order, every document kept.
    lenient = SharedRerankCompressor(model=_Scorer(answer), top_n=None, on_error="passthrough")
    out = lenient.compress_documents(_docs(), QUERY)
    assert [d.id for d in out] == [f"d{i}" for i in range(len(TEXTS))]
    assert all(re.search(match, d.metadata["rerank_error"]) for d in out)
    assert all("relevance_score" not in d.metadata for d in out)


def test_custom_cross_encoder_scores_like_the_stock_reranker() -> None:
    """One score per pair (a list, an array, a generator): same order as stock, ties in order."""
    by_length = _Scorer(lambda pairs: np.asarray([len(p) for _, p in pairs], dtype=np.float32))
    lazy = _Scorer(lambda pairs: (len(p) for _, p in pairs))
    want = _stock("CrossEncoderReranker")(model=by_length, top_n=4).compress_documents(
        _docs(), QUERY
    )
    for scorer in (by_length, lazy):
        got = SharedRerankCompressor(model=scorer, top_n=4).compress_documents(_docs(), QUERY)
        assert [d.id for d in got] == [d.id for d in want] == ["d4", "d0", "d1", "d2"]
        assert [d.metadata["relevance_score"] for d in got] == [18.0, 9.0, 9.0, 9.0]
        assert all(type(d.metadata["relevance_score"]) is float for d in got)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"score_mode": "sigmoid"},
        {"max_length": 32},
        {"model_kwargs": {"score_label": 1}},
        {"backend": "cross-encoder"},
    ],
    ids=lambda k: next(iter(k)),
)
def test_custom_cross_encoder_refuses_settings_it_would_ignore(kwargs: dict[str, Any]) -> None:
    """``score_mode="sigmoid"`` on a custom scorer gave raw scores without a word (a threshold
    set for 0..1 then kept or dropped the wrong documents): refused, saying what to do."""
    name = next(iter(kwargs))
    with pytest.raises(ConfigurationError, match=rf"{name} set with model=<a custom.*_Scorer"):
        SharedRerankCompressor(model=_Scorer(_too_few), **kwargs)


def test_custom_cross_encoder_keeps_the_settings_it_uses() -> None:
    scorer = _Scorer(lambda pairs: [float(len(p)) for _, p in pairs])
    compressor = SharedRerankCompressor(
        model=scorer,
        top_n=2,
        score_threshold=5.0,
        device="cpu",
        dtype="float32",
        model_kwargs={},
        score_mode=None,
        max_length=None,
        batch_size=4,
    )
    out = compressor.compress_documents(_docs(), QUERY)
    assert [d.id for d in out] == ["d4", "d0"]


async def test_custom_cross_encoder_runs_off_the_event_loop() -> None:
    def slow(pairs: list[tuple[str, str]]) -> list[float]:
        time.sleep(0.3)
        return [float(len(p)) for _, p in pairs]

    compressor = SharedRerankCompressor(model=_Scorer(slow), top_n=2)
    ticks = 0

    async def ticker() -> None:
        nonlocal ticks
        while True:
            await asyncio.sleep(0.01)
            ticks += 1

    task = asyncio.create_task(ticker())
    out = await compressor.acompress_documents(_docs(), QUERY)
    task.cancel()
    assert [d.id for d in out] == ["d4", "d0"]
    assert ticks >= 10, "the event loop stalled while the custom cross-encoder scored"


# -- the stock classes' attributes, read back after the swap ------------------------------------


def test_embeddings_answer_to_the_stock_attribute_names(minilm_path: str, tmp_path: Path) -> None:
    """``embeddings.model_name`` (logging, ``CacheBackedEmbeddings`` namespaces) and
    ``.cache_folder`` were AttributeErrors after swapping in SharedEmbeddings."""
    stock = _quiet(
        _stock("HuggingFaceEmbeddings"), model_name=minilm_path, model_kwargs={"device": "cpu"}
    )
    ours = SharedEmbeddings(model_name=minilm_path, model_kwargs={"device": "cpu"})
    assert ours.model_name == stock.model_name == minilm_path
    assert ours.cache_folder is stock.cache_folder is None
    folder = str(tmp_path)
    assert SharedEmbeddings(model_name=minilm_path, cache_folder=folder).cache_folder == folder

    ours.model_name = "another/model"  # settable, as on the stock class (a pydantic field there)
    assert ours.model == ours.spec.model == "another/model"


def test_cross_encoder_answers_to_the_stock_attribute_name(tiny_ce_path: str) -> None:
    stock = _quiet(
        _stock("HuggingFaceCrossEncoder"), model_name=tiny_ce_path, model_kwargs={"device": "cpu"}
    )
    ours = SharedCrossEncoder(model_name=tiny_ce_path, model_kwargs={"device": "cpu"})
    assert ours.model_name == stock.model_name == tiny_ce_path
    ours.model_name = "another/reranker"
    assert ours.spec.model == "another/reranker"
    assert SharedRerankCompressor(model=ours).model == "another/reranker"


def test_dir_lists_the_lazy_adapters() -> None:
    """In a fresh interpreter (here they are imported already): ``dir()`` and notebook tab
    completion showed no adapter before its first use."""
    code = "import rag_rerank_plugins.langchain as m; print(' '.join(dir(m)))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    names = set(out.stdout.split())
    assert {"SharedCrossEncoder", "SharedEmbeddings", "SharedRerankCompressor"} <= names


def test_migration_guide_names_the_stock_default_models(repo_root: Path) -> None:
    """Both stock classes load a different model by default than the adapters do: a user who
    relied on the default builds vectors an existing index cannot match, so the guide says so."""
    from langchain_community.cross_encoders.huggingface import DEFAULT_MODEL_NAME

    from rag_rerank_plugins.settings import Settings

    stock_embedder = _stock("HuggingFaceEmbeddings").model_fields["model_name"].default
    ours = {name: Settings.model_fields[name].default for name in Settings.model_fields}
    guide = (repo_root / "docs" / "migration.md").read_text(encoding="utf-8")
    tables = {
        "HuggingFaceCrossEncoder": (DEFAULT_MODEL_NAME, ours["reranker_model"]),
        "HuggingFaceEmbeddings": (stock_embedder, ours["embedder_model"]),
    }
    for stock_name, (stock_default, our_default) in tables.items():
        assert stock_default != our_default
        section = guide.split(f"| `{stock_name}` argument |", 1)[1].split("\n\n", 1)[0]
        row = next(line for line in section.splitlines() if line.startswith("| `model_name`"))
        assert f"`{stock_default}`" in row, (stock_name, row)
        assert f"`{our_default}`" in row, (stock_name, row)


# -- side by side: the swap changes nothing a user relies on -------------------------------------


def test_compressor_side_by_side_with_the_stock_reranker(tiny_ce_path: str) -> None:
    """Order, ties (duplicates keep input order), ids, metadata, empty text and query, empty
    list: the same documents as CrossEncoderReranker(model=HuggingFaceCrossEncoder(...))."""
    encoder = _quiet(
        _stock("HuggingFaceCrossEncoder"), model_name=tiny_ce_path, model_kwargs={"device": "cpu"}
    )
    stock = _stock("CrossEncoderReranker")(model=encoder, top_n=4)
    pool = ModelPool()
    try:
        ours = SharedRerankCompressor(model=encoder, top_n=4, dtype="float32", pool=pool)
        for query in (QUERY, ""):
            docs = _docs()
            want = stock.compress_documents(docs, query)
            got = ours.compress_documents(docs, query)
            assert [d.id for d in got] == [d.id for d in want]
            for d in got:
                i = d.metadata["i"]
                assert d.metadata["nested"] == {"k": i}
                assert d.page_content == TEXTS[i]
                assert type(d.metadata["relevance_score"]) is float
            assert docs == _docs(), "inputs untouched"
        scores = [d.metadata["relevance_score"] for d in got]
        assert scores == sorted(scores, reverse=True)
        assert stock.compress_documents([], QUERY) == ours.compress_documents([], QUERY) == []
    finally:
        pool.clear()


def test_contextual_compression_retriever_side_by_side(tiny_ce_path: str) -> None:
    ccr = _stock("ContextualCompressionRetriever")

    class Fixed(BaseRetriever):
        def _get_relevant_documents(self, query: str, *, run_manager: Any) -> list[Document]:
            return _docs()

    encoder = _quiet(
        _stock("HuggingFaceCrossEncoder"), model_name=tiny_ce_path, model_kwargs={"device": "cpu"}
    )
    pool = ModelPool()
    try:
        stock = ccr(
            base_compressor=_stock("CrossEncoderReranker")(model=encoder, top_n=3),
            base_retriever=Fixed(),
        )
        ours = ccr(
            base_compressor=SharedRerankCompressor(
                model=tiny_ce_path, device="cpu", dtype="float32", top_n=3, pool=pool
            ),
            base_retriever=Fixed(),
        )

        # TEXTS repeats texts (d0/d2, d1/d5): equal texts tie exactly on both sides (ours
        # scores each distinct pair once), so the stable sort keeps the copies in input order
        # and the ids, not only the texts, rank as stock's do.
        def ranked(result: list[list[Document]]) -> list[list[tuple[str | None, str]]]:
            for docs in result:
                for d in docs:
                    assert d.id is not None
                    assert TEXTS[int(d.id[1:])] == d.page_content
            return [[(d.id, d.page_content) for d in docs] for docs in result]

        want = ranked(stock.batch([QUERY, "dogs"]))
        assert ranked(ours.batch([QUERY, "dogs"])) == want
        assert ranked([ours.invoke(QUERY)]) == want[:1]
        assert ranked([asyncio.run(ours.ainvoke("dogs"))]) == want[1:]
    finally:
        pool.clear()


@pytest.mark.parametrize("kind", ["compressor", "embeddings", "cross_encoder"])
def test_adapters_built_with_a_pool_deep_copy_and_pickle(
    kind: str, tiny_ce_path: str, minilm_path: str
) -> None:
    """LangChain deep-copies and pickles components (``copy.deepcopy``, ``model_copy``, a
    multiprocessing or Ray worker). With ``pool=`` all three raised "cannot pickle
    '_thread.lock' object". Now a deep copy shares the pool (one per process), and a pickled
    adapter leaves it behind: unpickled, it serves from the default pool of its process, with
    the same scores; the live adapter keeps its pool (as the LlamaIndex adapters do)."""
    import copy
    import pickle

    from rag_rerank_plugins import get_pool

    pool = ModelPool()
    docs = [Document(page_content=t) for t in ("a cat sat", "paris is in france")]

    def build() -> Any:
        if kind == "compressor":
            return SharedRerankCompressor(model=tiny_ce_path, top_n=2, dtype="float32", pool=pool)
        if kind == "embeddings":
            return SharedEmbeddings(model_name=minilm_path, dtype="float32", pool=pool)
        return SharedCrossEncoder(model_name=tiny_ce_path, dtype="float32", pool=pool)

    def answer(adapter: Any) -> Any:
        if kind == "compressor":
            return [
                (d.page_content, d.metadata["relevance_score"])
                for d in adapter.compress_documents(docs, QUERY)
            ]
        if kind == "embeddings":
            return adapter.embed_documents([d.page_content for d in docs])
        return adapter.score([(QUERY, d.page_content) for d in docs])

    ours = build()
    try:
        want = answer(ours)
        for copied in (copy.deepcopy(ours), ours.model_copy(deep=True)):
            assert copied.pool is pool
            assert answer(copied) == want
        restored = pickle.loads(pickle.dumps(ours))
        assert ours.pool is pool, "pickling left the live adapter's pool alone"
        assert restored.pool is None
        assert restored.spec == ours.spec
        got = answer(restored)
        if kind == "compressor":  # the same documents in the same order, the same scores
            assert [t for t, _ in got] == [t for t, _ in want]
            got, want = [x for _, x in got], [x for _, x in want]
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=1e-6)
        assert pool.spec_stats(ours.spec)["loads"] == 1
        get_pool().release(restored.spec)
    finally:
        pool.clear()


def test_shared_embeddings_read_the_reloaded_models_prompts(
    minilm_path: str, tmp_path: Path
) -> None:
    """The adapter memoised the model's (prompts, default prompt name) per spec: after a new
    version of the model (other prompts) was released and reloaded, it kept sending the old
    default prompt, matching neither stock nor a fresh adapter."""
    import json
    import shutil

    from sentence_transformers import SentenceTransformer

    from rag_rerank_plugins import ModelPool
    from rag_rerank_plugins.langchain import SharedEmbeddings

    model = tmp_path / "emb"
    shutil.copytree(minilm_path, model)
    config = model / "config_sentence_transformers.json"

    def prompts(values: dict[str, str], default: str) -> None:
        config.write_text(json.dumps({"prompts": values, "default_prompt_name": default}))

    prompts({"query": "query: ", "passage": "passage: "}, "query")
    pool = ModelPool()
    embeddings = SharedEmbeddings(model=str(model), device="cpu", dtype="float32", pool=pool)
    try:
        old = embeddings.embed_documents(["hello world"])[0]
        prompts({"query": "search_query: ", "passage": "search_document: "}, "passage")
        pool.release(embeddings.spec)
        after = embeddings.embed_documents(["hello world"])[0]
        stock = SentenceTransformer(str(model), device="cpu").encode(["hello world"])[0]
        assert np.abs(np.array(after) - stock).max() < 1e-5
        assert np.abs(np.array(after) - np.array(old)).max() > 1e-3
    finally:
        pool.clear()
