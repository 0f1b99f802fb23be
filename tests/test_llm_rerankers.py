"""LLM rerankers: ``causal-lm-reranker`` equals the Qwen3-Reranker model card's recipe and
``flag-llm-reranker`` equals FlagEmbedding's ``compute_score`` (1e-5, FP32) on tiny random models
of the real architectures; both serve through the pool, the adapters, windows and the server."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
import pytest

from rag_rerank_plugins import ConfigurationError, ModelPool, ModelSpec, RagRerankError

pytest.importorskip("transformers")

QUERY = "how do plants make energy?"
CARD_PREFIX = (
    "<|im_start|>system\nJudge whether the Document meets the requirements based on the Query "
    'and the Instruct provided. Note that the answer can only be "yes" or "no".<|im_end|>\n'
    "<|im_start|>user\n"
)
CARD_SUFFIX = "<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n"
CARD_INSTRUCTION = "Given a web search query, retrieve relevant passages that answer the query"
MAX_LENGTH = 256  # short enough that the long passage below is truncated


def _pairs(passages: list[str]) -> list[tuple[str, str]]:
    long = " ".join(passages) * 8  # > MAX_LENGTH tokens: truncation must match too
    return [(QUERY, p) for p in [*passages, long]]


# -- tiny models of the real architectures -----------------------------------------------------


@pytest.fixture(scope="session")
def qwen_path(tmp_path_factory: pytest.TempPathFactory) -> str:
    from rag_rerank_plugins.testing import build_causal_lm_reranker

    path = tmp_path_factory.mktemp("models") / "tiny-qwen3"
    return str(build_causal_lm_reranker(path, initializer_range=0.2, seed=1))


def _gemma_tokenizer() -> Any:
    from rag_rerank_plugins.testing import train_byte_bpe_tokenizer

    return train_byte_bpe_tokenizer(
        ["<pad>", "<eos>", "<bos>", "<unk>"],
        pad_token="<pad>",
        eos_token="<eos>",
        bos_token="<bos>",
        unk_token="<unk>",
    )


def _small_shape(tok: Any, **shape: Any) -> dict[str, Any]:
    """Config arguments shared by the tiny Gemma and MiniCPM models: small, fast on 2 CPU cores,
    with weights wide enough (initializer_range) that passages get clearly different scores."""
    return {
        "vocab_size": len(tok),
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_attention_heads": 4,
        "max_position_embeddings": 1024,
        "pad_token_id": tok.pad_token_id,
        "bos_token_id": tok.bos_token_id,
        "eos_token_id": tok.eos_token_id,
        "initializer_range": 0.2,
        **shape,
    }


@pytest.fixture(scope="session")
def gemma_path(tmp_path_factory: pytest.TempPathFactory) -> str:
    """bge-reranker-v2-gemma's architecture (``GemmaForCausalLM``), 2 small layers."""
    import torch
    from transformers import GemmaConfig, GemmaForCausalLM

    tok = _gemma_tokenizer()
    config = GemmaConfig(
        **_small_shape(tok, num_hidden_layers=2, num_key_value_heads=1, head_dim=16)
    )
    torch.manual_seed(2)
    path = tmp_path_factory.mktemp("models") / "tiny-gemma"
    GemmaForCausalLM(config).save_pretrained(path)
    tok.save_pretrained(path)  # right padding, as FlagEmbedding then pads
    return str(path)


@pytest.fixture(scope="session")
def layerwise(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, Any]:
    """bge-reranker-v2-minicpm-layerwise's architecture (FlagEmbedding's own MiniCPM class, one
    score head per layer from ``start_layer``), 3 small layers; the path and the built model."""
    pytest.importorskip("FlagEmbedding")
    import torch
    from FlagEmbedding.inference.reranker.decoder_only.models.configuration_minicpm_reranker import (  # noqa: E501
        LayerWiseMiniCPMConfig,
    )

    from rag_rerank_plugins.backends.flag_llm import layerwise_model_class

    tok = _gemma_tokenizer()
    config = LayerWiseMiniCPMConfig(
        **_small_shape(
            tok,
            num_hidden_layers=3,
            num_key_value_heads=2,
            start_layer=1,  # score heads on layers 1..3 (the real model: 8..40)
            head_multi=True,
            head_type="simple",
            scale_emb=12,  # MiniCPM's scaling constants, as in the real config
            dim_model_base=256,
            scale_depth=1.4,
            tie_word_embeddings=False,
            use_cache=False,
        )
    )
    config.rope_scaling = None  # what the real model's config means (see load_layerwise_model)

    torch.manual_seed(3)
    model = layerwise_model_class()(config).eval()  # the shipped class, buildable on transformers 5
    path = tmp_path_factory.mktemp("models") / "tiny-minicpm-layerwise"
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return str(path), model


