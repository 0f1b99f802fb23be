"""Hostile environments and flags for ``rag-rerank serve`` and ``rag-rerank info``.

What an operator relies on: a blank ``--host`` never exposes the server on every interface; the
variable of ``--api-key-file`` (``RAG_RERANK_API_KEY_FILE``) turns authentication on exactly as
the flag does, never silently off; a flag wins over a bad variable of the same setting; a
variable named after a flag whose variable is another is told the right name; and the CLI's
messages name the flag or variable to fix instead of quoting Python.

``rag-rerank serve`` runs through :func:`rag_rerank_plugins.cli.main` with the server's
``run.serve`` replaced by a recorder, so nothing listens; ``info`` runs in a subprocess where
it matters what reaches stderr.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import warnings
from pathlib import Path
from typing import Any

import pytest

from rag_rerank_plugins import cli
from rag_rerank_plugins._config import AdapterConfig
from rag_rerank_plugins._cpu import usable_cores
from rag_rerank_plugins.backends import _onnx_common
from rag_rerank_plugins.exceptions import ConfigurationError
from rag_rerank_plugins.server.config import ServerConfig
from rag_rerank_plugins.settings import (
    Settings,
    unknown_variables,
    warn_unknown_variables,
)
from rag_rerank_plugins.spec import ModelSpec

FAKE_SPEC = json.dumps({"name": "r", "model": "m", "backend": "fake-reranker"})
#: Set by tests/conftest.py or CI for the whole run: left alone.
CPU_OVERRIDES = ("RAG_RERANK_CPU_BF16", "RAG_RERANK_CPU_KIND")
HOST_ADVICE = "give an address such as 127.0.0.1 (this machine) or 0.0.0.0 (every interface)"


@pytest.fixture
def served(clean_env: pytest.MonkeyPatch) -> dict[str, Any]:
    """What `rag-rerank serve` would start with: the server's run() is replaced by a recorder,
    so no test here listens on anything."""
    import rag_rerank_plugins.server.run as run

    seen: dict[str, Any] = {}

    def fake_serve(config: ServerConfig, *, pool: Any = None) -> int:
        seen.update(config=config, pool=pool)
        return 0

    clean_env.setattr(run, "serve", fake_serve)
    clean_env.setenv("RAG_RERANK_TORCH_THREADS", "")  # serve sets it: restored after the test
    return seen


def _serve(*argv: str) -> int:
    """``rag-rerank serve --spec <fake> ARGV`` -> exit status (argparse's SystemExit too)."""
    try:
        return cli.main(["serve", "--spec", FAKE_SPEC, *argv])
    except SystemExit as exc:
        return int(str(exc.code))


def _key_file(tmp_path: Path, text: str, name: str = "key") -> str:
    path = tmp_path / name
    path.write_text(text)
    return str(path)


# -- 1. a blank host -----------------------------------------------------------------------------


@pytest.mark.parametrize("host", ["", " ", "\t"])
def test_a_blank_host_flag_is_refused_before_listening(
    served: dict[str, Any], capsys: pytest.CaptureFixture[str], host: str
) -> None:
    """uvicorn binds every interface (0.0.0.0 and ::) for host "": `--host ""` exposed the
    server to the network, while a blank RAG_RERANK_HOST means 127.0.0.1."""
    assert _serve("--host", host) != 0
    err = capsys.readouterr().err
    assert "--host" in err, err
    assert "RAG_RERANK_HOST" in err, err
    assert HOST_ADVICE in err, err
    assert served == {}  # refused before anything was started


def test_a_blank_host_is_refused_wherever_a_server_config_is_built(
    clean_env: pytest.MonkeyPatch,
) -> None:
    for build in (
        lambda: ServerConfig(host=""),
        lambda: ServerConfig.from_env(host=" "),
        lambda: Settings(server={"host": "  "}),
    ):
        with pytest.raises(ConfigurationError, match=re.escape(HOST_ADVICE)):
            build()


@pytest.mark.parametrize("value", ["", "   "])
def test_a_blank_host_variable_still_counts_as_unset(
    served: dict[str, Any], value: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("RAG_RERANK_HOST", value)
    assert _serve() == 0
    assert served["config"].host == "127.0.0.1"


# -- 2. the variable of --api-key-file -----------------------------------------------------------


def test_api_key_file_variable_turns_authentication_on(
    served: dict[str, Any],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """RAG_RERANK_API_KEY_FILE was silently ignored: the server ran with no authentication."""
    monkeypatch.setenv("RAG_RERANK_API_KEY_FILE", _key_file(tmp_path, "s3cret\n"))
    assert _serve() == 0
    assert served["config"].api_key == "s3cret"
    captured = capsys.readouterr()
    assert "s3cret" not in captured.out + captured.err
    assert "s3cret" not in repr(served["config"])
    # Every reader of the settings sees it, not only the CLI.
    assert ServerConfig.from_sources().api_key == "s3cret"
    assert Settings().server.api_key == "s3cret"
    assert "RAG_RERANK_API_KEY_FILE" not in unknown_variables()


def test_the_api_key_file_flag_wins_over_both_variables(
    served: dict[str, Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("RAG_RERANK_API_KEY_FILE", str(tmp_path / "missing"))  # not even read
    monkeypatch.setenv("RAG_RERANK_API_KEY", "from-env")
    assert _serve("--api-key-file", _key_file(tmp_path, "from-flag\n")) == 0
    assert served["config"].api_key == "from-flag"


@pytest.mark.parametrize(
    ("content", "needle"),
    [
        (None, "cannot read RAG_RERANK_API_KEY_FILE="),
        ("", "is empty"),
        ("  \n\n", "is empty"),
        ("first\nsecond\n", "'\\n'"),
        ("tab\tkey", "'\\t'"),
    ],
)
def test_a_bad_api_key_file_variable_stops_serve_naming_it(
    served: dict[str, Any],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    content: str | None,
    needle: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    path = tmp_path / "key"
    if content is not None:
        path.write_text(content)
    monkeypatch.setenv("RAG_RERANK_API_KEY_FILE", str(path))
    assert _serve() != 0
    err = capsys.readouterr().err
    assert needle in err, err
    assert "RAG_RERANK_API_KEY_FILE" in err, err
    assert not re.search("first|second", err)  # the token is never echoed
    assert served == {}


def test_a_blank_api_key_file_variable_is_refused_not_unset(
    served: dict[str, Any], capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Read as unset, a secret template that rendered blanks would leave the server open."""
    monkeypatch.setenv("RAG_RERANK_API_KEY_FILE", "  ")
    assert _serve() != 0
    assert "RAG_RERANK_API_KEY_FILE is blank" in capsys.readouterr().err
    assert served == {}


def test_both_api_key_variables_set_is_an_error(
    served: dict[str, Any],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("RAG_RERANK_API_KEY_FILE", _key_file(tmp_path, "one\n"))
    monkeypatch.setenv("RAG_RERANK_API_KEY", "two")
    assert _serve() != 0
    err = capsys.readouterr().err
    assert "Both RAG_RERANK_API_KEY and RAG_RERANK_API_KEY_FILE are set" in err, err
    assert served == {}


def test_serve_help_names_the_api_key_file_variable(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("COLUMNS", "2000")
    with pytest.raises(SystemExit):
        cli.main(["serve", "--help"])
    assert "RAG_RERANK_API_KEY_FILE" in " ".join(capsys.readouterr().out.split())


@pytest.mark.parametrize(
    ("var", "flag", "meant"),
    [
        ("RAG_RERANK_THREADS", "--threads", "RAG_RERANK_TORCH_THREADS"),
        ("RAG_RERANK_RERANKER", "--reranker", "RAG_RERANK_RERANKERS"),
        ("RAG_RERANK_EMBEDDER", "--embedder", "RAG_RERANK_EMBEDDERS"),
        ("RAG_RERANK_SPEC", "--spec", "RAG_RERANK_SPECS"),
        ("RAG_RERANK_NO_WARMUP", "--no-warmup", "RAG_RERANK_WARMUP"),
    ],
)
def test_a_variable_named_after_a_flag_is_told_the_flags_variable(
    clean_env: pytest.MonkeyPatch, var: str, flag: str, meant: str
) -> None:
    """`serve --help` says a flag's variable is RAG_RERANK_<FLAG>; for these flags it is
    another, and RAG_RERANK_THREADS (too unlike its variable for difflib) got no warning."""
    assert unknown_variables({var: "2"}) == {var: meant}
    with pytest.warns(UserWarning, match=re.escape(f"the variable of {flag} is {meant}")):
        warn_unknown_variables({var: "2"})


# -- 3. a flag wins over a bad variable ----------------------------------------------------------


@pytest.mark.parametrize(
    ("var", "value", "flag", "given", "field", "want"),
    [
        ("RAG_RERANK_DEVICE", "tpu", "--device", "cpu", "device", "cpu"),
        ("RAG_RERANK_DTYPE", "float8", "--dtype", "float32", "dtype", "float32"),
        ("RAG_RERANK_BATCH_SIZE", "0", "--batch-size", "8", "batch_size", 8),
        (
            "RAG_RERANK_RERANKER_BACKEND",
            "nope",
            "--reranker-backend",
            "fake-reranker",
            "reranker_backend",
            "fake-reranker",
        ),
        (
            "RAG_RERANK_EMBEDDER_BACKEND",
            "nope",
            "--embedder-backend",
            "fake-embedder",
            "embedder_backend",
            "fake-embedder",
        ),
    ],
)
def test_a_flag_wins_over_a_bad_variable_of_its_setting(
    served: dict[str, Any],
    var: str,
    value: str,
    flag: str,
    given: str,
    field: str,
    want: Any,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """`RAG_RERANK_DEVICE=tpu rag-rerank serve --device cpu` failed: the adapters' section was
    built whole from the environment just to read the torch threads."""
    monkeypatch.setenv(var, value)
    assert _serve(flag, given) == 0
    assert getattr(served["config"], field) == want


def test_torch_threads_still_come_from_their_variable_or_flag(
    served: dict[str, Any], capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("RAG_RERANK_DEVICE", "tpu")  # another setting's bad variable: not read
    monkeypatch.setenv("RAG_RERANK_TORCH_THREADS", "3")
    assert _serve("--device", "cpu") == 0
    assert os.environ["RAG_RERANK_TORCH_THREADS"] == "3"
    monkeypatch.setenv("RAG_RERANK_TORCH_THREADS", "0")
    assert _serve("--device", "cpu", "--threads", "2") == 0  # the flag wins over its variable
    assert os.environ["RAG_RERANK_TORCH_THREADS"] == "2"
    monkeypatch.setenv("RAG_RERANK_TORCH_THREADS", "0")
    capsys.readouterr()
    assert _serve("--device", "cpu") == 1  # without the flag, its bad variable is an error
    assert "(from RAG_RERANK_TORCH_THREADS='0')" in capsys.readouterr().err


# -- 4. messages ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("flag", "text", "needle"),
    [
        ("--port", "", "--port '': must be a whole number"),
        ("--port", " ", "--port ' ': must be a whole number"),
        ("--port", "none", "--port 'none': must be a whole number"),
        ("--graceful-timeout", "", "--graceful-timeout '': must be a number"),
        ("--max-length", "soon", "--max-length 'soon': must be a whole number"),
    ],
)
def test_a_flag_that_is_no_number_says_so_naming_the_flag(
    served: dict[str, Any], capsys: pytest.CaptureFixture[str], flag: str, text: str, needle: str
) -> None:
    assert _serve(flag, text) == 2
    err = capsys.readouterr().err
    assert needle in err, err
    assert "could not convert" not in err


@pytest.mark.parametrize("flag", ["--reranker-backend", "--embedder-backend"])
def test_a_blank_backend_flag_names_the_flag(
    served: dict[str, Any], capsys: pytest.CaptureFixture[str], flag: str
) -> None:
    assert _serve(flag, " ") == 1
    err = capsys.readouterr().err
    assert f"(from {flag})" in err, err
    assert "not blank" in err, err
    with pytest.raises(ConfigurationError, match="not blank"):
        AdapterConfig(reranker_backend="")


def test_port_zero_is_not_shown_as_port_zero(
    served: dict[str, Any], capsys: pytest.CaptureFixture[str]
) -> None:
    assert _serve("--port", "0") == 0
    out = capsys.readouterr().out
    assert "127.0.0.1:0" not in out, out
    assert "a free port chosen by the OS" in out, out


def test_a_blank_ort_threads_variable_counts_as_unset_at_load(
    clean_env: pytest.MonkeyPatch,
) -> None:
    spec = ModelSpec("m", backend="onnx-cross-encoder")
    clean_env.setenv("RAG_RERANK_ORT_THREADS", "  ")
    assert _onnx_common.threads_for(spec) == _onnx_common.default_threads()
    clean_env.setenv("RAG_RERANK_ORT_THREADS", " 3 ")
    assert _onnx_common.threads_for(spec) == 3
    clean_env.setenv("RAG_RERANK_ORT_THREADS", "abc")
    with pytest.raises(ConfigurationError, match="RAG_RERANK_ORT_THREADS must be a positive"):
        _onnx_common.threads_for(spec)


def _info(env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    full = {k: v for k, v in os.environ.items() if not k.startswith("RAG_RERANK_")}
    full.update({k: v for k, v in os.environ.items() if k in CPU_OVERRIDES})
    full.update(HF_HUB_OFFLINE="1", **env)
    return subprocess.run(
        [sys.executable, "-m", "rag_rerank_plugins", "info"],
        capture_output=True,
        text=True,
        env=full,
        timeout=300,
    )


def _onnx_line(stdout: str) -> str:
    return next(line for line in stdout.splitlines() if line.startswith("onnxruntime "))


def test_info_reports_ort_threads_as_the_load_reads_them_and_warns_once() -> None:
    """`info` showed "abc intra-op thread(s)" (the load then failed) and a blank count, and
    printed an unknown variable's warning three times (two UserWarnings and its own line)."""
    done = _info({"RAG_RERANK_ORT_THREADS": "abc", "RAG_RERANK_MAX_QUEU": "8"})
    assert done.returncode == 0, done.stderr
    line = _onnx_line(done.stdout)
    assert "invalid: RAG_RERANK_ORT_THREADS" in line, line
    assert "abc intra-op" not in line
    assert (done.stdout + done.stderr).count("RAG_RERANK_MAX_QUEU is not a setting") == 1, (
        done.stdout + done.stderr
    )
    assert "UserWarning" not in done.stderr, done.stderr

    blank = _info({"RAG_RERANK_ORT_THREADS": " "})
    assert blank.returncode == 0, blank.stderr
    line = _onnx_line(blank.stdout)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        cores = usable_cores()
    assert re.search(rf"\s{cores} intra-op thread\(s\)", line), line
