"""GPU scenarios against hand-cached models, one JSON line each, then a table (< 8 min on an H100).

    python benchmarks/gpu.py [--quick] [--only warm,concurrency] [--models DIR] [--out FILE]

Random-weight cross-encoders of the real shapes (MiniLM-L6, 22 M; XLM-R large, 568 M, the shape of
bge-reranker-v2-m3): only speed and memory mean anything. Scenarios:

* ``weights``: GPU memory of the XLM-R-large weights, CrossEncoder default (FP32) vs ours (FP16).
* ``users``: 10 users x 3 queries, a reranker built per request, card capped at 11.6 GiB
  (``torch.cuda.set_per_process_memory_fraction``): LangChain's ``CrossEncoderReranker`` +
  ``HuggingFaceCrossEncoder`` (or a plain ``CrossEncoder`` when LangChain is absent) vs ours.
* ``warm``: 1 query x 50 passages (19-397 tokens), hand-cached FP32 and FP16 ``CrossEncoder``
  vs ours (default, ``prune_last_layer=False``, the ``flag-reranker`` backend when FlagEmbedding
  is installed), both shapes, medians of interleaved runs.
* ``concurrency``: 16 threads x 10 requests x 20 passages, one shared hand-cached CrossEncoder
  (FP32 and FP16) vs ours, with the prepare/forward pipeline on and off.
* ``release``: allocated GPU memory before and after ``release()``.
* ``oom``: 1024 passages of ~512 tokens, token budget forced high, card capped at 4 GiB.
* ``async``: 16 concurrent ``ascore_pairs`` coroutines.
* ``llama_index``: ``SharedRerankPostprocessor`` built per request x 200 (when LlamaIndex is there).

Runs on any CUDA machine with torch and sentence-transformers; LangChain / LlamaIndex rows need
those packages (see docs/guides/gpu.md for carrying wheels to a machine without an index).
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import importlib.util
import json
import os
import statistics
import sys
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from run import QUERY, build_models, mixed_passages  # noqa: E402

GIB = 1024**3
ROWS: list[dict[str, Any]] = []
#: Where models run. ``--smoke`` sets "cpu" to check the script itself on a machine without a GPU
#: (memory caps and CUDA counters are then skipped and read as 0).
DEVICE = "cuda:0"


def emit(scenario: str, **fields: Any) -> None:
    row = {"scenario": scenario, **fields}
    ROWS.append(row)
    print(json.dumps(row, default=str), flush=True)


def cuda() -> Any:
    import torch

    if DEVICE.startswith("cuda") and not torch.cuda.is_available():
        sys.exit("benchmarks/gpu.py needs a CUDA device (torch.cuda.is_available() is False).")
    return torch


def on_gpu() -> bool:
    return DEVICE.startswith("cuda")


def cap_memory(gib: float | None) -> None:
    if not on_gpu():
        return
    torch = cuda()
    total = torch.cuda.get_device_properties(0).total_memory
    torch.cuda.set_per_process_memory_fraction(1.0 if gib is None else min(1.0, gib * GIB / total))


def settle() -> None:
    gc.collect()
    if not on_gpu():
        return
    torch = cuda()
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()


def allocated_gb() -> float:
    return cuda().cuda.memory_allocated() / 1e9 if on_gpu() else 0.0


def peak_gb() -> float:
    return cuda().cuda.max_memory_allocated() / 1e9 if on_gpu() else 0.0


def sync() -> None:
    if on_gpu():
        cuda().cuda.synchronize()


def hand_cached(model: Path, half: bool) -> Any:
    from sentence_transformers import CrossEncoder

    encoder = CrossEncoder(str(model), device=DEVICE)
    if half and on_gpu():  # FP16 on a CPU is ~40x slower: the smoke test keeps FP32
        encoder.model.half()
    return encoder


def ours(
    model: Path, pool: Any, backend: str = "cross-encoder", **options: Any
) -> Callable[[list[tuple[str, str]]], Any]:
    from rag_rerank_plugins import ModelSpec

    spec = ModelSpec(str(model), backend=backend, device=DEVICE, options=options)
    return lambda pairs: pool.score_pairs(spec, pairs, batch_size=64)


def new_pool(**config: Any) -> Any:
    from rag_rerank_plugins import ModelPool
    from rag_rerank_plugins.engine_config import EngineConfig

    return ModelPool(config=EngineConfig(**config))


def timed(fn: Callable[[], Any], reps: int) -> list[float]:
    times = []
    for _ in range(reps):
        sync()
        t0 = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t0)
    return times


def hammer(
    request: Callable[[int, int], Any], callers: int, per_caller: int
) -> tuple[float, list[float], int]:
    """``callers`` threads each making ``per_caller`` requests: seconds, latencies, failures."""
    latencies: list[float] = []
    failures = 0
    lock = threading.Lock()

    def caller(i: int) -> None:
        nonlocal failures
        for j in range(per_caller):
            t0 = time.perf_counter()
            try:
                request(i, j)
            except Exception:
                with lock:
                    failures += 1
                continue
            with lock:
                latencies.append(time.perf_counter() - t0)

    t0 = time.perf_counter()
    with ThreadPoolExecutor(callers) as ex:
        list(ex.map(caller, range(callers)))
    return time.perf_counter() - t0, latencies, failures


# -- scenarios --------------------------------------------------------------------------------


def scenario_weights(models: dict[str, Path]) -> None:
    from rag_rerank_plugins import ModelSpec

    settle()
    base = allocated_gb()
    anchor = hand_cached(models["xlmr"], half=False)
    fp32 = allocated_gb() - base
    del anchor
    settle()
    pool = new_pool()
    pool.get(ModelSpec(str(models["xlmr"]), device=DEVICE))
    fp16 = allocated_gb() - base
    dtype = pool.spec_stats(ModelSpec(str(models["xlmr"]), device=DEVICE))["dtype"]
    pool.clear()
    emit("weights", anchor_fp32_gb=fp32, ours_gb=fp16, ours_dtype=dtype)


def _per_request_anchor(model: Path) -> Callable[[list[str], str], Any]:
    try:
        from langchain_classic.retrievers.document_compressors import CrossEncoderReranker
        from langchain_community.cross_encoders import HuggingFaceCrossEncoder
        from langchain_core.documents import Document
    except ImportError:
        from sentence_transformers import CrossEncoder

        def plain(texts: list[str], query: str) -> Any:
            encoder = CrossEncoder(str(model), device=DEVICE)  # what the wrapper does
            return encoder.predict([(query, t) for t in texts], batch_size=32)

        plain.label = "CrossEncoder per request"  # type: ignore[attr-defined]
        return plain

    def langchain(texts: list[str], query: str) -> Any:
        encoder = HuggingFaceCrossEncoder(model_name=str(model), model_kwargs={"device": DEVICE})
        reranker = CrossEncoderReranker(model=encoder, top_n=3)
        return reranker.compress_documents([Document(page_content=t) for t in texts], query)

    langchain.label = "LangChain per request"  # type: ignore[attr-defined]
    return langchain


def scenario_users(models: dict[str, Path], users: int = 10, queries: int = 3) -> None:
    from rag_rerank_plugins import ModelSpec

    texts = mixed_passages(20, seed=4, lo=15, hi=150)
    anchor = _per_request_anchor(models["xlmr"])
    pool = new_pool()
    spec = ModelSpec(str(models["xlmr"]), device=DEVICE)

    def ours_request(texts: list[str], query: str) -> Any:
        try:
            from rag_rerank_plugins.langchain import SharedRerankCompressor
        except ImportError:
            return pool.score_pairs(spec, [(query, t) for t in texts])
        from langchain_core.documents import Document

        comp = SharedRerankCompressor(model=str(models["xlmr"]), device=DEVICE, pool=pool)
        return comp.compress_documents([Document(page_content=t) for t in texts], query)

    systems = ((anchor.label, anchor), ("ours per request", ours_request))  # type: ignore[attr-defined]
    for name, request in systems:
        settle()
        cap_memory(11.6)
        seconds, latencies, failed = hammer(
            lambda i, j, request=request: request(texts, f"{QUERY} {i} {j}"), users, queries
        )
        ok = len(latencies)
        emit(
            "users",
            system=name,
            succeeded=ok,
            failed=failed,
            seconds=seconds,
            peak_gb=peak_gb(),
            loads=pool.spec_stats(spec)["loads"] if name.startswith("ours") else users * queries,
        )
        cap_memory(None)
        gc.collect()
    pool.clear()


def scenario_warm(models: dict[str, Path], reps: int) -> None:
    passages = mixed_passages(50, seed=2)
    pairs = [(QUERY, p) for p in passages]
    for shape in ("minilm", "xlmr"):
        settle()
        pool, unpiped = new_pool(), new_pool(pipeline=False)
        fp32, fp16_model = hand_cached(models[shape], False), hand_cached(models[shape], True)
        variants = {
            "ours": ours(models[shape], pool),
            # The device worker tokenises each pass itself (no prepare thread).
            "ours, pipeline off": ours(models[shape], unpiped),
            # The last layer for every position: what pruning it to the first token saves.
            "ours, prune_last_layer=False": ours(models[shape], pool, prune_last_layer=False),
        }
        if importlib.util.find_spec("FlagEmbedding") is not None:
            variants["ours, flag-reranker"] = ours(models[shape], pool, "flag-reranker")
        systems: dict[str, Callable[[], Any]] = {
            "hand-cached FP32": lambda m=fp32: m.predict(pairs),
            "hand-cached FP16": lambda m=fp16_model: m.predict(pairs),
            **{name: lambda f=fn: f(pairs) for name, fn in variants.items()},
        }
        for fn in systems.values():
            for _ in range(3):
                fn()  # warm-up: kernels, allocator
        times: dict[str, list[float]] = {name: [] for name in systems}
        for _ in range(reps):  # interleaved, so drift hits every system alike
            for name, fn in systems.items():
                times[name] += timed(fn, 1)
        fp16 = statistics.median(times["hand-cached FP16"])
        for name, ts in times.items():
            med = statistics.median(ts)
            emit("warm", shape=shape, system=name, ms=med * 1000, vs_fp16_by_hand=med / fp16)
        pool.clear()
        unpiped.clear()


def scenario_concurrency(
    models: dict[str, Path], callers: int, per_caller: int, shapes: tuple[str, ...]
) -> None:
    texts = mixed_passages(20, seed=3, lo=15, hi=150)
    for shape in shapes:
        settle()
        shared32, shared16 = hand_cached(models[shape], False), hand_cached(models[shape], True)
        systems: dict[str, Callable[[list[tuple[str, str]]], Any]] = {
            "shared CrossEncoder FP32": lambda p, m=shared32: m.predict(p, batch_size=32),
            "shared CrossEncoder FP16": lambda p, m=shared16: m.predict(p, batch_size=32),
        }
        pools = {
            "ours": new_pool(),
            "ours, 4 prepare threads": new_pool(prepare_workers=4),
            "ours, pipeline off": new_pool(pipeline=False),
        }
        for name, pool in pools.items():
            systems[name] = ours(models[shape], pool)
        base_rate = None
        for name, fn in systems.items():
            for _ in range(3):
                fn([(QUERY, t) for t in texts])
            seconds, latencies, _ = hammer(
                lambda i, j, fn=fn: fn([(f"{QUERY} {i} {j}", t) for t in texts]),
                callers,
                per_caller,
            )
            rate = callers * per_caller * len(texts) / seconds
            if name == "shared CrossEncoder FP32":
                base_rate = rate
            ordered = sorted(latencies)
            emit(
                "concurrency",
                shape=shape,
                system=name,
                pairs_per_s=rate,
                vs_shared_fp32=rate / base_rate if base_rate else None,
                p50_ms=statistics.median(ordered) * 1000,
                p95_ms=ordered[int(0.95 * (len(ordered) - 1))] * 1000,
            )
        for pool in pools.values():
            pool.clear()
        del shared32, shared16


def scenario_release(models: dict[str, Path]) -> None:
    from rag_rerank_plugins import ModelSpec

    settle()
    before = allocated_gb()  # what earlier scenarios left (their pools are not this one's)
    pool = new_pool()
    spec = ModelSpec(str(models["xlmr"]), device=DEVICE)
    pool.score_pairs(spec, [(QUERY, "warm up")])
    loaded = allocated_gb()
    pool.release(spec)
    after = allocated_gb()
    emit(
        "release",
        before_load_gb=before,
        loaded_gb=loaded,
        after_release_gb=after,
        left_by_release_gb=after - before,
        live_cuda_tensors=live_cuda_tensors(),
    )


def live_cuda_tensors(top: int = 4) -> str:
    """The largest CUDA tensors still reachable, with what holds each (for a leak hunt)."""
    if not on_gpu():
        return ""
    torch = cuda()
    gc.collect()
    found = [t for t in gc.get_objects() if isinstance(t, torch.Tensor) and t.is_cuda]
    found.sort(key=lambda t: t.numel() * t.element_size(), reverse=True)
    parts = []
    for tensor in found[:top]:
        holders = sorted({type(r).__name__ for r in gc.get_referrers(tensor)} - {"list"})
        parts.append(f"{tuple(tensor.shape)} {tensor.dtype} held by {','.join(holders)}")
    return f"{len(found)} tensors; " + "; ".join(parts)


def scenario_oom(models: dict[str, Path], n: int) -> None:
    from rag_rerank_plugins import ModelSpec

    settle()
    pool = new_pool(token_budget=10_000_000, max_batch_size=n)
    spec = ModelSpec(str(models["xlmr"]), device=DEVICE)
    pool.get(spec)
    cap_memory(4.0)
    long_passages = mixed_passages(n, seed=5, lo=420, hi=480)
    t0 = time.perf_counter()
    try:
        scores = pool.score_pairs(spec, [(QUERY, p) for p in long_passages], batch_size=n)
        outcome = f"ok, {len(scores)} scores"
    except Exception as exc:
        outcome = f"{type(exc).__name__}: {str(exc)[:120]}"
    stats = pool.spec_stats(spec)
    emit(
        "oom",
        outcome=outcome,
        seconds=time.perf_counter() - t0,
        oom_splits=stats["oom_splits"],
        learned_token_budget=stats["token_budget"],
        allocated_after_gb=allocated_gb(),
    )
    cap_memory(None)
    pool.clear()


def scenario_async(models: dict[str, Path], callers: int) -> None:
    from rag_rerank_plugins import ModelSpec

    pool = new_pool()
    spec = ModelSpec(str(models["minilm"]), device=DEVICE)
    texts = mixed_passages(20, seed=3, lo=15, hi=150)
    pool.score_pairs(spec, [(QUERY, t) for t in texts])

    async def main() -> float:
        t0 = time.perf_counter()
        await asyncio.gather(
            *(pool.ascore_pairs(spec, [(f"{QUERY} {i}", t) for t in texts]) for i in range(callers))
        )
        return time.perf_counter() - t0

    async def rounds() -> list[float]:  # one loop, as a server has: the first round warms it
        return [await main() for _ in range(4)]

    first, *rest = asyncio.run(rounds())
    emit(
        "async",
        callers=callers,
        pairs_per_s=callers * len(texts) / statistics.median(rest),
        first_round_pairs_per_s=callers * len(texts) / first,
    )
    pool.clear()


def scenario_llama_index(models: dict[str, Path], requests: int) -> None:
    try:
        from llama_index.core.schema import NodeWithScore, TextNode

        from rag_rerank_plugins.llama_index import SharedRerankPostprocessor
    except ImportError as exc:
        emit("llama_index", skipped=f"LlamaIndex not installed ({exc.name})")
        return
    pool = new_pool()
    nodes = [NodeWithScore(node=TextNode(text=t), score=0.0) for t in mixed_passages(10, seed=6)]
    for i in range(requests):
        post = SharedRerankPostprocessor(model=str(models["minilm"]), top_n=3, pool=pool)
        post.postprocess_nodes(nodes, query_str=f"{QUERY} {i}")
    stats = post.stats()
    emit(
        "llama_index",
        requests=requests,
        loads=stats["loads"],
        dtype=stats["dtype"],
        device=stats["device"],
    )
    pool.clear()


# -- table ------------------------------------------------------------------------------------


def table() -> str:
    lines = ["| scenario | system / shape | result |", "|---|---|---|"]
    for row in ROWS:
        rest = {k: v for k, v in row.items() if k not in ("scenario", "system", "shape")}
        who = " / ".join(str(row[k]) for k in ("system", "shape") if k in row)
        text = ", ".join(
            f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in rest.items()
        )
        lines.append(f"| {row['scenario']} | {who} | {text} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer repetitions")
    parser.add_argument("--only", default="", help="comma-separated scenarios to run")
    parser.add_argument("--models", type=Path, default=HERE / ".models")
    parser.add_argument("--out", type=Path, default=None, help="also write the rows as JSON")
    parser.add_argument(
        "--tokenizer",
        type=Path,
        default=None,
        help="all-MiniLM-L6-v2 tokenizer folder (default: packaged; see scripts/gpu-wheels)",
    )
    parser.add_argument(
        "--smoke", action="store_true", help="check the script on the CPU: MiniLM only, tiny loads"
    )
    args = parser.parse_args(argv)
    global DEVICE
    if args.smoke:
        DEVICE = "cpu"
    torch = cuda()
    name = torch.cuda.get_device_name(0) if on_gpu() else "CPU (smoke test)"
    print(f"# {name}, torch {torch.__version__}", flush=True)
    models = build_models(args.models, xlmr=not args.smoke, tokenizer=args.tokenizer)
    if args.smoke:
        models["xlmr"] = models["minilm"]
    reps = 2 if args.smoke else 5 if args.quick else 15
    per_caller = 1 if args.smoke else 4 if args.quick else 10
    steps: dict[str, Callable[[], None]] = {
        "weights": lambda: scenario_weights(models),
        "warm": lambda: scenario_warm(models, reps),
        "concurrency": lambda: scenario_concurrency(models, 16, per_caller, ("minilm", "xlmr")),
        "async": lambda: scenario_async(models, 16),
        "release": lambda: scenario_release(models),
        "oom": lambda: scenario_oom(models, 64 if args.smoke else 1024),
        "users": lambda: scenario_users(models),
        "llama_index": lambda: scenario_llama_index(models, 20 if args.smoke else 200),
    }
    wanted = [s for s in args.only.split(",") if s] or list(steps)
    for name in wanted:
        t0 = time.perf_counter()
        try:
            steps[name]()
        except Exception as exc:  # one broken scenario must not lose the others' rows
            emit(name, error=f"{type(exc).__name__}: {exc}")
        print(f"# {name}: {time.perf_counter() - t0:.0f} s", flush=True)
    print(table())
    if args.out is not None:
        args.out.write_text(json.dumps(ROWS, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
