"""The torch backends and long-document windows under hostile input, side by side with the
reference libraries (sentence-transformers ``CrossEncoder.predict`` / ``SentenceTransformer.encode``
and the Qwen3-Reranker model card's recipe), FP32, same inputs.

Edge inputs (empty, whitespace-only, emoji/CJK/RTL, NUL, far past the token limit, one pair,
duplicates), the loader options a migrating user hands through (``activation_fn``, label
counts, ``processor_kwargs``, ``model_kwargs``, ``truncate_dim``, prompts), token limits the
model's position table cannot hold, LLM rerankers' padding and yes/no tokens, and window
planning (sizes, strides, coverage, every window fitting the model).
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from rag_rerank_plugins import ConfigurationError, ModelLoadError, ModelPool, ModelSpec
from rag_rerank_plugins.windows import Windower, WindowSettings, windower_for

pytest.importorskip("sentence_transformers")

from sentence_transformers import CrossEncoder, SentenceTransformer

QUERY = "how do plants make energy?"
EDGE_TEXTS = [
    "",
    " ",
    "\t\n \u3000",
    "😀🎉" * 30,
    "東京は日本の首都です。",
    "مرحبا بالعالم",
    "\u05e9\u05dc\u05d5\u05dd \u202e\u05e2\u05d5\u05dc\u05dd\u202c",  # Hebrew, RTL override
    "a\x00b",
    "\x00",
    "word " * 3000,  # far past 512 tokens
    "x" * 5000,  # one 5000-character word
    "\ufffd replaced",
    "The mitochondria is the powerhouse of the cell.",
]
ODD_WORDS = [
    "antidisestablishmentarianism",
    "pneumonoultramicroscopic",
    "東京都",
    "😀🎉",
    "naïve",
    "résumé",
    "x" * 30,
    "hello",
    "مرحبا",
    "a\x00b",
    "ﬁ",
    "Ⅻ",
    "\u0301e",
    "İstanbul",
]


@pytest.fixture(scope="module", autouse=True)
def _fp32(float32_policy: None) -> None:
    """Stock classes compute in FP32; so must we, to compare to 1e-5."""


def spec(path: str, backend: str = "cross-encoder", **fields: Any) -> ModelSpec:
    return ModelSpec(path, backend=backend, device="cpu", dtype="float32", **fields)


def odd_text(rng: random.Random, words: int, glue: bool = False) -> str:
    """Text whose token windows start inside words and multi-byte characters."""
    text = " ".join(rng.choice(ODD_WORDS) for _ in range(words))
    return text.replace(" ", "") if glue else text


# -- cross-encoder: edge inputs equal CrossEncoder.predict ---------------------------------------


@pytest.fixture(scope="module")
def stock_real_ce(real_ce_path: str) -> CrossEncoder:
    return CrossEncoder(real_ce_path, device="cpu")


@pytest.mark.parametrize("batch_size", [1, 7, 64])
def test_cross_encoder_edge_inputs_equal_predict(
    pool: ModelPool, real_ce_path: str, stock_real_ce: CrossEncoder, batch_size: int
) -> None:
    pairs = [(q, p) for q in ["", QUERY, "😀 東京"] for p in EDGE_TEXTS]
    ours = pool.score_pairs(spec(real_ce_path), pairs, batch_size=batch_size)
    ref = stock_real_ce.predict(pairs, batch_size=32, show_progress_bar=False)
    np.testing.assert_allclose(ours, ref, atol=1e-5, rtol=0)
    assert all(np.isfinite(ours))


def test_lone_surrogates_score_as_the_replacement_character(
    pool: ModelPool, real_ce_path: str, stock_real_ce: CrossEncoder
) -> None:
    """docs/bad-input.md B10: the stock tokenizer raises TypeError; we read U+FFFD."""
    ours = pool.score_pairs(spec(real_ce_path), [("\ud83d q", "lone \ud800 surrogate")])
    ref = stock_real_ce.predict([("\ufffd q", "lone \ufffd surrogate")], show_progress_bar=False)
    np.testing.assert_allclose(ours, ref, atol=1e-5, rtol=0)


def test_one_pair_a_thousand_pairs_and_duplicates_equal_predict(
    pool: ModelPool, tiny_ce_path: str, direct_cross_encoder: CrossEncoder
) -> None:
    one = [("q", "a passage")]
    np.testing.assert_allclose(
        pool.score_pairs(spec(tiny_ce_path), one),
        direct_cross_encoder.predict(one, show_progress_bar=False),
        atol=1e-5,
        rtol=0,
    )
    many = [(f"query {i % 7}", f"passage {i} " + "word " * (i % 40)) for i in range(1000)]
    many += [("q", "same passage")] * 20
    ours = pool.score_pairs(spec(tiny_ce_path), many, batch_size=32)
    ref = direct_cross_encoder.predict(many, batch_size=32, show_progress_bar=False)
    assert len(ours) == len(many)
    np.testing.assert_allclose(ours, ref, atol=1e-5, rtol=0)
    assert len(set(ours[-20:])) == 1  # duplicates score the same


# -- cross-encoder: the options a user hands to CrossEncoder(...) ---------------------------------


@pytest.mark.parametrize(
    ("options", "stock_kwargs"),
    [
        ({"activation_fn": "tanh"}, {"activation_fn": "tanh"}),
        ({"score_mode": "raw"}, {"activation_fn": "identity"}),
        ({"score_mode": "sigmoid"}, {"activation_fn": "sigmoid"}),
        ({"processor_kwargs": {"model_max_length": 8}}, {"max_length": 8}),
        ({"model_kwargs": {"attn_implementation": "eager"}}, {}),
        ({"config_kwargs": {"num_labels": 1}}, {}),
        ({"trust_remote_code": True}, {}),
    ],
)
def test_cross_encoder_loader_options_equal_stock(
    pool: ModelPool, real_ce_path: str, options: dict[str, Any], stock_kwargs: dict[str, Any]
) -> None:
    import torch

    activations = {"tanh": torch.nn.Tanh(), "identity": torch.nn.Identity()}
    activations["sigmoid"] = torch.nn.Sigmoid()
    options = {k: activations[v] if k == "activation_fn" else v for k, v in options.items()}
    stock_kwargs = {
        k: activations[v] if k == "activation_fn" else v for k, v in stock_kwargs.items()
    }
    pairs = [(QUERY, p) for p in EDGE_TEXTS]
    ours = pool.score_pairs(spec(real_ce_path, options=options), pairs, batch_size=5)
    ref = CrossEncoder(real_ce_path, device="cpu", **stock_kwargs).predict(
        pairs, show_progress_bar=False
    )
    np.testing.assert_allclose(ours, ref, atol=1e-5, rtol=0)


@pytest.fixture(scope="module")
def label_models(tmp_path_factory: pytest.TempPathFactory, minilm_path: str) -> dict[int, str]:
    from rag_rerank_plugins.testing import build_cross_encoder

    root = tmp_path_factory.mktemp("labels")
    return {
        n: str(build_cross_encoder(root / f"ce-{n}", num_labels=n, hidden_size=64, seed=n))
        for n in (2, 3)
    }


def test_two_label_models_rank_by_the_positive_label(
    pool: ModelPool, label_models: dict[int, str]
) -> None:
    pairs = [(QUERY, p) for p in EDGE_TEXTS]
    logits = CrossEncoder(label_models[2], device="cpu").predict(pairs, show_progress_bar=False)
    assert logits.shape == (len(pairs), 2)
    ours = pool.score_pairs(spec(label_models[2]), pairs, batch_size=4)
    np.testing.assert_allclose(ours, logits[:, 1], atol=1e-5, rtol=0)
    softmax = CrossEncoder(label_models[2], device="cpu").predict(
        pairs, apply_softmax=True, show_progress_bar=False
    )
    sigmoid = pool.score_pairs(spec(label_models[2], options={"score_mode": "sigmoid"}), pairs)
    # Softmax over two labels orders passages like the label-1 logit minus label-0; sigmoid of
    # label 1 orders them like label 1 alone: both are documented choices, neither is label 0.
    assert np.argsort(sigmoid).tolist() == np.argsort(logits[:, 1]).tolist()
    assert softmax.shape == (len(pairs), 2)


def test_three_label_models_need_a_label_and_score_by_it(
    pool: ModelPool, label_models: dict[int, str]
) -> None:
    with pytest.raises(ConfigurationError, match="score_label"):
        pool.get(spec(label_models[3]))
    pairs = [(QUERY, p) for p in EDGE_TEXTS[:6]]
    logits = CrossEncoder(label_models[3], device="cpu").predict(pairs, show_progress_bar=False)
    ours = pool.score_pairs(spec(label_models[3], options={"score_label": 2}), pairs)
    np.testing.assert_allclose(ours, logits[:, 2], atol=1e-5, rtol=0)


# -- embedder: edge inputs and options equal SentenceTransformer.encode ---------------------------


@pytest.mark.parametrize("normalize", [False, True])
def test_embedder_edge_inputs_equal_encode(
    pool: ModelPool, minilm_path: str, direct_embedder: SentenceTransformer, normalize: bool
) -> None:
    emb = spec(minilm_path, "sentence-transformers")
    docs = pool.embed(emb, EDGE_TEXTS, batch_size=3, normalize=normalize)
    ref = direct_embedder.encode_document(
        EDGE_TEXTS, normalize_embeddings=normalize, show_progress_bar=False
    )
    np.testing.assert_allclose(docs, ref, atol=1e-5, rtol=0)
    queries = pool.embed(emb, EDGE_TEXTS, batch_size=64, is_query=True, normalize=normalize)
    ref = direct_embedder.encode_query(
        EDGE_TEXTS, normalize_embeddings=normalize, show_progress_bar=False
    )
    np.testing.assert_allclose(queries, ref, atol=1e-5, rtol=0)


@pytest.mark.parametrize(
    "options",
    [
        {"truncate_dim": 16},
        {"prompts": {"query": "query: ", "passage": "passage: "}},
        {"prompts": {"query": "q: "}, "default_prompt_name": "query"},
        {"processor_kwargs": {"model_max_length": 8}},
        {"model_kwargs": {"attn_implementation": "eager"}},
        {"trust_remote_code": True},
    ],
)
def test_embedder_loader_options_equal_stock(
    pool: ModelPool, minilm_path: str, options: dict[str, Any]
) -> None:
    emb = spec(minilm_path, "sentence-transformers", options=options)
    stock = SentenceTransformer(minilm_path, device="cpu", **options)
    texts = EDGE_TEXTS[:4] + EDGE_TEXTS[-3:]
    for normalize in (False, True):
        np.testing.assert_allclose(
            pool.embed(emb, texts, normalize=normalize),
            stock.encode_document(texts, normalize_embeddings=normalize, show_progress_bar=False),
            atol=1e-5,
            rtol=0,
        )
        np.testing.assert_allclose(
            pool.embed(emb, texts, normalize=normalize, is_query=True),
            stock.encode_query(texts, normalize_embeddings=normalize, show_progress_bar=False),
            atol=1e-5,
            rtol=0,
        )
    embedder: Any = pool.get(emb).model
    assert embedder.dimension == stock.encode(["x"]).shape[1]


# -- token limits the position table cannot hold (bug: failed deep in torch) ----------------------


def test_cross_encoder_max_length_above_the_position_table_truncates_there(
    pool: ModelPool, real_ce_path: str, caplog: pytest.LogCaptureFixture
) -> None:
    """max_length=1024 on a 512-position BERT: before, every pass holding a long passage failed
    with "The size of tensor a (1024) must match the size of tensor b (512)" (and so did the
    other requests batched with it); now inputs are truncated at 512, with a warning."""
    pairs = [(QUERY, "word " * 2000), (QUERY, "a short passage")]
    with caplog.at_level("WARNING"):
        ours = pool.score_pairs(spec(real_ce_path, max_length=1024), pairs)
    ref = CrossEncoder(real_ce_path, device="cpu", max_length=512).predict(
        pairs, show_progress_bar=False
    )
    np.testing.assert_allclose(ours, ref, atol=1e-5, rtol=0)
    assert pool.get(spec(real_ce_path, max_length=1024)).model.max_tokens == 512
    assert "max_length=1024" in caplog.text
    assert "(512 tokens)" in caplog.text


def test_embedder_max_length_above_the_position_table_truncates_there(
    pool: ModelPool, minilm_path: str
) -> None:
    texts = ["word " * 2000, "short"]
    ours = pool.embed(spec(minilm_path, "sentence-transformers", max_length=4096), texts)
    stock = SentenceTransformer(minilm_path, device="cpu")
    stock.max_seq_length = 512
    ref = stock.encode_document(texts, show_progress_bar=False)
    np.testing.assert_allclose(ours, ref, atol=1e-5, rtol=0)


@pytest.fixture(scope="module")
def roberta_unbounded(tmp_path_factory: pytest.TempPathFactory, minilm_path: str) -> str:
    """A tiny RoBERTa-style cross-encoder (positions counted from padding_idx + 1, like XLM-R's
    514-row table for 512 tokens) whose tokenizer has no model_max_length (1e30)."""
    import torch
    from transformers import AutoTokenizer, RobertaConfig, RobertaForSequenceClassification

    tok = AutoTokenizer.from_pretrained(minilm_path)
    tok.model_max_length = int(1e30)
    config = RobertaConfig(
        vocab_size=tok.vocab_size,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=66,  # 65 tokens: padding_idx 0, positions from 1
        pad_token_id=tok.pad_token_id,
        num_labels=1,
    )
    torch.manual_seed(0)
    out = tmp_path_factory.mktemp("models") / "roberta-unbounded"
    RobertaForSequenceClassification(config).save_pretrained(out)
    tok.save_pretrained(out)
    assert json.loads((out / "tokenizer_config.json").read_text())["model_max_length"] > 1e20
    return str(out)


def test_roberta_style_table_with_an_unbounded_tokenizer_truncates_at_its_positions(
    pool: ModelPool, roberta_unbounded: str
) -> None:
    """sentence-transformers caps such a tokenizer at max_position_embeddings (66), two more
    than the table holds: before, a long passage failed with "index out of range in self",
    failing the short passage batched with it too."""
    pairs = [(QUERY, "word " * 300), (QUERY, "short")]
    handle = pool.get(spec(roberta_unbounded))
    assert handle.model.max_tokens == 65
    ours = pool.score_pairs(spec(roberta_unbounded), pairs)
    ref = CrossEncoder(roberta_unbounded, device="cpu", max_length=65).predict(
        pairs, show_progress_bar=False
    )
    np.testing.assert_allclose(ours, ref, atol=1e-5, rtol=0)
    emb = spec(roberta_unbounded, "sentence-transformers")
    vectors = pool.embed(emb, ["word " * 300, "short"])
    stock = SentenceTransformer(roberta_unbounded, device="cpu")
    stock.max_seq_length = 65
    ref_vectors = stock.encode(["word " * 300, "short"], show_progress_bar=False)
    np.testing.assert_allclose(vectors, ref_vectors, atol=1e-5, rtol=0)


# -- windows: every window fits the model (bug: the model cut their tails) -------------------------


@pytest.fixture(scope="module")
def tokenizer(minilm_path: str) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(minilm_path)


def assert_covers(plan: Any, tokenizer: Any, texts: list[str]) -> None:
    """Windows are exact slices covering each passage, gap-free, the last ending at the end."""
    for text, windows in zip(texts, plan.windows, strict=True):
        n = len(tokenizer(text, add_special_tokens=False)["input_ids"])
        covered = 0
        for w in windows:
            assert w.token_start <= covered, "a gap between windows"
            assert w.text == text[w.char_start : w.char_end]
            covered = max(covered, w.token_end)
        assert covered == n
        assert windows[-1].token_end == n


@pytest.mark.parametrize("glue", [False, True])
@pytest.mark.parametrize("settings", [{}, {"tokens": 16, "stride": 16}, {"tokens": 8, "stride": 3}])
def test_every_window_fits_the_model_input(
    tokenizer: Any, glue: bool, settings: dict[str, Any]
) -> None:
    """Windows that start inside a word or a multi-byte character re-tokenize longer than their
    range; before, (query, window) overflowed the model's input by 1-3 tokens and the model cut
    the window's tail: the end of the passage was never scored."""
    rng = random.Random(7)
    max_pair = 48
    windower = Windower(tokenizer, max_pair)
    for _ in range(40):
        query = odd_text(rng, rng.randint(1, 30))
        texts = [odd_text(rng, rng.randint(20, 150), glue) for _ in range(3)]
        plan = windower.plan(query, texts, WindowSettings(query_tokens=12, **settings))
        assert len(tokenizer(plan.query, add_special_tokens=False)["input_ids"]) <= 12
        for q, window in plan.pairs:
            assert len(tokenizer(q, window)["input_ids"]) <= max_pair, (q, window)
        assert_covers(plan, tokenizer, texts)
        # The passage's last characters survive the model's own truncation.
        last = plan.windows[0][-1]
        kept = tokenizer(plan.query, last.text, truncation="longest_first", max_length=max_pair)
        tail = tokenizer(texts[0], add_special_tokens=False)["input_ids"][-1]
        assert kept["input_ids"][-2] == tail


