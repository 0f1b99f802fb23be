"""A pool on a shared machine: per-device memory budget, LRU eviction, idle unload, warm-up on
reload, fork. Fake backends simulate sizes with ``footprint_mb``; one test uses a real model."""

from __future__ import annotations

import asyncio
import logging
import multiprocessing
import random
import sys
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor

import pytest

from rag_rerank_plugins import ConfigurationError, ModelPool, ModelSpec, PoolConfig
from rag_rerank_plugins.backends import register_backend
from rag_rerank_plugins.testing import FakeReranker, fake_embedder_spec, fake_reranker_spec

MB = 100  # every fake model "takes" 100 MB
PAIRS = [("alpha beta", "alpha"), ("beta gamma", "gamma beta"), ("delta", "epsilon")]


class _ScheduledFake(FakeReranker):
    """Goes through the scheduler's worker thread, like a torch model."""

    thread_safe = False


def _scheduled_loader(spec: ModelSpec, _provider: object) -> FakeReranker:
    return _ScheduledFake(
        delay_ms=float(spec.option("delay_ms", 0.0)), footprint_mb=spec.option("footprint_mb")
    )


def _gpu_like_loader(spec: ModelSpec, _provider: object) -> FakeReranker:
    model = FakeReranker(footprint_mb=spec.option("footprint_mb"))
    model.device = "cuda:0"  # pretend: accounted on the cuda:0 budget
    return model


SEEN: dict[str, list[list[tuple[str, str]]]] = {}


class _RecordingFake(FakeReranker):
    def __init__(self, name: str) -> None:
        super().__init__(footprint_mb=MB)
        self.calls: list[list[tuple[str, str]]] = []
        SEEN.setdefault(name, []).append(self.calls)

    def score_pairs(self, pairs, batch_size):  # type: ignore[no-untyped-def]
        self.calls.append(list(pairs))
        return super().score_pairs(pairs, batch_size)


register_backend("test-mem-scheduled", _scheduled_loader, "reranker", replace=True)
register_backend("test-mem-gpu", _gpu_like_loader, "reranker", replace=True)
register_backend(
    "test-mem-recording", lambda spec, _p: _RecordingFake(spec.model), "reranker", replace=True
)


@pytest.fixture
def make_pool() -> Iterator[Callable[..., ModelPool]]:
    pools: list[ModelPool] = []

    def make(**kwargs: object) -> ModelPool:
        pool = ModelPool(**kwargs)  # type: ignore[arg-type]
        pools.append(pool)
        return pool

    yield make
    for pool in pools:
        pool.clear()


def _expected(pairs: list[tuple[str, str]]) -> list[float]:
    return FakeReranker().score_pairs(pairs, 32)


def _wait_for(predicate: Callable[[], bool], timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.01)
    return predicate()


def _used_mb(pool: ModelPool, device: str = "cpu") -> float:
    return pool.memory().get(device, {}).get("used_mb", 0.0)


# -- configuration ------------------------------------------------------------------------------


def test_pool_config_from_env_and_arguments_win(monkeypatch: pytest.MonkeyPatch) -> None:
    config = PoolConfig.from_env(
        {
            "RAG_RERANK_POOL_MEMORY_BUDGET_MB": "cpu=2000, cuda:0=6000",
            "RAG_RERANK_POOL_IDLE_UNLOAD_S": "30",
            "RAG_RERANK_POOL_OVER_BUDGET": "raise",
        }
    )
    assert config.memory_budget_mb == {"cpu": 2000.0, "cuda:0": 6000.0}
    assert config.idle_unload_s == 30.0
    assert config.over_budget == "raise"
    assert config.budget_bytes("cuda:0") == 6000 * 2**20
    assert config.budget_bytes("cuda:1") is None
    assert PoolConfig(memory_budget_mb={"cuda": 10}).budget_bytes("cuda:3") == 10 * 2**20
    assert PoolConfig.from_env({"RAG_RERANK_POOL_MEMORY_BUDGET_MB": "6000"}).budget_bytes(
        "cpu"
    ) == (6000 * 2**20)
    with pytest.raises(ConfigurationError, match="RAG_RERANK_POOL_MEMORY_BUDGET_MB"):
        PoolConfig.from_env({"RAG_RERANK_POOL_MEMORY_BUDGET_MB": "lots"})
    with pytest.raises(ConfigurationError, match="over_budget"):
        PoolConfig(over_budget="ignore")  # type: ignore[arg-type]
    with pytest.raises(ConfigurationError, match="idle_unload_s"):
        PoolConfig(idle_unload_s=0)
    with pytest.raises(ConfigurationError, match="positive"):
        PoolConfig(memory_budget_mb={"cpu": -1})

    monkeypatch.setenv("RAG_RERANK_POOL_MEMORY_BUDGET_MB", "123")
    monkeypatch.setenv("RAG_RERANK_POOL_IDLE_UNLOAD_S", "60")
    pool = ModelPool(idle_unload_s=None)
    assert pool.pool_config.memory_budget_mb == 123
    assert pool.pool_config.idle_unload_s is None  # the argument wins, None included
    from rag_rerank_plugins.settings import Settings

    assert Settings().pool == PoolConfig.from_env()


