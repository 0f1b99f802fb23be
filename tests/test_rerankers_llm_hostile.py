"""Hostile and migrating users of the FlagEmbedding and LLM reranker backends (``flag-reranker``,
``flag-llm-reranker``, ``causal-lm-reranker``, ``flag-bge-m3``): edge inputs equal the reference
implementations (FlagEmbedding's ``compute_score`` / the Qwen3-Reranker model card's recipe) in
FP32 on tiny random models built offline, long-document windows are never truncated by the
backend's own pre-processing, and misconfiguration fails at load with a message naming the
option, never inside every request or deep in torch."""

from __future__ import annotations

import shutil
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from rag_rerank_plugins import ConfigurationError, ModelPool, ModelSpec, RagRerankError

pytest.importorskip("transformers")

QUERY = "how do plants make energy?"
LONG = " ".join(f"Plants make energy number {i} from light and water." for i in range(120))
EDGE_PAIRS = [
    ("", "Photosynthesis converts light energy into chemical energy in plants."),
    (QUERY, ""),
    ("", ""),
    ("日本語のクエリ 🌱 naïve café", "Ünïcödé pässage — ñ 🌿🌿 \u200b\u0301 done"),
    (QUERY, LONG),  # past max_length: the passage is cut
    (LONG, "a short passage"),  # a long query: cut at query_max_length
    (QUERY, "Photosynthesis converts light energy into chemical energy in plants."),
    (QUERY, "Photosynthesis converts light energy into chemical energy in plants."),  # duplicate
]
CARD_SYSTEM = (
    "Judge whether the Document meets the requirements based on the Query and the Instruct "
    'provided. Note that the answer can only be "yes" or "no".'
)
CARD_INSTRUCTION = "Given a web search query, retrieve relevant passages that answer the query"


# -- tiny models ---------------------------------------------------------------------------------


def _gemma_tokenizer() -> Any:
    from rag_rerank_plugins.testing import train_byte_bpe_tokenizer

    return train_byte_bpe_tokenizer(
        ["<pad>", "<eos>", "<bos>", "<unk>"],
        pad_token="<pad>",
        eos_token="<eos>",
        bos_token="<bos>",
        unk_token="<unk>",
    )


@pytest.fixture(scope="module")
def gemma_path(tmp_path_factory: pytest.TempPathFactory) -> str:
    """bge-reranker-v2-gemma's architecture, 2 small layers, a right-padding tokenizer."""
    import torch
    from transformers import GemmaConfig, GemmaForCausalLM

    tok = _gemma_tokenizer()
    config = GemmaConfig(
        vocab_size=len(tok),
        hidden_size=64,
        intermediate_size=128,
        num_attention_heads=4,
        num_key_value_heads=1,
        head_dim=16,
        num_hidden_layers=2,
        max_position_embeddings=1024,
        pad_token_id=tok.pad_token_id,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        initializer_range=0.2,
    )
    torch.manual_seed(2)
    path = tmp_path_factory.mktemp("models") / "hostile-gemma"
    GemmaForCausalLM(config).save_pretrained(path)
    tok.save_pretrained(path)
    return str(path)


@pytest.fixture(scope="module")
def qwen_path(tmp_path_factory: pytest.TempPathFactory) -> str:
    from rag_rerank_plugins.testing import build_causal_lm_reranker

    out = tmp_path_factory.mktemp("models") / "hostile-qwen3"
    return str(build_causal_lm_reranker(out, initializer_range=0.2, seed=1))


def _variant(src: str, dst: Path, **changes: Any) -> str:
    """A copy of a saved model whose tokenizer has ``changes`` (attributes, or ``add_tokens``)."""
    from transformers import AutoTokenizer

    shutil.copytree(src, dst)
    tok = AutoTokenizer.from_pretrained(src)
    added = changes.pop("add_tokens", None)
    if added:
        tok.add_tokens(added, special_tokens=True)
    for name, value in changes.items():
        setattr(tok, name, value)
    tok.save_pretrained(dst)
    return str(dst)


def _as_options(options: dict[str, Any]) -> Any:
    """Options as ModelSpec takes them (it also normalises a dict; mypy wants the tuple)."""
    return tuple(options.items())


def flag_llm(path: str, max_length: int | None = None, **options: Any) -> ModelSpec:
    options.setdefault("score_mode", "raw")
    return ModelSpec(
        path,
        backend="flag-llm-reranker",
        device="cpu",
        dtype="float32",
        max_length=max_length,
        options=_as_options(options),
    )


