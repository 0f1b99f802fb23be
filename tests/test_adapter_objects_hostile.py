"""What frameworks do with adapter and cache OBJECTS: show, dump, copy, pickle, schema.

Found by a hostile review: a server URL's password reached repr, dumps, LangChain's ``dumpd``
(tracers) and LlamaIndex's ``to_dict`` (IngestionPipeline's cache key) although every spec label
hides it; ``RemoteSemanticCache`` took such a URL (and a query string, which broke every
request's path); a chat model using ``SharedSemanticCache`` could not be deep-copied; and
``model_json_schema()`` failed on every adapter over the ``pool`` field.
"""

from __future__ import annotations

import copy
import json
import pickle
from typing import Any

import pytest
from langchain_core.caches import InMemoryCache
from langchain_core.language_models import FakeListChatModel
from langchain_core.load import dumpd

from rag_rerank_plugins import ModelSpec
from rag_rerank_plugins.exceptions import ConfigurationError
from rag_rerank_plugins.langchain import (
    SharedCrossEncoder,
    SharedEmbeddings,
    SharedRerankCompressor,
    SharedSemanticCache,
)
from rag_rerank_plugins.llama_index import SharedEmbedding, SharedRerankPostprocessor
from rag_rerank_plugins.semantic_cache import SemanticCache
from rag_rerank_plugins.semantic_cache.remote import RemoteSemanticCache

PASSWORD = "S3CRETPW"
WITH_USER = f"http://alice:{PASSWORD}@10.0.0.5:8080"
WITH_QUERY = f"http://10.0.0.5:8080/?api_key={PASSWORD}"

ADAPTERS: list[tuple[type, str, str]] = [
    (SharedRerankCompressor, "model", "remote-reranker"),
    (SharedCrossEncoder, "model", "remote-reranker"),
    (SharedEmbeddings, "model", "remote-embedder"),
    (SharedRerankPostprocessor, "model", "remote-reranker"),
    (SharedEmbedding, "model_name", "remote-embedder"),
]


@pytest.mark.parametrize(("cls", "field", "backend"), ADAPTERS)
@pytest.mark.parametrize("url", [WITH_USER, WITH_QUERY])
@pytest.mark.parametrize("where", ["model", "model_kwargs"])
def test_a_url_with_secrets_is_refused_at_construction_without_echoing_it(
    cls: type, field: str, backend: str, url: str, where: str
) -> None:
    kwargs: dict[str, Any] = {"backend": backend}
    if where == "model":
        kwargs[field] = url
    else:
        kwargs.update({field: "m", "model_kwargs": {"url": url}})
    with pytest.raises(ValueError, match="URL") as info:
        cls(**kwargs)
    assert PASSWORD not in str(info.value)
    assert "S3C" not in str(info.value)  # pydantic's input_value showed the start of it


@pytest.mark.parametrize(("cls", "field", "backend"), ADAPTERS)
def test_a_url_set_after_construction_is_never_shown(cls: type, field: str, backend: str) -> None:
    built = cls(**{field: "http://10.0.0.5:8080", "backend": backend})
    update = {field: WITH_USER, "model_kwargs": {"url": WITH_QUERY, "token": "hf_abc"}}
    if cls is SharedRerankCompressor:  # it validates its copies: refused, not shown
        with pytest.raises(ValueError, match="credentials") as info:
            built.model_copy(update=update)
        assert PASSWORD not in str(info.value)
        return
    adapter = built.model_copy(update=update)  # past every validator
    shown = [repr(adapter), str(adapter), adapter.model_dump_json(), json.dumps(dumpd(adapter))]
    if hasattr(adapter, "to_dict"):
        shown.append(json.dumps(adapter.to_dict()))
    for text in shown:
        assert PASSWORD not in text
        assert "hf_abc" not in text
    assert getattr(adapter, field) == WITH_USER  # the field itself is as set
    with pytest.raises(ConfigurationError, match="credentials"):
        adapter._check_spec()  # the next call refuses it before any request


@pytest.mark.parametrize("url", [WITH_USER, WITH_QUERY])
def test_the_remote_semantic_cache_refuses_a_url_with_secrets(url: str) -> None:
    with pytest.raises(ConfigurationError) as info:
        RemoteSemanticCache(url)
    assert PASSWORD not in str(info.value)


def test_a_semantic_caches_repr_hides_its_embedders_url_secrets() -> None:
    cache = SemanticCache(ModelSpec(WITH_USER, backend="fake-embedder"), guard="dense")
    assert PASSWORD not in repr(cache)
    assert PASSWORD not in repr(SharedSemanticCache(cache))


