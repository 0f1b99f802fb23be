"""OpenTelemetry spans (extra ``otel``): every adapter's rerank/embed call and every server model
call is a span with the model, backend, batch size and item count; failures are recorded; without
opentelemetry installed nothing changes.

Spans go to the SDK's InMemorySpanExporter through a TracerProvider set once for this process
(OpenTelemetry allows one global provider).
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
from collections.abc import Iterator
from typing import Any

import pytest

pytest.importorskip("opentelemetry.sdk")

from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import StatusCode

from rag_rerank_plugins import ModelPool
from rag_rerank_plugins.backends import register_backend
from rag_rerank_plugins.testing import FakeReranker

_EXPORTER = InMemorySpanExporter()


class _BrokenReranker(FakeReranker):
    def score_pairs(self, pairs: Any, batch_size: int) -> list[float]:
        raise RuntimeError("the GPU fell off the bus")


register_backend(
    "test-broken-reranker", lambda spec, pool: _BrokenReranker(), "reranker", replace=True
)


@pytest.fixture
def spans() -> Iterator[InMemorySpanExporter]:
    provider = trace.get_tracer_provider()
    if not isinstance(provider, TracerProvider):
        provider = TracerProvider()
        provider.add_span_processor(SimpleSpanProcessor(_EXPORTER))
        trace.set_tracer_provider(provider)
    if trace.get_tracer_provider() is not provider:  # pragma: no cover - set by someone else
        pytest.skip("another TracerProvider is installed in this process")
    _EXPORTER.clear()
    yield _EXPORTER
    _EXPORTER.clear()


def _only(exporter: InMemorySpanExporter, name: str) -> Any:
    found = [s for s in exporter.get_finished_spans() if s.name == name]
    assert len(found) == 1, [s.name for s in exporter.get_finished_spans()]
    return found[0]


def test_langchain_compressor_rerank_is_a_span(spans: InMemorySpanExporter) -> None:
    pytest.importorskip("langchain_core")
    from langchain_core.documents import Document

    from rag_rerank_plugins.langchain import SharedRerankCompressor

    compressor = SharedRerankCompressor(
        model="fake", backend="fake-reranker", device="cpu", batch_size=7, pool=ModelPool()
    )
    docs = [Document(page_content=t) for t in ("a b", "b c", "a a b")]
    assert len(compressor.compress_documents(docs, "a b")) == 3
    span = _only(spans, "rag_rerank.rerank")
    assert dict(span.attributes) == {
        "rag_rerank.model": "fake",
        "rag_rerank.backend": "fake-reranker",
        "rag_rerank.batch_size": 7,
        "rag_rerank.items": 3,
        "rag_rerank.adapter": "SharedRerankCompressor",
    }
    assert span.status.status_code is StatusCode.UNSET


async def test_llama_index_async_embedding_is_a_span(spans: InMemorySpanExporter) -> None:
    pytest.importorskip("llama_index.core")
    from rag_rerank_plugins.llama_index import SharedEmbedding

    emb = SharedEmbedding(
        model_name="fake", backend="fake-embedder", device="cpu", embed_batch_size=4,
        pool=ModelPool(),
    )  # fmt: skip
    assert len(await emb.aget_text_embedding_batch(["x", "y", "z"])) == 3
    span = _only(spans, "rag_rerank.embed")
    assert span.attributes["rag_rerank.model"] == "fake"
    assert span.attributes["rag_rerank.backend"] == "fake-embedder"
    assert span.attributes["rag_rerank.items"] == 3
    assert span.attributes["rag_rerank.adapter"] == "SharedEmbedding"


def test_a_failing_call_records_the_error(spans: InMemorySpanExporter) -> None:
    pytest.importorskip("llama_index.core")
    from llama_index.core.schema import NodeWithScore, TextNode

    from rag_rerank_plugins import InferenceError
    from rag_rerank_plugins.llama_index import SharedRerankPostprocessor

    post = SharedRerankPostprocessor(
        model="broken", backend="test-broken-reranker", device="cpu", pool=ModelPool()
    )
    nodes = [NodeWithScore(node=TextNode(text=t)) for t in ("a", "b")]
    with pytest.raises(InferenceError, match="fell off the bus"):
        post.postprocess_nodes(nodes, query_str="a")
    span = _only(spans, "rag_rerank.rerank")
    assert span.status.status_code is StatusCode.ERROR
    assert span.attributes["error.type"] == "InferenceError"
    assert span.attributes["rag_rerank.backend"] == "test-broken-reranker"
    [event] = [e for e in span.events if e.name == "exception"]
    assert "fell off the bus" in event.attributes["exception.message"]


def test_a_url_password_never_reaches_a_span(spans: InMemorySpanExporter) -> None:
    """Stats, logs and errors show ``http://***@host``; the span showed the password, and the
    span opens before the load that refuses the URL."""
    from rag_rerank_plugins.langchain import SharedCrossEncoder

    clean = SharedCrossEncoder(
        model_name="http://127.0.0.1:9/", backend="remote-reranker", pool=ModelPool()
    )  # the constructor refuses a URL with a password; a copy's update does not check it
    encoder = clean.model_copy(update={"model": "http://alice:s3cret@127.0.0.1:9/"})
    with pytest.raises(Exception):  # noqa: B017, PT011 - nothing listens there
        encoder.score([("q", "a")])
    finished = spans.get_finished_spans()
    assert finished
    assert all("s3cret" not in str(dict(span.attributes or {})) for span in finished)
    assert any("***" in str(dict(span.attributes or {})) for span in finished)


def test_a_cancelled_call_is_no_error(spans: InMemorySpanExporter) -> None:
    import asyncio

    register_backend(
        "test-slow-traced",
        lambda spec, _pool: FakeReranker(delay_ms=2000),
        "reranker",
        replace=True,
        uses_torch=False,
    )
    from langchain_core.documents import Document

    from rag_rerank_plugins.langchain import SharedRerankCompressor

    pool = ModelPool()
    compressor = SharedRerankCompressor(model="m", backend="test-slow-traced", pool=pool)
    docs = [Document(page_content="a"), Document(page_content="b")]

    async def cancel() -> None:
        task = asyncio.ensure_future(compressor.acompress_documents(docs, "q"))
        await asyncio.sleep(0.2)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(cancel())
    pool.clear()
    span = _only(spans, "rag_rerank.rerank")
    assert "error.type" not in (span.attributes or {})


def test_server_model_calls_are_spans(spans: InMemorySpanExporter) -> None:
    pytest.importorskip("fastapi")
    import httpx

    from rag_rerank_plugins.server import ServerConfig, create_app
    from rag_rerank_plugins.server.testing import ServerThread, wait_until_healthy

    spec = {"name": "served", "model": "f", "backend": "fake-reranker", "device": "cpu"}
    pool = ModelPool()
    app = create_app(ServerConfig(specs=[spec], batch_size=5), pool=pool)
    with ServerThread(app) as url:
        wait_until_healthy(url, timeout=30)
        response = httpx.post(url + "/rerank", json={"query": "a", "texts": ["a", "b"]}, timeout=10)
        assert response.status_code == 200
    pool.clear()
    span = _only(spans, "rag_rerank.rerank")
    assert span.attributes["rag_rerank.served_name"] == "served"
    assert span.attributes["rag_rerank.model"] == "f"
    assert (span.attributes["rag_rerank.batch_size"], span.attributes["rag_rerank.items"]) == (5, 2)


def test_without_opentelemetry_the_calls_work_and_trace_nothing() -> None:
    code = textwrap.dedent(
        """
        import importlib.abc, sys

        class _NoOtel(importlib.abc.MetaPathFinder):
            def find_spec(self, name, path=None, target=None):
                if name == "opentelemetry" or name.startswith("opentelemetry."):
                    raise ImportError(f"No module named {name!r} (blocked by the test)", name=name)
                return None

        sys.meta_path.insert(0, _NoOtel())
        from rag_rerank_plugins import ModelPool, tracing
        from rag_rerank_plugins.langchain import SharedRerankCompressor

        compressor = SharedRerankCompressor(
            model="fake", backend="fake-reranker", device="cpu", pool=ModelPool()
        )
        print(len(compressor.rank_texts("a", ["a b", "c"])), tracing._TRACER,
              any(m.startswith("opentelemetry") for m in sys.modules))
        """
    )
    pytest.importorskip("langchain_core")
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["2", "False", "False"]
