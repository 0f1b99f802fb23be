"""Every argument of LlamaIndex's stock classes, side by side with the stock classes themselves.

``SentenceTransformerRerank`` (llama-index-postprocessor-sbert-rerank) and ``HuggingFaceEmbedding``
(llama-index-embeddings-huggingface) are what users swap for ``SharedRerankPostprocessor`` and
``SharedEmbedding``. The argument lists are *generated* from the installed stock classes
(``inspect.signature``, their pydantic fields, and the sentence-transformers ``CrossEncoder`` /
``SentenceTransformer`` keyword arguments they pass on), so a new stock argument fails
:func:`test_every_stock_argument_is_handled_or_refused` until it gets a case here or an entry on
the shared refusal list (``rag_rerank_plugins._stock.REFUSED``). Every case runs both classes on
the same tiny FP32 model saved to disk and compares ranked nodes (order and scores) or vectors to
1e-5: a reranker with 1024 positions (so the stock class's 512-token default shows), and an
embedder whose sentence-transformers config declares prompts (which the stock class does not
use).
"""

from __future__ import annotations

import asyncio
import inspect
import json
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

pytest.importorskip("llama_index.core")
pytest.importorskip("llama_index.postprocessor.sbert_rerank")
pytest.importorskip("llama_index.embeddings.huggingface")
pytest.importorskip("torch")

import torch
from llama_index.core.callbacks import CallbackManager, CBEventType, LlamaDebugHandler
from llama_index.core.schema import NodeWithScore, TextNode
from llama_index.embeddings.huggingface import HuggingFaceEmbedding
from llama_index.embeddings.huggingface import utils as hf_utils
from llama_index.postprocessor.sbert_rerank import SentenceTransformerRerank
from pydantic import ValidationError
from sentence_transformers import CrossEncoder, SentenceTransformer

from rag_rerank_plugins import ModelPool
from rag_rerank_plugins._stock import REFUSED
from rag_rerank_plugins.backends import available_backends
from rag_rerank_plugins.exceptions import ConfigurationError
from rag_rerank_plugins.llama_index import SharedEmbedding, SharedRerankPostprocessor
from rag_rerank_plugins.llama_index._stock_args import (
    EMBEDDING_POSITIONAL,
    RERANK_POSITIONAL,
    ST_EMBEDDER_KWARGS,
)

QUERY = "which animal sleeps all day?"
# Past 512 tokens: what a model reads beyond 512 changes (first cats, then only dogs).
LONG = "cat " * 400 + "dog barks loudly " * 300
TEXTS = [
    "cats sleep all day long",
    "dogs bark at the postman",
    LONG,
    "the quick brown fox " * 40,
    "fish swim",
    "a cat is a small carnivorous mammal " + LONG[:3000],
]
ATOL = 1e-5

# -- the arguments, generated from the stock classes --------------------------------------------


@pytest.fixture(scope="module", autouse=True)
def _stock_classes_compute_in_float32(float32_policy: None) -> None:
    """Compared with the stock classes to 1e-5: FP32 in the BF16 run too (see conftest)."""


def _params(func: Callable[..., Any], *skip: str) -> list[str]:
    kinds = (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD)
    return [
        name
        for name, p in inspect.signature(func).parameters.items()
        if name != "self" and name not in skip and p.kind not in kinds
    ]


def stock_rerank_arguments() -> list[str]:
    """SentenceTransformerRerank's constructor and fields, and each CrossEncoder keyword
    argument of ``cross_encoder_kwargs`` (it forbids ``model`` and ``device`` there)."""
    top = set(_params(SentenceTransformerRerank.__init__)) | set(
        SentenceTransformerRerank.model_fields
    )
    nested = _params(CrossEncoder.__init__, "model_name_or_path", "device")
    return sorted(top) + [f"cross_encoder_kwargs[{name}]" for name in nested]


def stock_embedding_arguments() -> list[str]:
    """HuggingFaceEmbedding's constructor and fields, and the SentenceTransformer keyword
    arguments its ``**model_kwargs`` passes on (not those it sets itself: giving ``prompts``
    there is a TypeError, see test_prompts_fail_in_both)."""
    top = set(_params(HuggingFaceEmbedding.__init__)) | set(HuggingFaceEmbedding.model_fields)
    own = {"model_name_or_path", "device", "cache_folder", "trust_remote_code", "prompts"}
    return sorted(top | set(_params(SentenceTransformer.__init__, *own)))


