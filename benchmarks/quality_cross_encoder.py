"""Issue 12's cross-encoder quality bound for every CPU execution mode.

No pretrained cross-encoder can be downloaded here, so the model is the packaged
all-MiniLM-L6-v2 encoder (real weights, so real activation ranges) with a seeded one-logit head
(``rag_rerank_plugins.testing.build_cross_encoder_from_encoder``). Pairs: the first N SciFact
test claims x their 12 best word-overlap passages (``../shared/data/scifact``), max_length 256,
raw logits. Reference: ``CrossEncoder.predict`` in float32 with transformers' own kernels.

The bound: max |error| <= 2 % of the reference's score range and Spearman >= 0.99.

Run: ``python benchmarks/quality_cross_encoder.py [--claims N]`` (default 16). Modes that the
host cannot run (onnxruntime missing, BF16 emulated on this CPU) are skipped with a note.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path
from typing import Any

from rag_rerank_plugins import ModelPool, ModelSpec

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from bench_common import pin_threads, spearman, threads_line  # noqa: E402

__all__ = ["MIN_SPEARMAN", "RANGE_SHARE", "modes", "scifact_arguments", "spearman"]
SCIFACT = HERE.parent / ".." / "shared" / "data" / "scifact"
RANGE_SHARE = 0.02
MIN_SPEARMAN = 0.99


def modes(model: str, cache: str) -> dict[str, ModelSpec]:
    import importlib.util

    from rag_rerank_plugins.policy import cpu_has_native_bf16

    def spec(backend: str = "cross-encoder", dtype: str = "float32", **options: Any) -> ModelSpec:
        return ModelSpec(
            model,
            backend=backend,
            device="cpu",
            dtype=dtype,
            max_length=256,
            options={"score_mode": "raw", **options},
        )

    out = {
        "torch float32, our CPU kernels (default)": spec(),
        "torch float32 dynamic int8 (opt-in)": spec(quantize="int8"),
    }
    if cpu_has_native_bf16():
        out["torch bfloat16, our CPU kernels (default here)"] = spec(dtype="bfloat16")
        out["torch bfloat16, transformers' kernels"] = spec(dtype="bfloat16", cpu_kernels=False)
    else:
        print("BF16 is emulated on this CPU: BF16 rows skipped (the policy picks float32 here)")
    if importlib.util.find_spec("onnxruntime") is not None:
        out["ONNX float32"] = spec("onnx-cross-encoder", cache_dir=cache)
        out["ONNX int8 (opt-in)"] = spec("onnx-cross-encoder", cache_dir=cache, quantize="int8")
    return out


def scifact_arguments(doc: str) -> argparse.Namespace:
    """``--claims N`` and ``--data FOLDER`` (SciFact in BEIR layout); exits if it is missing."""
    parser = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    parser.add_argument("--claims", type=int, default=16)
    parser.add_argument("--data", type=Path, default=SCIFACT)
    args = parser.parse_args()
    if not (args.data / "corpus.jsonl").exists():
        sys.exit(f"SciFact not found under {args.data}")
    return args


def main() -> None:
    args = scifact_arguments(__doc__)
    pin_threads()
    from rag_rerank_plugins.testing import beir_pairs, build_cross_encoder_from_encoder

    work = Path(tempfile.mkdtemp(prefix="ce-quality-"))
    model = str(build_cross_encoder_from_encoder(work / "real-ce"))
    pairs = beir_pairs(args.data, args.claims)
    pool = ModelPool()
    reference = ModelSpec(
        model,
        device="cpu",
        dtype="float32",
        max_length=256,
        options={"score_mode": "raw", "cpu_kernels": False},
    )
    want = pool.score_pairs(reference, pairs)
    spread = max(want) - min(want)
    print(f"{len(pairs)} pairs; reference: torch float32, transformers' kernels")
    print(f"Spearman: ties share their average rank; {threads_line()}\n")
    print("| mode | max error / FP32 range | Spearman | within bound |")
    print("|---|---|---|---|")
    for name, spec in modes(model, str(work / "onnx")).items():
        got = pool.score_pairs(spec, pairs)
        error = max(abs(a - b) for a, b in zip(got, want, strict=True)) / spread
        rho = spearman(got, want)
        ok = error <= RANGE_SHARE and rho >= MIN_SPEARMAN
        print(f"| {name} | {100 * error:.2f} % | {rho:.4f} | {'yes' if ok else '**no**'} |")
        pool.release(spec)
    pool.clear()


if __name__ == "__main__":
    main()
