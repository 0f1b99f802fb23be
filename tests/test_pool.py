"""The shared pool: one load per spec under concurrency, retries, release, stats, fork."""

from __future__ import annotations

import multiprocessing
import sys
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor

import pytest

from rag_rerank_plugins import (
    InvalidInputError,
    ModelLoadError,
    ModelNotFoundError,
    ModelPool,
    ModelSpec,
    UnknownBackendError,
    get_pool,
)
from rag_rerank_plugins.backends import register_backend
from rag_rerank_plugins.testing import FakeReranker, fake_embedder_spec, fake_reranker_spec


def _register(loader, kind: str = "reranker") -> str:
    name = f"test-{uuid.uuid4().hex[:8]}"
    register_backend(name, loader, kind)
    return name


def test_32_threads_on_a_cold_spec_load_exactly_once(pool: ModelPool) -> None:
    loads = []

    def slow_loader(spec, _pool):
        loads.append(threading.get_ident())
        time.sleep(0.2)  # wide window for a race
        return FakeReranker()

    spec = ModelSpec("m", backend=_register(slow_loader), device="cpu")
    barrier = threading.Barrier(32)

    def call(_: int):
        barrier.wait()
        return pool.get(spec)

    with ThreadPoolExecutor(32) as ex:
        handles = list(ex.map(call, range(32)))
    assert len(loads) == 1
    assert all(h is handles[0] for h in handles)
    assert pool.stats()[handles[0].spec.label]["loads"] == 1


def test_32_threads_real_cross_encoder_load_once_and_agree(
    pool: ModelPool, ce_spec: ModelSpec, passages: list[str]
) -> None:
    pairs = [("what produces energy in cells?", p) for p in passages]
    barrier = threading.Barrier(32)

    def call(_: int) -> list[float]:
        barrier.wait()
        return pool.score_pairs(ce_spec, pairs, batch_size=3)

    with ThreadPoolExecutor(32) as ex:
        results = list(ex.map(call, range(32)))
    sequential = pool.score_pairs(ce_spec, pairs, batch_size=3)
    assert all(r == sequential for r in results)
    stats = pool.spec_stats(ce_spec)
    assert stats["loads"] == 1
    assert stats["calls"] == 33
    assert stats["items"] == 33 * len(pairs)
    assert stats["errors"] == 0


def test_load_failure_is_explicit_and_the_next_call_retries(pool: ModelPool) -> None:
    attempts = []

    def flaky_loader(spec, _pool):
        attempts.append(1)
        if len(attempts) == 1:
            raise RuntimeError("disk hiccup")
        return FakeReranker()

    spec = ModelSpec("flaky-model", backend=_register(flaky_loader), device="cpu")
    with pytest.raises(ModelLoadError, match="flaky-model") as info:
        pool.get(spec)
    assert "disk hiccup" in str(info.value)
    assert isinstance(info.value.__cause__, RuntimeError)
    assert pool.score_pairs(spec, [("a", "a")]) == [1.0]
    stats = pool.spec_stats(spec)
    assert (stats["loads"], stats["load_failures"]) == (1, 1)


def test_unknown_backend(pool: ModelPool) -> None:
    with pytest.raises(UnknownBackendError, match="cross-encoder"):
        pool.get(ModelSpec("m", backend="no-such-backend"))


def test_missing_model_offline_says_how_to_use_a_local_path(pool: ModelPool) -> None:
    pytest.importorskip("sentence_transformers")
    spec = ModelSpec("no-such-org/no-such-reranker", device="cpu")
    with pytest.raises(ModelNotFoundError, match="local directory"):
        pool.get(spec)
    assert not pool.is_loaded(spec)


@pytest.mark.dtype_policy
def test_auto_and_explicit_cpu_share_one_model(pool: ModelPool, tiny_ce_path: str) -> None:
    pytest.importorskip("torch")
    import torch

    if torch.cuda.is_available():
        pytest.skip("auto resolves to CUDA here")
    from rag_rerank_plugins.policy import decide_dtype

    a = pool.get(ModelSpec(tiny_ce_path, device="auto"))
    b = pool.get(ModelSpec(tiny_ce_path, device="cpu", dtype=decide_dtype("auto", "cpu").dtype))
    assert a is b
    assert len(pool.loaded_specs()) == 1


