"""Issue 21 (symptom 8): does a CPU reranker's memory reach a plateau on varied traffic?

Sequential reranks of ``--per-request`` passages (SciFact: each test claim with its best
word-overlap passages, so every request differs) on the default CPU path, with a MiniLM-L6-shaped
cross-encoder (``build_cross_encoder_from_encoder``: the packaged all-MiniLM-L6-v2 encoder, a
seeded head). Each configuration runs in a fresh process and reports:

* RSS before the model is loaded (torch, transformers and the data already imported), after
  the first third of the requests and after the last, and after ``pool.release()`` + gc +
  ``malloc_trim`` (the goals: last within 5 % of the first third, released within 10 % of
  before);
* median milliseconds per request, and the distinct pass shapes (``[items, length]``) the model
  saw.

Configurations: shape buckets on (the default) and off (``RAG_RERANK_SHAPE_BUCKETS=0``: passes
padded to their own longest item, as before), under the BF16 policy when the CPU has native BF16
and under ``RAG_RERANK_CPU_BF16=0`` (float32). Separate processes run at different moments of a
shared machine's load, so speed is also compared in one process: ``--ab`` requests alternate
between buckets on and off, and the medians of each are printed side by side.

    python benchmarks/memory_plateau.py                        # 300 requests per configuration
    python benchmarks/memory_plateau.py --requests 90 --dtypes float32 --no-ab
    python benchmarks/memory_plateau.py --no-buckets           # only the unbucketed runs

tests/test_memory_plateau.py runs a reduced form (synthetic passages) through :func:`run_child`.

Measured (2-core Xeon with AMX, torch 2.13, 300 requests; RSS in MiB, before load -> after 100
-> after 300 -> after release; "off" is the code before issue 21):

* BF16 on:  530 -> 801 -> 822 (+2.7 %, +0 MiB over the last 100) -> 694 (+31 %), 26 shapes
* BF16 off: 530 -> 2134 -> 2837 (+33 %, +169 MiB) -> 1182 (+123 %), 498 shapes
* FP32 on:  530 -> 827 -> 837 (+1.3 %, +0 MiB) -> 633 (+20 %), 25 shapes
* FP32 off: 531 -> 1399 -> 1958 (+40 %, +212 MiB) -> 975 (+84 %), 501 shapes
* a second BF16 run: on 530 -> 766 -> 805 (+5.2 %, +1 MiB), off 530 -> 2161 -> 2897 (+34 %);
* speed, alternating in one process: BF16 596 and 608 ms per request on vs 638 and 648 off;
  FP32 997 vs 995. Separate processes on a quiet machine (new shapes also pay compilation):
  BF16 514 ms on vs 742 off.

After ``release()`` (issue 21): oneDNN's process-wide kernel cache is emptied and glibc trims
its thread arenas when the pool's last CPU model goes (``_onednn``, ``_memory.release_window``):
BF16 and FP32 both released to 565 MiB against 531 before the load (+6.5 %; was +31 % and
+20 %), same 300 requests (growth over the last 100: +0 and +12 MiB).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
SCIFACT = HERE.parent / ".." / "shared" / "data" / "scifact"
MIB = 1024 * 1024
PLATEAU_GOAL = 0.05  # last third vs first third
RELEASE_GOAL = 0.10  # after release vs before load

Request = list[tuple[str, str]]
WORDS = [
    *("cell", "protein", "gene", "expression", "patients", "study", "results", "treatment"),
    *("increased", "risk", "effect", "analysis", "clinical", "disease", "associated", "levels"),
    *("cancer", "mice", "data", "model", "response", "factor", "human", "activity", "role"),
    *("function", "specific", "significant", "reduced", "tissue", "blood", "cohort", "trial"),
]


def cpu_summary() -> str:
    """CPU model, the flags that pick the kernels, and the cores this process may use."""
    from rag_rerank_plugins._cpu import usable_cores

    model, flags = "unknown CPU", set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name":
                model = value.strip()
            elif key.strip() == "flags":
                flags = set(value.split())
    except OSError:
        pass
    wanted = ("avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile", "amx_int8")
    shown = " ".join(f"{f}={'yes' if f in flags else 'no'}" for f in wanted)
    return f"{model}; {shown}; usable cores {usable_cores()}"


def scifact_requests(folder: Path, count: int, per_request: int) -> list[Request]:
    """``count`` requests, one per SciFact test claim, each with its ``per_request`` passages."""
    from rag_rerank_plugins.testing import beir_pairs

    pairs = beir_pairs(folder, count, per_request)
    requests = [pairs[i : i + per_request] for i in range(0, len(pairs), per_request)]
    if len(requests) < count:  # SciFact has 300 test claims: cycle with a shifted passage order
        base = list(requests)
        while len(requests) < count:
            shift = len(requests) // len(base)
            r = base[len(requests) % len(base)]
            requests.append(r[shift % len(r) :] + r[: shift % len(r)])
    return requests


def synthetic_requests(
    count: int, per_request: int, seed: int = 0, max_words: int = 350
) -> list[Request]:
    """Requests of seeded random English-like passages of 20-``max_words`` words (no data)."""
    rng = random.Random(seed)
    requests = []
    for _ in range(count):
        query = " ".join(rng.choices(WORDS, k=rng.randint(6, 16)))
        passages = [
            " ".join(rng.choices(WORDS, k=rng.randint(20, max_words))) for _ in range(per_request)
        ]
        requests.append([(query, p) for p in passages])
    return requests


def _count_shapes(model: Any, shapes: set[tuple[int, ...]]) -> None:
    """Record the ``input_ids`` shape of every pass the loaded model prepares."""
    prepare = model.prepare

    def counting(task: Any, items: Any) -> Any:
        prepared = prepare(task, items)
        payload = prepared.payload
        ids = payload.get("input_ids") if hasattr(payload, "get") else None
        if ids is not None:
            shapes.add(tuple(ids.shape))
        return prepared

    model.prepare = counting


def run(model_path: str, requests: list[Request], buckets: bool) -> dict[str, Any]:
    """One configuration in this process (meant to be a fresh one): RSS and timings."""
    os.environ["RAG_RERANK_SHAPE_BUCKETS"] = "1" if buckets else "0"
    import sentence_transformers  # noqa: F401  (libraries resident before the baseline)
    import torch  # noqa: F401
    import transformers  # noqa: F401

    from rag_rerank_plugins import ModelPool, ModelSpec
    from rag_rerank_plugins._memory import free_memory, rss_bytes

    free_memory()
    before = rss_bytes()
    pool = ModelPool()
    spec = ModelSpec(model_path, backend="cross-encoder", device="cpu", dtype="auto")
    handle = pool.preload(spec)[0]
    shapes: set[tuple[int, ...]] = set()
    _count_shapes(handle.model, shapes)
    loaded = rss_bytes()
    third = max(1, len(requests) // 3)
    times, marks = [], {}
    for i, request in enumerate(requests, 1):
        start = time.perf_counter()
        pool.score_pairs(spec, request)
        times.append(time.perf_counter() - start)
        if i in (third, len(requests) - third, len(requests)):
            marks[i] = rss_bytes()
    dtype = pool.spec_stats(spec)["dtype"]
    pool.release(spec)
    del handle
    free_memory()
    released = rss_bytes()
    first, last = marks[third], marks[len(requests)]
    return {
        "buckets": buckets,
        "dtype": dtype,
        "requests": len(requests),
        "third": third,
        "rss_before_mib": before / MIB,
        "rss_loaded_mib": loaded / MIB,
        "rss_first_third_mib": first / MIB,
        "rss_last_mib": last / MIB,
        "growth_last_third": (last - marks[len(requests) - third]) / MIB,
        "plateau_ratio": last / first - 1,
        "rss_released_mib": released / MIB,
        "release_ratio": released / before - 1,
        "median_ms": 1000 * statistics.median(times),
        "median_ms_last_third": 1000 * statistics.median(times[-third:]),
        "shapes": len(shapes),
    }


def run_ab(model_path: str, requests: list[Request]) -> dict[str, float]:
    """Speed of buckets on vs off in one process: requests alternate between the two."""
    from rag_rerank_plugins import ModelPool, ModelSpec

    pool = ModelPool()
    spec = ModelSpec(model_path, backend="cross-encoder", device="cpu", dtype="auto")
    pool.preload(spec)
    times: dict[str, list[float]] = {"on": [], "off": []}
    for i, request in enumerate(requests):
        mode = "on" if i % 2 == 0 else "off"
        os.environ["RAG_RERANK_SHAPE_BUCKETS"] = "1" if mode == "on" else "0"
        start = time.perf_counter()
        pool.score_pairs(spec, request)
        times[mode].append(time.perf_counter() - start)
    pool.clear()
    return {f"median_ms_{k}": 1000 * statistics.median(v) for k, v in times.items()}


def run_child(
    model_path: str,
    *,
    buckets: bool,
    bf16: bool,
    requests: int,
    per_request: int,
    data: Path | None,
    ab: bool = False,
    short: bool = False,
    timeout: float | None = None,
) -> dict[str, Any]:
    """:func:`run` (or :func:`run_ab`) in a fresh Python process; its result as a dict."""
    env = dict(os.environ, RAG_RERANK_CPU_BF16="1" if bf16 else "0", TOKENIZERS_PARALLELISM="false")
    command = [
        sys.executable,
        str(Path(__file__).resolve()),
        "--child",
        "--model",
        model_path,
        "--requests",
        str(requests),
        "--per-request",
        str(per_request),
        "--data",
        str(data) if data is not None else "",
    ]
    if not buckets:
        command.append("--no-buckets")
    if ab:
        command.append("--ab")
    if short:
        command.append("--short")
    out = subprocess.run(
        command, env=env, capture_output=True, text=True, timeout=timeout, check=False
    )
    if out.returncode != 0:
        raise RuntimeError(f"child failed ({out.returncode}):\n{out.stderr[-4000:]}")
    result: dict[str, Any] = json.loads(out.stdout.strip().splitlines()[-1])
    return result


def shortened(requests: list[Request], seed: int = 0) -> list[Request]:
    """The same requests with each passage cut to its first 8-60 words (seeded): short chunks,
    many to a pass, where the batch size varies more than the length."""
    rng = random.Random(seed)
    return [[(q, " ".join(p.split()[: rng.randint(8, 60)])) for q, p in r] for r in requests]


def _requests(args: argparse.Namespace) -> list[Request]:
    data = Path(args.data) if args.data else None
    if data is not None and (data / "corpus.jsonl").exists():
        requests = scifact_requests(data, args.requests, args.per_request)
    else:
        requests = synthetic_requests(args.requests, args.per_request)
    return shortened(requests) if args.short else requests


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=300)
    parser.add_argument("--per-request", type=int, default=20)
    parser.add_argument("--data", default=str(SCIFACT), help="SciFact (BEIR); '' = synthetic")
    parser.add_argument("--short", action="store_true", help="passages cut to 8-60 words")
    parser.add_argument("--model", help="a cross-encoder folder (default: build the MiniLM one)")
    parser.add_argument("--dtypes", default="auto,float32", help="auto (BF16 policy), float32")
    parser.add_argument("--no-buckets", action="store_true", help="only the unbucketed runs")
    parser.add_argument("--buckets-only", action="store_true", help="only the bucketed runs")
    parser.add_argument("--no-ab", action="store_true", help="skip the one-process speed A/B")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--ab", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.child:
        requests = _requests(args)
        if args.ab:
            print(json.dumps(run_ab(args.model, requests)))
        else:
            print(json.dumps(run(args.model, requests, buckets=not args.no_buckets)))
        return

    from rag_rerank_plugins.policy import cpu_has_native_bf16

    model = args.model
    if model is None:
        from rag_rerank_plugins.testing import build_cross_encoder_from_encoder

        folder = Path(tempfile.mkdtemp(prefix="memory-plateau-")) / "real-ce"
        model = str(build_cross_encoder_from_encoder(folder))
    data = Path(args.data) if args.data else None
    source = "SciFact" if data and (data / "corpus.jsonl").exists() else "synthetic passages"
    source += " (cut to 8-60 words)" if args.short else ""
    native = os.environ.get("RAG_RERANK_CPU_BF16") != "0" and cpu_has_native_bf16()
    print(f"CPU: {cpu_summary()}")
    print(f"{args.requests} sequential requests x {args.per_request} {source}, MiniLM-L6 CE\n")
    modes = [
        m for m in (True, False) if not ((m and args.no_buckets) or (not m and args.buckets_only))
    ]
    rows, ab_rows = [], []
    for dtype in args.dtypes.split(","):
        bf16 = dtype == "auto" and native
        if dtype == "auto" and not native:
            print("no native BF16 here: the auto policy is float32; running float32 only")
            if "float32" in args.dtypes:
                continue
        for buckets in modes:
            r = run_child(
                model,
                buckets=buckets,
                bf16=bf16,
                requests=args.requests,
                per_request=args.per_request,
                data=data,
                short=args.short,
            )
            rows.append(r)
            print(json.dumps(r), file=sys.stderr)
        if not args.no_ab and len(modes) == 2:
            ab = run_child(
                model,
                buckets=True,
                bf16=bf16,
                requests=min(args.requests, 200),
                per_request=args.per_request,
                data=data,
                ab=True,
                short=args.short,
            )
            ab_rows.append(("bfloat16" if bf16 else "float32", ab))
    t = rows[0]["third"] if rows else 0
    n = rows[0]["requests"] if rows else 0
    print(
        f"| dtype | buckets | before load | after {t} | after {n} | growth | last {t} | "
        f"released | vs before | median ms | shapes |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['dtype']} | {'on' if r['buckets'] else 'off'} | {r['rss_before_mib']:.0f} | "
            f"{r['rss_first_third_mib']:.0f} | {r['rss_last_mib']:.0f} | "
            f"{100 * r['plateau_ratio']:+.1f} % | {r['growth_last_third']:+.0f} MiB | "
            f"{r['rss_released_mib']:.0f} | {100 * r['release_ratio']:+.1f} % | "
            f"{r['median_ms']:.0f} | {r['shapes']} |"
        )
    print(
        "\nRSS in MiB. Goals: growth (after last vs after first third) within "
        f"{100 * PLATEAU_GOAL:.0f} %, released within {100 * RELEASE_GOAL:.0f} % of before load."
    )
    for dtype, ab in ab_rows:
        print(
            f"one process, alternating requests, {dtype}: buckets on {ab['median_ms_on']:.0f} ms, "
            f"off {ab['median_ms_off']:.0f} ms (median per request)"
        )


if __name__ == "__main__":
    main()