@pytest.fixture(scope="session")
def layerwise_path(layerwise: tuple[str, Any]) -> str:
    return layerwise[0]


# -- references ----------------------------------------------------------------------------------


class CardReranker:
    """The Qwen3-Reranker model card's recipe, as published (with a configurable instruction)."""

    def __init__(self, path: str, max_length: int, prefix: str = CARD_PREFIX) -> None:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.torch = torch
        self.tokenizer = AutoTokenizer.from_pretrained(path, padding_side="left")
        self.model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
        self.true_id = self.tokenizer.convert_tokens_to_ids("yes")
        self.false_id = self.tokenizer.convert_tokens_to_ids("no")
        self.max_length = max_length
        self.prefix_tokens = self.tokenizer.encode(prefix, add_special_tokens=False)
        self.suffix_tokens = self.tokenizer.encode(CARD_SUFFIX, add_special_tokens=False)

    def scores(
        self, pairs: list[tuple[str, str]], instruction: str = CARD_INSTRUCTION
    ) -> list[float]:
        texts = [f"<Instruct>: {instruction}\n<Query>: {q}\n<Document>: {d}" for q, d in pairs]
        inputs = self.tokenizer(
            texts,
            padding=False,
            truncation="longest_first",
            return_attention_mask=False,
            max_length=self.max_length - len(self.prefix_tokens) - len(self.suffix_tokens),
        )
        for i, ele in enumerate(inputs["input_ids"]):
            inputs["input_ids"][i] = self.prefix_tokens + ele + self.suffix_tokens
        inputs = self.tokenizer.pad(inputs, padding=True, return_tensors="pt")
        with self.torch.no_grad():
            logits = self.model(**inputs).logits[:, -1, :]
        pair = self.torch.stack([logits[:, self.false_id], logits[:, self.true_id]], dim=1)
        return self.torch.nn.functional.log_softmax(pair, dim=1)[:, 1].exp().tolist()


@pytest.fixture(scope="session")
def card(qwen_path: str) -> CardReranker:
    return CardReranker(qwen_path, MAX_LENGTH)


@pytest.fixture(scope="session")
def flag_gemma(gemma_path: str) -> Any:
    pytest.importorskip("FlagEmbedding")
    from FlagEmbedding import FlagLLMReranker

    return FlagLLMReranker(gemma_path, use_fp16=False, devices=["cpu"], batch_size=3)


@pytest.fixture(scope="session")
def flag_layerwise(layerwise_path: str) -> Any:
    """FlagEmbedding's ``LayerWiseFlagLLMReranker``, its model loaded by our fixed loader (the
    shipped class does not load under transformers 5); ``compute_score`` is FlagEmbedding's."""
    import FlagEmbedding.inference.reranker.decoder_only.layerwise as layerwise_module
    from FlagEmbedding import LayerWiseFlagLLMReranker

    from rag_rerank_plugins.backends.flag_llm import load_layerwise_model

    class FixedLoading:
        from_pretrained = staticmethod(load_layerwise_model)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(layerwise_module, "LayerWiseMiniCPMForCausalLM", FixedLoading)
        reference = LayerWiseFlagLLMReranker(
            layerwise_path, use_fp16=False, devices=["cpu"], batch_size=3
        )
    return reference


def qwen_spec(path: str, **options: Any) -> ModelSpec:
    return ModelSpec(
        path,
        backend="causal-lm-reranker",
        device="cpu",
        dtype="float32",
        max_length=MAX_LENGTH,
        options=options,
    )


def flag_spec(path: str, **options: Any) -> ModelSpec:
    return ModelSpec(
        path, backend="flag-llm-reranker", device="cpu", dtype="float32", options=options
    )


# -- equivalence ---------------------------------------------------------------------------------