def test_release_reload_and_clear(pool: ModelPool) -> None:
    spec = fake_reranker_spec()
    handle = pool.get(spec)
    assert pool.release(spec) is True
    assert handle.released
    assert pool.release(spec) is False
    assert not pool.is_loaded(spec)
    assert pool.score_pairs(spec, [("a", "a b")]) == [1.0]  # transparently reloaded
    stats = pool.spec_stats(spec)
    assert (stats["loads"], stats["releases"], stats["loaded"]) == (2, 1, True)
    pool.get(fake_embedder_spec())
    assert pool.clear() == 2
    assert pool.loaded_specs() == []


def test_release_during_calls_never_fails_a_caller(pool: ModelPool) -> None:
    spec = fake_reranker_spec("slow", delay_ms=2)
    stop = threading.Event()
    errors: list[BaseException] = []
    results: list[list[float]] = []

    def caller() -> None:
        while not stop.is_set():
            try:
                results.append(pool.score_pairs(spec, [("a b", "a"), ("a b", "a b")]))
            except BaseException as exc:
                errors.append(exc)

    threads = [threading.Thread(target=caller) for _ in range(8)]
    for t in threads:
        t.start()
    for _ in range(20):
        pool.release(spec)
        time.sleep(0.005)
    stop.set()
    for t in threads:
        t.join()
    assert errors == []
    assert results
    assert all(r == [0.5, 1.0] for r in results)


def test_stats_report_device_dtype_and_counters(pool: ModelPool) -> None:
    spec = fake_embedder_spec(dim=8)
    pool.embed(spec, ["a", "b", "c"])
    stats = pool.spec_stats(spec)
    assert stats["kind"] == "embedder"
    assert (stats["device"], stats["dtype"]) == ("cpu", "float32")
    assert (stats["loads"], stats["calls"], stats["items"]) == (1, 1, 3)
    assert stats["load_seconds"] >= 0
    pool.reset_stats()
    assert pool.spec_stats(spec)["calls"] == 0
    assert pool.spec_stats(spec)["loads"] == 1


def test_non_string_text_is_rejected_before_the_model(pool: ModelPool) -> None:
    with pytest.raises(InvalidInputError, match="pair #1"):
        pool.score_pairs(fake_reranker_spec(), [("q", "ok"), ("q", None)])  # type: ignore[list-item]
    with pytest.raises(InvalidInputError, match="text #0"):
        pool.embed(fake_embedder_spec(), [b"bytes"])  # type: ignore[list-item]
    with pytest.raises(InvalidInputError, match="embedder"):
        pool.score_pairs(fake_embedder_spec(), [("q", "t")])
    assert pool.score_pairs(fake_reranker_spec(), []) == []


def test_preload_warms_up(pool: ModelPool) -> None:
    spec = fake_reranker_spec()
    (_handle,) = pool.preload(spec)
    assert pool.is_loaded(spec)
    stats = pool.spec_stats(spec)
    assert (stats["calls"], stats["warmups"]) == (0, 1)  # the warm-up is no caller's call


def test_preload_again_does_not_warm_up_again_until_the_model_reloads(pool: ModelPool) -> None:
    """A Ray Serve replica preloads in ``__init__``, then the server's lifespan preloads the same
    specs: a second warm-up pass kept ``/health`` at "loading" (503s) after Ray marked the
    replica ready. A reloaded model is a new handle and warms up again."""
    spec = fake_reranker_spec()
    pool.preload(spec)
    pool.preload(spec)
    assert pool.spec_stats(spec)["warmups"] == 1
    pool.release(spec)
    pool.preload(spec)
    assert pool.spec_stats(spec)["warmups"] == 2


