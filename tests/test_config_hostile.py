"""Hostile configuration: what an operator types into ``RAG_RERANK_*`` variables and flags.

Every value is either read as documented (docs/configuration.md, "Value syntax") or refused
with a :class:`ConfigurationError` that names the variable and says what to set; a typo in a
variable's name is reported, never silently ignored; ``rag-rerank info`` reports every problem
as a line instead of stopping at the first; and the package's entry points and lazy names say
what to use instead of failing bare.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import warnings
from importlib import metadata
from pathlib import Path
from typing import Any, get_args

import pytest

import rag_rerank_plugins
from rag_rerank_plugins import cli
from rag_rerank_plugins._config import AdapterConfig
from rag_rerank_plugins.engine_config import MAX_METRICS_WINDOW, EngineConfig, PoolConfig
from rag_rerank_plugins.exceptions import ConfigurationError, UnknownBackendError
from rag_rerank_plugins.policy import requested_torch_threads
from rag_rerank_plugins.server.config import ServerConfig
from rag_rerank_plugins.settings import (
    SECTIONS,
    Settings,
    known_variables,
    unknown_variables,
)

SRC = Path(rag_rerank_plugins.__file__).resolve().parent


def _numeric_fields() -> list[tuple[type[Any], str]]:
    out = []
    for section in SECTIONS:
        for name, info in section.model_fields.items():
            kinds = (info.annotation, *get_args(info.annotation))
            numeric = (int in kinds or float in kinds) and bool not in kinds
            if numeric and name != "memory_budget_mb":  # its own parser: tested below
                out.append((section, name))
    return out


def _var(section: type[Any], name: str) -> str:
    return str(section.env_prefix) + name.upper()


def _read(section: type[Any], name: str, text: str) -> Any:
    """The field as ``RAG_RERANK_<NAME>=text`` sets it (ServerConfig without its serve checks)."""
    return getattr(section.from_sources({_var(section, name): text}), name)


# -- values ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(("section", "name"), _numeric_fields())
def test_nan_is_refused_as_nan_naming_the_variable(section: type[Any], name: str) -> None:
    # nan compares false with every bound: it was "must be at most 60000" or "at least 0".
    with pytest.raises(ConfigurationError) as excinfo:
        _read(section, name, "NaN")
    message = str(excinfo.value)
    assert _var(section, name) in message
    assert re.search(r"must be a (whole )?number", message), message


@pytest.mark.parametrize(("section", "name"), _numeric_fields())
def test_blank_variable_counts_as_unset(section: type[Any], name: str) -> None:
    default = section.model_fields[name].get_default(call_default_factory=True)
    assert _read(section, name, "   ") == default


def test_blank_text_variable_is_unset_not_an_empty_device(clean_env: pytest.MonkeyPatch) -> None:
    clean_env.setenv("RAG_RERANK_DEVICE", " ")
    clean_env.setenv("RAG_RERANK_RERANKER_MODEL", "\t")
    settings = Settings()
    assert settings.device == "auto"  # was "": every adapter then failed on device ''
    assert settings.reranker_model == AdapterConfig().reranker_model


@pytest.mark.parametrize(
    ("variable", "text", "expected"),
    [
        ("RAG_RERANK_MAX_BATCH_SIZE", " 8 ", 8),
        ("RAG_RERANK_MAX_BATCH_SIZE", "1_000", 1000),
        ("RAG_RERANK_TOKEN_BUDGET", "none", None),
        ("RAG_RERANK_TOKEN_BUDGET", "None", None),
        ("RAG_RERANK_MAX_WAIT_MS", "1e3", 1000.0),
        ("RAG_RERANK_REQUEST_TIMEOUT_S", "inf", None),
        ("RAG_RERANK_PIPELINE", "On", True),
        ("RAG_RERANK_PIPELINE", "0", False),
        ("RAG_RERANK_PIPELINE", "yes", True),
    ],
)
def test_documented_syntax_is_read(variable: str, text: str, expected: Any) -> None:
    name = variable.removeprefix("RAG_RERANK_").lower()
    assert getattr(EngineConfig.from_env({variable: text}), name) == expected


@pytest.mark.parametrize(
    ("variable", "text", "needle"),
    [
        ("RAG_RERANK_MAX_BATCH_SIZE", "1e3", "whole number"),
        ("RAG_RERANK_MAX_BATCH_SIZE", "0x10", "whole number"),
        ("RAG_RERANK_MAX_BATCH_SIZE", "١٢", "whole number"),
        ("RAG_RERANK_MAX_BATCH_SIZE", "'8'", "whole number"),
        ("RAG_RERANK_MAX_BATCH_SIZE", "8abc", "whole number"),
        ("RAG_RERANK_MAX_BATCH_SIZE", "-1", "positive"),
        ("RAG_RERANK_MAX_BATCH_SIZE", "null", "whole number"),
        ("RAG_RERANK_PIPELINE", "maybe", "true or false"),
        ("RAG_RERANK_BULK_AGING_MS", "inf", "finite"),
        ("RAG_RERANK_MAX_WAIT_MS", "inf", "at most"),
    ],
)
def test_bad_values_name_the_variable(variable: str, text: str, needle: str) -> None:
    with pytest.raises(ConfigurationError) as excinfo:
        EngineConfig.from_env({variable: text})
    assert f"{variable}={text!r}" in str(excinfo.value)
    assert needle in str(excinfo.value)


def test_metrics_window_beyond_any_use_is_refused_not_an_overflow_at_load() -> None:
    # It was accepted, then the first model load died in deque(maxlen=...) with OverflowError.
    with pytest.raises(ConfigurationError, match="RAG_RERANK_METRICS_WINDOW"):
        EngineConfig.from_env({"RAG_RERANK_METRICS_WINDOW": "99999999999999999999"})
    from rag_rerank_plugins.stats import Metrics

    Metrics(EngineConfig(metrics_window=MAX_METRICS_WINDOW).metrics_window, 64)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("6000", 6000),
        ("1_000", 1000),
        (" 2.5 ", 2.5),
        ("1e3", 1000.0),
        ("inf", float("inf")),  # the description's "inf: no limit", for every device
        ("cpu=inf,cuda:0=1e3", {"cpu": float("inf"), "cuda:0": 1000.0}),
    ],
)
def test_memory_budget_reads_numbers_as_the_other_settings(text: str, expected: Any) -> None:
    config = PoolConfig.from_env({"RAG_RERANK_POOL_MEMORY_BUDGET_MB": text})
    assert config.memory_budget_mb == expected


def test_memory_budget_inf_means_no_limit() -> None:
    config = PoolConfig.from_env({"RAG_RERANK_POOL_MEMORY_BUDGET_MB": "inf"})
    assert config.budget_bytes("cpu") is None


@pytest.mark.parametrize("text", ["nan", "cpu=nan", "١٢", "0x10", "'6000'"])
def test_memory_budget_refuses_what_the_numbers_refuse(text: str) -> None:
    with pytest.raises(ConfigurationError, match="RAG_RERANK_POOL_MEMORY_BUDGET_MB"):
        PoolConfig.from_env({"RAG_RERANK_POOL_MEMORY_BUDGET_MB": text})


@pytest.mark.parametrize(
    ("variable", "text"),
    [("RAG_RERANK_DEVICE", "tpu"), ("RAG_RERANK_DEVICE", "cuda:x"), ("RAG_RERANK_DTYPE", "int4")],
)
def test_bad_device_or_dtype_names_the_variable(variable: str, text: str) -> None:
    # Was accepted, then the first adapter failed without saying it came from a variable.
    for section in (AdapterConfig, ServerConfig):
        with pytest.raises(ConfigurationError, match=re.escape(f"(from {variable}={text!r})")):
            section.from_sources({variable: text})


@pytest.mark.parametrize(
    ("variable", "text"),
    [("RAG_RERANK_DEVICE", "CUDA"), ("RAG_RERANK_DEVICE", "cuda:1"), ("RAG_RERANK_DTYPE", "fp16")],
)
def test_device_and_dtype_aliases_stay_accepted(variable: str, text: str) -> None:
    name = variable.removeprefix("RAG_RERANK_").lower()
    assert getattr(AdapterConfig.from_env({variable: text}), name) == text


# -- RAG_RERANK_TORCH_THREADS: one parser ---------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"), [("none", None), (" 2 ", 2), ("2.0", 2), (" ", None)]
)
def test_torch_threads_reads_as_its_setting(
    clean_env: pytest.MonkeyPatch, text: str, expected: int | None
) -> None:
    # 'none' is the documented default, yet the loader's own parser refused it.
    clean_env.setenv("RAG_RERANK_TORCH_THREADS", text)
    assert requested_torch_threads() == expected
    assert AdapterConfig.from_env().torch_threads == expected


@pytest.mark.parametrize("text", ["0", "-1", "many", "99999999999"])
def test_bad_torch_threads_name_the_variable(clean_env: pytest.MonkeyPatch, text: str) -> None:
    clean_env.setenv("RAG_RERANK_TORCH_THREADS", text)
    with pytest.raises(ConfigurationError, match=re.escape(f"RAG_RERANK_TORCH_THREADS={text!r}")):
        requested_torch_threads()


# -- Settings -------------------------------------------------------------------------------------


def test_settings_refuses_unknown_keywords(clean_env: pytest.MonkeyPatch) -> None:
    # extra="ignore" dropped a typo silently; the sections already refused theirs.
    with pytest.raises(ConfigurationError, match="did you mean 'batch_size'"):
        Settings(batch_sise=8)  # type: ignore[call-arg]


def test_a_section_dict_overrides_only_its_fields(clean_env: pytest.MonkeyPatch) -> None:
    clean_env.setenv("RAG_RERANK_MAX_QUEUE", "7")
    clean_env.setenv("RAG_RERANK_POOL_IDLE_UNLOAD_S", "30")
    settings = Settings(engine={"max_batch_size": 3}, pool={"over_budget": "raise"})
    assert (settings.engine.max_batch_size, settings.engine.max_queue) == (3, 7)
    assert (settings.pool.over_budget, settings.pool.idle_unload_s) == ("raise", 30)
    assert Settings(engine=EngineConfig(max_queue=4)).engine.max_queue == 4  # a whole section


def test_a_bad_section_dict_is_one_clear_message(clean_env: pytest.MonkeyPatch) -> None:
    with pytest.raises(ConfigurationError) as excinfo:
        Settings(engine={"max_queue": 0})
    message = str(excinfo.value)
    assert message.startswith("Settings.engine: EngineConfig.max_queue must be positive")
    assert ", got {" not in message  # was the section's message and the dict repeated


# -- unknown variables ----------------------------------------------------------------------------


def test_a_misspelt_variable_warns_with_the_closest_name(clean_env: pytest.MonkeyPatch) -> None:
    clean_env.setenv("RAG_RERANK_MAX_QUEU", "8")
    clean_env.setenv("RAG_RERANK_device", "cpu")
    with pytest.warns(UserWarning, match="is not a setting") as record:
        settings = Settings()
    messages = " ".join(str(w.message) for w in record)
    assert "RAG_RERANK_MAX_QUEU is not a setting" in messages
    assert "did you mean RAG_RERANK_MAX_QUEUE?" in messages
    assert "did you mean RAG_RERANK_DEVICE?" in messages
    assert settings.engine.max_queue == 1024  # ignored, as the warning says


def test_a_misspelt_engine_variable_warns_when_a_pool_reads_it(
    clean_env: pytest.MonkeyPatch,
) -> None:
    """docs/configuration.md's own example, RAG_RERANK_MAX_QUEU, is read by ModelPool() (the
    engine's settings), which never warned: only get_settings() (the adapters' path) did."""
    from rag_rerank_plugins import ModelPool

    clean_env.setenv("RAG_RERANK_MAX_QUEU", "8")
    with pytest.warns(UserWarning, match="did you mean RAG_RERANK_MAX_QUEUE"):
        pool = ModelPool()
    assert pool.config.max_queue == 1024
    with pytest.warns(UserWarning, match="RAG_RERANK_MAX_QUEU"):
        EngineConfig.from_env()
    with warnings.catch_warnings():  # a given environment is the caller's: no warning
        warnings.simplefilter("error")
        EngineConfig.from_env({"RAG_RERANK_MAX_QUEU": "8"})
        ModelPool(config=EngineConfig(), pool_config=PoolConfig())


def test_an_unrelated_unknown_variable_gets_no_wrong_suggestion() -> None:
    found = unknown_variables({"RAG_RERANK_GPU": "1", "RAG_RERANK_PORT": "1", "OTHER": "x"})
    assert found == {"RAG_RERANK_GPU": None}
    assert unknown_variables({"RAG_RERANK_GPU": ""}) == {}  # empty: unset


def test_every_variable_the_package_reads_is_known(clean_env: pytest.MonkeyPatch) -> None:
    # A variable read directly somewhere (os.environ) must never be warned about.
    used = set()
    for path in SRC.rglob("*.py"):
        used.update(re.findall(r"\bRAG_RERANK_[A-Z0-9_]*[A-Z0-9]\b", path.read_text()))
    # A prefix, a docs placeholder, and the typo the warning's docs show.
    used -= {"RAG_RERANK_POOL", "RAG_RERANK_X", "RAG_RERANK_MAX_QUEU"}
    assert used - known_variables() == set()
    for var in known_variables():
        clean_env.setenv(var, "")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        Settings()


# -- the CLI --------------------------------------------------------------------------------------


def _run(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    full = {k: v for k, v in os.environ.items() if not k.startswith("RAG_RERANK_")}
    full.update(env or {})
    return subprocess.run(
        [sys.executable, *args], capture_output=True, text=True, env=full, timeout=300
    )


def test_info_reports_every_bad_variable_as_a_line() -> None:
    # RAG_RERANK_CPU_BF16=maybe and RAG_RERANK_MAX_QUEUE=0 each stopped `info` half-way.
    done = _run(
        "-m",
        "rag_rerank_plugins",
        "info",
        env={
            "RAG_RERANK_CPU_BF16": "maybe",
            "RAG_RERANK_CPU_KIND": "garbage",
            "RAG_RERANK_MAX_QUEUE": "0",
            "RAG_RERANK_TORCH_THREADS": "none",
            "RAG_RERANK_MAX_QUEU": "3",
            "HF_HUB_OFFLINE": "1",
        },
    )
    assert "Traceback" not in done.stderr, done.stderr
    assert done.returncode == 0, done.stderr
    out = done.stdout
    assert "RAG_RERANK_CPU_BF16" in out
    assert "RAG_RERANK_CPU_KIND" in out
    assert "(from RAG_RERANK_MAX_QUEUE='0')" in out
    assert "did you mean RAG_RERANK_MAX_QUEUE?" in out
    assert "must be an integer" not in out  # TORCH_THREADS=none is the documented default
    assert "models loaded in this process" in out


def test_python_dash_m_runs_the_cli_and_imports_nothing_heavy() -> None:
    done = _run("-m", "rag_rerank_plugins", "--version")
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == f"rag-rerank {rag_rerank_plugins.__version__}"
    probe = (
        "import sys, json, rag_rerank_plugins\n"
        "print(json.dumps(sorted(m.split('.')[0] for m in sys.modules)))"
    )
    loaded = set(json.loads(_run("-c", probe).stdout.strip().splitlines()[-1]))
    heavy = {"torch", "transformers", "langchain_core", "llama_index", "pydantic_settings"}
    assert loaded & heavy == set()


def test_version_matches_the_installed_distribution() -> None:
    try:
        installed = metadata.version("rag-rerank-plugins")
    except metadata.PackageNotFoundError:
        pytest.skip("not installed as a distribution")
    assert rag_rerank_plugins.__version__ == installed


@pytest.mark.parametrize("flag", ["--reranker", "--backend"])
def test_demo_refuses_a_blank_name(flag: str, capsys: pytest.CaptureFixture[str]) -> None:
    # A blank --reranker silently ran the default model.
    with pytest.raises(SystemExit) as excinfo:
        cli.main(["demo", flag, " "])
    assert excinfo.value.code == 2
    assert f"argument {flag}: expected a name" in capsys.readouterr().err


def test_demo_bad_backend_is_a_clear_error_before_anything_runs(
    capsys: pytest.CaptureFixture[str],
) -> None:
    for module in ("langchain_core", "llama_index.core"):
        pytest.importorskip(module)
    from rag_rerank_plugins import ModelPool
    from rag_rerank_plugins.demo import run_demo

    lines: list[str] = []
    with pytest.raises(UnknownBackendError):  # was a pydantic ValidationError traceback
        run_demo(requests=1, backend="bogus", out=lines.append, pool=ModelPool())
    assert lines == []  # nothing built, nothing loaded
    with pytest.raises(ConfigurationError, match="embedder backend"):
        run_demo(requests=1, backend="fake-embedder", out=lines.append, pool=ModelPool())
    with pytest.raises(ConfigurationError, match="non-empty"):
        run_demo(requests=1, reranker="", out=lines.append, pool=ModelPool())
    assert cli.main(["demo", "--requests", "1", "--backend", "bogus"]) == 1
    assert "rag-rerank: error: Unknown backend 'bogus'" in capsys.readouterr().err


# -- lazy names -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "hint"),
    [
        ("modelpool", "did you mean 'ModelPool'?"),
        ("ModelPol", "did you mean 'ModelPool'?"),
        ("SharedRerankCompressor", "from rag_rerank_plugins.langchain import"),
        ("SharedRerankPostprocessor", "from rag_rerank_plugins.llama_index import"),
        ("Setings", "'Settings' (in rag_rerank_plugins.settings)"),
        ("nonexistent", "dir(rag_rerank_plugins)"),
    ],
)
def test_missing_attribute_says_what_to_use(name: str, hint: str) -> None:
    with pytest.raises(AttributeError) as excinfo:
        getattr(rag_rerank_plugins, name)
    assert hint in str(excinfo.value)
    assert excinfo.value.name == name


def test_every_hinted_home_has_the_name() -> None:
    import importlib

    for name, home in rag_rerank_plugins._ELSEWHERE.items():
        assert hasattr(importlib.import_module(home), name), (name, home)
        assert name not in rag_rerank_plugins.__all__
    assert not hasattr(rag_rerank_plugins, "__wrapped__")  # tools' probes: plain AttributeError


@pytest.mark.parametrize(
    "package",
    [
        "rag_rerank_plugins",
        "rag_rerank_plugins.langchain",
        "rag_rerank_plugins.llama_index",
        "rag_rerank_plugins.server",
    ],
)
def test_dir_and_tab_completion_list_every_public_name_before_first_use(package: str) -> None:
    """In a fresh interpreter (nothing accessed yet): ``dir()`` lists ``__all__`` and the usual
    module attributes, and rlcompleter completes a lazy name (before: llama_index and server
    listed none of their lazy names, the top level no ``__file__``)."""
    import subprocess
    import sys

    code = f"""
import importlib, rlcompleter
m = importlib.import_module({package!r})
missing = sorted(set(m.__all__) - set(dir(m)))
assert not missing, missing
assert {{"__file__", "__name__"}} <= set(dir(m))
first = sorted(m.__all__)[0]
done = rlcompleter.Completer({{"m": m}}).complete("m." + first[:3], 0)
assert done is not None and done.startswith("m." + first[:3]), done
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr[-1500:]
