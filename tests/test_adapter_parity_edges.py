"""A migrating user's arguments, at the edges where our adapters disagreed with the stock classes.

* LlamaIndex ``SentenceTransformerRerank`` hands ``CrossEncoder`` ``max_length=512`` unless told
  otherwise, which overrides a tokenizer's own smaller limit (``model_max_length=128`` in
  ``tokenizer_config.json`` or in ``processor_kwargs``). Ours dropped the 512 whenever the
  tokenizer said 512 or less, and then cut passages at 128 tokens: other scores, ties.
* ``device`` given both as the field and in ``model_kwargs`` must agree (migration.md says a
  contradiction is refused); the field silently won.
* ``SharedEmbeddings`` read ``normalize_embeddings`` from the encode kwargs at construction and
  kept normalising after the key was removed (``model_copy(update=...)``, ``del``), where
  ``HuggingFaceEmbeddings`` reads its kwargs per call.
"""

from __future__ import annotations

import json
import shutil
import warnings
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("llama_index.core")
pytest.importorskip("langchain_huggingface")

from llama_index.core.schema import NodeWithScore, TextNode
from pydantic import ValidationError

from rag_rerank_plugins import ModelPool
from rag_rerank_plugins.langchain import (
    SharedCrossEncoder,
    SharedEmbeddings,
    SharedRerankCompressor,
)
from rag_rerank_plugins.llama_index import SharedRerankPostprocessor

QUERY = "what is the capital of france"
LONG = [
    "cats sleep on the sofa. " * 30 + "the capital of france is paris. " * 40,
    "cats sleep on the sofa. " * 30 + "quantum computers use qubits. " * 40,
]


@pytest.fixture(scope="module", autouse=True)
def _fp32(float32_policy: None) -> None:
    """Compared with stock classes, which compute in FP32."""


def _nodes() -> list[NodeWithScore]:
    return [NodeWithScore(node=TextNode(text=t, id_=str(i)), score=1.0) for i, t in enumerate(LONG)]


@pytest.fixture(scope="module")
def tokenizer_128(real_ce_path: str, tmp_path_factory: pytest.TempPathFactory) -> str:
    """The real-encoder cross-encoder (512 positions) with ``model_max_length=128``."""
    folder = tmp_path_factory.mktemp("tok128") / "ce"
    shutil.copytree(real_ce_path, folder)
    config = json.loads((folder / "tokenizer_config.json").read_text())
    config["model_max_length"] = 128
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    return str(folder)


@pytest.mark.parametrize("where", ["tokenizer_config", "processor_kwargs"])
def test_llama_index_reranker_reads_512_tokens_over_a_smaller_tokenizer_limit(
    where: str, real_ce_path: str, tokenizer_128: str
) -> None:
    from llama_index.postprocessor.sbert_rerank import SentenceTransformerRerank

    if where == "tokenizer_config":
        model, kwargs = tokenizer_128, None
    else:
        model, kwargs = real_ce_path, {"processor_kwargs": {"model_max_length": 128}}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        stock = SentenceTransformerRerank(model, device="cpu", top_n=2, cross_encoder_kwargs=kwargs)
    ours = SharedRerankPostprocessor(
        model, device="cpu", top_n=2, cross_encoder_kwargs=kwargs, pool=ModelPool()
    )
    assert stock._model.max_seq_length == 512
    assert ours.spec.max_length == 512
    want = stock.postprocess_nodes(_nodes(), query_str=QUERY)
    got = ours.postprocess_nodes(_nodes(), query_str=QUERY)
    assert [n.node.id_ for n in got] == [n.node.id_ for n in want]
    assert [n.score for n in got] == pytest.approx([n.score for n in want], abs=1e-4)
    assert got[0].score != pytest.approx(got[1].score, abs=1e-4)  # at 128 tokens both tied


def test_llama_index_reranker_keeps_one_key_where_512_is_the_models_own(real_ce_path: str) -> None:
    """A model whose own limit is 512 reads the same tokens either way: no max_length in the
    key, so LangChain's and LlamaIndex's adapters share one load."""
    ours = SharedRerankPostprocessor(real_ce_path, device="cpu", pool=ModelPool())
    assert ours.spec.max_length is None
    assert ours.spec == SharedRerankCompressor(model=real_ce_path, device="cpu").spec


@pytest.mark.parametrize(
    "make",
    [
        lambda: SharedCrossEncoder(model_name="m", device="cuda", model_kwargs={"device": "cpu"}),
        lambda: SharedRerankCompressor(model="m", device="cuda", model_kwargs={"device": "cpu"}),
        lambda: SharedEmbeddings(model_name="m", device="cuda", model_kwargs={"device": "cpu"}),
    ],
    ids=["SharedCrossEncoder", "SharedRerankCompressor", "SharedEmbeddings"],
)
def test_a_device_given_twice_must_agree(make) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises((ValidationError, ValueError), match="disagree"):
        make()


