"""The CPU fast path against the stock classes on hostile models and shapes.

What a migrating user relies on: swapping ``CrossEncoder.predict`` / ``SentenceTransformer.encode``
for the pool keeps the scores and vectors (float32: to 1e-5; bfloat16: the documented quality
bound), whatever the CPU kind (``RAG_RERANK_CPU_KIND``: the tiled kernel, torch's sdpa from 48
keys, packed rows from 64, per-sequence passes from 256) and whatever the model: every encoder
family transformers ships for rerankers and embedders (BERT, RoBERTa / XLM-R with their
``padding_idx`` position ids, ELECTRA, DistilBERT, ALBERT, DeBERTa-v2, ModernBERT, MPNet, and
EmbeddingGemma's bidirectional Gemma 3 with grouped-query heads), head widths 15-96, head counts
that are not powers of two, sequences at every kernel threshold and +-1, the position table
filled, batches of identical items, token type ids all 1, every pooling mode (max pooling reads
every padding row the packed layout leaves), hidden states / attentions recorded, and models
that load concurrently with different kernel settings.

The CPU kind and the BF16 policy always come from the overrides, never from the host.
"""

from __future__ import annotations

import concurrent.futures as cf
import copy
from pathlib import Path
from typing import Any

import numpy as np
import pytest

pytest.importorskip("torch")
pytest.importorskip("sentence_transformers")

import torch
import transformers

from rag_rerank_plugins import ModelPool, ModelSpec
from rag_rerank_plugins.backends import _cpu_attention, _cpu_sdpa
from rag_rerank_plugins.backends._cpu_packed import PACK_FROM_KEYS
from rag_rerank_plugins.backends._cpu_sdpa import PER_SEQUENCE_FROM_KEYS
from rag_rerank_plugins.backends._torch_common import cpu_kernels, prune_last_layer
from rag_rerank_plugins.exceptions import ConfigurationError

KINDS = ("avx2", "avx512_bf16", "amx")
#: Token counts at every threshold of the kernels, and one either side.
THRESHOLDS = sorted(
    {
        n
        for edge in (_cpu_attention.SDPA_FROM_KEYS["amx"], PACK_FROM_KEYS, PER_SEQUENCE_FROM_KEYS)
        for n in (edge - 1, edge, edge + 1)
    }
)
#: The position table of the saved models: long inputs are truncated to fill it exactly.
POSITIONS = 272


@pytest.fixture(scope="module", autouse=True)
def _float32(float32_policy: None) -> None:
    """dtype="auto" is float32 here; bfloat16 is asked for explicitly."""


def _tokenizer(minilm_path: str, **changes: Any) -> Any:
    tok = transformers.AutoTokenizer.from_pretrained(minilm_path)
    tok.model_max_length = changes.pop("model_max_length", POSITIONS)
    for name, value in changes.items():
        setattr(tok, name, value)
    return tok


#: family -> (config class, model class, config overrides). Widths: heads x head dim.
CLASSIFIER_FAMILIES: dict[str, tuple[str, dict[str, Any]]] = {
    # 5 heads of 16: the smallest common head width, a head count that is not a power of 2.
    "bert": ("Bert", {"hidden_size": 80, "num_attention_heads": 5}),
    # padding_idx position ids (pad 0 here: the tokenizer's): positions start at 1.
    "roberta": ("Roberta", {"hidden_size": 96, "num_attention_heads": 3}),
    "xlm-roberta": ("XLMRoberta", {"hidden_size": 64, "num_attention_heads": 1}),
    # 80-wide heads (3 of them), an embedding size other than the hidden size.
    "electra": ("Electra", {"hidden_size": 240, "num_attention_heads": 3, "embedding_size": 64}),
    "distilbert": (
        "DistilBert",
        {"dim": 96, "n_heads": 1, "n_layers": 2, "hidden_dim": 130},  # one 96-wide head
    ),
    # An odd hidden size: 5 heads of 15.
    "albert": ("Albert", {"hidden_size": 75, "num_attention_heads": 5, "embedding_size": 32}),
    "deberta-v2": ("DebertaV2", {"hidden_size": 64, "num_attention_heads": 2}),
    # Mean pooling: ModernBERT's head reads every position (the pruned layer must not apply).
    "modernbert": (
        "ModernBert",
        {
            "hidden_size": 64,
            "num_attention_heads": 2,
            "classifier_pooling": "mean",
            "global_attn_every_n_layers": 2,
            "local_attention": 16,
        },
    ),
    "mpnet": ("MPNet", {"hidden_size": 64, "num_attention_heads": 4}),
}


