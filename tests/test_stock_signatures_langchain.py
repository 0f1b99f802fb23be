"""Every argument of LangChain's stock classes, generated from their signatures, side by side.

The stock classes (langchain-community ``HuggingFaceCrossEncoder``, langchain-classic
``CrossEncoderReranker``, langchain-huggingface ``HuggingFaceEmbeddings``) and the
sentence-transformers signatures they forward to (``CrossEncoder.__init__``,
``SentenceTransformer.__init__`` and ``.encode``) are read with ``inspect`` / pydantic's fields: a
new argument in a release fails :func:`test_every_stock_argument_is_handled_or_refused` until it
has a sample here (and is handled) or is on the refusal list ``rag_rerank_plugins._stock.REFUSED``.
Handled arguments give the stock class's FP32 scores / vectors to 1e-5, order included, on tiny
models saved to a temporary folder that both load (two-label and prompt-configured included).
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from pydantic import ValidationError
from pydantic_core import PydanticSerializationError

pytest.importorskip("sentence_transformers")
torch = pytest.importorskip("torch")
hf_ce = pytest.importorskip("langchain_community.cross_encoders")
lc_rerank = pytest.importorskip("langchain_classic.retrievers.document_compressors")
lc_hf = pytest.importorskip("langchain_huggingface")

from langchain_core.documents import Document  # noqa: E402
from sentence_transformers import CrossEncoder, SentenceTransformer  # noqa: E402

from rag_rerank_plugins import ModelPool  # noqa: E402
from rag_rerank_plugins._stock import REFUSED  # noqa: E402
from rag_rerank_plugins.langchain import (  # noqa: E402
    SharedCrossEncoder,
    SharedEmbeddings,
    SharedRerankCompressor,
)

HuggingFaceCrossEncoder = hf_ce.HuggingFaceCrossEncoder
CrossEncoderReranker = lc_rerank.CrossEncoderReranker
HuggingFaceEmbeddings = lc_hf.HuggingFaceEmbeddings

SECRET = "hf_SUPERSECRETTOKEN123"
PAIRS = [
    ("which organelle makes ATP?", "the mitochondrion is the powerhouse of the cell"),
    ("which organelle makes ATP?", "Paris is the capital of France"),
    ("which organelle makes ATP?", "ATP synthase " * 30),
    ("another query", "short"),
]
DOCS = ["the cell's powerhouse\nis the mitochondrion", "Paris is the capital of France", "short"]
QUERY = "which organelle\nmakes ATP?"


@pytest.fixture(scope="module", autouse=True)
def _stock_classes_compute_in_float32(float32_policy: None) -> None:
    """Compared with the stock classes to 1e-5: FP32 in the BF16 run too (see conftest)."""


def _refused(owner: str) -> set[str]:
    return {arg for cls, arg in REFUSED if cls == owner}


def _params(func: Any, *skip: str) -> set[str]:
    return {
        name
        for name, p in inspect.signature(func).parameters.items()
        if p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL) and name not in ("self", *skip)
    }


# -- a sample value for every argument: building ours with it must succeed (no load) ---------------

#: CrossEncoder.__init__ keyword arguments (HuggingFaceCrossEncoder(model_kwargs={...})), and the
#: deprecated names its init decorator still maps.
CE_KWARGS: dict[str, Any] = {
    "modules": None,
    "device": "cpu",
    "prompts": {"p": "pre: "},
    "default_prompt_name": "p",
    "cache_folder": "/tmp/hf-cache",
    "trust_remote_code": True,
    "revision": "main",
    "local_files_only": True,
    "token": SECRET,
    "model_kwargs": {"torch_dtype": torch.float32, "attn_implementation": "eager"},
    "processor_kwargs": {"model_max_length": 64},
    "config_kwargs": {"hidden_dropout_prob": 0.0},
    "use_kernels": False,
    "kernel_config": None,
    "model_card_data": None,
    "backend": "torch",
    "num_labels": 1,
    "max_length": 64,
    "activation_fn": torch.nn.Sigmoid(),
    "keep_in_fp32_modules": ["0.model.classifier"],
    # deprecated names (sentence_transformers.util.decorators.cross_encoder_init_args_decorator)
    "automodel_args": {"attn_implementation": "eager"},
    "tokenizer_args": {"model_max_length": 64},
    "tokenizer_kwargs": {"model_max_length": 64},
    "config_args": {"hidden_dropout_prob": 0.0},
    "cache_dir": "/tmp/hf-cache",
    "default_activation_function": torch.nn.Identity(),
    "classifier_dropout": 0.1,
}
#: SentenceTransformer.__init__ keyword arguments (HuggingFaceEmbeddings(model_kwargs={...})).
ST_KWARGS: dict[str, Any] = {
    "modules": None,
    "device": "cpu",
    "prompts": {"query": "query: "},
    "default_prompt_name": "query",
    "cache_folder": "/tmp/hf-cache",
    "trust_remote_code": True,
    "revision": "main",
    "local_files_only": True,
    "token": SECRET,
    "use_auth_token": SECRET,
    "model_kwargs": {"torch_dtype": "float32", "attn_implementation": "eager"},
    "processor_kwargs": {"model_max_length": 64},
    "tokenizer_kwargs": {"model_max_length": 64},
    "config_kwargs": {"hidden_dropout_prob": 0.0},
    "use_kernels": False,
    "kernel_config": None,
    "model_card_data": None,
    "backend": "torch",
    "similarity_fn_name": "cosine",
    "truncate_dim": 32,
}
#: SentenceTransformer.encode arguments (encode_kwargs / query_encode_kwargs).
ENCODE_KWARGS: dict[str, Any] = {
    "prompt_name": "query",
    "prompt": "query: ",
    "batch_size": 8,
    "show_progress_bar": False,
    "output_value": "sentence_embedding",
    "precision": "int8",
    "convert_to_numpy": True,
    "convert_to_tensor": False,
    "device": "cpu",
    "normalize_embeddings": True,
    "truncate_dim": 32,
    "pool": None,
    "chunk_size": 16,
}


def _stock_fields(cls: type) -> set[str]:
    return set(cls.model_fields)


def test_every_stock_argument_is_handled_or_refused() -> None:
    """The signatures as installed: each argument has a sample (handled) or is refused."""
    missing = {
        "HuggingFaceCrossEncoder": _stock_fields(HuggingFaceCrossEncoder)
        - {"client", "model_name", "model_kwargs"},
        "CrossEncoder": _params(CrossEncoder.__init__, "model_name_or_path") - set(CE_KWARGS),
        "CrossEncoderReranker": _stock_fields(CrossEncoderReranker) - {"model", "top_n"},
        "HuggingFaceEmbeddings": _stock_fields(HuggingFaceEmbeddings)
        - {
            "model_name",
            "cache_folder",
            "model_kwargs",
            "encode_kwargs",
            "query_encode_kwargs",
            "show_progress",
        }
        - _refused("HuggingFaceEmbeddings"),
        "SentenceTransformer": _params(SentenceTransformer.__init__, "model_name_or_path")
        - set(ST_KWARGS),
        "SentenceTransformer.encode": _params(SentenceTransformer.encode, "inputs")
        - set(ENCODE_KWARGS),
    }
    assert {k: v for k, v in missing.items() if v} == {}, (
        "new stock arguments: handle them (and add a sample here) or add them to "
        "rag_rerank_plugins._stock.REFUSED"
    )


def test_refusal_list_is_short_and_says_what_to_do() -> None:
    assert len(REFUSED) <= 3
    for message in REFUSED.values():
        assert "rag-rerank serve" in message or "use" in message


@pytest.mark.parametrize("name", sorted(CE_KWARGS))
def test_cross_encoder_kwarg_is_accepted(name: str) -> None:
    value = CE_KWARGS[name]
    encoder = SharedCrossEncoder(model_name="m", model_kwargs={name: value})
    compressor = SharedRerankCompressor(model="m", model_kwargs={name: value})
    assert encoder.spec.model == compressor.spec.model == "m"
    assert SECRET not in repr(encoder) + str(encoder.spec) + repr(encoder.spec)


@pytest.mark.parametrize("name", sorted(ST_KWARGS))
def test_sentence_transformer_kwarg_is_accepted(name: str) -> None:
    emb = SharedEmbeddings(model_name="m", model_kwargs={name: ST_KWARGS[name]})
    assert SECRET not in repr(emb) + str(emb.spec) + repr(emb.spec)


@pytest.mark.parametrize("name", sorted(ENCODE_KWARGS))
@pytest.mark.parametrize("argument", ["encode_kwargs", "query_encode_kwargs"])
def test_encode_kwarg_is_accepted(argument: str, name: str) -> None:
    SharedEmbeddings(model_name="m", **{argument: {name: ENCODE_KWARGS[name]}})


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"multi_process": True}, r"multi_process is not supported.*rag-rerank serve"),
        ({"encode_kwargs": {"device": ["cpu", "cpu"]}}, r"multi-process.*rag-rerank serve"),
        ({"encode_kwargs": {"pool": {"processes": []}}}, r"multi-process"),
        ({"encode_kwargs": {"output_value": "token_embeddings"}}, r"one vector per text"),
        ({"encode_kwargs": {"precision": "int4"}}, r"use one of float32, int8"),
        ({"encode_kwargs": {"processing_kwargs": {}}}, r"'processing_kwargs'.*max_length="),
        ({"model_kwargs": {"backend": "tensorrt"}}, r"'torch', 'onnx' and 'openvino'"),
        (
            {"model_kwargs": {"model_kwargs": {"dtype": torch.float16}}, "dtype": "float32"},
            r"dtype='float32' and model_kwargs\['model_kwargs'\]\['dtype'\]='float16'",
        ),
    ],
)
def test_what_cannot_apply_says_what_to_do(kwargs: dict, match: str) -> None:
    with pytest.raises(ValidationError, match=match):
        SharedEmbeddings(model_name="m", **kwargs)


def test_st_backend_names_map_to_our_runtimes() -> None:
    onnx = SharedCrossEncoder(model_name="m", model_kwargs={"backend": "onnx"})
    assert onnx.backend == "onnx-cross-encoder"
    emb = SharedEmbeddings(model_name="m", model_kwargs={"backend": "onnx"})
    assert emb.backend == "onnx-sentence-transformers"
    assert SharedEmbeddings(model_name="m", model_kwargs={"backend": "torch"}).spec == (
        SharedEmbeddings(model_name="m", backend="sentence-transformers").spec
    )
    from rag_rerank_plugins.backends import available_backends

    if "openvino-cross-encoder" not in available_backends():
        with pytest.raises(ValidationError, match=r"openvino-cross-encoder.*install the extra"):
            SharedCrossEncoder(model_name="m", model_kwargs={"backend": "openvino"})
    with pytest.raises(ValidationError, match="disagree"):
        SharedCrossEncoder(
            model_name="m", backend="cross-encoder", model_kwargs={"backend": "onnx"}
        )


def test_equivalent_spellings_share_one_pool_key() -> None:
    """Nested options are canonical (dict order, deprecated names, defaults, the token)."""
    a = SharedCrossEncoder(
        model_name="m",
        model_kwargs={
            "config_kwargs": {"b": 1, "a": 2},
            "tokenizer_kwargs": {"x": 1},
            "num_labels": 1,
            "token": "one",
            "trust_remote_code": False,
            "activation_fn": torch.nn.Tanh(),
        },
    )
    b = SharedCrossEncoder(
        model_name="m",
        model_kwargs={
            "config_kwargs": {"num_labels": 1, "a": 2, "b": 1},
            "processor_kwargs": {"x": 1},
            "token": "two",
            "activation_fn": torch.nn.Tanh(),
        },
    )
    assert a.spec == b.spec
    assert hash(a.spec) == hash(b.spec)
    assert a.spec.option("token") == "one"
    assert b.spec.option("token") == "two"
    sigmoid = SharedRerankCompressor(model="m", model_kwargs={"activation_fn": torch.nn.Sigmoid()})
    assert sigmoid.score_mode == "sigmoid"
    assert sigmoid.spec == SharedRerankCompressor(model="m", score_mode="sigmoid").spec


class _Temperature(torch.nn.Module):
    """A custom activation whose repr (``_Temperature()``) omits its setting."""

    def __init__(self, t: float) -> None:
        super().__init__()
        self.t = t

    def forward(self, x: Any) -> Any:
        return torch.sigmoid(x / self.t)


def test_custom_activations_differing_in_a_setting_their_repr_omits_are_two_keys() -> None:
    """Keyed by type and repr alone, sigmoid(x / 0.01) and sigmoid(x / 100) shared one pool slot,
    so the second adapter scored with the first one's activation."""

    def spec(t: float) -> Any:
        return SharedCrossEncoder(model_name="m", model_kwargs={"activation_fn": _Temperature(t)})

    assert spec(0.01).spec != spec(100.0).spec
    assert spec(0.01).spec == spec(0.01).spec  # equal settings still share one load