def test_windows_leave_room_for_the_cross_encoders_prompt(
    pool: ModelPool, tiny_ce_path: str, tokenizer: Any
) -> None:
    """A CrossEncoder with a default prompt prepends it to every query; before, windows filled
    the input without it and the model cut each window's last tokens (the prompt's length)."""
    options = {
        "prompts": {"web": "Judge whether the passage answers: "},
        "default_prompt_name": "web",
    }
    ce = spec(tiny_ce_path, max_length=64, options=options)
    prompt = options["prompts"]["web"]  # type: ignore[index]
    text = " ".join(["energy"] * 300)
    plan = windower_for(pool.get(ce).model).plan(QUERY, [text], WindowSettings())
    for q, window in plan.pairs:
        assert len(tokenizer(prompt + q, window)["input_ids"]) <= 64
    stock = CrossEncoder(tiny_ce_path, device="cpu", max_length=64, **options)
    np.testing.assert_allclose(
        pool.score_pairs(ce, plan.pairs),
        stock.predict(plan.pairs, show_progress_bar=False),
        atol=1e-5,
        rtol=0,
    )


@pytest.mark.parametrize("backend", ["cross-encoder", "onnx-cross-encoder"])
def test_windows_leave_room_for_a_saved_default_prompt_on_every_backend(
    pool: ModelPool, tiny_ce_path: str, tokenizer: Any, tmp_path: Path, backend: str
) -> None:
    """A default prompt saved with the model: onnx-cross-encoder prepends it to every query
    but gave windows the whole input, so each (prompt + query, window) ran past the limit and
    the model cut the window's end (on the last window: the passage's own end)."""
    pytest.importorskip("onnxruntime")
    prompt = "Judge whether the passage answers the question asked here: "
    path = tmp_path / "prompted"
    CrossEncoder(
        tiny_ce_path, device="cpu", prompts={"web": prompt}, default_prompt_name="web"
    ).save(str(path))
    options = {"cache_dir": str(tmp_path / "onnx")} if backend.startswith("onnx") else {}
    ce = spec(str(path), backend, max_length=64, options=options)
    text = " ".join(["energy"] * 300)
    plan = windower_for(pool.get(ce).model).plan(QUERY, [text], WindowSettings())
    for q, window in plan.pairs:
        assert len(tokenizer(prompt + q, window)["input_ids"]) <= 64
    stock = CrossEncoder(str(path), device="cpu", max_length=64)
    np.testing.assert_allclose(
        pool.score_pairs(ce, plan.pairs),
        stock.predict(plan.pairs, show_progress_bar=False),
        atol=1e-5,
        rtol=0,
    )


