"""CPU peers side by side: our engine on torch, OpenVINO and ONNX Runtime, and the one-line peers.

    python benchmarks/cpu_peers.py [--rounds 5] [--out benchmarks/results/cpu_peers.md]

One process, every system warm, requests interleaved in rounds (drift hits each alike), 1 query x
50 SciFact passages (``../shared/data/scifact``; the run.py word mix when absent) on a
cross-encoder of the MiniLM-L6 shape carrying the packaged all-MiniLM-L6-v2 encoder weights
(``testing.build_cross_encoder_from_encoder``). Rows:

* ``ours_default``: ``SharedRerankCompressor`` defaults (torch, dtype auto, our CPU kernels),
  and ``ours_torch_fp32`` (the same in float32);
* ``ours_openvino_{bf16,fp32,int8}``: ``backend="openvino-cross-encoder"`` (INT8: NNCF with the
  default calibration set, BF16 hint for the rest);
* ``ours_onnx``: ``backend="onnx-cross-encoder"`` (float32);
* ``openvino_st_batches``: the same OpenVINO IR (this model's, current format: attention fused,
  as optimum-intel's conversion of the torch model fuses it), BF16 hint, fed as
  sentence-transformers feeds
  ``CrossEncoder(backend="openvino")``: batches of 32 in input order, each padded to its longest.
  The real ``backend="openvino"`` needs optimum-intel, which is not in this venv (the row says so
  when it is missing and runs it when present);
* ``langchain_fp32``: LangChain's ``HuggingFaceCrossEncoder`` + ``CrossEncoderReranker`` (plain
  sentence-transformers CrossEncoder, FP32).

Quality: each of our modes' scores against the FP32 torch reference on the request's 50 pairs
(Spearman, tied scores sharing their average rank; max absolute error as a share of the FP32
score range). Threads: ``OMP_NUM_THREADS`` and ``RAG_RERANK_TORCH_THREADS`` are set to
``--threads`` (default: the usable cores) for every system, and the header says them. Prints a
markdown table and writes it with the CPU model and flags.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
SCIFACT = HERE.parent.parent / "shared" / "data" / "scifact"
sys.path.insert(0, str(HERE))

import run  # noqa: E402  (benchmarks/run.py: the anchors and request helpers)
from bench_common import pin_threads, spearman, threads_line  # noqa: E402


def cpu_line() -> str:
    flags: set[str] = set()
    model = platform.processor()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
            if line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
    except OSError:
        pass
    keep = sorted(f for f in flags if f.startswith(("amx", "avx512_bf16", "avx512_vnni", "avx2")))
    from rag_rerank_plugins._cpu import usable_cores

    return f"{model}, {usable_cores()} usable cores, flags: {' '.join(keep)}"


def scifact_passages(n: int) -> tuple[str, list[str]]:
    if not (SCIFACT / "corpus.jsonl").exists():
        return run.QUERY, run.mixed_passages(n, seed=2)
    from rag_rerank_plugins.testing import beir_pairs

    pairs = beir_pairs(SCIFACT, 1, n)
    return pairs[0][0], [p for _, p in pairs]


class StyleBatches:
    """sentence-transformers' way of feeding a runtime: fixed batches of 32 in input order,
    each padded to its own longest, through the same OpenVINO IR as ours."""

    def __init__(self, ir: Path, tokenizer_dir: Path) -> None:
        import openvino as ov
        from transformers import AutoTokenizer

        self.tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_dir))
        config = {"INFERENCE_PRECISION_HINT": "bf16", "PERFORMANCE_HINT": "LATENCY"}
        self.request = ov.Core().compile_model(str(ir), "CPU", config).create_infer_request()

    def score(self, query: str, passages: list[str]) -> list[float]:
        out: list[float] = []
        for start in range(0, len(passages), 32):
            chunk = passages[start : start + 32]
            feed = self.tokenizer(
                [query] * len(chunk), chunk, padding=True, truncation=True, return_tensors="np"
            )
            result = self.request.infer({k: v for k, v in feed.items()})
            out.extend(float(x) for x in result["scores"].reshape(len(chunk), -1)[:, 0])
        return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--models", type=Path, default=HERE / ".models")
    parser.add_argument("--out", type=Path, default=HERE / "results" / "cpu_peers.md")
    parser.add_argument(
        "--threads", type=int, help="compute threads for every system (default: usable cores)"
    )
    args = parser.parse_args(argv)
    pin_threads(args.threads)  # the same budget for ours and the peers, whatever was inherited

    import numpy as np
    import torch
    from sentence_transformers import CrossEncoder

    from rag_rerank_plugins import ModelPool, ModelSpec
    from rag_rerank_plugins.testing import build_cross_encoder_from_encoder

    model = args.models / "minilm-l6-real-ce"
    if not (model / "config.json").exists():
        build_cross_encoder_from_encoder(model)
    query, passages = scifact_passages(50)
    docs, nodes = run.as_docs(passages)
    reference = CrossEncoder(str(model), device="cpu", model_kwargs={"dtype": torch.float32})
    want = np.asarray(reference.predict([(query, p) for p in passages], batch_size=32))

    pool = ModelPool()
    cache = str(args.models / "export-cache")
    os.environ["RAG_RERANK_ONNX_CACHE"] = cache  # ONNX exports and OpenVINO IRs
    ov_opts: dict[str, Any] = {}
    ours = {  # name -> (backend, dtype, options)
        "ours_default": ("cross-encoder", "auto", {}),
        "ours_torch_fp32": ("cross-encoder", "float32", {}),
        "ours_openvino_bf16": ("openvino-cross-encoder", "bfloat16", ov_opts),
        "ours_openvino_fp32": ("openvino-cross-encoder", "float32", ov_opts),
        "ours_openvino_int8": (
            "openvino-cross-encoder",
            "bfloat16",
            {**ov_opts, "quantize": "int8"},
        ),
        "ours_onnx": ("onnx-cross-encoder", "float32", ov_opts),
    }
    systems: dict[str, Any] = {
        name: run.ours_factory(model, pool, backend=b, dtype=d, model_kwargs=o)()
        for name, (b, d, o) in ours.items()
    }
    systems["langchain_fp32"] = run.lc_anchor_factory(model)()
    for system in systems.values():  # warm-up (and the one-time exports)
        run.run_request(system, docs[:4], nodes[:4], query)
    ir = next(Path(cache).glob("ov-*")) if importlib.util.find_spec("openvino") else None
    optimum = importlib.util.find_spec("optimum") is not None
    style: StyleBatches | None = None
    if ir is not None:
        from rag_rerank_plugins.backends._openvino_common import FORMAT_VERSION

        def this_model(entry: Path) -> bool:  # this model's float IR in the current format
            meta = json.loads((entry / "meta.json").read_text())
            same = Path(meta["model"]).resolve() == model.resolve()
            return same and meta["ir"] != "int8" and meta.get("format") == FORMAT_VERSION

        irs = [p for p in Path(cache).glob("ov-*") if this_model(p)]
        style = StyleBatches(irs[0] / "model.xml", model)
        style.score(query, passages)
    times: dict[str, list[float]] = {name: [] for name in systems}
    if style is not None:
        times["openvino_st_batches"] = []
    for _ in range(args.rounds):
        for name, system in systems.items():
            t0 = time.perf_counter()
            run.run_request(system, docs, nodes, query)
            times[name].append(time.perf_counter() - t0)
        if style is not None:
            t0 = time.perf_counter()
            style.score(query, passages)
            times["openvino_st_batches"].append(time.perf_counter() - t0)

    quality: dict[str, tuple[float, float]] = {}
    span = float(np.ptp(want)) or 1.0
    pairs = [(query, p) for p in passages]
    for name, (backend, dtype, options) in ours.items():
        spec = ModelSpec(str(model), backend=backend, device="cpu", dtype=dtype, options=options)
        got = np.asarray(pool.score_pairs(spec, pairs))
        rho = spearman(got.tolist(), want.tolist())
        quality[name] = (rho, float(np.abs(got - want).max()) / span)
    stats = pool.stats()
    anchor = statistics.median(times["langchain_fp32"])
    lines = [
        f"CPU: {cpu_line()}",
        f"python {platform.python_version()}, {args.rounds} interleaved rounds, 1 x 50 "
        f"{'SciFact passages' if (SCIFACT / 'corpus.jsonl').exists() else 'mixed passages'}, "
        "MiniLM-L6 cross-encoder (packaged encoder weights, seeded head)",
        threads_line(),
        "sentence-transformers backend='openvino': "
        + (
            "optimum-intel installed"
            if optimum
            else "NOT run (optimum-intel is not installed "
            "here); openvino_st_batches stands in for it"
        ),
        "",
        "| system | median ms | vs LangChain FP32 | Spearman vs FP32 | max err / FP32 range |",
        "|---|---|---|---|---|",
    ]
    for name, ts in sorted(times.items(), key=lambda kv: statistics.median(kv[1])):
        med = statistics.median(ts)
        rho, err = quality.get(name, (float("nan"), float("nan")))
        q = f"{rho:.4f} | {err:.4f}" if name in quality else "reference-free | -"
        lines.append(f"| {name} | {med * 1000:.0f} | {anchor / med:.2f}x | {q} |")
    lines.append("")
    lines.append("kernels per spec (stats()):")
    for s in stats.values():
        lines.append(f"- {s['backend']} {s['dtype']}: {s['kernels']}")
    text = "\n".join(lines)
    print(text)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text + "\n", encoding="utf-8")
    raw = {k: [t * 1000 for t in v] for k, v in times.items()}
    args.out.with_suffix(".json").write_text(json.dumps(raw, indent=1), encoding="utf-8")
    pool.clear()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
