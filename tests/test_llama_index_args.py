"""LlamaIndex adapters take the arguments of the classes they replace, and reject the rest.

Before, unknown keyword arguments were silently dropped: ``SharedRerankPostprocessor(topn=5)``
kept ``top_n=2`` and ``SharedEmbedding(query_instruction=...)`` embedded without the instruction
(vectors 4e-2 away from ``HuggingFaceEmbedding``'s).
"""

from __future__ import annotations

import asyncio
import json
import pickle

import numpy as np
import pytest

pytest.importorskip("llama_index.core")

from llama_index.core.callbacks import CallbackManager, CBEventType, LlamaDebugHandler
from llama_index.core.schema import NodeWithScore, TextNode
from pydantic import ValidationError

from rag_rerank_plugins import ModelPool, ModelSpec
from rag_rerank_plugins.llama_index import SharedEmbedding, SharedRerankPostprocessor

QUERY = "which organelle produces ATP?"
QI = "Represent this question for searching relevant passages: "
TI = "passage: "


def _fake_embedding(pool: ModelPool, **kwargs) -> SharedEmbedding:
    return SharedEmbedding(model_name="f", backend="fake-embedder", pool=pool, **kwargs)


# -- instructions ------------------------------------------------------------------------------


def test_instructions_equal_sentence_transformers_prompt(
    pool: ModelPool, minilm_path: str, direct_embedder, passages: list[str]
) -> None:
    emb = SharedEmbedding(
        model_name=minilm_path,
        device="cpu",
        dtype="float32",
        query_instruction=QI,
        text_instruction=TI,
        embed_batch_size=3,
        pool=pool,
    )
    docs = direct_embedder.encode(passages, prompt=TI, normalize_embeddings=True)
    query = direct_embedder.encode([QUERY], prompt=QI, normalize_embeddings=True)[0]
    np.testing.assert_allclose(emb.get_text_embedding_batch(passages), docs, atol=1e-5)
    np.testing.assert_allclose(emb.get_text_embedding(passages[0]), docs[0], atol=1e-5)
    np.testing.assert_allclose(emb.get_query_embedding(QUERY), query, atol=1e-5)
    np.testing.assert_allclose(
        asyncio.run(emb.aget_text_embedding_batch(passages)), docs, atol=1e-5
    )
    np.testing.assert_allclose(asyncio.run(emb.aget_query_embedding(QUERY)), query, atol=1e-5)
    # The instructions matter (this is what was silently dropped), and they are per call: an
    # adapter without them shares the model and still gets the model's own embeddings.
    plain = SharedEmbedding(model_name=minilm_path, device="cpu", dtype="float32", pool=pool)
    assert plain.spec == emb.spec
    assert np.abs(np.array(plain.get_query_embedding(QUERY)) - query).max() > 1e-2
    np.testing.assert_allclose(
        plain.get_query_embedding(QUERY),
        direct_embedder.encode_query([QUERY], normalize_embeddings=True)[0],
        atol=1e-5,
    )
    assert pool.spec_stats(emb.spec)["loads"] == 1


def test_instructions_equal_huggingface_embedding(minilm_path: str, passages: list[str]) -> None:
    """Against the anchor itself, where llama-index-embeddings-huggingface is installed."""
    hf_module = pytest.importorskip("llama_index.embeddings.huggingface")
    pool = ModelPool()
    for instructions in ({}, {"query_instruction": QI, "text_instruction": TI}):
        hf = hf_module.HuggingFaceEmbedding(model_name=minilm_path, device="cpu", **instructions)
        ours = SharedEmbedding(
            model_name=minilm_path, device="cpu", dtype="float32", pool=pool, **instructions
        )
        np.testing.assert_allclose(
            ours.get_text_embedding_batch(passages),
            hf.get_text_embedding_batch(passages),
            atol=1e-5,
        )
        np.testing.assert_allclose(
            ours.get_query_embedding(QUERY), hf.get_query_embedding(QUERY), atol=1e-5
        )
    pool.clear()


def test_empty_instruction_means_no_prompt(pool: ModelPool) -> None:
    # HuggingFaceEmbedding: `query_instruction or <default for the name>` ('' for most names).
    plain = _fake_embedding(pool)
    empty = _fake_embedding(pool, query_instruction="", text_instruction="")
    assert empty.get_query_embedding("a b c") == plain.get_query_embedding("a b c")
    assert empty.get_text_embedding("a b c") == plain.get_text_embedding("a b c")
    prompted = _fake_embedding(pool, query_instruction="alpha beta ")
    assert prompted.get_query_embedding("a b c") != plain.get_query_embedding("a b c")
    assert prompted.get_text_embedding("a b c") == plain.get_text_embedding("a b c")


# -- HuggingFaceEmbedding's other arguments ----------------------------------------------------


