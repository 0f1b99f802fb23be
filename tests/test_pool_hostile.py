"""The pool's memory management and accounting under hostile use.

Each bug test names what a user does and what went wrong before:

* ``stats()["loaded"]`` said False for a loaded model after a ``release()`` that raced a reload;
* ``preload(a, b)`` under a budget that fits one model raised ``ModelReleasedError`` (a's
  warm-up ran after b's load had evicted it);
* ``memory_budget_mb=float("inf")`` crashed every load with ``OverflowError``;
* a budget key no device has (``"gpu"``) was silently ignored, and ``"CUDA:0"`` too;
* in a forked child ``memory()`` said ``peak_mb`` 0 with models in memory;
* a failed load left its empty slot behind for ever; ``spec_stats()`` of a spec never loaded
  recorded it (it then showed in ``stats()`` and in Prometheus);
* ``rag_rerank_model_footprint_bytes`` came from the MB figure rounded to 1 kB (0 for small
  models);
* every restart of the idle reaper (``clear()``, then a load) added a finalizer that stayed;
* a child forked while a parent thread was evicting a model spun for ever on its first call;
* an exported ``PYTORCH_MPS_LOW_WATERMARK_RATIO`` above the pool's high watermark was kept
  (torch refuses to start its MPS allocator then).

A GPU load measured by the CUDA allocator's growth also counted the activations of a call
running meanwhile on another model of that GPU (shown with a simulated device).

The others pin documented behaviour: the ``cuda`` key on a simulated GPU, memory really freed
on eviction, no deadlock with many threads, releases, the reaper and stats readers at once.
"""

from __future__ import annotations

import gc
import json
import multiprocessing
import os
import random
import subprocess
import sys
import threading
import time
import weakref
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest

from rag_rerank_plugins import ConfigurationError, ModelLoadError, ModelPool, ModelSpec
from rag_rerank_plugins import _mps as mps_module
from rag_rerank_plugins.backends import register_backend
from rag_rerank_plugins.engine_config import PoolConfig
from rag_rerank_plugins.testing import (
    FakeReranker,
    SimulatedDevice,
    SimulatedReranker,
    fake_reranker_spec,
)

MB = 100
PAIRS = [("alpha beta", "alpha"), ("gamma", "delta")]
EXPECTED = FakeReranker().score_pairs(PAIRS, 32)


class _Gate:
    """A loader that blocks its first load until released (a slow load, on demand)."""

    def __init__(self) -> None:
        self.entered = threading.Event()
        self.release = threading.Event()
        self.loads = 0

    def load(self, spec: ModelSpec, _provider: object) -> FakeReranker:
        self.loads += 1
        if self.loads == 1:
            self.entered.set()
            assert self.release.wait(10)
        return FakeReranker(footprint_mb=MB)


class _Scheduled(FakeReranker):
    thread_safe = False  # through the scheduler's worker, like a torch model


def _flaky(spec: ModelSpec, _provider: object) -> FakeReranker:
    if spec.option("fail"):
        raise RuntimeError("weights file truncated")
    return _Scheduled(delay_ms=1, footprint_mb=spec.option("footprint_mb"))


register_backend("hostile-flaky", _flaky, "reranker", uses_torch=False, replace=True)

SIM = SimulatedDevice(10 * 2**30)


class _SimulatedGpuModel(SimulatedReranker):
    """Weights that stay allocated on a simulated GPU while the model object lives."""

    def __init__(self, weights_mb: int) -> None:
        super().__init__(SIM)
        self.weights = SIM.alloc(weights_mb * 2**20)

    def footprint_bytes(self) -> int:
        return self.weights.nbytes


register_backend(
    "hostile-sim-gpu",
    lambda spec, _p: _SimulatedGpuModel(int(spec.option("weights_mb", MB))),
    "reranker",
    uses_torch=False,
    replace=True,
)


