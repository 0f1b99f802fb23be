"""Long-document windows: planning, aggregation, adapter metadata, and the token-3,000 test."""

from __future__ import annotations

import itertools
import math
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from rag_rerank_plugins import ConfigurationError, ModelPool
from rag_rerank_plugins.windows import (
    Windower,
    WindowSettings,
    aggregate_scores,
    windower_for,
)

pytest.importorskip("sentence_transformers")

FILLER = [
    "The committee met on Tuesday to discuss the annual budget for parks.",
    "Several members asked about the schedule for repainting the benches.",
    "A long discussion followed about parking permits near the library.",
    "The minutes of the previous meeting were approved without changes.",
]
QUERY = "which organelle produces ATP energy in the cell?"
RELEVANT = "The mitochondria is the powerhouse of the cell and produces ATP energy."


def build_keyword_reranker(path: Path, tokenizer_path: str, keywords: list[str]) -> str:
    """A 1-layer BERT cross-encoder whose score rises with the share of ``keywords`` tokens.

    Random tiny models are no relevance signal, so the long-document test uses this hand-built
    one: keyword tokens carry a value in hidden dim 0, attention is uniform (zero Q/K), values and
    pooler are identities, and LayerNorm eps=1 keeps magnitudes; the logit is
    tanh(mean keyword value seen by [CLS]): 0 without keywords, larger the denser they are.
    """
    import torch
    from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification

    tok = AutoTokenizer.from_pretrained(tokenizer_path)
    hidden = 16
    config = BertConfig(
        vocab_size=tok.vocab_size,
        hidden_size=hidden,
        num_hidden_layers=1,
        num_attention_heads=1,
        intermediate_size=hidden,
        num_labels=1,
        layer_norm_eps=1.0,
        max_position_embeddings=512,
    )
    model = BertForSequenceClassification(config)
    ids = {i for word in keywords for i in tok(word, add_special_tokens=False)["input_ids"]}
    with torch.no_grad():
        for param in model.parameters():
            param.zero_()
        for module in model.modules():
            if isinstance(module, torch.nn.LayerNorm):
                module.weight.fill_(1.0)
        for i in ids:
            model.bert.embeddings.word_embeddings.weight[i, 0] = 4.0
        attention = model.bert.encoder.layer[0].attention
        attention.self.value.weight.copy_(torch.eye(hidden))
        attention.output.dense.weight.copy_(torch.eye(hidden))
        model.bert.pooler.dense.weight.copy_(torch.eye(hidden))
        model.classifier.weight[0, 0] = 1.0
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return str(path)


@pytest.fixture(scope="session")
def keyword_ce_path(tmp_path_factory: pytest.TempPathFactory, minilm_path: str) -> str:
    return build_keyword_reranker(
        tmp_path_factory.mktemp("models") / "keyword-ce",
        minilm_path,
        ["mitochondria", "powerhouse"],
    )


@pytest.fixture(scope="module")
def tokenizer(minilm_path: str):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(minilm_path)


def n_tokens(tokenizer, text: str) -> int:
    return len(tokenizer(text, add_special_tokens=False)["input_ids"])


def long_passage(tokenizer, *, insert_at: int | None, total: int) -> tuple[str, int]:
    """Filler text of about ``total`` tokens; RELEVANT starts at token ``insert_at`` (if given).

    Returns the text and the token position where RELEVANT actually starts.
    """
    parts: list[str] = []
    used = 0
    position = -1
    i = 0
    while used < total:
        if insert_at is not None and position < 0 and used >= insert_at:
            position = used
            parts.append(RELEVANT)
            used += n_tokens(tokenizer, RELEVANT)
            continue
        sentence = FILLER[i % len(FILLER)]
        parts.append(sentence)
        used += n_tokens(tokenizer, sentence)
        i += 1
    return " ".join(parts), position


# -- planning ----------------------------------------------------------------------------------


def test_windows_cover_the_passage_with_stride_and_end_at_the_end(tokenizer) -> None:
    text, _ = long_passage(tokenizer, insert_at=None, total=1000)
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    plan = Windower(tokenizer, 128).plan("q", [text], WindowSettings(tokens=50, stride=20))
    windows = plan.windows[0]
    assert plan.window_tokens == 50
    assert plan.stride == 20
    assert windows[0].token_start == 0
    assert windows[-1].token_end == len(ids)
    for a, b in itertools.pairwise(windows):
        assert b.token_start - a.token_start <= 20  # no gap
    for w in windows:
        assert w.token_end - w.token_start == 50
        assert w.text == text[w.char_start : w.char_end]  # exact slices of the passage
        # Re-tokenizing the slice gives (about) the window's tokens.
        assert abs(n_tokens(tokenizer, w.text) - 50) <= 2