@pytest.mark.parametrize("key", ["torch_dtype", "dtype"])
def test_a_nested_dtype_of_none_means_not_given(key: str) -> None:
    """transformers reads ``torch_dtype=None`` as not given (``torch.float16 if gpu else None``
    is common); it was refused as "Unsupported dtype 'None'"."""
    from rag_rerank_plugins.llama_index import SharedEmbedding

    nested = {"model_kwargs": {key: None}}
    assert SharedCrossEncoder(model_name="m", model_kwargs=nested).spec == (
        SharedCrossEncoder(model_name="m").spec
    )
    assert SharedEmbeddings(model_name="m", model_kwargs=nested).spec == (
        SharedEmbeddings(model_name="m").spec
    )
    assert SharedEmbedding(model_name="m", model_kwargs={key: None}).spec == (
        SharedEmbedding(model_name="m").spec
    )


def test_an_old_argument_name_given_as_none_means_not_given() -> None:
    """``token="x", use_auth_token=None`` (the old name left at its default, as wrappers pass
    it) was refused as a contradiction; stock and sentence-transformers ignore the None."""
    from rag_rerank_plugins.llama_index import SharedEmbedding, SharedRerankPostprocessor

    assert SharedEmbedding(model_name="m", token="x", use_auth_token=None).spec == (
        SharedEmbedding(model_name="m", token="x").spec
    )
    both = {"processor_kwargs": {"model_max_length": 9}, "tokenizer_kwargs": None}
    assert SharedCrossEncoder(model_name="m", model_kwargs=both).spec == (
        SharedCrossEncoder(
            model_name="m", model_kwargs={"processor_kwargs": both["processor_kwargs"]}
        ).spec
    )
    rr = SharedRerankPostprocessor(
        model="m", cross_encoder_kwargs={"cache_folder": "/x", "cache_dir": None}
    )
    assert (
        rr.spec
        == SharedRerankPostprocessor(model="m", cross_encoder_kwargs={"cache_folder": "/x"}).spec
    )