def test_causal_lm_reranker_equals_the_model_card_recipe(
    pool: ModelPool, qwen_path: str, card: CardReranker, passages: list[str]
) -> None:
    pairs = _pairs(passages)
    ours = pool.score_pairs(qwen_spec(qwen_path), pairs, batch_size=3)
    ref = card.scores(pairs)  # one batch, the model card's left padding without positions
    np.testing.assert_allclose(ours, ref, atol=1e-5, rtol=0)
    assert np.ptp(ref) > 1e-2, "the tiny model must separate passages"
    raw = pool.score_pairs(qwen_spec(qwen_path, score_mode="raw"), pairs, batch_size=5)
    ref_p = np.array(ref)
    np.testing.assert_allclose(raw, np.log(ref_p / (1 - ref_p)), atol=1e-4, rtol=0)
    stats = pool.spec_stats(qwen_spec(qwen_path))
    assert stats["loads"] == 1
    assert stats["errors"] == 0


def test_causal_lm_prompt_slots_are_configurable(
    pool: ModelPool, qwen_path: str, passages: list[str]
) -> None:
    system = "Answer yes when the passage is about plants."
    instruction = "Find passages about biology"
    pairs = _pairs(passages)
    ours = pool.score_pairs(
        qwen_spec(qwen_path, system=system, instruction=instruction), pairs, batch_size=4
    )
    prefix = CARD_PREFIX.replace(CARD_PREFIX.split("\n")[1].split("<|im_end|>")[0], system)
    ref = CardReranker(qwen_path, MAX_LENGTH, prefix=prefix).scores(pairs, instruction)
    np.testing.assert_allclose(ours, ref, atol=1e-5, rtol=0)
    default = pool.score_pairs(qwen_spec(qwen_path), pairs)
    assert np.max(np.abs(np.array(default) - np.array(ours))) > 1e-4, "the prompt was ignored"


def test_flag_llm_reranker_equals_compute_score(
    pool: ModelPool, gemma_path: str, flag_gemma: Any, passages: list[str]
) -> None:
    pairs = _pairs(passages)
    ours_raw = pool.score_pairs(flag_spec(gemma_path, score_mode="raw"), pairs, batch_size=3)
    ours_sigmoid = pool.score_pairs(flag_spec(gemma_path), pairs, batch_size=4)  # default
    ref_raw = flag_gemma.compute_score(pairs)
    ref_sigmoid = flag_gemma.compute_score(pairs, normalize=True)
    np.testing.assert_allclose(ours_raw, ref_raw, atol=1e-5, rtol=0)
    np.testing.assert_allclose(ours_sigmoid, ref_sigmoid, atol=1e-5, rtol=0)
    assert np.ptp(ref_raw) > 1e-2, "the tiny model must separate passages"
    assert pool.get(flag_spec(gemma_path)).model.__class__.__name__ == "FlagLLMReranker"


@pytest.mark.parametrize("cutoff", [None, 2, [2]])
def test_layerwise_reranker_equals_compute_score(
    pool: ModelPool, layerwise_path: str, flag_layerwise: Any, passages: list[str], cutoff: Any
) -> None:
    pairs = _pairs(passages)
    options: dict[str, Any] = {"score_mode": "raw"}
    reference_kwargs: dict[str, Any] = {}
    if cutoff is not None:
        options["cutoff_layers"] = cutoff
        reference_kwargs["cutoff_layers"] = cutoff if isinstance(cutoff, list) else [cutoff]
    ours = pool.score_pairs(flag_spec(layerwise_path, **options), pairs, batch_size=3)
    ref = flag_layerwise.compute_score(pairs, **reference_kwargs)
    np.testing.assert_allclose(ours, ref, atol=1e-5, rtol=0)
    assert np.ptp(ref) > 1e-2
    assert all(np.isfinite(ours))


def test_a_model_that_is_not_layer_wise_is_named_so(pool: ModelPool, gemma_path: str) -> None:
    """model_class='decoder-only-layerwise' on a plain model said "cutoff_layers=2 is outside
    this model's scored layers [8, 2]", though no cutoff_layers was given."""
    pytest.importorskip("FlagEmbedding")  # the check runs in FlagEmbedding's constructor
    spec = flag_spec(gemma_path, model_class="decoder-only-layerwise")
    with pytest.raises(ConfigurationError, match="not a layer-wise reranker"):
        pool.get(spec)