def _config(prefix: str, tok: Any, overrides: dict[str, Any], **extra: Any) -> Any:
    special = {
        "pad_token_id": tok.pad_token_id,
        "bos_token_id": tok.cls_token_id,
        "eos_token_id": tok.sep_token_id,
        "cls_token_id": tok.cls_token_id,
        "sep_token_id": tok.sep_token_id,
    }
    cls = getattr(transformers, f"{prefix}Config")
    accepted = set(cls().to_dict())
    base = {
        "vocab_size": tok.vocab_size,
        "num_hidden_layers": 2,
        "intermediate_size": 2 * overrides.get("hidden_size", 64) + 3,
        "max_position_embeddings": POSITIONS,
        "num_labels": 1,
        "hidden_act": "gelu",
        "initializer_range": 0.1,  # wider than trained models' 0.02: scores spread out
    }
    if prefix in ("Roberta", "XLMRoberta"):
        # Positions count from padding_idx + 1: the table holds POSITIONS tokens.
        base["max_position_embeddings"] = POSITIONS + tok.pad_token_id + 1
    elif prefix == "MPNet":  # the same, with padding_idx 1 whatever the pad token
        base["max_position_embeddings"] = POSITIONS + 2
    values = {**base, **overrides, **extra}
    values.update({k: v for k, v in special.items() if k in accepted or k == "pad_token_id"})
    return cls(**values)


def _save_classifier(path: Path, family: str, minilm_path: str, seed: int = 0, **extra: Any) -> str:
    prefix, overrides = CLASSIFIER_FAMILIES[family]
    tok = _tokenizer(minilm_path)
    config = _config(prefix, tok, overrides, **extra)
    torch.manual_seed(seed)
    model = getattr(transformers, f"{prefix}ForSequenceClassification")(config)
    with torch.no_grad():  # a head wide enough that the scores spread out
        for name, param in model.named_parameters():
            if "classifier" in name and param.dim() == 2:
                param.normal_(0.0, 0.5)
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return str(path)


def _words(n: int) -> str:
    """n word-piece tokens with the packaged tokenizer (one per word)."""
    vocab = ("cell", "energy", "light", "plant", "water", "river", "city", "house")
    return " ".join(vocab[i % len(vocab)] for i in range(n))


def hostile_pairs() -> list[tuple[str, str]]:
    """Pairs whose encodings ([CLS] q [SEP] p [SEP]) have every threshold's token count and
    +-1, the position table filled (and passed: truncated), 3 tokens, and twins."""
    counts = [4, 5, *THRESHOLDS, POSITIONS, POSITIONS + 40]  # 4: an empty passage, 3 tokens
    pairs = [("what", _words(n - 4)) for n in counts]
    pairs += [("what", _words(60))] * 3  # identical items
    return pairs


def _ce_spec(path: str, **options: Any) -> ModelSpec:
    """Raw logits (predict's sigmoid would squeeze random models' scores together)."""
    dtype = options.pop("dtype", "float32")
    options = {"score_mode": "raw", **options}
    return ModelSpec(
        path, backend="cross-encoder", device="cpu", dtype=dtype, options=tuple(options.items())
    )


