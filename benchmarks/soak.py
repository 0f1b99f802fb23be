"""Soak test: many rerank calls through both adapters with RSS sampled, to catch slow leaks.

Why: long-running RAG services die of memory that grows a little per request (futures, stats,
event payloads or caches that keep every query). This drives ``calls`` requests (default 10,000)
through the LangChain compressor and the LlamaIndex postprocessor, sync and async in turn, each
with a fresh query and fresh documents, on a scheduled (not thread-safe) model so the worker
thread, futures and batching are exercised, then prints RSS before, during and after.

    python benchmarks/soak.py                 # 10,000 calls on the scheduled fake reranker
    python benchmarks/soak.py --calls 2000 --model /path/to/tiny-cross-encoder

tests/test_soak.py runs a reduced form in CI by importing :func:`soak` from this file.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
import uuid
from typing import Any

from rag_rerank_plugins import ModelPool
from rag_rerank_plugins._memory import free_memory, rss_bytes
from rag_rerank_plugins.backends import register_backend
from rag_rerank_plugins.testing import FakeReranker

MIB = 1024 * 1024


class _ScheduledFake(FakeReranker):
    thread_safe = False  # goes through the per-model worker like a torch model


def _scheduled_fake_backend() -> str:
    name = f"soak-fake-{uuid.uuid4().hex[:8]}"
    register_backend(name, lambda spec, pool: _ScheduledFake(), "reranker")
    return name


def soak(calls: int = 10_000, *, model: str | None = None, samples: int = 20) -> dict[str, Any]:
    """Run ``calls`` adapter calls; return RSS figures in MiB and the per-call time."""
    from langchain_core.documents import Document
    from llama_index.core.schema import NodeWithScore, TextNode

    from rag_rerank_plugins.langchain import SharedRerankCompressor
    from rag_rerank_plugins.llama_index import SharedRerankPostprocessor

    pool = ModelPool()
    if model is None:
        kwargs: dict[str, Any] = {"model": "soak", "backend": _scheduled_fake_backend()}
    else:
        kwargs = {"model": model, "backend": "cross-encoder", "device": "cpu"}
    comp = SharedRerankCompressor(pool=pool, top_n=3, **kwargs)
    post = SharedRerankPostprocessor(pool=pool, top_n=3, **kwargs)

    async def one(i: int) -> None:
        query = f"query {i} about topic {i % 97}"
        texts = [f"passage {i}-{j} about topic {(i + j) % 97}" for j in range(8)]
        kind = i % 4
        if kind < 2:
            docs = [Document(page_content=t, metadata={"j": j}) for j, t in enumerate(texts)]
            out: Any = (
                comp.compress_documents(docs, query)
                if kind == 0
                else await comp.acompress_documents(docs, query)
            )
        else:
            nodes = [NodeWithScore(node=TextNode(text=t), score=0.5) for t in texts]
            out = (
                post.postprocess_nodes(nodes, query_str=query)
                if kind == 2
                else await post.apostprocess_nodes(nodes, query_str=query)
            )
        assert len(out) == 3

    async def run() -> dict[str, Any]:
        warmup = max(200, calls // 20)
        for i in range(warmup):
            await one(i)
        free_memory()
        baseline = rss_bytes()
        trace = []
        every = max(1, calls // samples)
        start = time.perf_counter()
        for i in range(calls):
            await one(warmup + i)
            if (i + 1) % every == 0:
                trace.append(round(rss_bytes() / MIB, 1))
        elapsed = time.perf_counter() - start
        free_memory()
        final = rss_bytes()
        stats = pool.spec_stats(comp.spec)
        return {
            "calls": calls,
            "model": model or "scheduled fake reranker",
            "rss_baseline_mib": round(baseline / MIB, 1),
            "rss_final_mib": round(final / MIB, 1),
            "rss_growth_mib": round((final - baseline) / MIB, 2),
            "rss_peak_mib": max([*trace, round(final / MIB, 1)]),
            "rss_trace_mib": trace,
            "ms_per_call": round(elapsed / calls * 1000, 3),
            "errors": stats["errors"],
            "loads": stats["loads"],
        }

    try:
        return asyncio.run(run())
    finally:
        pool.clear()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--calls", type=int, default=10_000)
    parser.add_argument("--model", help="a local cross-encoder directory (default: the fake)")
    args = parser.parse_args()
    print(json.dumps(soak(args.calls, model=args.model), indent=2))


if __name__ == "__main__":
    main()