# -- side by side: FP32 scores and vectors equal the stock class's ---------------------------------


@pytest.fixture(scope="module")
def two_label_path(tmp_path_factory: pytest.TempPathFactory, minilm_path: str) -> str:
    from rag_rerank_plugins.testing import build_cross_encoder

    path = tmp_path_factory.mktemp("stock") / "two-label"
    return str(build_cross_encoder(path, hidden_size=64, intermediate_size=128, num_labels=2))


@pytest.fixture(scope="module")
def prompted_path(tmp_path_factory: pytest.TempPathFactory, minilm_path: str) -> str:
    """MiniLM whose sentence-transformers config declares query/document prompts."""
    model = SentenceTransformer(minilm_path, device="cpu")
    model.prompts = {"query": "query: ", "document": "passage: ", "other": "topic: "}
    path = tmp_path_factory.mktemp("stock") / "prompted"
    model.save(str(path))
    return str(path)


def _stock_ce(path: str, kwargs: dict[str, Any]) -> Any:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return HuggingFaceCrossEncoder(model_name=path, model_kwargs=dict(kwargs))


CE_CASES: list[dict[str, Any]] = [
    {},
    {"device": "cpu", "max_length": 12},
    {"activation_fn": torch.nn.Identity()},
    {"activation_fn": torch.nn.Sigmoid()},
    {"activation_fn": torch.nn.Tanh()},
    {"model_kwargs": {"torch_dtype": torch.float32, "attn_implementation": "eager"}},
    {"token": SECRET, "local_files_only": True, "revision": None, "trust_remote_code": False},
    {"config_kwargs": {"hidden_dropout_prob": 0.3}, "processor_kwargs": {"model_max_length": 10}},
    {"tokenizer_kwargs": {"model_max_length": 10}, "cache_folder": None},
    {"prompts": {"p": "instruct: "}, "default_prompt_name": "p"},
    {"num_labels": None, "use_kernels": False, "model_card_data": None, "backend": "torch"},
    {"keep_in_fp32_modules": []},
]