@pytest.fixture(scope="module")
def qwen_path(tmp_path_factory: pytest.TempPathFactory) -> str:
    from rag_rerank_plugins.testing import build_causal_lm_reranker

    out = tmp_path_factory.mktemp("models") / "tiny-qwen3"
    return str(build_causal_lm_reranker(out, initializer_range=0.2, seed=1))


def qwen(path: str, **options: Any) -> ModelSpec:
    return spec(path, "causal-lm-reranker", max_length=192, options=options)


def test_llm_reranker_windows_fit_its_prompt(pool: ModelPool, qwen_path: str) -> None:
    """Byte-level BPE: a window cut through an emoji re-tokenized up to 8 tokens longer, so the
    prompt's truncation cut the document's tail."""
    model: Any = pool.get(qwen(qwen_path)).model
    windower = windower_for(model)
    rng = random.Random(3)
    for _ in range(25):
        query = odd_text(rng, rng.randint(0, 60))
        text = odd_text(rng, rng.randint(40, 200))
        plan = windower.plan(query, [text], WindowSettings(query_tokens=16))
        for q, window in plan.pairs:
            text = model.template.format(instruction=model.instruction, query=q, document=window)
            assert len(model.tokenizer(text, add_special_tokens=False)["input_ids"]) <= model.room


