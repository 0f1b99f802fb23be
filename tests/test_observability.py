"""Observability and configuration: progress bars, LangChain callback events, the Prometheus
collector and ``RAG_RERANK_*`` settings."""

from __future__ import annotations

from typing import Any
from uuid import UUID

import pytest

from rag_rerank_plugins import ModelPool
from rag_rerank_plugins.engine_config import EngineConfig

TEXTS = [f"text number {i}" for i in range(10)]


# -- progress bars ---------------------------------------------------------------------------


def test_langchain_embeddings_progress_bar_is_off_by_default(
    capsys: pytest.CaptureFixture[str],
) -> None:
    pytest.importorskip("langchain_core")
    from rag_rerank_plugins.langchain import SharedEmbeddings

    emb = SharedEmbeddings(model="fake", backend="fake-embedder", device="cpu", pool=ModelPool())
    assert emb.show_progress is False
    assert len(emb.embed_documents(TEXTS)) == len(TEXTS)
    assert "Embedding documents" not in capsys.readouterr().err


def test_langchain_embeddings_progress_bar_when_switched_on(
    capsys: pytest.CaptureFixture[str],
) -> None:
    pytest.importorskip("langchain_core")
    pytest.importorskip("tqdm")
    from rag_rerank_plugins.langchain import SharedEmbeddings

    pool = ModelPool()
    kwargs: dict[str, Any] = {"model": "fake", "backend": "fake-embedder", "device": "cpu"}
    emb = SharedEmbeddings(**kwargs, batch_size=3, show_progress=True, pool=pool)
    vectors = emb.embed_documents(TEXTS)
    err = capsys.readouterr().err
    assert "Embedding documents" in err
    assert "10/10" in err
    # Same vectors, in the same order, as without the bar.
    plain = SharedEmbeddings(**kwargs, batch_size=3, pool=pool).embed_documents(TEXTS)
    assert vectors == plain


async def test_langchain_async_embeddings_progress_bar(capsys: pytest.CaptureFixture[str]) -> None:
    pytest.importorskip("langchain_core")
    pytest.importorskip("tqdm")
    from rag_rerank_plugins.langchain import SharedEmbeddings

    emb = SharedEmbeddings(
        model="fake", backend="fake-embedder", device="cpu", batch_size=4, show_progress=True,
        pool=ModelPool(),
    )  # fmt: skip
    assert len(await emb.aembed_documents(TEXTS)) == len(TEXTS)
    assert "10/10" in capsys.readouterr().err