def test_huggingface_embedding_arguments_are_accepted(pool: ModelPool, tmp_path) -> None:
    debug = LlamaDebugHandler()
    emb = SharedEmbedding(
        model_name="f",
        backend="fake-embedder",
        device=None,  # HuggingFaceEmbedding: None = infer
        max_length=128,
        embed_batch_size=4,
        normalize=False,
        trust_remote_code=True,
        cache_folder=str(tmp_path),
        show_progress_bar=True,
        num_workers=2,
        callback_manager=CallbackManager([debug]),
        pool=pool,
    )
    assert emb.device == "auto"
    assert emb.show_progress is True
    assert emb.spec.option("trust_remote_code") is True
    assert emb.spec.option("cache_folder") == str(tmp_path)
    texts = [f"text number {i}" for i in range(10)]
    sync = emb.get_text_embedding_batch(texts)
    assert asyncio.run(emb.aget_text_embedding_batch(texts)) == sync  # num_workers=2 path
    assert debug.get_event_pairs(CBEventType.EMBEDDING), "callback events still fire"


def test_backend_options_only_when_set(pool: ModelPool) -> None:
    spec = SharedEmbedding(model_name="m").spec
    assert spec.options == ()
    assert SharedEmbedding(model_name="m", trust_remote_code=False).spec == spec
    assert SharedEmbedding(model_name="m", query_instruction=QI).spec == spec
    assert spec == ModelSpec("m", backend="sentence-transformers", device="auto", dtype="auto")
    same = SharedEmbedding(model_name="m", model_kwargs={"trust_remote_code": True})
    assert SharedEmbedding(model_name="m", trust_remote_code=True).spec == same.spec
    with pytest.raises(ValidationError, match="contradicts"):
        SharedEmbedding(model_name="m", cache_folder="/a", model_kwargs={"cache_folder": "/b"})


@pytest.mark.parametrize("cls", ["SharedEmbedding", "SharedRerankPostprocessor"])
@pytest.mark.parametrize(
    ("field", "option"),
    [
        ({"trust_remote_code": True}, {"trust_remote_code": False}),
        ({"trust_remote_code": False}, {"trust_remote_code": True}),
        ({"cache_folder": "/a"}, {"cache_folder": "/b"}),
    ],
)
def test_a_field_contradicting_model_kwargs_is_refused(cls: str, field: dict, option: dict) -> None:
    """bad-input L05. Only the embedding's cache_folder was refused: True won over an explicit
    model_kwargs False (remote code ran where it was turned off), and the postprocessor took
    the field whatever model_kwargs said."""
    import rag_rerank_plugins.llama_index as li

    make = getattr(li, cls)
    name = {"model_name": "m"} if cls == "SharedEmbedding" else {"model": "m"}
    with pytest.raises(ValidationError, match="contradicts model_kwargs"):
        make(**name, **field, model_kwargs=option)
    agreeing = make(**name, **field, model_kwargs=dict(field))
    assert agreeing.spec == make(**name, **field).spec


def test_cache_folder_and_trust_remote_code_reach_sentence_transformers(
    pool: ModelPool, minilm_path: str, tmp_path, monkeypatch
) -> None:
    import sentence_transformers

    seen: list[dict] = []
    real = sentence_transformers.SentenceTransformer

    def spy(*args, **kwargs):
        seen.append(kwargs)
        return real(*args, **kwargs)

    monkeypatch.setattr(sentence_transformers, "SentenceTransformer", spy)
    emb = SharedEmbedding(
        model_name=minilm_path,
        device="cpu",
        cache_folder=str(tmp_path),
        trust_remote_code=True,
        pool=pool,
    )
    assert len(emb.get_query_embedding(QUERY)) == 384
    assert seen[0]["cache_folder"] == str(tmp_path)
    assert seen[0]["trust_remote_code"] is True


# -- unknown arguments -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("make", "needle"),
    [
        (lambda: SharedRerankPostprocessor(model="m", topn=5), "'topn' (did you mean 'top_n'?)"),
        (lambda: SharedRerankPostprocessor(model="m", devise="cpu"), "did you mean 'device'?"),
        (lambda: SharedRerankPostprocessor(model="m", query_instruction=QI), "'query_instruction'"),
        (lambda: SharedEmbedding(model_name="m", query_instructions=QI), "'query_instruction'?"),
        (lambda: SharedEmbedding(model_name="m", top_n=3), "unknown argument(s) 'top_n'"),
    ],
    ids=["topn", "devise", "post-instruction", "instructions", "emb-top_n"],
)
def test_unknown_arguments_fail_with_a_suggestion(make, needle: str) -> None:
    with pytest.raises(ValidationError) as info:
        make()
    assert needle in str(info.value)
    assert "It accepts:" in str(info.value)


