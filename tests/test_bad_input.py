"""The bad-input catalogue (docs/bad-input.md): one test per case, each asserting its documented
outcome through the LangChain and/or LlamaIndex adapters.

Case ids (B01, B02, ...) match the table in docs/bad-input.md. Most cases run on the fake
reranker (the ranking and validation code is the same for every backend); the cases where the
real tokenizer matters (surrogates, emoji/CJK/RTL, a 1 MB document) run on the tiny cross-encoder.
"""

from __future__ import annotations

import asyncio
import math
import threading
import time
import uuid
from collections.abc import Sequence

import pytest

pytest.importorskip("langchain_core")
pytest.importorskip("llama_index.core")

from langchain_core.documents import Document
from llama_index.core.schema import ImageNode, NodeWithScore, TextNode
from pydantic import ValidationError

from rag_rerank_plugins import (
    ConfigurationError,
    InferenceError,
    InvalidInputError,
    ModelPool,
    ModelSpec,
)
from rag_rerank_plugins.backends import RerankerModel, register_backend
from rag_rerank_plugins.handle import clean_text
from rag_rerank_plugins.langchain import SharedRerankCompressor
from rag_rerank_plugins.llama_index import SharedRerankPostprocessor
from rag_rerank_plugins.testing import FakeReranker

QUERY = "red apple"


def _docs(texts: Sequence[str], **metadata: object) -> list[Document]:
    return [
        Document(page_content=t, metadata={"i": i, **metadata}, id=f"d{i}")
        for i, t in enumerate(texts)
    ]


def _nodes(texts: Sequence[str]) -> list[NodeWithScore]:
    return [
        NodeWithScore(node=TextNode(text=t, id_=f"n{i}"), score=0.5) for i, t in enumerate(texts)
    ]


def _lc(pool: ModelPool, **kwargs) -> SharedRerankCompressor:
    kwargs.setdefault("top_n", None)
    return SharedRerankCompressor(model="f", backend="fake-reranker", pool=pool, **kwargs)


def _li(pool: ModelPool, **kwargs) -> SharedRerankPostprocessor:
    kwargs.setdefault("top_n", None)
    return SharedRerankPostprocessor(model="f", backend="fake-reranker", pool=pool, **kwargs)


def _scheduled_fake_backend() -> str:
    class Scheduled(FakeReranker):
        thread_safe = False

    name = f"sched-{uuid.uuid4().hex[:8]}"
    register_backend(name, lambda spec, pool: Scheduled(), "reranker")
    return name


# -- B01-B04: sizes and empty text -------------------------------------------------------------


def test_b01_empty_list_returns_empty_without_loading(pool: ModelPool) -> None:
    assert _lc(pool).compress_documents([], QUERY) == []
    assert asyncio.run(_lc(pool).acompress_documents([], QUERY)) == []
    assert _li(pool).postprocess_nodes([], query_str=QUERY) == []
    assert pool.loaded_specs() == []


def test_b02_one_document_is_scored_and_returned(pool: ModelPool) -> None:
    out = _lc(pool, top_n=3).compress_documents(_docs(["red apple pie"]), QUERY)
    assert [(d.id, d.metadata["relevance_score"]) for d in out] == [("d0", 1.0)]
    nodes = _li(pool, top_n=3).postprocess_nodes(_nodes(["pear"]), query_str=QUERY)
    assert [(n.node.node_id, n.score) for n in nodes] == [("n0", 0.0)]


def test_b03_empty_strings_are_scored_not_dropped(pool: ModelPool) -> None:
    out = _lc(pool).compress_documents(_docs(["", "red", ""]), QUERY)
    assert [d.id for d in out] == ["d1", "d0", "d2"]
    assert [d.metadata["relevance_score"] for d in out] == [0.5, 0.0, 0.0]


def test_b04_whitespace_only_is_scored_not_dropped(pool: ModelPool) -> None:
    out = _li(pool).postprocess_nodes(_nodes([" \n\t ", "apple", "\u3000"]), query_str=QUERY)
    assert [n.node.node_id for n in out] == ["n1", "n0", "n2"]
    assert [n.score for n in out] == [0.5, 0.0, 0.0]


