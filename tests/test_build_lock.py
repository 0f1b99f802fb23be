"""Worker processes that start together export and convert a model once (issue 22's caches).

A service's workers (``gunicorn -w 4``, ``uvicorn --workers``) load the same model at the same
moment into one export cache. Each used to export it (and convert it to an IR) on its own: the
atomic rename kept the cache right, but every worker held an export's memory at once and three
of four exports were thrown away. Now one process builds and the others wait, then load its
entry (:mod:`rag_rerank_plugins.backends._build_lock`).

What a user relies on, tested with real processes: exactly one export (and one conversion) among
processes racing on a cold cache, all of them scoring as the reference does; a builder killed
mid-build never leaves the others waiting; a waiter says in the log what it waits for; a cache
that holds the entry loads without creating any file; a folder where no lock can be taken builds
unlocked instead of failing.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from rag_rerank_plugins import ModelPool, ModelSpec
from rag_rerank_plugins.backends import _build_lock
from rag_rerank_plugins.backends._build_lock import build_lock, lock_path

SRC = str(Path(__file__).resolve().parents[1] / "src")
PAIRS = [("what is a cat", "a small domestic animal"), ("q", "an unrelated passage, longer")]


def _race(model: str, cache: Path, backend: str, workers: int) -> list[dict[str, Any]]:
    """``workers`` processes that load ``model`` into the cold ``cache`` at the same moment (each
    waits for a start file after saying it is ready) and score PAIRS; what each reports."""
    go = cache.parent / f"go-{backend}"
    code = textwrap.dedent(
        f"""
        import json, os, sys, time
        sys.path.insert(0, {SRC!r})
        from pathlib import Path
        from rag_rerank_plugins import ModelPool, ModelSpec
        from rag_rerank_plugins.backends import _onnx_common
        import sentence_transformers, onnxruntime  # imported before the start, as in a warm worker
        print("ready", flush=True)
        while not Path({str(go)!r}).exists():
            time.sleep(0.01)
        spec = ModelSpec({model!r}, backend={backend!r}, dtype="float32",
                         options={{"cache_dir": {str(cache)!r}}})
        scores = ModelPool().score_pairs(spec, {PAIRS!r})
        built = 0
        if "openvino" in {backend!r}:
            from rag_rerank_plugins.backends import _openvino_common
            built = _openvino_common.build_count()
        print(json.dumps({{"exports": _onnx_common.export_count(), "converted": built,
                          "scores": scores}}), flush=True)
        """
    )
    children = [
        subprocess.Popen(
            [sys.executable, "-c", code],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(workers)
    ]
    try:
        for child in children:
            assert child.stdout is not None
            line = child.stdout.readline()
            assert line.strip() == "ready", child.stderr.read() if child.stderr else line
        go.touch()
        reports = []
        for child in children:
            out, err = child.communicate(timeout=300)
            assert child.returncode == 0, err[-3000:]
            reports.append(json.loads(out.strip().splitlines()[-1]))
        return reports
    finally:
        for child in children:
            if child.poll() is None:
                child.kill()


def _reference(model: str) -> list[float]:
    from sentence_transformers import CrossEncoder

    return [float(s) for s in CrossEncoder(model, device="cpu").predict(PAIRS)]


def test_processes_racing_on_a_cold_cache_export_once(tiny_ce_path: str, tmp_path: Path) -> None:
    pytest.importorskip("onnxruntime")
    pytest.importorskip("sentence_transformers")
    cache = tmp_path / "cache"
    reports = _race(tiny_ce_path, cache, "onnx-cross-encoder", workers=3)
    assert sum(r["exports"] for r in reports) == 1, reports
    ref = _reference(tiny_ce_path)
    for report in reports:
        assert report["scores"] == pytest.approx(ref, abs=1e-4)
    entries = [p for p in cache.iterdir() if not p.name.startswith(".")]
    assert len(entries) == 1  # one entry, and no scratch folder left behind
    assert [p.name for p in cache.iterdir() if p.name.startswith(".tmp")] == []


def test_processes_racing_on_a_cold_cache_convert_to_openvino_once(
    tiny_ce_path: str, tmp_path: Path
) -> None:
    pytest.importorskip("openvino")
    pytest.importorskip("onnxruntime")
    pytest.importorskip("sentence_transformers")
    cache = tmp_path / "cache"
    reports = _race(tiny_ce_path, cache, "openvino-cross-encoder", workers=2)
    assert sum(r["exports"] for r in reports) == 1, reports  # the ONNX twin
    assert sum(r["converted"] for r in reports) == 1, reports  # its IR
    ref = _reference(tiny_ce_path)
    for report in reports:
        assert report["scores"] == pytest.approx(ref, abs=1e-3)


def test_a_cached_entry_loads_without_creating_any_file(
    tiny_ce_path: str, tmp_path: Path, pool: ModelPool
) -> None:
    """A read-only cache (built in an image, mounted read-only) must load: the lock is only
    taken to build, so a load of a cached entry writes nothing, lock files included."""
    pytest.importorskip("onnxruntime")
    cache = tmp_path / "cache"
    spec = ModelSpec(tiny_ce_path, backend="onnx-cross-encoder", options={"cache_dir": str(cache)})
    first = pool.score_pairs(spec, PAIRS)  # exported: its lock file is gone once it is done
    pool.clear()
    assert list(cache.glob(".lock-*")) == []
    before = sorted(p.name for p in cache.rglob("*"))
    assert pool.score_pairs(spec, PAIRS) == pytest.approx(first, abs=1e-6)
    assert sorted(p.name for p in cache.rglob("*")) == before


_HOLDER = textwrap.dedent(
    f"""
    import sys, time
    sys.path.insert(0, {SRC!r})
    from pathlib import Path
    from rag_rerank_plugins.backends._build_lock import build_lock
    with build_lock(Path(sys.argv[1]), "ONNX export") as held:
        assert held
        print("held", flush=True)
        time.sleep(float(sys.argv[2]))
    """
)


def _holder(entry: Path, seconds: float) -> subprocess.Popen[str]:
    """Another process that holds ``entry``'s build lock for ``seconds``."""
    entry.parent.mkdir(parents=True, exist_ok=True)
    child = subprocess.Popen(
        [sys.executable, "-c", _HOLDER, str(entry), str(seconds)],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert child.stdout is not None
    assert child.stdout.readline().strip() == "held"
    return child


def test_a_builder_waits_for_the_other_process_and_says_so(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    entry = tmp_path / "cache" / "entry"
    holder = _holder(entry, 1.5)
    started = time.monotonic()
    with (
        caplog.at_level(logging.INFO, logger="rag_rerank_plugins"),
        build_lock(entry, "ONNX export") as held,
    ):
        waited = time.monotonic() - started
        assert held
    holder.wait(timeout=30)
    assert waited > 0.8  # it waited for the holder to finish
    assert any(
        "another process is building the ONNX export" in r.getMessage()
        and str(entry) in r.getMessage()
        for r in caplog.records
    )


def test_the_waiter_keeps_logging_while_it_waits(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(_build_lock, "WAIT_LOG_S", 0.2)
    entry = tmp_path / "entry"
    holder = _holder(entry, 1.0)
    with (
        caplog.at_level(logging.INFO, logger="rag_rerank_plugins"),
        build_lock(entry, "OpenVINO IR") as held,
    ):
        assert held
    holder.wait(timeout=30)
    assert any("still waiting for the OpenVINO IR" in r.getMessage() for r in caplog.records)


@pytest.mark.skipif(os.name == "nt", reason="SIGKILL")
def test_a_builder_killed_mid_build_never_leaves_the_others_waiting(tmp_path: Path) -> None:
    """The OOM killer or SIGKILL ends the builder without any cleanup: the kernel drops its lock
    with the process, so the waiter goes on at once (no stale lock file to time out)."""
    entry = tmp_path / "entry"
    holder = _holder(entry, 600)
    got: list[float] = []

    def wait() -> None:
        with build_lock(entry, "ONNX export"):
            got.append(time.monotonic())

    waiter = threading.Thread(target=wait, daemon=True)
    waiter.start()
    time.sleep(0.5)
    assert not got  # still held
    killed = time.monotonic()
    holder.send_signal(signal.SIGKILL)
    holder.wait(timeout=30)
    waiter.join(timeout=30)
    assert got
    assert got[0] - killed < 10


def test_no_lock_where_none_can_be_taken_builds_unlocked(tmp_path: Path) -> None:
    """A cache path under a file (or a folder the process may not write): the build goes on
    unlocked, as before, and fails (if it must) where it writes, naming the folder."""
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    with build_lock(blocker / "cache" / "entry", "ONNX export") as held:
        assert held is False


def test_the_lock_is_released_and_removed_when_the_build_fails(tmp_path: Path) -> None:
    entry = tmp_path / "entry"
    seen: list[bool] = []

    def failing_build() -> None:
        with build_lock(entry, "ONNX export"):
            seen.append(lock_path(entry).exists())
            raise RuntimeError("the export failed")

    with pytest.raises(RuntimeError, match="export failed"):
        failing_build()
    assert seen == [True]
    assert list(tmp_path.iterdir()) == []  # no lock file left in the user's cache folder
    holder = _holder(entry, 0)  # another process gets it at once
    holder.wait(timeout=30)
    assert holder.returncode == 0


def test_the_sweep_of_scratch_folders_leaves_a_held_lock_alone(tmp_path: Path) -> None:
    from rag_rerank_plugins.backends._onnx_common import sweep_scratch

    entry = tmp_path / "0123abcd"
    with build_lock(entry, "ONNX export"):
        sweep_scratch(tmp_path)
        assert lock_path(entry).exists()


@pytest.mark.skipif(os.name == "nt", reason="no flock: Windows builds unlocked")
@settings(max_examples=15, deadline=None)
@given(
    holds=st.lists(st.floats(min_value=0, max_value=0.004), min_size=12, max_size=40),
    builders=st.integers(min_value=2, max_value=6),
)
def test_one_holder_at_a_time_though_every_holder_removes_the_file(
    holds: list[float], builders: int, tmp_path_factory: pytest.TempPathFactory
) -> None:
    """Every release removes the lock file while others wait on it (and newcomers create a new
    one): still never two holders at once. flock locks on separate descriptors exclude each other
    within one process too, so threads stand in for processes here."""
    entry = tmp_path_factory.mktemp("lock") / "entry"
    inside, most, done = [0], [0], [0]
    guard = threading.Lock()
    work = list(holds)

    def builder() -> None:
        while True:
            with guard:
                if not work:
                    return
                hold = work.pop()
            with build_lock(entry, "ONNX export") as held:
                assert held
                with guard:
                    inside[0] += 1
                    most[0] = max(most[0], inside[0])
                time.sleep(hold)
                with guard:
                    inside[0] -= 1
                    done[0] += 1

    threads = [threading.Thread(target=builder) for _ in range(builders)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert done[0] == len(holds)
    assert most[0] == 1
    assert not lock_path(entry).exists()


def test_a_caller_waiting_behind_another_process_s_export_gets_its_timeout(
    tiny_ce_path: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The waiting is a load: a call's ``timeout`` answers the caller at its deadline (never a
    hang), the load goes on, and once the other process lets go this process exports and
    serves."""
    pytest.importorskip("onnxruntime")
    from rag_rerank_plugins import RequestTimeoutError

    def spec_in(cache: Path) -> ModelSpec:
        options = {"cache_dir": str(cache)}
        return ModelSpec(tiny_ce_path, backend="onnx-cross-encoder", options=options)

    probe = ModelPool()  # the entry's name: the same key in any cache folder
    probe.score_pairs(spec_in(tmp_path / "probe"), PAIRS)
    probe.clear()
    (name,) = [p.name for p in (tmp_path / "probe").iterdir() if not p.name.startswith(".")]
    cache = tmp_path / "cache"
    holder = _holder(cache / name, 3.0)  # another process exporting it
    pool = ModelPool()
    try:
        started = time.monotonic()
        with (
            caplog.at_level(logging.INFO, logger="rag_rerank_plugins"),
            pytest.raises(RequestTimeoutError, match="still loading"),
        ):
            pool.score_pairs(spec_in(cache), PAIRS, timeout=0.5)
        assert time.monotonic() - started < 2.5  # answered at its deadline, not the holder's
        holder.wait(timeout=30)
        assert pool.score_pairs(spec_in(cache), PAIRS, timeout=120) == pytest.approx(
            _reference(tiny_ce_path), abs=1e-4
        )
        assert any("another process is building" in r.getMessage() for r in caplog.records)
    finally:
        pool.clear()
