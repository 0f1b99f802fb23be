"""Worker processes starting together on a cold export cache: exports, wall time, memory.

    python benchmarks/cold_start_workers.py [--workers 4] [--backend openvino-cross-encoder]
        [--src PATH] [--out benchmarks/results/cold-start]

What a service sees when its workers (``gunicorn -w 4``, ``uvicorn --workers 4``) first load an
ONNX or OpenVINO model into a shared cache: each worker is started (torch and the runtime
imported), then all are released at once to load the model (MiniLM-L6 with the packaged
encoder's weights, as ``peers.py`` builds it; ``--shape xlmr``: XLM-R large, bge-reranker-v2-m3's
shape, random weights) and score 1 query x 20 SciFact passages. Reported:
wall time from the release to the last worker's scores, exports and IR conversions summed over
the workers, and the summed peak RSS of the workers (each one's ``ru_maxrss``: what the box must
hold when every worker peaks together). ``--src`` runs another checkout's ``src`` (a worktree of
an older commit) for a before/after in one run; ``--rounds`` alternates the checkouts.
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
SRC = HERE.parent / "src"

CHILD = textwrap.dedent(
    """
    import json, resource, sys, time
    sys.path.insert(0, sys.argv[1])
    from pathlib import Path
    import sentence_transformers, onnxruntime  # a started worker has its imports done
    from rag_rerank_plugins import ModelPool, ModelSpec
    from rag_rerank_plugins.backends import _onnx_common
    print("ready", flush=True)
    go = Path(sys.argv[2])
    while not go.exists():
        time.sleep(0.005)
    spec = ModelSpec(sys.argv[3], backend=sys.argv[4], dtype="float32",
                     options={"cache_dir": sys.argv[5]})
    query, passages = json.loads(sys.argv[6])
    scores = ModelPool().score_pairs(spec, [(query, p) for p in passages])
    converted = 0
    if "openvino" in sys.argv[4]:
        from rag_rerank_plugins.backends import _openvino_common
        converted = _openvino_common.build_count()
    print(json.dumps({"done": time.time(), "exports": _onnx_common.export_count(),
                      "converted": converted, "max_rss_mb": resource.getrusage(
                          resource.RUSAGE_SELF).ru_maxrss / 1024, "top": max(scores)}), flush=True)
    """
)


def one_start(src: Path, model: Path, backend: str, workers: int, request: Any) -> dict[str, Any]:
    """One cold start of ``workers`` processes on a fresh cache; the figures above."""
    work = Path(tempfile.mkdtemp(prefix="cold-start-"))
    go, cache = work / "go", work / "cache"
    try:
        children = [
            subprocess.Popen(
                [
                    sys.executable,
                    "-c",
                    CHILD,
                    str(src),
                    str(go),
                    str(model),
                    backend,
                    str(cache),
                    json.dumps(request),
                ],
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
            for _ in range(workers)
        ]
        for child in children:
            assert child.stdout is not None
            if child.stdout.readline().strip() != "ready":
                raise RuntimeError(child.communicate()[1][-2000:])
        started = time.time()
        go.touch()
        reports = []
        for child in children:
            out, err = child.communicate(timeout=1800)
            if child.returncode != 0:
                raise RuntimeError(err[-2000:])
            reports.append(json.loads(out.strip().splitlines()[-1]))
        return {
            "wall_s": max(r["done"] for r in reports) - started,
            "exports": sum(r["exports"] for r in reports),
            "converted": sum(r["converted"] for r in reports),
            "rss_sum_mb": sum(r["max_rss_mb"] for r in reports),
            "rss_max_mb": max(r["max_rss_mb"] for r in reports),
            "same_top": len({round(r["top"], 4) for r in reports}) == 1,
        }
    finally:
        shutil.rmtree(work, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--workers", type=int, default=4)
    parser.add_argument("--backend", default="openvino-cross-encoder")
    parser.add_argument("--src", type=Path, action="append", help="checkouts' src folders")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--shape", choices=("minilm", "xlmr"), default="minilm")
    parser.add_argument("--models", type=Path, default=HERE / ".models")
    parser.add_argument("--out", type=Path, default=HERE / "results" / "cold-start")
    args = parser.parse_args(argv)
    sys.path.insert(0, str(HERE))
    sys.path.insert(0, str(SRC))
    from cpu_peers import cpu_line
    from peers import model_for, request_for

    model = model_for(args.shape, args.models)
    query, passages = request_for(args.shape)
    request = [query, passages[:20]]
    srcs = args.src or [SRC]
    rows: dict[str, list[dict[str, Any]]] = {str(s): [] for s in srcs}
    for _ in range(args.rounds):
        for src in srcs:
            got = one_start(src, model, args.backend, args.workers, request)
            print(src, got, flush=True)
            rows[str(src)].append(got)
    lines = [
        f"CPU: {cpu_line()}",
        f"python {platform.python_version()}, {args.workers} workers, {args.backend}, "
        f"{model.name}, 1 x 20 SciFact, {args.rounds} alternating rounds, cold cache each; "
        "src /tmp/oldtree/src is a worktree of the commit before the build lock",
        "",
        "| src | round | wall s | exports | IR conversions | sum of peak RSS MB | "
        "largest peak RSS MB | same scores |",
        "|---|---:|---:|---:|---:|---:|---:|---|",
    ]
    for src, got in rows.items():
        for i, r in enumerate(got, 1):
            lines.append(
                f"| {src} | {i} | {r['wall_s']:.1f} | {r['exports']} | {r['converted']} | "
                f"{r['rss_sum_mb']:.0f} | {r['rss_max_mb']:.0f} | {r['same_top']} |"
            )
    text = "\n".join(lines)
    print(text)
    args.out.mkdir(parents=True, exist_ok=True)
    name = f"{args.backend}-{args.shape}-{args.workers}-workers"
    (args.out / f"{name}.md").write_text(text + "\n", encoding="utf-8")
    (args.out / f"{name}.json").write_text(json.dumps(rows, indent=1), encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