# -- tiny models, saved once ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def ce_1024(tmp_path_factory: pytest.TempPathFactory, minilm_path: str) -> str:
    """A one-logit cross-encoder with 1024 positions and a tokenizer that allows 1024 tokens,
    with a classifier wide enough that scores (and their order) differ clearly."""
    from transformers import BertForSequenceClassification

    from rag_rerank_plugins.testing import build_cross_encoder

    path = build_cross_encoder(
        tmp_path_factory.mktemp("stock-li") / "ce-1024",
        hidden_size=32,
        max_position_embeddings=1024,
        seed=5,
    )
    model = BertForSequenceClassification.from_pretrained(str(path))
    torch.manual_seed(5)
    model.classifier.weight.data.normal_(0.0, 3.0)
    model.save_pretrained(str(path))
    config_file = path / "tokenizer_config.json"
    config = json.loads(config_file.read_text())
    config["model_max_length"] = 1024
    config_file.write_text(json.dumps(config))
    return str(path)


@pytest.fixture(scope="module")
def prompted_embedder(tmp_path_factory: pytest.TempPathFactory, minilm_path: str) -> str:
    """A sentence-transformers embedder whose config declares prompts (as E5 models do) and a
    default prompt name: HuggingFaceEmbedding uses none of them."""
    from rag_rerank_plugins.testing import build_cross_encoder

    encoder = build_cross_encoder(tmp_path_factory.mktemp("stock-li") / "encoder", seed=7)
    model = SentenceTransformer(str(encoder), device="cpu")
    model.prompts = {"query": "query: ", "document": "passage: ", "passage": "passage: "}
    model.default_prompt_name = "passage"
    path = tmp_path_factory.mktemp("stock-li") / "prompted-embedder"
    model.save(str(path))
    saved = json.loads((path / "config_sentence_transformers.json").read_text())
    assert saved["prompts"]["query"] == "query: "
    assert saved["default_prompt_name"] == "passage"
    return str(path)


@pytest.fixture(scope="module")
def shared_pool() -> ModelPool:
    pool = ModelPool()
    yield pool
    pool.clear()


# -- cases: (args, kwargs, attributes set on the stock object after construction) --------------

Case = Callable[[str, Path], tuple[tuple[Any, ...], dict[str, Any], dict[str, Any]]]


def _kw(**kwargs: Any) -> Case:
    """A case with the model given as keyword (``model``/``model_name`` added per class)."""
    return lambda path, tmp: ((path,), dict(kwargs), {})


def _ce(**kwargs: Any) -> Case:
    return lambda path, tmp: ((path,), {"cross_encoder_kwargs": dict(kwargs)}, {})


def _tmp_ce(key: str) -> Case:
    return lambda path, tmp: ((path,), {"cross_encoder_kwargs": {key: str(tmp)}}, {})


def _ce_card() -> Case:
    from sentence_transformers.cross_encoder.model_card import CrossEncoderModelCardData

    return _ce(model_card_data=CrossEncoderModelCardData())


def _rerank_callbacks(path: str, tmp: Path) -> tuple[tuple[Any, ...], dict, dict]:
    return (path,), {}, {"callback_manager": CallbackManager([LlamaDebugHandler()])}


