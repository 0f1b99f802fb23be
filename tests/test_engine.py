"""The engine's GPU-grade behaviour, proven on a CPU with a simulated device.

* Out of memory: the failed pass is freed before the retry (a device that keeps memory allocated
  while anything references it, like CUDA), the batch is split, and the token budget shrinks so
  the next request does not hit the same wall.
* Pipeline: the device worker only runs forwards; tokenisation happens on the prepare thread,
  overlapped with the running pass.
* Architecture: no import circle among the pool, the handle, the engine and the backends
  (type-only imports count).
"""

from __future__ import annotations

import ast
import threading
import time
import uuid
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

from rag_rerank_plugins import InferenceError, ModelPool, ModelSpec, OutOfMemoryError
from rag_rerank_plugins.backends import register_backend
from rag_rerank_plugins.backends.base import Prepared, Task, is_out_of_memory
from rag_rerank_plugins.engine_config import EngineConfig
from rag_rerank_plugins.testing import (
    FakeReranker,
    SimulatedDevice,
    SimulatedOutOfMemoryError,
    SimulatedReranker,
)

WORDS = 10  # every passage below has this many words, so every item has the same length


def _register(model: Any) -> ModelSpec:
    name = f"sim-{uuid.uuid4().hex[:8]}"
    register_backend(name, lambda spec, provider: model, "reranker", uses_torch=False)
    return ModelSpec("m", backend=name, device="cpu")


def _pairs(n: int, query: str = "alpha beta") -> list[tuple[str, str]]:
    return [
        (query, " ".join(["alpha"] + [f"w{i}x{j}" for j in range(WORDS - 1)])) for i in range(n)
    ]


def _pool(**config: Any) -> ModelPool:
    return ModelPool(config=EngineConfig(**config))


# -- out of memory --------------------------------------------------------------------------------


def _model_with_room_for(items: int, layers: int) -> tuple[SimulatedDevice, SimulatedReranker]:
    """A simulated device with room for the activations of ``items`` of :func:`_pairs` across
    all ``layers``, and a model on it."""
    one = SimulatedReranker()._padded(_pairs(1))  # padded tokens of one item
    device = SimulatedDevice(capacity_bytes=layers * items * one * 1000)
    return device, SimulatedReranker(device, bytes_per_token=1000, layers=layers)


def test_a_real_oom_is_freed_before_the_split_and_the_request_succeeds() -> None:
    pairs = _pairs(16)
    one = SimulatedReranker()._padded(pairs[:1])  # padded tokens of one item
    # Room for the activations of 8 items across all layers, not 16: a pass of 16 fails in its
    # third layer with the device full. Only if that pass is really freed can 8 items run.
    device, model = _model_with_room_for(8, layers=4)
    pool = _pool(max_batch_size=64, token_budget=100_000)
    spec = _register(model)

    scores = pool.score_pairs(spec, pairs)

    assert scores == FakeReranker().score_pairs(pairs, 16)
    stats = pool.spec_stats(spec)
    assert stats["oom_splits"] > 0
    assert device.ooms >= 1
    assert device.allocated_bytes == 0, "every pass, failed or not, gave its memory back"
    assert max(model.passes) <= 8 * one
    pool.clear()


def test_the_token_budget_shrinks_after_an_oom_so_the_next_request_fits() -> None:
    pairs = _pairs(16)
    one = SimulatedReranker()._padded(pairs[:1])
    device = SimulatedDevice(capacity_bytes=2 * 8 * one * 1000)
    model = SimulatedReranker(device, bytes_per_token=1000, layers=2)
    pool = _pool(max_batch_size=64, token_budget=100_000)
    spec = _register(model)
    pool.score_pairs(spec, pairs)
    learned = pool.spec_stats(spec)["token_budget"]
    assert learned < 100_000
    ooms = device.ooms

    assert pool.score_pairs(spec, _pairs(16, "alpha gamma")) == [0.5] * 16
    assert device.ooms == ooms, "the learned budget must keep the next request under the wall"
    assert pool.spec_stats(spec)["token_budget"] == learned
    pool.clear()