@pytest.fixture
def make_pool() -> Iterator[Callable[..., ModelPool]]:
    pools: list[ModelPool] = []

    def make(**kwargs: Any) -> ModelPool:
        pool = ModelPool(**kwargs)
        pools.append(pool)
        return pool

    yield make
    for pool in pools:
        pool.clear()


# -- stats ---------------------------------------------------------------------------------------


def test_loaded_in_stats_matches_is_loaded_after_a_release_raced_a_reload(
    make_pool: Callable[..., ModelPool],
) -> None:
    gate = _Gate()
    register_backend("hostile-gated", gate.load, "reranker", uses_torch=False, replace=True)
    pool = make_pool()
    spec = ModelSpec("gated", backend="hostile-gated", device="cpu")
    loading = threading.Thread(target=pool.get, args=(spec,))
    loading.start()
    assert gate.entered.wait(10)
    releasing = threading.Thread(target=pool.release, args=(spec,))
    releasing.start()  # takes the slot away, waits for the slow load, then frees it
    deadline = time.monotonic() + 10
    while pool.key(spec) in pool._slots and time.monotonic() < deadline:
        time.sleep(0.005)
    pool.get(spec)  # meanwhile a caller loads a fresh copy, which stays
    gate.release.set()
    loading.join(10)
    releasing.join(10)
    assert pool.is_loaded(spec)
    stats = pool.spec_stats(spec)
    assert (stats["loads"], stats["releases"]) == (2, 1)
    assert stats["loaded"] is True
    assert pool.stats()[stats["spec"]]["loaded"] is True


def test_spec_stats_of_a_spec_never_loaded_records_nothing(
    make_pool: Callable[..., ModelPool],
) -> None:
    pool = make_pool()
    stats = pool.spec_stats(fake_reranker_spec("never-loaded"))
    assert (stats["loads"], stats["calls"], stats["loaded"]) == (0, 0, False)
    assert pool.stats() == {}  # a read is not a model in Prometheus' scrape


def test_prometheus_footprint_is_exact_bytes_and_labels_are_escaped(
    make_pool: Callable[..., ModelPool],
) -> None:
    prometheus_client = pytest.importorskip("prometheus_client")
    from prometheus_client.parser import text_string_to_metric_families

    from rag_rerank_plugins.metrics import PoolCollector

    pool = make_pool()
    hostile = 'models/we"ird\\name\nnext line'
    spec = ModelSpec(
        hostile, backend="fake-reranker", device="cpu", options=(("footprint_mb", 1e-4),)
    )
    pool.score_pairs(spec, PAIRS)
    registry = prometheus_client.CollectorRegistry()
    registry.register(PoolCollector(pool))
    text = prometheus_client.generate_latest(registry).decode()
    families = {f.name: f for f in text_string_to_metric_families(text)}
    [sample] = families["rag_rerank_model_footprint_bytes"].samples
    assert sample.value == int(1e-4 * 2**20) == pool.spec_stats(spec)["footprint_bytes"]
    assert sample.labels["model"] == hostile  # the exposition escapes and parses back
    assert sample.labels["spec"] == pool.key(spec).label
    [calls] = families["rag_rerank_model_calls"].samples
    assert (calls.name, calls.value) == ("rag_rerank_model_calls_total", 1.0)


# -- configuration of the budget -----------------------------------------------------------------


@pytest.mark.parametrize("budget", [float("inf"), {"cpu": float("inf")}])
def test_an_infinite_budget_means_no_limit(
    make_pool: Callable[..., ModelPool], budget: object
) -> None:
    pool = make_pool(memory_budget_mb=budget)
    assert pool.score_pairs(fake_reranker_spec("inf", footprint_mb=MB), PAIRS) == EXPECTED
    assert pool.memory()["cpu"]["budget_mb"] is None