# -- windows: edge cases and scores ------------------------------------------------------------


def test_window_edge_cases(tokenizer: Any) -> None:
    windower = Windower(tokenizer, 64)
    size = 64 - 1 - 3  # query "q" is one token; [CLS] q [SEP] p [SEP]
    exact = " ".join(["energy"] * size)
    one_more = exact + " energy"
    plan = windower.plan("q", ["", "   \n", exact, one_more], WindowSettings())
    assert plan.window_tokens == size
    assert [len(d) for d in plan.windows] == [1, 1, 1, 2]
    assert plan.windows[0][0].text == ""
    assert plan.windows[1][0].text == "   \n"  # whitespace passages are scored whole
    assert plan.windows[2][0].text == exact  # exactly one window: the passage unchanged
    assert [(w.token_start, w.token_end) for w in plan.windows[3]] == [(0, size), (1, size + 1)]
    # A window larger than the model's input is capped to what fits; a stride as large as the
    # window leaves no overlap and no gap; a larger stride with "auto" is capped to the window.
    long_text = " ".join(["energy"] * 500)
    capped = windower.plan("q", [long_text], WindowSettings(tokens=10_000, stride=10_000))
    assert capped.window_tokens == size
    assert capped.stride == size
    assert_covers(capped, tokenizer, [long_text])
    flush = windower.plan("q", [long_text], WindowSettings(tokens=50, stride=50))
    starts = [w.token_start for w in flush.windows[0]]
    assert starts[:-1] == list(range(0, 500 - 50 + 1, 50))[: len(starts) - 1]
    assert_covers(flush, tokenizer, [long_text])
    with pytest.raises(ConfigurationError, match="window_stride"):
        WindowSettings(tokens=10, stride=11)