def test_progress_without_tqdm_embeds_and_logs_once(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    import sys

    pytest.importorskip("langchain_core")
    from rag_rerank_plugins import _progress
    from rag_rerank_plugins.langchain import SharedEmbeddings

    monkeypatch.setitem(sys.modules, "tqdm.auto", None)
    monkeypatch.setattr(_progress, "_warned", False)
    emb = SharedEmbeddings(
        model="fake", backend="fake-embedder", device="cpu", show_progress=True, pool=ModelPool()
    )
    with caplog.at_level("WARNING", logger="rag_rerank_plugins._progress"):
        assert len(emb.embed_documents(TEXTS)) == len(TEXTS)
        emb.embed_documents(TEXTS)
    assert [r.message for r in caplog.records].count(
        "rag-rerank: show_progress=True but tqdm is not installed; no bar."
    ) == 1


def test_llama_index_embedding_show_progress_reuses_its_batch_bar(
    capsys: pytest.CaptureFixture[str],
) -> None:
    pytest.importorskip("llama_index.core")
    pytest.importorskip("tqdm")
    from rag_rerank_plugins.llama_index import SharedEmbedding

    pool = ModelPool()
    off = SharedEmbedding(model_name="fake", backend="fake-embedder", device="cpu", pool=pool)
    assert off.show_progress is False
    off.get_text_embedding_batch(TEXTS)
    assert "Generating embeddings" not in capsys.readouterr().err
    on = SharedEmbedding(
        model_name="fake", backend="fake-embedder", device="cpu", show_progress=True, pool=pool
    )
    assert len(on.get_text_embedding_batch(TEXTS)) == len(TEXTS)
    assert "Generating embeddings" in capsys.readouterr().err
    # The per-call flag still works on an adapter that leaves it off.
    off.get_text_embedding_batch(TEXTS, show_progress=True)
    assert "Generating embeddings" in capsys.readouterr().err


# -- LangChain callbacks ---------------------------------------------------------------------


def _recorder() -> Any:
    from langchain_core.callbacks import BaseCallbackHandler

    class Recorder(BaseCallbackHandler):
        def __init__(self) -> None:
            self.events: list[tuple[str, Any]] = []

        def on_custom_event(self, name: str, data: Any, *, run_id: UUID, **kwargs: Any) -> None:
            self.events.append((name, data))

    return Recorder()


def _compressor() -> Any:
    from rag_rerank_plugins.langchain import SharedRerankCompressor

    return SharedRerankCompressor(
        model="fake", backend="fake-reranker", device="cpu", top_n=2, pool=ModelPool()
    )


def _documents() -> list[Any]:
    from langchain_core.documents import Document

    return [Document(page_content=t) for t in ["a b", "b c", "a a b"]]


def test_compressor_sends_a_custom_event_to_callbacks() -> None:
    pytest.importorskip("langchain_core")
    recorder = _recorder()
    out = _compressor().compress_documents(_documents(), "a b", callbacks=[recorder])
    assert len(out) == 2
    [(name, data)] = recorder.events
    assert name == "rag_rerank"
    assert data["model"] == "fake"
    assert data["backend"] == "fake-reranker"
    assert (data["documents_in"], data["documents_out"]) == (3, 2)
    assert data["seconds"] >= 0
    assert data["error"] is None


def test_compressor_without_callbacks_sends_nothing() -> None:
    pytest.importorskip("langchain_core")
    assert len(_compressor().compress_documents(_documents(), "a b")) == 2


async def test_async_compressor_sends_a_custom_event_to_callbacks() -> None:
    pytest.importorskip("langchain_core")
    recorder = _recorder()
    out = await _compressor().acompress_documents(_documents(), "a b", callbacks=[recorder])
    assert len(out) == 2
    [(name, data)] = recorder.events
    assert name == "rag_rerank"
    assert data["documents_out"] == 2


def test_contextual_compression_retriever_passes_its_callbacks() -> None:
    pytest.importorskip("langchain_classic")
    from langchain_classic.retrievers import ContextualCompressionRetriever
    from langchain_core.retrievers import BaseRetriever

    docs = _documents()

    class Fixed(BaseRetriever):
        def _get_relevant_documents(self, query: str, *, run_manager: Any) -> list[Any]:
            return docs

    recorder = _recorder()
    retriever = ContextualCompressionRetriever(
        base_compressor=_compressor(), base_retriever=Fixed()
    )
    result = retriever.invoke("a b", config={"callbacks": [recorder]})
    assert len(result) == 2
    assert [name for name, _ in recorder.events] == ["rag_rerank"]


# -- Prometheus collector --------------------------------------------------------------------


def test_pool_collector_exposes_pool_stats() -> None:
    prometheus_client = pytest.importorskip("prometheus_client")
    from rag_rerank_plugins.metrics import PoolCollector
    from rag_rerank_plugins.testing import fake_embedder_spec, fake_reranker_spec

    pool = ModelPool()
    pool.score_pairs(fake_reranker_spec(), [("a", "a b"), ("a", "c")])
    pool.embed(fake_embedder_spec(), ["x", "y", "z"])
    registry = prometheus_client.CollectorRegistry()
    registry.register(PoolCollector(pool))
    text = prometheus_client.generate_latest(registry).decode()
    for metric in (
        "rag_rerank_model_loads_total",
        "rag_rerank_model_calls_total",
        "rag_rerank_model_items_total",
        "rag_rerank_model_errors_total",
        "rag_rerank_model_load_seconds_total",
        "rag_rerank_model_latency_ms_p50",
        "rag_rerank_model_latency_ms_p95",
        "rag_rerank_model_queue_depth",
        "rag_rerank_model_cache_hits_total",
        "rag_rerank_model_cache_misses_total",
        "rag_rerank_model_evictions_total",
        "rag_rerank_model_footprint_bytes",
    ):
        assert f"# TYPE {metric}" in text
    # The same table as the server's /metrics: histograms too (empty for direct-call fakes).
    assert "# TYPE rag_rerank_model_latency_seconds histogram" in text
    assert "# TYPE rag_rerank_model_queue_wait_seconds histogram" in text
    assert 'rag_rerank_model_items_total{backend="fake-reranker"' in text
    [(label, stats)] = [(k, v) for k, v in pool.stats().items() if v["kind"] == "embedder"]
    labels = {f: str(stats[f]) for f in ("model", "kind", "backend", "device", "dtype")}
    value = registry.get_sample_value("rag_rerank_model_items_total", {**labels, "spec": label})
    assert value == 3.0


def test_pool_collector_names_the_extra_when_prometheus_client_is_missing(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import sys

    from rag_rerank_plugins.exceptions import MissingDependencyError
    from rag_rerank_plugins.metrics import PoolCollector

    monkeypatch.setitem(sys.modules, "prometheus_client", None)
    monkeypatch.setitem(sys.modules, "prometheus_client.core", None)
    with pytest.raises(MissingDependencyError, match=r"rag-rerank-plugins\[metrics\]"):
        PoolCollector(ModelPool())


# -- settings --------------------------------------------------------------------------------


def test_settings_read_rag_rerank_variables(monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("pydantic_settings")
    from rag_rerank_plugins.settings import Settings

    monkeypatch.setenv("RAG_RERANK_RERANKER_MODEL", "/models/ce")
    monkeypatch.setenv("RAG_RERANK_DEVICE", "cpu")
    monkeypatch.setenv("RAG_RERANK_BATCH_SIZE", "8")
    monkeypatch.setenv("RAG_RERANK_TORCH_THREADS", "2")
    monkeypatch.setenv("RAG_RERANK_MAX_QUEUE", "7")
    monkeypatch.setenv("RAG_RERANK_TOKEN_BUDGET", "none")
    monkeypatch.setenv("RAG_RERANK_PORT", "9000")  # the server's: ignored here, not an error
    settings = Settings()
    assert settings.reranker_model == "/models/ce"
    assert (settings.device, settings.batch_size, settings.torch_threads) == ("cpu", 8, 2)
    assert settings.engine.max_queue == 7
    assert settings.engine == EngineConfig.from_env()


def test_settings_defaults_match_engine_config(monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("pydantic_settings")
    from rag_rerank_plugins.settings import Settings, get_settings

    for name in list(__import__("os").environ):
        if name.startswith("RAG_RERANK_"):
            monkeypatch.delenv(name)
    settings = Settings()
    assert settings.engine == EngineConfig()
    assert (settings.device, settings.dtype, settings.batch_size) == ("auto", "auto", 32)
    get_settings.cache_clear()
    assert get_settings() is get_settings()
    get_settings.cache_clear()


def test_settings_module_is_not_imported_by_the_package() -> None:
    import subprocess
    import sys

    code = "import rag_rerank_plugins, sys; print('pydantic_settings' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


@pytest.fixture
def settings_env(monkeypatch: pytest.MonkeyPatch) -> Any:
    pytest.importorskip("pydantic_settings")
    from rag_rerank_plugins.settings import get_settings

    get_settings.cache_clear()
    yield monkeypatch
    get_settings.cache_clear()


def test_adapters_take_their_defaults_from_settings(settings_env: pytest.MonkeyPatch) -> None:
    pytest.importorskip("langchain_core")
    pytest.importorskip("llama_index.core")
    from rag_rerank_plugins.langchain import SharedEmbeddings, SharedRerankCompressor
    from rag_rerank_plugins.llama_index import SharedEmbedding, SharedRerankPostprocessor

    for name, value in {
        "RERANKER_MODEL": "fake-r",
        "RERANKER_BACKEND": "fake-reranker",
        "EMBEDDER_MODEL": "fake-e",
        "EMBEDDER_BACKEND": "fake-embedder",
        "DEVICE": "cpu",
        "BATCH_SIZE": "5",
    }.items():
        settings_env.setenv(f"RAG_RERANK_{name}", value)
    pool = ModelPool()
    for reranker in (SharedRerankCompressor(pool=pool), SharedRerankPostprocessor(pool=pool)):
        assert (reranker.spec.model, reranker.spec.backend) == ("fake-r", "fake-reranker")
        assert (reranker.spec.device, reranker.batch_size) == ("cpu", 5)
    emb = SharedEmbeddings(pool=pool)
    assert (emb.spec.model, emb.spec.backend, emb.batch_size) == ("fake-e", "fake-embedder", 5)
    li = SharedEmbedding(device=None, pool=pool)  # LlamaIndex's "infer": the default applies
    assert (li.spec.model, li.spec.device, li.embed_batch_size) == ("fake-e", "cpu", 5)
    # Arguments win over settings.
    assert SharedRerankCompressor(batch_size=9, device="auto", pool=pool).batch_size == 9


def test_adapters_read_the_environment_once(settings_env: pytest.MonkeyPatch) -> None:
    """Per-request construction must not re-parse the environment (speed lives in benchmarks)."""
    pytest.importorskip("langchain_core")
    from rag_rerank_plugins.langchain import SharedRerankCompressor
    from rag_rerank_plugins.settings import get_settings

    pool = ModelPool()
    SharedRerankCompressor(pool=pool)
    before = get_settings.cache_info()
    for _ in range(200):
        SharedRerankCompressor(pool=pool)
    after = get_settings.cache_info()
    assert after.misses == before.misses  # the cached Settings, never a fresh parse


# -- counters a dashboard relies on (found by the observability probe) ----------------------------


def test_items_count_a_calls_pairs_whatever_part_came_from_the_cache() -> None:
    """A call answered wholly from the score cache counted its 3 pairs, one with 2 of 3 cached
    counted 1: ``items`` ("pairs scored or texts embedded") depended on the cache mix."""
    from rag_rerank_plugins import ModelSpec

    pool = ModelPool(config=EngineConfig(score_cache_size=100))
    spec = ModelSpec("m", backend="fake-reranker", device="cpu")
    pairs = [("q", "a"), ("q", "b"), ("q", "c")]
    counts = []
    try:
        for call in (pairs, pairs, [("q", "a"), ("q", "b"), ("q", "new")]):
            before = pool.spec_stats(spec)["items"] if counts else 0
            pool.score_pairs(spec, call)
            counts.append(pool.spec_stats(spec)["items"] - before)
        assert counts == [3, 3, 3]
        stats = pool.spec_stats(spec)
        assert (stats["cache_hits"], stats["cache_misses"]) == (5, 4)
    finally:
        pool.clear()


def test_out_of_memory_splits_of_a_thread_safe_model_are_counted() -> None:
    """Direct (thread-safe) models split on out-of-memory like scheduled ones, but the splits
    never reached ``oom_splits`` (a GPU bi-encoder reported 0)."""
    from rag_rerank_plugins import ModelSpec
    from rag_rerank_plugins.backends import register_backend
    from rag_rerank_plugins.testing import FakeReranker

    class Oom(FakeReranker):
        thread_safe = True

        def score_pairs(self, pairs: Any, batch_size: int) -> list[float]:
            if len(pairs) > 2:
                raise RuntimeError("CUDA out of memory")
            return [1.0] * len(pairs)

        def is_oom(self, exc: BaseException) -> bool:
            return "out of memory" in str(exc)

    class OomScheduled(Oom):
        thread_safe = False

    register_backend(
        "test-oom-direct", lambda s, p: Oom(), "reranker", uses_torch=False, replace=True
    )
    register_backend(
        "test-oom-sched", lambda s, p: OomScheduled(), "reranker", uses_torch=False, replace=True
    )
    pool = ModelPool()
    try:
        splits = {}
        for backend in ("test-oom-sched", "test-oom-direct"):
            spec = ModelSpec("m", backend=backend, device="cpu")
            assert pool.score_pairs(spec, [("q", f"p{i}") for i in range(8)], 8) == [1.0] * 8
            splits[backend] = pool.spec_stats(spec)["oom_splits"]
        assert splits["test-oom-direct"] == splits["test-oom-sched"] == 3
    finally:
        pool.clear()
