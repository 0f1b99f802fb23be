"""One configuration: the settings models, ``rag-rerank serve --help`` and the table of
docs/configuration.md cannot disagree, every variable name that worked before still works, and
flags, variables and defaults apply in that order."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError

from rag_rerank_plugins import cli
from rag_rerank_plugins._config import flag_for, format_default
from rag_rerank_plugins.engine_config import EngineConfig, PoolConfig
from rag_rerank_plugins.exceptions import ConfigurationError
from rag_rerank_plugins.server.config import SERVE_SECTIONS, ServerConfig
from rag_rerank_plugins.settings import SECTIONS, Settings, config_table, get_settings

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs" / "configuration.md"
FAKE_SPEC = json.dumps({"name": "r", "model": "m", "backend": "fake-reranker"})

#: Every RAG_RERANK_* setting name the docs, README and tests used before the settings were
#: unified: each must still be read (a rename would need an alias).
NAMES_IN_USE = [
    "RERANKER_MODEL",
    "RERANKER_BACKEND",
    "EMBEDDER_MODEL",
    "EMBEDDER_BACKEND",
    "DEVICE",
    "DTYPE",
    "BATCH_SIZE",
    "TORCH_THREADS",
    "MAX_BATCH_SIZE",
    "TOKEN_BUDGET",
    "MAX_WAIT_MS",
    "PIPELINE",
    "BULK_AGING_MS",
    "MAX_QUEUE",
    "QUEUE_TIMEOUT_S",
    "REQUEST_TIMEOUT_S",
    "SCORE_CACHE_SIZE",
    "SCORE_CACHE_TTL_S",
    "QUERY_CACHE_SIZE",
    "QUERY_CACHE_TTL_S",
    "METRICS_WINDOW",
    "POOL_MEMORY_BUDGET_MB",
    "POOL_IDLE_UNLOAD_S",
    "POOL_OVER_BUDGET",
    "HOST",
    "PORT",
    "RERANKERS",
    "EMBEDDERS",
    "SPECS",
    "MAX_LENGTH",
    "MAX_CONCURRENCY",
    "MAX_PENDING",
    "MAX_CLIENT_BATCH",
    "MAX_REQUEST_BYTES",
    "API_KEY",
    "WARMUP",
    "GRACEFUL_TIMEOUT",
    "RETRY_AFTER",
    "LOG_LEVEL",
]


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    """No RAG_RERANK_* setting from the caller's shell (the CPU dtype override stays)."""
    for name in list(os.environ):
        if name.startswith("RAG_RERANK_") and name != "RAG_RERANK_CPU_BF16":
            monkeypatch.delenv(name)
    get_settings.cache_clear()
    yield monkeypatch
    get_settings.cache_clear()


def _fields(sections: Any) -> list[tuple[type[Any], str, Any]]:
    """(section, field name, FieldInfo) for every field the given (section, only) pairs name."""
    out = []
    for section, only in sections:
        for name in only if only is not None else section.model_fields:
            out.append((section, name, section.model_fields[name]))
    return out


def _var(section: type[Any], name: str) -> str:
    return str(section.env_prefix) + name.upper()


