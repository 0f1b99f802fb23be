"""LLM rerankers: weight memory of the real models' shapes; per-pair cost against cross-encoders.

    python benchmarks/llm_rerankers.py memory [--measure-0.6b]
    python benchmarks/llm_rerankers.py cost [--pairs 16] [--batch 8] [--skip-xlmr] [--device cpu]

``memory``: builds each real model's architecture on the ``meta`` device (no weights are
allocated, nothing is downloaded) and adds up parameter and buffer bytes per dtype with the same
function that gives ``footprint_bytes`` (``backends._torch_common.module_bytes``, tied weights
counted once). ``--measure-0.6b`` also instantiates Qwen3-Reranker-0.6B's shape with
random weights on the CPU, loads it through the pool and reports the pool's measured footprint.

``cost``: seconds per (query, passage) pair on the CPU, FP32, the same pairs and batch size for
``causal-lm-reranker`` on a Qwen3-Reranker-0.6B-shaped random model and ``cross-encoder`` on
MiniLM-L6- and XLM-R-large-shaped random models (``benchmarks/run.py``'s). Weights are random:
only speed and memory mean anything, never the scores. The tokenizer of the Qwen-shaped model is
a small byte-level BPE (``rag_rerank_plugins.testing``), so prompt lengths in tokens differ from
the real tokenizer's; the report gives the measured tokens per pair.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

GIB = 2**30
DTYPES = ("float32", "bfloat16", "float16")

#: The published configs' shapes (config.json of each model on the hub), written out so the
#: figures can be reproduced offline.
QWEN3_RERANKERS = {
    "Qwen3-Reranker-0.6B": {"hidden_size": 1024, "intermediate_size": 3072, "layers": 28,
                            "heads": 16, "kv_heads": 8, "tie": True},
    "Qwen3-Reranker-4B": {"hidden_size": 2560, "intermediate_size": 9728, "layers": 36,
                          "heads": 32, "kv_heads": 8, "tie": True},
    "Qwen3-Reranker-8B": {"hidden_size": 4096, "intermediate_size": 12288, "layers": 36,
                          "heads": 32, "kv_heads": 8, "tie": False},
}  # fmt: skip
QWEN3_VOCAB = 151669


def qwen3_config(name: str) -> Any:
    from transformers import Qwen3Config

    shape = QWEN3_RERANKERS[name]
    return Qwen3Config(
        vocab_size=QWEN3_VOCAB,
        hidden_size=shape["hidden_size"],
        intermediate_size=shape["intermediate_size"],
        num_hidden_layers=shape["layers"],
        num_attention_heads=shape["heads"],
        num_key_value_heads=shape["kv_heads"],
        head_dim=128,
        max_position_embeddings=40960,
        tie_word_embeddings=shape["tie"],
    )


def gemma_2b_model() -> Any:
    """bge-reranker-v2-gemma: gemma-2b's shape (``GemmaForCausalLM``)."""
    from transformers import GemmaConfig, GemmaForCausalLM

    config = GemmaConfig(
        vocab_size=256000,
        hidden_size=2048,
        intermediate_size=16384,
        num_hidden_layers=18,
        num_attention_heads=8,
        num_key_value_heads=1,
        head_dim=256,
        max_position_embeddings=8192,
    )
    return GemmaForCausalLM(config)


def minicpm_layerwise_model() -> Any:
    """bge-reranker-v2-minicpm-layerwise: MiniCPM-2B's shape, score heads on layers 8..40."""
    from FlagEmbedding.inference.reranker.decoder_only.models.configuration_minicpm_reranker import (  # noqa: E501
        LayerWiseMiniCPMConfig,
    )

    from rag_rerank_plugins.backends.flag_llm import layerwise_model_class

    config = LayerWiseMiniCPMConfig(
        vocab_size=122753,
        hidden_size=2304,
        intermediate_size=5760,
        num_hidden_layers=40,
        num_attention_heads=36,
        num_key_value_heads=36,
        max_position_embeddings=2048,
        start_layer=8,
        head_multi=True,
        head_type="simple",
        tie_word_embeddings=False,
        use_cache=False,
    )
    config.rope_scaling = None
    return layerwise_model_class()(config)


