"""Unbounded durations: ``inf`` and absurdly large timeouts, TTLs and waits never crash a worker.

Thread waits (``Condition.wait``, ``Future.result``) raise ``OverflowError`` past
``threading.TIMEOUT_MAX``. Before, ``timeout=float("inf")`` on a call, or ``request_timeout_s``,
``max_wait_ms``, ``bulk_aging_ms`` or a cache TTL of ``inf`` in the engine's settings, crashed the
model's worker on the first request ("the engine's worker crashed (OverflowError ...)"). Now a
timeout of ``inf`` (or ~31 years and more) means no limit, as None does, and settings with no
"never" meaning are refused with a message naming the field, before any model work.
"""

from __future__ import annotations

import math

import pytest

from rag_rerank_plugins import ConfigurationError, ModelPool, ModelSpec
from rag_rerank_plugins.engine_config import NO_LIMIT_S, EngineConfig, no_limit
from rag_rerank_plugins.exceptions import InvalidInputError

pytest.importorskip("sentence_transformers")

PAIRS = [("what is a cat", "a cat is a small animal"), ("q", "an unrelated passage")]


@pytest.fixture
def ce_spec(tiny_ce_path: str) -> ModelSpec:
    # A scheduled model (the engine's worker waits on conditions), not a thread-safe fake.
    return ModelSpec(tiny_ce_path, backend="cross-encoder", device="cpu", dtype="float32")


@pytest.mark.parametrize("timeout", [math.inf, 1e12, NO_LIMIT_S])
def test_an_unbounded_call_timeout_means_no_limit(
    timeout: float, ce_spec: ModelSpec, pool: ModelPool
) -> None:
    want = pool.score_pairs(ce_spec, PAIRS)
    assert pool.score_pairs(ce_spec, PAIRS, timeout=timeout) == want
    assert pool.get(ce_spec).score_pairs(PAIRS, timeout=timeout) == want
    assert pool.spec_stats(ce_spec)["errors"] == 0


async def test_an_unbounded_async_call_timeout_means_no_limit(
    ce_spec: ModelSpec, pool: ModelPool
) -> None:
    want = pool.score_pairs(ce_spec, PAIRS)
    assert await pool.ascore_pairs(ce_spec, PAIRS, timeout=math.inf) == want


@pytest.mark.parametrize("timeout", [0, -1, math.nan, -math.inf, "10", True])
def test_bad_call_timeouts_are_still_refused(
    timeout: object, ce_spec: ModelSpec, pool: ModelPool
) -> None:
    with pytest.raises(InvalidInputError, match="timeout must be a positive number"):
        pool.score_pairs(ce_spec, PAIRS, timeout=timeout)  # type: ignore[arg-type]
    assert not pool.is_loaded(ce_spec)


@pytest.mark.parametrize("value", [math.inf, 1e12])
def test_request_timeout_setting_of_inf_is_no_limit(
    value: float, ce_spec: ModelSpec, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert EngineConfig(request_timeout_s=value).request_timeout_s is None
    monkeypatch.setenv("RAG_RERANK_REQUEST_TIMEOUT_S", "inf")
    assert EngineConfig.from_env().request_timeout_s is None
    pool = ModelPool(config=EngineConfig(request_timeout_s=value))
    try:
        assert len(pool.score_pairs(ce_spec, PAIRS)) == 2
    finally:
        pool.clear()


@pytest.mark.parametrize(
    "field", ["queue_timeout_s", "bulk_aging_ms", "score_cache_ttl_s", "query_cache_ttl_s"]
)
@pytest.mark.parametrize("value", [math.inf, 1e15])
def test_durations_without_a_never_meaning_are_refused(field: str, value: float) -> None:
    with pytest.raises(ConfigurationError, match=f"EngineConfig.{field} must be a finite number"):
        EngineConfig(**{field: value})


def test_max_wait_is_at_most_a_minute() -> None:
    """A lone request waits ``max_wait_ms``: more than a minute is refused, not a crash."""
    assert EngineConfig(max_wait_ms=60_000).max_wait_ms == 60_000
    for value in (60_001, 1e12, math.inf):
        with pytest.raises(ConfigurationError, match="max_wait_ms must be at most"):
            EngineConfig(max_wait_ms=value)


@pytest.mark.parametrize(
    "settings",
    [
        {"queue_timeout_s": 1e8, "max_queue": 1},
        {"bulk_aging_ms": 1e11},
        {"score_cache_ttl_s": 1e8, "score_cache_size": 8},
        {"query_cache_ttl_s": 1e8},
        {"request_timeout_s": 1e8},
    ],
)
def test_the_longest_accepted_durations_serve(settings: dict, ce_spec: ModelSpec) -> None:
    """Every accepted value is one thread waits can take: requests (bulk and interactive, a
    score-cache hit included) are served and nothing crashes."""
    pool = ModelPool(config=EngineConfig(**settings))
    try:
        first = pool.score_pairs(ce_spec, PAIRS, priority="bulk")
        assert pool.score_pairs(ce_spec, PAIRS) == first
        assert pool.spec_stats(ce_spec)["errors"] == 0
    finally:
        pool.clear()


def test_no_limit() -> None:
    assert no_limit(None) is None
    assert no_limit(5.0) == 5.0
    assert no_limit(NO_LIMIT_S - 1) == NO_LIMIT_S - 1
    assert no_limit(NO_LIMIT_S) is None
    assert no_limit(math.inf) is None


def test_an_explicit_inf_timeout_overrides_the_default_one(tiny_ce_path: str) -> None:
    """``timeout=inf`` asks for no limit: the pool's ``request_timeout_s`` does not apply (a
    slow call under a tiny default must still complete)."""

    from rag_rerank_plugins.exceptions import RequestTimeoutError

    spec = ModelSpec(tiny_ce_path, backend="cross-encoder", device="cpu", dtype="float32")
    pool = ModelPool(config=EngineConfig(request_timeout_s=0.001))
    try:
        with pytest.raises(RequestTimeoutError):
            pool.score_pairs(spec, PAIRS)  # the cold load alone is far past 1 ms
        assert len(pool.score_pairs(spec, PAIRS, timeout=math.inf)) == 2
        assert len(pool.get(spec).score_pairs(PAIRS * 200, timeout=math.inf)) == 400
    finally:
        pool.clear()


def test_a_zero_default_timeout_is_refused() -> None:
    with pytest.raises(ConfigurationError, match="request_timeout_s must be positive"):
        EngineConfig(request_timeout_s=0)
