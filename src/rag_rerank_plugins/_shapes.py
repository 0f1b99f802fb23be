"""Pass lengths: the small fixed set of lengths a CPU pass is padded to (issue 21).

Why: the CPU kernels keep state per tensor shape. oneDNN's primitive cache and the ideep cache
above it (1024 entries each by default) hold a JIT-compiled kernel and its scratch memory per
distinct matmul shape, about 2.5 MiB per row count for a MiniLM layer's three linear shapes and
~1.2 MiB per attention shape. A pass padded to its own longest item has a shape of its own, so
on varied traffic the process grew for thousands of requests (MiniLM-L6 cross-encoder, BF16, 20
SciFact passages per request: RSS 709 -> 2767 MiB over 180 requests, still rising) and every new
shape paid a compilation. Emptying those caches (``ONEDNN_PRIMITIVE_CACHE_CAPACITY=0``,
``LRU_CACHE_CAPACITY=1``) kept RSS flat but made every pass compile again (10x slower); glibc
arenas (``MALLOC_ARENA_MAX=2``) were not the cause. The fix is fewer shapes, as TEI and vLLM do:
the torch and ONNX backends pad each CPU pass to :func:`bucket_length` of its longest item, and
the engine cuts passes of bounded sizes (:mod:`rag_rerank_plugins.engine.shapes`, which
re-exports this module's names).

:func:`bucket_length`: a multiple of 16 up to 128, then one of four steps per doubling (160,
192, 224, 256, 320, 384, 448, 512, ...), at most ``max_tokens``: 16 lengths up to 512; at most
15 pad tokens below 128 and 25 % above, ~5 % more tokens than the length sort's own padding on
SciFact. Lengths in multiples of 16 also suit the AMX tiles: BF16 requests ran ~6 % faster than
with passes padded to their longest (SciFact, requests alternating in one process), FP32 ones
the same.

Standard library only, outside the engine: backends may not import the engine.
"""

from __future__ import annotations

import os

__all__ = ["LENGTH_STEPS_PER_DOUBLING", "MIN_LENGTH_STEP", "bucket_length", "buckets_enabled"]

#: Lengths up to 128 are rounded up to a multiple of this (AMX tiles hold 16 rows).
MIN_LENGTH_STEP = 16
#: Above that, each doubling of the length is split into this many equal steps (at most
#: 1 / this of padding on top of the longest item). 8 steps padded ~2 % fewer tokens but made
#: 45 distinct shapes of 300 SciFact requests instead of 25, and RSS still rose 7 % between the
#: 100th and the 300th (4 % with 4 steps).
LENGTH_STEPS_PER_DOUBLING = 4


def buckets_enabled() -> bool:
    """Whether CPU passes are padded to bucket lengths (default yes). ``RAG_RERANK_SHAPE_BUCKETS=0``
    turns it off, passes then padded to their own longest item as before: for comparisons
    (``benchmarks/memory_plateau.py --no-buckets``), not for production. Read on every call
    (a dict lookup), so a benchmark can switch it between requests."""
    return os.environ.get("RAG_RERANK_SHAPE_BUCKETS", "1").strip().lower() not in _OFF


_OFF = ("0", "false", "no", "off")


def bucket_length(tokens: int, max_tokens: int | None, steps: int | None = None) -> int:
    """The length a pass whose longest item has ``tokens`` tokens is padded to.

    One of a fixed set (see the module docstring), never below ``tokens`` and never above
    ``max_tokens`` unless ``tokens`` already is (then ``tokens``: nothing pads past what the
    tokenizer produced). ``max_tokens`` None or <= 0: no cap. ``steps``: steps per doubling
    above the fine range (default :data:`LENGTH_STEPS_PER_DOUBLING`); a runtime whose per-shape
    state is cheaper than its padding asks for more (OpenVINO: ``_openvino_common``).
    """
    if tokens <= 0:
        return tokens
    step = MIN_LENGTH_STEP
    # Above the fine range, the step is 1/STEPS of the doubling the length falls in:
    # (128, 256] -> 32, (256, 512] -> 64, (512, 1024] -> 128, ...
    octave = 1 << ((tokens - 1).bit_length() - 1) if tokens > 1 else 1
    step = max(step, octave // (steps or LENGTH_STEPS_PER_DOUBLING))
    bucket = -(-tokens // step) * step
    if max_tokens is not None and max_tokens > 0:
        bucket = min(bucket, max(max_tokens, tokens))
    return bucket
