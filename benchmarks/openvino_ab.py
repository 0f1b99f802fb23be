"""OpenVINO under our engine, variants A/B in one process (issue 22).

    python benchmarks/openvino_ab.py [--rounds 7] [--dtype bfloat16] [--variants a,b,...]
        [--shape minilm|xlmr]

Every variant is warm and requests alternate between them round by round, so drift on a shared
machine hits each alike: compare the ratios inside one run, not the absolute times. The request
is cpu_peers.py's: 1 query x 50 SciFact passages (``../shared/data/scifact``; run.py's word mix
when absent) on the MiniLM-L6-shaped cross-encoder carrying the packaged all-MiniLM-L6-v2 encoder
weights; ``--shape xlmr``: 1 x 20 on the XLM-R large shape (bge-reranker-v2-m3's, random
weights, run.py's folder). Each of our variants has a pool of its own, loaded under its settings:

* ``ov_before``: the IR as converted before issue 22 (attention left as the ONNX export spells
  it), ``PERFORMANCE_HINT`` LATENCY, one pass at a time (the engine's single device worker);
* ``ov_fused_seq``: attention fused (``_openvino_common.fuse_attention``), one pass at a time;
* ``ov_fused_lat_par``: fused, LATENCY (one stream), passes in the engine's parallel CPU device
  workers;
* ``ov_fused_tput``: fused, parallel, THROUGHPUT with one single-threaded stream per core, a lone
  pass split over the streams (the default now); ``ov_fused_tput_nopin``: the same,
  ``ENABLE_CPU_PINNING`` off;
* ``torch_default``: our default (``cross-encoder``, dtype auto);
* ``st32_old_ir`` / ``st32_fused_ir``: an IR fed as sentence-transformers feeds
  ``CrossEncoder(backend="openvino")``: batches of 32 in input order, each padded to its longest
  (cpu_peers.StyleBatches; optimum-intel, which the real one needs, is not in this venv). The
  real one converts the torch model with OpenVINO's PyTorch frontend, which fuses attention, so
  ``st32_fused_ir`` is the fairer stand-in.

Quality: Spearman and max error / FP32 score range of each of our variants against
``CrossEncoder.predict`` in FP32 on the request's pairs.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import cpu_peers  # noqa: E402  (the request, the CPU line and the ST-style feeder)
from bench_common import pin_threads, spearman, threads_line  # noqa: E402

#: variant -> (fuse attention, PERFORMANCE_HINT, parallel passes, extra compile settings)
OURS: dict[str, tuple[bool, str, bool, dict[str, Any]]] = {
    "ov_before": (False, "LATENCY", False, {}),
    "ov_fused_seq": (True, "LATENCY", False, {}),
    "ov_fused_lat_par": (True, "LATENCY", True, {}),
    "ov_fused_tput": (True, "THROUGHPUT", True, {}),
    "ov_fused_tput_nopin": (True, "THROUGHPUT", True, {"ENABLE_CPU_PINNING": False}),
}
OTHERS = ("torch_default", "st32_old_ir", "st32_fused_ir")


@contextlib.contextmanager
def settings(fuse: bool, hint: str, parallel: bool, extra: dict[str, Any]) -> Iterator[None]:
    """Load under one variant's settings. The unfused IR keeps format 1 (its cache key then is
    the one from before issue 22), so both IRs live side by side in the cache."""
    from rag_rerank_plugins.backends import _openvino_common as common

    saved = (common.FORMAT_VERSION, common.fuse_attention, common.compile_config)
    saved_hint, saved_parallel = common.PERFORMANCE_HINT, common.PARALLEL_PASSES
    config = common.compile_config
    try:
        if not fuse:
            common.FORMAT_VERSION = 1
            common.fuse_attention = lambda model: 0  # type: ignore[assignment]
        common.PERFORMANCE_HINT = hint
        common.PARALLEL_PASSES = parallel
        # The same signature as compile_config(dtype, threads, user): the loader passes the
        # user's own settings third, and a narrower lambda made every OpenVINO variant crash.
        common.compile_config = lambda d, t, user=None: {  # type: ignore[assignment]
            **config(d, t, user),
            **extra,
        }
        yield
    finally:
        common.FORMAT_VERSION, common.fuse_attention, common.compile_config = saved
        common.PERFORMANCE_HINT, common.PARALLEL_PASSES = saved_hint, saved_parallel


def style_batches(ir: Path, tokenizer_dir: Path, dtype: str) -> Any:
    """cpu_peers.StyleBatches with this run's precision hint (its own compiles BF16)."""
    import openvino as ov
    from transformers import AutoTokenizer

    style = cpu_peers.StyleBatches.__new__(cpu_peers.StyleBatches)
    style.tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    hint = "bf16" if dtype == "bfloat16" else "f32"
    config = {"INFERENCE_PRECISION_HINT": hint, "PERFORMANCE_HINT": "LATENCY"}
    style.request = ov.Core().compile_model(str(ir), "CPU", config).create_infer_request()
    return style