def test_layerwise_loader_gives_back_the_model_that_was_saved(layerwise: tuple[str, Any]) -> None:
    """The transformers-5 fixes change nothing the model computes (rotary tables included)."""
    import torch

    from rag_rerank_plugins.backends.flag_llm import load_layerwise_model

    path, built = layerwise
    loaded = load_layerwise_model(path).eval()
    ids = torch.randint(5, 300, (2, 40), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    with torch.no_grad():
        want = built(input_ids=ids, attention_mask=mask, cutoff_layers=[1, 3]).logits
        got = loaded(input_ids=ids, attention_mask=mask, cutoff_layers=[1, 3]).logits
    for a, b in zip(want, got, strict=True):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=0)


# -- through the adapters, the pool, windows and the server --------------------------------------


@pytest.fixture(params=["causal-lm-reranker", "flag-llm-reranker"])
def backend_case(request: pytest.FixtureRequest, passages: list[str]) -> tuple[str, str, list]:
    """``(backend, model path, reference scores of QUERY against passages)``."""
    pairs = [(QUERY, p) for p in passages]
    if request.param == "causal-lm-reranker":
        path = request.getfixturevalue("qwen_path")
        ref = request.getfixturevalue("card").scores(pairs)
    else:
        path = request.getfixturevalue("gemma_path")
        ref = request.getfixturevalue("flag_gemma").compute_score(pairs, normalize=True)
    return request.param, path, ref


def _best_first(ref: list[float]) -> list[int]:
    return sorted(range(len(ref)), key=lambda i: (-ref[i], i))


def test_langchain_compressor_orders_like_the_reference(
    pool: ModelPool, backend_case: tuple[str, str, list], passages: list[str]
) -> None:
    pytest.importorskip("langchain_core")
    from langchain_core.documents import Document

    from rag_rerank_plugins.langchain import SharedRerankCompressor

    backend, path, ref = backend_case
    extra = {"max_length": MAX_LENGTH} if backend == "causal-lm-reranker" else {}
    compressor = SharedRerankCompressor(
        model=path, backend=backend, device="cpu", dtype="float32", pool=pool, top_n=None, **extra
    )
    docs = [Document(page_content=p, id=str(i)) for i, p in enumerate(passages)]
    result = compressor.compress_documents(docs, QUERY)
    assert [int(d.id) for d in result] == _best_first(ref)


def test_llama_index_postprocessor_orders_like_the_reference(
    pool: ModelPool, backend_case: tuple[str, str, list], passages: list[str]
) -> None:
    pytest.importorskip("llama_index.core")
    from llama_index.core.schema import NodeWithScore, TextNode

    from rag_rerank_plugins.llama_index import SharedRerankPostprocessor

    backend, path, ref = backend_case
    post = SharedRerankPostprocessor(
        model=path, backend=backend, device="cpu", dtype="float32", pool=pool, top_n=3
    )
    nodes = [NodeWithScore(node=TextNode(text=p, id_=str(i))) for i, p in enumerate(passages)]
    out = post.postprocess_nodes(nodes, query_str=QUERY)
    assert [int(n.node.node_id) for n in out] == _best_first(ref)[:3]
    assert [n.score for n in out] == pytest.approx(sorted(ref, reverse=True)[:3], abs=1e-5)


def test_16_concurrent_callers_share_one_load_with_no_errors(
    pool: ModelPool, qwen_path: str, passages: list[str]
) -> None:
    """The issue's acceptance test: a 2-layer random Qwen-shaped causal-LM reranker serves 16
    concurrent callers through the pool with 1 load and 0 errors."""
    spec = qwen_spec(qwen_path)
    texts = passages[:4]  # short requests: the point is concurrency, not volume (2-core CI)
    barrier = threading.Barrier(16)

    def call(i: int) -> list[float]:
        barrier.wait()
        # Each caller sends the texts in its own order, so batches mix requests and positions.
        shift = i % len(texts)
        scores = pool.score_pairs(spec, [(QUERY, p) for p in texts[shift:] + texts[:shift]])
        return scores[len(texts) - shift :] + scores[: len(texts) - shift]

    with ThreadPoolExecutor(16) as ex:
        results = list(ex.map(call, range(16)))
    sequential = pool.score_pairs(spec, [(QUERY, p) for p in texts])
    for result in results:
        np.testing.assert_allclose(result, sequential, atol=1e-5, rtol=0)
    stats = pool.spec_stats(spec)
    assert stats["loads"] == 1
    assert stats["errors"] == 0
    assert stats["calls"] == 17


