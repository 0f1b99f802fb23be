"""Backend options are checked when an adapter is built, not when the model first loads.

Each built-in backend declares the option names its loader reads (``BackendInfo.options``);
adapters reject any other name at construction with the accepted ones in the message. These
tests also keep the declarations honest against the backend modules and the real libraries.
"""

from __future__ import annotations

import inspect
import uuid

import pytest

pytest.importorskip("langchain_core")

from pydantic import ValidationError

from rag_rerank_plugins import ConfigurationError, ModelPool
from rag_rerank_plugins.backends import available_backends, check_options, register_backend
from rag_rerank_plugins.langchain import (
    SharedCrossEncoder,
    SharedEmbeddings,
    SharedRerankCompressor,
)
from rag_rerank_plugins.testing import FakeReranker

#: Options that are ours, not the wrapped library's keyword arguments.
OURS = {"score_mode", "score_label", "quantize", "cpu_kernels", "prune_last_layer"}


# -- model_kwargs={"max_length": ...} like HuggingFaceCrossEncoder --------------------------------


def test_model_kwargs_max_length_becomes_the_specs_max_length(
    pool: ModelPool, tiny_ce_path: str
) -> None:
    model = SharedCrossEncoder(
        model_name=tiny_ce_path, model_kwargs={"device": "cpu", "max_length": 128}, pool=pool
    )
    assert (model.device, model.max_length, model.model_kwargs) == ("cpu", 128, {})
    assert model.spec.max_length == 128
    scores = model.score([("query", "a passage"), ("query", "another")])
    assert len(scores) == 2
    assert model.stats()["loads"] == 1
    emb = SharedEmbeddings(model="e", backend="fake-embedder", model_kwargs={"max_length": 64})
    assert (emb.max_length, emb.model_kwargs) == (64, {})


def test_model_kwargs_max_length_conflicting_with_max_length_is_an_error() -> None:
    with pytest.raises(ValidationError, match=r"max_length=256.*model_kwargs\['max_length'\]=128"):
        SharedCrossEncoder(model_name="m", max_length=256, model_kwargs={"max_length": 128})
    same = SharedCrossEncoder(model_name="m", max_length=128, model_kwargs={"max_length": 128})
    assert same.max_length == 128


# -- unknown option names fail at construction -----------------------------------------------------


@pytest.mark.parametrize(
    ("cls", "kwargs", "match"),
    [
        (
            SharedRerankCompressor,
            {"model_kwargs": {"trust_remote_cod": True}},
            r"'cross-encoder' does not accept option\(s\) 'trust_remote_cod'"
            r".*Accepted: .*trust_remote_code",
        ),
        (
            SharedCrossEncoder,
            # CrossEncoder takes a callable (torch.nn.Sigmoid() -> score_mode), not a name.
            {"model_kwargs": {"activation_fn": "sigmoid"}},
            r"'activation_fn'.*callable.*score_mode",
        ),
        (
            SharedCrossEncoder,
            # Dict-valued options are spec options now (issue 25), on the torch backends only.
            {"backend": "onnx-cross-encoder", "model_kwargs": {"config_kwargs": {"a": 1}}},
            r"'config_kwargs'.*sentence-transformers backends.*take the dict-valued",
        ),
        (
            SharedCrossEncoder,
            # A token is a secret option of the torch backends now (issue 25), never shown.
            {"backend": "onnx-cross-encoder", "model_kwargs": {"token": "hf_secret"}},
            r"'token'.*does not read a hub token.*HF_TOKEN",
        ),
        (
            SharedEmbeddings,
            {"model_kwargs": {"torch_dtype": "float16"}},
            r"'sentence-transformers'.*'torch_dtype'.*dtype=",
        ),
        (
            SharedRerankCompressor,
            {"backend": "fake-reranker", "model_kwargs": {"delay": 5}},
            r"'fake-reranker'.*'delay'.*Accepted: .*cache_folder, .*delay_ms, ",
        ),
        (
            SharedRerankCompressor,
            {"backend": "remote-reranker", "model_kwargs": {"protocl": "tei"}},
            r"'protocl'.*Accepted: .*protocol",
        ),
        (
            SharedRerankCompressor,
            {"backend": "bi-encoder", "score_mode": "raw"},
            r"'bi-encoder'.*'score_mode'",
        ),
        (
            SharedRerankCompressor,
            {
                "backend": "bi-encoder",
                "model_kwargs": {"embedder_backend": "fake-embedder", "x": 1},
            },
            r"'fake-embedder'\) does not accept option\(s\) 'x'"
            r".*Accepted: .*cache_folder, .*delay_ms, dim, embedder_backend",
        ),
        (
            SharedRerankCompressor,
            {"backend": "bi-encoder", "model_kwargs": {"embedder_backend": "fake-reranker"}},
            r"embedder_backend.*'fake-reranker' is a reranker",
        ),
    ],
)
def test_unknown_backend_options_fail_at_construction(
    pool: ModelPool, cls: type, kwargs: dict, match: str
) -> None:
    with pytest.raises(ValidationError, match=match):
        cls(model="m", pool=pool, **kwargs)
    assert pool.loaded_specs() == []


