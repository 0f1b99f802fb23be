"""``pool.clear()`` against releasing each model, in a big heap: what a shutdown hook waits for.

    python benchmarks/pool_clear.py [--models 3] [--rounds 7] [--objects 3000000]

Freeing a model runs a full garbage collection and a glibc heap trim; in a long-running service's
heap one pass takes a good part of a second. ``clear()`` frees once for all its models;
releasing each model (what ``clear()`` did until 2026-12-05) frees once per model. One process,
torch and transformers imported and ``--objects`` small containers alive (the heap), fake models
(no weights: this measures the pool's own cost), the two ways interleaved in rounds.
"""

from __future__ import annotations

import argparse
import gc
import platform
import statistics
import time
import uuid

from rag_rerank_plugins import ModelPool, ModelSpec
from rag_rerank_plugins.backends import register_backend
from rag_rerank_plugins.testing import FakeReranker

PAIRS = [("red apple", "apple"), ("red apple", "pear")]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--objects", type=int, default=3_000_000)
    args = parser.parse_args()

    import torch  # noqa: F401  - a real service's heap
    import transformers  # noqa: F401

    heap = [[i, str(i)] for i in range(args.objects)]  # lists: tracked by the collector
    name = f"bench-clear-{uuid.uuid4().hex[:8]}"
    register_backend(name, lambda spec, _p: FakeReranker(footprint_mb=1), "reranker")
    specs = [ModelSpec(f"m{i}", backend=name, device="cpu") for i in range(args.models)]
    pool = ModelPool()

    def load() -> None:
        for spec in specs:
            pool.score_pairs(spec, PAIRS)

    each, once = [], []
    for _ in range(args.rounds):
        load()
        started = time.perf_counter()
        assert sum(pool.release(spec) for spec in specs) == args.models
        each.append(time.perf_counter() - started)
        load()
        started = time.perf_counter()
        assert pool.clear() == args.models
        once.append(time.perf_counter() - started)
    started = time.perf_counter()
    gc.collect()
    collect = time.perf_counter() - started
    print(f"CPU: {platform.processor() or platform.machine()}, {len(heap):,} objects in the heap")
    print(f"one gc.collect(): {collect * 1000:.0f} ms")
    print(f"release each of {args.models}: median {statistics.median(each) * 1000:.0f} ms")
    print(f"clear(): median {statistics.median(once) * 1000:.0f} ms")


if __name__ == "__main__":
    main()