@pytest.mark.parametrize(
    ("field", "device"), [("cpu", "cpu"), ("cpu", "CPU"), ("cpu", " cpu"), ("cuda", "cuda:0")]
)
def test_the_same_device_given_twice_is_fine(field: str, device: str) -> None:
    adapter = SharedCrossEncoder(model_name="m", device=field, model_kwargs={"device": device})
    assert adapter.spec.device == ("cpu" if field == "cpu" else "cuda:0")
    alone = SharedCrossEncoder(model_name="m", model_kwargs={"device": "cpu"})
    assert alone.spec.device == "cpu"


@pytest.fixture(scope="module")
def minilm_without_normalize(minilm_path: str, tmp_path_factory: pytest.TempPathFactory) -> str:
    """The packaged MiniLM without its Normalize module: its vectors are not unit length, so
    whether a call normalises shows in the norms."""
    folder = tmp_path_factory.mktemp("nonorm") / "minilm"
    shutil.copytree(minilm_path, folder)
    modules = json.loads((folder / "modules.json").read_text())
    modules = [m for m in modules if not m["type"].endswith("Normalize")]
    (folder / "modules.json").write_text(json.dumps(modules))
    return str(folder)


def _norms(embeddings: object) -> tuple[float, float]:
    doc = embeddings.embed_documents(["red apples and green pears"])[0]  # type: ignore[attr-defined]
    query = embeddings.embed_query("red apples")  # type: ignore[attr-defined]
    return round(float(np.linalg.norm(doc)), 3), round(float(np.linalg.norm(query)), 3)


@pytest.mark.parametrize(
    ("built", "update"),
    [
        ({"encode_kwargs": {"normalize_embeddings": True}}, {"encode_kwargs": {}}),
        ({"encode_kwargs": {"normalize_embeddings": True}}, "del"),
        (
            {"query_encode_kwargs": {"normalize_embeddings": True}},
            {"query_encode_kwargs": {"prompt": ""}},
        ),
        ({"query_encode_kwargs": {"normalize_embeddings": True}}, {"query_encode_kwargs": {}}),
    ],
)
def test_embeddings_normalise_as_their_kwargs_say_now(
    minilm_without_normalize: str, built: dict, update: object
) -> None:
    from langchain_huggingface import HuggingFaceEmbeddings

    model = minilm_without_normalize
    stock = HuggingFaceEmbeddings(model_name=model, model_kwargs={"device": "cpu"}, **built)
    ours = SharedEmbeddings(model_name=model, device="cpu", pool=ModelPool(), **built)
    assert _norms(ours) == pytest.approx(_norms(stock), abs=2e-3)
    if update == "del":
        del stock.encode_kwargs["normalize_embeddings"]
        del ours.encode_kwargs["normalize_embeddings"]
    else:
        assert isinstance(update, dict)
        stock = stock.model_copy(update=update)
        ours = ours.model_copy(update=update)
    want = _norms(stock)
    assert want != (1.0, 1.0)  # the stock class stopped normalising something
    assert _norms(ours) == pytest.approx(want, abs=2e-3)


@pytest.fixture(scope="module")
def positions_1024(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A tiny cross-encoder with 1024 positions and a 1024-token tokenizer limit."""
    from rag_rerank_plugins.testing import build_cross_encoder

    folder = tmp_path_factory.mktemp("p1024") / "ce"
    build_cross_encoder(
        folder, hidden_size=64, intermediate_size=128, seed=3, max_position_embeddings=1024
    )
    config = json.loads((folder / "tokenizer_config.json").read_text())
    config["model_max_length"] = 1024
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    return str(folder)


def test_llama_index_max_length_none_means_the_models_own_limit(positions_1024: str) -> None:
    """``cross_encoder_kwargs={"max_length": None}`` reaches CrossEncoder as None there (the
    key is present, so no 512): the model's own 1024 tokens. Ours read 512."""
    from llama_index.postprocessor.sbert_rerank import SentenceTransformerRerank

    kwargs = {"max_length": None}
    texts = ["alpha beta " * 300 + "gamma " * 300, "alpha beta " * 300 + "delta " * 300]
    nodes = [
        NodeWithScore(node=TextNode(text=t, id_=str(i)), score=1.0) for i, t in enumerate(texts)
    ]
    stock = SentenceTransformerRerank(
        positions_1024, device="cpu", top_n=2, cross_encoder_kwargs=kwargs
    )
    ours = SharedRerankPostprocessor(
        positions_1024, device="cpu", top_n=2, cross_encoder_kwargs=kwargs, pool=ModelPool()
    )
    assert stock._model.max_seq_length == 1024
    assert ours.spec.max_length == 1024
    want = stock.postprocess_nodes(list(nodes), query_str="q")
    got = ours.postprocess_nodes(list(nodes), query_str="q")
    assert [n.node.id_ for n in got] == [n.node.id_ for n in want]
    assert [n.score for n in got] == pytest.approx([n.score for n in want], abs=1e-5)


def test_llama_index_max_length_none_unknown_limit_warns(tmp_path: Path) -> None:
    with pytest.warns(UserWarning, match="own token limit"):
        ours = SharedRerankPostprocessor(
            "org/not-on-this-machine", cross_encoder_kwargs={"max_length": None}
        )
    assert ours.spec.max_length == 512