# -- budget and LRU eviction --------------------------------------------------------------------


def test_third_model_evicts_the_least_recently_used_and_every_call_succeeds(
    make_pool: Callable[..., ModelPool],
) -> None:
    pool = make_pool(memory_budget_mb=2.5 * MB)
    a, b, c = (fake_reranker_spec(f"lru-{n}", footprint_mb=MB) for n in "abc")
    for spec in (a, b, a):  # b is now the least recently used
        assert pool.score_pairs(spec, PAIRS) == _expected(PAIRS)
    assert pool.memory()["cpu"]["peak_mb"] == 2 * MB
    assert pool.score_pairs(c, PAIRS) == _expected(PAIRS)
    assert set(pool.loaded_specs()) == {pool.key(a), pool.key(c)}
    stats_b = pool.spec_stats(b)
    assert (stats_b["evictions"], stats_b["last_eviction_reason"]) == (1, "budget")
    assert stats_b["footprint_mb"] == MB
    # c's size was unknown before its first load: evicted right after it (the one transient).
    assert pool.memory()["cpu"]["peak_mb"] == 3 * MB

    rng = random.Random(7)
    for _ in range(60):
        spec = rng.choice((a, b, c))
        pairs = [(f"q{rng.randrange(5)} alpha", f"alpha q{rng.randrange(5)}")]
        assert pool.score_pairs(spec, pairs) == _expected(pairs)
        assert _used_mb(pool) <= 2.5 * MB  # sizes now known: room is made before each load
    memory = pool.memory()["cpu"]
    assert memory["peak_mb"] <= 2.5 * MB + MB  # budget + one model's transient
    assert memory["evictions"] >= 2
    total = pool.stats()
    # Every eviction but those of the models not loaded now was followed by a reload.
    not_loaded = 3 - len(pool.loaded_specs())
    assert sum(s["reloads"] for s in total.values()) == memory["evictions"] - not_loaded
    assert all(s["errors"] == 0 for s in total.values())


def test_per_device_budgets_are_separate(make_pool: Callable[..., ModelPool]) -> None:
    pool = make_pool(memory_budget_mb={"cpu": 1.5 * MB, "cuda:0": 1.5 * MB})
    cpu_a, cpu_b = (fake_reranker_spec(f"dev-{n}", footprint_mb=MB) for n in "ab")
    gpu = ModelSpec(
        "dev-gpu", backend="test-mem-gpu", device="cpu", options=(("footprint_mb", MB),)
    )
    pool.score_pairs(cpu_a, PAIRS)
    pool.score_pairs(gpu, PAIRS)
    assert pool.is_loaded(cpu_a)
    assert pool.is_loaded(gpu)
    pool.score_pairs(cpu_b, PAIRS)
    assert not pool.is_loaded(cpu_a)  # the CPU budget evicted a CPU model...
    assert pool.is_loaded(gpu)  # ...never the GPU one
    memory = pool.memory()
    assert memory["cpu"]["used_mb"] == memory["cuda:0"]["used_mb"] == MB
    assert memory["cuda:0"]["evictions"] == 0

    one_number = make_pool(memory_budget_mb=1.5 * MB)  # applies to each device separately
    one_number.score_pairs(cpu_a, PAIRS)
    one_number.score_pairs(gpu, PAIRS)
    assert one_number.is_loaded(cpu_a)
    assert one_number.is_loaded(gpu)