def _predict(path: str, pairs: list[tuple[str, str]], **kwargs: Any) -> np.ndarray:
    """The reference: stock ``CrossEncoder.predict`` in float32, raw logits."""
    from sentence_transformers import CrossEncoder

    model = CrossEncoder(path, device="cpu", activation_fn=torch.nn.Identity(), **kwargs)
    return np.asarray(model.predict(pairs, batch_size=8, show_progress_bar=False))


# -- every classifier family, every CPU kind, against CrossEncoder.predict -----------------------


@pytest.fixture(scope="module")
def classifiers(tmp_path_factory: pytest.TempPathFactory, minilm_path: str) -> dict[str, str]:
    root = tmp_path_factory.mktemp("hostile-ce")
    return {
        family: _save_classifier(root / family, family, minilm_path, seed=i)
        for i, family in enumerate(CLASSIFIER_FAMILIES)
    }


@pytest.mark.parametrize("family", sorted(CLASSIFIER_FAMILIES))
def test_every_family_scores_like_predict_on_every_cpu_kind(
    family: str, classifiers: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    path = classifiers[family]
    pairs = hostile_pairs()
    want = _predict(path, pairs)
    assert np.ptp(want) > 1e-2  # the scores differ: a wrong kernel would show
    for kind in KINDS:
        monkeypatch.setenv("RAG_RERANK_CPU_KIND", kind)
        pool = ModelPool()
        try:
            got = np.asarray(pool.score_pairs(_ce_spec(path), pairs))
            # Twins alone: nothing padded, so no mask reaches the attention at all.
            twins = np.asarray(pool.score_pairs(_ce_spec(path), pairs[-3:]))
            kernels = pool.spec_stats(_ce_spec(path))["kernels"]
        finally:
            pool.clear()
        np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-5, err_msg=f"{kind}: {kernels}")
        np.testing.assert_allclose(twins, want[-3:], atol=1e-5, rtol=1e-5, err_msg=kind)
        pruned = "last layer for the first token only" in kernels
        assert pruned == (family in ("bert", "roberta", "xlm-roberta", "electra")), kernels


class PathSpy:
    """Counts which CPU attention paths ran: packed passes, per-sequence sdpa passes, calls of
    the tiled kernel's own loop."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        from rag_rerank_plugins.backends import _cpu_packed

        self.packed = self.per_sequence = self.tiled = 0
        real_packable, real_cut = _cpu_packed._packable, _cpu_sdpa._per_sequence_sdpa
        real_bias = _cpu_attention._cached_bias

        def packable(*args: Any) -> Any:
            packing = real_packable(*args)
            self.packed += packing is not None
            return packing

        def cut(*args: Any) -> Any:
            self.per_sequence += 1
            return real_cut(*args)

        def bias(*args: Any) -> Any:  # called once per tiled-kernel call
            self.tiled += 1
            return real_bias(*args)

        monkeypatch.setattr(_cpu_packed, "_packable", packable)
        monkeypatch.setattr(_cpu_sdpa, "_per_sequence_sdpa", cut)
        monkeypatch.setattr(_cpu_attention, "_cached_bias", bias)


def test_bert_runs_every_path_and_a_batch_of_one_at_each_threshold(
    classifiers: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each threshold pair alone (a batch of one, padded only to its bucket) and all of them in
    one request; the kinds with torch's sdpa for long passes (amx, avx512_bf16) really run
    packed rows and per-sequence passes, avx2 the tiled kernel at every length."""
    path = classifiers["bert"]
    pairs = hostile_pairs()
    want = _predict(path, pairs)
    for kind in KINDS:
        monkeypatch.setenv("RAG_RERANK_CPU_KIND", kind)
        spy = PathSpy(monkeypatch)
        pool = ModelPool()
        try:
            together = np.asarray(pool.score_pairs(_ce_spec(path), pairs))
            alone = np.asarray([pool.score_pairs(_ce_spec(path), [pair])[0] for pair in pairs])
            unpruned = np.asarray(pool.score_pairs(_ce_spec(path, prune_last_layer=False), pairs))
        finally:
            pool.clear()
        for got in (together, alone, unpruned):
            np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-5, err_msg=kind)
        assert spy.tiled > 0, kind
        if kind in _cpu_attention.SDPA_FROM_KEYS:
            assert spy.packed > 0, "no pass ran on packed rows"
        else:
            assert spy.packed == spy.per_sequence == 0, kind


