"""A pool's models end when the pool does, wait for their calls, and survive a fork.

* A pool collected without ``clear()`` stops its models' worker threads and frees the weights
  (an idle worker used to wait for work forever and keep the model alive for the process).
* ``release()`` waits for calls running inside a thread-safe (directly called) model before
  closing it, as docs/concepts.md says; on a thread running an event loop it does not wait
  (awaited calls there could never finish), so it cannot hang the loop.
* After ``fork`` the locks of every spec's stats are new, loaded or not (a parent thread may
  have held one at the fork).
"""

from __future__ import annotations

import gc
import os
import signal
import threading
import time
import weakref
from concurrent.futures import ThreadPoolExecutor

import pytest

from rag_rerank_plugins import ModelPool, ModelSpec
from rag_rerank_plugins.backends import register_backend
from rag_rerank_plugins.testing import FakeReranker

PAIRS = [("alpha beta", "alpha"), ("gamma", "delta")]
EXPECTED = FakeReranker().score_pairs(PAIRS, 32)
MODELS: list[weakref.ref[FakeReranker]] = []


class _Scheduled(FakeReranker):
    """Runs on the scheduler's worker thread, like every torch backend."""

    thread_safe = False


def _load_scheduled(spec: ModelSpec, _provider: object) -> FakeReranker:
    model = _Scheduled(footprint_mb=100)
    MODELS.append(weakref.ref(model))
    return model


class _ClosableThreadSafe(FakeReranker):
    """A thread-safe model (as the remote backends, the bi-encoder) whose close() frees what a
    running call uses (a remote backend closes its HTTP client)."""

    thread_safe = True

    def __init__(self) -> None:
        super().__init__(footprint_mb=100)
        self.closed = False

    def close(self) -> None:
        self.closed = True

    def score_pairs(self, pairs, batch_size):  # type: ignore[no-untyped-def]
        time.sleep(0.3)
        if self.closed:
            raise RuntimeError("closed under a running call")
        return super().score_pairs(pairs, batch_size)


register_backend("lifecycle-sched", _load_scheduled, "reranker", uses_torch=False, replace=True)
register_backend(
    "lifecycle-closable",
    lambda s, p: _ClosableThreadSafe(),
    "reranker",
    uses_torch=False,
    replace=True,
)


def _spec(name: str, backend: str = "lifecycle-sched") -> ModelSpec:
    return ModelSpec(name, backend=backend, device="cpu")


def test_a_collected_pool_frees_its_scheduled_models_and_threads() -> None:
    """The worker thread of a scheduled model used to outlive its (collected) pool and keep
    the weights alive for good."""
    pool = ModelPool(memory_budget_mb=1000)
    spec = _spec(f"gc-{time.monotonic_ns()}")
    assert pool.score_pairs(spec, PAIRS) == EXPECTED
    handle = weakref.ref(pool.get(spec))
    model = MODELS[-1]
    label = pool.key(spec).label
    del pool
    gc.collect()
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and model() is not None:
        time.sleep(0.05)
        gc.collect()
    assert handle() is None  # the handle itself is gone ...
    leftover = [t.name for t in threading.enumerate() if label in t.name]
    assert model() is None, f"model still alive, threads left: {leftover}"  # ... its model not
    assert not leftover


def test_release_waits_for_in_flight_calls_on_thread_safe_models() -> None:
    """docs/concepts.md: release() "waits for the in-flight call"; models with thread_safe=True
    (called directly) used to be closed under their running calls."""
    pool = ModelPool(memory_budget_mb=1000)
    spec = _spec("closable", backend="lifecycle-closable")
    pool.get(spec)
    with ThreadPoolExecutor(16) as ex:
        futures = [ex.submit(pool.score_pairs, spec, PAIRS) for _ in range(16)]
        time.sleep(0.1)  # every call is inside the model now
        pool.release(spec)
        errors = []
        for future in futures:
            try:
                assert future.result(timeout=10) == EXPECTED
            except Exception as exc:
                errors.append(f"{type(exc).__name__}: {exc}")
    pool.clear()
    assert not errors, f"{len(errors)}/16 calls failed, e.g. {errors[0]}"