def _semantic_cache() -> SharedSemanticCache:
    return SharedSemanticCache(
        SemanticCache(ModelSpec("fake", backend="fake-embedder"), guard="dense")
    )


@pytest.mark.parametrize(
    "copier",
    [copy.deepcopy, lambda model: model.model_copy(deep=True)],
    ids=["deepcopy", "model_copy_deep"],
)
def test_a_chat_model_with_our_cache_copies_as_with_stock_and_shares_the_cache(copier: Any) -> None:
    for cache in (InMemoryCache(), _semantic_cache()):
        llm = FakeListChatModel(responses=["A", "B"], cache=cache)
        assert llm.invoke("hello").content == "A"
        clone = copier(llm)
        assert clone.invoke("hello").content == "A"  # answered from the cache
    assert clone.cache is cache  # ours: one cache, like the adapters' one pool


def test_pickling_our_cache_says_what_to_do() -> None:
    llm = FakeListChatModel(responses=["A"], cache=_semantic_cache())
    with pytest.raises(TypeError, match="Build one in each process"):
        pickle.dumps(llm)


@pytest.mark.parametrize("cls", [cls for cls, _, _ in ADAPTERS])
def test_every_adapter_has_a_json_schema_without_the_pool(cls: type) -> None:
    schema = cls.model_json_schema()
    assert "pool" not in schema["properties"]
    assert (
        "top_n" in schema["properties"]
        or "embed_batch_size" in schema["properties"]
        or ("batch_size" in schema["properties"])
    )


@pytest.mark.parametrize(
    ("changed", "match"),
    [
        ({"typo_normalize": True}, "no meaning here"),
        ({"output_value": "token_embeddings"}, "one vector per text"),
        ({"batch_size": 0}, "positive int"),
        ({"precision": "int4"}, "use one of"),
    ],
)
@pytest.mark.parametrize("how", ["model_copy", "in_place"])
def test_encode_kwargs_changed_after_construction_are_checked_per_call(
    changed: dict[str, Any], match: str, how: str
) -> None:
    """Read per call, as HuggingFaceEmbeddings reads them, but checked only at construction:
    a typo or an output encode refuses was silently ignored (the stock class raises)."""
    built = SharedEmbeddings(model="m", backend="fake-embedder")
    if how == "model_copy":
        embeddings = built.model_copy(update={"encode_kwargs": changed})
    else:
        embeddings = built
        embeddings.encode_kwargs.update(changed)
    with pytest.raises(ConfigurationError, match=match):
        embeddings.embed_documents(["a", "b"])
    with pytest.raises(ConfigurationError, match=match):
        embeddings.embed_query("a")  # no query_encode_kwargs: queries use these too


def test_dumps_without_secrets_load_back_the_same_adapter() -> None:
    """Only what construction refuses is redacted when shown: an ``@`` in a URL's path and a
    prompt quoting a URL with a query string dumped as ``***`` and did not load back (or
    loaded a different prompt)."""
    url = "https://gateway.example.com/teams/@search/rerank"
    compressor = SharedRerankCompressor(model=url, backend="remote-reranker")
    again = SharedRerankCompressor.model_validate(compressor.model_dump())
    assert again.spec == compressor.spec
    assert url in repr(compressor)
    post = SharedRerankPostprocessor(model=url, backend="remote-reranker")
    assert SharedRerankPostprocessor.from_dict(post.to_dict()).spec == post.spec
    prompt = "Answer from https://docs.example.com/search?lang=en : "
    embeddings = SharedEmbeddings(
        model="m", backend="fake-embedder", model_kwargs={"prompts": {"query": prompt}}
    )
    assert SharedEmbeddings.model_validate(embeddings.model_dump()).spec == embeddings.spec


def test_integral_encode_batch_size_is_accepted_as_by_stock() -> None:
    import numpy as np

    embeddings = SharedEmbeddings(
        model="m", backend="fake-embedder", encode_kwargs={"batch_size": np.int64(8)}
    )
    assert len(embeddings.embed_documents(["a", "b"])) == 2


def test_a_wider_truncate_dim_set_after_construction_is_refused_per_call() -> None:
    built = SharedEmbeddings(model="m", backend="fake-embedder", model_kwargs={"truncate_dim": 8})
    wider = built.model_copy(update={"encode_kwargs": {"truncate_dim": 12}})
    with pytest.raises(ConfigurationError, match="wider than"):
        wider.embed_documents(["a"])


def test_a_shallow_copy_of_a_cache_shares_it_too() -> None:
    cache = _semantic_cache()
    assert copy.copy(cache) is cache
    assert copy.copy(cache.cache) is cache.cache