def test_options_the_backends_read_are_accepted(pool: ModelPool) -> None:
    SharedRerankCompressor(
        model="m",
        model_kwargs={"trust_remote_code": True, "revision": "main", "quantize": "int8"},
        score_mode="raw",
    )
    SharedCrossEncoder(model_name="m", model_kwargs={"cache_folder": "/tmp/x", "revision": "v1"})
    SharedEmbeddings(model="m", model_kwargs={"truncate_dim": 128, "local_files_only": True})
    SharedRerankCompressor(model="m", backend="flag-reranker", score_mode="sigmoid")
    SharedEmbeddings(model="m", backend="flag-bge-m3", model_kwargs={"cache_dir": "/tmp/x"})
    SharedRerankCompressor(
        model="m",
        backend="bi-encoder",
        model_kwargs={"embedder_backend": "fake-embedder", "dim": 32},
        pool=pool,
    )
    SharedEmbeddings(model="http://h:1", backend="remote-embedder", model_kwargs={"retries": 1})
    assert pool.loaded_specs() == []


def test_registered_backends_accept_any_option_unless_they_declare_theirs() -> None:
    anything = f"any-{uuid.uuid4().hex[:8]}"
    register_backend(anything, lambda spec, pool: FakeReranker(), "reranker")
    assert SharedRerankCompressor(model="m", backend=anything, model_kwargs={"x": 1}).spec
    declared = f"declared-{uuid.uuid4().hex[:8]}"
    register_backend(declared, lambda spec, pool: FakeReranker(), "reranker", options={"alpha"})
    assert SharedRerankCompressor(model="m", backend=declared, model_kwargs={"alpha": 1}).spec
    with pytest.raises(ValidationError, match=r"'beta'.*Accepted: alpha"):
        SharedRerankCompressor(model="m", backend=declared, model_kwargs={"beta": 1})
    with pytest.raises(ConfigurationError, match="beta"):
        check_options(declared, {"beta": 1})


# -- the declarations match the code that reads the options ----------------------------------------


def test_declared_options_match_the_backend_modules() -> None:
    from rag_rerank_plugins.backends import remote

    backends = available_backends()
    assert backends["remote-reranker"].options == remote.settings.REMOTE_OPTIONS
    assert backends["remote-embedder"].options == remote.settings.REMOTE_OPTIONS
    # The fakes take (and ignore) a real model's loading options, so a test can swap them in.
    from rag_rerank_plugins.backends.options import ST_CROSS_ENCODER, ST_EMBEDDER

    loading = set(ST_CROSS_ENCODER | ST_EMBEDDER) | {"score_mode", "score_label"}
    assert backends["fake-reranker"].options == {"delay_ms", "footprint_mb"} | loading
    assert backends["fake-embedder"].options == {"delay_ms", "dim", "footprint_mb"} | loading
    assert backends["bi-encoder"].options == {"embedder_backend"}


def test_the_llm_rerankers_pass_every_other_declared_option_to_their_model_class() -> None:
    """causal_lm and flag_llm read a few options and hand the rest of their row's to the model
    class's constructor: each of those must be one of its keyword arguments."""
    from rag_rerank_plugins.backends.causal_lm import CausalLMReranker
    from rag_rerank_plugins.backends.flag_llm import FlagLLMReranker
    from rag_rerank_plugins.backends.options import HF_LOADING

    backends = available_backends()
    for name, cls, read in [
        ("causal-lm-reranker", CausalLMReranker, {"score_mode"}),
        ("flag-llm-reranker", FlagLLMReranker, {"score_mode", "model_class", "cutoff_layers"}),
    ]:
        declared = backends[name].options
        assert declared is not None
        passed = declared - HF_LOADING - read
        assert passed, name
        assert sorted(passed - set(inspect.signature(cls.__init__).parameters)) == [], name


def test_declared_flag_embedding_options_are_real_keyword_arguments() -> None:
    flag = pytest.importorskip("FlagEmbedding")
    backends = available_backends()
    for name, cls in [
        ("flag-reranker", flag.FlagReranker),
        ("flag-bge-m3", flag.BGEM3FlagModel),
    ]:
        declared = backends[name].options
        assert declared is not None
        params = inspect.signature(cls.__init__).parameters
        assert sorted(declared - OURS - set(params)) == [], name


def test_declared_sentence_transformers_options_are_real_keyword_arguments() -> None:
    st = pytest.importorskip("sentence_transformers")
    backends = available_backends()
    for name, cls in [
        ("cross-encoder", st.CrossEncoder),
        ("sentence-transformers", st.SentenceTransformer),
    ]:
        declared = backends[name].options
        assert declared is not None
        params = inspect.signature(cls.__init__).parameters
        assert sorted(declared - OURS - set(params)) == [], name