def qwen(path: str, max_length: int = 256, **options: Any) -> ModelSpec:
    return ModelSpec(
        path,
        backend="causal-lm-reranker",
        device="cpu",
        dtype="float32",
        max_length=max_length,
        options=_as_options(options),
    )


def flag_ce(path: str, max_length: int | None = None, **options: Any) -> ModelSpec:
    options.setdefault("score_mode", "raw")
    return ModelSpec(
        path,
        backend="flag-reranker",
        device="cpu",
        dtype="float32",
        max_length=max_length,
        options=_as_options(options),
    )


def _reference(path: str, **kwargs: Any) -> Any:
    pytest.importorskip("FlagEmbedding")
    from FlagEmbedding import FlagLLMReranker

    kwargs.setdefault("batch_size", 3)
    return FlagLLMReranker(path, use_fp16=False, devices=["cpu"], **kwargs)


def card_scores(
    path: str, pairs: list[tuple[str, str]], max_length: int, instruction: str = CARD_INSTRUCTION
) -> list[float]:
    """The Qwen3-Reranker model card's recipe, as published, one pair at a time."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path, padding_side="left")
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    prefix = f"<|im_start|>system\n{CARD_SYSTEM}<|im_end|>\n<|im_start|>user\n"
    suffix = "<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n"
    prefix_ids = tok.encode(prefix, add_special_tokens=False)
    suffix_ids = tok.encode(suffix, add_special_tokens=False)
    yes, no = tok.convert_tokens_to_ids("yes"), tok.convert_tokens_to_ids("no")
    out = []
    for q, d in pairs:
        text = f"<Instruct>: {instruction}\n<Query>: {q}\n<Document>: {d}"
        body = tok(
            text,
            truncation="longest_first",
            max_length=max_length - len(prefix_ids) - len(suffix_ids),
        )["input_ids"]
        ids = torch.tensor([prefix_ids + body + suffix_ids])
        with torch.no_grad():
            last = model(input_ids=ids).logits[0, -1]
        out.append(float(torch.log_softmax(last[[no, yes]], dim=-1)[1].exp()))
    return out


# -- flag-llm-reranker: equal to compute_score on edge inputs -----------------------------------


def test_flag_llm_edge_inputs_equal_compute_score(pool: ModelPool, gemma_path: str) -> None:
    """Empty query/passage, unicode, past max_length on either side, duplicates; raw and
    sigmoid; several batch sizes (the scores never depend on the batch)."""
    ref = _reference(gemma_path, max_length=64)
    want_raw = ref.compute_score(EDGE_PAIRS)
    want_sigmoid = ref.compute_score(EDGE_PAIRS, normalize=True)
    for batch_size in (1, 3, 8):
        got = pool.score_pairs(flag_llm(gemma_path, 64), EDGE_PAIRS, batch_size=batch_size)
        np.testing.assert_allclose(got, want_raw, atol=1e-5, rtol=0)
    sig = pool.score_pairs(flag_llm(gemma_path, 64, score_mode="sigmoid"), EDGE_PAIRS)
    np.testing.assert_allclose(sig, want_sigmoid, atol=1e-5, rtol=0)
    assert sig[-1] == sig[-2]  # duplicates score alike
    assert np.ptp(want_raw) > 1e-2
    # A single pair, and 500 pairs in one call.
    single = pool.score_pairs(flag_llm(gemma_path, 64), [EDGE_PAIRS[0]])
    np.testing.assert_allclose(single, want_raw[:1], atol=1e-5, rtol=0)
    many = [EDGE_PAIRS[i % len(EDGE_PAIRS)] for i in range(500)]
    got_many = pool.score_pairs(flag_llm(gemma_path, 64), many, batch_size=32)
    assert len(got_many) == 500
    np.testing.assert_allclose(got_many, [want_raw[i % 8] for i in range(500)], atol=1e-5, rtol=0)


def test_flag_llm_empty_prompt_means_no_prompt_as_in_flag_embedding(
    pool: ModelPool, gemma_path: str
) -> None:
    """FlagEmbedding replaces only ``prompt=None`` by its default; ``prompt=""`` was replaced
    here too, so every score differed from ``compute_score`` (by 1.1 in the logit)."""
    pairs = EDGE_PAIRS[-3:]
    for prompt in ("", "Relevant? Answer Yes or No."):
        want = _reference(gemma_path, prompt=prompt).compute_score(pairs)
        got = pool.score_pairs(flag_llm(gemma_path, prompt=prompt), pairs)
        np.testing.assert_allclose(got, want, atol=1e-5, rtol=0)


@pytest.mark.parametrize(
    "options",
    [
        {"query_instruction_for_rerank": None},
        {"passage_instruction_for_rerank": None, "query_instruction_format": "{}\\n{}"},
        {"query_max_length": 5},
    ],
)
def test_flag_llm_preprocessing_options_equal_compute_score(
    pool: ModelPool, gemma_path: str, options: dict[str, Any]
) -> None:
    pairs = EDGE_PAIRS[-4:]
    want = _reference(gemma_path, **options).compute_score(pairs)
    np.testing.assert_allclose(
        pool.score_pairs(flag_llm(gemma_path, **options), pairs), want, atol=1e-5, rtol=0
    )


@pytest.mark.parametrize(
    "change",
    [{"padding_side": "left"}, {"pad_token": None}],
    ids=["left-padding", "no-pad-token"],
)
def test_flag_llm_tokenizer_variants_equal_unpadded_compute_score(
    pool: ModelPool, gemma_path: str, tmp_path: Path, change: dict[str, Any]
) -> None:
    """Left padding, and no pad token at all (FlagEmbedding's own pad step then fails; the
    backend pads with EOS): the scores of each prompt scored alone by FlagEmbedding (on the
    unchanged tokenizer where FlagEmbedding cannot pad at all)."""
    path = _variant(gemma_path, tmp_path / "variant", **change)
    pairs = EDGE_PAIRS[-4:]
    reference_path = gemma_path if "pad_token" in change else path
    want = _reference(reference_path, batch_size=1).compute_score(pairs)  # nothing to pad
    got = pool.score_pairs(flag_llm(path), pairs, batch_size=4)
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=0)


def test_flag_llm_in_bf16_on_the_cpu_is_close_and_cast_once(
    pool: ModelPool, gemma_path: str
) -> None:
    import torch

    spec = flag_llm(gemma_path).with_options(dtype="bfloat16")
    model: Any = pool.get(spec).model
    model = model.model
    assert next(model.parameters()).dtype == torch.bfloat16
    got = pool.score_pairs(spec, EDGE_PAIRS[-4:], batch_size=2)
    want = _reference(gemma_path).compute_score(EDGE_PAIRS[-4:])
    assert all(isinstance(s, float) and np.isfinite(s) for s in got)
    np.testing.assert_allclose(got, want, atol=0.15, rtol=0)  # bf16 rounding, not a new model


def test_16_threads_share_one_flag_llm_load(pool: ModelPool, gemma_path: str) -> None:
    spec = flag_llm(gemma_path, 64)
    pairs = EDGE_PAIRS[-4:]
    barrier = threading.Barrier(16)

    def call(_: int) -> list[float]:
        barrier.wait()
        return pool.score_pairs(spec, pairs)

    with ThreadPoolExecutor(16) as ex:
        results = list(ex.map(call, range(16)))
    want = _reference(gemma_path, max_length=64).compute_score(pairs)
    for result in results:
        np.testing.assert_allclose(result, want, atol=1e-5, rtol=0)
    stats = pool.spec_stats(spec)
    assert stats["loads"] == 1
    assert stats["errors"] == 0


# -- windows: every window reaches the model whole ----------------------------------------------


def _flag_llm_window_kept_whole(model: Any, query: str, window: str) -> bool:
    """Whether FlagEmbedding's truncation (passage at max_length, pair at max_length + sep +
    prompt) leaves the window's tokens all in the prompt."""
    tok = model.tokenizer
    (q_instr, q_fmt), (p_instr, p_fmt) = model.instructions
    q_text = q_fmt.format(q_instr, query) if q_instr is not None else query
    p_text = p_fmt.format(p_instr, window) if p_instr is not None else window
    q_ids = tok(q_text, add_special_tokens=False)["input_ids"][: model.query_max_length]
    p_ids = tok(p_text, add_special_tokens=False)["input_ids"]
    whole = model.bos_ids + q_ids + model.sep_ids + p_ids + model.sep_ids + model.prompt_ids
    return len(p_ids) <= model.passage_max_length and model.encode([(query, window)])[0] == whole