def ir_of(pool: Any, spec: Any) -> Path:
    return Path(pool.get(spec).model.entry) / "model.xml"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    parser.add_argument("--variants", default=",".join([*OURS, *OTHERS]))
    parser.add_argument("--models", type=Path, default=HERE / ".models")
    parser.add_argument("--shape", default="minilm", choices=["minilm", "xlmr"])
    parser.add_argument(
        "--threads", type=int, help="compute threads for every variant (default: usable cores)"
    )
    args = parser.parse_args(argv)
    pin_threads(args.threads)
    chosen = [v.strip() for v in args.variants.split(",") if v.strip()]

    import numpy as np
    import torch
    from sentence_transformers import CrossEncoder

    from rag_rerank_plugins import ModelPool, ModelSpec
    from rag_rerank_plugins.testing import build_cross_encoder_from_encoder

    if args.shape == "minilm":
        model = args.models / "minilm-l6-real-ce"
        if not (model / "config.json").exists():
            build_cross_encoder_from_encoder(model)
    else:
        from run import _build_xlmr_large

        model = args.models / "xlmr-large-ce"  # the same folder as run.py's and peers.py's
        if not (model / "config.json").exists():
            _build_xlmr_large(model)
    os.environ["RAG_RERANK_ONNX_CACHE"] = str(args.models / "export-cache")
    query, passages = cpu_peers.scifact_passages(50 if args.shape == "minilm" else 20)
    pairs = [(query, p) for p in passages]
    reference = CrossEncoder(str(model), device="cpu", model_kwargs={"dtype": torch.float32})
    want = np.asarray(reference.predict(pairs, batch_size=32))
    del reference

    ov_spec = ModelSpec(str(model), backend="openvino-cross-encoder", dtype=args.dtype)
    systems: dict[str, Callable[[], list[float]]] = {}
    pools: dict[str, Any] = {}
    irs: dict[bool, Path] = {}
    for name in chosen:
        if name in OURS:
            fuse, hint, parallel, extra = OURS[name]
            pool = pools[name] = ModelPool()
            with settings(fuse, hint, parallel, extra):
                pool.score_pairs(ov_spec, pairs[:4])  # load (and convert) under the settings
            irs.setdefault(fuse, ir_of(pool, ov_spec))
            systems[name] = lambda pool=pool: pool.score_pairs(ov_spec, pairs)
        elif name == "torch_default":
            pool = pools[name] = ModelPool()
            spec = ModelSpec(str(model), backend="cross-encoder")
            systems[name] = lambda pool=pool, spec=spec: pool.score_pairs(spec, pairs)
    for name in chosen:
        if name.startswith("st32_"):
            fused = name == "st32_fused_ir"
            if fused not in irs:
                pool = ModelPool()
                with settings(fused, "LATENCY", False, {}):
                    pool.score_pairs(ov_spec, pairs[:4])
                irs[fused] = ir_of(pool, ov_spec)
                pool.clear()
            style = style_batches(irs[fused], model, args.dtype)
            systems[name] = lambda style=style: style.score(query, passages)
    quality: dict[str, tuple[float, float]] = {}
    span = float(np.ptp(want)) or 1.0
    for name, system in systems.items():
        got = np.asarray(system())  # warm-up, and the scores
        if name in OURS or name == "torch_default":
            rho = spearman(got.tolist(), want.tolist())
            quality[name] = (rho, float(np.abs(got - want).max()) / span)
    times: dict[str, list[float]] = {name: [] for name in systems}
    for _ in range(args.rounds):
        for name, system in systems.items():
            start = time.perf_counter()
            system()
            times[name].append(time.perf_counter() - start)

    first = statistics.median(next(iter(times.values())))
    lines = [
        f"CPU: {cpu_peers.cpu_line()}",
        f"{args.rounds} interleaved rounds, {args.shape}, 1 x {len(passages)} passages, "
        f"{args.dtype}, "
        f"load average at the end {os.getloadavg()[0]:.2f}",
        threads_line(),
        "",
        f"| variant | median ms | speed vs {next(iter(times))} | Spearman vs FP32 "
        "| max err / FP32 range | all ms |",
        "|---|---|---|---|---|---|",
    ]
    for name, ts in times.items():
        med = statistics.median(ts)
        rho, err = quality.get(name, (float("nan"), float("nan")))
        q = f"{rho:.4f} | {err:.4f}" if name in quality else "- | -"
        every = " ".join(f"{t * 1000:.0f}" for t in ts)
        lines.append(f"| {name} | {med * 1000:.0f} | {first / med:.2f}x | {q} | {every} |")
    lines.append("")
    for name, pool in pools.items():
        for stats in pool.stats().values():
            lines.append(f"- {name}: {stats['kernels']}")
    print("\n".join(lines))
    for pool in pools.values():
        pool.clear()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
