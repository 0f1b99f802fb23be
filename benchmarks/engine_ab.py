"""Engine before/after, side by side: warm 1 x 50 and 16 callers, alternating processes.

    python benchmarks/engine_ab.py --before /path/to/old/checkout/src [--rounds 3]

Each round runs one process per engine (order alternating between rounds, so drift hits both
alike). A process loads the MiniLM-L6-shaped random cross-encoder of ``run.py`` on the default
CPU path (dtype auto), then measures the warm 1 x 50 request (median of ``--reps``) and 16
concurrent callers x 1 request of 20 passages (requests/s), exactly as ``run.py``'s ``warm`` and
``concurrency`` scenarios do for "ours". Prints one JSON line per process and a table of medians.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent

CHILD = r"""
import json, statistics, sys, time
sys.path.insert(0, sys.argv[1])
import run
from rag_rerank_plugins import ModelPool
models = run.build_models(run.Path(sys.argv[2]), xlmr=False)
model = models["minilm"]
pool = ModelPool()
system = run.ours_factory(model, pool)()
passages = run.mixed_passages(50, seed=2)
docs, nodes = run.as_docs(passages)
run.run_request(system, docs[:4], nodes[:4], run.QUERY)
times = []
for _ in range(int(sys.argv[3])):
    t0 = time.perf_counter()
    run.run_request(system, docs, nodes, run.QUERY)
    times.append(time.perf_counter() - t0)
pool.clear()
conc = run.scenario_concurrency(model, 16, 1)
print(json.dumps({"warm_1x50_ms": statistics.median(times) * 1000,
                  "callers16_rps": conc["concurrent_rps"], "errors": conc["errors"]}))
"""


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--before", required=True, type=Path, help="src/ of the old checkout")
    parser.add_argument("--after", type=Path, default=HERE.parent / "src")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--models", type=Path, default=HERE / ".models")
    args = parser.parse_args()
    rows: dict[str, list[dict[str, float]]] = {"before": [], "after": []}
    for r in range(args.rounds):
        order = ["before", "after"] if r % 2 == 0 else ["after", "before"]
        for name in order:
            src = args.before if name == "before" else args.after
            env = {**os.environ, "PYTHONPATH": str(src)}
            out = subprocess.run(
                [sys.executable, "-c", CHILD, str(HERE), str(args.models), str(args.reps)],
                env=env,
                capture_output=True,
                text=True,
                check=True,
            )
            line = json.loads(out.stdout.strip().splitlines()[-1])
            print(json.dumps({"engine": name, "round": r, **line}), flush=True)
            rows[name].append(line)
    print(f"\nCPU: {platform.processor() or platform.machine()}, {os.cpu_count()} cores")
    print("| engine | warm 1x50 median ms | 16 callers req/s |")
    print("|---|---|---|")
    for name, rs in rows.items():
        warm = statistics.median(x["warm_1x50_ms"] for x in rs)
        rps = statistics.median(x["callers16_rps"] for x in rs)
        print(f"| {name} | {warm:.0f} | {rps:.2f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