@pytest.mark.parametrize(
    ("query", "options"),
    [
        ("x", {}),  # a one-token query: "B: " + the window passed the passage limit
        ("", {}),
        (QUERY, {"passage_instruction_for_rerank": "Here is a passage that may answer it: "}),
        (
            QUERY,
            {
                "prompt": "Yes?",
                "query_instruction_for_rerank": "Here is what a user typed into a search box: ",
            },
        ),
    ],
    ids=["one-token-query", "empty-query", "long-passage-instruction", "short-prompt"],
)
def test_flag_llm_windows_are_never_cut_by_truncation(
    pool: ModelPool, gemma_path: str, query: str, options: dict[str, Any]
) -> None:
    """Before, the windows were sized from the bare texts: each one lost its tail to
    FlagEmbedding's truncation (the part of the passage never scored), silently."""
    from rag_rerank_plugins.windows import WindowSettings, windower_for

    model: Any = pool.get(flag_llm(gemma_path, 64, **options)).model
    plan = windower_for(model).plan(query, [LONG], WindowSettings("auto"))
    assert len(plan.windows[0]) > 3
    cut = [
        w.text
        for w in plan.windows[0]
        if not _flag_llm_window_kept_whole(model, plan.query, w.text)
    ]
    assert cut == []


def test_flag_reranker_windows_leave_room_for_instructions(
    pool: ModelPool, tiny_ce_path: str
) -> None:
    """flag-reranker with FlagEmbedding's instructions: the pair is cut at max_length after
    the instructions are added, so they must come off the window's room."""
    from rag_rerank_plugins.windows import WindowSettings, windower_for

    options = {
        "query_instruction_for_rerank": "Represent this question for finding answers: ",
        "passage_instruction_for_rerank": "A candidate passage that might answer it: ",
    }
    reranker: Any = pool.get(flag_ce(tiny_ce_path, 64, **options)).model
    plan = windower_for(reranker).plan(QUERY, [LONG], WindowSettings("auto"))
    tok = reranker.tokenizer
    for q, window in plan.pairs:
        encoded = reranker._encode([(q, window)])[0]["input_ids"]
        passage = tok(options["passage_instruction_for_rerank"] + window, add_special_tokens=False)
        assert encoded[-len(passage["input_ids"]) - 1 : -1] == passage["input_ids"], window


