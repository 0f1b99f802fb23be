"""``backend="auto"``: the fastest backend for this CPU kind, chosen from measurements.

Which runtime is fastest for a cross-encoder on a CPU depends on the CPU's matrix units, and the
answer was measured rather than believed (``benchmarks/cpu_peers.py``, MiniLM-L6-shaped reranker,
1 query x 50 SciFact passages, our engine around each runtime; table in ``docs/openvino.md``):

* **Small embedders (hidden size <= 384, the MiniLM family) on AMX CPUs**: OpenVINO (attention
  fused, one stream per core) under our engine embeds one query in 7.4 ms against torch's 12.6
  (1.7x; the call a RAG request waits for), 64 passages in 463 vs 439 ms (torch 1.05x); cosine
  >= 0.99998 to FP32. So ``auto`` picks ``openvino-embedder`` when ``openvino`` and
  ``onnxruntime`` are installed (extra ``openvino``), every option given is one that backend
  takes, the dtype is BF16 or FP32, and the model's ``config.json`` is on this machine to say its
  size.
* **Small embedders on AVX512-BF16 CPUs without AMX** (AMD Zen 4 EPYC): the same pick, measured
  there on 2026-12-05 (``embedder_backends.py``, 7 rounds): one query 8.4 vs 12.4 ms (1.48x), 64
  passages 1132 vs 1290 ms (1.14x), BF16 on both; FP32 10.9 vs 14.9 ms and 2030 vs 2077 ms;
  cosine >= 0.99997 to FP32.
* **Small rerankers on AVX512-BF16 CPUs without AMX, in BF16**: ``openvino-cross-encoder``.
  Measured there (``peers.py``, MiniLM-L6, 1 x 50 SciFact, each system in its own process,
  interleaved): 1525 vs 1668 ms (5 rounds) and 1447 vs 1640 ms (7 rounds), 1.09-1.13x, both
  within the quality bound (max error 0.95 vs 1.03 % of the FP32 range). In FP32 torch was
  level (2612 vs 2679 ms, torch ahead), and on the XLM-R large shape (1 x 20, BF16) too (14.97
  vs 14.50 s, 1.03x): both keep torch. A float32 policy (``RAG_RERANK_CPU_BF16=0``) makes
  ``dtype="auto"`` FP32, which keeps torch.
* **Rerankers** everywhere else, small and large: torch (``cross-encoder``). On AMX, small
  (MiniLM-L6, 1 x 50 SciFact):
  OpenVINO BF16 633 vs torch 644 ms (1.02x), FP32 1856 vs 1801 ms (torch 1.03x), since torch's
  path cuts padded keys from long attention passes; OpenVINO had been 1.10x / 1.02x ahead, and
  ``auto`` picked it until then. The XLM-R large shape of bge-reranker-v2-m3: level before
  that (4.15 vs 4.26 s for 1 x 20, idle, one run); since, our torch default is 1.25-1.27x the
  one-line OpenVINO peer. Level speed buys nothing for an IR conversion at the first load and a
  second copy of the weights on disk; torch also serves any model whose size is not known
  before the load.
* **Other CPU kinds** (AVX2-only, ARM) and GPUs: torch. The only figures there come from
  capping an AMX machine's instruction set (OpenVINO honours ``ONEDNN_MAX_CPU_ISA``, but its
  MLAS kernels and torch's MKL do not), which is not a measurement of those CPUs.

Figures: 2-core Intel Xeon (AMX, AVX512-BF16) and 2-core AMD EPYC (Zen 4, AVX512-BF16, no AMX),
``benchmarks/cpu_peers.py`` (1 query x 50 SciFact passages) and
``benchmarks/embedder_backends.py`` (64 passages), each run interleaved in one process; the
XLM-R figures and the EPYC reranker figures from ``benchmarks/peers.py`` (tables in
``benchmarks/results/`` and ``benchmarks/results/amd-epyc/``).

A GPU (``device`` "cuda"/"mps", or "auto" finding one) always means torch. The pick happens when
an adapter is built (adapters know whether they need a reranker or an embedder), and the adapter
then holds the concrete name, so its pool key equals that of an adapter naming the backend.
If that pick then fails to load the model (an export its runtime cannot do), the adapter falls
back to torch with a warning and :func:`note_failed_pick` keeps ``auto`` from making the pick
for that model again in this process (a retriever built per request would otherwise retry the
conversion on every request). ``RAG_RERANK_CPU_KIND`` (``amx``, ``avx512_bf16``, ``avx2``,
``other``) overrides the detected kind, for tests and for machines whose flags lie (some VMs
hide AMX).
"""

from __future__ import annotations

import importlib.util
from collections.abc import Iterable, Mapping
from typing import Any, NamedTuple

from ._cpu import CPU_KINDS, CpuKind, cpu_kind
from ._forksafe import ForkSafeLock
from .backends import backend_info
from .exceptions import ConfigurationError
from .spec import _normalize_device, _normalize_dtype

__all__ = [
    "AUTO",
    "CPU_KINDS",
    "choose_backend",
    "cpu_kind",
    "failed_picks",
    "forget_failed_picks",
    "is_auto",
    "note_failed_pick",
    "torch_backend",
]

AUTO = "auto"