@pytest.mark.parametrize("labels", [1, 2])
@pytest.mark.parametrize("kwargs", CE_CASES, ids=lambda k: ",".join(k) or "defaults")
def test_cross_encoder_scores_equal_the_stock_class(
    kwargs: dict[str, Any], labels: int, tiny_ce_path: str, two_label_path: str
) -> None:
    path = tiny_ce_path if labels == 1 else two_label_path
    want = np.asarray(list(_stock_ce(path, kwargs).score(PAIRS)), dtype=np.float64)
    ours = SharedCrossEncoder(model_name=path, model_kwargs=dict(kwargs), pool=ModelPool())
    got = np.asarray(ours.score(PAIRS))
    np.testing.assert_allclose(got, want, atol=1e-5)
    assert list(np.argsort(-got)) == list(np.argsort(-want))


@pytest.mark.parametrize("labels", [1, 2])
def test_compressor_takes_cross_encoder_rerankers_model(
    labels: int, tiny_ce_path: str, two_label_path: str
) -> None:
    path = tiny_ce_path if labels == 1 else two_label_path
    docs = [Document(page_content=t, metadata={"i": i}) for i, (_, t) in enumerate(PAIRS)]
    query = PAIRS[0][0]
    stock_encoder = _stock_ce(path, {"max_length": 32})
    want = CrossEncoderReranker(model=stock_encoder, top_n=2).compress_documents(docs, query)
    pool = ModelPool()
    shared = SharedCrossEncoder(model_name=path, model_kwargs={"max_length": 32}, pool=pool)
    for model in (stock_encoder, shared):
        got = SharedRerankCompressor(model=model, top_n=2, pool=pool).compress_documents(
            docs, query
        )
        assert [d.metadata["i"] for d in got] == [d.metadata["i"] for d in want]
    custom = SharedRerankCompressor(model=stock_encoder, top_n=3)
    assert custom.spec.model == path
    assert custom.max_length == 32


