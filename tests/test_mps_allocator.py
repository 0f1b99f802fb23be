"""The MPS allocator options of a pool (issue 25), on the CPU with a fake MPS.

``mps_high_watermark_ratio`` (``RAG_RERANK_POOL_MPS_HIGH_WATERMARK_RATIO``) caps torch's MPS
allocator cache. torch reads ``PYTORCH_MPS_HIGH_WATERMARK_RATIO`` once, when its MPS allocator
starts, so the pool sets the variable when torch is not imported yet (checked in fresh
subprocesses) and calls ``torch.mps.set_per_process_memory_fraction`` when it is (checked with
torch's MPS functions replaced by recorders). ``mps_empty_cache`` empties the MPS cache after
every call to a model on ``mps``, sync and async, and only there.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import subprocess
import sys
from collections.abc import Iterator
from typing import Any

import pytest

from rag_rerank_plugins import ConfigurationError, InvalidInputError, ModelPool, ModelSpec
from rag_rerank_plugins import _mps as mps_module
from rag_rerank_plugins.backends import register_backend
from rag_rerank_plugins.engine_config import PoolConfig
from rag_rerank_plugins.testing import load_fake_embedder, load_fake_reranker

HIGH, LOW = mps_module.HIGH_ENV, mps_module.LOW_ENV


def _fresh_process(code: str, **env: str) -> dict[str, Any]:
    """Run ``code`` in a new interpreter (torch not imported) and return the JSON it prints."""
    clean = {
        k: v
        for k, v in os.environ.items()
        if k not in (HIGH, LOW) and not k.startswith("RAG_RERANK_POOL_")
    }
    out = subprocess.run(
        [sys.executable, "-c", code],
        env={**clean, **env},
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert out.returncode == 0, out.stderr
    return dict(json.loads(out.stdout.strip().splitlines()[-1]))


_REPORT = """
import json, os, sys
{setup}
print(json.dumps({{"torch": "torch" in sys.modules, "high": os.environ.get("{high}"),
                  "low": os.environ.get("{low}")}}))
"""


def _report(setup: str, **env: str) -> dict[str, Any]:
    return _fresh_process(_REPORT.format(setup=setup, high=HIGH, low=LOW), **env)


# -- before torch is imported: the variable ---------------------------------------------------


@pytest.mark.parametrize(
    ("ratio", "high", "low"),
    [
        (0.8, "0.8", "0.8"),  # below torch's default low watermark 1.4: low follows
        (1.5, "1.5", None),  # above it: torch's own low watermark stays
        (0.0, "0", None),  # 0 = no limit; the low watermark is not checked then
    ],
)
def test_a_pool_created_before_torch_sets_the_variable(
    ratio: float, high: str, low: str | None
) -> None:
    setup = f"from rag_rerank_plugins import ModelPool\nModelPool(mps_high_watermark_ratio={ratio})"
    assert _report(setup) == {"torch": False, "high": high, "low": low}


def test_the_environment_variable_of_the_pool() -> None:
    setup = "from rag_rerank_plugins import ModelPool\nModelPool()"
    got = _report(setup, RAG_RERANK_POOL_MPS_HIGH_WATERMARK_RATIO="0.6")
    assert got == {"torch": False, "high": "0.6", "low": "0.6"}
    # The process-wide default pool reads it too, before any model (or torch) loads.
    setup = "from rag_rerank_plugins import get_pool\nget_pool()"
    got = _report(setup, RAG_RERANK_POOL_MPS_HIGH_WATERMARK_RATIO="1")
    assert got == {"torch": False, "high": "1", "low": "1"}


def test_a_users_low_watermark_is_kept_and_no_ratio_changes_nothing() -> None:
    setup = "from rag_rerank_plugins import ModelPool\nModelPool(mps_high_watermark_ratio=0.5)"
    assert _report(setup, **{LOW: "0.3"})["low"] == "0.3"
    setup = "from rag_rerank_plugins import ModelPool\nModelPool()"
    assert _report(setup, **{HIGH: "1.2"}) == {"torch": False, "high": "1.2", "low": None}


def test_a_different_exported_value_is_replaced_with_a_warning() -> None:
    code = f"""
import json, logging, os
logging.basicConfig(level=logging.WARNING, format="%(message)s")
from rag_rerank_plugins import ModelPool
ModelPool(mps_high_watermark_ratio=0.9)
print(json.dumps({{"high": os.environ["{HIGH}"]}}))
"""
    out = subprocess.run(
        [sys.executable, "-c", code],
        env={**os.environ, HIGH: "1.7"},
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout.strip())["high"] == "0.9"
    assert f"{HIGH}=1.7 in the environment is replaced" in out.stderr


# -- after torch is imported: torch's function, with a fake MPS --------------------------------


class _FakeMps:
    """Records what the pool asks of torch's MPS allocator."""

    def __init__(self) -> None:
        self.fractions: list[float] = []
        self.emptied = 0

    def set_per_process_memory_fraction(self, fraction: float) -> None:
        if not isinstance(fraction, float):  # as torch: a float, nothing else
            raise TypeError("Invalid type for fraction argument, must be `float`")
        self.fractions.append(fraction)

    def empty_cache(self) -> None:
        self.emptied += 1


