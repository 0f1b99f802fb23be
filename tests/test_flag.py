"""FlagEmbedding backends equal FlagEmbedding's own results, load once, and never cast per call."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

from rag_rerank_plugins import ConfigurationError, ModelPool, ModelSpec, RagRerankError
from rag_rerank_plugins.engine_config import EngineConfig

pytest.importorskip("FlagEmbedding")

QUERY = "how do plants make energy?"


def build_xlmr_reranker(path: Path, corpus: list[str]) -> str:
    """A tiny random ``XLMRobertaForSequenceClassification`` with a real XLM-R-style tokenizer.

    bge-reranker-v2-m3 is an XLM-R classifier. Its sentencepiece model cannot be downloaded here,
    so a small Unigram tokenizer is trained on ``corpus`` and wrapped as an XLM-R fast tokenizer
    (``<s> q </s></s> p </s>`` pairs, no token type ids): the same code paths as the real model.
    """
    import torch
    from tokenizers import SentencePieceUnigramTokenizer
    from transformers import (
        XLMRobertaConfig,
        XLMRobertaForSequenceClassification,
        XLMRobertaTokenizerFast,
    )

    specials = ["<s>", "<pad>", "</s>", "<unk>", "<mask>"]
    unigram = SentencePieceUnigramTokenizer()
    unigram.train_from_iterator(
        corpus, vocab_size=600, special_tokens=specials, unk_token="<unk>", show_progress=False
    )
    tok = XLMRobertaTokenizerFast(
        tokenizer_object=unigram._tokenizer,
        bos_token="<s>",
        eos_token="</s>",
        sep_token="</s>",
        cls_token="<s>",
        unk_token="<unk>",
        pad_token="<pad>",
        mask_token="<mask>",
        model_max_length=512,
    )
    config = XLMRobertaConfig(
        vocab_size=len(tok),
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=128,
        max_position_embeddings=514,
        pad_token_id=tok.pad_token_id,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        num_labels=1,
        initializer_range=0.2,  # spread the random scores so ordering is meaningful
    )
    torch.manual_seed(3)
    XLMRobertaForSequenceClassification(config).save_pretrained(path)
    tok.save_pretrained(path)
    return str(path)


@pytest.fixture(scope="session")
def xlmr_path(tmp_path_factory: pytest.TempPathFactory, repo_root: Path) -> str:
    corpus = (repo_root / "src/rag_rerank_plugins/data/sample_corpus.jsonl").read_text().split("\n")
    return build_xlmr_reranker(tmp_path_factory.mktemp("models") / "tiny-xlmr", corpus * 3)


@pytest.fixture(scope="session")
def flag_reference(xlmr_path: str):
    from FlagEmbedding import FlagReranker

    return FlagReranker(xlmr_path, use_fp16=False, devices=["cpu"])


@pytest.fixture
def flag_spec(xlmr_path: str) -> ModelSpec:
    return ModelSpec(xlmr_path, backend="flag-reranker", device="cpu", dtype="float32")


def _pairs(passages: list[str]) -> list[tuple[str, str]]:
    long = " ".join(passages) * 20  # longer than 512 tokens: truncation must match too
    return [(QUERY, p) for p in [*passages, long]]


def test_flag_reranker_equals_compute_score(
    pool: ModelPool, flag_spec: ModelSpec, flag_reference, passages: list[str]
) -> None:
    pairs = _pairs(passages)
    raw_spec = flag_spec.with_options(options={"score_mode": "raw"})
    ours_sigmoid = pool.score_pairs(flag_spec, pairs, batch_size=3)  # default score_mode
    ours_raw = pool.score_pairs(raw_spec, pairs, batch_size=5)
    ref_raw = flag_reference.compute_score(pairs)
    ref_sigmoid = flag_reference.compute_score(pairs, normalize=True)
    np.testing.assert_allclose(ours_raw, ref_raw, atol=1e-5, rtol=0)
    np.testing.assert_allclose(ours_sigmoid, ref_sigmoid, atol=1e-5, rtol=0)
    assert list(np.argsort(ours_raw, kind="stable")) == list(np.argsort(ref_raw, kind="stable"))
    assert list(np.argsort(ours_sigmoid)) == list(np.argsort(ours_raw))
    assert np.ptp(ours_raw) > 1e-2, "the tiny model must separate passages"
    # Those scores came from our CPU kernels and the pruned last layer (the defaults) ...
    kernels = pool.spec_stats(flag_spec)["kernels"]
    assert kernels.startswith("tiled attention"), kernels
    assert kernels.endswith("last layer for the first token only"), kernels
    # ... and without them they are the same.
    plain = raw_spec.with_options(
        options={"score_mode": "raw", "cpu_kernels": False, "prune_last_layer": False}
    )
    np.testing.assert_allclose(pool.score_pairs(plain, pairs), ref_raw, atol=1e-5, rtol=0)
    assert pool.spec_stats(plain)["kernels"] == "transformers' kernels (cpu_kernels=False)"


def test_passes_run_two_phase_on_parallel_cpu_workers(
    flag_spec: ModelSpec, flag_reference, passages: list[str]
) -> None:
    """Tokenising ahead of the device and one pass per core, as for the cross-encoder backend:
    the scores stay compute_score's whatever the passes (2 workers, passes of 2 pairs)."""
    pairs = _pairs(passages)
    pool = ModelPool(config=EngineConfig(cpu_workers=2, max_batch_size=2))
    model = pool.get(flag_spec).model
    assert model.parallel_forward
    got = pool.score_pairs(flag_spec, pairs)
    want = flag_reference.compute_score(pairs, normalize=True)
    np.testing.assert_allclose(got, want, atol=1e-5)
    # The one-shot path runs the same phases.
    np.testing.assert_allclose(model.score_pairs(pairs, 3), want, atol=1e-5)
    stats = pool.spec_stats(flag_spec)
    assert stats["forward_passes"] >= len(pairs) // 2
    assert stats["padding_ratio"] is not None  # prepared batches report their real tokens
    pool.clear()