def test_compressor_scores_with_a_custom_cross_encoder() -> None:
    from langchain_core.cross_encoders import BaseCrossEncoder

    class Length(BaseCrossEncoder):
        def score(self, text_pairs: list[tuple[str, str]]) -> list[float]:
            return [float(len(p)) for _, p in text_pairs]

    docs = [Document(page_content=t) for t in ("ab", "abcd", "a")]
    want = CrossEncoderReranker(model=Length(), top_n=2).compress_documents(docs, "q")
    compressor = SharedRerankCompressor(model=Length(), top_n=2)
    assert [d.page_content for d in compressor.compress_documents(docs, "q")] == [
        d.page_content for d in want
    ]
    got = asyncio.run(compressor.acompress_documents(docs, "q"))
    assert [d.page_content for d in got] == ["abcd", "ab"]
    # Rebuilt from its dump, as stock's is: the same scorer (it became the word-overlap fake),
    # and no JSON form, as stock has none.
    stock_again = CrossEncoderReranker(**CrossEncoderReranker(model=Length()).model_dump())
    again = SharedRerankCompressor(**compressor.model_dump())
    assert again.model_dump()["model"] is compressor.model_dump()["model"]
    assert [d.page_content for d in again.compress_documents(docs, "q")] == [
        d.page_content for d in stock_again.compress_documents(docs, "q")[:2]
    ]
    for dumped in (CrossEncoderReranker(model=Length()), compressor):
        with pytest.raises(PydanticSerializationError):
            dumped.model_dump_json()