def test_auto_size_fills_the_model_input_and_short_passages_stay_whole(tokenizer) -> None:
    query = "what is the budget for parks"
    q_len = n_tokens(tokenizer, query)
    windower = Windower(tokenizer, 256)
    long_text, _ = long_passage(tokenizer, insert_at=None, total=600)
    plan = windower.plan(query, ["a short one", long_text], WindowSettings())
    assert plan.window_tokens == 256 - q_len - 3  # [CLS] q [SEP] p [SEP]
    assert plan.stride == plan.window_tokens // 2
    assert len(plan.windows[0]) == 1
    assert plan.windows[0][0].text == "a short one"
    assert len(plan.windows[1]) > 1
    assert plan.query == query


def test_a_long_query_is_cut_to_its_budget_and_explicit_sizes_are_capped(tokenizer) -> None:
    query = " ".join(["budget"] * 100)
    plan = Windower(tokenizer, 64).plan(
        query, ["x " * 200], WindowSettings(tokens=500, query_tokens=10)
    )
    assert n_tokens(tokenizer, plan.query) == 10
    assert plan.window_tokens == 64 - 10 - 3
    with pytest.raises(ConfigurationError, match="window_query_tokens"):
        Windower(tokenizer, 64).plan(query, ["x"], WindowSettings(query_tokens=61))


def test_plan_does_not_mutate_inputs_and_rejects_non_strings(tokenizer) -> None:
    texts = ["one two three", "four"]
    Windower(tokenizer, 64).plan("q", texts, WindowSettings(tokens=2, stride=1))
    assert texts == ["one two three", "four"]
    with pytest.raises(TypeError, match="text #1"):
        Windower(tokenizer, 64).plan("q", ["ok", 3], WindowSettings())  # type: ignore[list-item]


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"tokens": 0}, "window_tokens"),
        ({"tokens": 10, "stride": 11}, "window_stride"),
        ({"stride": 0}, "window_stride"),
        ({"query_tokens": 0}, "window_query_tokens"),
        ({"aggregate": "median"}, "window_aggregate"),
    ],
)
def test_invalid_settings_are_explicit(kwargs: dict, match: str) -> None:
    with pytest.raises(ConfigurationError, match=match):
        WindowSettings(**kwargs)


def test_aggregation() -> None:
    assert aggregate_scores([0.1, 0.9, 0.5], "max") == (0.9, 1)
    assert aggregate_scores([0.1, 0.9, 0.5], "first") == (0.1, 0)
    mean, best = aggregate_scores([0.1, 0.9, 0.5], "mean")
    assert mean == pytest.approx(0.5)
    assert best == 1  # mean reports its best window
    assert aggregate_scores([0.3, 0.3], "max") == (0.3, 0)  # ties: the earliest window
    assert aggregate_scores([math.nan, 0.2], "max") == (0.2, 1)
    assert math.isnan(aggregate_scores([math.nan], "max")[0])


def test_backends_without_tokenizer_refuse_windows(pool: ModelPool) -> None:
    from rag_rerank_plugins.testing import fake_reranker_spec

    with pytest.raises(ConfigurationError, match="tokenizer"):
        windower_for(pool.get(fake_reranker_spec()).model)


# -- through the adapters, with a real (tiny) cross-encoder ------------------------------------


@pytest.fixture
def compressor_factory(pool: ModelPool, tiny_ce_path: str):
    pytest.importorskip("langchain_core")
    from rag_rerank_plugins.langchain import SharedRerankCompressor

    def make(model: str = tiny_ce_path, **kwargs):
        return SharedRerankCompressor(model=model, device="cpu", pool=pool, top_n=None, **kwargs)

    return make


@pytest.mark.parametrize("backend", ["cross-encoder", "flag-reranker"])
def test_relevant_sentence_at_token_3000_counts_only_with_windows(
    compressor_factory, tokenizer, keyword_ce_path: str, backend: str
) -> None:
    from langchain_core.documents import Document

    if backend == "flag-reranker":
        pytest.importorskip("FlagEmbedding")
    off = compressor_factory(keyword_ce_path, backend=backend, score_mode="raw")
    on = compressor_factory(
        keyword_ce_path, backend=backend, score_mode="raw", window_tokens=48, window_stride=24
    )
    with_it, position = long_passage(tokenizer, insert_at=3000, total=10_000)
    without, _ = long_passage(tokenizer, insert_at=None, total=10_000)
    assert 3000 <= position < 3020
    docs = [Document(page_content=with_it, id="with"), Document(page_content=without, id="no")]

    scores_off = {d.id: d.metadata["relevance_score"] for d in off.compress_documents(docs, QUERY)}
    assert scores_off["with"] == pytest.approx(scores_off["no"], abs=1e-6)  # truncated at 512

    result = on.compress_documents(docs, QUERY)
    scores_on = {d.id: d.metadata["relevance_score"] for d in result}
    assert scores_on["with"] > scores_on["no"] + 0.1
    assert result[0].id == "with"
    window = next(d for d in result if d.id == "with").metadata["rerank_window"]
    assert window["token_start"] <= position < window["token_end"]
    assert window["count"] > 100  # the 10,000-token passage was scored window by window
    assert window["aggregate"] == "max"
    assert window["score"] == scores_on["with"]
    assert RELEVANT[:20] in with_it[window["char_start"] : window["char_end"]]
    assert all("rerank_window" not in d.metadata for d in docs)  # inputs untouched