def test_budget_device_keys_are_normalised_or_refused() -> None:
    config = PoolConfig(memory_budget_mb={" CUDA:1 ": 300, "cpu:0": 200, "cuda": 100})
    assert config.memory_budget_mb == {"cuda:1": 300, "cpu": 200, "cuda": 100}
    assert config.budget_bytes("cuda:1") == 300 * 2**20
    assert config.budget_bytes("cuda:0") == 100 * 2**20  # the 'cuda' key: every other GPU
    assert config.budget_bytes("cpu") == 200 * 2**20
    for bad in ({"gpu": 1}, {"cuda0": 1}, {"auto": 1}, {"cuda:0": 1, "CUDA:0": 2}):
        with pytest.raises(ConfigurationError, match="memory_budget_mb"):
            PoolConfig(memory_budget_mb=bad)
    with pytest.raises(ConfigurationError, match="'cuda:N'"):
        ModelPool(memory_budget_mb={"gpu": 4000})
    with pytest.raises(ConfigurationError, match="RAG_RERANK_POOL_MEMORY_BUDGET_MB"):
        PoolConfig.from_env({"RAG_RERANK_POOL_MEMORY_BUDGET_MB": "GPU:0=6000"})


def test_the_cuda_key_budgets_a_simulated_gpu_and_eviction_frees_its_memory(
    make_pool: Callable[..., ModelPool],
) -> None:
    pool = make_pool(memory_budget_mb={"cuda": 1.5 * MB, "cpu": 10 * MB})
    start = SIM.allocated_bytes
    a, b = (ModelSpec(f"sim-{n}", backend="hostile-sim-gpu", device="cpu") for n in "ab")
    cpu = fake_reranker_spec("sim-cpu", footprint_mb=MB)
    pool.score_pairs(cpu, PAIRS)
    assert pool.score_pairs(a, PAIRS) == EXPECTED
    assert SIM.allocated_bytes - start == MB * 2**20
    assert pool.score_pairs(b, PAIRS) == EXPECTED  # over the 'cuda' budget: a goes
    assert not pool.is_loaded(a)
    assert pool.is_loaded(cpu)  # another device's model stays
    gc.collect()
    assert SIM.allocated_bytes - start == MB * 2**20  # a's weights really left the device
    assert set(pool.memory()) == {"cpu", "cuda:sim"}
    pool.clear()
    gc.collect()
    assert SIM.allocated_bytes == start


class _GpuCaller(FakeReranker):
    """A model on a simulated ``cuda:0`` whose call holds activations until told to finish."""

    thread_safe = True
    device = "cuda:0"

    def __init__(self, device: SimulatedDevice) -> None:
        super().__init__()
        self.sim = device
        self.allocated = threading.Event()
        self.release_call = threading.Event()

    def score_pairs(self, pairs, batch_size):  # type: ignore[no-untyped-def]
        activations = self.sim.alloc(50 * 2**20)
        self.allocated.set()
        assert self.release_call.wait(10)
        del activations
        return super().score_pairs(pairs, batch_size)


class _GpuWeights(FakeReranker):
    """Weights on a simulated ``cuda:0``: 100 MB in the allocator, 90 MB by the backend's count
    (what parameters miss), so the test can tell which number the pool took."""

    thread_safe = True
    device = "cuda:0"

    def __init__(self, device: SimulatedDevice) -> None:
        super().__init__()
        self.weights = device.alloc(100 * 2**20)

    def footprint_bytes(self) -> int:
        return 90 * 2**20


