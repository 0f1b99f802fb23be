"""``backend="auto"``: the fastest backend for this CPU kind, chosen from measurements.

Which runtime is fastest for a cross-encoder on a CPU depends on the CPU's matrix units, and the
answer was measured rather than believed (``benchmarks/cpu_peers.py``, MiniLM-L6-shaped reranker,
1 query x 50 SciFact passages, our engine around each runtime; table in ``docs/openvino.md``):

* **AMX (Intel Xeon 4th gen and later)**: OpenVINO with its BF16 hint is 1.24x our torch BF16
  path, within the quality bound (Spearman 0.999, max error 0.9 % of the FP32 score range), so
  ``auto`` picks ``openvino-cross-encoder`` when ``openvino`` and ``onnxruntime`` are installed
  (extra ``openvino``) and every option given is one that backend takes.
* **Everything else** (AVX512-BF16 without AMX, AVX2-only, ARM, GPUs): torch (``cross-encoder``).
  On CPUs without AMX no OpenVINO figure was measured yet, and OpenVINO's FP32 ran at 0.45x our
  FP32 path on the AMX machine, so torch stays the pick until a run says otherwise.
* **Embedders**: torch (``sentence-transformers``) everywhere until the embedder runs are in.

A GPU (``device`` "cuda"/"mps", or "auto" finding one) always means torch. The pick happens when
an adapter is built (adapters know whether they need a reranker or an embedder), and the adapter
then holds the concrete name, so its pool key equals that of an adapter naming the backend.
``RAG_RERANK_CPU_KIND`` (``amx``, ``avx512_bf16``, ``avx2``, ``other``) overrides the detected
kind, for tests and for machines whose flags lie (some VMs hide AMX).
"""

from __future__ import annotations

import functools
import importlib.util
import os
from collections.abc import Iterable
from typing import Literal

from .backends import backend_info
from .exceptions import ConfigurationError

__all__ = ["AUTO", "CPU_KINDS", "choose_backend", "cpu_kind"]

AUTO = "auto"
CpuKind = Literal["amx", "avx512_bf16", "avx2", "other"]
CPU_KINDS: tuple[CpuKind, ...] = ("amx", "avx512_bf16", "avx2", "other")
KIND_ENV = "RAG_RERANK_CPU_KIND"

#: ``(kind, CPU kind) -> backend`` where measurements put another runtime ahead of torch.
_MEASURED_FASTEST: dict[tuple[str, CpuKind], str] = {
    ("reranker", "amx"): "openvino-cross-encoder",
}
_TORCH_DEFAULT = {"reranker": "cross-encoder", "embedder": "sentence-transformers"}
#: What each non-torch pick needs installed (module names, checked without importing them).
_NEEDS = {"openvino-cross-encoder": ("openvino", "onnxruntime", "onnx")}


@functools.lru_cache(maxsize=1)
def _cpu_flags() -> frozenset[str]:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as fh:
            for line in fh:
                if line.startswith(("flags", "Features")):
                    return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()


def cpu_kind() -> CpuKind:
    """This CPU's kind for the backend choice (``RAG_RERANK_CPU_KIND`` overrides the flags)."""
    override = os.environ.get(KIND_ENV, "").strip().lower()
    if override:
        if override not in CPU_KINDS:
            raise ConfigurationError(
                f"{KIND_ENV} must be one of {', '.join(CPU_KINDS)}, got {override!r}."
            )
        return override
    flags = _cpu_flags()
    if "amx_bf16" in flags:
        return "amx"
    if "avx512_bf16" in flags:
        return "avx512_bf16"
    if "avx2" in flags:
        return "avx2"
    return "other"


def _installed(modules: Iterable[str]) -> bool:
    return all(importlib.util.find_spec(name) is not None for name in modules)


def _gpu(device: str) -> bool:
    if device.startswith(("cuda", "mps")):
        return True
    if device != "auto":
        return False
    from .policy import resolve_device, torch_available

    return torch_available() and resolve_device("auto") != "cpu"


def _bf16(dtype: str) -> bool:
    if dtype == "bfloat16":
        return True
    from .policy import cpu_has_native_bf16

    return dtype == "auto" and cpu_has_native_bf16()


def choose_backend(
    kind: str, options: Iterable[str] = (), device: str = "auto", dtype: str = "auto"
) -> str:
    """The backend ``backend="auto"`` means for a ``kind`` ("reranker"/"embedder") model.

    ``options``: the option names the caller passes; a measured-faster backend that does not
    take one of them is skipped (the caller's options keep their meaning). The OpenVINO pick was
    measured in BF16 only: a float32 (or float16) request, or the BF16 policy switched off
    (``RAG_RERANK_CPU_BF16=0``), keeps torch."""
    if kind not in _TORCH_DEFAULT:
        raise ConfigurationError(
            f"backend='auto' needs kind 'reranker' or 'embedder', got {kind!r}."
        )
    fallback = _TORCH_DEFAULT[kind]
    pick = _MEASURED_FASTEST.get((kind, cpu_kind()))
    if pick is None or not _installed(_NEEDS.get(pick, ())):
        return fallback
    accepted = backend_info(pick).options
    if accepted is not None and not set(options) <= accepted:
        return fallback
    if not _bf16(dtype) or _gpu(device):
        return fallback
    return pick
