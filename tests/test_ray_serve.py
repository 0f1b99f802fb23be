"""The Ray Serve recipe of docs/deployment.md: the server app as an ingress with 2 replicas.

Skipped unless ``ray[serve]`` is installed (it is not in the test group: it adds ~40 s of
installs and a Ray cluster start to CI). Ray's HTTP proxy listens on 127.0.0.1 only.
"""

from __future__ import annotations

import socket
import time

import pytest

pytest.importorskip("ray.serve")
pytest.importorskip("fastapi")

import httpx
import ray
from ray import serve

from rag_rerank_plugins import ModelPool, ModelSpec
from rag_rerank_plugins.server import ServerConfig, create_app

pytestmark = pytest.mark.slow


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def test_ray_serve_recipe_with_two_replicas(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")
    config = ServerConfig(
        specs=[{"name": "fake", "model": "f", "backend": "fake-reranker", "device": "cpu"}]
    )
    fastapi_app = create_app(config)

    @serve.deployment(
        num_replicas=2,
        ray_actor_options={"num_cpus": 0.5},
        max_ongoing_requests=config.max_concurrency + config.max_pending,
    )
    @serve.ingress(fastapi_app)
    class Reranker:
        def check_health(self) -> None:
            state = fastapi_app.state.server
            if state.status == "failed":
                raise RuntimeError(state.error)

    port = _free_port()
    # Every Ray process on loopback: never the host's network address.
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, _node_ip_address="127.0.0.1")
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        serve.run(Reranker.bind(), route_prefix="/", blocking=False)
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            try:
                if httpx.get(url + "/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        assert httpx.get(url + "/health", timeout=5).json()["status"] == "ok"
        spec = ModelSpec(url, backend="remote-reranker", device="cpu")
        for _ in range(6):  # spread over both replicas by Ray's router
            assert ModelPool().score_pairs(spec, [("a b", "a"), ("a b", "a b")]) == [0.5, 1.0]
    finally:
        serve.shutdown()
        ray.shutdown()