def test_a_gpu_load_does_not_count_a_running_calls_activations(
    make_pool: Callable[..., ModelPool], monkeypatch: pytest.MonkeyPatch
) -> None:
    from types import SimpleNamespace

    from rag_rerank_plugins.pool import core, loading

    sim = SimulatedDevice(10 * 2**30)
    # The CUDA allocator is the simulated device; cuda:0 specs resolve as given (no real GPU).
    monkeypatch.setattr(
        loading, "_cuda_allocated", lambda d: sim.allocated_bytes if d.startswith("cuda") else None
    )
    monkeypatch.setattr(
        core, "resolve_spec", lambda spec, **_: (spec, SimpleNamespace(reason="test"))
    )
    caller = _GpuCaller(sim)
    loader_started, gate = threading.Event(), threading.Event()

    def load_weights(spec: ModelSpec, _provider: object) -> _GpuWeights:
        if spec.option("wait"):
            loader_started.set()
            assert gate.wait(10)
        return _GpuWeights(sim)

    register_backend(
        "hostile-gpu-caller", lambda s, p: caller, "reranker", uses_torch=False, replace=True
    )
    register_backend(
        "hostile-gpu-weights", load_weights, "reranker", uses_torch=False, replace=True
    )
    pool = make_pool()
    busy = ModelSpec("busy", backend="hostile-gpu-caller", device="cuda:0")
    alone = ModelSpec("alone", backend="hostile-gpu-weights", device="cuda:0")
    racing = ModelSpec(
        "racing", backend="hostile-gpu-weights", device="cuda:0", options=(("wait", True),)
    )
    pool.get(busy)
    pool.get(alone)
    assert pool.spec_stats(alone)["footprint_mb"] == 100  # alone: the allocator's growth
    with ThreadPoolExecutor(2) as ex:
        loading_racing = ex.submit(pool.get, racing)
        assert loader_started.wait(10)
        call = ex.submit(pool.score_pairs, busy, PAIRS)  # its activations arrive mid-load
        assert caller.allocated.wait(10)
        gate.set()
        loading_racing.result(timeout=10)
        caller.release_call.set()
        assert call.result(timeout=10) == EXPECTED
    # Not 150 MB (weights + the other model's activations): the backend's own count.
    assert pool.spec_stats(racing)["footprint_mb"] == 90


# -- preload, failed loads ------------------------------------------------------------------------


def test_preload_more_models_than_the_budget_fits(make_pool: Callable[..., ModelPool]) -> None:
    pool = make_pool(memory_budget_mb=1.5 * MB)
    a, b = (fake_reranker_spec(f"pre-{n}", footprint_mb=MB) for n in "ab")
    handles = pool.preload(a, b)
    assert [h.spec for h in handles] == [pool.key(a), pool.key(b)]
    assert pool.loaded_specs() == [pool.key(b)]
    assert pool.spec_stats(a)["warmups"] == pool.spec_stats(b)["warmups"] == 1  # each warmed up
    assert pool.spec_stats(a)["errors"] == 0
    assert pool.score_pairs(a, PAIRS) == EXPECTED


def test_a_failed_load_leaves_no_slot_and_the_next_call_retries(
    make_pool: Callable[..., ModelPool],
) -> None:
    pool = make_pool(memory_budget_mb=3 * MB)
    resident = ModelSpec(
        "ok", backend="hostile-flaky", device="cpu", options=(("footprint_mb", MB),)
    )
    pool.score_pairs(resident, PAIRS)
    for n in range(5):  # a hostile caller asking for broken models
        broken = ModelSpec(
            f"broken-{n}", backend="hostile-flaky", device="cpu", options=(("fail", True),)
        )
        with pytest.raises(ModelLoadError, match="weights file truncated"):
            pool.score_pairs(broken, PAIRS)
    assert list(pool._slots) == [pool.key(resident)]
    assert pool.loaded_specs() == [pool.key(resident)]
    assert pool.memory()["cpu"]["used_mb"] == MB
    assert sum(s["load_failures"] for s in pool.stats().values()) == 5
    assert pool.score_pairs(resident, PAIRS) == EXPECTED


class _Weights:
    """Stands for a model's weights: in a reference cycle, as torch modules are."""

    def __init__(self) -> None:
        self.me = self


