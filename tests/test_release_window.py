"""glibc gives a thread arena's top back only while the trim threshold is low (``_memory``).

What a user relies on: releasing the pool's last CPU model lowers glibc's trim threshold while
the weights are freed and leaves the thresholds at the values glibc's own dynamic rule reaches
under load, even when freeing fails; nothing changes while another CPU model is loaded, when
``RAG_RERANK_RELEASE_PROCESS_MEMORY=0``, or when the process tuned malloc with
``MALLOC_TRIM_THRESHOLD_`` / ``MALLOC_MMAP_THRESHOLD_`` itself. A recording ``mallopt`` stands in
for glibc's, so no test changes this process's allocator.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from rag_rerank_plugins import ModelPool, ModelSpec, _memory

TRIM, MMAP = -1, -3  # mallopt parameters (malloc.h)
LOWERED = [(TRIM, 128 * 1024)]
RESTORED = [(MMAP, 32 << 20), (TRIM, 64 << 20)]


@pytest.fixture
def mallopt(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[tuple[int, int]]]:
    calls: list[tuple[int, int]] = []

    def record(param: int, value: int) -> int:
        calls.append((param, value))
        return 1

    class FakeLibc:
        mallopt = staticmethod(record)

        @staticmethod
        def gnu_get_libc_version() -> bytes:
            return b"2.36"

        @staticmethod
        def malloc_trim(pad: int) -> int:
            return 1

    for name in ("MALLOC_TRIM_THRESHOLD_", "MALLOC_MMAP_THRESHOLD_"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.delenv("RAG_RERANK_RELEASE_PROCESS_MEMORY", raising=False)
    monkeypatch.setattr(_memory, "_libc", lambda: FakeLibc())
    _memory._glibc_mallopt.cache_clear()
    yield calls
    _memory._glibc_mallopt.cache_clear()


def test_the_threshold_is_low_only_while_the_model_is_freed(
    mallopt: list[tuple[int, int]],
) -> None:
    with _memory.release_window(last_cpu_model=True):
        assert mallopt == LOWERED
    assert mallopt == LOWERED + RESTORED


def test_thresholds_are_restored_when_freeing_fails(mallopt: list[tuple[int, int]]) -> None:
    with pytest.raises(RuntimeError), _memory.release_window(last_cpu_model=True):
        raise RuntimeError("a backend's close() failed")
    assert mallopt == LOWERED + RESTORED


def test_nothing_while_another_cpu_model_is_loaded(mallopt: list[tuple[int, int]]) -> None:
    with _memory.release_window(last_cpu_model=False):
        pass
    assert mallopt == []


@pytest.mark.parametrize("value", ["0", "false", "off", " No "])
def test_switched_off_by_environment(
    mallopt: list[tuple[int, int]], monkeypatch: pytest.MonkeyPatch, value: str
) -> None:
    monkeypatch.setenv("RAG_RERANK_RELEASE_PROCESS_MEMORY", value)
    with _memory.release_window(last_cpu_model=True):
        pass
    assert mallopt == []


@pytest.mark.parametrize("name", ["MALLOC_TRIM_THRESHOLD_", "MALLOC_MMAP_THRESHOLD_"])
def test_a_process_that_tuned_malloc_keeps_its_settings(
    mallopt: list[tuple[int, int]], monkeypatch: pytest.MonkeyPatch, name: str
) -> None:
    monkeypatch.setenv(name, "1048576")
    _memory._glibc_mallopt.cache_clear()
    with _memory.release_window(last_cpu_model=True):
        pass
    assert mallopt == []


def test_another_libc_is_left_alone(monkeypatch: pytest.MonkeyPatch) -> None:
    class Musl:  # no gnu_get_libc_version
        @staticmethod
        def mallopt(param: int, value: int) -> int:  # pragma: no cover - must not be called
            raise AssertionError("mallopt called on a non-glibc libc")

    monkeypatch.setattr(_memory, "_libc", lambda: Musl())
    _memory._glibc_mallopt.cache_clear()
    try:
        with _memory.release_window(last_cpu_model=True):
            pass
    finally:
        _memory._glibc_mallopt.cache_clear()


def test_the_pool_opens_the_window_for_its_last_cpu_model(
    mallopt: list[tuple[int, int]],
) -> None:
    reranker = ModelSpec("m", backend="fake-reranker", device="cpu")
    embedder = ModelSpec("m", backend="fake-embedder", device="cpu")
    pool = ModelPool()
    pool.score_pairs(reranker, [("q", "p")])
    pool.embed(embedder, ["t"])
    pool.release(reranker)
    assert mallopt == []  # the embedder still runs on the CPU
    pool.release(embedder)
    assert mallopt == LOWERED + RESTORED
    pool.release(embedder)  # not loaded: nothing to free, nothing changed
    assert mallopt == LOWERED + RESTORED
    pool.score_pairs(reranker, [("q", "p")])
    pool.clear()
    assert mallopt == (LOWERED + RESTORED) * 2