def test_a_model_bigger_than_the_budget_warns_or_raises(
    make_pool: Callable[..., ModelPool], caplog: pytest.LogCaptureFixture
) -> None:
    big = fake_reranker_spec("too-big", footprint_mb=3 * MB)
    strict = make_pool(memory_budget_mb=MB, over_budget="raise")
    with pytest.raises(ConfigurationError, match="more than the pool's whole memory budget"):
        strict.score_pairs(big, PAIRS)
    assert not strict.is_loaded(big)
    with pytest.raises(ConfigurationError, match="over_budget='warn'"):
        strict.get(big)  # the size is known now: refused before loading
    assert strict.spec_stats(big)["loads"] == 1

    lenient = make_pool(memory_budget_mb=MB)
    small = fake_reranker_spec("small", footprint_mb=MB / 2)
    lenient.score_pairs(small, PAIRS)
    with caplog.at_level(logging.WARNING, logger="rag_rerank_plugins.pool"):
        assert lenient.score_pairs(big, PAIRS) == _expected(PAIRS)
    assert "Loading it anyway" in caplog.text
    assert lenient.is_loaded(big)
    assert not lenient.is_loaded(small)
    for _ in range(3):  # it stays: evicting the only model would only reload it
        assert lenient.score_pairs(big, PAIRS) == _expected(PAIRS)
    assert lenient.spec_stats(big)["loads"] == 1


def test_never_evicted_under_a_running_forward(make_pool: Callable[..., ModelPool]) -> None:
    pool = make_pool(memory_budget_mb=1.5 * MB)
    slow = ModelSpec(
        "slow",
        backend="test-mem-scheduled",
        device="cpu",
        options=(("delay_ms", 400), ("footprint_mb", MB)),
    )
    other = fake_reranker_spec("other", footprint_mb=MB)
    with ThreadPoolExecutor(1) as ex:
        running = ex.submit(pool.score_pairs, slow, PAIRS)
        assert _wait_for(lambda: _busy(pool, slow))  # its forward is running
        assert pool.score_pairs(other, PAIRS) == _expected(PAIRS)  # needs slow's room
        assert pool.is_loaded(slow)  # busy: not evicted, the pool is over budget for now
        assert pool.spec_stats(slow)["evictions"] == 0
        assert running.result(timeout=10) == _expected(PAIRS)
    assert pool.spec_stats(slow)["errors"] == 0
    assert pool.spec_stats(slow)["forward_passes"] == 1
    # Back under budget once the forward ended (the idle least-recently-used model went).
    assert _wait_for(lambda: _used_mb(pool) <= 1.5 * MB)
    assert pool.score_pairs(slow, PAIRS) == _expected(PAIRS)


def _busy(pool: ModelPool, spec: ModelSpec) -> bool:
    slot = pool._slots.get(pool.key(spec))
    return slot is not None and slot.handle is not None and slot.handle._in_flight > 0


def test_64_threads_three_models_two_model_budget(make_pool: Callable[..., ModelPool]) -> None:
    specs = [
        fake_reranker_spec("hammer-a", footprint_mb=MB, delay_ms=1),
        ModelSpec(
            "hammer-b",
            backend="test-mem-scheduled",
            device="cpu",
            options=(("delay_ms", 1), ("footprint_mb", MB)),
        ),
        fake_embedder_spec("hammer-c", footprint_mb=MB, delay_ms=1),
    ]
    rng = random.Random(3)
    jobs = []
    for i in range(64 * 8):
        which = rng.randrange(3)
        text = f"w{rng.randrange(20)} w{rng.randrange(20)} common"
        jobs.append((which, text, f"common w{i % 20}"))

    def run(pool: ModelPool, job: tuple[int, str, str]) -> object:
        which, query, passage = job
        if which == 2:
            return pool.embed(specs[2], [query, passage])
        return pool.score_pairs(specs[which], [(query, passage)])

    reference = make_pool()
    sequential = [run(reference, job) for job in jobs]
    pool = make_pool(memory_budget_mb=2 * MB)
    with ThreadPoolExecutor(64) as ex:
        results = list(ex.map(lambda job: run(pool, job), jobs))
    assert results == sequential
    stats = pool.stats()
    assert sum(s["errors"] for s in stats.values()) == 0
    memory = pool.memory()["cpu"]
    assert memory["evictions"] > 0
    assert memory["peak_mb"] <= 3 * MB  # budget + one model's transient
    assert _wait_for(lambda: _used_mb(pool) <= 2 * MB)


def test_async_calls_under_a_budget(make_pool: Callable[..., ModelPool]) -> None:
    pool = make_pool(memory_budget_mb=1.5 * MB)
    specs = [fake_reranker_spec(f"async-{n}", footprint_mb=MB, delay_ms=1) for n in range(3)]

    async def main() -> list[list[float]]:
        return await asyncio.gather(*(pool.ascore_pairs(specs[i % 3], PAIRS) for i in range(60)))

    assert asyncio.run(main()) == [_expected(PAIRS)] * 60
    assert pool.memory()["cpu"]["evictions"] > 0


