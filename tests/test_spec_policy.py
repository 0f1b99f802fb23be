"""ModelSpec identity and the device/dtype policy."""

from __future__ import annotations

import pytest

from rag_rerank_plugins import ConfigurationError, ModelSpec, policy
from rag_rerank_plugins.policy import decide_dtype


def test_spec_is_hashable_and_normalised() -> None:
    a = ModelSpec("m", dtype="fp16", device="cuda", options={"revision": "x", "a": [1, 2]})
    b = ModelSpec("m", dtype="float16", device="cuda:0", options={"a": (1, 2), "revision": "x"})
    assert a == b
    assert hash(a) == hash(b)
    assert a.dtype == "float16"
    assert a.device == "cuda:0"
    assert a.options == (("a", (1, 2)), ("revision", "x"))
    assert a.option("revision") == "x"
    assert {a: 1}[b] == 1
    # Spaces around a dtype are dropped, as around a device and in RAG_RERANK_DTYPE.
    spaced = ModelSpec("m", dtype=" Float16 ", device=" cuda ")
    assert (spaced.dtype, spaced.device) == ("float16", "cuda:0")


def test_spec_fields_that_change_the_model_change_the_key() -> None:
    base = ModelSpec("m")
    assert base != ModelSpec("m", max_length=256)
    assert base != ModelSpec("m", backend="bi-encoder")
    assert base != ModelSpec("m", options={"revision": "v2"})
    assert "max_length=256" in ModelSpec("m", max_length=256).label


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"model": ""}, "non-empty"),
        ({"model": "m", "dtype": "int3"}, "Unsupported dtype"),
        ({"model": "m", "device": "tpu"}, "Unsupported device"),
        ({"model": "m", "max_length": 0}, "max_length"),
        ({"model": "m", "max_length": True}, "max_length"),
        # Sets, dicts and lists are frozen now (issue 25); an unhashable object is not.
        ({"model": "m", "options": {"x": bytearray(b"1")}}, "cannot be part of a pool key"),
    ],
)
def test_bad_specs_are_rejected_clearly(kwargs: dict, match: str) -> None:
    with pytest.raises(ConfigurationError, match=match):
        ModelSpec(**kwargs)


def test_spec_is_frozen() -> None:
    spec = ModelSpec("m")
    with pytest.raises(AttributeError):
        spec.model = "other"  # type: ignore[misc]


@pytest.fixture
def bf16_cpu(monkeypatch: pytest.MonkeyPatch):
    def set_flag(value: bool) -> None:
        monkeypatch.setenv("RAG_RERANK_CPU_BF16", "1" if value else "0")
        policy.cpu_has_native_bf16.cache_clear()

    yield set_flag
    policy.cpu_has_native_bf16.cache_clear()


def test_auto_dtype_is_half_on_accelerators() -> None:
    assert decide_dtype("auto", "cuda:0").dtype == "float16"
    assert decide_dtype("auto", "mps").dtype == "float16"


def test_auto_dtype_on_cpu_depends_on_native_bf16(bf16_cpu) -> None:
    bf16_cpu(True)
    assert decide_dtype("auto", "cpu").dtype == "bfloat16"
    bf16_cpu(False)
    decision = decide_dtype("auto", "cpu")
    assert decision.dtype == "float32"
    assert "BF16" in decision.reason


def test_fp16_is_never_used_on_cpu(bf16_cpu) -> None:
    bf16_cpu(False)
    decision = decide_dtype("float16", "cpu")
    assert decision.dtype == "float32"
    assert "40x" in decision.reason


def test_explicit_dtype_wins_elsewhere() -> None:
    assert decide_dtype("float32", "cuda:0").dtype == "float32"
    assert decide_dtype("bfloat16", "cpu").dtype == "bfloat16"


def test_missing_cuda_is_a_clear_error() -> None:
    torch = pytest.importorskip("torch")
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    with pytest.raises(ConfigurationError, match="CUDA is not available"):
        policy.resolve_device("cuda:0")
    assert policy.resolve_device("auto") in ("cpu", "mps")


# -- CUDA in a forked child -----------------------------------------------------------------------


@pytest.fixture
def bad_fork(monkeypatch: pytest.MonkeyPatch):
    """This process as torch sees a child forked after its parent initialised CUDA."""
    torch = pytest.importorskip("torch")
    monkeypatch.setattr(torch.cuda, "_is_in_bad_fork", lambda: True)
    policy.resolve_device.cache_clear()
    yield
    policy.resolve_device.cache_clear()


def test_cuda_in_a_child_forked_after_cuda_was_used_is_refused_with_the_fix(bad_fork: None) -> None:
    for device in ("cuda:0", "cuda", "auto"):
        with pytest.raises(ConfigurationError, match=r"forked.*spawn"):
            policy.resolve_device(device)
    assert policy.resolve_device("cpu") == "cpu"  # the CPU is still there


def test_a_pool_refuses_before_any_load(bad_fork: None, tiny_ce_path: str) -> None:
    from rag_rerank_plugins import ModelPool

    pool = ModelPool()
    spec = ModelSpec(tiny_ce_path, device="cuda:0")
    with pytest.raises(ConfigurationError, match="does not survive fork"):
        pool.score_pairs(spec, [("q", "p")])
    assert pool.stats() == {}, "nothing was loaded or registered"


def _cached_devices(queue: object) -> None:
    queue.put(policy.resolve_device.cache_info().currsize)  # type: ignore[attr-defined]


def test_a_forked_child_forgets_the_parents_device_answers() -> None:
    """The parent's "auto" -> "cuda:0" must not be reused in a child, where CUDA is unusable."""
    import multiprocessing
    import sys

    if sys.platform == "win32":
        pytest.skip("fork is POSIX-only")
    pytest.importorskip("torch")
    policy.resolve_device("auto")
    assert policy.resolve_device.cache_info().currsize >= 1
    fork = multiprocessing.get_context("fork")
    queue = fork.Queue()
    child = fork.Process(target=_cached_devices, args=(queue,))
    child.start()
    assert queue.get(timeout=60) == 0
    child.join(30)
