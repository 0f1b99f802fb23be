"""Hub tokens in dumps: an adapter holding a token serialises with ``"***"`` in its place.

Before, ``model_dump_json()`` of any adapter with ``model_kwargs={"token": ...}`` raised
``PydanticSerializationError`` (unknown type ``Secret``), and LlamaIndex's ``to_json()`` raised
``TypeError``: configs could not be logged or saved. Now the token shows as ``"***"`` (never its
value), and a dump read back is a config without a token (``"***"`` is no token, so the loader
authenticates as it would without one, instead of sending the hub the token "***").
"""

from __future__ import annotations

import json
import pickle
from typing import Any

import pytest

from rag_rerank_plugins.spec import REDACTED, ModelSpec, Secret

TOKEN = "hf_very_secret_value_123"


def test_secret_is_shown_as_redacted_everywhere() -> None:
    secret = Secret(TOKEN)
    for text in (repr(secret), str(secret), json.dumps({"token": secret}), f"{secret}"):
        assert TOKEN not in text
    assert json.dumps(secret) == '"***"'
    assert secret.reveal() == TOKEN
    assert Secret(secret).reveal() == TOKEN
    assert pickle.loads(pickle.dumps(secret)).reveal() == TOKEN
    assert Secret(REDACTED).reveal() is None
    assert Secret("x") == Secret("y")
    assert hash(Secret("x")) == hash(Secret("y"))
    assert (Secret("x") != Secret("y")) is False  # str's own != would compare the texts
    assert Secret("x") != "***"


def test_a_redacted_token_read_back_is_no_token() -> None:
    spec = ModelSpec("m", options={"token": REDACTED, "revision": "main"})
    assert spec.option("token") is None
    assert spec == ModelSpec("m", options={"revision": "main"})
    assert ModelSpec("m", options={"token": TOKEN}).option("token") == TOKEN


@pytest.mark.parametrize("kind", ["embeddings", "cross_encoder", "compressor"])
def test_langchain_adapters_dump_json_without_the_token(kind: str) -> None:
    pytest.importorskip("langchain_core")
    from rag_rerank_plugins.langchain import (
        SharedCrossEncoder,
        SharedEmbeddings,
        SharedRerankCompressor,
    )

    cls: Any = {
        "embeddings": SharedEmbeddings,
        "cross_encoder": SharedCrossEncoder,
        "compressor": SharedRerankCompressor,
    }[kind]
    name = "model" if kind == "compressor" else "model_name"
    adapter = cls(**{name: "org/model"}, model_kwargs={"token": TOKEN, "revision": "main"})
    text = adapter.model_dump_json()
    assert TOKEN not in text
    assert json.loads(text)["model_kwargs"]["token"] == REDACTED
    assert TOKEN not in json.dumps(adapter.model_dump())
    # Read back: the same model, no token (the loader is never handed "***").
    again = cls(**json.loads(text))
    assert again.spec == adapter.spec
    assert again.spec.option("token") is None
    assert adapter.spec.option("token") == TOKEN


@pytest.mark.parametrize("kind", ["embedding", "postprocessor"])
def test_llama_index_adapters_to_json_without_the_token(kind: str) -> None:
    pytest.importorskip("llama_index.core")
    from rag_rerank_plugins.llama_index import SharedEmbedding, SharedRerankPostprocessor

    cls: Any = SharedEmbedding if kind == "embedding" else SharedRerankPostprocessor
    name = "model_name" if kind == "embedding" else "model"
    adapter = cls(**{name: "org/model"}, model_kwargs={"token": TOKEN})
    for text in (adapter.to_json(), adapter.model_dump_json()):
        assert TOKEN not in text
        assert json.loads(text)["model_kwargs"]["token"] == REDACTED
    again = cls.from_json(adapter.to_json())
    assert again.spec == adapter.spec
    assert again.spec.option("token") is None
