"""Hostile users of ``causal-lm-reranker``: an explicit ``max_length`` past a GPT-2 / OPT learned
position table (before: every pass holding a long prompt failed with "index out of range in
self", failing the requests batched with it), and a custom template with ``{query}`` after
``{document}`` (before: a long document pushed the whole query out, so every query scored the
same). Tiny random models built offline in ``tmp_path``; scores are meaningless, lengths and ids
are real."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import pytest

from rag_rerank_plugins import ModelPool, ModelSpec

pytest.importorskip("transformers")

QUERY = "how do plants make energy?"
LONG_DOC = "Chlorophyll absorbs light. " * 100
DOC_FIRST = "<Document>: {document}\n<Query>: {query}"
TABLE = 256  # positions of the tiny GPT-2 / OPT below


def _qwen_tokenizer() -> Any:
    from rag_rerank_plugins.testing import QWEN_SPECIAL_TOKENS, train_byte_bpe_tokenizer

    tok = train_byte_bpe_tokenizer(
        QWEN_SPECIAL_TOKENS, pad_token="<|endoftext|>", eos_token="<|im_end|>"
    )
    tok.padding_side = "left"
    return tok


def _save(model: Any, tok: Any, path: Path) -> str:
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return str(path)


@pytest.fixture(scope="module")
def gpt2_path(tmp_path_factory: pytest.TempPathFactory) -> str:
    """GPT-2's learned ``wpe`` table (256 rows: 256 positions)."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    tok = _qwen_tokenizer()
    config = GPT2Config(
        vocab_size=len(tok), n_embd=32, n_layer=2, n_head=2, n_positions=TABLE, bos_token_id=None,
        pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id,
    )  # fmt: skip
    torch.manual_seed(0)
    return _save(GPT2LMHeadModel(config), tok, tmp_path_factory.mktemp("gpt2"))


@pytest.fixture(scope="module")
def opt_path(tmp_path_factory: pytest.TempPathFactory) -> str:
    """OPT's ``embed_positions`` (258 rows, every position shifted by 2: 256 positions)."""
    import torch
    from transformers import OPTConfig, OPTForCausalLM

    tok = _qwen_tokenizer()
    config = OPTConfig(
        vocab_size=len(tok), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
        ffn_dim=64, word_embed_proj_dim=32, max_position_embeddings=TABLE,
        pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id,
    )  # fmt: skip
    torch.manual_seed(0)
    return _save(OPTForCausalLM(config), tok, tmp_path_factory.mktemp("opt"))


@pytest.fixture(scope="module")
def qwen_path(tmp_path_factory: pytest.TempPathFactory) -> str:
    """Rotary positions (no table), 256 in the config; weights large enough that the query
    changes the score."""
    from rag_rerank_plugins.testing import build_causal_lm_reranker

    path = tmp_path_factory.mktemp("qwen3")
    return str(build_causal_lm_reranker(path, max_position_embeddings=TABLE, initializer_range=0.2))


def spec(path: str, max_length: int | None = None, **options: Any) -> ModelSpec:
    return ModelSpec(
        path,
        backend="causal-lm-reranker",
        device="cpu",
        dtype="float32",
        max_length=max_length,
        options=options,
    )


# -- bug 1: max_length past a learned position table ---------------------------------------------


@pytest.mark.parametrize("which", ["gpt2", "opt"])
def test_max_length_past_a_learned_position_table_is_capped_with_a_warning(
    pool: ModelPool, request: pytest.FixtureRequest, caplog: pytest.LogCaptureFixture, which: str
) -> None:
    path = request.getfixturevalue(f"{which}_path")
    pairs = [(QUERY, "a short passage"), (QUERY, LONG_DOC)]
    with caplog.at_level(logging.WARNING):
        capped = pool.score_pairs(spec(path, 1024), pairs)
    assert pool.get(spec(path, 1024)).model.max_tokens == TABLE
    assert "max_length=1024" in caplog.text
    assert f"({TABLE} tokens)" in caplog.text
    assert capped == pytest.approx(pool.score_pairs(spec(path), pairs), abs=1e-6)
    assert capped[0] == pytest.approx(pool.score_pairs(spec(path, 1024), pairs[:1])[0], abs=1e-6)


def test_rotary_models_keep_an_explicit_max_length(
    pool: ModelPool, qwen_path: str, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING):
        pool.score_pairs(spec(qwen_path, 1024), [(QUERY, "a short passage")])
    assert pool.get(spec(qwen_path, 1024)).model.max_tokens == 1024
    assert "position table" not in caplog.text


