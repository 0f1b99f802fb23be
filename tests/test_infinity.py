"""Interop with a real infinity server (``infinity-emb`` from PyPI) on 127.0.0.1.

infinity-emb pins numpy<2 and sentence-transformers<4, so it runs from its own venv,
``.venv-infinity`` (``scripts/setup-infinity``; CI creates it through ``scripts/setup-env``). The
server loads the same local models as the reference (MiniLM and the tiny cross-encoder; nothing
is downloaded) and the remote backend, with ``protocol="infinity"``, must give the local results.
Skipped with a reason when the venv is missing.
"""

from __future__ import annotations

import os
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("httpx")

import httpx

from rag_rerank_plugins import ModelPool, ModelSpec
from rag_rerank_plugins.exceptions import RemoteRequestError

pytestmark = pytest.mark.slow

QUERY = "which organelle produces ATP?"
ROOT = Path(__file__).resolve().parents[1]
INFINITY_BIN = Path(
    os.environ.get("RAG_RERANK_INFINITY_BIN", ROOT / ".venv-infinity" / "bin" / "infinity_emb")
)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture(scope="module")
def infinity_url(
    tiny_ce_path: str, minilm_path: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[str]:
    if not INFINITY_BIN.exists():
        pytest.skip(
            f"{INFINITY_BIN} not found: create the infinity venv with `bash scripts/setup-infinity`"
        )
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    log_path = tmp_path_factory.mktemp("infinity") / "server.log"
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "INFINITY_ANONYMOUS_USAGE_STATS": "0",
        "DO_NOT_TRACK": "1",
        "TOKENIZERS_PARALLELISM": "false",
    }
    env.pop("VIRTUAL_ENV", None)
    command = [
        str(INFINITY_BIN),
        "v2",
        "--model-id",
        minilm_path,
        "--model-id",
        tiny_ce_path,
        "--served-model-name",
        "minilm",
        "--served-model-name",
        "tiny-ce",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--device",
        "cpu",
        "--engine",
        "torch",
        "--dtype",
        "float32",
        "--no-bettertransformer",
        "--no-model-warmup",
    ]
    with open(log_path, "w") as log:
        proc = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env)
    try:
        deadline = time.monotonic() + 240
        while True:
            if proc.poll() is not None:
                tail = log_path.read_text()[-3000:]
                pytest.fail(f"infinity exited with {proc.returncode}:\n{tail}")
            try:
                if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"infinity not healthy within 240 s:\n{log_path.read_text()[-3000:]}")
            time.sleep(0.25)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)


def _spec(url: str, backend: str, name: str) -> ModelSpec:
    return ModelSpec(
        name,
        backend=backend,
        device="cpu",
        options={"url": url, "protocol": "infinity", "retries": 1},
    )


def test_infinity_rerank_equals_local(
    pool: ModelPool, infinity_url: str, direct_cross_encoder, passages: list[str]
) -> None:
    pairs = [(QUERY, p) for p in passages] + [("a second query", passages[2])]
    scores = pool.score_pairs(_spec(infinity_url, "remote-reranker", "tiny-ce"), pairs, 4)
    ref = direct_cross_encoder.predict(pairs, show_progress_bar=False)
    np.testing.assert_allclose(scores, ref, atol=1e-5)


def test_infinity_embed_equals_local(
    pool: ModelPool, infinity_url: str, direct_embedder, passages: list[str]
) -> None:
    spec = _spec(infinity_url, "remote-embedder", "minilm")
    vectors = pool.embed(spec, passages, batch_size=5, normalize=True)
    ref = direct_embedder.encode(passages, normalize_embeddings=True)
    np.testing.assert_allclose(vectors, ref, atol=1e-5)
    assert pool.get(spec).dimension == 384


def test_adapters_on_infinity_equal_local(
    pool: ModelPool, infinity_url: str, tiny_ce_path: str, direct_embedder, passages: list[str]
) -> None:
    pytest.importorskip("langchain_core")
    pytest.importorskip("llama_index.core")
    from langchain_core.documents import Document

    from rag_rerank_plugins.langchain import SharedRerankCompressor
    from rag_rerank_plugins.llama_index import SharedEmbedding

    docs = [Document(page_content=p, id=f"d{i}") for i, p in enumerate(passages)]
    remote = SharedRerankCompressor(
        model="tiny-ce",
        backend="remote-reranker",
        device="cpu",
        model_kwargs={"url": infinity_url, "protocol": "infinity"},
        top_n=None,
        pool=pool,
    )
    local = SharedRerankCompressor(
        model=tiny_ce_path, device="cpu", dtype="float32", top_n=None, pool=pool
    )
    out = remote.compress_documents(docs, QUERY)
    ref = local.compress_documents(docs, QUERY)
    assert [d.id for d in out] == [d.id for d in ref]
    emb = SharedEmbedding(
        model_name="minilm",
        backend="remote-embedder",
        device="cpu",
        model_kwargs={"url": infinity_url, "protocol": "infinity"},
        pool=pool,
    )
    np.testing.assert_allclose(
        emb.get_text_embedding_batch(passages[:3]),
        direct_embedder.encode(passages[:3], normalize_embeddings=True),
        atol=1e-5,
    )


def test_unknown_model_on_infinity_is_a_clear_error(pool: ModelPool, infinity_url: str) -> None:
    with pytest.raises(RemoteRequestError, match="rejected the request with HTTP 4"):
        pool.score_pairs(_spec(infinity_url, "remote-reranker", "no-such-model"), [("q", "a")])