# -- causal-lm-reranker ---------------------------------------------------------------------------


def test_causal_lm_edge_inputs_equal_the_model_card(pool: ModelPool, qwen_path: str) -> None:
    want = card_scores(qwen_path, EDGE_PAIRS, 192)
    for batch_size in (1, 8):
        got = pool.score_pairs(qwen(qwen_path, 192), EDGE_PAIRS, batch_size=batch_size)
        np.testing.assert_allclose(got, want, atol=1e-5, rtol=0)


def test_causal_lm_instruction_none_is_the_model_cards_default(
    pool: ModelPool, qwen_path: str
) -> None:
    """The model card's ``format_instruction`` turns ``instruction=None`` into its default;
    the backend wrote the word "None" into every prompt. ``system=None`` likewise means the
    default."""
    pairs = EDGE_PAIRS[-3:]
    want = card_scores(qwen_path, pairs, 256)
    got = pool.score_pairs(qwen(qwen_path, instruction=None, system=None), pairs)
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=0)


@pytest.mark.parametrize("max_length", [100, 150])
def test_causal_lm_max_length_without_room_for_query_and_document_fails_at_load(
    pool: ModelPool, qwen_path: str, max_length: int
) -> None:
    """Past the prefix and suffix (93 tokens) but within the template text (64): the prompt's
    truncation removed the whole query and document, and every document scored the same."""
    with pytest.raises(ConfigurationError, match="no token of the query or document"):
        pool.get(qwen(qwen_path, max_length))


def test_causal_lm_answer_token_outside_the_models_vocabulary_fails_at_load(
    pool: ModelPool, qwen_path: str, tmp_path: Path
) -> None:
    """A token added to the tokenizer but not to the model: its id indexed past the logits
    (IndexError) in every request."""
    path = _variant(qwen_path, tmp_path / "added", add_tokens=["<answer_yes>"])
    with pytest.raises(ConfigurationError, match="output has 800 logits"):
        pool.get(qwen(path, yes_token="<answer_yes>"))


@pytest.mark.parametrize(
    ("options", "match"),
    [
        ({"yes_token": 5}, "yes_token=5"),
        ({"no_token": ""}, "no_token=''"),
        ({"instruction": 3}, "instruction=3"),
        ({"yes_token": "definitely yes"}, "one token"),
        ({"score_label": 1}, "does not accept"),
        ({"normalize": True}, "does not accept"),
    ],
)
def test_causal_lm_misconfiguration_is_a_configuration_error(
    pool: ModelPool, qwen_path: str, options: dict[str, Any], match: str
) -> None:
    with pytest.raises(ConfigurationError, match=match):
        pool.get(qwen(qwen_path, **options))


