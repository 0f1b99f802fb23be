"""A ``release()`` that lands while an adapter call is loading its model: the call starts over.

docs/bad-input.md B21 promises that ``release()`` while adapter calls are in flight (sync and
async) fails no caller, and docs/concepts.md that calls (``score_pairs``, the adapters) start over
with a fresh load. The pool's own calls did; but every adapter path that reads the model beside
its call looked it up with ``pool.get()``, which raises ``ModelReleasedError`` when a release
meets the load it waited for (as documented for ``get()``). So these calls failed instead:

* LangChain ``SharedEmbeddings`` (``embed_documents``/``embed_query``: the model's named prompts);
* ``SharedRerankCompressor`` and LlamaIndex ``SharedRerankPostprocessor`` with ``window_tokens``
  (the window plan reads the tokenizer);
* any adapter with ``backend="auto"`` (the check that the pick loads);
* ``rag-rerank serve``'s tokenizer lookup (``ServerState.loaded``), and a bi-encoder's load
  when its embedder was released meanwhile (``ModelPool.model_info``).

Each race is made deterministic by a backend whose first load waits for the test: the release
lands while that load runs, then the load is let go.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

import pytest

from rag_rerank_plugins import ModelPool, ModelSpec, adapter_base
from rag_rerank_plugins.backends import register_backend
from rag_rerank_plugins.backends.base import ModelProvider
from rag_rerank_plugins.backends.bi_encoder import embedder_spec_for
from rag_rerank_plugins.testing import FakeEmbedder, FakeReranker

T = TypeVar("T")

RERANKER = "race-gated-reranker"
EMBEDDER = "race-gated-embedder"
QUERY = "capital of France"
LONG = "Paris is the capital of France. " * 40  # several 64-token windows
TEXTS = [LONG, "Bananas are yellow.", "France borders Spain."]


class _WindowedReranker(FakeReranker):
    """A fake reranker with a real tokenizer, so adapters can cut long-document windows."""

    def __init__(self, tokenizer: Any) -> None:
        super().__init__()
        self._tokenizer = tokenizer

    def window_source(self) -> tuple[Any, int]:
        return self._tokenizer, 128


class _Gate:
    """Backends whose first load waits until :attr:`go` is set (a slow load, on demand)."""

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        self.entered = threading.Event()
        self.go = threading.Event()
        self.loads = 0

    def _hold(self) -> None:
        self.loads += 1
        if self.loads == 1:
            self.entered.set()
            assert self.go.wait(10), "the test never let the load go"

    def reranker(self, spec: ModelSpec, _provider: ModelProvider) -> _WindowedReranker:
        self._hold()
        return _WindowedReranker(self.tokenizer)

    def embedder(self, spec: ModelSpec, _provider: ModelProvider) -> FakeEmbedder:
        self._hold()
        return FakeEmbedder()


@pytest.fixture(scope="module")
def tokenizer(minilm_path: str) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(minilm_path)


@pytest.fixture
def gate(tokenizer: Any) -> Iterator[_Gate]:
    gate = _Gate(tokenizer)
    register_backend(RERANKER, gate.reranker, "reranker", uses_torch=False, replace=True)
    register_backend(EMBEDDER, gate.embedder, "embedder", uses_torch=False, replace=True)
    yield gate
    gate.go.set()  # a failed test never leaves a load thread waiting


def _race(call: Callable[[], T], release: Callable[[], bool], gate: _Gate) -> T:
    """``call`` in a thread; ``release()`` while its first load runs; then that load ends."""
    with ThreadPoolExecutor(1) as executor:
        running = executor.submit(call)
        assert gate.entered.wait(10), "the call never began loading its model"
        assert release() is False  # nothing was in yet: the load in flight is released
        gate.go.set()
        return running.result(timeout=10)


def _raced(call: Callable[[], Any], release: Callable[[], bool], gate: _Gate) -> Any:
    """The raced call's result, checked equal to the same call undisturbed (model reloaded)."""
    result = _race(call, release, gate)
    assert gate.loads == 2  # the released load, then a fresh one
    assert result == call()
    return result


# -- LangChain ------------------------------------------------------------------------------------


def _lc_embeddings(pool: ModelPool, backend: str = EMBEDDER) -> Any:
    from rag_rerank_plugins.langchain import SharedEmbeddings

    return SharedEmbeddings(model="race-model", backend=backend, device="cpu", pool=pool)


def _lc_compressor(pool: ModelPool, backend: str = RERANKER, windows: bool = True) -> Any:
    from rag_rerank_plugins.langchain import SharedRerankCompressor

    return SharedRerankCompressor(
        model="race-model",
        backend=backend,
        device="cpu",
        pool=pool,
        top_n=None,
        window_tokens=64 if windows else None,
    )


def _lc_compress(compressor: Any, sync: bool) -> Callable[[], list[tuple[str, float]]]:
    from langchain_core.documents import Document

    def call() -> list[tuple[str, float]]:
        docs = [Document(page_content=t) for t in TEXTS]
        if sync:
            out = compressor.compress_documents(docs, QUERY)
        else:
            out = asyncio.run(compressor.acompress_documents(docs, QUERY))
        return [(d.page_content, d.metadata["relevance_score"]) for d in out]

    return call


def _lc_embed(embeddings: Any, method: str, sync: bool) -> Callable[[], Any]:
    if method == "documents":
        if sync:
            return lambda: embeddings.embed_documents(TEXTS)
        return lambda: asyncio.run(embeddings.aembed_documents(TEXTS))
    if sync:
        return lambda: embeddings.embed_query(QUERY)
    return lambda: asyncio.run(embeddings.aembed_query(QUERY))