def test_decoder_position_tables_are_opt_in_for_the_table_helper(
    pool: ModelPool, gpt2_path: str, opt_path: str, qwen_path: str
) -> None:
    """The encoders' callers keep their default (``position_embeddings`` only)."""
    from rag_rerank_plugins.backends._torch_common import (
        DECODER_POSITION_TABLES,
        position_table_limit,
    )

    for path, limit in ((gpt2_path, TABLE), (opt_path, TABLE), (qwen_path, None)):
        model = pool.get(spec(path)).model.model
        assert position_table_limit(model) is None
        assert position_table_limit(model, DECODER_POSITION_TABLES) == limit


# -- bug 2: a template with {query} after {document} -------------------------------------------


def _old_encode(model: Any, pairs: list[tuple[str, str]]) -> list[list[int]]:
    """The encoding before the fix: the whole templated body truncated from its end."""
    fmt, room = model.template, model.room
    texts = [fmt.format(instruction=model.instruction, query=q, document=d) for q, d in pairs]
    body = model.tokenizer(texts, add_special_tokens=False, truncation=True, max_length=room)
    body = body["input_ids"]
    return [model.prefix_ids + list(ids) + model.suffix_ids for ids in body]


def test_query_after_a_long_document_is_kept_whole(pool: ModelPool, qwen_path: str) -> None:
    doc_first = spec(qwen_path, 300, template=DOC_FIRST)
    queries = [QUERY, "stock market crash", ""]
    scores = pool.score_pairs(doc_first, [(q, LONG_DOC) for q in queries])
    assert len({round(s, 6) for s in scores}) == 3, scores
    model = pool.get(doc_first).model
    ids = model.encode([(QUERY, LONG_DOC)])[0]
    assert len(ids) == 300
    text = model.tokenizer.decode(ids)
    assert text.startswith(model.tokenizer.decode(model.prefix_ids) + "<Document>: Chlorophyll")
    assert text.endswith(f"light\n<Query>: {QUERY}" + model.tokenizer.decode(model.suffix_ids))


def test_a_query_that_fills_the_room_drops_the_document_and_is_cut(
    pool: ModelPool, qwen_path: str
) -> None:
    model = pool.get(spec(qwen_path, 300, template=DOC_FIRST)).model
    ids = model.encode([(LONG_DOC, "a document"), (LONG_DOC, "another one")])
    assert ids[0] == ids[1]
    assert len(ids[0]) == 300
    body = model.tokenizer.decode(ids[0][len(model.prefix_ids) : -len(model.suffix_ids)])
    assert body.startswith("<Document>: \n<Query>: Chlorophyll absorbs light.")


@pytest.mark.parametrize("template", [None, "{query} | {document}", DOC_FIRST])
def test_prompts_that_fit_and_the_default_template_give_the_same_ids_as_before(
    pool: ModelPool, qwen_path: str, template: str | None
) -> None:
    """The model card's ids are unchanged (long documents and long queries included); with any
    template, a prompt that fits is tokenized as a whole, as before."""
    options = {"template": template} if template else {}
    model = pool.get(spec(qwen_path, 300, **options)).model
    short = [(QUERY, "Photosynthesis converts light."), ("", ""), ("日本語 🌱", "naïve café")]
    long = [(QUERY, LONG_DOC), (LONG_DOC, "a short passage"), (LONG_DOC, LONG_DOC)]
    pairs = short + long if template != DOC_FIRST else short
    assert model.encode(pairs) == _old_encode(model, pairs)


def test_windows_fit_a_query_last_template(pool: ModelPool, qwen_path: str) -> None:
    """Long-document windows with a query-last template: every (query, window) prompt reaches
    the model whole, as tokenized without any cut."""
    from rag_rerank_plugins.windows import WindowSettings, windower_for

    model = pool.get(spec(qwen_path, 300, template=DOC_FIRST)).model
    plan = windower_for(model).plan(QUERY, [LONG_DOC], WindowSettings(tokens="auto"))
    assert len(plan.pairs) > 3
    for query, window in plan.pairs:
        assert model.encode([(query, window)]) == _old_encode(model, [(query, window)])
        text = model.tokenizer.decode(model.encode([(query, window)])[0])
        assert f"<Document>: {window}\n<Query>: {query}" in text
