"""A forked child works whatever the parent's threads were doing at the fork.

Found by a hostile probe (each test hung before its fix): a parent thread holding a lock outside
the pool at the fork left it held in the child forever (the CPU thread binding of a device
worker: one child in ~60 under load; a window planner's tokenizer: 5 children of 6; a model's
construction); every child of a parent with an OpenVINO model hung in the runtime's stream
executors; and a child's first load of a new model hung or crashed in OpenMP.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

import pytest

from rag_rerank_plugins import ModelPool, ModelSpec

pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="fork is POSIX-only")


def _in_child(work: Callable[[], Any], timeout: float = 60.0) -> Any:
    """``work()`` in a forked child: its JSON result, or a failure naming the hang."""
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: never returns into pytest
        code = 0
        try:
            os.close(read)
            out = json.dumps({"result": work()})
        except BaseException as exc:  # reported to the parent
            out, code = json.dumps({"error": repr(exc)}), 1
        with os.fdopen(write, "w") as pipe:
            pipe.write(out)
        os._exit(code)
    os.close(write)
    deadline = time.monotonic() + timeout
    while not os.waitpid(pid, os.WNOHANG)[0]:
        if time.monotonic() > deadline:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            os.close(read)
            pytest.fail(f"the forked child hung for {timeout} s")
        time.sleep(0.05)
    with os.fdopen(read) as pipe:
        answer = json.loads(pipe.read() or '{"error": "no answer"}')
    assert "error" not in answer, answer["error"]
    return answer["result"]


def test_locks_held_by_parent_threads_at_the_fork_are_free_in_the_child(tiny_ce_path: str) -> None:
    pytest.importorskip("langchain_core")
    from langchain_core.documents import Document

    from rag_rerank_plugins import _cpu, windows
    from rag_rerank_plugins.backends import _torch_common
    from rag_rerank_plugins.langchain import SharedRerankCompressor

    pool = ModelPool()
    comp = SharedRerankCompressor(
        model=tiny_ce_path, device="cpu", dtype="float32", pool=pool, window_tokens=32, top_n=None
    )
    docs = [Document(page_content=f"lorem ipsum dolor sit amet {i} " * 40) for i in range(3)]
    parent = [d.metadata["relevance_score"] for d in comp.compress_documents(docs, "lorem 1")]
    model = pool.get(comp.spec).model  # the windower is cached per loaded model
    held, done = threading.Event(), threading.Event()

    def hold() -> None:  # a parent device worker mid-bind, a parent call mid-plan, a build
        with (
            _cpu._bind_lock,
            windows._cache_lock,
            windows.windower_for(model)._lock,
            _torch_common.building(),
        ):
            held.set()
            done.wait(30)

    thread = threading.Thread(target=hold, daemon=True)
    thread.start()
    held.wait(10)
    try:

        def child() -> list[float]:
            _cpu.set_thread_torch_threads(1)
            _cpu.set_thread_torch_threads(2)
            out = comp.compress_documents(docs, "lorem 1")
            fresh = ModelSpec(tiny_ce_path, backend="cross-encoder", device="cpu", dtype="float32")
            ModelPool().score_pairs(fresh, [("q", "p")])  # builds a model in the child
            return [d.metadata["relevance_score"] for d in out]

        assert _in_child(child) == pytest.approx(parent, abs=1e-6)
    finally:
        done.set()
        thread.join(10)
        pool.clear()


def test_a_forked_child_loads_a_model_its_parent_did_not(tiny_ce_path: str) -> None:
    """A ``multiprocessing`` fork worker's first load of a model its parent had not loaded hung
    or crashed (SIGSEGV in oneDNN's weight packing): GNU OpenMP's thread team of the forking
    thread is copied into the child without its threads. The load now runs that thread's torch
    work on one thread; the child's scores are the parent's."""
    import torch

    pool = ModelPool()
    pairs = [("what is the capital of france", "Paris is the capital of France."), ("q", "p")]
    parent_spec = ModelSpec(tiny_ce_path, backend="cross-encoder", device="cpu", dtype="float32")
    try:
        parent = pool.score_pairs(parent_spec, pairs)  # packs weights on this thread
        torch.ones(1 << 22).mul_(2)  # and one more parallel region here, whatever the load did

        def child() -> list[float]:
            spec = ModelSpec(
                tiny_ce_path, backend="cross-encoder", device="cpu", dtype="float32", max_length=64
            )
            return ModelPool().score_pairs(spec, pairs)

        assert _in_child(child) == pytest.approx(parent, abs=1e-6)
    finally:
        pool.clear()


def test_a_child_of_a_parent_with_an_openvino_model_reloads_it(
    tiny_ce_path: str, tmp_path: Any
) -> None:
    pytest.importorskip("openvino")
    pytest.importorskip("onnxruntime")
    pool = ModelPool()
    spec = ModelSpec(
        tiny_ce_path,
        backend="openvino-cross-encoder",
        dtype="float32",
        options={"cache_dir": str(tmp_path)},
    )
    pairs = [("q", "a doc"), ("q", "another, longer document")]
    try:
        parent = pool.score_pairs(spec, pairs)

        def child() -> dict[str, Any]:
            return {
                "scores": pool.score_pairs(spec, pairs),
                "loads": pool.spec_stats(spec)["loads"],
            }

        answer = _in_child(child, timeout=120)
        assert answer["scores"] == pytest.approx(parent, abs=1e-6)
        assert answer["loads"] == 2  # the parent's copy is left unused; the IR cache is reused
        assert pool.score_pairs(spec, pairs) == parent  # the parent's is untouched
    finally:
        pool.clear()


def test_a_fork_worker_of_a_parent_that_never_imported_us_loads(tiny_ce_path: str) -> None:
    """The review of the fix above: a parent that used torch but had not imported this package
    (so no fork hook was registered) forked a ``multiprocessing`` worker whose first load hung.
    Imported in such a worker, the package treats its main thread as the forking thread."""
    import subprocess
    import textwrap

    script = textwrap.dedent(
        f"""
        import multiprocessing, sys, torch
        x = torch.randn(512, 512); (x @ x).sum()  # the parent's own torch work, 2 threads
        torch.ones(1 << 22).mul_(2)
        assert "rag_rerank_plugins" not in sys.modules

        def work():
            from rag_rerank_plugins import ModelPool, ModelSpec
            spec = ModelSpec({tiny_ce_path!r}, backend="cross-encoder", device="cpu",
                             dtype="float32")
            print(ModelPool().score_pairs(spec, [("q", "p")]), flush=True)

        if __name__ == "__main__":
            worker = multiprocessing.get_context("fork").Process(target=work)
            worker.start()
            worker.join(60)
            if worker.exitcode is None:
                worker.kill()
            sys.exit(0 if worker.exitcode == 0 else 1)
        """
    )
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    env.pop("OMP_NUM_THREADS", None)
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=120, env=env
    )
    assert done.returncode == 0, done.stderr[-2000:]