# -- misconfiguration of the FlagEmbedding backends ----------------------------------------------


@pytest.mark.parametrize(
    ("options", "match"),
    [
        ({"query_instruction_format": "{}"}, "no slot for the text"),
        ({"passage_instruction_format": "{q}{}"}, "two positional slots"),
        ({"prompt": 5}, "prompt=5"),
        ({"query_max_length": "10"}, "query_max_length='10'"),
        ({"query_max_length": 0}, "positive int"),
        ({"query_instruction_for_rerank": 1}, "give a string"),
        ({"score_label": 1}, "does not accept"),
        ({"normalize": True}, "score_mode"),
        ({"batch_size": 4}, "does not accept"),
    ],
)
def test_flag_llm_misconfiguration_fails_at_load(
    pool: ModelPool, gemma_path: str, options: dict[str, Any], match: str
) -> None:
    """Before, a bad format or query_max_length failed inside every request (KeyError,
    TypeError), ``prompt=5`` was a "could not load the model" error, and a format without the
    text's slot silently scored every pair on the instruction alone."""
    pytest.importorskip("FlagEmbedding")
    with pytest.raises(ConfigurationError, match=match):
        pool.get(flag_llm(gemma_path, **options))


@pytest.mark.parametrize(
    ("options", "match"),
    [
        ({"query_instruction_for_rerank": "q: ", "query_instruction_format": "{}"}, "no slot"),
        ({"passage_instruction_for_rerank": "p: ", "passage_instruction_format": "{x}"}, "slots"),
        ({"query_max_length": -1}, "positive int"),
        ({"score_label": "nope"}, "nope"),
    ],
)
def test_flag_reranker_misconfiguration_fails_at_load(
    pool: ModelPool, tiny_ce_path: str, options: dict[str, Any], match: str
) -> None:
    pytest.importorskip("FlagEmbedding")
    with pytest.raises(RagRerankError, match=match):
        pool.get(flag_ce(tiny_ce_path, **options))


def test_flag_reranker_format_is_unchecked_without_an_instruction(
    pool: ModelPool, tiny_ce_path: str
) -> None:
    """FlagEmbedding ignores a format when no instruction uses it; so does the check."""
    pytest.importorskip("FlagEmbedding")
    spec = flag_ce(tiny_ce_path, query_instruction_format="{}")
    assert len(pool.score_pairs(spec, [(QUERY, "plants")])) == 1


# -- flag-reranker / flag-bge-m3: max_length past the position table ------------------------------


def test_flag_reranker_max_length_past_the_position_table_is_capped(
    pool: ModelPool, tiny_ce_path: str, caplog: pytest.LogCaptureFixture
) -> None:
    """``max_length=1024`` on a 512-position encoder: every pass holding a long passage failed
    ("The size of tensor a (1024) must match ... (512)"), and the requests batched with it. Now
    it is capped at 512 with a warning, as the cross-encoder backend does, and the scores are
    FlagEmbedding's at max_length=512."""
    pytest.importorskip("FlagEmbedding")
    from FlagEmbedding import FlagReranker

    pairs = [(QUERY, LONG * 2), (QUERY, "a short passage")]
    with caplog.at_level("WARNING"):
        got = pool.score_pairs(flag_ce(tiny_ce_path, 1024), pairs)
    assert "position table" in caplog.text
    want = FlagReranker(
        tiny_ce_path, use_fp16=False, devices=["cpu"], max_length=512
    ).compute_score(pairs)
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=0)


def test_flag_bge_m3_max_length_past_the_position_table_is_capped(
    pool: ModelPool, minilm_path: str
) -> None:
    pytest.importorskip("FlagEmbedding")
    from FlagEmbedding import BGEM3FlagModel

    spec = ModelSpec(
        minilm_path, backend="flag-bge-m3", device="cpu", dtype="float32", max_length=2048
    )
    texts = [LONG * 3, "short"]
    docs = pool.embed(spec, texts)
    queries = pool.embed(spec, texts, is_query=True)
    ref = BGEM3FlagModel(minilm_path, use_fp16=False, devices=["cpu"], passage_max_length=512)
    want = ref.encode_corpus(texts, max_length=512)["dense_vecs"]
    np.testing.assert_allclose(docs, want, atol=1e-5)
    np.testing.assert_allclose(queries, want, atol=1e-5)
