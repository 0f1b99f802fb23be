"""The Ray Serve recipe of docs/deployment.md: the server app as an ingress with 2 replicas.

Ray runs from its own venv, ``.venv-ray`` (``scripts/setup-ray``; CI creates it through
``scripts/setup-env``): ray[serve] pulls uvloop and httptools, which would change the event loop
every other server test runs on. A driver script in that venv starts a local Ray (every process
on 127.0.0.1) and deploys the recipe on the tiny cross-encoder; this test, in the main venv, is
the client: concurrent requests through Ray's HTTP proxy must give the local model's scores, and
each replica process must have loaded the model exactly once. Skipped with a reason when the
venv is missing.
"""

from __future__ import annotations

import os
import socket
import subprocess
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("httpx")

import httpx

from rag_rerank_plugins import ModelPool, ModelSpec

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
RAY_PYTHON = Path(os.environ.get("RAG_RERANK_RAY_PYTHON", ROOT / ".venv-ray" / "bin" / "python"))

#: docs/deployment.md's recipe on the tiny cross-encoder (``{reranker}``), on CPUs, plus a
#: ``/replica`` route of this test's own: which process answered and its pool's counters.
SERVE_APP = """
import os

from fastapi import FastAPI
from ray import serve

from rag_rerank_plugins.server import ServerConfig, create_app

config = ServerConfig(rerankers=[{reranker!r}], device="cpu", dtype="float32")


@serve.deployment(
    num_replicas=2,
    ray_actor_options={{"num_cpus": 0.5}},
    max_ongoing_requests=config.max_concurrency + config.max_pending,
)
@serve.ingress()
class Reranker:
    def __init__(self) -> None:
        self.server_app = create_app(config)
        state = self.server_app.state.server
        state.pool.preload(*(m.spec for m in state.served), warmup=config.warmup)

    def __serve_build_asgi_app__(self) -> FastAPI:
        state = self.server_app.state.server

        @self.server_app.get("/replica")
        def replica() -> dict:
            counters = {{m.name: state.pool.spec_stats(m.spec) for m in state.served}}
            return {{
                "pid": os.getpid(),
                "status": state.status,
                "loads": {{name: s["loads"] for name, s in counters.items()}},
                "calls": {{name: s["calls"] for name, s in counters.items()}},
            }}

        return self.server_app

    def check_health(self) -> None:
        state = self.server_app.state.server
        if state.status == "failed":
            raise RuntimeError(state.error)


app = Reranker.bind()
"""

#: Runs in .venv-ray: a local Ray on loopback, the recipe deployed, "READY" printed, then up
#: until stdin closes.
DRIVER = """
import sys

import ray
from ray import serve

import serve_app

ray.init(
    num_cpus=2,
    include_dashboard=False,
    log_to_driver=False,
    object_store_memory=100 * 1024 * 1024,
    _node_ip_address="127.0.0.1",
)
try:
    serve.start(http_options={"host": "127.0.0.1", "port": int(sys.argv[1])})
    serve.run(serve_app.app, route_prefix="/")
    print("READY", flush=True)
    sys.stdin.read()
finally:
    serve.shutdown()
    ray.shutdown()
"""

QUERIES = [f"query {i}: which organelle produces ATP?" for i in range(24)]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _log_tail(path: Path) -> str:
    return path.read_text(errors="replace")[-4000:]


@pytest.fixture(scope="module")
def ray_serve_url(tiny_ce_path: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    if not RAY_PYTHON.exists():
        pytest.skip(f"{RAY_PYTHON} not found: create the Ray venv with `bash scripts/setup-ray`")
    work = tmp_path_factory.mktemp("ray")
    (work / "serve_app.py").write_text(SERVE_APP.format(reranker=f"tiny-ce={tiny_ce_path}"))
    (work / "driver.py").write_text(DRIVER)
    port = _free_port()
    log_path = work / "driver.log"
    env = {
        **os.environ,
        # Replicas import serve_app and this checkout's package (Ray workers inherit the env).
        "PYTHONPATH": os.pathsep.join([str(work), str(ROOT / "src")]),
        "RAY_USAGE_STATS_ENABLED": "0",
        "RAY_AUTH_MODE": "disabled",
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false",
    }
    env.pop("VIRTUAL_ENV", None)
    with open(log_path, "w") as log:
        proc = subprocess.Popen(
            [str(RAY_PYTHON), str(work / "driver.py"), str(port)],
            stdin=subprocess.PIPE,
            stdout=log,
            stderr=subprocess.STDOUT,
            env=env,
            cwd=work,
        )
    try:
        deadline = time.monotonic() + 240
        while "READY" not in log_path.read_text(errors="replace"):
            if proc.poll() is not None:
                pytest.fail(f"the Ray driver exited with {proc.returncode}:\n{_log_tail(log_path)}")
            if time.monotonic() > deadline:
                pytest.fail(f"Ray Serve not deployed within 240 s:\n{_log_tail(log_path)}")
            time.sleep(0.25)
        yield f"http://127.0.0.1:{port}"
    finally:
        assert proc.stdin is not None
        proc.stdin.close()  # the driver shuts Serve and Ray down
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)


def _replicas(url: str, want: int, timeout: float = 60.0) -> dict[int, dict]:
    """``/replica`` of each replica process (by pid), asked until ``want`` answered ok."""
    seen: dict[int, dict] = {}
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        body = httpx.get(f"{url}/replica", timeout=5).json()
        if body["status"] == "ok":
            seen[body["pid"]] = body
            if len(seen) == want:
                return seen
        time.sleep(0.05)
    raise AssertionError(f"{want} ready replicas did not answer within {timeout:g}s: {seen}")


def test_two_replicas_load_the_model_once_each_and_answer_concurrent_requests(
    ray_serve_url: str, direct_cross_encoder, passages: list[str]
) -> None:
    url = ray_serve_url
    before = _replicas(url, 2)

    def rerank(query: str) -> list[float]:
        response = httpx.post(f"{url}/rerank", json={"query": query, "texts": passages}, timeout=60)
        assert response.status_code == 200, response.text
        scores = [0.0] * len(passages)
        for item in response.json():
            scores[item["index"]] = item["score"]
        return scores

    with ThreadPoolExecutor(8) as threads:
        answers = list(threads.map(rerank, QUERIES))
    for query, scores in zip(QUERIES, answers, strict=True):
        ref = direct_cross_encoder.predict([(query, p) for p in passages], show_progress_bar=False)
        np.testing.assert_allclose(scores, ref, atol=1e-5)

    # The client side users run: the remote backend through Ray's proxy.
    spec = ModelSpec(url, backend="remote-reranker", device="cpu", options={"retries": 1})
    pairs = [(QUERIES[0], p) for p in passages]
    client = ModelPool()
    try:
        np.testing.assert_allclose(client.score_pairs(spec, pairs), answers[0], atol=1e-6)
    finally:
        client.clear()

    after = _replicas(url, 2)
    assert after.keys() == before.keys(), "a replica was restarted"
    # One load per replica process (constructor and lifespan both preload), however many
    # requests it answered; Ray spread the concurrent requests over both.
    assert all(r["loads"] == {"tiny-ce": 1} for r in after.values()), after
    served = {}  # requests each replica answered during the test
    for pid, replica in after.items():
        served[pid] = replica["calls"]["tiny-ce"] - before[pid]["calls"]["tiny-ce"]
    assert all(n > 0 for n in served.values()), served
    assert sum(served.values()) >= len(QUERIES) + 1, served