def test_get_pool_is_one_process_wide_instance() -> None:
    seen = []
    threads = [threading.Thread(target=lambda: seen.append(get_pool())) for _ in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert all(p is seen[0] for p in seen)


# -- fork ----------------------------------------------------------------------------------------


def _gpu_like_loader(spec, _pool):
    model = FakeReranker()
    model.device = "cuda:0"  # pretend: the pool must never reuse it after fork
    return model


_GPU_LIKE = "test-gpu-like"
register_backend(_GPU_LIKE, _gpu_like_loader, "reranker", replace=True)


def _child(queue, cpu_spec, gpu_spec) -> None:
    pool = get_pool()
    queue.put(
        {
            "cpu_loaded_before_call": pool.is_loaded(cpu_spec),
            "gpu_loaded_before_call": pool.is_loaded(gpu_spec),
            "cpu_scores": pool.score_pairs(cpu_spec, [("a b", "a")]),
            "gpu_scores": pool.score_pairs(gpu_spec, [("a b", "a")]),
            "cpu_loads": pool.spec_stats(cpu_spec)["loads"],
            "gpu_loads": pool.spec_stats(gpu_spec)["loads"],
        }
    )


@pytest.mark.skipif(sys.platform == "win32", reason="fork is POSIX-only")
def test_fork_child_reuses_cpu_models_and_reloads_gpu_models() -> None:
    cpu_spec = fake_reranker_spec("fork-cpu")
    gpu_spec = ModelSpec("fork-gpu", backend=_GPU_LIKE, device="cpu")
    pool = get_pool()
    pool.preload(cpu_spec, gpu_spec)
    # Hold the pool lock while forking: the child must still be able to use its pool.
    ctx = multiprocessing.get_context("fork")
    queue = ctx.Queue()
    with pool._lock:
        child = ctx.Process(target=_child, args=(queue, cpu_spec, gpu_spec))
        child.start()
    result = queue.get(timeout=30)
    child.join(timeout=30)
    assert child.exitcode == 0
    assert result["cpu_loaded_before_call"] is True
    assert result["gpu_loaded_before_call"] is False
    assert result["cpu_scores"] == result["gpu_scores"] == [0.5]
    assert result["cpu_loads"] == 1  # shared copy-on-write from the parent
    assert result["gpu_loads"] == 2  # the child loaded its own
    pool.release(cpu_spec)
    pool.release(gpu_spec)


class _ScheduledFake(FakeReranker):
    thread_safe = False  # goes through the scheduler's worker thread, like torch models


register_backend(
    "test-scheduled-fake", lambda spec, _pool: _ScheduledFake(), "reranker", replace=True
)


def _scheduled_child(queue, spec) -> None:
    pool = get_pool()
    queue.put((pool.score_pairs(spec, [("a b", "a")]), pool.spec_stats(spec)["loads"]))


@pytest.mark.skipif(sys.platform == "win32", reason="fork is POSIX-only")
def test_fork_child_gets_a_fresh_worker_for_a_scheduled_cpu_model() -> None:
    spec = ModelSpec("fork-scheduled", backend="test-scheduled-fake", device="cpu")
    pool = get_pool()
    assert pool.score_pairs(spec, [("a b", "a")]) == [0.5]  # the parent's worker is running
    ctx = multiprocessing.get_context("fork")
    queue = ctx.Queue()
    child = ctx.Process(target=_scheduled_child, args=(queue, spec))
    child.start()
    scores, loads = queue.get(timeout=30)
    child.join(timeout=30)
    assert child.exitcode == 0
    assert (scores, loads) == ([0.5], 1)
    pool.release(spec)


@pytest.mark.parametrize(
    "path", ["/models/no-such-reranker", "./no-such-dir", "../x/y", "models/a/b", "~/m", "C:/m"]
)
def test_missing_local_folder_says_the_folder_does_not_exist(pool: ModelPool, path: str) -> None:
    """A path that is not there gets "does not exist", not advice to pass that same path."""
    pytest.importorskip("sentence_transformers")
    spec = ModelSpec(path, device="cpu")
    with pytest.raises(ModelNotFoundError, match="does not exist") as info:
        pool.get(spec)
    assert "Pass a local directory instead" not in str(info.value)