def test_32_threads_load_a_flag_spec_once_and_agree(
    pool: ModelPool, flag_spec: ModelSpec, passages: list[str]
) -> None:
    pairs = _pairs(passages)
    barrier = threading.Barrier(32)

    def call(_: int) -> list[float]:
        barrier.wait()
        return pool.score_pairs(flag_spec, pairs, batch_size=4)

    with ThreadPoolExecutor(32) as ex:
        results = list(ex.map(call, range(32)))
    sequential = pool.score_pairs(flag_spec, pairs, batch_size=4)
    for result in results:
        np.testing.assert_allclose(result, sequential, atol=1e-6, rtol=0)
    stats = pool.spec_stats(flag_spec)
    assert stats["loads"] == 1
    assert stats["errors"] == 0


def test_weights_are_cast_once_at_load_never_per_call(pool: ModelPool, xlmr_path: str) -> None:
    import torch

    spec = ModelSpec(xlmr_path, backend="flag-reranker", device="cpu", dtype="bfloat16")
    model = pool.get(spec).model
    hf_model = model.model
    assert next(hf_model.parameters()).dtype == torch.bfloat16
    assert not hf_model.training
    assert not any(p.requires_grad for p in hf_model.parameters())
    assert model._flag.target_devices == ["cpu"]  # one device, never every visible GPU

    def forbidden(*_args, **_kwargs):
        raise AssertionError("the model was cast or moved during a call")

    hf_model.half = hf_model.float = hf_model.to = forbidden  # type: ignore[method-assign]
    scores = pool.score_pairs(spec, [(QUERY, "plants use light"), (QUERY, "cats sleep")])
    assert all(isinstance(s, float) and 0.0 < s < 1.0 for s in scores)


def test_score_mode_means_the_same_across_backends(
    pool: ModelPool, tiny_ce_path: str, direct_cross_encoder, passages: list[str]
) -> None:
    """FlagReranker loads a BERT classifier too: both backends score the same model."""
    import torch

    pairs = [(QUERY, p) for p in passages]
    scores = {}
    for backend in ("cross-encoder", "flag-reranker"):
        for mode in ("raw", "sigmoid"):
            spec = ModelSpec(
                tiny_ce_path,
                backend=backend,
                device="cpu",
                dtype="float32",
                options={"score_mode": mode},
            )
            scores[backend, mode] = pool.score_pairs(spec, pairs)
    for mode in ("raw", "sigmoid"):
        np.testing.assert_allclose(
            scores["cross-encoder", mode], scores["flag-reranker", mode], atol=1e-5
        )
    raw = np.array(scores["cross-encoder", "raw"])
    np.testing.assert_allclose(
        scores["cross-encoder", "sigmoid"], 1 / (1 + np.exp(-raw)), atol=1e-6
    )
    identity = direct_cross_encoder.predict(pairs, activation_fn=torch.nn.Identity())
    np.testing.assert_allclose(raw, identity, atol=1e-5)
    # No score_mode: cross-encoder keeps CrossEncoder.predict's default (sigmoid for 1 label).
    default = pool.score_pairs(ModelSpec(tiny_ce_path, device="cpu", dtype="float32"), pairs)
    np.testing.assert_allclose(default, direct_cross_encoder.predict(pairs), atol=1e-6)