def is_auto(backend: object) -> bool:
    """Whether ``backend`` asks for the pick (``"auto"`` in any case, spaces around it)."""
    return isinstance(backend, str) and backend.strip().lower() == AUTO


class _Pick(NamedTuple):
    """A runtime measured ahead of torch: for models up to ``largest`` hidden units, in
    ``dtypes`` (``"auto"`` counts as the dtype the CPU policy gives it: BF16 on native-BF16
    CPUs, else FP32)."""

    backend: str
    largest: int
    dtypes: tuple[str, ...] = ("bfloat16", "float32")


#: ``(kind, CPU kind) -> _Pick`` where measurements put another runtime ahead of torch.
_MEASURED_FASTEST: dict[tuple[str, CpuKind], _Pick] = {
    ("embedder", "amx"): _Pick("openvino-embedder", 384),
    ("embedder", "avx512_bf16"): _Pick("openvino-embedder", 384),
    # BF16 only: in FP32 torch was level (2612 vs 2679 ms, torch ahead). XLM-R large: level.
    ("reranker", "avx512_bf16"): _Pick("openvino-cross-encoder", 384, ("bfloat16",)),
}
_TORCH_DEFAULT = {"reranker": "cross-encoder", "embedder": "sentence-transformers"}
#: What each non-torch pick needs installed (module names, checked without importing them).
_NEEDS = {
    "openvino-cross-encoder": ("openvino", "onnxruntime", "onnx"),
    "openvino-embedder": ("openvino", "onnxruntime", "onnx"),
}


#: ``(backend, model)`` picks whose load failed in this process (an export or conversion the
#: runtime could not do): ``auto`` answers torch for them from then on, so an adapter built per
#: request does not retry a failing conversion on every request.
_failed: set[tuple[str, str]] = set()
_failed_lock = ForkSafeLock()


def note_failed_pick(backend: str, model: str) -> None:
    """Remember that ``backend`` (an ``auto`` pick) failed to load ``model`` in this process."""
    with _failed_lock:
        _failed.add((backend, model))


def failed_picks() -> frozenset[tuple[str, str]]:
    """The ``(backend, model)`` picks ``auto`` no longer makes in this process."""
    with _failed_lock:
        return frozenset(_failed)


def forget_failed_picks() -> None:
    """Let ``auto`` try every measured pick again (e.g. after installing a fixed runtime)."""
    with _failed_lock:
        _failed.clear()


def torch_backend(kind: str) -> str:
    """The torch backend ``auto`` falls back to for a ``kind`` ("reranker"/"embedder")."""
    return _TORCH_DEFAULT[kind]


def _installed(modules: Iterable[str]) -> bool:
    return all(importlib.util.find_spec(name) is not None for name in modules)


def _gpu(device: str) -> bool:
    if device.startswith(("cuda", "mps")):
        return True
    if device != "auto":
        return False
    from .policy import resolve_device, torch_available

    return torch_available() and resolve_device("auto") != "cpu"


def _policy_dtype(dtype: str) -> str:
    """``dtype`` with ``"auto"`` read as the CPU policy reads it (the picks are CPU-only); an
    explicit dtype stays as asked (float16 keeps torch rather than becoming FP32)."""
    if dtype != "auto":
        return dtype
    from .policy import decide_dtype

    return decide_dtype("auto", "cpu").dtype


def _hidden_size(model: str | None, options: Mapping[str, Any]) -> int | None:
    if model is None:
        return None
    from ._model_files import json_int_field
    from .offline import resolve_model_location

    # The Hugging Face cache is ``cache_folder`` for every embedder and reranker backend auto
    # picks between; ``cache_dir`` is the ONNX/OpenVINO *export* cache, not where config.json is.
    revision, cache = options.get("revision"), options.get("cache_folder")
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
    size the measurement covers; without it torch is the answer. Each pick holds for the
    dtypes it was measured faster in (``"auto"`` read as the CPU policy reads it): a float16
    request keeps torch. ``device`` and ``dtype`` take every
    spelling :class:`~rag_rerank_plugins.ModelSpec` takes ("CUDA", "cuda:0", "bf16",
    "torch.float32") with the same meaning, others are a ConfigurationError. A pick that failed
    to load this model in this process (:func:`note_failed_pick`, done by the adapters) is not
    made again."""
    if kind not in _TORCH_DEFAULT:
        raise ConfigurationError(
            f"backend='auto' needs kind 'reranker' or 'embedder', got {kind!r}."
        )
    # Spelled as ModelSpec spells them ("CUDA" -> "cuda:0", "bf16" -> "bfloat16"): every
    # spelling the adapters accept makes the same pick, so it lands in the same pool slot.
    device, dtype = _normalize_device(device), _normalize_dtype(dtype)
    fallback = _TORCH_DEFAULT[kind]
    measured = _MEASURED_FASTEST.get((kind, cpu_kind()))
    if measured is None:
        return fallback
    pick, largest, dtypes = measured
    if not _installed(_NEEDS.get(pick, ())):
        return fallback
    accepted = backend_info(pick).options
    if accepted is not None and not set(options) <= accepted:
        return fallback
    if _policy_dtype(dtype) not in dtypes or _gpu(device):
        return fallback
    size = _hidden_size(model, options if isinstance(options, Mapping) else {})
    if size is None or size > largest or (pick, str(model)) in failed_picks():
        return fallback
    return pick