@pytest.mark.parametrize("backend", ["causal-lm-reranker", "flag-llm-reranker"])
def test_long_documents_are_scored_window_by_window(
    pool: ModelPool, qwen_path: str, gemma_path: str, passages: list[str], backend: str
) -> None:
    pytest.importorskip("langchain_core")
    from langchain_core.documents import Document

    from rag_rerank_plugins.langchain import SharedRerankCompressor

    path = qwen_path if backend == "causal-lm-reranker" else gemma_path
    if backend == "flag-llm-reranker":
        pytest.importorskip("FlagEmbedding")
    spec_kwargs: dict[str, Any] = {"backend": backend, "device": "cpu", "dtype": "float32"}
    compressor = SharedRerankCompressor(
        model=path,
        pool=pool,
        top_n=None,
        max_length=MAX_LENGTH,
        window_tokens=40,
        window_stride=20,
        **spec_kwargs,
    )
    long = " ".join(passages) * 3
    docs = [Document(page_content=long, id="long"), Document(page_content=passages[0], id="short")]
    result = {d.id: d for d in compressor.compress_documents(docs, QUERY)}
    window = result["long"].metadata["rerank_window"]
    assert window["count"] > 3
    piece = long[window["char_start"] : window["char_end"]]
    direct = pool.score_pairs(
        ModelSpec(path, max_length=MAX_LENGTH, **spec_kwargs), [(QUERY, piece)]
    )
    assert window["score"] == pytest.approx(direct[0], abs=1e-5)  # the best window, rescored
    assert result["long"].metadata["relevance_score"] == window["score"]
    assert result["short"].metadata["rerank_window"]["count"] == 1


def test_served_by_rag_rerank_serve(
    qwen_path: str, card: CardReranker, passages: list[str]
) -> None:
    pytest.importorskip("fastapi")
    pytest.importorskip("uvicorn")
    import httpx

    from rag_rerank_plugins.server import ServerConfig, create_app
    from rag_rerank_plugins.server.testing import ServerThread, wait_until_healthy

    server_pool = ModelPool()
    spec = {
        "name": "qwen-reranker",
        "model": qwen_path,
        "backend": "causal-lm-reranker",
        "device": "cpu",
        "dtype": "float32",
        "max_length": MAX_LENGTH,
    }
    server = ServerThread(create_app(ServerConfig(specs=[spec]), pool=server_pool))
    url = server.start()
    try:
        wait_until_healthy(url, timeout=120)
        body = {"query": QUERY, "texts": passages}
        answer = httpx.post(url + "/rerank", json=body, timeout=60).json()
    finally:
        server.stop()
        server_pool.clear()
    ref = card.scores([(QUERY, p) for p in passages])
    assert [item["index"] for item in answer] == _best_first(ref)
    for item in answer:
        assert item["score"] == pytest.approx(ref[item["index"]], abs=1e-5)


# -- dtype policy, memory, bad options ---------------------------------------------------------


def test_half_precision_is_cast_once_at_load_and_reported_in_the_footprint(
    pool: ModelPool, qwen_path: str, passages: list[str]
) -> None:
    import torch

    fp32 = pool.get(qwen_spec(qwen_path)).model
    bf16 = pool.get(qwen_spec(qwen_path).with_options(dtype="bfloat16")).model
    assert next(bf16.model.parameters()).dtype == torch.bfloat16
    assert not bf16.model.training
    assert not any(p.requires_grad for p in bf16.model.parameters())
    params = sum(p.numel() for p in fp32.model.parameters())
    assert fp32.footprint_bytes() >= params * 4
    assert bf16.footprint_bytes() * 2 == pytest.approx(fp32.footprint_bytes(), rel=0.01)
    scores = pool.score_pairs(qwen_spec(qwen_path).with_options(dtype="bfloat16"), _pairs(passages))
    assert all(isinstance(s, float) and 0.0 < s < 1.0 for s in scores)