@pytest.mark.parametrize("error", [ConfigurationError("score_label 3 is no label"), OSError("bad")])
def test_a_load_failing_after_its_weights_were_built_frees_them(error: Exception) -> None:
    """The loader's finished frames (kept by the exception's traceback) and torch's reference
    cycles kept a failed load's weights until a full collection: a passthrough adapter retrying
    per request stacked a copy per request. Automatic collection is off here, so only the
    pool's own clean-up can free them; the caller even keeps the exception."""
    built: list[weakref.ref[_Weights]] = []

    def load(spec: ModelSpec, _provider: object) -> FakeReranker:
        weights = _Weights()
        built.append(weakref.ref(weights))
        raise error  # a head check after the weights are in memory

    register_backend("hostile-fails-late", load, "reranker", uses_torch=False, replace=True)
    pool = ModelPool()
    spec = ModelSpec("m", backend="hostile-fails-late", device="cpu")
    kept: list[BaseException] = []
    gc.disable()
    try:
        for _ in range(3):
            with pytest.raises((ConfigurationError, ModelLoadError)) as info:
                pool.score_pairs(spec, PAIRS)
            kept.append(info.value)
            assert [ref() for ref in built] == [None] * len(built)
    finally:
        gc.enable()
        pool.clear()
    assert "Traceback" not in str(kept[-1])  # the error itself is intact
    assert kept[-1].__traceback__ is not None


# -- fork, reaper ---------------------------------------------------------------------------------


def _child_memory(queue: Any, pool: ModelPool) -> None:  # runs in the forked child
    queue.put(pool.memory()["cpu"])


@pytest.mark.skipif(sys.platform == "win32", reason="fork is POSIX-only")
def test_peak_is_never_below_use_in_a_forked_child(make_pool: Callable[..., ModelPool]) -> None:
    pool = make_pool(memory_budget_mb=5 * MB)
    pool.preload(fake_reranker_spec("fork-peak", footprint_mb=MB))
    ctx = multiprocessing.get_context("fork")
    queue = ctx.Queue()
    child = ctx.Process(target=_child_memory, args=(queue, pool))
    child.start()
    memory = queue.get(timeout=30)
    child.join(30)
    assert child.exitcode == 0
    assert memory["used_mb"] == MB
    assert memory["peak_mb"] >= memory["used_mb"]


def _child_scores(queue: Any, pool: ModelPool, spec: ModelSpec) -> None:  # in the child
    queue.put(pool.score_pairs(spec, PAIRS))


@pytest.mark.skipif(sys.platform == "win32", reason="fork is POSIX-only")
def test_a_fork_in_the_middle_of_an_eviction_leaves_a_usable_pool(
    make_pool: Callable[..., ModelPool],
) -> None:
    pool = make_pool(idle_unload_s=600)
    spec = fake_reranker_spec("fork-mid-eviction")
    handle = pool.get(spec)
    ctx = multiprocessing.get_context("fork")
    queue = ctx.Queue()
    with pool._lock:  # the reaper's eviction: handle retired, slot not yet removed
        assert handle._try_retire()
        child = ctx.Process(target=_child_scores, args=(queue, pool, spec))
        child.start()
    try:
        assert queue.get(timeout=20) == EXPECTED  # the child used to spin for ever
    finally:
        child.kill()
        child.join(10)


def _finalizers_of(obj: object) -> int:
    registry = weakref.finalize._registry  # type: ignore[attr-defined]
    return sum(1 for f in list(registry) if f.peek() is not None and f.peek()[0] is obj)


def test_restarting_the_reaper_does_not_pile_up_finalizers(
    make_pool: Callable[..., ModelPool],
) -> None:
    pool = make_pool(idle_unload_s=60)
    spec = fake_reranker_spec("reaper-cycles")
    for _ in range(10):
        pool.get(spec)
        pool.clear()
    pool.get(spec)
    thread = pool._reaper_thread
    assert thread is not None
    assert thread.is_alive()
    assert _finalizers_of(pool) == 1
    pool.clear()
    assert not thread.is_alive()


# -- many threads at once -------------------------------------------------------------------------