async def test_async_and_concurrent_windowed_calls_equal_sequential(
    compressor_factory, tokenizer
) -> None:
    from langchain_core.documents import Document

    comp = compressor_factory(window_tokens="auto", window_aggregate="mean")
    text, _ = long_passage(tokenizer, insert_at=700, total=1500)
    docs = [Document(page_content=text), Document(page_content="a short passage")]
    sequential = comp.compress_documents(docs, QUERY)
    assert await comp.acompress_documents(docs, QUERY) == sequential
    barrier = threading.Barrier(8)

    def call(_: int):
        barrier.wait()
        return comp.compress_documents(docs, QUERY)

    with ThreadPoolExecutor(8) as ex:
        assert all(r == sequential for r in ex.map(call, range(8)))
    meta = {d.page_content[:5]: d.metadata["rerank_window"] for d in sequential}
    assert meta["a sho"]["count"] == 1
    assert meta[text[:5]]["count"] > 1


def test_llama_index_reports_the_window_on_a_node_copy(pool: ModelPool, tiny_ce_path: str) -> None:
    pytest.importorskip("llama_index.core")
    from llama_index.core.schema import NodeWithScore, TextNode

    from rag_rerank_plugins.llama_index import SharedRerankPostprocessor

    post = SharedRerankPostprocessor(
        model=tiny_ce_path, device="cpu", pool=pool, window_tokens=32, keep_retrieval_score=True
    )
    nodes = [NodeWithScore(node=TextNode(text=" ".join(FILLER * 5)), score=0.5)]
    out = post.postprocess_nodes(nodes, query_str=QUERY)
    meta = out[0].node.metadata
    assert meta["rerank_window"]["count"] > 1
    assert meta["retrieval_score"] == 0.5
    assert "rerank_window" in out[0].node.excluded_llm_metadata_keys
    assert nodes[0].node.metadata == {}


def test_windows_validated_at_construction(tiny_ce_path: str) -> None:
    pytest.importorskip("langchain_core")
    from pydantic import ValidationError

    from rag_rerank_plugins.langchain import SharedRerankCompressor

    with pytest.raises(ValidationError, match="window_stride"):
        SharedRerankCompressor(model=tiny_ce_path, window_tokens=10, window_stride=20)


def test_a_long_query_does_not_move_the_score_of_a_passage_that_fits_one_window(
    tokenizer,
) -> None:
    query = " ".join(f"word{i}" for i in range(60))
    plan = Windower(tokenizer, 128).plan(
        query, ["a short one", "x " * 300], WindowSettings(query_tokens=16)
    )
    (short,) = [q for q, w in plan.pairs if w == "a short one"]
    assert short == query, "a passage that fits one window is scored with the whole query"
    assert all(q == plan.query != query for q, w in plan.pairs if w != "a short one")


@pytest.mark.parametrize("backend", ["cross-encoder", "flag-reranker"])
def test_with_windows_on_a_short_passage_scores_as_with_windows_off(
    compressor_factory, real_ce_path: str, backend: str
) -> None:
    """docs/flag.md: 'Passages that fit in one window are scored unchanged.' With a query over
    window_query_tokens (64), they were scored with the cut query: 0.6957 where windows off
    (and CrossEncoder.predict) give 0.6857 on the real-encoder model; LLM rerankers moved more."""
    from langchain_core.documents import Document

    if backend == "flag-reranker":
        pytest.importorskip("FlagEmbedding")
    query = " ".join(["which enzymes in the mitochondria turn the energy of food into ATP"] * 8)
    docs = [
        Document(page_content="Mitochondria make ATP.", id="short"),
        Document(page_content="Cells need energy to live. " * 200, id="long"),
    ]
    off = compressor_factory(real_ce_path, backend=backend, dtype="float32")
    on = compressor_factory(real_ce_path, backend=backend, dtype="float32", window_tokens="auto")
    scores_off = {d.id: d.metadata["relevance_score"] for d in off.compress_documents(docs, query)}
    scores_on = {d.id: d.metadata["relevance_score"] for d in on.compress_documents(docs, query)}
    assert scores_on["short"] == pytest.approx(scores_off["short"], abs=1e-6)