def memory_rows() -> list[tuple[str, str, int, dict[str, int]]]:
    """``(model, backend, parameters, {dtype: bytes})`` per model, built on the meta device."""
    import torch
    from transformers import Qwen3ForCausalLM

    from rag_rerank_plugins.backends._torch_common import module_bytes, torch_dtype

    builders: list[tuple[str, str, Any]] = [
        ("bge-reranker-v2-gemma", "flag-llm-reranker", gemma_2b_model),
        ("bge-reranker-v2-minicpm-layerwise", "flag-llm-reranker", minicpm_layerwise_model),
    ]
    for name in QWEN3_RERANKERS:
        builders.append(
            (name, "causal-lm-reranker", lambda n=name: Qwen3ForCausalLM(qwen3_config(n)))
        )
    rows = []
    for name, backend, build in builders:
        with torch.device("meta"):
            model = build()
        params = sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())
        sizes = {}
        for dtype in DTYPES:
            sizes[dtype] = module_bytes(model.to(torch_dtype(dtype))) or 0
        rows.append((name, backend, params, sizes))
    return rows


def measure_qwen_06b(root: Path) -> dict[str, float]:
    """Build Qwen3-Reranker-0.6B's shape with random weights, load it through the pool per dtype
    and read the pool's footprint (MB)."""
    from rag_rerank_plugins import ModelPool, ModelSpec

    path = build_qwen(root, "Qwen3-Reranker-0.6B")
    out = {}
    for dtype in ("float32", "bfloat16"):
        pool = ModelPool()
        spec = ModelSpec(str(path), backend="causal-lm-reranker", device="cpu", dtype=dtype)
        pool.score_pairs(spec, [("q", "a passage")])
        out[dtype] = float(pool.spec_stats(spec)["footprint_mb"])
        pool.clear()
    return out


def build_qwen(root: Path, name: str) -> Path:
    """A random-weight model of ``name``'s shape (Qwen3 architecture) under ``root``, once."""
    from rag_rerank_plugins.testing import build_causal_lm_reranker

    path = root / name.lower()
    if not (path / "config.json").exists():
        shape = QWEN3_RERANKERS[name]
        build_causal_lm_reranker(
            path,
            hidden_size=shape["hidden_size"],
            num_layers=shape["layers"],
            num_heads=shape["heads"],
            num_kv_heads=shape["kv_heads"],
            head_dim=128,
            intermediate_size=shape["intermediate_size"],
            vocab_size=QWEN3_VOCAB,
            max_position_embeddings=40960,
        )
    return path


def command_memory(args: argparse.Namespace) -> None:
    print("Weights only, computed from each model's shape on the meta device (no real weights):")
    print()
    print("| model | backend | parameters | FP32 | BF16 / FP16 |")
    print("|---|---|---:|---:|---:|")
    for name, backend, params, sizes in memory_rows():
        print(
            f"| {name} | `{backend}` | {params / 1e9:.2f} B | {sizes['float32'] / GIB:.2f} GiB "
            f"| {sizes['bfloat16'] / GIB:.2f} GiB |"
        )
    if args.measure_06b:
        measured = measure_qwen_06b(Path(args.models))
        print()
        print("Qwen3-Reranker-0.6B's shape with random weights, loaded by the pool on the CPU:")
        for dtype, mb in measured.items():
            print(f"  {dtype}: footprint {mb:.0f} MB ({mb / 1024:.2f} GiB)")


# -- per-pair cost ---------------------------------------------------------------------------