def test_b03_b04_empty_and_whitespace_on_the_real_model(pool: ModelPool, ce_spec) -> None:
    comp = SharedRerankCompressor(model=ce_spec.model, device="cpu", pool=pool, top_n=None)
    out = comp.compress_documents(_docs(["", "   ", "an apple"]), QUERY)
    assert len(out) == 3
    assert all(math.isfinite(d.metadata["relevance_score"]) for d in out)


# -- B05-B06: wrong types -----------------------------------------------------------------------


def test_b05_none_or_non_string_content_is_invalid_input(pool: ModelPool) -> None:
    comp = _lc(pool, on_error="passthrough")  # even passthrough never hides a caller's bug
    bad = Document.model_construct(page_content=None, metadata={}, id="x")
    with pytest.raises(InvalidInputError, match=r"documents\[1\]"):
        comp.compress_documents([Document(page_content="a"), bad], QUERY)
    number = Document.model_construct(page_content=42, metadata={}, id="y")
    with pytest.raises(InvalidInputError, match=r"documents\[0\]"):
        comp.compress_documents([number], QUERY)
    with pytest.raises(InvalidInputError, match="not str"):
        pool.score_pairs(comp.spec, [(QUERY, None)])  # type: ignore[list-item]
    assert comp.stats()["passthrough"] == 0


class _LooksLikeADocument:
    def __init__(self, text: str) -> None:
        self.page_content = text
        self.metadata: dict[str, object] = {}


@pytest.mark.parametrize(
    "item",
    ["raw text", {"page_content": "x", "metadata": {}}, _LooksLikeADocument("x")],
    ids=["str", "dict", "look-alike"],
)
def test_b06_lc_items_that_are_not_documents_fail_before_scoring(
    pool: ModelPool, item: object
) -> None:
    comp = _lc(pool, on_error="passthrough")
    with pytest.raises(InvalidInputError, match=r"documents\[1\] is .*not a langchain_core"):
        comp.compress_documents([Document(page_content="a"), item], QUERY)  # type: ignore[list-item]
    with pytest.raises(InvalidInputError, match=r"documents\[0\]"):
        asyncio.run(comp.acompress_documents([item], QUERY))  # type: ignore[list-item]
    assert pool.loaded_specs() == []


def test_b06_items_that_are_not_documents_or_nodes_are_invalid_input(pool: ModelPool) -> None:
    with pytest.raises(InvalidInputError, match=r"documents\[0\]"):
        _lc(pool).compress_documents(["raw text"], QUERY)  # type: ignore[list-item]
    with pytest.raises(InvalidInputError, match=r"nodes\[1\].*NodeWithScore"):
        _li(pool).postprocess_nodes(
            [*_nodes(["a"]), TextNode(text="b")],  # type: ignore[list-item]
            query_str=QUERY,
        )


# -- B07-B09: duplicates and size ---------------------------------------------------------------


def test_b07_duplicates_are_all_kept_in_retrieval_order(pool: ModelPool) -> None:
    docs = _docs(["red", "apple", "red", "red"])
    out = _lc(pool).compress_documents(docs, QUERY)
    assert [d.id for d in out] == ["d0", "d1", "d2", "d3"]  # equal scores: retrieval order
    assert len({d.metadata["relevance_score"] for d in out}) == 1


def test_b08_ten_thousand_documents(pool: ModelPool) -> None:
    comp = SharedRerankCompressor(
        model="m", backend=_scheduled_fake_backend(), pool=pool, top_n=None, batch_size=64
    )
    texts = [f"doc {i}" + (" red apple" if i % 997 == 0 else "") for i in range(10_000)]
    start = time.perf_counter()
    out = comp.compress_documents(_docs(texts), QUERY)
    elapsed = time.perf_counter() - start
    assert len(out) == 10_000
    assert sorted(d.id for d in out) == sorted(f"d{i}" for i in range(10_000))
    assert [d.id for d in out[:11]] == [f"d{i}" for i in range(0, 10_000, 997)]
    assert elapsed < 30
    top = comp.model_copy(update={"top_n": 3}).compress_documents(_docs(texts), QUERY)
    assert [d.id for d in top] == ["d0", "d997", "d1994"]


