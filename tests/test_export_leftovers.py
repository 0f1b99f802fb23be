"""A process killed mid-export leaves a scratch folder in the export cache (a partial ONNX graph
or OpenVINO IR, up to the model's size); the next export into that cache removes it.

Only folders of this host and PID namespace whose process is gone are removed: an export in
progress (this process's other threads, another live process), another host's or container's
folders on a shared volume, and anything not named as our scratch folders are kept.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from rag_rerank_plugins.backends import _onnx_common
from rag_rerank_plugins.backends._onnx_common import scratch_dir, sweep_scratch

SRC = str(Path(__file__).resolve().parents[1] / "src")


def _killed_mid_export(cache: Path, prefix: str = ".tmp-ov-abc-") -> Path:
    """A scratch folder with a partial file, left by a process that died without cleaning up
    (``os._exit``: no finally blocks, as under SIGKILL or the OOM killer)."""
    code = textwrap.dedent(
        f"""
        import os, sys
        sys.path.insert(0, {SRC!r})
        from pathlib import Path
        from rag_rerank_plugins.backends._onnx_common import scratch_dir
        tmp = scratch_dir(Path({str(cache)!r}), {prefix!r})
        (tmp / "model.bin").write_bytes(b"half an IR")
        print(tmp.name, flush=True)
        os._exit(0)
        """
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    left = cache / out.stdout.strip()
    assert (left / "model.bin").exists()
    return left


def _dead_pid() -> int:
    done = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"],
        check=True,
        capture_output=True,
        text=True,
    )
    return int(done.stdout)


@pytest.mark.skipif(os.name == "nt", reason="process liveness is not probed on Windows")
def test_the_next_export_removes_a_dead_processes_scratch_folder(tmp_path: Path) -> None:
    left = _killed_mid_export(tmp_path)
    broken = _killed_mid_export(tmp_path, ".broken-ov-abc-")
    fresh = scratch_dir(tmp_path, ".tmp-ov-def-")
    assert fresh.is_dir()
    assert not left.exists()
    assert not broken.exists()


@pytest.mark.skipif(os.name == "nt", reason="process liveness is not probed on Windows")
def test_live_foreign_and_unrelated_folders_are_kept(tmp_path: Path) -> None:
    ours_in_progress = scratch_dir(tmp_path, ".tmp-onnx-abc-")  # another thread's export
    tag = _onnx_common._process_tag()
    other_tag = "0" * 8 if tag != "0" * 8 else "1" * 8
    dead = _dead_pid()
    other_host = tmp_path / f".tmp-onnx-abc-{other_tag}-{dead}-{'a' * 16}"
    entry = tmp_path / "onnx-0123456789abcdef"  # a published entry
    users = tmp_path / f".tmp-mine-{tag}-{dead}"  # not our name pattern (no random part)
    for folder in (other_host, entry, users):
        folder.mkdir()
    assert sweep_scratch(tmp_path) == []
    for folder in (ours_in_progress, other_host, entry, users):
        assert folder.is_dir()
    dead_ours = tmp_path / f".tmp-onnx-abc-{tag}-{dead}-{'b' * 16}"
    dead_ours.mkdir()
    assert sweep_scratch(tmp_path) == [dead_ours.name]


def test_liveness_is_never_probed_on_windows(monkeypatch: pytest.MonkeyPatch) -> None:
    """``os.kill(pid, 0)`` on Windows sends CTRL_C_EVENT: every folder counts as alive there."""
    dead = _dead_pid()
    calls = []
    monkeypatch.setattr(_onnx_common.os, "kill", lambda *a: calls.append(a))
    with monkeypatch.context() as m:
        m.setattr(_onnx_common.os, "name", "nt")
        alive = _onnx_common._alive(dead)
    assert alive
    assert calls == []


def test_a_missing_or_unreadable_cache_folder_sweeps_nothing(tmp_path: Path) -> None:
    assert sweep_scratch(tmp_path / "absent") == []


@pytest.mark.skipif(os.name == "nt", reason="process liveness is not probed on Windows")
def test_an_onnx_load_sweeps_the_leftover_of_a_killed_export(
    tmp_path: Path, tiny_ce_path: str
) -> None:
    pytest.importorskip("onnxruntime")
    from rag_rerank_plugins import ModelPool, ModelSpec

    cache = tmp_path / "cache"
    cache.mkdir()
    left = _killed_mid_export(cache, ".tmp-onnx-0123-")
    pool = ModelPool()
    try:
        spec = ModelSpec(
            tiny_ce_path, backend="onnx-cross-encoder", device="cpu", options={"cache_dir": cache}
        )
        assert len(pool.score_pairs(spec, [("q", "a passage")])) == 1
    finally:
        pool.clear()
    assert not left.exists()
    assert [p.name for p in cache.iterdir() if p.name.startswith(".")] == []