#: Every stock argument of SentenceTransformerRerank -> its cases (at least one each).
RERANK_CASES: dict[str, list[Case]] = {
    # Positional, with nothing else: also the max_length=512 default on 1024 positions.
    "model": [lambda path, tmp: ((path,), {}, {}), lambda path, tmp: ((), {"model": path}, {})],
    "device": [lambda path, tmp: ((path, "cpu"), {}, {})],
    "cache_folder": [
        lambda path, tmp: ((path,), {"cache_folder": str(tmp)}, {}),
        lambda path, tmp: ((path,), {"cache_folder": tmp}, {}),  # a Path, as the stock allows
    ],
    "top_n": [_kw(top_n=3), _kw(top_n=10)],
    "keep_retrieval_score": [_kw(keep_retrieval_score=True, top_n=6)],
    "cross_encoder_kwargs": [_kw(cross_encoder_kwargs={}), _kw(cross_encoder_kwargs=None)],
    "callback_manager": [_rerank_callbacks],
    "cross_encoder_kwargs[modules]": [_ce(modules=[])],
    "cross_encoder_kwargs[prompts]": [
        _ce(prompts={"ask": "question: "}),
        _ce(prompts={"ask": "question: "}, default_prompt_name="ask"),
    ],
    "cross_encoder_kwargs[default_prompt_name]": [
        _ce(prompts={"ask": "question: "}, default_prompt_name="ask")
    ],
    "cross_encoder_kwargs[cache_folder]": [_tmp_ce("cache_folder")],
    "cross_encoder_kwargs[trust_remote_code]": [_ce(trust_remote_code=True)],
    "cross_encoder_kwargs[revision]": [_ce(revision="main")],
    "cross_encoder_kwargs[local_files_only]": [_ce(local_files_only=True)],
    "cross_encoder_kwargs[token]": [_ce(token="hf_not_a_real_token")],
    "cross_encoder_kwargs[model_kwargs]": [
        _ce(model_kwargs={"dtype": torch.float32}),
        _ce(model_kwargs={"torch_dtype": "float32"}),
        _ce(model_kwargs={"attn_implementation": "eager"}),
    ],
    "cross_encoder_kwargs[processor_kwargs]": [_ce(processor_kwargs={"model_max_length": 64})],
    "cross_encoder_kwargs[config_kwargs]": [_ce(config_kwargs={"classifier_dropout": 0.0})],
    "cross_encoder_kwargs[use_kernels]": [_ce(use_kernels=False)],
    "cross_encoder_kwargs[kernel_config]": [_ce(kernel_config=None)],
    "cross_encoder_kwargs[model_card_data]": [lambda path, tmp: _ce_card()(path, tmp)],
    "cross_encoder_kwargs[backend]": [_ce(backend="torch")],  # onnx/openvino: tests below
    "cross_encoder_kwargs[num_labels]": [_ce(num_labels=1)],
    "cross_encoder_kwargs[max_length]": [_ce(max_length=64), _ce(max_length=1024)],
    "cross_encoder_kwargs[activation_fn]": [
        _ce(activation_fn=torch.nn.Identity()),
        _ce(activation_fn=torch.nn.Sigmoid()),
        _ce(activation_fn=torch.nn.Tanh()),
    ],
    "cross_encoder_kwargs[keep_in_fp32_modules]": [
        _ce(keep_in_fp32_modules=["0.model.classifier"])
    ],
}


def _emb_card() -> Case:
    from sentence_transformers.sentence_transformer.model_card import (
        SentenceTransformerModelCardData,
    )

    return _kw(model_card_data=SentenceTransformerModelCardData())


def _emb_tmp(key: str) -> Case:
    return lambda path, tmp: ((path,), {key: str(tmp)}, {})


def _emb_cache(path: str, tmp: Path) -> tuple[tuple[Any, ...], dict, dict]:
    from llama_index.core.storage.kvstore import SimpleKVStore

    return (path,), {}, {"embeddings_cache": SimpleKVStore()}


def _emb_limiter(path: str, tmp: Path) -> tuple[tuple[Any, ...], dict, dict]:
    from llama_index.core.rate_limiter import TokenBucketRateLimiter

    return (path,), {}, {"rate_limiter": TokenBucketRateLimiter(requests_per_minute=60_000)}


def _emb_positional(path: str, tmp: Path) -> tuple[tuple[Any, ...], dict, dict]:
    # Every parameter before **model_kwargs, positionally, at non-default values where it can.
    values = {
        "model_name": path,
        "tokenizer_name": "deprecated",
        "pooling": "deprecated",
        "max_length": 24,
        "query_instruction": "Q: ",
        "text_instruction": "T: ",
        "normalize": False,
        "model": "deprecated",
        "tokenizer": "deprecated",
        "embed_batch_size": 2,
        "cache_folder": str(tmp),
        "trust_remote_code": True,
        "device": "cpu",
        "callback_manager": CallbackManager([]),
        "parallel_process": False,
        "target_devices": None,
        "show_progress_bar": False,
    }
    return tuple(values[name] for name in EMBEDDING_POSITIONAL), {}, {}


