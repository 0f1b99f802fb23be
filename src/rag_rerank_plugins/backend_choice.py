"""``backend="auto"``: the fastest backend for this CPU kind, chosen from measurements.

Which runtime is fastest for a cross-encoder on a CPU depends on the CPU's matrix units, and the
answer was measured rather than believed (``benchmarks/cpu_peers.py``, MiniLM-L6-shaped reranker,
1 query x 50 SciFact passages, our engine around each runtime; table in ``docs/openvino.md``):

* **Small models (hidden size <= 384, the MiniLM family) on AMX CPUs**: OpenVINO (attention
  fused, one stream per core) under our engine is ahead of or level with our torch path. For
  rerankers BF16 1.10x and FP32 1.02x (it was 1.77x / 1.17x before our torch path handed long
  passes to torch's fused attention on AMX); Spearman 0.999, max error 0.8 % of the FP32 score
  range in BF16. For embedders a tie on 64 passages (BF16 394 vs 399 ms, FP32 1142 vs 1136 ms),
  but one query in 4.5 vs 8.5 ms (cosine >= 0.99998 to FP32). So ``auto`` picks
  ``openvino-cross-encoder`` / ``openvino-embedder`` when ``openvino`` and ``onnxruntime`` are
  installed (extra ``openvino``), every option given is one that backend takes, the dtype is
  BF16 or FP32, and the model's ``config.json`` is on this machine to say its size.
* **Large rerankers** (the XLM-R large shape of bge-reranker-v2-m3, hidden size 1024): our torch
  path and OpenVINO's are level (3.52 vs 3.41 s for 1 x 20, idle, one run), so torch
  (``cross-encoder``) stays: no IR conversion and no second copy of the weights on disk for no
  measured gain; so does any model whose size is not known before the load.
* **Other CPU kinds** (AVX512-BF16 without AMX, AVX2-only, ARM) and GPUs: torch. The only
  figures there come from capping this AMX machine's instruction set (OpenVINO honours
  ``ONEDNN_MAX_CPU_ISA``, but its MLAS kernels and torch's MKL do not), which is not a
  measurement of those CPUs.

Figures: 2-core Intel Xeon (AMX, AVX512-BF16), ``benchmarks/cpu_peers.py`` (1 query x 50 SciFact
passages) and ``benchmarks/embedder_backends.py`` (64 passages), each run interleaved in one
process; the XLM-R figure from ``benchmarks/peers.py --shape xlmr``.

A GPU (``device`` "cuda"/"mps", or "auto" finding one) always means torch. The pick happens when
an adapter is built (adapters know whether they need a reranker or an embedder), and the adapter
then holds the concrete name, so its pool key equals that of an adapter naming the backend.
``RAG_RERANK_CPU_KIND`` (``amx``, ``avx512_bf16``, ``avx2``, ``other``) overrides the detected
kind, for tests and for machines whose flags lie (some VMs hide AMX).
"""

from __future__ import annotations

import importlib.util
from collections.abc import Iterable, Mapping
from typing import Any

from ._cpu import CPU_KINDS, CpuKind, cpu_kind
from .backends import backend_info
from .exceptions import ConfigurationError

__all__ = ["AUTO", "CPU_KINDS", "choose_backend", "cpu_kind"]

AUTO = "auto"

#: ``(kind, CPU kind) -> (backend, largest hidden size measured faster)`` where measurements
#: put another runtime ahead of torch.
_MEASURED_FASTEST: dict[tuple[str, CpuKind], tuple[str, int]] = {
    ("reranker", "amx"): ("openvino-cross-encoder", 384),
    ("embedder", "amx"): ("openvino-embedder", 384),
}
_TORCH_DEFAULT = {"reranker": "cross-encoder", "embedder": "sentence-transformers"}
#: What each non-torch pick needs installed (module names, checked without importing them).
_NEEDS = {
    "openvino-cross-encoder": ("openvino", "onnxruntime", "onnx"),
    "openvino-embedder": ("openvino", "onnxruntime", "onnx"),
}


def _installed(modules: Iterable[str]) -> bool:
    return all(importlib.util.find_spec(name) is not None for name in modules)


def _gpu(device: str) -> bool:
    if device.startswith(("cuda", "mps")):
        return True
    if device != "auto":
        return False
    from .policy import resolve_device, torch_available

    return torch_available() and resolve_device("auto") != "cpu"


#: The dtypes the OpenVINO picks were measured in ("auto" is one of them on any CPU).
_MEASURED_DTYPES = ("auto", "bfloat16", "float32")


def _hidden_size(model: str | None, options: Mapping[str, Any]) -> int | None:
    if model is None:
        return None
    from ._model_files import json_int_field
    from .offline import resolve_model_location

    revision, cache = (
        options.get("revision"),
        options.get("cache_folder") or options.get("cache_dir"),
    )
    return json_int_field(
        resolve_model_location(model),
        "config.json",
        "hidden_size",
        revision if isinstance(revision, str) else None,
        cache if isinstance(cache, str) else None,
    )


def choose_backend(
    kind: str,
    options: Mapping[str, Any] | Iterable[str] = (),
    device: str = "auto",
    dtype: str = "auto",
    model: str | None = None,
) -> str:
    """The backend ``backend="auto"`` means for a ``kind`` ("reranker"/"embedder") model.

    ``options``: the options (or their names) the caller passes; a measured-faster backend that
    does not take one of them is skipped (the caller's options keep their meaning). ``model``:
    the name or folder, whose ``config.json`` (local, or in the Hugging Face cache) gives the
    size the measurement covers; without it torch is the answer. The OpenVINO picks were
    measured in BF16 and FP32: a float16 request keeps torch."""
    if kind not in _TORCH_DEFAULT:
        raise ConfigurationError(
            f"backend='auto' needs kind 'reranker' or 'embedder', got {kind!r}."
        )
    fallback = _TORCH_DEFAULT[kind]
    measured = _MEASURED_FASTEST.get((kind, cpu_kind()))
    if measured is None:
        return fallback
    pick, largest = measured
    if not _installed(_NEEDS.get(pick, ())):
        return fallback
    accepted = backend_info(pick).options
    if accepted is not None and not set(options) <= accepted:
        return fallback
    if dtype not in _MEASURED_DTYPES or _gpu(device):
        return fallback
    size = _hidden_size(model, options if isinstance(options, Mapping) else {})
    if size is None or size > largest:
        return fallback
    return pick