@pytest.mark.parametrize(
    ("make", "needle"),
    [
        (lambda: SharedEmbedding(model_name="m", parallel_process=True), "parallel_process"),
        (lambda: SharedEmbedding(model="m"), "name the model with model_name="),
    ],
    ids=["parallel", "model"],
)
def test_stock_arguments_without_a_meaning_here_fail_saying_why(make, needle: str) -> None:
    with pytest.raises(ValidationError, match=needle):
        make()


def test_reranker_arguments_still_accepted(pool: ModelPool) -> None:
    post = SharedRerankPostprocessor(
        model="m",
        top_n=5,
        device="cpu",
        keep_retrieval_score=True,
        trust_remote_code=True,
        use_fp16=False,
        backend="cross-encoder",
        dtype="float32",
        max_length=256,
        score_threshold=0.1,
        batch_size=8,
        score_mode="raw",
        window_tokens=128,
        window_stride=64,
        window_query_tokens=32,
        window_aggregate="mean",
        on_error="passthrough",
        model_kwargs={"revision": "main"},
        callback_manager=CallbackManager([]),
        pool=pool,
    )
    assert post.top_n == 5
    assert post.spec.option("revision") == "main"


# -- serialisation round trips -----------------------------------------------------------------


def _adapters(pool: ModelPool) -> list:
    return [
        SharedEmbedding(
            model_name="f",
            backend="fake-embedder",
            query_instruction=QI,
            text_instruction=TI,
            cache_folder="/tmp/models",
            trust_remote_code=True,
            show_progress_bar=True,
            num_workers=2,
            embed_batch_size=7,
            pool=pool,
        ),
        SharedRerankPostprocessor(
            model="f",
            backend="fake-reranker",
            top_n=4,
            keep_retrieval_score=True,
            use_fp16=False,
            window_query_tokens=32,
            pool=pool,
        ),
    ]


@pytest.mark.parametrize("index", [0, 1], ids=["SharedEmbedding", "SharedRerankPostprocessor"])
def test_serialisation_round_trips(pool: ModelPool, index: int) -> None:
    adapter = _adapters(pool)[index]
    cls = type(adapter)
    data = adapter.to_dict()
    assert data["class_name"] == cls.class_name()
    json.loads(adapter.to_json())
    copies = [
        cls.from_dict(data),
        cls.from_json(adapter.to_json()),
        cls(**data),  # class_name naming this class is accepted
        cls.model_validate(adapter.model_dump()),
        pickle.loads(pickle.dumps(adapter)),
    ]
    for copy in copies:
        assert type(copy) is cls
        assert copy.to_dict() == data
        assert copy.spec == adapter.spec
    with pytest.raises(ValidationError, match="serialised 'Other'"):
        cls(**{**data, "class_name": "Other"})


def test_round_tripped_adapters_work(pool: ModelPool) -> None:
    emb, post = (type(a).from_json(a.to_json(), pool=pool) for a in _adapters(pool))
    assert emb.get_query_embedding("a b") == _adapters(pool)[0].get_query_embedding("a b")
    nodes = [NodeWithScore(node=TextNode(text=t), score=0.0) for t in ("a b", "c d", "a")]
    assert [n.node.text for n in post.postprocess_nodes(nodes, query_str="a b")][:1] == ["a b"]


# -- LlamaIndex machinery ----------------------------------------------------------------------


def test_settings_vector_index_and_query_engine(pool: ModelPool, monkeypatch) -> None:
    from llama_index.core import Settings, VectorStoreIndex
    from llama_index.core.llms import MockLLM
    from llama_index.core.query_engine import RetrieverQueryEngine
    from llama_index.core.response_synthesizers.no_text import NoText

    monkeypatch.setattr(Settings, "_embed_model", Settings._embed_model)  # restored afterwards
    emb = _fake_embedding(pool, query_instruction="", embed_batch_size=2)
    Settings.embed_model = emb
    assert Settings.embed_model is emb
    texts = ["cats sleep all day", "dogs bark at night", "cats purr", "fish swim"]
    index = VectorStoreIndex([TextNode(text=t, id_=f"n{i}") for i, t in enumerate(texts)])
    post = SharedRerankPostprocessor(model="f", backend="fake-reranker", top_n=2, pool=pool)
    engine = RetrieverQueryEngine.from_args(
        index.as_retriever(similarity_top_k=4),
        llm=MockLLM(),
        response_synthesizer=NoText(llm=MockLLM()),
        node_postprocessors=[post],
    )
    response = engine.query("cats")
    assert len(response.source_nodes) == 2
    assert all("cats" in n.node.get_content() for n in response.source_nodes)
    explicit = VectorStoreIndex(
        [TextNode(text=t) for t in texts], embed_model=_fake_embedding(pool, text_instruction="x ")
    )
    assert len(explicit.as_retriever(similarity_top_k=2).retrieve("cats")) == 2
