"""Property-based API fuzzing of `rag-rerank serve` from its own OpenAPI schema (schemathesis).

Every generated request goes to a server on 127.0.0.1 serving fake models; the run is bounded
(``max_examples`` per operation). A 5xx answer to any input, however odd, is a bug: bad input must
get a 4xx with a message, never a crash.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
schemathesis = pytest.importorskip("schemathesis")

from hypothesis import HealthCheck, given, settings  # noqa: E402

from rag_rerank_plugins import ModelPool  # noqa: E402
from rag_rerank_plugins.server import ServerConfig, create_app  # noqa: E402
from rag_rerank_plugins.server.testing import ServerThread, wait_until_healthy  # noqa: E402

SPECS = [
    {"name": "fake", "model": "f", "backend": "fake-reranker", "device": "cpu"},
    {"name": "fake-emb", "model": "e", "backend": "fake-embedder", "device": "cpu"},
]


@pytest.fixture(scope="module")
def server_url() -> Iterator[str]:
    pool = ModelPool()
    app = create_app(ServerConfig(specs=SPECS, max_request_bytes=64 * 1024), pool=pool)
    server = ServerThread(app)
    url = server.start()
    try:
        wait_until_healthy(url, timeout=60)
        yield url
    finally:
        server.stop()
        pool.clear()


def test_no_generated_input_crashes_the_server(server_url: str) -> None:
    """Each operation of the schema gets bounded generated requests (schemathesis strategies
    driven by hypothesis directly: its pytest plugin does not support pytest 9 yet)."""
    schema = schemathesis.openapi.from_url(server_url + "/openapi.json")
    operations = [result.ok() for result in schema.get_all_operations()]
    assert {op.path for op in operations} >= {"/rerank", "/v1/rerank", "/embed"}
    statuses: list[int] = []
    for operation in operations:

        @given(case=operation.as_strategy())
        @settings(
            max_examples=25,
            deadline=None,
            suppress_health_check=list(HealthCheck),
            database=None,
        )
        def check(case) -> None:
            response = case.call(base_url=server_url, timeout=10)
            statuses.append(response.status_code)
            assert response.status_code < 500, (case.path, case.body, response.text[:300])

        check()
    assert len(statuses) >= 5 * len(operations)
    assert any(s == 200 for s in statuses)
    assert any(400 <= s < 500 for s in statuses)
