"""Apple MPS allocator settings: the cache cap (high watermark) and emptying the cache per call.

Why: torch's MPS allocator keeps freed blocks cached up to a *high watermark*, a ratio of
Metal's ``recommendedMaxWorkingSetSize`` (default 1.7, so more than the recommended size; 0 means
no limit). On a Mac that also runs other programs, a reranker's cache can grow until the system
swaps. torch reads ``PYTORCH_MPS_HIGH_WATERMARK_RATIO`` once, when its MPS allocator starts, so
the variable works only when it is set before torch is imported; afterwards the same cap is set
with ``torch.mps.set_per_process_memory_fraction``. :func:`apply_high_watermark` picks the right
one for the moment the pool is created and never imports torch itself:

* torch not imported yet: set ``PYTORCH_MPS_HIGH_WATERMARK_RATIO`` (and, when the ratio is below
  torch's default *low* watermark of 1.4 and ``PYTORCH_MPS_LOW_WATERMARK_RATIO`` is unset, the
  low watermark to the same ratio: torch refuses to start its allocator with low > high,
  "invalid low watermark ratio 1.4"). A value the user exported differently is overridden, with
  a warning: the pool's setting is the more specific one; so is an exported low watermark above
  the pool's ratio (it would stop torch's allocator from starting).
* torch imported, MPS available: ``torch.mps.set_per_process_memory_fraction(ratio)``, with a
  warning that the variable came too late (so the log says which way it went).
* torch imported, no MPS: nothing to do.

The allocator is per process, so the last pool created with a ratio sets it for every pool.
:func:`empty_cache` is what the pool calls after each request when ``mps_empty_cache`` is on.
"""

from __future__ import annotations

import logging
import os
import sys

from ._forksafe import ForkSafeLock

__all__ = ["HIGH_ENV", "LOW_ENV", "apply_high_watermark", "empty_cache"]

logger = logging.getLogger(__name__)

#: torch's variables (read once, when its MPS allocator starts).
HIGH_ENV = "PYTORCH_MPS_HIGH_WATERMARK_RATIO"
LOW_ENV = "PYTORCH_MPS_LOW_WATERMARK_RATIO"
#: torch's default low watermark on unified memory (Apple silicon); 1.0 on discrete GPUs.
_DEFAULT_LOW = 1.4

_lock = ForkSafeLock()
_applied: float | None = None


def _mps_available(torch: object) -> bool:
    backends = getattr(torch, "backends", None)
    mps = getattr(backends, "mps", None)
    try:
        return bool(mps is not None and mps.is_available())
    except Exception:  # a broken or partial build: treat as no MPS
        return False


def _ratio(text: str) -> float:
    """A watermark variable's value; one that is not a number counts as 0 (torch reports it)."""
    try:
        return float(text)
    except ValueError:
        return 0.0


def apply_high_watermark(ratio: float | None) -> str:
    """Cap the MPS allocator at ``ratio`` (see the module docstring); returns how: ``""`` (no
    ratio, or no MPS in an imported torch), ``"environment"`` or ``"torch"``."""
    global _applied
    if ratio is None:
        return ""
    ratio = float(ratio)
    text = f"{ratio:g}"
    with _lock:
        if _applied is not None and _applied != ratio:
            logger.warning(
                "rag-rerank: the MPS allocator's high watermark was set to %g by another pool; "
                "it is per process, so %g now applies to every pool.",
                _applied,
                ratio,
            )
        torch = sys.modules.get("torch")
        if torch is None:
            given = os.environ.get(HIGH_ENV)
            if given is not None and given != text:
                logger.warning(
                    "rag-rerank: %s=%s in the environment is replaced by the pool's "
                    "mps_high_watermark_ratio=%s.",
                    HIGH_ENV,
                    given,
                    text,
                )
            os.environ[HIGH_ENV] = text
            low = os.environ.get(LOW_ENV)
            if 0 < ratio < _DEFAULT_LOW and low is None:
                os.environ[LOW_ENV] = text  # torch refuses low > high at allocator start
            elif ratio > 0 and low is not None and _ratio(low) > ratio:
                logger.warning(
                    "rag-rerank: %s=%s in the environment is above the pool's "
                    "mps_high_watermark_ratio=%s, which torch refuses when its MPS allocator "
                    "starts; it is lowered to %s.",
                    LOW_ENV,
                    low,
                    text,
                    text,
                )
                os.environ[LOW_ENV] = text
            _applied = ratio
            return "environment"
        if not _mps_available(torch):
            return ""
        torch.mps.set_per_process_memory_fraction(ratio)
        _applied = ratio
    logger.warning(
        "rag-rerank: torch was imported before the pool was created, so %s would come too "
        "late; the MPS high watermark %s was set with torch.mps.set_per_process_memory_fraction "
        "instead (the same cap). Create the pool before importing torch to use the variable.",
        HIGH_ENV,
        text,
    )
    return "torch"


def empty_cache() -> None:
    """Give the MPS allocator's cached, unused blocks back (no-op without torch or MPS)."""
    torch = sys.modules.get("torch")
    if torch is not None and _mps_available(torch):
        torch.mps.empty_cache()