@pytest.mark.parametrize("aggregate", ["max", "first", "mean"])
def test_windowed_scores_equal_scoring_the_window_texts(
    pool: ModelPool, tiny_ce_path: str, aggregate: str
) -> None:
    pytest.importorskip("langchain_core")
    from langchain_core.documents import Document

    from rag_rerank_plugins.langchain import SharedRerankCompressor

    rng = random.Random(11)
    texts = [odd_text(rng, 300), "", "a short passage", odd_text(rng, 120, glue=True)]
    compressor = SharedRerankCompressor(
        model=tiny_ce_path,
        device="cpu",
        dtype="float32",
        pool=pool,
        top_n=None,
        window_tokens=40,
        window_stride=25,
        window_aggregate=aggregate,
    )
    out = compressor.compress_documents([Document(page_content=t) for t in texts], QUERY)
    got = {d.page_content: d.metadata["relevance_score"] for d in out}
    ce = spec(tiny_ce_path)
    settings = compressor.window_settings
    assert settings is not None
    plan = windower_for(pool.get(ce).model).plan(QUERY, texts, settings)
    stock = CrossEncoder(tiny_ce_path, device="cpu")
    for text, windows in zip(texts, plan.windows, strict=True):
        direct = stock.predict([(plan.query, w.text) for w in windows], show_progress_bar=False)
        expected = {"max": max(direct), "first": direct[0], "mean": float(np.mean(direct))}
        assert got[text] == pytest.approx(float(expected[aggregate]), abs=1e-5)
    assert len(plan.windows[0]) > 1


