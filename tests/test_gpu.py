"""CUDA paths (``pytest -m gpu``): FP16 load, release, a real OOM split, fork. Skipped without CUDA.

CI has no GPU; these run on a lent GPU machine next to ``benchmarks/gpu.py``. The same behaviours
are proven on the CPU with a simulated device in tests/test_engine.py. A lent machine cannot take
the 88 MB packaged model along (64 MiB per call): ``RAG_RERANK_TEST_TOKENIZER`` names a folder of
tokenizer files instead (``scripts/gpu-wheels`` saves them as ``.whl/minilm-tokenizer``).
"""

from __future__ import annotations

import multiprocessing
import os
import sys

import pytest

torch = pytest.importorskip("torch")

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]

from rag_rerank_plugins import ModelPool, ModelSpec  # noqa: E402
from rag_rerank_plugins.engine_config import EngineConfig  # noqa: E402

GIB = 1024**3


@pytest.fixture
def gpu_ce_path(tmp_path_factory: pytest.TempPathFactory, request: pytest.FixtureRequest) -> str:
    from rag_rerank_plugins.testing import build_cross_encoder

    tokenizer = os.environ.get("RAG_RERANK_TEST_TOKENIZER") or request.getfixturevalue(
        "minilm_path"
    )
    return str(
        build_cross_encoder(
            tmp_path_factory.mktemp("gpu") / "ce",
            hidden_size=384,
            num_layers=6,
            num_heads=12,
            intermediate_size=1536,
            tokenizer=tokenizer,
        )
    )


def test_auto_loads_in_float16_on_cuda_and_equals_predict(gpu_ce_path: str) -> None:
    from sentence_transformers import CrossEncoder

    pool = ModelPool()
    spec = ModelSpec(gpu_ce_path, device="auto")
    pairs = [("what is energy?", f"passage {i} about energy " * (i + 1)) for i in range(12)]
    ours = pool.score_pairs(spec, pairs)
    stats = pool.spec_stats(spec)
    assert (stats["device"], stats["dtype"]) == ("cuda:0", "float16")
    assert next(pool.get(spec).model.model.model.parameters()).dtype == torch.float16
    ref = CrossEncoder(gpu_ce_path, device="cuda:0")
    ref.model.half()
    assert ours == pytest.approx(list(ref.predict(pairs)), abs=2e-3)
    pool.clear()


def test_release_gives_the_memory_back(gpu_ce_path: str) -> None:
    pool = ModelPool()
    spec = ModelSpec(gpu_ce_path, device="cuda:0")
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    pool.score_pairs(spec, [("q", "p")])
    assert torch.cuda.memory_allocated() > base
    pool.release(spec)
    assert torch.cuda.memory_allocated() - base < 1024**2


def test_a_real_cuda_oom_is_split_and_succeeds(gpu_ce_path: str) -> None:
    pool = ModelPool(config=EngineConfig(token_budget=10_000_000, max_batch_size=4096))
    spec = ModelSpec(gpu_ce_path, device="cuda:0")
    pool.get(spec)
    total = torch.cuda.get_device_properties(0).total_memory
    torch.cuda.set_per_process_memory_fraction(min(1.0, 1.5 * GIB / total))
    try:
        pairs = [("query " * 8, "long passage text " * 160) for _ in range(2048)]
        scores = pool.score_pairs(spec, pairs, batch_size=4096)
    finally:
        torch.cuda.set_per_process_memory_fraction(1.0)
    assert len(scores) == 2048
    stats = pool.spec_stats(spec)
    assert stats["oom_splits"] > 0
    assert stats["token_budget"] < 10_000_000
    pool.clear()


def _child(queue: multiprocessing.Queue, spec: ModelSpec) -> None:
    from rag_rerank_plugins import get_pool

    try:
        queue.put(("ok", get_pool().score_pairs(spec, [("q", "p")]), get_pool().stats()))
    except Exception as exc:  # pragma: no cover - reported to the parent
        queue.put(("error", repr(exc), None))


def test_a_spawned_child_loads_its_own_cuda_model(gpu_ce_path: str) -> None:
    from rag_rerank_plugins import get_pool

    spec = ModelSpec(gpu_ce_path, device="cuda:0")
    parent = get_pool().score_pairs(spec, [("q", "p")])
    spawn = multiprocessing.get_context("spawn")
    queue = spawn.Queue()  # objects of one context only: 3.12 refuses a fork-made lock here
    proc = spawn.Process(target=_child, args=(queue, spec))
    proc.start()
    status, scores, _ = queue.get(timeout=300)
    proc.join(60)
    assert status == "ok", scores
    assert scores == pytest.approx(parent, abs=2e-3)
    get_pool().clear()


@pytest.mark.skipif(sys.platform == "win32", reason="fork is POSIX-only")
def test_a_child_forked_after_cuda_was_used_gets_a_clear_error_not_a_crash(
    gpu_ce_path: str,
) -> None:
    """CUDA cannot be initialised again in a forked child: the request fails at once with what
    to do instead, before any load (not torch's error from deep inside one)."""
    from rag_rerank_plugins import get_pool

    spec = ModelSpec(gpu_ce_path, device="cuda:0")
    get_pool().score_pairs(spec, [("q", "p")])  # the parent has a CUDA context now
    fork = multiprocessing.get_context("fork")
    queue = fork.Queue()
    proc = fork.Process(target=_child, args=(queue, spec))
    proc.start()
    status, message, _ = queue.get(timeout=120)
    proc.join(60)
    assert status == "error"
    assert "ConfigurationError" in message, message
    assert "spawn" in message, message
    get_pool().clear()