# -- idle unload, warm-up on reload ---------------------------------------------------------------


def test_idle_unload_releases_after_the_configured_time(
    make_pool: Callable[..., ModelPool],
) -> None:
    pool = make_pool(idle_unload_s=0.2)
    spec = fake_reranker_spec("idle", footprint_mb=MB)
    started = time.monotonic()
    assert pool.score_pairs(spec, PAIRS) == _expected(PAIRS)
    assert _wait_for(lambda: not pool.is_loaded(spec), timeout=5)
    assert time.monotonic() - started >= 0.2
    stats = pool.spec_stats(spec)
    assert (stats["evictions"], stats["last_eviction_reason"]) == (1, "idle")
    assert pool.score_pairs(spec, PAIRS) == _expected(PAIRS)  # reloads on the next call
    assert pool.spec_stats(spec)["reloads"] == 1
    thread = pool._reaper_thread
    assert thread is not None
    assert thread.is_alive()
    pool.clear()
    assert not thread.is_alive()  # clear() stops the reaper without hanging


def test_a_model_in_use_is_not_reaped(make_pool: Callable[..., ModelPool]) -> None:
    pool = make_pool(idle_unload_s=0.1)
    spec = fake_reranker_spec("busy", delay_ms=400)
    with ThreadPoolExecutor(1) as ex:
        running = ex.submit(pool.score_pairs, spec, PAIRS)
        time.sleep(0.3)  # three idle periods while the call runs
        assert pool.is_loaded(spec)
        assert running.result(timeout=10) == _expected(PAIRS)
    assert pool.spec_stats(spec)["evictions"] == 0


def test_the_reaper_ends_when_its_pool_is_collected() -> None:
    import gc

    pool = ModelPool(idle_unload_s=0.05)
    pool.get(fake_reranker_spec("gc"))
    thread = pool._reaper_thread
    assert thread is not None
    assert thread.is_alive()
    del pool
    gc.collect()
    thread.join(timeout=5)
    assert not thread.is_alive()


def test_reload_after_eviction_runs_the_warm_up_pass_first(
    make_pool: Callable[..., ModelPool],
) -> None:
    pool = make_pool(memory_budget_mb=1.5 * MB)
    name = f"warm-{time.monotonic_ns()}"
    spec = ModelSpec(name, backend="test-mem-recording", device="cpu")
    pool.score_pairs(spec, PAIRS)
    pool.score_pairs(fake_reranker_spec("warm-other", footprint_mb=MB), PAIRS)  # evicts it
    assert not pool.is_loaded(spec)
    assert pool.score_pairs(spec, PAIRS) == _expected(PAIRS)
    first, second = SEEN[name]
    assert first == [PAIRS]  # the first load is not warmed up (preload(warmup=True) does that)
    assert second == [[("warm-up query", "warm-up passage")], PAIRS]


# -- fork ---------------------------------------------------------------------------------------


def _reaper_child(queue, pool: ModelPool, spec: ModelSpec) -> None:  # type: ignore[no-untyped-def]
    loaded_at_start = pool.is_loaded(spec)
    reaped = _wait_for(lambda: not pool.is_loaded(spec), timeout=10)
    stats = pool.spec_stats(spec)
    queue.put(
        (loaded_at_start, reaped, stats["last_eviction_reason"], pool.score_pairs(spec, PAIRS))
    )


@pytest.mark.skipif(sys.platform == "win32", reason="fork is POSIX-only")
def test_the_reaper_runs_in_a_forked_child(make_pool: Callable[..., ModelPool]) -> None:
    pool = make_pool(idle_unload_s=0.3)
    spec = fake_reranker_spec("fork-idle", footprint_mb=MB)
    pool.preload(spec)
    ctx = multiprocessing.get_context("fork")
    queue = ctx.Queue()
    with pool._lock:  # a lock held at fork time must not block the child's reaper
        child = ctx.Process(target=_reaper_child, args=(queue, pool, spec))
        child.start()
    loaded_at_start, reaped, reason, scores = queue.get(timeout=30)
    child.join(timeout=30)
    assert child.exitcode == 0
    assert loaded_at_start is True  # the CPU model was inherited...
    assert reaped is True
    assert reason == "idle"
    assert scores == _expected(PAIRS)


# -- a real model -------------------------------------------------------------------------------