def test_memory_budget_evicts_an_llm_reranker_for_another(
    qwen_path: str, gemma_path: str, passages: list[str]
) -> None:
    pytest.importorskip("FlagEmbedding")
    probe = ModelPool()
    sizes = [
        probe.get(spec).model.footprint_bytes() or 0
        for spec in (qwen_spec(qwen_path), flag_spec(gemma_path))
    ]
    probe.clear()
    budget_mb = (max(sizes) + min(sizes) // 2) / 2**20  # room for one of the two, not both
    pool = ModelPool(memory_budget_mb=budget_mb)
    try:
        pool.score_pairs(qwen_spec(qwen_path), [(QUERY, passages[0])])
        pool.score_pairs(flag_spec(gemma_path), [(QUERY, passages[0])])
        memory = pool.memory()["cpu"]
        assert memory["models"] == 1
        assert memory["evictions"] == 1
        assert memory["used_mb"] <= budget_mb
    finally:
        pool.clear()


@pytest.mark.parametrize(
    ("backend", "options", "match"),
    [
        ("causal-lm-reranker", {"template": "<Query>: {query}"}, "document"),
        ("causal-lm-reranker", {"template": "{query} {doc} {document}"}, "unknown slot"),
        ("causal-lm-reranker", {"yes_token": "definitely yes"}, "one token"),
        ("causal-lm-reranker", {"yes_token": "no"}, "same token"),
        ("causal-lm-reranker", {"score_mode": "softmax"}, "score_mode"),
        ("flag-llm-reranker", {"cutoff_layers": 2}, "layer-wise"),
        ("flag-llm-reranker", {"model_class": "decoder-only-lightweight"}, "LightWeight"),
    ],
)
def test_bad_options_fail_at_load_with_what_to_do(
    pool: ModelPool, qwen_path: str, gemma_path: str, backend: str, options: dict, match: str
) -> None:
    if backend == "flag-llm-reranker":
        pytest.importorskip("FlagEmbedding")
    path = qwen_path if backend == "causal-lm-reranker" else gemma_path
    spec = ModelSpec(path, backend=backend, device="cpu", dtype="float32", options=options)
    with pytest.raises(RagRerankError, match=match):
        pool.get(spec)


def test_layerwise_cutoff_outside_the_scored_layers_is_refused(
    pool: ModelPool, layerwise_path: str
) -> None:
    for bad, match in ((0, r"\[1, 3\]"), ([1, 2], "one layer")):
        with pytest.raises(ConfigurationError, match=match):
            pool.get(flag_spec(layerwise_path, cutoff_layers=bad))


def test_adapters_reject_options_the_backends_do_not_read(qwen_path: str) -> None:
    from rag_rerank_plugins.backends import check_options

    check_options("causal-lm-reranker", {"instruction": "x", "yes_token": "yes"})
    check_options("flag-llm-reranker", {"cutoff_layers": 28, "prompt": "x"})
    with pytest.raises(ConfigurationError, match="compress_ratio"):
        check_options("flag-llm-reranker", {"compress_ratio": 2})
    with pytest.raises(ConfigurationError, match="dtype="):
        check_options("causal-lm-reranker", {"use_fp16": True})


def test_registry_lists_both_backends() -> None:
    from rag_rerank_plugins.backends import available_backends

    backends = available_backends()
    assert backends["causal-lm-reranker"].kind == "reranker"
    assert backends["flag-llm-reranker"].kind == "reranker"


def test_only_the_last_position_reaches_the_vocabulary_projection(
    pool: ModelPool, qwen_path: str, passages: list[str]
) -> None:
    """The memory claim of the docs: logits are [batch, 1, vocab], never [batch, length, vocab]."""
    spec = qwen_spec(qwen_path)
    model = pool.get(spec).model.model
    shapes: list[tuple[int, ...]] = []
    original = model.forward

    def spy(*args: Any, **kwargs: Any) -> Any:
        out = original(*args, **kwargs)
        shapes.append(tuple(out.logits.shape))
        return out

    model.forward = spy
    pool.score_pairs(spec, _pairs(passages), batch_size=4)
    assert shapes
    assert all(shape[1] == 1 for shape in shapes), shapes
