"""oneDNN's primitive cache is emptied when the last CPU model of a pool is released.

What a user relies on: ``pool.release()`` gives back the kernels oneDNN compiled for the model
(the ~70 MiB that kept RSS ~20 % above the pre-load figure), the cache keeps working afterwards
(same capacity, same results), nothing happens while another CPU model still uses it, and a
library without the symbol, or ``RAG_RERANK_ONEDNN_FLUSH=0``, changes nothing and never fails.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest

from rag_rerank_plugins import ModelPool, ModelSpec, _onednn

torch = pytest.importorskip("torch")

pytestmark = pytest.mark.skipif(
    not sys.platform.startswith("linux") or _onednn._functions() is None,
    reason="needs Linux and a libtorch_cpu.so with a symbol table (the PyPI wheels have one)",
)


def test_flush_keeps_the_capacity_and_results() -> None:
    capacity = _onednn.primitive_cache_capacity()
    assert capacity is not None
    assert capacity > 0
    x = torch.randn(7, 64, dtype=torch.bfloat16)
    w = torch.randn(32, 64, dtype=torch.bfloat16)
    before = torch.nn.functional.linear(x, w)
    assert _onednn.flush_primitive_cache() is True
    assert _onednn.primitive_cache_capacity() == capacity
    assert torch.equal(torch.nn.functional.linear(x, w), before)


def test_switched_off_by_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RAG_RERANK_ONEDNN_FLUSH", "0")
    assert _onednn.flush_primitive_cache() is False


@pytest.mark.parametrize("content", [b"not an ELF file at all", b"\x7fELF\x02\x01" + b"\0" * 80])
def test_a_library_without_the_symbol_changes_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, content: bytes
) -> None:
    fake = tmp_path / "libtorch_cpu.so"
    fake.write_bytes(content)
    monkeypatch.setattr(_onednn, "_torch_cpu_library", lambda: fake)
    _onednn._functions.cache_clear()
    try:
        assert _onednn._functions() is None
        assert _onednn.flush_primitive_cache() is False
        assert _onednn.primitive_cache_capacity() is None
    finally:
        _onednn._functions.cache_clear()


def test_flushed_only_when_the_last_cpu_model_goes(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[int] = []
    monkeypatch.setattr(_onednn, "flush_primitive_cache", lambda: calls.append(1) or True)
    reranker = ModelSpec("m", backend="fake-reranker", device="cpu")
    embedder = ModelSpec("m", backend="fake-embedder", device="cpu")
    pool = ModelPool()
    pool.get(reranker)
    pool.get(embedder)
    pool.release(reranker)
    assert calls == []  # the embedder still runs on the CPU
    pool.release(embedder)
    assert calls == [1]
    pool.get(reranker)
    pool.clear()
    assert calls == [1, 1]


_CHILD = textwrap.dedent(
    """
    import json, sys
    import torch
    from rag_rerank_plugins import _onednn
    from rag_rerank_plugins._memory import free_memory, rss_bytes

    free_memory()
    before = rss_bytes()
    # oneDNN's own FP32 linear (ideep), not torch's BF16 dispatch: every x86 CPU runs it
    # through oneDNN (an AVX2-only CPU sends BF16 matmuls elsewhere), so the test does not
    # depend on the host's ISA.
    w = torch.randn(1536, 384).to_mkldnn()
    with torch.inference_mode():
        for rows in range(1, 400, 3):  # many shapes: one primitive each
            torch._C._nn.mkldnn_linear(torch.randn(rows, 384).to_mkldnn(), w)
    free_memory()
    grown = rss_bytes()
    flushed = _onednn.flush_primitive_cache()
    free_memory()
    print(json.dumps({"before": before, "grown": grown, "after": rss_bytes(), "ok": flushed}))
    """
)


def _child(**env: str) -> dict[str, Any]:
    import os

    out = subprocess.run(
        [sys.executable, "-c", _CHILD],
        capture_output=True,
        text=True,
        timeout=300,
        check=True,
        env={**os.environ, **env},
    )
    result: dict[str, Any] = json.loads(out.stdout.strip().splitlines()[-1])
    return result


def test_flush_gives_the_compiled_kernels_back() -> None:
    """~130 oneDNN linear shapes grow RSS by ~90 MiB (measured, 2-core AMX Xeon, also with
    ``ONEDNN_MAX_CPU_ISA=AVX2``), of which the flush gives back ~37 MiB; with the flush switched
    off nothing comes back."""
    if not torch.backends.mkldnn.is_available():
        pytest.skip("this torch build has no oneDNN")
    on, off = _child(), _child(RAG_RERANK_ONEDNN_FLUSH="0")
    assert on["ok"], on
    assert not off["ok"], off
    freed_on, freed_off = on["grown"] - on["after"], off["grown"] - off["after"]
    assert on["grown"] - on["before"] > 24 << 20, on  # the cache held something worth measuring
    assert freed_on > 16 << 20, on
    assert freed_on > freed_off + (12 << 20), (on, off)