@pytest.fixture
def fake_mps(monkeypatch: pytest.MonkeyPatch) -> Iterator[_FakeMps]:
    torch = pytest.importorskip("torch")
    from rag_rerank_plugins.policy import resolve_device

    fake = _FakeMps()
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: True)
    monkeypatch.setattr(
        torch.mps, "set_per_process_memory_fraction", fake.set_per_process_memory_fraction
    )
    monkeypatch.setattr(torch.mps, "empty_cache", fake.empty_cache)
    monkeypatch.setattr(mps_module, "_applied", None)
    monkeypatch.delenv(HIGH, raising=False)
    monkeypatch.delenv(LOW, raising=False)
    resolve_device.cache_clear()  # "mps" now resolves (cached per process)
    yield fake
    resolve_device.cache_clear()


def test_after_torch_the_fraction_is_set_through_torch(
    fake_mps: _FakeMps, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING, logger="rag_rerank_plugins._mps"):
        ModelPool(mps_high_watermark_ratio=0.7)
    assert fake_mps.fractions == [0.7]
    assert HIGH not in os.environ  # too late to mean anything: not set
    assert "set_per_process_memory_fraction" in caplog.text
    ModelPool(mps_high_watermark_ratio=1)  # an int from a config file is passed as a float
    assert fake_mps.fractions == [0.7, 1.0]
    assert "another pool" in caplog.text  # per process: the second pool's value wins, said so


def test_no_mps_no_call(monkeypatch: pytest.MonkeyPatch) -> None:
    torch = pytest.importorskip("torch")
    calls: list[float] = []
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    monkeypatch.setattr(torch.mps, "set_per_process_memory_fraction", calls.append)
    monkeypatch.setattr(mps_module, "_applied", None)
    assert mps_module.apply_high_watermark(0.5) == ""
    assert calls == []
    assert mps_module.apply_high_watermark(None) == ""


def test_nothing_is_set_without_the_option(fake_mps: _FakeMps) -> None:
    ModelPool()
    assert fake_mps.fractions == []
    assert fake_mps.emptied == 0


# -- emptying the cache after each request ----------------------------------------------------


# The fakes are torch-free (they always resolve to the CPU): these rows are the same fakes as
# backends that use torch, so device="mps" resolves through the (faked) torch check.
def _on_device(load: Any) -> Any:
    def loader(spec: ModelSpec, provider: Any) -> Any:
        model = load(spec, provider)
        model.device = spec.device  # where the pool placed it ("mps" once resolved)
        return model

    return loader


register_backend("test-mps-reranker", _on_device(load_fake_reranker), "reranker", replace=True)
register_backend("test-mps-embedder", _on_device(load_fake_embedder), "embedder", replace=True)


def _spec(device: str) -> ModelSpec:
    return ModelSpec("m", backend="test-mps-reranker", device=device)


def test_mps_empty_cache_after_every_call(fake_mps: _FakeMps) -> None:
    pool = ModelPool(mps_empty_cache=True)
    try:
        spec = _spec("mps")
        assert pool.get(spec).device == "mps"
        pool.score_pairs(spec, [("q", "a"), ("q", "b")])
        assert fake_mps.emptied == 1
        pool.score_pairs(spec, [("q", "c")])
        asyncio.run(pool.ascore_pairs(spec, [("q", "d")]))
        assert fake_mps.emptied == 3
        embedder = ModelSpec("e", backend="test-mps-embedder", device="mps")
        pool.embed(embedder, ["a", "b"])
        assert fake_mps.emptied == 4
        pool.score_pairs(_spec("cpu"), [("q", "a")])  # a CPU model: nothing to empty
        assert fake_mps.emptied == 4
    finally:
        pool.clear()


def test_mps_cache_is_left_alone_by_default(fake_mps: _FakeMps) -> None:
    pool = ModelPool()
    try:
        pool.score_pairs(_spec("mps"), [("q", "a")])
        assert fake_mps.emptied == 0
    finally:
        pool.clear()


def test_the_cache_is_emptied_after_a_failed_call_too(fake_mps: _FakeMps) -> None:
    pool = ModelPool(mps_empty_cache=True)
    try:
        # A call that reaches the model and fails there (an embedding call on a reranker).
        # Bad input is refused before the model is looked up: no model work, nothing to empty.
        with pytest.raises(InvalidInputError):
            pool.embed(_spec("mps"), ["some text"])
        assert fake_mps.emptied == 1
        with pytest.raises(InvalidInputError):
            pool.score_pairs(_spec("mps"), [("q", 3)])  # type: ignore[list-item]
        assert fake_mps.emptied == 1
    finally:
        pool.clear()


# -- the settings --------------------------------------------------------------------------------


def test_settings_read_and_checked(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RAG_RERANK_POOL_MPS_HIGH_WATERMARK_RATIO", "0.25")
    monkeypatch.setenv("RAG_RERANK_POOL_MPS_EMPTY_CACHE", "true")
    config = PoolConfig.from_env()
    assert config.mps_high_watermark_ratio == 0.25
    assert config.mps_empty_cache is True
    for bad in ("2.5", "-1", "lots"):
        monkeypatch.setenv("RAG_RERANK_POOL_MPS_HIGH_WATERMARK_RATIO", bad)
        with pytest.raises(ConfigurationError, match="RAG_RERANK_POOL_MPS_HIGH_WATERMARK_RATIO"):
            PoolConfig.from_env()
    with pytest.raises(ConfigurationError, match="mps_high_watermark_ratio"):
        ModelPool(mps_high_watermark_ratio=3.0)
