"""The notebook user: adapters called the way a Jupyter kernel runs cells.

ipykernel runs each cell inside its running asyncio loop, in the main thread: sync adapter
methods are called from a coroutine (no "asyncio.run() cannot be called from a running event
loop", no deadlock), top-level ``await`` drives the async ones, the "interrupt kernel" button
raises KeyboardInterrupt in the main thread while a sync call waits, cells are re-run (adapters
rebuilt) and modules are reloaded (``%autoreload``). Fake backends keep this cheap; the real
signal and reload checks run in a subprocess, so nothing here touches the pytest process's
signal handlers, fork hooks or the default pool.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Iterator
from concurrent.futures import Future
from typing import Any

import pytest

from rag_rerank_plugins import EngineConfig, ModelPool

langchain_core = pytest.importorskip("langchain_core")
pytest.importorskip("llama_index.core")

from langchain_core.documents import Document  # noqa: E402
from llama_index.core.schema import NodeWithScore, TextNode  # noqa: E402

from rag_rerank_plugins.langchain import (  # noqa: E402
    SharedCrossEncoder,
    SharedEmbeddings,
    SharedRerankCompressor,
)
from rag_rerank_plugins.llama_index import (  # noqa: E402
    SharedEmbedding,
    SharedRerankPostprocessor,
)

TEXTS = ["cats sleep all day", "paris is in france", "python reads well"]


def _adapters(pool: ModelPool, **reranker_options: Any) -> dict[str, Any]:
    common: dict[str, Any] = {"device": "cpu", "pool": pool}
    rerank = {"backend": "fake-reranker", **common, **reranker_options}
    return {
        "compressor": SharedRerankCompressor(model="fake", **rerank),
        "cross_encoder": SharedCrossEncoder(model="fake", **rerank),
        "postprocessor": SharedRerankPostprocessor(model="fake", **rerank),
        "embeddings": SharedEmbeddings(model="fake", backend="fake-embedder", **common),
        "embedding": SharedEmbedding(model_name="fake", backend="fake-embedder", **common),
    }


def _sync_calls(a: dict[str, Any]) -> dict[str, Any]:
    docs = [Document(page_content=t) for t in TEXTS]
    nodes = [NodeWithScore(node=TextNode(text=t), score=0.0) for t in TEXTS]
    return {
        "compress": [d.page_content for d in a["compressor"].compress_documents(docs, "cats")],
        "score": a["cross_encoder"].score([("cats", TEXTS[0])]),
        "postprocess": [
            n.node.get_content()
            for n in a["postprocessor"].postprocess_nodes(nodes, query_str="cats")
        ],
        "embed_query": a["embeddings"].embed_query("cats"),
        "embed_documents": a["embeddings"].embed_documents(TEXTS),
        "query_embedding": a["embedding"].get_query_embedding("cats"),
        "text_embeddings": a["embedding"].get_text_embedding_batch(TEXTS),
    }


async def _async_calls(a: dict[str, Any]) -> dict[str, Any]:
    docs = [Document(page_content=t) for t in TEXTS]
    nodes = [NodeWithScore(node=TextNode(text=t), score=0.0) for t in TEXTS]
    compressed = await a["compressor"].acompress_documents(docs, "cats")
    processed = await a["postprocessor"].apostprocess_nodes(nodes, query_str="cats")
    return {
        "compress": [d.page_content for d in compressed],
        "postprocess": [n.node.get_content() for n in processed],
        "embed_query": await a["embeddings"].aembed_query("cats"),
        "embed_documents": await a["embeddings"].aembed_documents(TEXTS),
        "query_embedding": await a["embedding"].aget_query_embedding("cats"),
        "text_embeddings": await a["embedding"].aget_text_embedding_batch(TEXTS),
    }


def _in_flight(pool: ModelPool) -> list[int]:
    return [slot.handle._in_flight for slot in pool._slots.values() if slot.handle is not None]


def test_every_sync_method_works_inside_a_running_event_loop(pool: ModelPool) -> None:
    """A cell calling sync code runs inside the kernel's loop: every sync adapter method must
    answer there as outside one (no asyncio.run, no wait on the loop it blocks), and the async
    methods awaited in the same cell agree with them."""
    adapters = _adapters(pool)
    outside = _sync_calls(adapters)

    async def cell() -> tuple[dict[str, Any], dict[str, Any]]:
        return _sync_calls(_adapters(pool)), await _async_calls(_adapters(pool))

    inside, awaited = asyncio.run(asyncio.wait_for(cell(), 30))
    assert inside == outside
    assert {k: v for k, v in outside.items() if k in awaited} == awaited
    assert [s["loads"] for s in pool.stats().values()] == [1, 1]
    assert _in_flight(pool) == [0, 0]


def test_rerunning_a_cell_fifty_times_loads_each_model_once(pool: ModelPool) -> None:
    """Re-running the cell that builds the adapters (50 times) reuses the shared models."""
    for _ in range(50):
        _sync_calls(_adapters(pool))
    stats = pool.stats().values()
    assert [s["loads"] for s in stats] == [1, 1]
    assert sum(s["calls"] for s in stats) == 50 * 7


def test_an_interrupted_sync_call_counts_as_cancelled_and_the_next_one_works(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Before: "interrupt kernel" during a sync call (KeyboardInterrupt in the main thread while
    it waits for its result) was counted as a failed model call (``errors`` +1, which error-rate
    alerts read), where an async caller's cancellation counts as ``cancelled``. Now both count as
    cancelled; nothing stays in flight and the next call is served by the same load.

    The interrupt is raised where a signal lands: in this thread's wait (``Future.result``)."""
    # A deadline makes the direct (thread-safe) backend run in a thread the caller waits for.
    pool = ModelPool(config=EngineConfig(request_timeout_s=10))
    try:
        adapter = SharedRerankCompressor(
            model="slow",
            backend="fake-reranker",
            device="cpu",
            pool=pool,
            model_kwargs={"delay_ms": 300},
        )
        adapter.preload(warmup=False)
        me = threading.current_thread()
        result = Future.result

        def interrupted(self: Future[Any], timeout: float | None = None) -> Any:
            if threading.current_thread() is me and not self.done():
                time.sleep(0.05)
                raise KeyboardInterrupt
            return result(self, timeout)

        async def cell() -> None:
            adapter.compress_documents([Document(page_content=t) for t in TEXTS], "cats")

        monkeypatch.setattr(Future, "result", interrupted)
        loop = asyncio.new_event_loop()  # as ipykernel: a loop run by hand, no SIGINT handler
        try:
            with pytest.raises(KeyboardInterrupt):
                loop.run_until_complete(cell())
        finally:
            monkeypatch.undo()
            loop.close()
        time.sleep(0.4)  # the abandoned pass ends in its thread
        docs = adapter.compress_documents([Document(page_content=t) for t in TEXTS], "cats")
        assert docs[0].page_content == TEXTS[0]
        stats = adapter.stats()
        assert (stats["loads"], stats["calls"], stats["errors"], stats["cancelled"]) == (1, 1, 0, 1)
        assert _in_flight(pool) == [0]
    finally:
        pool.clear()