def _serve_help(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> str:
    monkeypatch.setenv("COLUMNS", "2000")  # one line per option: no wrapping to undo
    with pytest.raises(SystemExit) as excinfo:
        cli.main(["serve", "--help"])
    assert excinfo.value.code == 0
    return capsys.readouterr().out


def _option_blocks(help_text: str) -> dict[str, str]:
    """First flag of each option -> its whole entry (invocation and help, spaces collapsed)."""
    blocks: dict[str, str] = {}
    current: list[str] = []
    for line in [*help_text.splitlines(), ""]:
        if re.match(r"^  -", line) or not line.strip() or not line.startswith("   "):
            if current:
                text = " ".join(" ".join(current).split())
                blocks[text.split()[0].rstrip(",")] = text
            current = [line] if re.match(r"^  -", line) else []
        elif current:
            current.append(line)
    blocks.pop("-h", None)
    return blocks


def _docs_rows() -> list[dict[str, str]]:
    text = DOCS.read_text()
    table = text.split("<!-- config-table:start")[1].split("<!-- config-table:end -->")[0]
    rows = []
    for line in table.splitlines()[1:]:
        if not line.startswith("| `"):
            continue
        cells = [cell.strip().strip("`") for cell in re.split(r"(?<!\\)\|", line)[1:-1]]
        columns = ("variable", "flag", "default", "used by", "description")
        rows.append(dict(zip(columns, cells, strict=True)))
    return rows


# -- the three views agree -----------------------------------------------------------------------


def test_serve_help_shows_every_setting_with_its_variable_and_default(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    blocks = _option_blocks(_serve_help(monkeypatch, capsys))
    expected_flags = set()
    for section, name, info in _fields(SERVE_SECTIONS):
        flag = flag_for(section, name)
        expected_flags.add(flag)
        assert flag in blocks, f"{section.__name__}.{name}: no {flag} in serve --help"
        block = blocks[flag]
        default = format_default(info.get_default(call_default_factory=True))
        assert f"env {_var(section, name)};" in block, block
        assert f"default: {default}]" in block, block
        assert " ".join(str(info.description).split()) in block, block
    assert set(blocks) == expected_flags  # no option that is not a setting


def test_docs_table_is_generated_from_the_models() -> None:
    table = DOCS.read_text().split("-->\n", 1)[1].split("<!-- config-table:end -->")[0]
    assert table == config_table(), (
        "docs/configuration.md is out of date: paste the output of "
        "`python -m rag_rerank_plugins.settings` between its config-table markers"
    )


def test_docs_table_has_one_row_per_variable_with_the_models_default() -> None:
    rows = {row["variable"]: row for row in _docs_rows()}
    expected: dict[str, str] = {}
    for section, name, info in _fields((section, None) for section in SECTIONS):
        default = format_default(info.get_default(call_default_factory=True))
        # A variable shared by two sections (RAG_RERANK_DEVICE) must have one default.
        assert expected.setdefault(_var(section, name), default) == default
    assert sorted(rows) == sorted(expected)  # every field has a row, and no extra rows
    for var, default in expected.items():
        assert rows[var]["default"] == default, var
    serve_flags = {
        _var(section, name): flag_for(section, name) for section, name, _ in _fields(SERVE_SECTIONS)
    }
    for var, row in rows.items():
        assert row["flag"].split(" / ")[0] == serve_flags.get(var, "-"), var


def test_shown_defaults_are_values_the_variable_accepts(clean_env: pytest.MonkeyPatch) -> None:
    for section, name, info in _fields((section, None) for section in SECTIONS):
        default = info.get_default(call_default_factory=True)
        shown = format_default(default)
        if shown == "empty":  # an empty list: leaving the variable unset is how to say it
            continue
        parsed = section.from_sources({_var(section, name): shown})
        assert getattr(parsed, name) == default, (section.__name__, name, shown)


def test_every_variable_name_in_use_still_sets_its_setting() -> None:
    documented = {row["variable"] for row in _docs_rows()}
    assert {f"RAG_RERANK_{name}" for name in NAMES_IN_USE} <= documented


def test_settings_nest_the_sections_under_one_prefix(clean_env: pytest.MonkeyPatch) -> None:
    for name, value in {
        "DEVICE": "cpu",
        "PORT": "9001",
        "MAX_QUEUE": "7",
        "POOL_IDLE_UNLOAD_S": "30",
        "RERANKERS": "a=/models/a, b=/models/b",
    }.items():
        clean_env.setenv(f"RAG_RERANK_{name}", value)
    settings = Settings()
    assert (settings.device, settings.server.device) == ("cpu", "cpu")  # one variable, both
    assert settings.server.port == 9001
    assert settings.server.rerankers == ["a=/models/a", "b=/models/b"]
    assert settings.engine == EngineConfig.from_env()
    assert settings.engine.max_queue == 7
    assert settings.pool == PoolConfig.from_env()
    assert settings.pool.idle_unload_s == 30
    assert settings.server == ServerConfig.from_env()


# -- precedence and errors ------------------------------------------------------------------------


@pytest.fixture
def served(clean_env: pytest.MonkeyPatch) -> dict[str, Any]:
    """What `rag-rerank serve` would start with: the server's run() is replaced by a recorder."""
    import rag_rerank_plugins.server.run as run

    seen: dict[str, Any] = {}

    def fake_serve(config: ServerConfig, *, pool: Any = None) -> int:
        seen.update(config=config, pool=pool)
        return 0

    clean_env.setattr(run, "serve", fake_serve)
    clean_env.setenv("RAG_RERANK_TORCH_THREADS", "")  # restored after the test
    return seen


def test_flags_win_over_variables_over_defaults(
    served: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    env = {"RAG_RERANK_PORT": "9001", "RAG_RERANK_MAX_QUEUE": "5", "RAG_RERANK_HOST": "0.0.0.0"}
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    argv = ["serve", "--spec", FAKE_SPEC, "--port", "9002", "--no-warmup", "--threads", "1"]
    argv += ["--token-budget", "512", "--pool-memory-budget-mb", "cpu=100", "--reranker", "x,y"]
    assert cli.main(argv) == 0
    config, pool = served["config"], served["pool"]
    assert (config.port, config.host, config.warmup) == (9002, "0.0.0.0", False)
    assert config.max_pending == 32
    assert config.rerankers == ["x", "y"]
    assert (pool.config.max_queue, pool.config.token_budget) == (5, 512)
    assert pool.pool_config.memory_budget_mb == {"cpu": 100.0}
    assert os.environ["RAG_RERANK_TORCH_THREADS"] == "1"


def test_api_key_comes_from_a_file_never_from_argv(
    served: dict[str, Any], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    key = tmp_path / "key"
    key.write_text("s3cret\n")
    assert cli.main(["serve", "--spec", FAKE_SPEC, "--api-key-file", str(key)]) == 0
    assert served["config"].api_key == "s3cret"
    assert "s3cret" not in repr(served["config"])
    key.write_text("")
    with pytest.raises(SystemExit) as excinfo:
        cli.main(["serve", "--spec", FAKE_SPEC, "--api-key-file", str(key)])
    assert excinfo.value.code == 2
    assert "is empty" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("argv", "status", "needle"),
    [
        (["--port", "http"], 2, "--port 'http'"),
        (["--pool-over-budget", "ignore"], 2, "invalid choice"),
        (["--max-concurrency", "0"], 1, "ServerConfig.max_concurrency must be at least 1"),
        (["--max-queue", "0"], 1, "(from --max-queue)"),
    ],
)
def test_bad_flags_name_the_flag(
    served: dict[str, Any],
    capsys: pytest.CaptureFixture[str],
    argv: list[str],
    status: int,
    needle: str,
) -> None:
    try:
        code = cli.main(["serve", "--spec", FAKE_SPEC, *argv])
    except SystemExit as exc:
        code = int(str(exc.code))
    assert code == status
    assert needle in capsys.readouterr().err
    assert served == {}


def test_bad_variables_name_the_variable(clean_env: pytest.MonkeyPatch) -> None:
    with pytest.raises(ConfigurationError, match=re.escape("(from RAG_RERANK_MAX_QUEUE='0')")):
        EngineConfig.from_env({"RAG_RERANK_MAX_QUEUE": "0"})
    with pytest.raises(ConfigurationError, match="RAG_RERANK_POOL_IDLE_UNLOAD_S"):
        PoolConfig.from_env({"RAG_RERANK_POOL_IDLE_UNLOAD_S": "soon"})
    clean_env.setenv("RAG_RERANK_PORT", "99999")
    with pytest.raises(ConfigurationError, match=r"port must be at most 65535.*RAG_RERANK_PORT"):
        Settings()
    with pytest.raises(
        ConfigurationError, match=re.escape("not a setting (did you mean 'max_queue'?)")
    ):
        EngineConfig(max_queues=3)  # a typo is an error, never silently dropped
    with pytest.raises(ConfigurationError, match="not a boolean"):
        EngineConfig(max_batch_size=True)


def test_with_changes_validates_like_the_constructor() -> None:
    config = EngineConfig(max_queue=3)
    assert config.with_changes(max_queue=4) == EngineConfig(max_queue=4)
    with pytest.raises(ConfigurationError, match="max_queue must be positive"):
        config.with_changes(max_queue=0)
    with pytest.raises(ValidationError, match="frozen"):  # never changed under a running pool
        config.max_queue = 5  # type: ignore[misc]