def test_a_single_item_that_cannot_fit_fails_with_out_of_memory_and_frees_everything() -> None:
    device = SimulatedDevice(capacity_bytes=10)
    model = SimulatedReranker(device, bytes_per_token=1000, layers=2)
    pool = _pool()
    spec = _register(model)
    with pytest.raises(OutOfMemoryError, match="single item"):
        pool.score_pairs(spec, _pairs(4))
    assert device.allocated_bytes == 0
    assert pool.score_pairs(spec, []) == []
    pool.clear()


@pytest.mark.parametrize(
    ("error", "expected"),
    [
        (MemoryError(), True),
        (RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB"), True),
        (RuntimeError("MPS backend out of memory (MPS allocated: 1.2 GB)"), True),
        (
            RuntimeError(
                "[enforce fail at alloc_cpu.cpp:117] DefaultCPUAllocator: not enough memory"
            ),
            True,
        ),
        (SimulatedOutOfMemoryError("Simulated device out of memory"), True),
        (RuntimeError("expected scalar type Float but found Half"), False),
        (ValueError("out of memory"), False),
    ],
)
def test_out_of_memory_is_recognised_across_devices(error: BaseException, expected: bool) -> None:
    assert is_out_of_memory(error) is expected


def test_torch_out_of_memory_error_is_recognised() -> None:
    torch = pytest.importorskip("torch")
    assert is_out_of_memory(torch.OutOfMemoryError("CUDA out of memory"))


# -- the pipeline ---------------------------------------------------------------------------------


class _Timed(SimulatedReranker):
    """Records when prepare and forward run; prepare costs ``prepare_s`` of CPU-side waiting."""

    def __init__(self, prepare_s: float, forward_s: float) -> None:
        super().__init__()
        self.prepare_s = prepare_s
        self.forward_s = forward_s
        self.intervals: list[tuple[str, float, float]] = []
        self._lock = threading.Lock()

    def prepare(self, task: Task, items: Sequence[Any]) -> Prepared:
        start = time.perf_counter()
        time.sleep(self.prepare_s)
        prepared = super().prepare(task, items)
        with self._lock:
            self.intervals.append(("prepare", start, time.perf_counter()))
        return prepared

    def forward(self, task: Task, batch: Prepared) -> Any:
        start = time.perf_counter()
        time.sleep(self.forward_s)
        result = super().forward(task, batch)
        with self._lock:
            self.intervals.append(("forward", start, time.perf_counter()))
        return result


def _overlapping(intervals: list[tuple[str, float, float]]) -> int:
    prepares = [(a, b) for kind, a, b in intervals if kind == "prepare"]
    forwards = [(a, b) for kind, a, b in intervals if kind == "forward"]
    return sum(1 for pa, pb in prepares for fa, fb in forwards if pa < fb and fa < pb)


def test_tokenisation_runs_on_the_prepare_thread_overlapped_with_forwards() -> None:
    model = _Timed(prepare_s=0.03, forward_s=0.03)
    pool = _pool(max_batch_size=4)
    spec = _register(model)
    with ThreadPoolExecutor(8) as ex:
        results = list(ex.map(lambda i: pool.score_pairs(spec, _pairs(4, f"q{i}")), range(8)))
    assert results == [[0.0] * 4] * 8
    assert len(model.forward_threads) == 1, "one device worker runs every forward"
    assert model.prepare_threads.isdisjoint(model.forward_threads)
    assert _overlapping(model.intervals) >= 3, "the next batch must be prepared during a forward"
    assert pool.spec_stats(spec)["prepare_seconds"] > 0
    pool.clear()


def test_without_the_pipeline_the_worker_prepares_in_sequence() -> None:
    model = _Timed(prepare_s=0.01, forward_s=0.01)
    pool = _pool(max_batch_size=4, pipeline=False)
    spec = _register(model)
    with ThreadPoolExecutor(4) as ex:
        list(ex.map(lambda i: pool.score_pairs(spec, _pairs(4, f"q{i}")), range(4)))
    assert model.prepare_threads == model.forward_threads
    assert _overlapping(model.intervals) == 0
    pool.clear()


def _max_concurrent(intervals: list[tuple[str, float, float]], kind: str) -> int:
    spans = [(a, b) for k, a, b in intervals if k == kind]
    return max(sum(1 for a, b in spans if a <= start < b) for start, _ in spans)


def test_prepare_workers_prepare_in_parallel_and_results_keep_their_order() -> None:
    model = _Timed(prepare_s=0.03, forward_s=0.005)
    pool = _pool(max_batch_size=2, prepare_workers=3)
    spec = _register(model)
    with ThreadPoolExecutor(8) as ex:
        results = list(ex.map(lambda i: pool.score_pairs(spec, _pairs(6, f"q{i}")), range(8)))
    assert [len(r) for r in results] == [6] * 8
    assert len(model.prepare_threads) == 3
    assert _max_concurrent(model.intervals, "prepare") >= 2, "TEI-style tokenisation workers"
    assert _max_concurrent(model.intervals, "forward") == 1, "one device worker"
    pool.clear()


@pytest.mark.parametrize(
    ("device", "cores", "asked", "threads"),
    [
        ("cuda:0", 16, None, 4),  # a GPU host: a small model is limited by tokenising
        ("cuda:1", 8, None, 4),
        ("cuda:0", 4, None, 1),  # too few cores to spare
        ("cpu", 16, None, 1),  # on the CPU the device workers need the cores
        ("mps", 16, None, 1),  # not measured
        ("cuda:0", 16, 2, 2),  # asked for: always what was asked
        ("cpu", 2, 3, 3),
    ],
)
def test_prepare_threads_default_to_four_on_cuda_hosts_with_cores_to_spare(
    monkeypatch: pytest.MonkeyPatch, device: str, cores: int, asked: int | None, threads: int
) -> None:
    from rag_rerank_plugins import _cpu

    monkeypatch.setattr(_cpu, "usable_cores", lambda: cores)
    assert EngineConfig(prepare_workers=asked).prepare_threads(device) == threads


def test_a_gpu_model_prepares_on_four_threads_by_default_on_a_big_host(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from rag_rerank_plugins import _cpu

    monkeypatch.setattr(_cpu, "usable_cores", lambda: 16)
    model = _Timed(prepare_s=0.03, forward_s=0.002)  # a simulated GPU ("cuda:sim")
    pool = _pool(max_batch_size=2)
    spec = _register(model)
    with ThreadPoolExecutor(8) as ex:
        results = list(ex.map(lambda i: pool.score_pairs(spec, _pairs(6, f"q{i}")), range(8)))
    assert [len(r) for r in results] == [6] * 8
    assert 2 <= len(model.prepare_threads) <= 4
    assert _max_concurrent(model.intervals, "forward") == 1, "one device worker"
    pool.clear()


def test_a_backend_without_concurrent_prepare_gets_one_prepare_thread() -> None:
    model = _Timed(prepare_s=0.01, forward_s=0.001)
    model.concurrent_prepare = False
    pool = _pool(max_batch_size=2, prepare_workers=4)
    spec = _register(model)
    with ThreadPoolExecutor(8) as ex:
        list(ex.map(lambda i: pool.score_pairs(spec, _pairs(4, f"q{i}")), range(8)))
    assert len(model.prepare_threads) == 1
    assert _max_concurrent(model.intervals, "prepare") == 1
    pool.clear()


def test_cross_encoder_tokenises_in_several_threads_and_still_equals_predict(
    ce_spec: ModelSpec, direct_cross_encoder, passages: list[str]
) -> None:
    import numpy as np

    pool = _pool(max_batch_size=2, prepare_workers=4)
    pairs = [(f"question {i}", p) for i in range(4) for p in passages]
    with ThreadPoolExecutor(8) as ex:
        ours = list(ex.map(lambda k: pool.score_pairs(ce_spec, pairs[k:] + pairs[:k]), range(8)))
    for k, scores in enumerate(ours):
        ref = direct_cross_encoder.predict(pairs[k:] + pairs[:k], show_progress_bar=False)
        np.testing.assert_allclose(scores, ref, atol=1e-5, rtol=0)
    assert pool.spec_stats(ce_spec)["loads"] == 1
    preparers = {t.name for t in threading.enumerate() if t.name.startswith("rag-rerank-prepare")}
    assert len(preparers) > 1, "the cross-encoder declares concurrent_prepare"
    pool.clear()


# -- parallel CPU device workers ------------------------------------------------------------------


class _CpuParallel(_Timed):
    """A CPU model whose passes may run at once; records the threads each pass ran with."""

    def __init__(self, forward_s: float) -> None:
        super().__init__(prepare_s=0.0, forward_s=forward_s)
        self.device = "cpu"
        self.parallel_forward = True
        self._bound = threading.local()
        self.pass_threads: list[int | None] = []

    def bind_worker_thread(self, threads: int) -> None:
        self._bound.threads = threads

    def forward(self, task: Task, batch: Prepared) -> Any:
        with self._lock:
            self.pass_threads.append(getattr(self._bound, "threads", None))
        return super().forward(task, batch)


def test_cpu_models_run_passes_on_parallel_device_workers_with_a_share_of_the_cores() -> None:
    model = _CpuParallel(forward_s=0.02)
    config = EngineConfig(max_batch_size=2, cpu_workers=2)
    pool = ModelPool(config=config)
    spec = _register(model)
    with ThreadPoolExecutor(8) as ex:
        results = list(ex.map(lambda i: pool.score_pairs(spec, _pairs(6, f"q{i}")), range(8)))
    expected = [FakeReranker().score_pairs(_pairs(6, f"q{i}"), 6) for i in range(8)]
    assert results == expected, "every request gets its own scores, in its own order"
    assert _max_concurrent(model.intervals, "forward") == 2
    assert len(model.forward_threads) == 2
    workers, threads = config.cpu_device_workers()
    assert workers == 2
    assert threads in model.pass_threads, "passes that run together share the cores"
    assert None not in model.pass_threads, "every pass ran with a thread count set for it"
    pool.clear()


def test_a_lone_pass_on_the_parallel_cpu_workers_gets_every_core() -> None:
    model = _CpuParallel(forward_s=0.001)
    config = EngineConfig(max_batch_size=8, cpu_workers=2)
    pool = ModelPool(config=config)
    spec = _register(model)
    assert pool.score_pairs(spec, _pairs(1)) == FakeReranker().score_pairs(_pairs(1), 1)
    assert model.pass_threads == [config.cpu_threads()], "one item: one pass, all cores"
    pool.clear()


@pytest.mark.parametrize(
    ("items", "greedy", "even"),
    [
        (2, [2], [1, 1]),
        (3, [3], [2, 1]),
        (7, [3, 3, 1], [2, 2, 2, 1]),
        (9, [3, 3, 3], [3, 3, 3]),  # 4 passes could not make the longest shorter
    ],
)
def test_a_request_alone_is_evened_out_over_the_parallel_cpu_workers(
    items: int, greedy: list[int], even: list[int]
) -> None:
    """Greedy passes of 3 + 3 + 1 items leave one worker running the last pass alone; the last
    round queued is cut into whole rounds of workers instead, with no pass longer than before."""
    from rag_rerank_plugins.engine.batching import TokenScale

    pairs = _pairs(items)  # under 10: every pair the same length
    estimate = TokenScale(512).length(pairs[0], 1.0)
    assert {TokenScale(512).length(pair, 1.0) for pair in pairs} == {estimate}
    for workers, want in ((1, greedy), (2, even)):
        model = _CpuParallel(forward_s=0.01)
        pool = _pool(max_batch_size=32, token_budget=3 * estimate, cpu_workers=workers)
        spec = _register(model)
        assert pool.score_pairs(spec, pairs) == FakeReranker().score_pairs(pairs, items)
        sizes = sorted((p // model._padded(pairs[:1]) for p in model.passes), reverse=True)
        assert sizes == want, f"{workers} worker(s)"
        if workers == 2 and len(sizes) > 1:
            assert model.pass_threads[:2] == [1, 1], "two passes at once: one core each"
        pool.clear()


def test_an_oom_on_a_parallel_cpu_worker_is_split_after_the_other_passes_finish() -> None:
    pairs = _pairs(16)
    device, model = _model_with_room_for(4, layers=2)  # the request is cut into passes of 8
    model.device = "cpu"
    model.parallel_forward = True
    pool = _pool(max_batch_size=64, token_budget=100_000, cpu_workers=2)
    spec = _register(model)
    assert pool.score_pairs(spec, pairs) == FakeReranker().score_pairs(pairs, 16)
    assert pool.spec_stats(spec)["oom_splits"] > 0
    assert device.allocated_bytes == 0
    pool.clear()


def _in_fresh_thread(call: Any) -> Any:
    """``call()`` on a new thread: what a thread the engine never touched sees."""
    seen: list[Any] = []
    thread = threading.Thread(target=lambda: seen.append(call()))
    thread.start()
    thread.join()
    return seen[0]


def test_a_failing_worker_binding_fails_that_request_and_the_next_one_runs() -> None:
    """``bind_worker_thread`` raising (e.g. torch refusing a thread count) is the pass's error:
    the caller gets it, nobody waits forever, and the worker binds again on its next pass."""

    class _BindFailsOnce(_CpuParallel):
        failed = False

        def bind_worker_thread(self, threads: int) -> None:
            if not self.failed:
                self.failed = True
                raise RuntimeError("cannot set 1 thread")
            super().bind_worker_thread(threads)

    model = _BindFailsOnce(forward_s=0.001)
    pool = ModelPool(config=EngineConfig(max_batch_size=8, cpu_workers=2))
    spec = _register(model)
    with ThreadPoolExecutor(1) as ex:
        with pytest.raises(InferenceError, match="cannot set 1 thread"):
            ex.submit(pool.score_pairs, spec, _pairs(1)).result(timeout=30)
        again = ex.submit(pool.score_pairs, spec, _pairs(1)).result(timeout=30)
    assert again == FakeReranker().score_pairs(_pairs(1), 1)
    assert None not in model.pass_threads
    pool.clear()


def test_cpu_workers_leave_torch_threads_of_other_threads_alone(
    ce_spec: ModelSpec, direct_cross_encoder, passages: list[str]
) -> None:
    torch = pytest.importorskip("torch")
    import numpy as np

    def fresh_thread_threads() -> int:
        return _in_fresh_thread(torch.get_num_threads)

    before = fresh_thread_threads()
    pool = _pool(max_batch_size=2, cpu_workers=2)
    pairs = [("which organelle produces ATP?", p) for p in passages]
    np.testing.assert_allclose(
        pool.score_pairs(ce_spec, pairs),
        direct_cross_encoder.predict(pairs, show_progress_bar=False),
        atol=1e-5,
        rtol=0,
    )
    assert pool.spec_stats(ce_spec)["forward_passes"] > 1
    assert fresh_thread_threads() == before
    pool.clear()


def test_rebinding_a_worker_thread_leaves_the_process_default_alone() -> None:
    """A device worker bound to 1 thread that later runs a lone pass with 2 (the engine gives a
    lone pass every core) restored the process-wide count to its own old 1: every new thread of
    the process then ran torch on 1 thread (a CI run caught it)."""
    torch = pytest.importorskip("torch")
    from rag_rerank_plugins._cpu import set_thread_torch_threads

    before = _in_fresh_thread(torch.get_num_threads)
    other, mine = before + 1, before + 2  # neither is the process default

    def worker() -> list[int]:
        counts = []
        for threads in (other, mine, other):
            set_thread_torch_threads(threads)
            counts.append(torch.get_num_threads())
        return counts

    assert _in_fresh_thread(worker) == [other, mine, other]
    assert _in_fresh_thread(torch.get_num_threads) == before
    barrier = threading.Barrier(4, timeout=30)

    def racer() -> int:
        barrier.wait()
        set_thread_torch_threads(other)
        set_thread_torch_threads(mine)
        return torch.get_num_threads()

    with ThreadPoolExecutor(4) as executor:
        assert list(executor.map(lambda _: racer(), range(4))) == [mine] * 4
    assert _in_fresh_thread(torch.get_num_threads) == before


def test_two_phase_cross_encoder_uses_real_token_counts_and_equals_predict(
    pool: ModelPool, ce_spec: ModelSpec, direct_cross_encoder, passages: list[str]
) -> None:
    import numpy as np

    pairs = [("which organelle produces ATP?", p) for p in passages] * 3
    ours = pool.score_pairs(ce_spec, pairs, batch_size=5)
    ref = direct_cross_encoder.predict(pairs, batch_size=32, show_progress_bar=False)
    np.testing.assert_allclose(ours, ref, atol=1e-5, rtol=0)
    stats = pool.spec_stats(ce_spec)
    assert stats["prepare_seconds"] > 0
    assert stats["avg_tokens_per_batch"] > 0
    assert 0 <= stats["padding_ratio"] < 1, "real token counts, not estimates, from prepare"


def test_two_phase_embedder_honours_prompts_like_encode(
    pool: ModelPool, emb_spec: ModelSpec, direct_embedder, passages: list[str]
) -> None:
    import numpy as np

    for is_query, encode in (
        (True, direct_embedder.encode_query),
        (False, direct_embedder.encode_document),
    ):
        for prompt in (None, "Represent this for retrieval: "):
            ours = pool.embed(
                emb_spec, passages, 3, is_query=is_query, normalize=True, prompt=prompt
            )
            ref = encode(passages, prompt=prompt, normalize_embeddings=True)
            np.testing.assert_allclose(ours, ref, atol=1e-5)
    assert pool.spec_stats(emb_spec)["prepare_seconds"] > 0


# -- architecture ---------------------------------------------------------------------------------

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "rag_rerank_plugins"
ENGINE_ROOTS = ("pool", "engine", "handle", "stats", "engine_config")


def _is_engine(module: str) -> bool:
    return module.split(".")[0] in ENGINE_ROOTS


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE).with_suffix("").parts
    return ".".join(p for p in parts if p != "__init__")


def _imports(path: Path) -> set[str]:
    """Package-internal modules ``path`` imports, at any depth (type-only imports included)."""
    name = _module_name(path)
    package = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.level:
            base = package[: len(package) - node.level + 1]
            target = ".".join([*base, *(node.module.split(".") if node.module else [])])
            found.add(target)
            for alias in node.names:
                found.add(f"{target}.{alias.name}" if target else alias.name)
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith(
            "rag_rerank_plugins"
        ):
            found.add(node.module.removeprefix("rag_rerank_plugins").lstrip("."))
    modules = {_module_name(p) for p in PACKAGE.rglob("*.py")}
    return {m for m in found if m in modules and m != name}


def test_no_import_circle_between_the_engine_and_the_backends() -> None:
    graph = {_module_name(p): _imports(p) for p in PACKAGE.rglob("*.py")}
    scope = {m for m in graph if _is_engine(m) or m.split(".")[0] == "backends"}
    for module in scope:
        if module.startswith("backends"):
            engine = {m for m in graph[module] if _is_engine(m)}
            assert not engine, f"{module} imports {engine}"

    def reaches(start: str, goal: str) -> bool:
        seen, stack = set(), [start]
        while stack:
            for nxt in graph.get(stack.pop(), ()):
                if nxt == goal:
                    return True
                if nxt in scope and nxt not in seen:
                    seen.add(nxt)
                    stack.append(nxt)
        return False

    circles = sorted(m for m in scope if reaches(m, m))
    assert not circles, f"import circles through {circles}"


def test_cpu_workers_share_the_torch_threads_asked_for(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RAG_RERANK_TORCH_THREADS", "6")
    assert EngineConfig(cpu_workers=3).cpu_device_workers() == (3, 2)
    assert EngineConfig().cpu_threads() == 6
    monkeypatch.setenv("RAG_RERANK_TORCH_THREADS", "many")
    with pytest.raises(ValueError, match="RAG_RERANK_TORCH_THREADS"):
        EngineConfig().cpu_threads()