def test_real_cross_encoders_footprint_and_eviction(
    make_pool: Callable[..., ModelPool], tiny_ce_path: str
) -> None:
    pytest.importorskip("sentence_transformers")
    a = ModelSpec(tiny_ce_path, backend="cross-encoder", device="cpu", dtype="float32")
    b = a.with_options(max_length=128)  # another key, the same weights loaded again
    probe = make_pool()
    handle = probe.get(a)
    module = handle.model.model
    expected = sum(t.numel() * t.element_size() for t in (*module.parameters(), *module.buffers()))
    footprint_mb = probe.spec_stats(a)["footprint_mb"]
    assert footprint_mb == pytest.approx(expected / 2**20, abs=0.001)
    assert footprint_mb > 0
    before = probe.score_pairs(a, PAIRS)

    pool = make_pool(memory_budget_mb=footprint_mb * 1.5)
    assert pool.score_pairs(a, PAIRS) == before
    pool.score_pairs(b, PAIRS)
    assert not pool.is_loaded(a)
    assert pool.score_pairs(a, PAIRS) == before  # reloaded, warmed up, same scores
    assert not pool.is_loaded(b)  # made room before the load this time
    stats = pool.spec_stats(a)
    assert (stats["loads"], stats["reloads"], stats["errors"]) == (2, 1, 0)
    assert pool.memory()["cpu"]["peak_mb"] <= footprint_mb * 2.5


class _BadClose(FakeReranker):
    def close(self) -> None:
        raise RuntimeError("close failed")


register_backend(
    "test-mem-bad-close",
    lambda spec, _p: (_BadClose if spec.model == "bad" else FakeReranker)(footprint_mb=100),
    "reranker",
    replace=True,
    uses_torch=False,
)


def test_an_evicted_models_failing_close_does_not_fail_the_call_that_made_room(
    make_pool: Callable[..., ModelPool], caplog: pytest.LogCaptureFixture
) -> None:
    pool = make_pool(memory_budget_mb=100)
    bad = ModelSpec("bad", backend="test-mem-bad-close", device="cpu")
    good = ModelSpec("good", backend="test-mem-bad-close", device="cpu")
    pool.score_pairs(bad, PAIRS)
    with caplog.at_level(logging.ERROR):
        assert pool.score_pairs(good, PAIRS) == _expected(PAIRS)  # raised "close failed"
    assert "closing the evicted" in caplog.text
    assert not pool.is_loaded(bad)
    assert pool.spec_stats(bad)["evictions"] == 1


def test_the_reaper_checks_idleness_again_once_it_holds_the_memory_lock(
    make_pool: Callable[..., ModelPool],
) -> None:
    """The reaper decides who is idle, then waits for the memory lock, which a load holds for
    its whole length: a model called every 50 ms meanwhile was evicted as idle."""
    pool = make_pool(idle_unload_s=1.0)
    spec = fake_reranker_spec("reaped-late")
    pool.score_pairs(spec, PAIRS)
    key = pool.key(spec)
    slot = pool._slots[key]
    slot.loaded_at -= 10  # loaded long ago ...
    assert pool._evict(key, slot, "idle", idle=1.0) is False  # ... but just called
    stats = pool._stats[key]
    stats.update(last_used=time.time() - 5)
    assert pool._evict(key, slot, "idle", idle=1.0) is True
    assert pool.spec_stats(spec)["last_eviction_reason"] == "idle"


class _ScheduledSlow(FakeReranker):
    thread_safe = False  # scheduled: a timed-out caller's running pass goes on in the worker


register_backend(
    "test-mem-scheduled-slow",
    lambda spec, _p: _ScheduledSlow(delay_ms=float(spec.option("delay_ms", 0)), footprint_mb=100),
    "reranker",
    replace=True,
    uses_torch=False,
)


def test_eviction_leaves_a_model_running_a_pass_nobody_waits_for(
    make_pool: Callable[..., ModelPool],
) -> None:
    """A caller timed out while its pass ran; the worker went on. Evicting that model waited
    for the pass while holding the memory lock, so an unrelated model's first call timed out."""
    from rag_rerank_plugins import RequestTimeoutError

    pool = make_pool(memory_budget_mb=100)
    slow = ModelSpec(
        "A", backend="test-mem-scheduled-slow", device="cpu", options={"delay_ms": 3000}
    )
    other = ModelSpec("B", backend="test-mem-scheduled-slow", device="cpu")
    pool.preload(slow, warmup=False)
    with pytest.raises(RequestTimeoutError):
        pool.score_pairs(slow, PAIRS, timeout=0.2)
    started = time.monotonic()
    assert pool.score_pairs(other, PAIRS, timeout=2.0) == _expected(PAIRS)
    assert time.monotonic() - started < 1.5