# -- LLM reranker (causal-lm-reranker): padding, last token, yes/no tokens -------------------------


CARD_SYSTEM = (
    "Judge whether the Document meets the requirements based on the Query and the Instruct "
    'provided. Note that the answer can only be "yes" or "no".'
)
CARD_PREFIX = f"<|im_start|>system\n{CARD_SYSTEM}<|im_end|>\n<|im_start|>user\n"
CARD_SUFFIX = "<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n"
CARD_INSTRUCTION = "Given a web search query, retrieve relevant passages that answer the query"


def card_scores(path: str, pairs: list[tuple[str, str]], max_length: int) -> list[float]:
    """The Qwen3-Reranker model card's recipe, one pair at a time (no padding at all)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    prefix = tok.encode(CARD_PREFIX, add_special_tokens=False)
    suffix = tok.encode(CARD_SUFFIX, add_special_tokens=False)
    yes, no = tok.convert_tokens_to_ids("yes"), tok.convert_tokens_to_ids("no")
    out = []
    for q, d in pairs:
        body = tok(
            f"<Instruct>: {CARD_INSTRUCTION}\n<Query>: {q}\n<Document>: {d}",
            add_special_tokens=False,
            truncation=True,
            max_length=max_length - len(prefix) - len(suffix),
        )["input_ids"]
        with torch.no_grad():
            logits = model(torch.tensor([prefix + body + suffix])).logits[0, -1]
        pair = torch.stack([logits[no], logits[yes]])
        out.append(float(torch.log_softmax(pair, 0)[1].exp()))
    return out


def test_llm_reranker_left_padding_equals_unpadded_prompts(pool: ModelPool, qwen_path: str) -> None:
    pairs = [(q, d) for q in ["", QUERY] for d in EDGE_TEXTS]
    ref = card_scores(qwen_path, pairs, 192)
    for batch_size in (1, 5, 64):  # rows of very different lengths share left-padded passes
        ours = pool.score_pairs(qwen(qwen_path), pairs, batch_size=batch_size)
        np.testing.assert_allclose(ours, ref, atol=1e-5, rtol=0)
    assert np.ptp(ref) > 1e-3


def test_llm_reranker_yes_and_no_tokens(pool: ModelPool, qwen_path: str) -> None:
    pairs = [(QUERY, p) for p in EDGE_TEXTS[-4:]]
    p_yes = np.array(pool.score_pairs(qwen(qwen_path), pairs))
    swapped = pool.score_pairs(qwen(qwen_path, yes_token="no", no_token="yes"), pairs)
    np.testing.assert_allclose(swapped, 1 - p_yes, atol=1e-5, rtol=0)
    raw = pool.score_pairs(qwen(qwen_path, score_mode="raw"), pairs)
    np.testing.assert_allclose(raw, np.log(p_yes / (1 - p_yes)), atol=1e-4, rtol=0)
    with pytest.raises(ConfigurationError, match="same token"):
        pool.get(qwen(qwen_path, yes_token="yes", no_token="yes"))
    with pytest.raises(ConfigurationError, match="not one token"):
        pool.get(qwen(qwen_path, yes_token="definitely yes"))


def test_llm_reranker_without_a_pad_token_pads_with_eos(
    pool: ModelPool, qwen_path: str, tmp_path: Path
) -> None:
    import shutil

    nopad = tmp_path / "qwen-nopad"
    shutil.copytree(qwen_path, nopad)
    config = json.loads((nopad / "tokenizer_config.json").read_text())
    config.pop("pad_token", None)
    (nopad / "tokenizer_config.json").write_text(json.dumps(config))
    model: Any = pool.get(qwen(str(nopad))).model
    assert model.tokenizer.pad_token_id is None
    assert model.pad_id == model.tokenizer.eos_token_id
    pairs = [(QUERY, "short"), (QUERY, "a much longer passage " * 10)]
    np.testing.assert_allclose(
        pool.score_pairs(qwen(str(nopad)), pairs, batch_size=2),
        pool.score_pairs(qwen(qwen_path), pairs, batch_size=2),
        atol=1e-6,
        rtol=0,
    )


# -- load failures whose library message does not say what to do -------------------------------


@pytest.mark.parametrize("backend", ["cross-encoder", "onnx-cross-encoder"])
def test_an_empty_folder_says_it_is_not_a_saved_model(tmp_path: Path, backend: str) -> None:
    pool = ModelPool()
    folder = tmp_path / "not-a-model"
    folder.mkdir()
    with pytest.raises(ModelLoadError, match=r"has no config\.json") as info:
        pool.score_pairs(spec(str(folder), backend), [("q", "p")])
    assert "save_pretrained" in str(info.value)


def test_a_truncated_weights_file_says_to_download_it_again(
    tmp_path: Path, tiny_ce_path: str
) -> None:
    import shutil

    folder = tmp_path / "cut-short"
    shutil.copytree(tiny_ce_path, folder)
    weights = folder / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])  # an interrupted copy
    with pytest.raises(ModelLoadError, match="damaged or cut short"):
        ModelPool().score_pairs(spec(str(folder)), [("q", "p")])


def test_a_sentence_transformers_module_layout_gets_no_config_hint(
    tmp_path: Path, minilm_path: str
) -> None:
    """A folder with modules.json and no root config.json is a saved model (an older
    sentence-transformers layout): its failure must not say it is not one."""
    folder = tmp_path / "st-layout"
    folder.mkdir()
    (folder / "modules.json").write_text("[]")
    with pytest.raises(ModelLoadError) as info:
        ModelPool().embed(spec(str(folder), "sentence-transformers"), ["a"])
    assert "has no config.json" not in str(info.value)
