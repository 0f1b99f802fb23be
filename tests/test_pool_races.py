"""Races and side effects a hostile tester found in the pool's bookkeeping.

* Resolving a new spec while ``release()`` forgot the keys of another raised "dictionary changed
  size during iteration" from ``release()`` after its slot was gone: the model was orphaned,
  alive with its worker threads, and ``clear()`` could no longer reach it.
* ``clear()`` racing the first load of a pool with ``idle_unload_s`` joined a reaper thread not
  started yet: ``RuntimeError``, and every model stayed loaded.
* An async caller that timed out on a load that then failed left asyncio logging "Future
  exception was never retrieved".
* A thread-safe backend that raised KeyboardInterrupt or GeneratorExit on a worker thread handed
  it raw to the caller (counted as a cancellation), where a scheduled model gave InferenceError.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import sys
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest

import rag_rerank_plugins.pool.budget as budget
from rag_rerank_plugins import InferenceError, ModelPool, ModelSpec, RequestTimeoutError
from rag_rerank_plugins.backends import RerankerModel, register_backend
from rag_rerank_plugins.testing import fake_reranker_spec


@pytest.fixture
def fast_switching() -> Iterator[None]:
    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    yield
    sys.setswitchinterval(interval)


def test_release_racing_new_specs_never_orphans_the_model(fast_switching: None) -> None:
    pool = ModelPool()
    hot = fake_reranker_spec("hot")
    for i in range(20000):  # a long walk for _forget_keys
        pool.key(fake_reranker_spec(f"warm{i}"))
    stop = time.monotonic() + 3.0
    errors: list[BaseException] = []

    def resolver() -> None:
        i = 0
        while time.monotonic() < stop and not errors:
            pool.key(fake_reranker_spec(f"new{i}"))
            i += 1

    def releaser() -> None:
        while time.monotonic() < stop and not errors:
            try:
                pool.score_pairs(hot, [("q", "p")])
                pool.release(hot)
            except BaseException as exc:
                errors.append(exc)

    threads = [threading.Thread(target=resolver), threading.Thread(target=releaser)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    assert errors == []
    pool.clear()
    assert pool.loaded_specs() == []


def test_clear_racing_the_reaper_start_releases_everything(monkeypatch: pytest.MonkeyPatch) -> None:
    """The reaper thread was published under the pool's lock and started after it: a clear()
    in between joined a thread not started yet (RuntimeError) and released nothing."""
    starting = threading.Event()
    real_thread = threading.Thread

    class SlowStart(real_thread):
        def start(self) -> None:
            if self.name == "rag-rerank-reaper":
                starting.set()
                time.sleep(0.3)  # the window clear() fell into
            super().start()

    monkeypatch.setattr(budget.threading, "Thread", SlowStart)
    pool = ModelPool(idle_unload_s=30)
    spec = fake_reranker_spec("first")
    loader = real_thread(target=pool.score_pairs, args=(spec, [("q", "p")]), daemon=True)
    loader.start()
    assert starting.wait(10)
    pool.clear()  # raised RuntimeError: cannot join thread before it is started
    loader.join(10)
    pool.clear()
    assert not pool.is_loaded(spec)


async def test_a_timed_out_caller_of_a_failing_load_leaves_no_unretrieved_error(
    caplog: pytest.LogCaptureFixture,
) -> None:
    def loader(spec: ModelSpec, provider: Any) -> Any:
        time.sleep(0.3)
        raise OSError("the model share went away")

    register_backend("races-failing-slow", loader, "reranker", uses_torch=False, replace=True)
    pool = ModelPool()
    spec = ModelSpec("x", backend="races-failing-slow", device="cpu")
    with caplog.at_level(logging.ERROR, logger="asyncio"):
        with pytest.raises(RequestTimeoutError):
            await pool.ascore_pairs(spec, [("q", "p")], timeout=0.05)
        await asyncio.sleep(0.6)  # the load fails meanwhile
        gc.collect()
        await asyncio.sleep(0.05)
    assert "never retrieved" not in caplog.text


class _Raising(RerankerModel):
    thread_safe = True

    def __init__(self, error: type[BaseException]) -> None:
        self.error = error

    def score_pairs(self, pairs: Any, batch_size: int) -> list[float]:
        raise self.error()


@pytest.mark.parametrize("error", [KeyboardInterrupt, SystemExit, GeneratorExit])
def test_a_direct_backend_s_own_interrupts_are_inference_errors_off_the_main_thread(
    error: type[BaseException],
) -> None:
    name = f"races-raising-{error.__name__.lower()}"
    register_backend(name, lambda s, p: _Raising(error), "reranker", uses_torch=False, replace=True)
    pool = ModelPool()
    spec = ModelSpec("r", backend=name, device="cpu")
    caught: list[BaseException] = []

    def call() -> None:
        try:
            pool.score_pairs(spec, [("q", "p")])
        except BaseException as exc:
            caught.append(exc)

    thread = threading.Thread(target=call)
    thread.start()
    thread.join(10)
    assert len(caught) == 1
    assert isinstance(caught[0], InferenceError), repr(caught[0])
    stats = pool.spec_stats(spec)
    assert (stats["errors"], stats.get("cancelled", 0)) == (1, 0)
    pool.clear()


# -- parallel loads of different dtypes ---------------------------------------------------------


def _float_dtypes(handle: Any) -> set[Any]:
    """The dtypes of every floating parameter of the torch modules a loaded handle holds."""
    import torch

    found: set[Any] = set()
    for obj in vars(handle.model).values():
        if isinstance(obj, torch.nn.Module):
            found |= {p.dtype for p in obj.parameters() if p.is_floating_point()}
    return found


@pytest.fixture
def slow_dtype_switch(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """transformers' ``local_torch_dtype`` (the process-wide default dtype it sets around a
    model's construction) held a while before and after the build: two unguarded builds in two
    threads then always overlap, as they did by chance with real models."""
    import contextlib

    import torch
    from transformers import modeling_utils

    original = modeling_utils.local_torch_dtype

    @contextlib.contextmanager
    def held(dtype: Any, model_class_name: str | None = None) -> Iterator[None]:
        with original(dtype, model_class_name):
            time.sleep(0.3)
            yield
            time.sleep(0.3)

    monkeypatch.setattr(modeling_utils, "local_torch_dtype", held)
    try:
        yield
    finally:
        torch.set_default_dtype(torch.float32)  # never poison later tests, pass or fail


def test_parallel_loads_in_two_dtypes_keep_each_dtype_and_the_default(
    slow_dtype_switch: None, tiny_ce_path: str, minilm_path: str
) -> None:
    """Found on an AMX Xeon: three specs loading at once (a bfloat16 cross-encoder, a bfloat16
    embedder, a float32 cross-encoder) came out with mixed-dtype weights in 5 rounds of 6 (calls
    failed deep in torch, or ran in float32 while stats() said bfloat16), and torch's default
    dtype was left at bfloat16 for the whole process. transformers sets that process-wide
    default around each build; the backends now build one model at a time."""
    import torch

    specs = [
        ModelSpec(tiny_ce_path, backend="cross-encoder", device="cpu", dtype="bfloat16"),
        ModelSpec(minilm_path, backend="sentence-transformers", device="cpu", dtype="bfloat16"),
        ModelSpec(tiny_ce_path, backend="cross-encoder", device="cpu", dtype="float32"),
    ]
    pool = ModelPool()
    barrier = threading.Barrier(len(specs))
    errors: list[BaseException] = []

    def load(spec: ModelSpec) -> None:
        barrier.wait()
        try:
            pool.get(spec)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=load, args=(spec,)) for spec in specs]
    try:
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        assert not errors
        assert torch.get_default_dtype() == torch.float32
        for spec in specs:
            assert _float_dtypes(pool.get(spec)) == {getattr(torch, spec.dtype)}, spec
        scores = pool.score_pairs(specs[2], [("q", "a passage"), ("q", "another one")])
        vectors = pool.embed(specs[1], ["a passage"])
    finally:
        pool.clear()
    fresh = ModelPool()
    try:
        assert fresh.score_pairs(specs[2], [("q", "a passage"), ("q", "another one")]) == scores
        assert fresh.embed(specs[1], ["a passage"]) == vectors
    finally:
        fresh.clear()


def test_building_puts_back_a_default_dtype_a_library_leaked() -> None:
    import torch

    from rag_rerank_plugins.backends._torch_common import building

    try:
        with building():
            torch.set_default_dtype(torch.bfloat16)  # what an overlapped restore left behind
        assert torch.get_default_dtype() == torch.float32
    finally:
        torch.set_default_dtype(torch.float32)