EMB_CASES: list[dict[str, Any]] = [
    {},
    {"encode_kwargs": {"normalize_embeddings": True, "batch_size": 2}},
    {"encode_kwargs": {"prompt_name": "document"}, "query_encode_kwargs": {"prompt_name": "query"}},
    {"encode_kwargs": {"prompt": "abc: ", "normalize_embeddings": True}},
    {"encode_kwargs": {"normalize_embeddings": True}, "query_encode_kwargs": {"prompt": "q: "}},
    {"encode_kwargs": {"precision": "binary"}, "query_encode_kwargs": {"precision": "ubinary"}},
    {"encode_kwargs": {"truncate_dim": 16, "normalize_embeddings": True}},
    {"encode_kwargs": {"convert_to_tensor": True, "chunk_size": 4, "device": "cpu"}},
    {"model_kwargs": {"default_prompt_name": "other", "similarity_fn_name": "dot"}},
    {"model_kwargs": {"prompts": {"zz": "zz: "}, "default_prompt_name": "zz", "truncate_dim": 8}},
    {
        "model_kwargs": {
            "token": SECRET,
            "local_files_only": True,
            "model_kwargs": {"dtype": "float32"},
        }
    },
    {"model_kwargs": {"config_kwargs": {"hidden_dropout_prob": 0.2}, "tokenizer_kwargs": {}}},
    {"cache_folder": None, "show_progress": True, "multi_process": False},
]


