"""The public API and configuration at the edges a hostile user finds.

* Errors cross process boundaries (Ray Serve, multiprocessing): every error class unpickles,
  message and attributes kept; ``ModelLoadError(model, backend, cause)`` raised TypeError.
* ``pool.embed`` / ``pool.score_pairs`` refuse what is not a list before any model work: a dict
  embedded its keys, ``None`` was a bare TypeError deep in the pool.
* ``ModelPool(config={...})`` was accepted and failed at the first call with AttributeError.
* A pool key is one model: ``{"a": 1}`` and ``[["a", 1]]`` options were one key (tuples compare
  equal), ``cuda:01`` and ``cuda:1`` two; a repeated option name kept both values.
* Memory budgets: ``cuda:abc`` or ``cuda:-1`` were accepted (a budget no model is ever on), and
  ``cpu=1,cpu=2`` kept the last silently.
* Flags read numbers as their variables do (``--max-queue 8.0``; no Arabic digits), a flag wins
  over a bad variable for every setting, ``rag-rerank info`` reports every bad section, and the
  root settings' errors name the variable.
"""

from __future__ import annotations

import pickle
import subprocess
import sys

import pytest

from rag_rerank_plugins import ModelPool, ModelSpec
from rag_rerank_plugins import exceptions as errors
from rag_rerank_plugins.cli import build_parser
from rag_rerank_plugins.engine_config import EngineConfig, PoolConfig
from rag_rerank_plugins.testing import fake_embedder_spec, fake_reranker_spec

SAMPLES = [
    errors.ModelLoadError("org/m", "cross-encoder", OSError("disk full")),
    errors.ModelNotFoundError("org/m", "cross-encoder", "offline"),
    errors.ModelNotFoundError("./missing-folder", "cross-encoder", "no such folder"),
    errors.UnknownBackendError("nope", ["cross-encoder", "onnx-cross-encoder"]),
    errors.MissingDependencyError("torch", "st", "cross-encoder"),
    errors.RemoteAuthError("401 from server", url="http://h/rerank", status=401),
    errors.InferenceError("m failed"),
    errors.ConfigurationError("bad"),
    errors.RequestTimeoutError("late"),
]


@pytest.mark.parametrize("error", SAMPLES, ids=lambda e: type(e).__name__)
def test_every_error_unpickles_with_its_message_and_attributes(error: Exception) -> None:
    again = pickle.loads(pickle.dumps(error))
    assert type(again) is type(error)
    assert str(again) == str(error)
    assert again.__dict__ == error.__dict__


def test_every_error_class_of_the_package_is_covered() -> None:
    classes = {
        cls
        for cls in vars(errors).values()
        if isinstance(cls, type) and issubclass(cls, errors.RagRerankError)
    }
    custom_init = {cls for cls in classes if "__init__" in vars(cls)}
    assert custom_init <= {type(e) for e in SAMPLES} | {errors.RemoteError}


@pytest.mark.parametrize("bad", [{"alpha": 1, "beta": 2}, None, 5, b"bytes", "one text"])
def test_pool_embed_refuses_what_is_not_a_list_of_texts(bad: object) -> None:
    pool = ModelPool(config=EngineConfig())
    with pytest.raises(errors.InvalidInputError, match="texts must be a list of str"):
        pool.embed(fake_embedder_spec(), bad)  # type: ignore[arg-type]
    assert pool.loaded_specs() == []  # refused before any load


@pytest.mark.parametrize("bad", [None, 5, {("q", "p"): 1}])
def test_pool_score_pairs_refuses_what_is_not_a_list_of_pairs(bad: object) -> None:
    pool = ModelPool(config=EngineConfig())
    with pytest.raises(errors.InvalidInputError, match="pairs must be a list"):
        pool.score_pairs(fake_reranker_spec(), bad)  # type: ignore[arg-type]


@pytest.mark.parametrize("argument", ["config", "pool_config"])
def test_model_pool_refuses_a_dict_for_a_config(argument: str) -> None:
    with pytest.raises(errors.ConfigurationError, match=r"\(\*\*your_dict\)"):
        ModelPool(**{argument: {"max_queue": 3}})  # type: ignore[arg-type]


def test_options_of_different_shapes_are_different_keys() -> None:
    as_dict = ModelSpec("m", options={"x": {"a": 1}})
    as_list = ModelSpec("m", options={"x": [["a", 1]]})
    assert as_dict != as_list
    assert len({as_dict, as_list}) == 2
    assert as_dict.options_dict == {"x": {"a": 1}}
    assert as_list.options_dict == {"x": [["a", 1]]}
    assert ModelSpec("m", options={"x": {"a": 1, "b": 2}}) == ModelSpec(
        "m", options={"x": {"b": 2, "a": 1}}
    )
    assert ModelSpec("m", options={"x": (1, 2)}) == ModelSpec("m", options={"x": [1, 2]})