def test_b09_one_megabyte_document_is_truncated_by_the_model(pool: ModelPool, ce_spec) -> None:
    comp = SharedRerankCompressor(model=ce_spec.model, device="cpu", pool=pool, top_n=None)
    big = "apple " * (1024 * 1024 // 6)
    out = comp.compress_documents(_docs([big, "short"]), QUERY)
    assert {d.id for d in out} == {"d0", "d1"}
    assert out[[d.id for d in out].index("d0")].page_content is big  # returned as given
    assert all(math.isfinite(d.metadata["relevance_score"]) for d in out)


# -- B10-B11: unicode ---------------------------------------------------------------------------


def test_b10_lone_surrogates_are_replaced_before_the_tokenizer(pool: ModelPool, ce_spec) -> None:
    """Fast tokenizers raise on lone surrogates; they become U+FFFD, in one place (handle.py)."""
    assert clean_text("a\ud800b\udfff") == "a\ufffdb\ufffd"
    assert clean_text("plain") == "plain"
    comp = SharedRerankCompressor(
        model=ce_spec.model, device="cpu", dtype="float32", pool=pool, top_n=None
    )
    docs = _docs(["bad \ud800 text", "good text", "x\udc00"])
    out = comp.compress_documents(docs, "query \udfff")
    assert {d.id for d in out} == {"d0", "d1", "d2"}
    by_id = {d.id: d for d in out}
    assert by_id["d0"].page_content == "bad \ud800 text"  # the caller's text is untouched
    cleaned = pool.score_pairs(ce_spec, [("query \ufffd", "bad \ufffd text")])[0]
    assert by_id["d0"].metadata["relevance_score"] == pytest.approx(cleaned, abs=1e-6)
    # Merged with other callers' items in one forward pass, it no longer fails them.
    nodes = asyncio.run(
        SharedRerankPostprocessor(
            model=ce_spec.model, device="cpu", dtype="float32", pool=pool, top_n=None
        ).apostprocess_nodes(_nodes(["\ud83d alone", "fine"]), query_str=QUERY)
    )
    assert len(nodes) == 2
    assert pool.spec_stats(ce_spec)["errors"] == 0


def test_b10_lone_surrogates_with_windows_and_in_an_embedding_prompt(
    pool: ModelPool, ce_spec, emb_spec
) -> None:
    """The window planner tokenized the texts before the handle cleaned them: with
    ``window_tokens`` on, one surrogate (document or query) failed the whole call with the
    tokenizer's TypeError, or under passthrough returned every document unscored. An embedding
    ``prompt`` was never cleaned: InferenceError on local backends, counted as a model error."""
    docs = _docs(["bad \ud800 text " * 20, "good text"])
    for window_tokens in ("auto", 16):
        comp = SharedRerankCompressor(
            model=ce_spec.model,
            device="cpu",
            dtype="float32",
            pool=pool,
            top_n=None,
            window_tokens=window_tokens,
            on_error="passthrough",
        )
        out = comp.compress_documents(docs, "query \udfff")
        assert all("rerank_error" not in d.metadata for d in out)
        assert {d.page_content for d in out} == {d.page_content for d in docs}  # untouched
        clean = comp.compress_documents(
            _docs(["bad \ufffd text " * 20, "good text"]), "query \ufffd"
        )
        assert [d.metadata["relevance_score"] for d in out] == pytest.approx(
            [d.metadata["relevance_score"] for d in clean], abs=1e-6
        )
        nodes = asyncio.run(
            SharedRerankPostprocessor(
                model=ce_spec.model, device="cpu", pool=pool, window_tokens=window_tokens
            ).apostprocess_nodes(_nodes(["\ud83d alone " * 30, "fine"]), query_str=QUERY)
        )
        assert len(nodes) == 2
    vector = pool.embed(emb_spec, ["hello"], prompt="query: \ud800 ")[0]
    assert vector == pytest.approx(pool.embed(emb_spec, ["hello"], prompt="query: \ufffd ")[0])
    assert pool.spec_stats(ce_spec)["errors"] == pool.spec_stats(emb_spec)["errors"] == 0


def test_b11_emoji_cjk_rtl_text(pool: ModelPool, ce_spec) -> None:
    texts = ["🍎 red apple 🍏", "红苹果很好吃", "تفاحة حمراء", "תפוח אדום", "\u202eelppa\u202c"]
    comp = SharedRerankCompressor(model=ce_spec.model, device="cpu", pool=pool, top_n=None)
    out = comp.compress_documents(_docs(texts), "红苹果 red apple")
    assert sorted(d.page_content for d in out) == sorted(texts)
    assert all(math.isfinite(d.metadata["relevance_score"]) for d in out)
    fake = _lc(pool).compress_documents(_docs(texts), "红苹果很好吃")
    assert fake[0].id == "d1"  # CJK words are words to the fake, too


# -- B12-B14: top_n -------------------------------------------------------------------------------


@pytest.mark.parametrize("top_n", [0, -1, -100])
def test_b12_top_n_zero_or_negative_fails_at_construction(pool: ModelPool, top_n: int) -> None:
    with pytest.raises((ValidationError, ConfigurationError), match="top_n must be >= 1"):
        _lc(pool, top_n=top_n)
    with pytest.raises((ValidationError, ConfigurationError), match="top_n must be >= 1"):
        _li(pool, top_n=top_n)


def test_b13_top_n_larger_than_the_input_returns_everything(pool: ModelPool) -> None:
    out = _lc(pool, top_n=50).compress_documents(_docs(["a", "apple", "red apple"]), QUERY)
    assert [d.id for d in out] == ["d2", "d1", "d0"]


def test_b14_top_n_none_keeps_every_document(pool: ModelPool) -> None:
    nodes = _li(pool, top_n=None).postprocess_nodes(_nodes(["x"] * 7), query_str=QUERY)
    assert len(nodes) == 7


# -- B15-B16: scores ----------------------------------------------------------------------------


class _Weird(RerankerModel):
    thread_safe = True

    def score_pairs(self, pairs: Sequence[tuple[str, str]], batch_size: int) -> list[float]:
        table = {"nan": math.nan, "inf": math.inf, "-inf": -math.inf}
        return [table.get(p, 0.5) for _, p in pairs]


def test_b15_nan_and_inf_scores_from_a_backend_fail_the_request(pool: ModelPool) -> None:
    """A non-finite score has no rank (``+inf`` would come first, NaN anywhere) and no JSON
    form: the engine's checked seam fails the request, naming the backend, on every path."""
    name = f"weird-{uuid.uuid4().hex[:8]}"
    register_backend(name, lambda spec, p: _Weird(), "reranker")
    for bad in ("nan", "inf", "-inf"):
        comp = SharedRerankCompressor(model="w", backend=name, pool=pool, top_n=1)
        with pytest.raises(InferenceError, match=f"{name}.*non-finite score"):
            comp.compress_documents(_docs(["ok", bad]), QUERY)
        post = SharedRerankPostprocessor(model="w", backend=name, pool=pool, top_n=1)
        with pytest.raises(InferenceError, match="non-finite"):
            post.postprocess_nodes(_nodes([bad, "ok"]), None, QUERY)
    # With on_error="passthrough" the adapter answers in retrieval order instead.
    comp = SharedRerankCompressor(
        model="w", backend=name, pool=pool, top_n=None, on_error="passthrough"
    )
    out = comp.compress_documents(_docs(["ok", "inf"]), QUERY)
    assert [d.id for d in out] == ["d0", "d1"]


def test_b16_threshold_filtering_everything_returns_empty(pool: ModelPool) -> None:
    docs = _docs(["pear", "red apple"])
    assert _lc(pool, score_threshold=1.5).compress_documents(docs, QUERY) == []
    assert _li(pool, score_threshold=1.5).postprocess_nodes(_nodes(["x"]), query_str=QUERY) == []
    with pytest.raises((ValidationError, ConfigurationError), match="NaN"):
        _lc(pool, score_threshold=math.nan)


# -- B17-B18: the query -------------------------------------------------------------------------


def test_b17_missing_query_is_invalid_input(pool: ModelPool) -> None:
    comp = _lc(pool, on_error="passthrough")
    with pytest.raises(InvalidInputError, match="query"):
        comp.compress_documents(_docs(["a"]), None)  # type: ignore[arg-type]
    with pytest.raises(InvalidInputError, match="query"):
        asyncio.run(comp.acompress_documents(_docs(["a"]), 3))  # type: ignore[arg-type]
    with pytest.raises(InvalidInputError, match="query_str"):
        _li(pool).postprocess_nodes(_nodes(["a"]))
    with pytest.raises(InvalidInputError, match="query_str"):
        asyncio.run(_li(pool).apostprocess_nodes(_nodes(["a"])))


def test_b18_empty_query_is_scored(pool: ModelPool) -> None:
    out = _lc(pool).compress_documents(_docs(["b", "a"]), "")
    assert [(d.id, d.metadata["relevance_score"]) for d in out] == [("d0", 0.0), ("d1", 0.0)]


# -- B19: metadata -------------------------------------------------------------------------------


def test_b19_unpicklable_metadata_is_neither_copied_nor_pickled(pool: ModelPool) -> None:
    lock = threading.Lock()
    docs = _docs(["red apple", "pear"], lock=lock, gen=(i for i in range(3)))
    out = _lc(pool).compress_documents(docs, QUERY)
    assert out[0].metadata["lock"] is lock  # the same object, shallow copy of the dict only
    assert asyncio.run(_lc(pool).acompress_documents(docs, QUERY))[1].metadata["lock"] is lock
    nodes = [
        NodeWithScore(node=TextNode(text="red apple", id_="n0", metadata={"lock": lock}), score=1)
    ]
    kept = _li(pool, keep_retrieval_score=True).postprocess_nodes(nodes, query_str=QUERY)
    assert kept[0].node.metadata["lock"] is lock
    assert "lock" in nodes[0].node.metadata
    assert "retrieval_score" not in nodes[0].node.metadata


# -- B20: LlamaIndex non-text nodes ---------------------------------------------------------------


def test_b20_non_text_nodes_are_scored_as_their_text_content(pool: ModelPool) -> None:
    image = NodeWithScore(node=ImageNode(image="aGVsbG8=", id_="img"), score=0.9)
    empty = NodeWithScore(node=TextNode(text="", id_="empty"), score=0.8)
    out = _li(pool).postprocess_nodes([image, empty, *_nodes(["red apple"])], query_str=QUERY)
    assert [n.node.node_id for n in out] == ["n0", "img", "empty"]
    assert out[0].score == 1.0
    assert out[1].node is image.node  # returned, not dropped, never converted
    assert out[1].score == 0.0


# -- B21: release during calls ------------------------------------------------------------------


def test_b21_concurrent_release_during_adapter_calls(pool: ModelPool) -> None:
    comp = SharedRerankCompressor(
        model="m", backend=_scheduled_fake_backend(), pool=pool, top_n=None
    )
    post = SharedRerankPostprocessor(model="m", backend=comp.backend, pool=pool, top_n=None)
    texts = ["pear", "red apple", "apple"]
    docs = _docs(texts)
    expected = [d.id for d in comp.compress_documents(docs, QUERY)]
    stop = threading.Event()
    errors: list[BaseException] = []
    bad: list[list[str]] = []

    def caller(t: int) -> None:
        while not stop.is_set():
            try:
                if t % 2:
                    got = [d.id for d in comp.compress_documents(docs, QUERY)]
                else:
                    nodes = asyncio.run(post.apostprocess_nodes(_nodes(texts), query_str=QUERY))
                    got = [n.node.node_id.replace("n", "d") for n in nodes]
                if got != expected:
                    bad.append(got)
            except BaseException as exc:
                errors.append(exc)

    threads = [threading.Thread(target=caller, args=(t,)) for t in range(4)]
    for thread in threads:
        thread.start()
    for _ in range(6):
        time.sleep(0.01)
        comp.release()
    stop.set()
    for thread in threads:
        thread.join(30)
    assert errors == []
    assert bad == []
    assert comp.stats()["loads"] > 1
    assert comp.stats()["releases"] >= 1


# -- B22: batch_size ------------------------------------------------------------------------------


def test_b22_batch_size_zero_fails_at_construction_and_in_the_pool(pool: ModelPool) -> None:
    with pytest.raises((ValidationError, ConfigurationError)):
        _lc(pool, batch_size=0)
    with pytest.raises(InvalidInputError, match="batch_size"):
        pool.score_pairs(ModelSpec("f", backend="fake-reranker"), [("q", "p")], batch_size=0)


# -- B23: documents as a generator ----------------------------------------------------------------


def test_b23_documents_from_a_generator_are_read_once(pool: ModelPool) -> None:
    comp = _lc(pool)
    texts = ["pear", "red apple", "apple"]
    expected = comp.compress_documents(_docs(texts), QUERY)
    calls = comp.stats()["calls"]
    assert comp.compress_documents((d for d in _docs(texts)), QUERY) == expected
    assert comp.stats()["calls"] == calls + 1, "scored exactly once"
    assert asyncio.run(comp.acompress_documents(iter(_docs(texts)), QUERY)) == expected
    assert comp.stats()["calls"] == calls + 2
    assert comp.compress_documents(iter(()), QUERY) == []


def test_b23_a_bad_item_in_a_generator_fails_before_scoring(pool: ModelPool) -> None:
    items = (d for d in [Document(page_content="a"), "raw string"])
    with pytest.raises(InvalidInputError, match=r"documents\[1\]"):
        _lc(pool).compress_documents(items, QUERY)  # type: ignore[arg-type]
    assert pool.loaded_specs() == []


# -- B24: a bare str where a list is expected -----------------------------------------------------


def test_b24_embed_documents_of_a_bare_string_is_invalid_input(pool: ModelPool) -> None:
    from rag_rerank_plugins.langchain import SharedEmbeddings

    emb = SharedEmbeddings(model="e", backend="fake-embedder", pool=pool)
    with pytest.raises(InvalidInputError, match=r"list of str.*\['hello'\]"):
        emb.embed_documents("hello")  # type: ignore[arg-type]
    with pytest.raises(InvalidInputError, match=r"list of str"):
        asyncio.run(emb.aembed_documents("hello"))  # type: ignore[arg-type]
    with pytest.raises(InvalidInputError, match=r"texts\[1\]"):
        emb.embed_documents(["a", 3])  # type: ignore[list-item]
    with pytest.raises(InvalidInputError, match="str"):
        emb.embed_query(["hello"])  # type: ignore[arg-type]
    with pytest.raises(InvalidInputError, match="str"):
        asyncio.run(emb.aembed_query(None))  # type: ignore[arg-type]
    assert pool.loaded_specs() == [], "rejected before the model loads"
    shown = emb.model_copy(update={"show_progress": True})
    with pytest.raises(InvalidInputError, match=r"list of str"):
        shown.embed_documents("hello")  # type: ignore[arg-type]
    assert len(emb.embed_documents(t for t in ["a", "b"])) == 2  # any iterable of str is fine


@pytest.mark.parametrize(
    "documents", ["red apple", Document(page_content="red apple"), None], ids=["str", "doc", "none"]
)
def test_b24_compressing_a_single_document_or_str_is_invalid_input(
    pool: ModelPool, documents: object
) -> None:
    with pytest.raises(
        InvalidInputError, match=r"list .* of langchain_core Documents.*\[document\]"
    ):
        _lc(pool).compress_documents(documents, QUERY)  # type: ignore[arg-type]
    with pytest.raises(InvalidInputError, match=r"list .* of langchain_core Documents"):
        asyncio.run(_lc(pool).acompress_documents(documents, QUERY))  # type: ignore[arg-type]
    assert pool.loaded_specs() == []


def test_b24_the_handle_rejects_a_bare_string_too(pool: ModelPool) -> None:
    spec = ModelSpec("e", backend="fake-embedder")
    with pytest.raises(InvalidInputError, match="list of str"):
        pool.embed(spec, "hello")  # type: ignore[arg-type]
    with pytest.raises(InvalidInputError, match="list of str"):
        asyncio.run(pool.aembed(spec, "hello"))  # type: ignore[arg-type]
    assert len(pool.embed(spec, ["hello"])) == 1


@pytest.mark.parametrize(
    ("pairs", "match"),
    [
        ("qp", r"pairs must be a list of \(query, text\) pairs, got a str"),
        ({"q": "p"}, r"got a dict"),
        (["qp"], r"pair #0 is a str, not a \(query, text\) pair"),  # not ("q", "p")
        ([("q", "p"), b"qp"], r"pair #1 is a bytes"),
        ([{"q": 1, "p": 2}], r"pair #0 is a dict"),  # not its keys
        ([42], r"pair #0 is int"),
        ([("q",)], r"pair #0 has 1 items"),
    ],
)
def test_b24_the_pool_rejects_what_is_not_a_list_of_pairs(
    pool: ModelPool, pairs: object, match: str
) -> None:
    spec = ModelSpec("r", backend="fake-reranker")
    with pytest.raises(InvalidInputError, match=match):
        pool.score_pairs(spec, pairs)  # type: ignore[arg-type]
    with pytest.raises(InvalidInputError, match=match):
        asyncio.run(pool.ascore_pairs(spec, pairs))  # type: ignore[arg-type]
    assert pool.score_pairs(spec, [("red apple", "apple"), ["red", "pear"]]) == [0.5, 0.0]


@pytest.mark.parametrize(
    ("pairs", "match"),
    [
        ("query", r"list of \(query, passage\) pairs, got str"),
        (("query", "passage"), r"text_pairs\[0\] is a str.*\[\(query, passage\)\]"),
        ([("q",)], r"text_pairs\[0\] has 1 item"),
        ([("q", "p"), ("q", "p", "x")], r"text_pairs\[1\] has 3 items"),
        ([("q", "p"), "qp"], r"text_pairs\[1\] is a str"),
        ([("q", None)], r"text_pairs\[0\]\[1\] is NoneType"),
        (42, r"list of \(query, passage\) pairs, got int"),
    ],
)
def test_b24_cross_encoder_score_rejects_wrong_shapes(
    pool: ModelPool, pairs: object, match: str
) -> None:
    from rag_rerank_plugins.langchain import SharedCrossEncoder

    model = SharedCrossEncoder(model_name="f", backend="fake-reranker", pool=pool)
    with pytest.raises(InvalidInputError, match=match):
        model.score(pairs)  # type: ignore[arg-type]
    assert pool.loaded_specs() == []
    assert model.score([]) == []
    assert pool.loaded_specs() == [], "no pairs: nothing to load"
    assert model.score([("red apple", "apple"), ["red", "pear"]]) == [0.5, 0.0]


# -- B25: numbers given as str or bool ---------------------------------------------------------


@pytest.mark.parametrize("adapter", ["lc", "li"])
@pytest.mark.parametrize(
    "kwargs",
    [{"top_n": True}, {"top_n": "3"}, {"score_threshold": "0.5"}, {"batch_size": "4"}],
    ids=["top_n-bool", "top_n-str", "threshold-str", "batch_size-str"],
)
def test_b25_numbers_given_as_str_or_bool_fail_at_construction(
    pool: ModelPool, adapter: str, kwargs: dict
) -> None:
    name = next(iter(kwargs))
    with pytest.raises(ValidationError, match=f"{name} must be"):
        (_lc if adapter == "lc" else _li)(pool, **kwargs)
    assert (_lc if adapter == "lc" else _li)(pool, score_threshold=1).score_threshold == 1.0


def test_embed_documents_refuses_a_mapping_instead_of_embedding_its_keys() -> None:
    """A dict iterates as its keys: embed_documents({"a": 1}) embedded "a" silently."""
    pytest.importorskip("langchain_core")
    from rag_rerank_plugins.langchain import SharedEmbeddings

    emb = SharedEmbeddings(model_name="never-loaded", pool=ModelPool())
    for texts in ({"a": 1}, b"ab", bytearray(b"ab")):
        with pytest.raises(InvalidInputError, match="embed_documents takes a list of str"):
            emb.embed_documents(texts)  # type: ignore[arg-type]
    with pytest.raises(InvalidInputError, match=r"texts\[1\] is int"):
        emb.embed_documents(["ok", 3])  # type: ignore[list-item]
