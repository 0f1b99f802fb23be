"""Figures for the memory-managed pool (issue 14), with fake models of simulated sizes.

* Three 100 MB models under a 250 MB budget, called in a seeded random order: peak footprint and
  evictions.
* 64 threads hammering three models (2 ms per call; one scheduled like a torch model) with and
  without a two-model budget: calls/s, evictions, errors.

Run: ``python benchmarks/pool_memory.py``. Not a test: the numbers depend on the machine.
"""

from __future__ import annotations

import random
import time
from concurrent.futures import ThreadPoolExecutor

from rag_rerank_plugins import ModelPool, ModelSpec
from rag_rerank_plugins.backends import register_backend
from rag_rerank_plugins.testing import FakeReranker, fake_reranker_spec

MB = 100


class _Scheduled(FakeReranker):
    thread_safe = False


register_backend(
    "bench-scheduled",
    lambda spec, _p: _Scheduled(spec.option("delay_ms", 0.0), spec.option("footprint_mb")),
    "reranker",
    replace=True,
)


def three_models() -> None:
    pool = ModelPool(memory_budget_mb=2.5 * MB)
    specs = [fake_reranker_spec(f"bench-{n}", footprint_mb=MB) for n in "abc"]
    rng = random.Random(0)
    calls = 300
    for _ in range(calls):
        pool.score_pairs(rng.choice(specs), [("q alpha", "alpha")])
    memory = pool.memory()["cpu"]
    print(
        f"3 models x {MB} MB, budget {2.5 * MB:.0f} MB, {calls} random calls: "
        f"peak {memory['peak_mb']:.0f} MB, evictions {memory['evictions']}, "
        f"resident now {memory['used_mb']:.0f} MB"
    )
    pool.clear()


def hammer(budget: float | None) -> None:
    specs = [
        fake_reranker_spec("h-a", footprint_mb=MB, delay_ms=2),
        fake_reranker_spec("h-b", footprint_mb=MB, delay_ms=2),
        ModelSpec(
            "h-c", backend="bench-scheduled", options=(("delay_ms", 2), ("footprint_mb", MB))
        ),
    ]
    pool = ModelPool(memory_budget_mb=budget)
    rng = random.Random(1)
    jobs = [rng.randrange(3) for _ in range(64 * 40)]
    for spec in specs:
        pool.preload(spec)
    start = time.perf_counter()
    with ThreadPoolExecutor(64) as ex:
        list(ex.map(lambda i: pool.score_pairs(specs[i], [("q alpha", "alpha")]), jobs))
    elapsed = time.perf_counter() - start
    stats = pool.stats()
    errors = sum(s["errors"] for s in stats.values())
    memory = pool.memory()["cpu"]
    label = "no budget" if budget is None else f"budget {budget:.0f} MB (2 models)"
    print(
        f"64 threads, 3 models, {len(jobs)} calls, {label}: {len(jobs) / elapsed:,.0f} calls/s, "
        f"evictions {memory['evictions']}, peak {memory['peak_mb']:.0f} MB, errors {errors}"
    )
    pool.clear()


if __name__ == "__main__":
    three_models()
    hammer(None)
    hammer(2 * MB)