def test_one_gpu_is_one_key() -> None:
    assert ModelSpec("m", device="cuda:01") == ModelSpec("m", device="cuda:1")
    assert ModelSpec("m", device=" CUDA:1 ").device == "cuda:1"
    with pytest.raises(errors.ConfigurationError, match="Unsupported device"):
        ModelSpec("m", device="cuda:\u0661")  # an Arabic-Indic digit


@pytest.mark.parametrize(
    ("options", "match"),
    [
        ([("a", 1), ("a", 2)], "more than once"),
        ("ab", "must be a dict"),
        (None, "must be a dict"),
        ([("a", 1, 2)], "pairs"),
        (["a"], "pairs"),
    ],
)
def test_bad_options_are_a_configuration_error(options: object, match: str) -> None:
    with pytest.raises(errors.ConfigurationError, match=match):
        ModelSpec("m", options=options)  # type: ignore[arg-type]


@pytest.mark.parametrize("text", ["cuda:abc=5", "cuda:-1=5", "gpu=5", "cpu=1,cpu=2"])
def test_a_budget_no_device_can_use_is_refused(text: str) -> None:
    with pytest.raises(errors.ConfigurationError, match="RAG_RERANK_POOL_MEMORY_BUDGET_MB"):
        PoolConfig.from_env({"RAG_RERANK_POOL_MEMORY_BUDGET_MB": text})


def test_a_budget_names_gpus_as_the_pool_does() -> None:
    config = PoolConfig.from_env({"RAG_RERANK_POOL_MEMORY_BUDGET_MB": "cuda:01=5,cpu=3"})
    assert config.memory_budget_mb == {"cuda:1": 5, "cpu": 3}
    assert PoolConfig(memory_budget_mb={"cuda:01": 5}).budget_bytes("cuda:1") == 5 * 2**20


def _serve(*flags: str) -> dict[str, object]:
    parsed = vars(build_parser().parse_args(["serve", *flags]))
    return {k.split(".")[-1]: v for k, v in parsed.items() if v is not None}


def test_flags_read_whole_numbers_as_their_variables_do() -> None:
    args = _serve("--max-queue", "8.0", "--threads", "1.0", "--max-wait-ms", "2.5")
    assert (args["max_queue"], args["torch_threads"], args["max_wait_ms"]) == (8, 1, 2.5)
    assert EngineConfig.from_env({"RAG_RERANK_MAX_QUEUE": "8.0"}).max_queue == 8


@pytest.mark.parametrize("value", ["\u0661\u0662", "8.5", "eight"])
def test_flags_refuse_what_their_variables_refuse(value: str) -> None:
    with pytest.raises(SystemExit):
        _serve("--max-queue", value)
    with pytest.raises(errors.ConfigurationError):
        EngineConfig.from_env({"RAG_RERANK_MAX_QUEUE": value})


@pytest.mark.parametrize(
    ("section", "variable", "bad", "given"),
    [
        (EngineConfig, "RAG_RERANK_MAX_QUEUE", "abc", {"max_queue": 8}),
        (PoolConfig, "RAG_RERANK_POOL_MEMORY_BUDGET_MB", "abc", {"memory_budget_mb": 100}),
    ],
)
def test_a_flag_wins_over_a_bad_variable(
    section: type, variable: str, bad: str, given: dict[str, object]
) -> None:
    config = section.from_sources({variable: bad}, given)
    assert getattr(config, next(iter(given))) == next(iter(given.values()))


def test_info_reports_every_bad_section(tmp_path: object) -> None:
    env = {
        "PATH": "/usr/bin:/bin",
        "HF_HUB_OFFLINE": "1",
        "RAG_RERANK_MAX_QUEUE": "0",
        "RAG_RERANK_POOL_MEMORY_BUDGET_MB": "-1",
        "RAG_RERANK_TORCH_THREADS": "abc",
        "RAG_RERANK_PORT": "http",
    }
    result = subprocess.run(
        [sys.executable, "-m", "rag_rerank_plugins", "info"],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    text = result.stdout + result.stderr
    for variable in (
        "RAG_RERANK_MAX_QUEUE",
        "RAG_RERANK_POOL_MEMORY_BUDGET_MB",
        "RAG_RERANK_TORCH_THREADS",
        "RAG_RERANK_PORT",
    ):
        assert variable in text, text


def test_root_settings_errors_name_the_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    from rag_rerank_plugins.settings import Settings

    monkeypatch.setenv("RAG_RERANK_TORCH_THREADS", "abc")
    with pytest.raises(errors.ConfigurationError, match="RAG_RERANK_TORCH_THREADS='abc'"):
        Settings()