#: Every stock argument of HuggingFaceEmbedding -> its cases.
EMBEDDING_CASES: dict[str, list[Case]] = {
    "model_name": [
        lambda path, tmp: ((path,), {}, {}),  # the prompt-configured model, defaults
        lambda path, tmp: ((), {"model_name": path}, {}),
        _emb_positional,
    ],
    "tokenizer_name": [_kw(tokenizer_name="deprecated")],
    "pooling": [_kw(pooling="deprecated")],
    "model": [_kw(model="deprecated")],
    "tokenizer": [_kw(tokenizer="deprecated")],
    "max_length": [_kw(max_length=16), _kw(max_length=0), _kw(max_length=None)],
    "query_instruction": [
        _kw(query_instruction="Represent this question: "),
        _kw(query_instruction=""),
    ],
    "text_instruction": [_kw(text_instruction="passage: "), _kw(text_instruction="")],
    "normalize": [_kw(normalize=False)],
    "embed_batch_size": [_kw(embed_batch_size=2)],
    "cache_folder": [_emb_tmp("cache_folder")],
    "trust_remote_code": [_kw(trust_remote_code=True)],
    "device": [_kw(device="cpu"), _kw(device=None)],
    "callback_manager": [
        lambda path, tmp: ((path,), {"callback_manager": CallbackManager([])}, {})
    ],
    "parallel_process": [_kw(parallel_process=False)],  # True: refused, see below
    "target_devices": [_kw(target_devices=["cpu", "cpu"])],  # read only with parallel_process
    "show_progress_bar": [_kw(show_progress_bar=True)],
    "num_workers": [lambda path, tmp: ((path,), {}, {"num_workers": 2})],
    "embeddings_cache": [_emb_cache],
    "rate_limiter": [_emb_limiter],
    # SentenceTransformer's, through **model_kwargs
    "modules": [_kw(modules=[])],
    "default_prompt_name": [_kw(default_prompt_name="query"), _kw(default_prompt_name="passage")],
    "revision": [_kw(revision="main")],
    "local_files_only": [_kw(local_files_only=True)],
    "token": [_kw(token="hf_not_a_real_token")],
    "use_auth_token": [_kw(use_auth_token="hf_not_a_real_token")],
    "model_kwargs": [
        _kw(model_kwargs={"dtype": torch.float32}),
        _kw(model_kwargs={"torch_dtype": "float32"}),
        _kw(model_kwargs={"attn_implementation": "eager"}),
        _kw(model_kwargs={"dtype": "float32", "trust_remote_code": True}),
    ],
    "processor_kwargs": [_kw(processor_kwargs={"model_max_length": 16})],
    "config_kwargs": [_kw(config_kwargs={"hidden_dropout_prob": 0.0})],
    "use_kernels": [_kw(use_kernels=False)],
    "kernel_config": [_kw(kernel_config=None)],
    "model_card_data": [lambda path, tmp: _emb_card()(path, tmp)],
    "backend": [_kw(backend="torch")],  # onnx/openvino: tests below
    "similarity_fn_name": [_kw(similarity_fn_name="dot")],
    "truncate_dim": [_kw(truncate_dim=8)],
}


def _refused(owner: str) -> set[str]:
    return {argument for (cls, argument) in REFUSED if cls == owner}


def test_every_stock_argument_is_handled_or_refused() -> None:
    """Generated from the installed stock classes: fails for an argument with no case here and
    no entry on the shared refusal list."""
    for owner, arguments, cases in (
        ("SentenceTransformerRerank", stock_rerank_arguments(), RERANK_CASES),
        ("HuggingFaceEmbedding", stock_embedding_arguments(), EMBEDDING_CASES),
    ):
        missing = [a for a in arguments if a not in cases and a not in _refused(owner)]
        assert not missing, f"{owner} arguments neither handled nor refused: {missing}"
        stale = sorted(set(cases) - set(arguments))
        assert not stale, f"{owner} cases for arguments it no longer has: {stale}"
    assert len(REFUSED) <= 3, "the refusal list is short by design"