@pytest.mark.parametrize(
    ("options", "match"),
    [
        ({"use_fp16": True}, "dtype="),
        ({"devices": ["cuda:0", "cuda:1"]}, "device="),
        ({"score_mode": "softmax"}, "score_mode"),
    ],
)
def test_bad_options_are_explicit(
    pool: ModelPool, xlmr_path: str, options: dict, match: str
) -> None:
    spec = ModelSpec(
        xlmr_path, backend="flag-reranker", device="cpu", dtype="float32", options=options
    )
    with pytest.raises(RagRerankError, match=match):
        pool.get(spec)


def test_a_query_max_length_without_room_for_the_passage_is_lowered(
    pool: ModelPool, xlmr_path: str, caplog: pytest.LogCaptureFixture
) -> None:
    """max_length=1024 capped to the 512-position table kept query_max_length=600: every query
    over ~509 tokens failed its request ("Sequence to truncate too short"). A max_length with
    no room for a query and a passage token failed every request: now refused at load."""
    long_query = " ".join(f"plants energy {i}" for i in range(400))
    spec = ModelSpec(
        xlmr_path,
        backend="flag-reranker",
        device="cpu",
        dtype="float32",
        max_length=1024,
        options={"query_max_length": 600},
    )
    with caplog.at_level("WARNING"):
        scores = pool.score_pairs(spec, [(long_query, "plants use light"), ("plants", "light")])
    assert all(0.0 <= s <= 1.0 for s in scores)
    assert "query_max_length=600 leaves no room" in caplog.text
    assert pool.get(spec).model.query_max_length < 510
    tiny = ModelSpec(xlmr_path, backend="flag-reranker", device="cpu", max_length=4)
    with pytest.raises(ConfigurationError, match="max_length=4 leaves"):
        pool.get(tiny)


@pytest.mark.parametrize(
    ("options", "match"),
    [
        ({"query_max_length": 0}, "positive int"),
        ({"query_max_length": -3}, "positive int"),
        ({"query_instruction_for_retrieval": "q: ", "query_instruction_format": "{q}{}"}, "slots"),
        ({"query_instruction_for_retrieval": "q: ", "query_instruction_format": "{}"}, "no slot"),
        ({"query_instruction_for_retrieval": 5}, "give a string"),
        ({"pooling_method": "bogus"}, "pooling_method"),
    ],
)
def test_bge_m3_bad_options_are_refused_at_load(
    pool: ModelPool, minilm_path: str, options: dict, match: str
) -> None:
    """They loaded, then failed every request deep in FlagEmbedding or torch (a format of one
    slot gave every query the same vector)."""
    spec = ModelSpec(minilm_path, backend="flag-bge-m3", device="cpu", options=options)
    with pytest.raises(ConfigurationError, match=match):
        pool.get(spec)


def test_release_does_not_copy_weights_back(pool: ModelPool, flag_spec: ModelSpec) -> None:
    model = pool.get(flag_spec).model
    flag = model._flag
    assert pool.release(flag_spec)
    assert flag.model is None  # FlagEmbedding's __del__ finds nothing to move to the CPU


# -- BGE-M3 ------------------------------------------------------------------------------------


def test_bge_m3_dense_equals_encode(pool: ModelPool, minilm_path: str, passages: list[str]) -> None:
    from FlagEmbedding import BGEM3FlagModel

    ref = BGEM3FlagModel(minilm_path, use_fp16=False, devices=["cpu"])
    spec = ModelSpec(minilm_path, backend="flag-bge-m3", device="cpu", dtype="float32")
    docs = np.array(pool.embed(spec, passages, batch_size=3))
    queries = np.array(pool.embed(spec, ["a question", QUERY], is_query=True))
    np.testing.assert_allclose(docs, ref.encode_corpus(passages)["dense_vecs"], atol=1e-5)
    np.testing.assert_allclose(
        queries, ref.encode_queries(["a question", QUERY])["dense_vecs"], atol=1e-5
    )
    np.testing.assert_allclose(np.linalg.norm(docs, axis=1), 1.0, atol=1e-5)
    assert pool.get(spec).dimension == 384
    assert pool.spec_stats(spec)["kernels"].startswith("tiled attention")