def test_many_threads_releases_reaper_and_stats_readers_at_once(
    make_pool: Callable[..., ModelPool],
) -> None:
    pool = make_pool(memory_budget_mb=2.5 * MB, idle_unload_s=0.02)
    specs = [
        ModelSpec(
            f"hammer-{n}", backend="hostile-flaky", device="cpu", options=(("footprint_mb", MB),)
        )
        for n in range(6)
    ]
    stop = threading.Event()
    problems: list[str] = []

    def call(seed: int) -> int:
        rng, done = random.Random(seed), 0
        while not stop.is_set():
            result = pool.score_pairs(rng.choice(specs), PAIRS)
            if result != EXPECTED:
                problems.append(f"wrong scores {result}")
            done += 1
        return done

    def meddle() -> None:
        rng = random.Random(0)
        while not stop.is_set():
            pool.release(rng.choice(specs))
            pool.reset_stats()
            for stats in pool.stats().values():
                for name in ("loads", "calls", "items", "errors", "releases", "evictions"):
                    if stats[name] < 0:
                        problems.append(f"{name} < 0")
            pool.memory()
            time.sleep(0.002)

    with ThreadPoolExecutor(13) as ex:
        callers = [ex.submit(call, seed) for seed in range(12)]
        meddler = ex.submit(meddle)
        time.sleep(2)
        stop.set()
        done = [f.result(timeout=30) for f in callers]  # a deadlock would time out here
        meddler.result(timeout=30)
    assert problems == []
    assert min(done) > 0
    for slot in list(pool._slots.values()):
        assert slot.handle is None or slot.handle._in_flight == 0  # no pin left behind
    pool._stop_reaper()  # its eviction in progress ends; no other starts
    for key in list(pool._stats):
        stats = pool.spec_stats(key)
        assert stats["loaded"] == pool.is_loaded(key)
        # Every load ends in exactly one release (evictions included), but the one still in.
        assert stats["loads"] - stats["releases"] == int(stats["loaded"])
    pool.clear()
    assert all(s["loads"] == s["releases"] for s in pool.stats().values())


def test_calls_arriving_at_every_pass_of_the_reaper_never_fail(
    make_pool: Callable[..., ModelPool],
) -> None:
    pool = make_pool(idle_unload_s=0.005)  # a pass every 10 ms
    spec = ModelSpec(
        "reaped", backend="hostile-flaky", device="cpu", options=(("footprint_mb", MB),)
    )

    def call(seed: int) -> int:
        rng = random.Random(seed)
        for _ in range(40):
            assert pool.score_pairs(spec, PAIRS) == EXPECTED
            time.sleep(rng.choice((0.0, 0.004, 0.006, 0.03)))  # around the idle limit
        return 40

    with ThreadPoolExecutor(4) as ex:
        assert sum(ex.map(call, range(4))) == 160
    deadline = time.monotonic() + 10
    while pool.is_loaded(spec) and time.monotonic() < deadline:
        time.sleep(0.005)  # the reaper's last pass
    pool._stop_reaper()  # its eviction in progress ends; no other starts
    stats = pool.spec_stats(spec)
    warm_ups = stats["loads"] - 1  # each reload after an idle eviction warms up first
    assert (stats["calls"], stats["errors"], stats["warmups"]) == (160, 0, warm_ups)
    assert stats["evictions"] > 0
    assert stats["loads"] - stats["releases"] == int(pool.is_loaded(spec))


# -- MPS allocator -------------------------------------------------------------------------------


def test_an_exported_low_watermark_above_the_pools_ratio_is_lowered() -> None:
    high, low = mps_module.HIGH_ENV, mps_module.LOW_ENV
    code = f"""
import json, logging, os, sys
logging.basicConfig(level=logging.WARNING, format="%(message)s")
from rag_rerank_plugins import ModelPool
ModelPool(mps_high_watermark_ratio=0.5)
print(json.dumps({{"torch": "torch" in sys.modules, "high": os.environ["{high}"],
                  "low": os.environ["{low}"]}}))
"""
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAG_RERANK_POOL_")}
    out = subprocess.run(
        [sys.executable, "-c", code],
        env={**env, low: "1.4"},
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout.strip().splitlines()[-1]) == {
        "torch": False,
        "high": "0.5",
        "low": "0.5",
    }
    assert f"{low}=1.4 in the environment is above" in out.stderr