def test_positional_orders_match_the_stock_signatures() -> None:
    assert _params(SentenceTransformerRerank.__init__) == list(RERANK_POSITIONAL)
    assert _params(HuggingFaceEmbedding.__init__) == list(EMBEDDING_POSITIONAL)
    st = set(_params(SentenceTransformer.__init__))
    assert ST_EMBEDDER_KWARGS - {"tokenizer_kwargs"} <= st


# -- side by side: the reranker ------------------------------------------------------------------


def _nodes() -> list[NodeWithScore]:
    # Fresh nodes per run: SentenceTransformerRerank writes scores and metadata into its input.
    return [NodeWithScore(node=TextNode(text=t), score=0.1 * i) for i, t in enumerate(TEXTS)]


def _ranked(nodes: list[NodeWithScore]) -> list[tuple[str, float, Any]]:
    return [(n.node.text, n.score, n.node.metadata.get("retrieval_score")) for n in nodes]


def _assert_same_ranking(ours: list, stock: list) -> None:
    assert [t for t, _, _ in ours] == [t for t, _, _ in stock], "order differs"
    np.testing.assert_allclose([s for _, s, _ in ours], [s for _, s, _ in stock], atol=ATOL)
    assert [r for _, _, r in ours] == [r for _, _, r in stock]


def _stock_rerank(args: tuple, kwargs: dict, attrs: dict) -> list:
    stock = SentenceTransformerRerank(*args, **kwargs)
    for name, value in attrs.items():
        setattr(stock, name, value)
    return _ranked(stock.postprocess_nodes(_nodes(), query_str=QUERY))


def _our_rerank(args: tuple, kwargs: dict, attrs: dict, pool: ModelPool) -> list:
    ours = SharedRerankPostprocessor(*args, **kwargs, **attrs, pool=pool)
    nodes = _nodes()
    result = _ranked(ours.postprocess_nodes(nodes, query_str=QUERY))
    assert _ranked(nodes) == _ranked(_nodes()), "our input nodes are never modified"
    return result


RERANK_IDS = [(arg, i) for arg, cases in RERANK_CASES.items() for i in range(len(cases))]


@pytest.mark.parametrize(("argument", "index"), RERANK_IDS, ids=[f"{a}-{i}" for a, i in RERANK_IDS])
def test_reranker_argument_equals_stock(
    argument: str, index: int, ce_1024: str, tmp_path: Path, shared_pool: ModelPool
) -> None:
    args, kwargs, attrs = RERANK_CASES[argument][index](ce_1024, tmp_path)
    stock = _stock_rerank(args, kwargs, attrs)
    _assert_same_ranking(_our_rerank(args, kwargs, attrs, shared_pool), stock)


def test_unset_max_length_truncates_at_512_like_the_stock(
    ce_1024: str, shared_pool: ModelPool
) -> None:
    """The model reads 1024 tokens, SentenceTransformerRerank gives it 512: so do we; and the
    difference shows (reading 1024 tokens ranks the long passages differently)."""
    post = SharedRerankPostprocessor(ce_1024, top_n=None, pool=shared_pool)
    assert post.spec.max_length == 512
    stock = _stock_rerank((ce_1024,), {"top_n": 10}, {})
    _assert_same_ranking(_ranked(post.postprocess_nodes(_nodes(), query_str=QUERY)), stock)
    full = SharedRerankPostprocessor(ce_1024, top_n=None, max_length=1024, pool=shared_pool)
    scores = {t: s for t, s, _ in _ranked(full.postprocess_nodes(_nodes(), query_str=QUERY))}
    # Reading 1024 tokens moves scores far beyond the tolerance: the comparison can fail.
    assert max(abs(scores[t] - s) for t, s, _ in stock) > 10 * ATOL, "truncation must matter"


