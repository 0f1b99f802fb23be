"""``OMP_NUM_THREADS`` caps the engine's CPU threads, as it caps torch's and the stock libraries'.

Before, a deployment running N worker processes with ``OMP_NUM_THREADS=cores/N`` (the usual
guard against oversubscription) got every core per process from our engine: 2 busy threads
where stock LangChain ran 1.
"""

from __future__ import annotations

import pytest

from rag_rerank_plugins import EngineConfig, _cpu


@pytest.fixture
def cores(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.delenv("RAG_RERANK_TORCH_THREADS", raising=False)
    monkeypatch.setattr(_cpu, "usable_cores", lambda: 8)
    return monkeypatch


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (None, 8),
        ("1", 1),
        ("4", 4),
        (" 2 ", 2),
        ("4,2", 4),  # nested OpenMP levels: the first is the outer team
        ("16", 8),  # a cap, never more than the cores
        ("0", 8),  # invalid for OpenMP too: ignored
        ("-3", 8),
        ("abc", 8),
        ("", 8),
        ("٤", 8),  # not an ASCII digit
    ],
)
def test_omp_num_threads_caps_the_engine(cores, value: str | None, expected: int) -> None:
    if value is None:
        cores.delenv("OMP_NUM_THREADS", raising=False)
    else:
        cores.setenv("OMP_NUM_THREADS", value)
    assert EngineConfig().cpu_threads() == expected
    workers, threads = EngineConfig().cpu_device_workers()
    assert workers * threads <= expected


def test_torch_threads_setting_wins_over_omp(cores) -> None:
    cores.setenv("OMP_NUM_THREADS", "1")
    cores.setenv("RAG_RERANK_TORCH_THREADS", "3")
    assert EngineConfig().cpu_threads() == 3


def test_one_thread_per_process_runs_one_device_worker(cores) -> None:
    cores.setenv("OMP_NUM_THREADS", "1")
    assert EngineConfig().cpu_device_workers() == (1, 1)


def test_onnx_and_openvino_sessions_get_the_same_cap(cores) -> None:
    from rag_rerank_plugins.backends import _onnx_common

    cores.delenv("RAG_RERANK_ORT_THREADS", raising=False)
    cores.setenv("OMP_NUM_THREADS", "2")
    assert _onnx_common.default_threads() == 2
    cores.delenv("OMP_NUM_THREADS")
    assert _onnx_common.default_threads() == 8