def test_bfloat16_on_every_cpu_kind_holds_the_quality_bound(
    real_ce_path: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """bfloat16 (real MiniLM weights) against stock float32 predict, on the hostile lengths: max
    error <= 2 % of the score range (docs/cpu-kernels.md), and every two pairs whose reference
    scores differ by more than two BF16 steps of the logit keep their order. (These repetitive
    passages score within one BF16 step of each other in places, so a rank correlation, the
    other half of the documented bound on SciFact, would measure the logit's rounding here.)"""
    pairs = [(q, p) for q in ("what", "energy of light") for _, p in hostile_pairs()[:-3]]
    want = _predict(real_ce_path, pairs)
    spread = float(np.ptp(want))
    apart = 2 * 2.0**-7 * float(np.abs(want).max())  # two BF16 steps at the largest logit
    for kind in KINDS:
        monkeypatch.setenv("RAG_RERANK_CPU_KIND", kind)
        pool = ModelPool()
        try:
            got = np.asarray(pool.score_pairs(_ce_spec(real_ce_path, dtype="bfloat16"), pairs))
        finally:
            pool.clear()
        error = float(np.abs(got - want).max()) / spread
        assert error <= 0.02, (kind, error)
        for i in range(len(pairs)):
            for j in range(len(pairs)):
                if want[i] - want[j] > apart:
                    assert got[i] >= got[j], (kind, pairs[i][1][:20], pairs[j][1][:20])


# -- embedders: every pooling mode reads the rows the kernels leave ----------------------------

POOLING = ("cls", "max", "mean", "mean_sqrt_len_tokens", "weightedmean", "lasttoken")


def _save_embedder(path: Path, encoder: str, normalize: bool) -> str:
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.base.modules import Normalize, Transformer
    from sentence_transformers.sentence_transformer.modules import Pooling

    transformer = Transformer(encoder, max_seq_length=POSITIONS)
    width = transformer.get_embedding_dimension()
    modules = [transformer, Pooling(width, pooling_mode=POOLING)]
    if normalize:
        modules.append(Normalize())
    SentenceTransformer(modules=modules, device="cpu").save(str(path))
    return str(path)


def hostile_texts() -> list[str]:
    counts = [2, 3, *THRESHOLDS, POSITIONS, POSITIONS + 40]
    return ["", "energy", *(_words(n - 2) for n in counts[2:])] + [_words(70)] * 3


@pytest.mark.parametrize("family", ["bert", "xlm-roberta", "modernbert", "distilbert"])
def test_every_pooling_mode_embeds_like_encode_on_every_cpu_kind(
    family: str,
    classifiers: dict[str, str],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Max pooling reads every padding row the packed layout and the per-sequence passes leave
    (as -inf after the mask); cls, mean, weighted mean and last-token pooling read others."""
    from sentence_transformers import SentenceTransformer

    path = _save_embedder(tmp_path / family, classifiers[family], normalize=family == "bert")
    texts = hostile_texts()
    want = SentenceTransformer(path, device="cpu").encode(texts, batch_size=8)
    for kind in KINDS:
        monkeypatch.setenv("RAG_RERANK_CPU_KIND", kind)
        spec = ModelSpec(path, backend="sentence-transformers", device="cpu", dtype="float32")
        pool = ModelPool()
        try:
            together = np.asarray(pool.embed(spec, texts))
            alone = np.asarray([pool.embed(spec, [text])[0] for text in texts[::4]])
        finally:
            pool.clear()
        np.testing.assert_allclose(together, want, atol=1e-5, rtol=1e-5, err_msg=kind)
        np.testing.assert_allclose(alone, want[::4], atol=1e-5, rtol=1e-5, err_msg=kind)


# -- models our kernels do not cover: transformers' own functions, identical results -----------


def _bidirectional_gemma(path: Path, minilm_path: str) -> str:
    """EmbeddingGemma's shape in small: a bidirectional Gemma 3 with 3 query heads sharing one
    key/value head, sliding-window and full layers."""
    tok = _tokenizer(minilm_path)
    config = transformers.Gemma3TextConfig(
        vocab_size=tok.vocab_size,
        hidden_size=96,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=3,
        num_key_value_heads=1,
        head_dim=32,
        max_position_embeddings=POSITIONS,
        sliding_window=16,
        layer_types=["sliding_attention", "full_attention"],
        use_bidirectional_attention=True,
        pad_token_id=tok.pad_token_id,
        bos_token_id=tok.cls_token_id,
        eos_token_id=tok.sep_token_id,
    )
    torch.manual_seed(0)
    encoder = path / "encoder"
    transformers.Gemma3TextModel(config).save_pretrained(encoder)
    tok.save_pretrained(encoder)
    return _save_embedder(path / "st", str(encoder), normalize=True)


def test_grouped_query_encoders_keep_transformers_attention(
    tmp_path: Path, minilm_path: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A bidirectional encoder with fewer key/value heads than query heads (EmbeddingGemma) used
    to crash on every pass ("shape '[18, 320, 16]' is invalid ..."): our kernels assume one key
    head per query head. It keeps transformers' sdpa, with encode's vectors."""
    from sentence_transformers import SentenceTransformer

    path = _bidirectional_gemma(tmp_path, minilm_path)
    texts = hostile_texts()
    want = SentenceTransformer(path, device="cpu").encode(texts, batch_size=8)
    spec = ModelSpec(path, backend="sentence-transformers", device="cpu", dtype="float32")
    for kind in KINDS:
        monkeypatch.setenv("RAG_RERANK_CPU_KIND", kind)
        pool = ModelPool()
        try:
            got = np.asarray(pool.embed(spec, texts))
            kernels = pool.spec_stats(spec)["kernels"]
        finally:
            pool.clear()
        np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-5, err_msg=kind)
        assert "attention" not in kernels, kernels  # linears packed, attention left alone


def _t5_embedder(path: Path, minilm_path: str) -> str:
    """sentence-t5 / GTR's shape in small: sentence-transformers loads a T5 config as
    ``T5EncoderModel`` (which sets ``is_encoder_decoder=False`` on it), whose attention adds a
    relative-position bias and whose feed-forward block reads ``self.wo.weight``."""
    tok = _tokenizer(minilm_path)
    config = transformers.T5Config(
        vocab_size=tok.vocab_size,
        d_model=96,
        d_kv=32,
        d_ff=160,
        num_layers=2,
        num_heads=3,
        pad_token_id=tok.pad_token_id,
        decoder_start_token_id=tok.pad_token_id,
    )
    torch.manual_seed(0)
    encoder = path / "encoder"
    transformers.T5EncoderModel(config).save_pretrained(encoder)
    tok.save_pretrained(encoder)
    return _save_embedder(path / "st", str(encoder), normalize=False)


def test_t5_encoders_embed_like_encode(
    tmp_path: Path, minilm_path: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A T5 embedder failed every pass ("'PackedLinear' object has no attribute 'weight'": its
    feed-forward casts to ``self.wo.weight.dtype``); with that layer left unpacked, its vectors
    were off by up to 0.2 (our attention dropped T5's relative-position bias). Now: encode's
    vectors, the layers whose weights the model reads left as ``nn.Linear``, attention left to
    transformers."""
    from sentence_transformers import SentenceTransformer

    path = _t5_embedder(tmp_path, minilm_path)
    texts = hostile_texts()
    want = SentenceTransformer(path, device="cpu").encode(texts, batch_size=8)
    spec = ModelSpec(path, backend="sentence-transformers", device="cpu", dtype="float32")
    for kind in KINDS:
        monkeypatch.setenv("RAG_RERANK_CPU_KIND", kind)
        pool = ModelPool()
        try:
            got = np.asarray(pool.embed(spec, texts))
            kernels = pool.spec_stats(spec)["kernels"]
        finally:
            pool.clear()
        np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-5, err_msg=kind)
        # q, k, v, o and wi of both layers; the two wo layers stay nn.Linear.
        assert kernels == "10 packed oneDNN linear layers", kernels


class _GroupedModule(torch.nn.Module):
    is_causal = False
    num_key_value_groups = 3


@pytest.mark.parametrize("case", ["grouped-query", "position-bias"])
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("length", [5, 48, 300])
def test_calls_our_kernels_cannot_compute_go_to_transformers_sdpa(
    case: str, kind: str, length: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Whatever model reaches the attention function: grouped-query heads (they crashed) and
    extra score terms (a relative-position bias, as T5-style encoders pass: it was dropped,
    silently) give transformers' sdpa result, on the tiled kernel's lengths and on the sdpa /
    per-sequence ones."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    monkeypatch.setenv("RAG_RERANK_CPU_KIND", kind)
    module = _GroupedModule().eval()
    gen = torch.Generator().manual_seed(length)
    query = torch.randn(2, 6, length, 16, generator=gen)
    mask = (torch.arange(length) < torch.tensor([[length], [length // 3 + 1]]))[:, None, None, :]
    extra: dict[str, Any] = {}
    if case == "grouped-query":
        key, value = (torch.randn(2, 2, length, 16, generator=gen) for _ in range(2))
    else:
        module.num_key_value_groups = 1
        key, value = (torch.randn(2, 6, length, 16, generator=gen) for _ in range(2))
        extra["position_bias"] = torch.randn(1, 6, length, length, generator=gen)
    want, _ = sdpa_attention_forward(module, query, key, value, mask, scaling=0.25, **extra)
    got, _ = _cpu_attention.tiled_attention(module, query, key, value, mask, scaling=0.25, **extra)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


# -- the overrides, never the host ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "native"),
    [("1", True), (" TRUE ", True), ("on", True), ("yes", True), ("0", False), ("off", False)],
)
def test_the_bf16_override_reads_every_on_and_off_spelling(
    value: str, native: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    from rag_rerank_plugins.policy import cpu_has_native_bf16, decide_dtype

    monkeypatch.setenv("RAG_RERANK_CPU_BF16", value)
    cpu_has_native_bf16.cache_clear()
    try:
        assert cpu_has_native_bf16() is native
        assert decide_dtype("auto", "cpu").dtype == ("bfloat16" if native else "float32")
    finally:
        cpu_has_native_bf16.cache_clear()


def test_an_empty_bf16_override_reads_the_cpu_and_garbage_is_refused(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """``RAG_RERANK_CPU_BF16=`` (a compose file's blank) read as "no BF16": float32 on a BF16
    host. It now means unset, as an empty ``RAG_RERANK_CPU_KIND`` does; a typo is an error."""
    from rag_rerank_plugins import _cpu
    from rag_rerank_plugins.policy import cpu_has_native_bf16

    for flags, native in ((frozenset({"avx2", "amx_bf16"}), True), (frozenset({"avx2"}), False)):
        monkeypatch.setattr(_cpu, "_cpu_flags", lambda flags=flags: flags)
        for blank in ("", "  "):
            monkeypatch.setenv("RAG_RERANK_CPU_BF16", blank)
            cpu_has_native_bf16.cache_clear()
            assert cpu_has_native_bf16() is native, (flags, blank)
    monkeypatch.setenv("RAG_RERANK_CPU_BF16", "maybe")
    cpu_has_native_bf16.cache_clear()
    try:
        with pytest.raises(ConfigurationError, match="RAG_RERANK_CPU_BF16 must be 1 or 0"):
            cpu_has_native_bf16()
    finally:
        cpu_has_native_bf16.cache_clear()


# -- concurrent loads with different kernel settings -------------------------------------------


@pytest.mark.parametrize("kind", ["avx2", "amx"])
def test_models_loading_at_once_with_different_settings_keep_their_own_kernels(
    kind: str, classifiers: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Six loads of two families at once, kernels on / off / unpruned: each model keeps its own
    switches (stats) and every one scores like predict."""
    monkeypatch.setenv("RAG_RERANK_CPU_KIND", kind)
    pairs = hostile_pairs()
    settings: list[dict[str, Any]] = [
        {},
        {"cpu_kernels": False},
        {"prune_last_layer": False},
        {"cpu_kernels": False, "prune_last_layer": False},
    ]
    specs = [
        (family, _ce_spec(classifiers[family], **options))
        for family in ("bert", "xlm-roberta")
        for options in settings
    ]
    want = {family: _predict(classifiers[family], pairs) for family in ("bert", "xlm-roberta")}
    pool = ModelPool()
    try:
        with cf.ThreadPoolExecutor(len(specs)) as ex:
            results = list(ex.map(lambda item: pool.score_pairs(item[1], pairs), specs))
        for (family, spec), got in zip(specs, results, strict=True):
            np.testing.assert_allclose(got, want[family], atol=1e-5, rtol=1e-5, err_msg=str(spec))
            kernels = pool.spec_stats(spec)["kernels"]
            options = spec.options_dict
            on, prune = options.get("cpu_kernels", True), options.get("prune_last_layer", True)
            assert ("packed oneDNN" in kernels) == on, (options, kernels)
            assert ("first token only" in kernels) == prune, (options, kernels)
    finally:
        pool.clear()


# -- model_kwargs that change what the model records or runs -----------------------------------

RECORDING: list[dict[str, Any]] = [
    {"config_kwargs": {"output_hidden_states": True}},
    {"config_kwargs": {"output_attentions": True}},
    {"config_kwargs": {"output_hidden_states": True, "output_attentions": True}},
    {"model_kwargs": {"attn_implementation": "eager"}},
]


@pytest.mark.parametrize("kind", ["avx2", "amx"])
@pytest.mark.parametrize(
    "kwargs", RECORDING, ids=lambda kw: "+".join(k for v in kw.values() for k in v)
)
def test_recorded_outputs_and_other_attention_keep_predicts_scores(
    kind: str,
    kwargs: dict[str, Any],
    classifiers: dict[str, str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Hidden states or attentions recorded (the full last layer, padded passes) and eager
    attention (our linears, transformers' attention): the scores of predict with the same
    ``config_kwargs`` / ``model_kwargs``."""
    monkeypatch.setenv("RAG_RERANK_CPU_KIND", kind)
    path = classifiers["xlm-roberta"]
    pairs = hostile_pairs()
    want = _predict(path, pairs, **copy.deepcopy(kwargs))
    spy = PathSpy(monkeypatch)
    pool = ModelPool()
    try:
        spec = _ce_spec(path, **copy.deepcopy(kwargs))
        got = pool.score_pairs(spec, pairs)
        kernels = pool.spec_stats(spec)["kernels"]
    finally:
        pool.clear()
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-5, err_msg=kernels)
    if "config_kwargs" in kwargs:
        assert spy.packed == 0, "a recording forward ran on packed rows"
        assert "first token only" in kernels  # switched on, and off for these calls
    else:
        assert "packed oneDNN" in kernels, kernels
        assert "tiled" not in kernels, kernels


def test_left_padding_tokenizers_get_transformers_results(
    tmp_path: Path, minilm_path: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A tokenizer that pads on the left: the pass is right-aligned before the model
    (``_torch_common.right_aligned``: a BERT's absolute positions would move with each row's
    padding, as they do in predict itself, by 2.9 on this model), so the kernels see a prefix
    mask and give transformers' own kernels' scores on the same passes."""
    path = _save_classifier(tmp_path / "left", "bert", minilm_path, seed=3)
    tok = transformers.AutoTokenizer.from_pretrained(path)
    tok.padding_side = "left"
    tok.save_pretrained(path)
    pairs = hostile_pairs()
    for kind in KINDS:
        monkeypatch.setenv("RAG_RERANK_CPU_KIND", kind)
        pool = ModelPool()
        try:
            want = pool.score_pairs(
                _ce_spec(path, cpu_kernels=False, prune_last_layer=False), pairs
            )
            got = pool.score_pairs(_ce_spec(path), pairs)
        finally:
            pool.clear()
        np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-5, err_msg=kind)


# -- transformers' forward, on shapes no tokenizer makes -----------------------------------------


def _token_batch(lengths: list[int], total: int, vocab: int, pad: int, types: int | None) -> Any:
    gen = torch.Generator().manual_seed(total + len(lengths))
    ids = torch.randint(5, vocab, (len(lengths), total), generator=gen)
    mask = (torch.arange(total)[None, :] < torch.tensor(lengths)[:, None]).long()
    batch = {"input_ids": ids * mask + pad * (1 - mask), "attention_mask": mask}
    if types is not None:
        batch["token_type_ids"] = torch.full_like(ids, types)
    return batch


#: (lengths, padded length): one token, two, a single full row, every threshold +-1 next to a
#: one-token item, the position table filled next to one token, identical rows.
SHAPES = [
    ([1], 1),
    ([2, 1], 2),
    ([5, 5, 5], 5),
    *(([n, 1], n) for n in THRESHOLDS),
    ([100, 100, 100], 100),
    ([POSITIONS, 1, POSITIONS - 1], POSITIONS),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("family", ["bert", "xlm-roberta", "electra", "distilbert", "albert"])
def test_forward_equals_transformers_on_shapes_no_tokenizer_makes(
    family: str, dtype: Any, minilm_path: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Length 1 and 2, token type ids all 1, and the thresholds, straight into the model: our
    kernels (pruned last layer included) against the same weights on transformers' sdpa, in
    the same dtype (float32 to 1e-5; bfloat16 to a few rounding steps of its logits)."""
    prefix, overrides = CLASSIFIER_FAMILIES[family]
    tok = _tokenizer(minilm_path)
    config = _config(prefix, tok, overrides, vocab_size=211, type_vocab_size=2)
    torch.manual_seed(1)
    cls = getattr(transformers, f"{prefix}ForSequenceClassification")
    reference = cls._from_config(config, attn_implementation="sdpa").eval().to(dtype)
    tolerance = 1e-5 if dtype == torch.float32 else 0.08
    for kind in KINDS:
        monkeypatch.setenv("RAG_RERANK_CPU_KIND", kind)
        ours = copy.deepcopy(reference)
        assert "attention" in cpu_kernels(ours, "cpu")
        prune_last_layer(ours, True)
        types = None if family == "distilbert" else 1  # the tokenizers' passes carry zeros
        for lengths, total in SHAPES:
            batch = _token_batch(lengths, total, 211, tok.pad_token_id, types)
            with torch.inference_mode():
                want = reference(**batch).logits.float()
                got = ours(**batch).logits.float()
            assert bool(torch.isfinite(got).all())
            torch.testing.assert_close(
                got, want, atol=tolerance, rtol=tolerance, msg=f"{kind} {lengths}"
            )
