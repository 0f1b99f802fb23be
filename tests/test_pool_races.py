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
import contextlib
import gc
import logging
import sys
import threading
import time
from collections.abc import Callable, Iterator
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


@contextlib.contextmanager
def _dtype_switch_hook(hook: Callable[[Any], None]) -> Iterator[None]:
    """transformers' ``local_torch_dtype`` (the process-wide default dtype it sets around a
    model's instantiation) calls ``hook(dtype)`` once it has switched, before the model is
    instantiated; torch's default dtype is float32 again afterwards, pass or fail."""
    import torch
    from transformers import modeling_utils

    original = modeling_utils.local_torch_dtype

    @contextlib.contextmanager
    def hooked(dtype: Any, model_class_name: str | None = None) -> Iterator[None]:
        with original(dtype, model_class_name):
            hook(dtype)
            yield

    modeling_utils.local_torch_dtype = hooked
    try:
        yield
    finally:
        modeling_utils.local_torch_dtype = original
        torch.set_default_dtype(torch.float32)  # never poison later tests


def _bfloat16_build_after(delay: float, path: str) -> threading.Thread:
    """A bfloat16 load of ``path`` in another thread, ``delay`` seconds from now."""

    def load() -> None:
        time.sleep(delay)
        ModelPool().get(ModelSpec(path, backend="cross-encoder", device="cpu", dtype="bfloat16"))

    thread = threading.Thread(target=load, daemon=True)
    thread.start()
    return thread


PAIRS = [("what is the capital of france", "Paris is the capital."), ("q", "a longer passage")]


def test_parallel_loads_in_two_dtypes_keep_each_dtype_and_the_default(tiny_ce_path: str) -> None:
    """Found on an AMX Xeon: specs loading at once in two dtypes came out with mixed-dtype
    weights in 5 rounds of 6 (calls failed deep in torch, or ran in float32 while stats() said
    bfloat16), and torch's default dtype could stay bfloat16. transformers sets that
    process-wide default around each model's instantiation; those switches now take turns.
    Here the float32 instantiation waits (up to 3 s) for the bfloat16 switch to open."""
    import torch

    f32 = ModelSpec(tiny_ce_path, backend="cross-encoder", device="cpu", dtype="float32")
    bf16 = ModelSpec(tiny_ce_path, backend="cross-encoder", device="cpu", dtype="bfloat16")
    f32_open, bf16_open = threading.Event(), threading.Event()

    def hook(dtype: Any) -> None:
        if dtype == torch.float32:
            f32_open.set()
            bf16_open.wait(3)  # unguarded, the other build switches the default right now
        else:
            bf16_open.set()

    pool = ModelPool()
    try:
        with _dtype_switch_hook(hook):
            other = threading.Thread(target=lambda: f32_open.wait(30) and pool.get(bf16))
            other.start()
            pool.get(f32)
            other.join(60)
        assert torch.get_default_dtype() == torch.float32
        assert _float_dtypes(pool.get(f32)) == {torch.float32}
        assert _float_dtypes(pool.get(bf16)) == {torch.bfloat16}
        got = [pool.score_pairs(spec, PAIRS) for spec in (f32, bf16)]
    finally:
        pool.clear()
    fresh = ModelPool()
    try:
        assert got == [fresh.score_pairs(spec, PAIRS) for spec in (f32, bf16)]
    finally:
        fresh.clear()


