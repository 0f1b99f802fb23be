"""Property-based tests (hypothesis) of the ranking contract, through both framework adapters.

For any documents, query, ``top_n`` and ``score_threshold``: the output is a subset of the input
(no invented or repeated documents), ordered by descending score (ties in retrieval order), and
it drops a document only because of ``top_n`` or the threshold; inputs are never mutated; the
same input gives the same output. Uses the fake reranker (its scores are easy to recompute) and
a bounded number of examples so CI stays fast.
"""

from __future__ import annotations

import copy
import math
from typing import Any

import pytest

pytest.importorskip("hypothesis")
pytest.importorskip("langchain_core")
pytest.importorskip("llama_index.core")

from hypothesis import given, settings
from hypothesis import strategies as st
from langchain_core.documents import Document
from llama_index.core.schema import MetadataMode, NodeWithScore, TextNode

from rag_rerank_plugins import ModelPool
from rag_rerank_plugins.langchain import SharedRerankCompressor
from rag_rerank_plugins.llama_index import SharedRerankPostprocessor
from rag_rerank_plugins.testing import FakeReranker

POOL = ModelPool()
VOCAB = ["red", "apple", "pear", "tree", "sky", "苹果", "🍎", "x"]

texts = st.lists(st.sampled_from(VOCAB), max_size=5).map(" ".join)
queries = st.lists(st.sampled_from(VOCAB), min_size=0, max_size=3).map(" ".join)
top_ns = st.one_of(st.none(), st.integers(min_value=1, max_value=12))
thresholds = st.one_of(st.none(), st.floats(min_value=-0.5, max_value=1.5, allow_nan=False))
PROPS = settings(max_examples=50, deadline=None, database=None)


def _expected_scores(query: str, contents: list[str]) -> list[float]:
    return FakeReranker().score_pairs([(query, c) for c in contents], 1)


def _check_contract(
    positions: list[int],
    scores: list[float],
    all_scores: list[float],
    top_n: int | None,
    threshold: float | None,
) -> None:
    # Subset: every output is one input, none twice.
    assert len(set(positions)) == len(positions)
    assert all(0 <= p < len(all_scores) for p in positions)
    # Each output carries its own document's score.
    assert scores == [all_scores[p] for p in positions]
    # Descending score; ties keep retrieval order.
    for (p1, s1), (p2, s2) in zip(
        zip(positions, scores, strict=True),
        zip(positions[1:], scores[1:], strict=True),
        strict=False,
    ):
        assert s1 > s2 or (s1 == s2 and p1 < p2)
    # Nothing lost except by the threshold or top_n.
    passing = [
        i
        for i, s in enumerate(all_scores)
        if threshold is None or (s >= threshold and not math.isnan(s))
    ]
    assert len(positions) == (len(passing) if top_n is None else min(top_n, len(passing)))
    assert set(positions) <= set(passing)
    if positions:  # every dropped passing document scores no higher than the last kept one
        dropped = set(passing) - set(positions)
        assert all(all_scores[d] <= scores[-1] for d in dropped)


@PROPS
@given(
    contents=st.lists(texts, max_size=12),
    query=queries,
    top_n=top_ns,
    threshold=thresholds,
    use_async=st.booleans(),
)
def test_langchain_compressor_ranking_contract(
    contents: list[str], query: str, top_n: int | None, threshold: float | None, use_async: bool
) -> None:
    import asyncio

    docs = [
        Document(page_content=c, metadata={"pos": i, "tags": [i]}, id=f"d{i}")
        for i, c in enumerate(contents)
    ]
    snapshot = copy.deepcopy(docs)
    comp = SharedRerankCompressor(
        model="f", backend="fake-reranker", pool=POOL, top_n=top_n, score_threshold=threshold
    )
    run: Any = (
        (lambda: asyncio.run(comp.acompress_documents(docs, query)))
        if use_async
        else (lambda: comp.compress_documents(docs, query))
    )
    out = run()
    assert docs == snapshot, "inputs must never be mutated"
    positions = [d.metadata["pos"] for d in out]
    assert [d.id for d in out] == [f"d{p}" for p in positions]
    assert [d.page_content for d in out] == [contents[p] for p in positions]
    scores = [d.metadata["relevance_score"] for d in out]
    _check_contract(positions, scores, _expected_scores(query, contents), top_n, threshold)
    again = run()
    assert [(d.id, d.metadata) for d in again] == [(d.id, d.metadata) for d in out]


@PROPS
@given(
    contents=st.lists(texts, max_size=12),
    query=queries,
    top_n=top_ns,
    threshold=thresholds,
    keep=st.booleans(),
)
def test_llama_index_postprocessor_ranking_contract(
    contents: list[str], query: str, top_n: int | None, threshold: float | None, keep: bool
) -> None:
    nodes = [
        NodeWithScore(node=TextNode(text=c, id_=f"n{i}", metadata={"pos": i}), score=i / 7)
        for i, c in enumerate(contents)
    ]
    snapshot = copy.deepcopy(nodes)
    post = SharedRerankPostprocessor(
        model="f",
        backend="fake-reranker",
        pool=POOL,
        top_n=top_n,
        score_threshold=threshold,
        keep_retrieval_score=keep,
    )
    out = post.postprocess_nodes(nodes, query_str=query)
    assert [n.model_dump() for n in nodes] == [n.model_dump() for n in snapshot]
    positions = [int(n.node.node_id[1:]) for n in out]
    scores = [n.score for n in out]
    # The node's text includes embed-mode metadata ("pos: 3"), as LlamaIndex rerankers do.
    embed_texts = [n.node.get_content(metadata_mode=MetadataMode.EMBED) for n in nodes]
    _check_contract(positions, scores, _expected_scores(query, embed_texts), top_n, threshold)
    if keep:
        assert [n.node.metadata["retrieval_score"] for n in out] == [p / 7 for p in positions]
    again = post.postprocess_nodes(nodes, query_str=query)
    assert [(n.node.node_id, n.score) for n in again] == [(n.node.node_id, n.score) for n in out]