def test_fewer_positions_keep_the_models_own_limit(tiny_ce_path: str, tmp_path: Path) -> None:
    """Where the stock class would fail (a model with fewer than 512 positions reading 512
    tokens), the model keeps its own limit, as it does at exactly 512; other backends keep
    theirs."""
    from rag_rerank_plugins.testing import build_cross_encoder

    small = build_cross_encoder(tmp_path / "ce-128", max_position_embeddings=128)
    assert SharedRerankPostprocessor(str(small)).spec.max_length is None
    # 512 positions: its own limit is the stock 512 already, so no explicit max_length, and the
    # same pool key as the LangChain adapters (one load when a process uses both).
    assert SharedRerankPostprocessor(tiny_ce_path).spec.max_length is None
    from rag_rerank_plugins.langchain import SharedRerankCompressor

    assert SharedRerankPostprocessor(tiny_ce_path).spec == (
        SharedRerankCompressor(model=tiny_ce_path).spec
    )
    assert SharedRerankPostprocessor(tiny_ce_path, max_length=300).spec.max_length == 300
    fake = SharedRerankPostprocessor("f", backend="fake-reranker")
    assert fake.spec.max_length is None


def test_reranker_onnx_backend(tiny_ce_path: str, shared_pool: ModelPool) -> None:
    """backend="onnx" runs on our ONNX runtime (the stock class needs optimum for it, which is
    not installed here: the reference is the stock class on torch, FP32)."""
    pytest.importorskip("onnxruntime")
    post = SharedRerankPostprocessor(
        tiny_ce_path, top_n=10, cross_encoder_kwargs={"backend": "onnx"}, pool=shared_pool
    )
    assert post.backend == "onnx-cross-encoder"
    assert post.spec.max_length is None  # 512 positions: its own limit is the stock 512
    stock = _stock_rerank((tiny_ce_path,), {"top_n": 10}, {})
    _assert_same_ranking(_ranked(post.postprocess_nodes(_nodes(), query_str=QUERY)), stock)


@pytest.mark.parametrize("kind", ["reranker", "embedder"])
def test_openvino_backend_maps_or_says_what_is_missing(kind: str) -> None:
    ours = {"reranker": "openvino-cross-encoder", "embedder": "openvino-embedder"}[kind]
    if kind == "reranker":
        make = lambda: SharedRerankPostprocessor(  # noqa: E731
            "m", cross_encoder_kwargs={"backend": "openvino"}
        )
    else:
        make = lambda: SharedEmbedding("m", backend="openvino")  # noqa: E731
    if ours in available_backends():
        assert make().backend == ours
    else:
        with pytest.raises(ValidationError, match=ours):
            make()


# -- side by side: the embedder ------------------------------------------------------------------


def _vectors(embedder: Any) -> dict[str, Any]:
    return {
        "query": embedder.get_query_embedding(QUERY),
        "text": embedder.get_text_embedding(TEXTS[0]),
        "batch": embedder.get_text_embedding_batch(TEXTS),
        "abatch": asyncio.run(embedder.aget_text_embedding_batch(TEXTS)),
        "aquery": asyncio.run(embedder.aget_query_embedding(QUERY)),
    }


def _assert_same_vectors(ours: dict[str, Any], stock: dict[str, Any]) -> None:
    for key in stock:
        np.testing.assert_allclose(ours[key], stock[key], atol=ATOL, err_msg=key)


EMB_IDS = [(arg, i) for arg, cases in EMBEDDING_CASES.items() for i in range(len(cases))]