def test_bge_m3_query_instruction_and_adapter(pool: ModelPool, minilm_path: str) -> None:
    from FlagEmbedding import BGEM3FlagModel

    options = {"query_instruction_for_retrieval": "query: "}
    ref = BGEM3FlagModel(minilm_path, use_fp16=False, devices=["cpu"], **options)
    spec = ModelSpec(
        minilm_path, backend="flag-bge-m3", device="cpu", dtype="float32", options=options
    )
    ours = pool.embed(spec, [QUERY], is_query=True)
    np.testing.assert_allclose(ours, ref.encode_queries([QUERY])["dense_vecs"], atol=1e-5)
    # Both adapters: the instruction in the backend's options applies (LlamaIndex's dropped it).
    from rag_rerank_plugins.langchain import SharedEmbeddings
    from rag_rerank_plugins.llama_index import SharedEmbedding

    kw = {"model_name": minilm_path, "backend": "flag-bge-m3", "device": "cpu"}
    want = ref.encode_queries([QUERY])["dense_vecs"][0]
    lc = SharedEmbeddings(**kw, dtype="float32", model_kwargs=options, pool=pool)
    li = SharedEmbedding(**kw, dtype="float32", model_kwargs=options, pool=pool)
    np.testing.assert_allclose(lc.embed_query(QUERY), want, atol=1e-5)
    np.testing.assert_allclose(li.get_query_embedding(QUERY), want, atol=1e-5)
    # An instruction given to the adapter itself still wins, as in stock.
    own = SharedEmbedding(
        **kw, dtype="float32", model_kwargs=options, pool=pool, query_instruction="other: "
    )
    assert not np.allclose(own.get_query_embedding(QUERY), want, atol=1e-3)


# -- adapters ----------------------------------------------------------------------------------


def test_llama_index_flag_embedding_reranker_arguments(
    pool: ModelPool, xlmr_path: str, flag_reference, passages: list[str]
) -> None:
    pytest.importorskip("llama_index.core")
    from llama_index.core.schema import NodeWithScore, TextNode
    from pydantic import ValidationError

    from rag_rerank_plugins.llama_index import SharedRerankPostprocessor

    # FlagEmbeddingReranker(model=..., top_n=3, use_fp16=False) -> one changed line:
    post = SharedRerankPostprocessor(
        model=xlmr_path, top_n=3, use_fp16=False, backend="flag-reranker", pool=pool
    )
    assert post.spec.dtype == "float32"
    nodes = [NodeWithScore(node=TextNode(text=p), score=0.0) for p in passages]
    out = post.postprocess_nodes(nodes, query_str=QUERY)
    ref = flag_reference.compute_score([(QUERY, p) for p in passages])
    assert [n.node.text for n in out] == [passages[i] for i in np.argsort(ref)[::-1][:3]]
    fp16 = SharedRerankPostprocessor(model=xlmr_path, use_fp16=True, backend="flag-reranker")
    assert fp16.spec.dtype == "float16"  # the pool's policy turns it into float32 on a CPU
    with pytest.raises(ValidationError, match="contradicts"):
        SharedRerankPostprocessor(model=xlmr_path, use_fp16=True, dtype="bfloat16")


def test_langchain_compressor_selects_the_flag_backend(
    pool: ModelPool, xlmr_path: str, flag_reference, passages: list[str]
) -> None:
    pytest.importorskip("langchain_core")
    from langchain_core.documents import Document

    from rag_rerank_plugins.langchain import SharedRerankCompressor

    comp = SharedRerankCompressor(
        model=xlmr_path,
        backend="flag-reranker",
        device="cpu",
        dtype="float32",
        top_n=None,
        pool=pool,
    )
    docs = [Document(page_content=p) for p in passages]
    out = comp.compress_documents(docs, QUERY)
    ref = flag_reference.compute_score([(QUERY, p) for p in passages], normalize=True)
    np.testing.assert_allclose(
        [d.metadata["relevance_score"] for d in out], sorted(ref, reverse=True), atol=1e-5
    )