@pytest.mark.skipif(not hasattr(os, "fork"), reason="fork is POSIX-only")
def test_fork_renews_the_locks_of_specs_that_are_not_loaded() -> None:
    """A spec that was evicted (or released, or a parent GPU model) kept the parent's stats
    lock in a forked child; if a parent thread (the reaper evicting, a stats() scrape) held it
    at the fork, the child deadlocked on that spec's next load."""
    pool = ModelPool(memory_budget_mb=150)
    a, b = _spec("fork-a"), _spec("fork-b")
    assert pool.score_pairs(a, PAIRS) == EXPECTED
    assert pool.score_pairs(b, PAIRS) == EXPECTED  # evicts a (budget: one model)
    assert not pool.is_loaded(a)
    stats = pool._stats[pool.key(a)]
    with stats._lock:  # e.g. the reaper's stats.add(evictions=1) at the moment of fork
        pid = os.fork()
        if pid == 0:  # child
            try:
                code = 0 if pool.score_pairs(a, PAIRS) == EXPECTED else 3
            except BaseException:
                code = 4
            os._exit(code)
    try:
        deadline = time.monotonic() + 10
        status = None
        while time.monotonic() < deadline:
            done, raw = os.waitpid(pid, os.WNOHANG)
            if done:
                status = os.waitstatus_to_exitcode(raw)
                break
            time.sleep(0.05)
        if status is None:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
    finally:
        pool.clear()
    assert status == 0, (
        "the child hung on a lock inherited from the parent" if status is None else status
    )


async def test_release_on_an_event_loop_thread_does_not_wait_for_awaited_calls() -> None:
    """An awaited call on this loop cannot finish while release() blocks the loop: release()
    returns at once instead of hanging (the call then fails or finishes; it never hangs)."""
    import asyncio

    pool = ModelPool()
    spec = _spec("loop", backend="lifecycle-closable")
    pool.get(spec)
    call = asyncio.ensure_future(pool.ascore_pairs(spec, PAIRS))
    await asyncio.sleep(0.05)
    started = time.monotonic()
    pool.release(spec)  # on the loop thread: must not wait for `call`
    # A hang is for ever; 3 s leaves room for release's garbage collection on a loaded CI host.
    assert time.monotonic() - started < 3.0
    await asyncio.wait_for(asyncio.gather(call, return_exceptions=True), 5)
    pool.clear()


def test_release_reloads_what_a_re_pointed_symlink_or_a_relative_path_names_now(
    tmp_path: object, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A path is made concrete when resolved, and the pool kept that forever: after a blue/green
    deploy re-pointed ``current`` and called ``release()`` (or ``clear()``), and after a chdir,
    the old folder's model was loaded again, silently."""
    from pathlib import Path

    from rag_rerank_plugins.testing import build_cross_encoder

    root = Path(str(tmp_path))
    v1 = build_cross_encoder(root / "v1", seed=1)
    v2 = build_cross_encoder(root / "v2", seed=2)
    pairs = [("what is python", "Python is a programming language.")]
    expected = {
        str(p): ModelPool().score_pairs(ModelSpec(str(p), device="cpu", dtype="float32"), pairs)
        for p in (v1, v2)
    }
    assert expected[str(v1)] != expected[str(v2)]
    current = root / "current"
    current.symlink_to(v1)
    pool = ModelPool()
    spec = ModelSpec(str(current), device="cpu", dtype="float32")
    try:
        assert pool.score_pairs(spec, pairs) == expected[str(v1)]
        current.unlink()
        current.symlink_to(v2)
        assert pool.score_pairs(spec, pairs) == expected[str(v1)]  # loaded: v1 until released
        assert pool.release(spec) is True
        assert pool.score_pairs(spec, pairs) == expected[str(v2)]
        current.unlink()
        current.symlink_to(v1)
        pool.clear()
        assert pool.score_pairs(spec, pairs) == expected[str(v1)]
        # A relative path names another folder after a chdir.
        for name, target in (("a", v1), ("b", v2)):
            (root / name).mkdir()
            (root / name / "ce").symlink_to(target)
        relative = ModelSpec("ce", device="cpu", dtype="float32")
        monkeypatch.chdir(root / "a")
        assert pool.score_pairs(relative, pairs) == expected[str(v1)]
        monkeypatch.chdir(root / "b")
        pool.release(relative)
        assert pool.score_pairs(relative, pairs) == expected[str(v2)]
    finally:
        pool.clear()