@pytest.mark.parametrize("kwargs", EMB_CASES, ids=lambda k: repr(k)[:60])
def test_embeddings_equal_the_stock_class(kwargs: dict[str, Any], prompted_path: str) -> None:
    """On a model with configured prompts: the stock class applies none unless asked."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        stock = HuggingFaceEmbeddings(model_name=prompted_path, **kwargs)
    ours = SharedEmbeddings(model_name=prompted_path, pool=ModelPool(), **kwargs)
    np.testing.assert_allclose(
        np.asarray(ours.embed_documents(DOCS), dtype=np.float64),
        np.asarray(stock.embed_documents(DOCS), dtype=np.float64),
        atol=1e-5,
    )
    np.testing.assert_allclose(ours.embed_query(QUERY), stock.embed_query(QUERY), atol=1e-5)
    np.testing.assert_allclose(
        asyncio.run(ours.aembed_query(QUERY)), stock.embed_query(QUERY), atol=1e-5
    )
    np.testing.assert_allclose(
        np.asarray(asyncio.run(ours.aembed_documents(DOCS)), dtype=np.float64),
        np.asarray(stock.embed_documents(DOCS), dtype=np.float64),
        atol=1e-5,
    )


def test_a_left_padding_tokenizer_gets_the_stock_results_alone_and_in_any_pass(
    real_ce_path: str, minilm_path: str
) -> None:
    """``processor_kwargs={"padding_side": "left"}`` on a BERT (absolute positions). Our
    length-bucket padding went on the left too and moved every token's position, so even one
    text differed from stock (0.15 on a vector); and the tokenizer's own left padding moved
    each row by its padding, so an item depended on what shared its pass (0.065 beside a long
    text). The torch backends right-align a left-padded pass: every item equals its own
    single-text stock result (stock is exact for one text; several in a left-padded batch move
    in stock itself)."""
    left = {"device": "cpu", "processor_kwargs": {"padding_side": "left"}}
    long_text = "energy " * 100
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        stock = HuggingFaceEmbeddings(model_name=minilm_path, model_kwargs=left)
        stock_ce = HuggingFaceCrossEncoder(model_name=real_ce_path, model_kwargs=left)
    pool = ModelPool()
    try:
        ours = SharedEmbeddings(model_name=minilm_path, model_kwargs=left, pool=pool)
        ours_ce = SharedCrossEncoder(model_name=real_ce_path, model_kwargs=left, pool=pool)
        for text in [QUERY, *DOCS]:  # one text at a time
            np.testing.assert_allclose(ours.embed_query(text), stock.embed_query(text), atol=1e-5)
            pair = [(QUERY, text)]
            np.testing.assert_allclose(ours_ce.score(pair), stock_ce.score(pair), atol=1e-5)
        mixed = ours.embed_documents([QUERY, long_text, *DOCS])  # beside a long text
        mixed_scores = ours_ce.score([(QUERY, long_text), *[(QUERY, d) for d in DOCS]])
        for i, text in enumerate(DOCS):
            np.testing.assert_allclose(mixed[i + 2], stock.embed_documents([text])[0], atol=1e-5)
            alone = stock_ce.score([(QUERY, text)])[0]
            np.testing.assert_allclose(mixed_scores[i + 1], alone, atol=1e-5)
    finally:
        pool.clear()


def test_right_aligned_moves_left_padding_only() -> None:
    from rag_rerank_plugins.backends._torch_common import right_aligned

    ids = torch.tensor([[0, 0, 5, 6], [7, 8, 9, 4], [0, 3, 2, 1]])
    mask = (ids != 0).long()
    out = right_aligned({"input_ids": ids, "attention_mask": mask})
    assert out["input_ids"].tolist() == [[5, 6, 0, 0], [7, 8, 9, 4], [3, 2, 1, 0]]
    assert out["attention_mask"].tolist() == [[1, 1, 0, 0], [1, 1, 1, 1], [1, 1, 1, 0]]
    right = {"input_ids": out["input_ids"], "attention_mask": out["attention_mask"]}
    assert right_aligned(right) is right  # already right-padded: untouched
    holes = {"input_ids": ids, "attention_mask": torch.tensor([[1, 0, 1, 1]] * 3)}
    assert right_aligned(holes) is holes  # not a left-padded mask: untouched


def test_int8_precision_uses_the_calls_own_ranges(prompted_path: str) -> None:
    """int8 buckets come from the call's vectors (as encode); FP32 noise may move a value by one
    bucket, so equality is within one step. A single query cannot be int8 (both raise)."""
    kwargs = {"encode_kwargs": {"precision": "int8"}}
    stock = HuggingFaceEmbeddings(model_name=prompted_path, **kwargs)
    ours = SharedEmbeddings(model_name=prompted_path, pool=ModelPool(), **kwargs)
    got, want = np.asarray(ours.embed_documents(DOCS)), np.asarray(stock.embed_documents(DOCS))
    assert got.dtype.kind == want.dtype.kind == "i"
    assert np.abs(got - want).max() <= 1
    with pytest.raises(ValueError, match="single embedding"):
        ours.embed_query(QUERY)


def test_model_prompts_opt_in_and_empty_prompt_turns_them_off(
    prompted_path: str, minilm_path: str
) -> None:
    reference = SentenceTransformer(prompted_path, device="cpu")
    pool = ModelPool()
    opted = SharedEmbeddings(model_name=prompted_path, model_prompts=True, pool=pool)
    np.testing.assert_allclose(
        opted.embed_query("hello"), reference.encode_query("hello").tolist(), atol=1e-5
    )
    np.testing.assert_allclose(
        opted.embed_documents(["hello"])[0], reference.encode_document(["hello"])[0], atol=1e-5
    )
    off = SharedEmbeddings(
        model_name=prompted_path, model_prompts=True, encode_kwargs={"prompt": ""}, pool=pool
    )
    plain = reference.encode(["hello"], prompt="")[0]
    np.testing.assert_allclose(off.embed_query("hello"), plain, atol=1e-5)
    assert np.abs(np.asarray(opted.embed_query("hello")) - plain).max() > 1e-3


def test_unknown_prompt_name_says_what_to_do(prompted_path: str) -> None:
    emb = SharedEmbeddings(
        model_name=prompted_path, encode_kwargs={"prompt_name": "nope"}, pool=ModelPool()
    )
    with pytest.raises(Exception, match=r"'nope' not found.*prompts"):
        emb.embed_documents(["x"])


# -- the token: handed to the loader, never shown -------------------------------------------------


def test_token_reaches_the_loader_and_never_shows(
    tiny_ce_path: str, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    seen: list[Any] = []
    original = CrossEncoder.__init__

    def spy(self: Any, *args: Any, **kwargs: Any) -> None:
        seen.append(kwargs.get("token"))
        original(self, *args, **kwargs)

    monkeypatch.setattr(CrossEncoder, "__init__", spy)
    pool = ModelPool()
    caplog.set_level(logging.DEBUG)
    encoder = SharedCrossEncoder(
        model_name=tiny_ce_path,
        model_kwargs={"token": SECRET, "config_kwargs": {"token": SECRET}},
        pool=pool,
    )
    encoder.score(PAIRS[:2])
    assert seen == [SECRET]
    shown = [
        repr(encoder),
        str(encoder),
        repr(encoder.spec),
        str(encoder.spec),
        encoder.spec.label,
        repr(encoder.stats()),
        repr(pool.stats()),
        repr(encoder.model_dump()),
        caplog.text,
    ]
    for text in shown:
        assert SECRET not in text
    with pytest.raises(Exception) as info:  # noqa: PT011 - any load error
        SharedCrossEncoder(
            model_name="/nonexistent/model", model_kwargs={"token": SECRET}, pool=pool
        ).score(PAIRS[:1])
    assert SECRET not in str(info.value)
    assert SECRET not in caplog.text


def test_secret_pickles_with_its_value() -> None:
    import pickle

    spec = SharedCrossEncoder(model_name="m", model_kwargs={"token": SECRET}).spec
    copy = pickle.loads(pickle.dumps(spec))
    assert copy == spec
    assert copy.option("token") == SECRET
    assert SECRET not in repr(copy)


def test_paths_are_accepted(tmp_path: Path) -> None:
    emb = SharedEmbeddings(model_name="m", cache_folder=tmp_path)
    assert emb.spec.option("cache_folder") == tmp_path


def test_cache_dir_keeps_its_meaning_on_our_own_backends() -> None:
    """CrossEncoder's old ``cache_dir`` is its ``cache_folder`` (the hub cache) on the
    sentence-transformers backend; on our ONNX/OpenVINO/flag backends ``cache_dir`` is their
    own option (where exports live) and must reach them unchanged."""
    from rag_rerank_plugins.langchain import SharedRerankCompressor

    torch_side = SharedRerankCompressor(model="m", model_kwargs={"cache_dir": "/tmp/hub"})
    assert torch_side.spec.option("cache_folder") == "/tmp/hub"
    onnx_side = SharedRerankCompressor(
        model="m", backend="onnx-cross-encoder", model_kwargs={"cache_dir": "/tmp/exports"}
    )
    assert onnx_side.spec.option("cache_dir") == "/tmp/exports"
    assert onnx_side.spec.option("cache_folder") is None


def test_use_auth_token_is_a_hidden_token_for_cross_encoders_too() -> None:
    """migration.md: ``token`` and ``use_auth_token`` in ``model_kwargs`` are handed to the
    loader and never shown. Before, ``SharedCrossEncoder`` refused ``use_auth_token``."""
    ce = SharedCrossEncoder(model_name="m", model_kwargs={"use_auth_token": SECRET})
    assert ce.spec == SharedCrossEncoder(model_name="m", model_kwargs={"token": SECRET}).spec
    assert ce.spec.option("token") == SECRET
    assert SECRET not in repr(ce)
    assert SECRET not in ce.model_dump_json()
