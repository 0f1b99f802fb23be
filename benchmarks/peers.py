"""CPU peers harness: every system warm in its own process and venv, requests interleaved.

    bash scripts/setup-peers        # once: .venv-peers (sentence-transformers + optimum-intel/onnx)
    python benchmarks/peers.py [--shape minilm|xlmr] [--rounds 5] [--systems a,b,c]

benchmarks/cpu_peers.py runs everything in one process, so it cannot run the real
sentence-transformers ``backend="onnx"``/``"openvino"`` peers: optimum-intel and optimum-onnx pin
transformers below 5, and .venv has transformers 5. Here each system is a child
(benchmarks/peer_worker.py) in its own venv: ours, LangChain and LlamaIndex under this Python
(.venv), the sentence-transformers peers, FlashRank and fastembed (both on the
sentence-transformers ONNX exports, loaded from local folders) under ``.venv-peers/bin/python``
(``RAG_RERANK_PEERS_VENV``). Each child loads its model and warms up (2 requests), then every
round sends the SAME request to each system in turn (drift hits each alike); the child times the
user's one call and returns the scores. Quality: Spearman and max abs error as a % of the score
range against the FP32 torch reference (plain sentence-transformers, float32) on the same request
(tied scores share their average rank). Threads: every child gets the same ``OMP_NUM_THREADS``
and ``RAG_RERANK_TORCH_THREADS`` (``--threads``, default the usable cores, whatever the shell
set), and the report's header says them with each system's ``torch.get_num_threads()``.
A system whose venv or library is missing, or that fails to load, is a row saying why. Every
child is killed on exit (and dies with this process: PR_SET_PDEATHSIG).

Shapes: ``minilm`` (default): 1 query x 50 SciFact passages on a MiniLM-L6 cross-encoder with the
packaged encoder weights; ``xlmr``: 1 x 20 on XLM-R large (bge-reranker-v2-m3's shape, random
weights, run.py's builder), slow: pick systems with ``--systems``. Writes
``benchmarks/results/peers_<shape>.md`` and ``.json``. CI does not run it.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import json
import os
import platform
import queue
import signal
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
WORKER = HERE / "peer_worker.py"
sys.path.insert(0, str(HERE))

from bench_common import pin_threads, spearman, threads_line  # noqa: E402

OURS = (
    "ours_default",
    "ours_fp32",
    "ours_openvino_bf16",
    "ours_openvino_fp32",
    "ours_openvino_int8",
    "ours_onnx",
    "ours_openvino_st_ir",  # st_openvino's own IR under our engine (after st_openvino in a run)
)
STOCK = ("langchain", "llamaindex")
ST_PEERS = (
    "st_onnx",
    "st_onnx_qint8",
    "st_openvino",
    "st_openvino_fp32",
    "st_openvino_bf16",
    "st_openvino_int8",
)
#: Offline CPU rerankers on ONNX Runtime, fed the sentence-transformers ONNX exports (.venv-peers).
ORT_PEERS = ("flashrank", "flashrank_qint8", "fastembed")
ALL = (*OURS, *STOCK, *ST_PEERS, *ORT_PEERS)
XLMR_DEFAULT = ("ours_default", "ours_openvino_bf16", "st_openvino", "langchain")
ANCHOR = "langchain"
XLMR_NOTE = (
    "xlmr: the st_* rows' quality is not precision: optimum exports XLM-R without a "
    "token_type_ids input, while this random model (BERT tokenizer, type_vocab_size 2) uses "
    "them; a real XLM-R reranker (bge-reranker-v2-m3) has no token types, so speed compares."
)


def peers_python() -> Path:
    venv = Path(os.environ.get("RAG_RERANK_PEERS_VENV", ROOT / ".venv-peers"))
    return (venv if venv.is_absolute() else ROOT / venv) / "bin" / "python"


def _die_with_parent() -> None:  # runs in the child before exec (Linux; elsewhere a no-op)
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


class Child:
    """One system in its own process: JSON lines over stdin/stdout, stderr to a log file."""

    def __init__(self, name: str, python: Path, model: Path, work: Path, timeout: float) -> None:
        self.name, self.timeout = name, timeout
        self.log = work / "logs" / f"{name}.log"
        self.log.parent.mkdir(parents=True, exist_ok=True)
        env = {
            **os.environ,
            "HF_HUB_OFFLINE": "1",
            "HF_DATASETS_OFFLINE": "1",
            "TRANSFORMERS_OFFLINE": "1",
            "TOKENIZERS_PARALLELISM": "false",
            "RAG_RERANK_ONNX_CACHE": str(HERE / ".models" / "export-cache"),
        }
        with self.log.open("wb") as err:
            self.proc = subprocess.Popen(
                [str(python), str(WORKER), name, str(model), str(work)],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=err,
                env=env,
                text=True,
                preexec_fn=_die_with_parent,
            )
        self.lines: queue.Queue[str | None] = queue.Queue()
        threading.Thread(target=self._pump, daemon=True).start()

    def _pump(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.put(line)
        self.lines.put(None)

    def receive(self, timeout: float | None = None) -> dict[str, Any]:
        try:
            line = self.lines.get(timeout=timeout or self.timeout)
        except queue.Empty:
            return {"error": f"no answer within {timeout or self.timeout:.0f} s"}
        if line is None:
            tail = self.log.read_text(errors="replace").strip().splitlines()[-1:] or [""]
            return {"error": f"exited (rc {self.proc.wait()}): {tail[0][:200]}"}
        return dict(json.loads(line))

    def ask(self, query: str, passages: list[str]) -> dict[str, Any]:
        assert self.proc.stdin is not None
        try:
            self.proc.stdin.write(json.dumps({"query": query, "passages": passages}) + "\n")
            self.proc.stdin.flush()
        except (BrokenPipeError, OSError) as exc:
            return {"error": f"child gone: {exc}"}
        return self.receive()

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()


def max_err_pct(got: list[float], want: list[float]) -> float:
    import numpy as np

    w = np.asarray(want, dtype=float)
    span = float(np.ptp(w)) or 1.0
    return 100.0 * float(np.abs(np.asarray(got, dtype=float) - w).max()) / span


def python_for(name: str) -> tuple[Path | None, str]:
    if name in ST_PEERS or name in ORT_PEERS:
        python = peers_python()
        if not python.exists():
            return None, f"not available: {python.parent.parent} missing (bash scripts/setup-peers)"
        return python, ""
    return Path(sys.executable), ""


def request_for(shape: str) -> tuple[str, list[str]]:
    from cpu_peers import scifact_passages

    return scifact_passages(50 if shape == "minilm" else 20)


def model_for(shape: str, models: Path) -> Path:
    if shape == "minilm":
        from rag_rerank_plugins.testing import build_cross_encoder_from_encoder

        path = models / "minilm-l6-real-ce"  # the same model (and exports) as cpu_peers.py
        if not (path / "config.json").exists():
            build_cross_encoder_from_encoder(path)
        return path
    from run import _build_xlmr_large

    path = models / "xlmr-large-ce"  # the same folder as run.py's build_models
    if not (path / "config.json").exists():
        _build_xlmr_large(path)
    return path


def write_calibration(work: Path, n: int = 300) -> None:
    """The local calibration set for the OpenVINO static INT8 export (the ST helper's default
    downloads glue/sst2 from the hub; nothing may be downloaded here)."""
    from cpu_peers import scifact_passages

    path = work / "calib" / "train.jsonl"
    if path.exists():
        return
    _, passages = scifact_passages(n)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps({"sentence": p}) + "\n" for p in passages))


def run_systems(
    names: list[str],
    model: Path,
    work: Path,
    query: str,
    passages: list[str],
    rounds: int,
    warmup: int = 2,
    gap_s: float = 0.1,
    load_timeout: float = 1800.0,
) -> dict[str, dict[str, Any]]:
    """Load each system in its own child (one at a time), warm it, then time interleaved rounds.

    Returns name -> {"ms": [...], "scores": [...], "versions": {...}, "runtime": str,
    "construct_s": float, "load_s": float, "torch_threads": int | None} or {"error": "..."}.
    ``load_s`` runs from the child's start of loading to its first answer: our adapters load the
    model lazily, on the first call, so the construction alone (``construct_s``) says nothing
    of their load. The first call may take up to ``load_timeout``; later ones up to 20x
    ``load_s`` (at least 120 s). ``reference_fp32`` may be among ``names``: it is asked once,
    untimed, and closed first.
    """
    rows: dict[str, dict[str, Any]] = {}
    children: dict[str, Child] = {}
    try:
        for name in names:
            python, why = python_for(name)
            if python is None:
                rows[name] = {"error": why}
                continue
            child = Child(name, python, model, work, load_timeout)
            ready = child.receive()
            if "error" in ready:
                rows[name] = {"error": ready["error"]}
                child.close()
                continue
            t0 = time.perf_counter()
            answer = child.ask(query, passages)  # the real load for lazy systems: load_timeout
            load_s = ready["load_s"] + time.perf_counter() - t0
            child.timeout = max(120.0, 20 * load_s)
            for _ in range(1, 1 if name == "reference_fp32" else warmup):
                if "error" not in answer:
                    answer = child.ask(query, passages)
            if "error" in answer:
                rows[name] = {"error": answer["error"]}
                child.close()
                continue
            rows[name] = {
                "ms": [],
                "scores": answer["scores"],
                "versions": ready["versions"],
                "runtime": ready.get("runtime"),
                "construct_s": ready["load_s"],
                "load_s": load_s,
                "torch_threads": answer.get("torch_threads"),
            }
            if name == "reference_fp32":
                child.close()
            else:
                children[name] = child
        for _ in range(rounds):
            for name, child in list(children.items()):
                time.sleep(gap_s)  # let the last system's spinning thread pools go idle
                answer = child.ask(query, passages)
                if "error" in answer:
                    rows[name] = {"error": answer["error"]}
                    children.pop(name).close()
                    continue
                rows[name]["ms"].append(answer["ms"])
                rows[name]["scores"] = answer["scores"]
                rows[name]["torch_threads"] = answer.get("torch_threads")
    finally:
        for child in children.values():
            child.close()
    return rows


def stack_of(name: str, versions: dict[str, str], runtime: str | None = None) -> str:
    """The libraries that do a row's work, with their versions. ``runtime`` is the one the
    child reported (rows from before it did: guessed from the name)."""
    if runtime is None:
        runtime = "openvino" if "openvino" in name else "onnxruntime" if "onnx" in name else "torch"
    keys = [runtime, "transformers"]
    if name.startswith("st_"):
        optimum = "optimum-intel" if runtime == "openvino" else "optimum-onnx"
        keys = ["sentence-transformers", optimum, *keys]
    elif name in STOCK:
        keys = ["sentence-transformers", *keys]
    elif name in ORT_PEERS:
        keys = [name.split("_")[0], "onnxruntime"]
    return ", ".join(f"{k} {versions[k].split('+')[0]}" for k in keys if k in versions)


def threads_seen(rows: dict[str, dict[str, Any]]) -> str:
    """``torch.get_num_threads()`` as each timed system's child reported it, grouped by value
    ("-": the system does not use torch)."""
    groups: dict[str, list[str]] = {}
    for name, row in rows.items():
        if row.get("ms"):
            seen = row.get("torch_threads")
            groups.setdefault("-" if seen is None else str(seen), []).append(name)
    return "; ".join(f"{value} ({', '.join(names)})" for value, names in groups.items()) or "-"


def report(rows: dict[str, dict[str, Any]], header: list[str]) -> str:
    want = rows.get("reference_fp32", {}).get("scores")
    anchor = rows.get(ANCHOR, {}).get("ms")
    base = statistics.median(anchor) if anchor else None
    lines = [
        *header,
        threads_line(threads_seen(rows)),
        "Spearman: tied scores share their average rank (scipy.stats.spearmanr).",
        "",
        "| system | median ms | vs LangChain | Spearman vs FP32 | max err, % of FP32 range "
        "| stack |",
        "|---|---|---|---|---|---|",
    ]
    timed = [n for n in rows if n != "reference_fp32" and rows[n].get("ms")]
    for name in sorted(timed, key=lambda n: statistics.median(rows[n]["ms"])):
        row = rows[name]
        med = statistics.median(row["ms"])
        ratio = f"{base / med:.2f}x" if base else "-"
        got = row["scores"]
        quality = (
            f"{spearman(got, want):.4f} | {max_err_pct(got, want):.2f}"
            if want and len(got) == len(want)
            else "- | -"
        )
        stack = stack_of(name, row.get("versions", {}), row.get("runtime"))
        lines.append(f"| {name} | {med:.1f} | {ratio} | {quality} | {stack} |")
    for name, row in rows.items():
        if "error" in row:
            lines.append(f"| {name} | {row['error']} | | | | |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", choices=("minilm", "xlmr"), default="minilm")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument(
        "--gap", type=float, default=0.1, help="seconds between two systems' requests"
    )
    parser.add_argument("--systems", help=f"comma-separated, from: {','.join(ALL)}")
    parser.add_argument("--model", type=Path, help="a cross-encoder folder instead of the shape's")
    parser.add_argument("--models", type=Path, default=HERE / ".models")
    parser.add_argument("--out", type=Path, default=HERE / "results")
    parser.add_argument(
        "--threads",
        type=int,
        help="compute threads for every system (OMP_NUM_THREADS and RAG_RERANK_TORCH_THREADS "
        "in each child; default: the usable cores, whatever this shell set)",
    )
    args = parser.parse_args(argv)
    pin_threads(args.threads)  # every child inherits the same budget
    names = (
        args.systems.split(",")
        if args.systems
        else list(ALL if args.shape == "minilm" else XLMR_DEFAULT)
    )
    unknown = sorted(set(names) - set(ALL))
    if unknown:
        parser.error(f"unknown systems {unknown}; choose from {','.join(ALL)}")
    # SIGTERM -> SystemExit, so the finally blocks close every child.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    from cpu_peers import SCIFACT, cpu_line

    model = args.model or model_for(args.shape, args.models)
    work = args.models / "peers"
    write_calibration(work)
    query, passages = request_for(args.shape)
    t0 = time.perf_counter()
    rows = run_systems(
        ["reference_fp32", *names], model, work, query, passages, args.rounds, gap_s=args.gap
    )
    source = "SciFact passages" if (SCIFACT / "corpus.jsonl").exists() else "mixed passages"
    header = [
        f"CPU: {cpu_line()}",
        f"python {platform.python_version()}, shape {args.shape} ({model.name}), 1 query x "
        f"{len(passages)} {source}, {args.rounds} interleaved rounds after 2 warm-up requests, "
        f"{args.gap:g} s between two systems' requests, each system warm in its own process; "
        f"{time.perf_counter() - t0:.0f} s in all",
    ]
    if args.shape == "xlmr":
        header.append(XLMR_NOTE)
    text = report(rows, header)
    print(text)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"peers_{args.shape}.md").write_text(text + "\n", encoding="utf-8")
    (args.out / f"peers_{args.shape}.json").write_text(
        json.dumps(
            {"header": header, "threads": threads_line(threads_seen(rows)), "rows": rows},
            indent=1,
        ),
        encoding="utf-8",
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
