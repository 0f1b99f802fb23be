"""Why no int8 mode is a default: int8 schemes against issue 12's cross-encoder quality bound.

On CPUs without native BF16 (AVX2-only), float32 is the default, and the only cheaper arithmetic
those CPUs have is int8 (~2x float32 matmul throughput). This measures whether any int8 scheme
could hold the bound, before building a kernel for it: fake quantization (quantize, then
dequantize in float32) of every encoder ``nn.Linear`` of the real-weight MiniLM cross-encoder
(pooler and one-logit head stay float32), on the pairs ``quality_cross_encoder.py`` uses.

Weights: symmetric int8 per output channel, round to nearest. Activations (the linears' inputs):
  per-tensor u8     asymmetric uint8, one scale per call (onnxruntime / oneDNN dynamic int8)
  per-tensor u7     the same on 7 bits (torch's x86 dynamic int8, ``reduce_range``)
  per-token i8      symmetric int8, one scale per row
  per-token u8      asymmetric uint8, one scale per row
  smooth+token      SmoothQuant (alpha 0.75, calibrated on other SciFact claims), per-token i8
  smooth+token, outputs fp32   the same, attention-output and FFN-output matmuls in float32
  weights only      int8 weights, float32 activations

Measured on 2026-11-24 (16 claims, 192 pairs, score range 1.52): none is within the bound.
per-tensor u8 8.9 %, u7 19.5 %, per-token i8 7.9 %, u8 5.2 %, smooth+token 3.7 %, weights only
2.5 % (max error / range; bound 2 %). Closest: smooth+token with both output projections in
float32, 2.2 %, Spearman 0.999, and that leaves 5/12 of the matmul FLOPs in float32 (at most
~1.4x over float32 even with int8 twice as fast). So int8 stays opt-in and AVX2-only CPUs keep
float32 (docs/cpu-kernels.md).

Run: ``python benchmarks/quality_int8_schemes.py [--claims N]``.
"""

from __future__ import annotations

import copy
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from quality_cross_encoder import MIN_SPEARMAN, RANGE_SHARE, scifact_arguments, spearman

ALPHA = 0.75


def fake_weight(w: Any) -> Any:
    scale = w.abs().amax(dim=1, keepdim=True).clamp_min(1e-12) / 127
    return (w / scale).round().clamp(-127, 127) * scale


def fake_asym(x: Any, levels: int, per_token: bool) -> Any:
    lo = (x.amin(-1, keepdim=True) if per_token else x.min()).clamp_max(0)
    hi = (x.amax(-1, keepdim=True) if per_token else x.max()).clamp_min(0)
    scale = ((hi - lo) / levels).clamp_min(1e-12)
    zero = (-lo / scale).round()
    return (((x / scale).round() + zero).clamp(0, levels) - zero) * scale


def fake_sym_token(x: Any) -> Any:
    scale = x.abs().amax(-1, keepdim=True).clamp_min(1e-12) / 127
    return (x / scale).round().clamp(-127, 127) * scale


ACTIVATIONS: dict[str, Callable[[Any], Any] | None] = {
    "per-tensor u8": lambda x: fake_asym(x, 255, per_token=False),
    "per-tensor u7": lambda x: fake_asym(x, 127, per_token=False),
    "per-token i8": fake_sym_token,
    "per-token u8": lambda x: fake_asym(x, 255, per_token=True),
    "weights only": None,
}


def encoder_linears(model: Any) -> dict[str, Any]:
    import torch

    return {
        name: m for name, m in model.bert.encoder.named_modules() if isinstance(m, torch.nn.Linear)
    }


def calibrate(model: Any, batches: list[Any]) -> dict[str, Any]:
    """Per linear, the max |input| of each input channel over the calibration batches."""
    import torch

    peaks: dict[str, Any] = {}

    def hook(name: str) -> Callable[..., None]:
        def record(_module: Any, args: tuple[Any, ...]) -> None:
            x = args[0].detach().abs().flatten(0, -2).amax(0)
            peaks[name] = torch.maximum(peaks[name], x) if name in peaks else x

        return record

    handles = [m.register_forward_pre_hook(hook(n)) for n, m in encoder_linears(model).items()]
    with torch.inference_mode():
        for batch in batches:
            model(**batch)
    for handle in handles:
        handle.remove()
    return peaks