@pytest.mark.parametrize(("argument", "index"), EMB_IDS, ids=[f"{a}-{i}" for a, i in EMB_IDS])
def test_embedding_argument_equals_stock(
    argument: str,
    index: int,
    prompted_embedder: str,
    tmp_path: Path,
    shared_pool: ModelPool,
) -> None:
    args, kwargs, attrs = EMBEDDING_CASES[argument][index](prompted_embedder, tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # use_auth_token's FutureWarning, modules' note
        stock = HuggingFaceEmbedding(*args, **kwargs)
    for name, value in attrs.items():  # BaseEmbedding fields its __init__ does not take
        setattr(stock, name, value)
    ours = SharedEmbedding(*args, **kwargs, **attrs, pool=shared_pool)
    _assert_same_vectors(_vectors(ours), _vectors(stock))


def test_configured_prompts_are_not_used_like_the_stock(
    prompted_embedder: str, shared_pool: ModelPool
) -> None:
    """The model declares "query: "/"passage: ": HuggingFaceEmbedding embeds without them, so
    do we (an index built with the stock class keeps matching); model_prompts=True uses them."""
    stock = _vectors(HuggingFaceEmbedding(prompted_embedder))
    ours = SharedEmbedding(prompted_embedder, pool=shared_pool)
    _assert_same_vectors(_vectors(ours), stock)
    prompted = SharedEmbedding(prompted_embedder, model_prompts=True, pool=shared_pool)
    assert prompted.spec == ours.spec, "prompts are per call: one loaded model"
    direct = SentenceTransformer(prompted_embedder, device="cpu")
    np.testing.assert_allclose(
        prompted.get_query_embedding(QUERY),
        direct.encode_query([QUERY], normalize_embeddings=True)[0],
        atol=ATOL,
    )
    assert np.abs(np.array(prompted.get_query_embedding(QUERY)) - stock["query"]).max() > 1e-3


@pytest.mark.parametrize(
    ("name", "query_prompt"),
    [
        ("BAAI/bge-small-en-v1.5", "Represent this question for searching relevant passages: "),
        ("BAAI/bge-base-zh", hf_utils.DEFAULT_QUERY_BGE_INSTRUCTION_ZH),
        ("hkunlp/instructor-base", hf_utils.DEFAULT_QUERY_INSTRUCTION),
        ("intfloat/e5-small-v2", ""),
    ],
)
def test_default_instructions_follow_the_model_name(name: str, query_prompt: str) -> None:
    """HuggingFaceEmbedding's defaults for BGE and Instructor names (its utils module)."""
    utils = hf_utils
    emb = SharedEmbedding(name, backend="fake-embedder")
    assert emb._prompt(True) == query_prompt == utils.get_query_instruct_for_model_name(name)
    assert emb._prompt(False) == utils.get_text_instruct_for_model_name(name)
    assert SharedEmbedding(name, backend="fake-embedder", query_instruction="")._prompt(True) == (
        query_prompt
    )
    assert SharedEmbedding(name, backend="fake-embedder", query_instruction="x ")._prompt(True) == (
        "x "
    )


def test_embedding_onnx_backend(prompted_embedder: str, shared_pool: ModelPool) -> None:
    """backend="onnx" runs on our ONNX embedder (the stock class needs optimum for it, not
    installed here: the reference is the stock class on torch, FP32)."""
    pytest.importorskip("onnxruntime")
    ours = SharedEmbedding(prompted_embedder, backend="onnx", pool=shared_pool)
    assert ours.backend == "onnx-sentence-transformers"
    _assert_same_vectors(_vectors(ours), _vectors(HuggingFaceEmbedding(prompted_embedder)))


def test_callbacks_and_cache_work_on_ours(prompted_embedder: str, shared_pool: ModelPool) -> None:
    from llama_index.core.storage.kvstore import SimpleKVStore

    debug = LlamaDebugHandler()
    cache = SimpleKVStore()
    ours = SharedEmbedding(
        prompted_embedder,
        callback_manager=CallbackManager([debug]),
        embeddings_cache=cache,
        pool=shared_pool,
    )
    first = ours.get_text_embedding_batch(TEXTS)
    assert debug.get_event_pairs(CBEventType.EMBEDDING)
    assert cache.get_all(collection="embeddings"), "vectors cached as in BaseEmbedding"
    assert ours.get_text_embedding_batch(TEXTS) == first


# -- refused, deprecated and bad input -----------------------------------------------------------


def test_parallel_process_is_refused_with_what_to_use(prompted_embedder: str) -> None:
    assert ("HuggingFaceEmbedding", "parallel_process") in REFUSED
    with pytest.raises(ValidationError) as info:
        SharedEmbedding(prompted_embedder, parallel_process=True, target_devices=["cpu", "cpu"])
    message = str(info.value)
    assert "parallel_process" in message
    assert REFUSED[("HuggingFaceEmbedding", "parallel_process")] in message


def test_prompts_fail_in_both(prompted_embedder: str) -> None:
    """HuggingFaceEmbedding sets prompts itself: passing them is a TypeError there."""
    with pytest.raises(TypeError):
        HuggingFaceEmbedding(prompted_embedder, prompts={"query": "q: "})
    with pytest.raises(ValidationError, match="'prompts'"):
        SharedEmbedding(prompted_embedder, prompts={"query": "q: "})


@pytest.mark.parametrize("name", ["tokenizer_name", "pooling", "model", "tokenizer"])
def test_deprecated_arguments_fail_in_both(name: str, prompted_embedder: str) -> None:
    with pytest.raises(ValueError, match="deprecated"):
        HuggingFaceEmbedding(prompted_embedder, **{name: "something"})
    with pytest.raises(ValidationError, match=f"{name} is deprecated"):
        SharedEmbedding(prompted_embedder, **{name: "something"})


@pytest.mark.parametrize(
    ("make", "needle"),
    [
        (
            lambda: SharedRerankPostprocessor("m", cross_encoder_kwargs={"device": "cpu"}),
            "should not be specified in 'cross_encoder_kwargs'",
        ),
        (
            lambda: SharedRerankPostprocessor("m", cross_encoder_kwargs={"model": "x"}),
            "top-level 'device' and 'model'",
        ),
        (
            lambda: SharedRerankPostprocessor("m", cross_encoder_kwargs="max_length=64"),
            "cross_encoder_kwargs must be a dict",
        ),
        (
            lambda: SharedRerankPostprocessor("m", cross_encoder_kwargs={"max_lenght": 64}),
            "max_lenght",
        ),
        (
            lambda: SharedRerankPostprocessor(
                "m", max_length=128, cross_encoder_kwargs={"max_length": 64}
            ),
            "disagree",
        ),
        (
            lambda: SharedRerankPostprocessor("m", cross_encoder_kwargs={"backend": "tensorrt"}),
            "'torch', 'onnx' and 'openvino'",
        ),
        (lambda: SharedRerankPostprocessor("m", "cpu", None, 2, False, {}, 7), "at most 6"),
        (lambda: SharedRerankPostprocessor("m", model="n"), "'model' twice"),
        (lambda: SharedEmbedding("m", model_name="n"), "'model_name' twice"),
        (lambda: SharedEmbedding("m", model_kwargs=[("dtype", "float16")]), "must be a dict"),
        (lambda: SharedEmbedding("m", model_kwargs={"dtype": "float8"}), "Unsupported dtype"),
        (lambda: SharedEmbedding("m", backend="tensorrt"), "tensorrt"),
        (lambda: SharedEmbedding("m", truncate_dims=8), "did you mean 'truncate_dim'?"),
        (
            lambda: SharedEmbedding("m", dtype="bfloat16", model_kwargs={"dtype": "float16"}),
            "disagree",
        ),
    ],
)
def test_bad_arguments_get_clear_errors(make: Callable[[], Any], needle: str) -> None:
    with pytest.raises((ValidationError, ConfigurationError)) as info:
        make()
    assert needle in str(info.value)


def test_token_is_never_shown(prompted_embedder: str) -> None:
    secret = "hf_not_a_real_token_123"
    emb = SharedEmbedding(prompted_embedder, token=secret)
    post = SharedRerankPostprocessor("m", cross_encoder_kwargs={"token": secret})
    for adapter in (emb, post):
        for shown in (repr(adapter.spec), str(adapter.spec), adapter.spec.label, repr(adapter)):
            assert secret not in shown
        assert adapter.spec.option("token") == secret, "the loader still gets it"


def test_two_label_reranker_ranks_by_the_relevant_label(
    tmp_path: Path, shared_pool: ModelPool
) -> None:
    """SentenceTransformerRerank fails on a (not relevant, relevant) classifier; ours ranks by
    the relevant label, as LangChain's HuggingFaceCrossEncoder does (scores[:, 1])."""
    from rag_rerank_plugins.testing import build_cross_encoder

    path = str(build_cross_encoder(tmp_path / "two-label", num_labels=2, hidden_size=64, seed=2))
    with pytest.raises(TypeError):
        SentenceTransformerRerank(path).postprocess_nodes(_nodes(), query_str=QUERY)
    direct = CrossEncoder(path, device="cpu").predict([(QUERY, t) for t in TEXTS])[:, 1]
    post = SharedRerankPostprocessor(path, top_n=None, pool=shared_pool)
    ranked = _ranked(post.postprocess_nodes(_nodes(), query_str=QUERY))
    order = sorted(range(len(TEXTS)), key=lambda i: -direct[i])
    assert [t for t, _, _ in ranked] == [TEXTS[i] for i in order]
    np.testing.assert_allclose([s for _, s, _ in ranked], direct[order], atol=ATOL)