def time_per_pair(spec: Any, pairs: list[tuple[str, str]], batch: int, reps: int) -> dict:
    from rag_rerank_plugins import ModelPool

    pool = ModelPool()
    try:
        pool.score_pairs(spec, pairs[:batch], batch_size=batch)  # load + warm-up
        times = []
        for _ in range(reps):
            start = time.perf_counter()
            pool.score_pairs(spec, pairs, batch_size=batch)
            times.append(time.perf_counter() - start)
        stats = pool.spec_stats(spec)
        return {
            "s_per_pair": statistics.median(times) / len(pairs),
            "tokens_per_batch": stats["avg_tokens_per_batch"],
            "items_per_batch": stats["avg_batch_items"],
            "footprint_mb": stats["footprint_mb"],
        }
    finally:
        pool.clear()


def command_cost(args: argparse.Namespace) -> None:
    import torch
    from run import QUERY, build_models, mixed_passages

    from rag_rerank_plugins import ModelSpec

    root = Path(args.models)
    root.mkdir(parents=True, exist_ok=True)
    models = build_models(root, xlmr=not args.skip_xlmr)
    qwen = build_qwen(root, "Qwen3-Reranker-0.6B")
    pairs = [(QUERY, p) for p in mixed_passages(args.pairs, seed=1, lo=40, hi=120)]
    rows = []
    candidates = [
        ("MiniLM-L6 cross-encoder (22 M)", ModelSpec(str(models["minilm"]))),
        ("XLM-R large cross-encoder (568 M)", ModelSpec(str(models["xlmr"])))
        if "xlmr" in models
        else None,
        (
            "Qwen3-Reranker-0.6B shape, causal-lm-reranker (596 M)",
            ModelSpec(str(qwen), backend="causal-lm-reranker"),
        ),
    ]
    for label, spec in [c for c in candidates if c is not None]:
        spec = spec.with_options(device=args.device, dtype=args.dtype, max_length=512)
        result = time_per_pair(spec, pairs, args.batch, args.reps)
        rows.append((label, result))
        print(f"{label}: {result['s_per_pair'] * 1000:.1f} ms/pair", flush=True)
    print()
    print(
        f"{args.device} ({platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
        f"torch {torch.__version__}, {torch.get_num_threads()} threads), {args.dtype}, "
        f"{len(pairs)} pairs of "
        f"40-120-word passages, batch {args.batch}, median of {args.reps}:"
    )
    print()
    base = rows[0][1]["s_per_pair"]
    print("| model | ms / pair | x MiniLM-L6 | padded tokens / pair | ms / 1k tokens | footprint |")
    print("|---|---:|---:|---:|---:|---:|")
    for label, r in rows:
        per_pair = r["tokens_per_batch"] / r["items_per_batch"]
        print(
            f"| {label} | {r['s_per_pair'] * 1000:.1f} | {r['s_per_pair'] / base:.1f} | "
            f"{per_pair:.0f} | {r['s_per_pair'] * 1e6 / per_pair:.0f} | "
            f"{r['footprint_mb']:.0f} MB |"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default=str(HERE / ".models"), help="where models are built")
    sub = parser.add_subparsers(dest="command", required=True)
    memory = sub.add_parser("memory", help="weight memory of the real shapes per dtype")
    memory.add_argument("--measure-0.6b", dest="measure_06b", action="store_true")
    cost = sub.add_parser("cost", help="CPU seconds per pair vs cross-encoders")
    cost.add_argument("--pairs", type=int, default=16)
    cost.add_argument("--batch", type=int, default=8)
    cost.add_argument("--reps", type=int, default=3)
    cost.add_argument("--skip-xlmr", action="store_true")
    cost.add_argument("--device", default="cpu", help="e.g. cuda:0 on a GPU machine")
    cost.add_argument("--dtype", default="float32", help="float32, float16, bfloat16 or auto")
    args = parser.parse_args()
    {"memory": command_memory, "cost": command_cost}[args.command](args)


if __name__ == "__main__":
    main()