def test_a_cancelled_top_level_await_leaves_nothing_behind(pool: ModelPool) -> None:
    """Interrupting a cell that awaits (ipykernel cancels the cell's task) withdraws the call."""
    spec_options = {"delay_ms": 300}
    adapter = SharedRerankCompressor(
        model="slow", backend="fake-reranker", device="cpu", pool=pool, model_kwargs=spec_options
    )
    docs = [Document(page_content=t) for t in TEXTS]

    async def cell() -> list[Document]:
        task = asyncio.ensure_future(adapter.acompress_documents(docs, "cats"))
        await asyncio.sleep(0.05)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        return list(await adapter.acompress_documents(docs, "cats"))

    assert asyncio.run(asyncio.wait_for(cell(), 10))[0].page_content == TEXTS[0]
    stats = adapter.stats()
    assert (stats["loads"], stats["errors"], stats["cancelled"]) == (1, 0, 1)
    assert _in_flight(pool) == [0]


# -- progress bars in a kernel --------------------------------------------------------------------


@pytest.fixture
def widget_bar_without_ipywidgets(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """tqdm.auto as a Jupyter kernel without ipywidgets gets it where tqdm does not fall back
    itself (older tqdm, a broken widget install): the widget bar, whose constructor raises
    ``ImportError("IProgress not found ...")``."""
    tqdm_auto = pytest.importorskip("tqdm.auto")
    tqdm_notebook = pytest.importorskip("tqdm.notebook")
    from rag_rerank_plugins import _progress

    monkeypatch.setattr(tqdm_notebook, "IProgress", None)
    monkeypatch.setattr(tqdm_auto, "tqdm", tqdm_notebook.tqdm)
    monkeypatch.setattr(_progress, "_warned", False)
    # tqdm's own __del__ fails on the half-built widget bar: collected here, quietly.
    monkeypatch.setattr(tqdm_notebook.tqdm, "__del__", lambda self: None)
    yield
    gc.collect()


@pytest.mark.usefixtures("widget_bar_without_ipywidgets")
def test_show_progress_without_ipywidgets_embeds_anyway(
    pool: ModelPool, caplog: pytest.LogCaptureFixture
) -> None:
    """Before: ``SharedEmbeddings(show_progress=True).embed_documents`` in such a kernel failed
    with tqdm's ImportError, though a missing bar is never a reason to fail an embedding call
    (rag_rerank_plugins._progress). Now it embeds without a bar and warns once."""
    progress = SharedEmbeddings(
        model="fake",
        backend="fake-embedder",
        device="cpu",
        pool=pool,
        show_progress=True,
        batch_size=2,
    )
    plain = SharedEmbeddings(model="fake", backend="fake-embedder", device="cpu", pool=pool)
    with caplog.at_level(logging.WARNING, logger="rag_rerank_plugins._progress"):
        assert progress.embed_documents(TEXTS) == plain.embed_documents(TEXTS)
        assert asyncio.run(progress.aembed_documents(TEXTS)) == plain.embed_documents(TEXTS)
    warnings = [r for r in caplog.records if "no progress bar" in r.getMessage()]
    assert len(warnings) == 1, caplog.records
    assert "IProgress" in warnings[0].getMessage()


def test_a_progress_bar_never_hides_the_work_s_own_error() -> None:
    """Only the bar's creation is guarded: an error of the work inside it still propagates."""
    from rag_rerank_plugins._progress import progress_bar

    pytest.importorskip("tqdm")
    with pytest.raises(ZeroDivisionError), progress_bar(3, "work", enabled=True) as bar:  # noqa: PT012
        bar.update(1)
        _ = 1 / 0


# -- a real interrupt, nest_asyncio and %autoreload, in a process of their own --------------------


def _run(code: str, timeout: float = 120) -> str:
    done = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


@pytest.mark.skipif(sys.platform == "win32", reason="pthread_kill: POSIX only")
def test_interrupt_kernel_during_a_sync_call_under_nest_asyncio() -> None:
    """SIGINT to the main thread while a cell's sync call runs inside the (nest_asyncio-patched)
    loop: KeyboardInterrupt in the cell, then the next sync call and a nested ``asyncio.run``
    work, with one load, nothing in flight and the interrupt counted as cancelled (before: as an
    error)."""
    pytest.importorskip("nest_asyncio")
    out = _run(
        """
        import asyncio, signal, threading, time
        import nest_asyncio
        from langchain_core.documents import Document
        from rag_rerank_plugins import get_pool
        from rag_rerank_plugins.langchain import SharedRerankCompressor

        nest_asyncio.apply()
        # A kernel handles SIGINT itself; a child inherits an ignored SIGINT from its parent
        # (some earlier test in the suite), and Python then raises no KeyboardInterrupt.
        signal.signal(signal.SIGINT, signal.default_int_handler)
        docs = [Document(page_content=t) for t in ("cats sleep", "paris", "python")]
        slow = SharedRerankCompressor(
            model="slow", backend="fake-reranker", device="cpu", model_kwargs={"delay_ms": 3000}
        )
        fast = SharedRerankCompressor(model="fast", backend="fake-reranker", device="cpu")
        slow.preload(warmup=False)
        main = threading.main_thread().ident
        handle = get_pool().get(slow.spec)

        def interrupt_once_running():  # not on a timer: a loaded box may not be there yet
            deadline = time.monotonic() + 30
            while handle._in_flight == 0 and time.monotonic() < deadline:
                time.sleep(0.01)
            time.sleep(0.1)
            signal.pthread_kill(main, signal.SIGINT)

        threading.Thread(target=interrupt_once_running, daemon=True).start()

        async def cell():
            start = time.perf_counter()
            try:
                slow.compress_documents(docs, "cats")
            except KeyboardInterrupt:
                print("interrupted", time.perf_counter() - start < 2.5)
            print("next", fast.compress_documents(docs, "cats")[0].page_content)
            print("nested", asyncio.run(fast.acompress_documents(docs, "cats"))[0].page_content)

        loop = asyncio.new_event_loop()  # as ipykernel: Python's own SIGINT handler
        loop.run_until_complete(cell())
        s = slow.stats()
        print("stats", s["loads"], s["errors"], s["cancelled"])
        print("in_flight", [x.handle._in_flight for x in get_pool()._slots.values()])
        """
    )
    assert "interrupted True" in out, out
    assert "next cats sleep" in out, out
    assert "nested cats sleep" in out, out
    assert "stats 1 0 1" in out, out
    assert "in_flight [0, 0]" in out, out


@pytest.mark.skipif(not hasattr(__import__("os"), "fork"), reason="needs os.fork")
def test_reloading_the_pool_module_keeps_the_process_pool() -> None:
    """Before: ``importlib.reload(rag_rerank_plugins.pool.process)`` (``%autoreload`` after an
    edit, or by hand) made a new default pool: the next cell loaded every model again while the
    old pool's copy stayed loaded, and the fork hook was registered twice (a forked child renewed
    every pool twice). Now the default pool, its lock and the single fork hook survive a reload."""
    out = _run(
        """
        import importlib, os
        from langchain_core.documents import Document
        import rag_rerank_plugins.pool.process as process
        from rag_rerank_plugins import get_pool
        from rag_rerank_plugins.langchain import SharedRerankCompressor

        def cell():
            adapter = SharedRerankCompressor(model="m", backend="fake-reranker", device="cpu")
            adapter.compress_documents([Document(page_content="a b")], "a")
            return adapter

        first = get_pool()
        cell()
        for _ in range(2):
            importlib.reload(process)
        adapter = cell()
        print("same pool", process.get_pool() is first and get_pool() is first)
        print("loads", adapter.stats()["loads"])

        renewed = []
        original = process.after_fork
        process.after_fork = lambda pool: (renewed.append(pool), original(pool))
        read, write = os.pipe()
        pid = os.fork()
        if pid == 0:
            os.write(write, str(len(renewed)).encode())
            os._exit(0)
        os.waitpid(pid, 0)
        print("renewed in child", os.read(read, 16).decode())
        """
    )
    assert "same pool True" in out, out
    assert "loads 1" in out, out
    assert "renewed in child 1" in out, out


def test_reloading_the_adapter_modules_keeps_calls_working() -> None:
    """``%autoreload`` of our adapter modules: adapters built before and after still work, on
    the same loaded models (the reload runs in a child process: the classes of this one stay)."""
    out = _run(
        """
        import importlib, sys
        from langchain_core.documents import Document
        from rag_rerank_plugins import get_pool
        from rag_rerank_plugins.langchain import SharedRerankCompressor

        def cell():
            from rag_rerank_plugins.langchain import SharedEmbeddings, SharedRerankCompressor
            from rag_rerank_plugins.llama_index import SharedEmbedding
            SharedRerankCompressor(model="m", backend="fake-reranker", device="cpu")\\
                .compress_documents([Document(page_content="a b")], "a")
            SharedEmbeddings(model="m", backend="fake-embedder", device="cpu").embed_query("a")
            SharedEmbedding(model_name="m", backend="fake-embedder", device="cpu")\\
                .get_text_embedding_batch(["a"])

        old = SharedRerankCompressor(model="m", backend="fake-reranker", device="cpu")
        cell()
        names = sorted(m for m in sys.modules if m.startswith("rag_rerank_plugins"))
        for name in names:
            importlib.reload(sys.modules[name])
            cell()
            old.compress_documents([Document(page_content="a b")], "a")
        print("loads", sorted(s["loads"] for s in get_pool().stats().values()))
        """,
        timeout=240,
    )
    assert "loads [1, 1]" in out, out