@pytest.mark.parametrize("sync", [True, False], ids=["sync", "async"])
@pytest.mark.parametrize("method", ["documents", "query"])
def test_langchain_embeddings_start_over_after_a_release_during_their_load(
    pool: ModelPool, gate: _Gate, sync: bool, method: str
) -> None:
    embeddings = _lc_embeddings(pool)
    vectors = _raced(_lc_embed(embeddings, method, sync), embeddings.release, gate)
    assert len(vectors) == (len(TEXTS) if method == "documents" else 64)
    assert embeddings.stats()["loads"] == 2


@pytest.mark.parametrize("sync", [True, False], ids=["sync", "async"])
def test_langchain_windowed_reranking_starts_over_after_a_release_during_its_load(
    pool: ModelPool, gate: _Gate, sync: bool
) -> None:
    compressor = _lc_compressor(pool)
    ranked = _raced(_lc_compress(compressor, sync), compressor.release, gate)
    assert ranked[0][0] == LONG  # windows scored: the long passage wins
    assert compressor.stats()["loads"] == 2


@pytest.mark.parametrize("sync", [True, False], ids=["sync", "async"])
@pytest.mark.parametrize("kind", ["embedder", "reranker"])
def test_backend_auto_starts_over_after_a_release_during_the_picks_load(
    pool: ModelPool, gate: _Gate, monkeypatch: pytest.MonkeyPatch, sync: bool, kind: str
) -> None:
    # auto's measured pick is the gated backend here: its first load confirms the pick.
    picks = {"embedder": EMBEDDER, "reranker": RERANKER}
    monkeypatch.setattr(adapter_base, "choose_backend", lambda k, *a, **kw: picks[k])
    if kind == "embedder":
        embeddings = _lc_embeddings(pool, backend="auto")
        assert embeddings.backend == EMBEDDER
        _raced(_lc_embed(embeddings, "documents", sync), embeddings.release, gate)
        assert embeddings.backend == EMBEDDER  # the pick stands: it loads
    else:
        compressor = _lc_compressor(pool, backend="auto", windows=False)
        _raced(_lc_compress(compressor, sync), compressor.release, gate)
        assert compressor.backend == RERANKER


# -- LlamaIndex -----------------------------------------------------------------------------------


@pytest.mark.parametrize("sync", [True, False], ids=["sync", "async"])
def test_llama_index_windowed_postprocessor_starts_over_after_a_release_during_its_load(
    pool: ModelPool, gate: _Gate, sync: bool
) -> None:
    pytest.importorskip("llama_index.core")
    from llama_index.core.schema import NodeWithScore, TextNode

    from rag_rerank_plugins.llama_index import SharedRerankPostprocessor

    reranker = SharedRerankPostprocessor(
        model="race-model", backend=RERANKER, device="cpu", pool=pool, top_n=3, window_tokens=64
    )

    def call() -> list[tuple[str, float | None]]:
        nodes = [NodeWithScore(node=TextNode(text=t)) for t in TEXTS]
        if sync:
            out = reranker.postprocess_nodes(nodes, query_str=QUERY)
        else:
            out = asyncio.run(reranker.apostprocess_nodes(nodes, query_str=QUERY))
        return [(n.node.get_content(), n.score) for n in out]

    ranked = _raced(call, reranker.release, gate)
    assert ranked[0][0] == LONG
    assert reranker.stats()["loads"] == 2


# -- a release right after the lookup, before the model is read ----------------------------------


def test_a_release_between_the_lookup_and_reading_the_model_starts_over(
    pool: ModelPool, gate: _Gate, monkeypatch: pytest.MonkeyPatch
) -> None:
    gate.go.set()  # loads do not wait here: the release comes just after the first lookup
    compressor = _lc_compressor(pool)
    lookup = pool._get
    released: list[bool] = []

    def lookup_then_release(spec: ModelSpec, **kwargs: Any) -> Any:
        handle = lookup(spec, **kwargs)
        if not released:
            released.append(pool.release(spec))
        return handle

    monkeypatch.setattr(pool, "_get", lookup_then_release)
    ranked = _lc_compress(compressor, sync=True)()
    assert released == [True]
    assert ranked[0][0] == LONG
    assert compressor.stats()["loads"] == 2


# -- the server and a model built on another shared model -----------------------------------------


def test_server_tokenizer_lookup_starts_over_after_a_release_during_its_load(
    pool: ModelPool, gate: _Gate
) -> None:
    from rag_rerank_plugins.server import ServerConfig
    from rag_rerank_plugins.server.state import ServerState

    spec = {"name": "race", "model": "race-model", "backend": RERANKER, "device": "cpu"}
    state = ServerState(ServerConfig(specs=[spec]), pool)
    state.status = "ok"  # as after the lifespan's load; the model is not in
    [served] = state.served
    model = _race(lambda: state.loaded(served), lambda: pool.release(served.spec), gate)
    assert isinstance(model, _WindowedReranker)
    assert pool.is_loaded(served.spec)
    assert pool.spec_stats(served.spec)["loads"] == 2


def test_a_bi_encoder_load_survives_a_release_of_its_embedder_during_that_load(
    pool: ModelPool, gate: _Gate
) -> None:
    bi = ModelSpec("race-model", backend="bi-encoder", device="cpu",
                   options=(("embedder_backend", EMBEDDER),))  # fmt: skip
    embedder = embedder_spec_for(pool.key(bi))
    # The bi-encoder itself is never released: its get() must not raise ModelReleasedError.
    [handle] = _race(lambda: pool.preload(bi, warmup=False), lambda: pool.release(embedder), gate)
    assert handle.model.score_pairs([(QUERY, TEXTS[2])], 32)[0] > 0
    stats = pool.spec_stats(bi)
    assert (stats["loads"], stats["load_failures"]) == (1, 0)
    assert pool.spec_stats(embedder)["loads"] == 2