def test_steps_that_read_the_default_dtype_wait_for_a_build_in_another_thread(
    tiny_ce_path: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Found by a review of the fix above: dynamic int8 quantization of a float32 model ran
    while another thread's bfloat16 build held the default dtype, and its scores moved
    silently (the ONNX exporter traced bfloat16 constants the same way). They now wait."""
    import torch

    from rag_rerank_plugins.backends import st_cross_encoder

    spec = ModelSpec(
        tiny_ce_path,
        backend="cross-encoder",
        device="cpu",
        dtype="float32",
        options={"quantize": "int8"},
    )
    want = ModelPool().score_pairs(spec, PAIRS)
    cap = st_cross_encoder.cap_to_positions

    def late_cap(*args: Any, **kwargs: Any) -> Any:  # the post-build steps start late
        time.sleep(0.8)
        return cap(*args, **kwargs)

    monkeypatch.setattr(st_cross_encoder, "cap_to_positions", late_cap)
    pool = ModelPool()

    def hold(dtype: Any) -> None:
        if dtype != torch.float32:
            time.sleep(2.0)  # a bfloat16 instantiation that takes a while

    try:
        with _dtype_switch_hook(hold):
            other = _bfloat16_build_after(0.2, tiny_ce_path)
            got = pool.score_pairs(spec, PAIRS)  # quantizes while the bfloat16 switch is open
            other.join(60)
    finally:
        pool.clear()
    assert got == want


def test_an_onnx_export_waits_for_a_build_in_another_thread(
    tiny_ce_path: str, tmp_path: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The same review: an uncached ONNX export traced while another thread's bfloat16 build
    held the default dtype got bfloat16 constants, and the load failed (no Where(16) kernel)."""
    pytest.importorskip("onnxruntime")
    import torch

    from rag_rerank_plugins.backends import onnx as onnx_backend

    spec = ModelSpec(
        tiny_ce_path,
        backend="onnx-cross-encoder",
        device="cpu",
        options={"cache_dir": str(tmp_path / "cache")},
    )
    export = onnx_backend.export_graph

    def late_export(*args: Any, **kwargs: Any) -> Any:
        time.sleep(0.8)  # starts while the bfloat16 switch below is open
        return export(*args, **kwargs)

    monkeypatch.setattr(onnx_backend, "export_graph", late_export)

    def hold(dtype: Any) -> None:
        if dtype != torch.float32:
            time.sleep(2.0)

    pool = ModelPool()
    try:
        with _dtype_switch_hook(hold):
            other = _bfloat16_build_after(0.2, tiny_ce_path)
            got = pool.score_pairs(spec, PAIRS)
            other.join(60)
    finally:
        pool.clear()
    reference = ModelSpec(tiny_ce_path, backend="cross-encoder", device="cpu", dtype="float32")
    want = ModelPool().score_pairs(reference, PAIRS)
    assert got == pytest.approx(want, abs=1e-5)


def test_transformers_dtype_switch_is_guarded_after_a_load(pool: ModelPool, ce_spec: Any) -> None:
    """The guard wraps transformers' ``local_torch_dtype``: if a transformers release renames
    it, this fails and the guard needs a new hook."""
    from transformers import modeling_utils

    pool.get(ce_spec)
    assert getattr(modeling_utils.local_torch_dtype, "_rag_rerank_guarded", False)


def test_a_stalled_weight_fetch_does_not_hold_other_loads(
    tiny_ce_path: str, tmp_path: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A review of the first version of the fix above (one lock around each whole model
    constructor): a stalled download of one model's weights (inside ``from_pretrained``) held
    every other load in the process, even after that spec was released. The lock now covers
    only transformers' default-dtype switch around the instantiation."""
    import shutil

    from transformers import modeling_utils

    stalled = tmp_path / "stalled-ce"
    shutil.copytree(tiny_ce_path, stalled)
    fetch = modeling_utils._get_resolved_checkpoint_files
    release = threading.Event()

    def slow_fetch(*args: Any, **kwargs: Any) -> Any:  # a hub download that does not progress
        path = str(kwargs.get("pretrained_model_name_or_path", args[0] if args else ""))
        if "stalled" in path:
            release.wait(30)
        return fetch(*args, **kwargs)

    monkeypatch.setattr(modeling_utils, "_get_resolved_checkpoint_files", slow_fetch)
    pool = ModelPool()
    slow = ModelSpec(str(stalled), backend="cross-encoder", device="cpu", dtype="float32")
    fast = ModelSpec(tiny_ce_path, backend="cross-encoder", device="cpu", dtype="float32")
    thread = threading.Thread(target=pool.get, args=(slow,), daemon=True)
    try:
        thread.start()
        time.sleep(1.0)  # the stalled load is under way
        assert len(pool.score_pairs(fast, [("q", "p")], timeout=20)) == 1
        assert thread.is_alive()  # answered while the other load still waits
    finally:
        release.set()
        thread.join(30)
        pool.clear()


def test_a_transformers_without_the_switch_still_builds_one_at_a_time_and_restores(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """transformers releases the ``st`` extra admits (4.46+) set the default dtype inline, with
    no ``local_torch_dtype``, and left it switched when a load failed: there the whole
    construction holds the lock and the default seen on entry comes back."""
    import torch
    from transformers import modeling_utils

    from rag_rerank_plugins.backends import _torch_common

    monkeypatch.delattr(modeling_utils, "local_torch_dtype")
    seen: list[bool] = []

    def probe() -> None:  # another thread's build could take the lock now?
        free = _torch_common._DTYPE_SWITCH.acquire(blocking=False)
        if free:
            _torch_common._DTYPE_SWITCH.release()
        seen.append(free)

    def failing_build() -> None:
        with _torch_common.building():
            other = threading.Thread(target=probe)
            other.start()
            other.join(10)
            torch.set_default_dtype(torch.bfloat16)  # what such a release does, then fails
            raise OSError("weights missing")

    try:
        assert not _torch_common.guard_dtype_switch()
        with pytest.raises(OSError, match="weights missing"):
            failing_build()
        assert seen == [False]
        assert torch.get_default_dtype() == torch.float32
    finally:
        torch.set_default_dtype(torch.float32)


def test_a_switch_waiting_on_a_thread_of_the_build_goes_ahead_with_a_warning(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """A model whose ``__init__`` waits on a thread that builds another model deadlocked on
    the guard (the review of its first version): that switch now waits at most
    ``SWITCH_WAIT_S``, then goes ahead with a warning."""
    import torch
    from transformers import modeling_utils

    from rag_rerank_plugins.backends import _torch_common

    assert _torch_common.guard_dtype_switch()
    monkeypatch.setattr(_torch_common, "SWITCH_WAIT_S", 0.5)

    def inner_build() -> None:
        with modeling_utils.local_torch_dtype(torch.float32):
            pass

    try:
        with modeling_utils.local_torch_dtype(torch.bfloat16):  # the outer model's __init__
            helper = threading.Thread(target=inner_build)
            helper.start()
            helper.join(10)
            assert not helper.is_alive()
        assert "goes ahead" in caplog.text
    finally:
        torch.set_default_dtype(torch.float32)


def test_a_build_that_fails_inside_the_switch_frees_it_for_other_threads() -> None:
    import torch
    from transformers import modeling_utils

    from rag_rerank_plugins.backends import _torch_common

    assert _torch_common.guard_dtype_switch()
    with (
        pytest.raises(RuntimeError, match="instantiation failed"),
        modeling_utils.local_torch_dtype(torch.bfloat16),
    ):
        raise RuntimeError("instantiation failed")
    assert torch.get_default_dtype() == torch.float32
    freed: list[bool] = []

    def take() -> None:
        got = _torch_common._DTYPE_SWITCH.acquire(timeout=5)
        if got:
            _torch_common._DTYPE_SWITCH.release()
        freed.append(got)

    other = threading.Thread(target=take)
    other.start()
    other.join(10)
    assert freed == [True]