def quantized(
    model: Any,
    activation: Callable[[Any], Any] | None,
    peaks: dict[str, Any] | None = None,
    keep_outputs: bool = False,
) -> Any:
    """A copy of ``model`` with fake-quantized encoder linears; ``peaks``: SmoothQuant."""
    import torch

    model = copy.deepcopy(model)
    linears = encoder_linears(model)
    smooth: dict[str, Any] = {}
    if peaks is not None:
        for name in linears:
            layer = name.rsplit(".", 1)[0] if ".attention.self." in name else None
            group = [f"{layer}.{p}" for p in ("query", "key", "value")] if layer else [name]
            # Q, K and V share one input, so they share one smoothing vector (a fused QKV).
            w_peak = torch.stack([linears[g].weight.abs().amax(0) for g in group]).amax(0)
            smooth[name] = (peaks[name].clamp_min(1e-5) ** ALPHA) / (
                w_peak.clamp_min(1e-5) ** (1 - ALPHA)
            )
    for name, linear in linears.items():
        if keep_outputs and name.endswith("output.dense"):
            continue
        s = smooth.get(name)
        with torch.no_grad():
            weight = linear.weight * s if s is not None else linear.weight
            linear.weight.copy_(fake_weight(weight))
        if activation is not None:

            def pre(_m: Any, args: tuple[Any, ...], s: Any = s, f: Any = activation) -> Any:
                x = args[0] / s if s is not None else args[0]
                return (f(x), *args[1:])

            linear.register_forward_pre_hook(pre)
    return model


def scores(model: Any, batches: list[Any]) -> list[float]:
    import torch

    with torch.inference_mode():
        return [float(v) for b in batches for v in model(**b).logits[:, 0]]


def main() -> None:
    args = scifact_arguments(__doc__)
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from rag_rerank_plugins.testing import beir_pairs, build_cross_encoder_from_encoder

    path = build_cross_encoder_from_encoder(Path(tempfile.mkdtemp(prefix="int8-")) / "real-ce")
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForSequenceClassification.from_pretrained(path).eval()
    claims = beir_pairs(args.data, 3 * args.claims)
    cut = 12 * args.claims  # the test pairs; calibration uses the next claims, not these

    def batches(pairs: list[tuple[str, str]]) -> list[Any]:
        return [
            tok(
                *zip(*pairs[i : i + 16], strict=True),
                truncation=True,
                max_length=256,
                padding=True,
                return_tensors="pt",
            )
            for i in range(0, len(pairs), 16)
        ]

    test, calibration = batches(claims[:cut]), batches(claims[cut:])
    want = scores(model, test)
    span = max(want) - min(want)
    peaks = calibrate(model, calibration)
    schemes = {name: quantized(model, f) for name, f in ACTIVATIONS.items()}
    schemes["smooth+token"] = quantized(model, fake_sym_token, peaks)
    schemes["smooth+token, outputs fp32"] = quantized(model, fake_sym_token, peaks, True)
    print(
        f"{cut} pairs, float32 score range {span:.3f}; bound: max error <= "
        f"{RANGE_SHARE:.0%} of it, Spearman >= {MIN_SPEARMAN}\n"
    )
    print("| scheme | max error / FP32 range | Spearman | within bound |\n|---|---|---|---|")
    for name, quant in schemes.items():
        got = scores(quant, test)
        err = max(abs(a - b) for a, b in zip(got, want, strict=True)) / span
        rho = spearman(got, want)
        ok = err <= RANGE_SHARE and rho >= MIN_SPEARMAN
        print(f"| {name} | {err:.2%} | {rho:.4f} | {'yes' if ok else 'no'} |")


if __name__ == "__main__":
    main()
