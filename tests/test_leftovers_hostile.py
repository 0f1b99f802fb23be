"""Three leftovers a hostile or careless user hits: server settings that were accepted silently
(a log level uvicorn does not know, a model served under an empty name), credentials of a remote
URL recorded in stats, metrics and labels although the spec was refused, and a semantic cache
whose simultaneous puts of one question left a dead duplicate holding a ``max_entries`` slot.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import textwrap
import threading
from pathlib import Path
from typing import Any

import pytest

from rag_rerank_plugins import ModelPool, ModelSpec
from rag_rerank_plugins.exceptions import ConfigurationError
from rag_rerank_plugins.semantic_cache import SemanticCache
from rag_rerank_plugins.semantic_cache.stores import MemoryStore
from rag_rerank_plugins.testing import fake_embedder_spec

SRC = str(Path(__file__).resolve().parents[1] / "src")

# -- 3. semantic cache: one question, one entry ------------------------------------------------

FAKE = fake_embedder_spec(dim=256)


def _cache(store: Any, max_entries: int | None, pool: ModelPool | None = None) -> SemanticCache:
    return SemanticCache(
        FAKE, guard="dense", threshold=0.99, store=store, max_entries=max_entries,
        pool=pool or ModelPool(),
    )  # fmt: skip


@pytest.fixture(params=["memory", "sqlite"])
def store_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    return "memory" if request.param == "memory" else f"sqlite:///{tmp_path / 'race.db'}"


def _shared_store(store_url: str) -> Any:
    """What two caches share: one MemoryStore object, or one SQLite file (two connections)."""
    return MemoryStore() if store_url == "memory" else store_url


def test_a_question_put_by_two_caches_sharing_a_store_is_one_entry(store_url: str) -> None:
    """Two caches on one store (two processes on one SQLite file, or two caches on one
    MemoryStore): the second put of a question the first stored, before the second cache
    synced, left two entries; the dead one took a max_entries slot."""
    shared = _shared_store(store_url)
    first, second = _cache(shared, 3), _cache(shared, 3)
    assert first.put("what is the refund window?", "old")
    assert second.put("what is the refund window?", "new")  # has not seen the first's entry
    assert first.stats()["entries"] == 1
    for cache in (first, second):
        hit = cache.lookup("what is the refund window?")
        assert hit is not None
        assert hit.value == "new"
    # The slot the dead copy took: three distinct questions must all fit in max_entries=3.
    assert second.put("how do I reset my password?", 2)
    assert second.put("where is my parcel?", 3)
    assert second.stats()["entries"] == 3
    assert second.stats()["evictions"] == 0
    for question in ("what is the refund window?", "how do I reset my password?"):
        assert first.lookup(question) is not None, question


class SlowPutStore(MemoryStore):
    """A store whose puts take a moment (a busy disk): wide windows for racing puts."""

    def put(self, entry: Any, **kwargs: Any) -> Any:
        threading.Event().wait(0.002)
        return super().put(entry, **kwargs)


@pytest.mark.parametrize("kind", ["memory", "sqlite"])
def test_threads_racing_puts_never_leave_a_dead_duplicate(kind: str, tmp_path: Path) -> None:
    """Eight threads put the same questions at once (and some distinct ones), against
    max_entries: one entry per question, len and stats agree, every question answers."""
    max_entries = 12
    store = SlowPutStore() if kind == "memory" else f"sqlite:///{tmp_path / 'threads.db'}"
    cache = _cache(store, max_entries)
    same = [f"shared question {i}" for i in range(4)]
    start = threading.Barrier(8)
    problems: list[BaseException] = []

    def worker(n: int) -> None:
        try:
            start.wait(timeout=30)
            for round_ in range(6):
                for question in same:
                    assert cache.put(question, {"by": n, "round": round_})
            assert cache.put(f"own question of thread {n}", n)
        except BaseException as exc:  # pragma: no cover - reported below
            problems.append(exc)

    threads = [threading.Thread(target=worker, args=(n,)) for n in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not problems
    # 4 shared + 8 own = 12 distinct questions = max_entries: all of them fit, nothing evicted.
    stats = cache.stats()
    assert stats["errors"] == 0
    assert stats["entries"] == max_entries
    assert stats["evictions"] == 0
    _, entries, _ = cache.store.changes(None)
    assert sorted(e.query for e in entries) == sorted(
        [*same, *(f"own question of thread {n}" for n in range(8))]
    )
    for question in same:
        hit = cache.lookup(question)
        assert hit is not None, question
        assert hit.value["round"] == 5, question  # an answer of the last round
    for n in range(8):
        hit = cache.lookup(f"own question of thread {n}")
        assert hit is not None
        assert hit.value == n


CHILD = textwrap.dedent(
    """
    import sys
    from rag_rerank_plugins.semantic_cache import SemanticCache
    from rag_rerank_plugins.testing import fake_embedder_spec
    cache = SemanticCache(fake_embedder_spec(dim=256), guard="dense", threshold=0.99,
                          store="sqlite:///" + sys.argv[1], max_entries=20)
    tag = sys.argv[2]
    failed = sum(not cache.put(f"question {i}", {"tag": tag, "i": i}) for i in range(20))
    print(failed, cache.stats()["errors"], flush=True)
    """
)


def test_two_processes_putting_the_same_questions_leave_one_entry_each(tmp_path: Path) -> None:
    """Two processes put the same 20 questions into one SQLite file with max_entries=20: each
    process knew only its own entries, so the file held both copies and evicted half of the
    questions."""
    path = tmp_path / "procs.db"
    env = {**os.environ, "PYTHONPATH": SRC}
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", CHILD, str(path), tag],
            stdout=subprocess.PIPE,
            text=True,
            env=env,
        )
        for tag in "AB"
    ]
    for proc in procs:
        out, _ = proc.communicate(timeout=180)
        assert proc.returncode == 0
        assert out.split() == ["0", "0"]
    mine = _cache(f"sqlite:///{path}", 20)
    assert mine.stats()["entries"] == 20
    for i in range(20):
        hit = mine.lookup(f"question {i}")
        assert hit is not None, i
        assert hit.value["i"] == i
        assert hit.value["tag"] in "AB"


# -- 2. remote URLs with credentials: refused, and recorded nowhere -----------------------------

PASSWORD = "s3cretPW"


def _exception_texts(exc: BaseException) -> list[str]:
    """str, repr and args of ``exc`` and of every exception in its cause/context chain, and the
    formatted traceback: everything a logger or an error tracker shows."""
    import traceback

    texts = ["".join(traceback.format_exception(exc))]
    seen: BaseException | None = exc
    while seen is not None:
        texts += [str(seen), repr(seen), repr(seen.args)]
        seen = seen.__cause__ or seen.__context__
    return texts


@pytest.mark.parametrize(
    ("backend", "model", "options"),
    [
        ("remote-reranker", f"http://alice:{PASSWORD}@127.0.0.1:1", {}),
        ("remote-reranker", f"https://:{PASSWORD}@api.example.com/v1", {}),
        ("remote-reranker", f"https://{PASSWORD}@api.example.com", {}),  # a token as the user
        ("remote-embedder", "my-model", {"url": f"http://bob:{PASSWORD}@h:9/x", "protocol": "tei"}),
        ("remote-reranker", f"http://alice:pa/ss#{PASSWORD}@127.0.0.1:1", {}),  # odd characters
        ("remote-embedder", "http://127.0.0.1:1/?api_key=" + PASSWORD, {}),
    ],
)
def test_a_refused_remote_spec_leaves_its_credentials_nowhere(
    backend: str, model: str, options: dict[str, Any], caplog: pytest.LogCaptureFixture
) -> None:
    """The spec was refused (good), but its label, with the password, was already the key of
    pool.stats(), spec_stats, the metrics' ``spec`` and ``model`` labels, and the spec's repr."""
    pytest.importorskip("httpx")
    from prometheus_client import CollectorRegistry, generate_latest

    from rag_rerank_plugins.metrics import PoolCollector

    caplog.set_level(logging.DEBUG)
    pool = ModelPool()
    given = {"retries": 0, "connect_timeout": 0.2, **options}
    spec = ModelSpec(
        model, backend=backend, device="cpu", dtype="float32", options=tuple(given.items())
    )
    shown: list[str] = []
    calls = [lambda: pool.get(spec), lambda: pool.preload(spec)]
    if backend == "remote-reranker":
        calls.append(lambda: pool.score_pairs(spec, [("q", "a")]))
    else:
        calls.append(lambda: pool.embed(spec, ["a"], is_query=True))
    for call in calls:
        with pytest.raises(ConfigurationError) as info:
            call()
        shown += _exception_texts(info.value)
    registry = CollectorRegistry()
    registry.register(PoolCollector(pool))
    shown += [
        repr(pool.stats()),
        repr(pool.spec_stats(spec)),
        generate_latest(registry).decode(),
        caplog.text,
        *(repr(r.args) + r.getMessage() for r in caplog.records),
        repr(spec),
        str(spec),
        spec.label,
    ]
    assert pool.stats(), "the failed loads are counted (under a label without the secret)"
    assert next(iter(pool.stats().values()))["load_failures"] == len(calls)
    leaks = [text for text in shown if PASSWORD in text]
    assert not leaks
    pool.clear()


def test_labels_of_urls_without_credentials_are_unchanged() -> None:
    """The redaction hides secrets only: a plain URL, path or hub name shows as before."""
    for model in ("http://127.0.0.1:8080", "https://api.example.com/v1/", "BAAI/bge-m3", "/m@2"):
        spec = ModelSpec(model, backend="remote-reranker", device="cpu", dtype="float32")
        assert spec.label == f"remote-reranker:{model}@cpu/float32"
        assert repr(model) in repr(spec)
    spec = ModelSpec("m", backend="remote-embedder", options=(("url", "http://h:1/p"),))
    assert "url=http://h:1/p" in spec.label


# -- 1. server settings: log level and served model entries -------------------------------------

SERVE = {"RAG_RERANK_RERANKERS": "r=m", "RAG_RERANK_RERANKER_BACKEND": "fake-reranker"}


def _server_config(**variables: str) -> Any:
    from rag_rerank_plugins.server.config import ServerConfig

    return ServerConfig.from_env({**SERVE, **variables})


@pytest.mark.parametrize("level", ["verbose", "5", "notice", "information", "none", "infos"])
def test_an_unknown_log_level_is_refused_naming_the_valid_ones(level: str) -> None:
    """'verbose' was accepted, then crashed uvicorn's start (KeyError) or the CLI's setLevel."""
    with pytest.raises(ConfigurationError) as info:
        _server_config(RAG_RERANK_LOG_LEVEL=level)
    message = str(info.value)
    assert "RAG_RERANK_LOG_LEVEL" in message
    assert "critical, error, warning, info, debug, trace" in message


@pytest.mark.parametrize(
    ("given", "level"),
    [("info", "info"), ("INFO", "info"), ("Debug", "debug"), (" warning ", "warning"),
     ("WARN", "warning"), ("error", "error"), ("CRITICAL", "critical"), ("fatal", "critical"),
     ("TRACE", "trace")],
)  # fmt: skip
def test_uvicorn_and_stdlib_log_levels_are_accepted_in_any_case(given: str, level: str) -> None:
    assert _server_config(RAG_RERANK_LOG_LEVEL=given).log_level == level


@pytest.mark.parametrize(
    ("level", "access_log"), [("DEBUG", True), ("trace", True), ("INFO", False)]
)
def test_debug_in_upper_case_turns_the_access_log_on(
    level: str, access_log: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """uvicorn reads 'DEBUG' as debug, but the access log was on only for 'debug' exactly."""
    uvicorn = pytest.importorskip("uvicorn")
    pytest.importorskip("fastapi")
    from rag_rerank_plugins.server.run import serve

    seen: dict[str, Any] = {}

    class Stop(Exception):
        pass

    def config(app: Any, **kwargs: Any) -> Any:
        seen.update(kwargs)
        raise Stop

    monkeypatch.setattr(uvicorn, "Config", config)
    with pytest.raises(Stop):
        serve(_server_config(RAG_RERANK_LOG_LEVEL=level), pool=ModelPool())
    assert seen["access_log"] is access_log
    assert seen["log_level"] == level.lower()


@pytest.fixture
def served(monkeypatch: pytest.MonkeyPatch) -> dict[str, Any]:
    """`rag-rerank serve` up to the start: run.serve records its config instead of serving."""
    import rag_rerank_plugins.server.run as run

    for name in list(os.environ):
        if name.startswith("RAG_RERANK_") and name != "RAG_RERANK_CPU_BF16":
            monkeypatch.delenv(name)
    monkeypatch.setenv("RAG_RERANK_TORCH_THREADS", "")
    seen: dict[str, Any] = {}
    monkeypatch.setattr(run, "serve", lambda config, pool=None: seen.update(config=config) or 0)
    return seen


def test_the_cli_starts_with_uvicorns_trace_level(
    served: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    """`rag-rerank serve --log-level trace` (a uvicorn level) died in logging's setLevel
    ('Unknown level: TRACE') before the server started, when no logging was configured."""
    from rag_rerank_plugins import cli

    package = logging.getLogger("rag_rerank_plugins")
    monkeypatch.setattr(logging.getLogger(), "handlers", [])  # as in a bare `rag-rerank serve`
    monkeypatch.setattr(package, "handlers", [])
    monkeypatch.setattr(package, "level", package.level)
    argv = ["serve", "--reranker", "r=m", "--reranker-backend", "fake-reranker", "--no-warmup"]
    assert cli.main([*argv, "--log-level", "TRACE"]) == 0
    assert served["config"].log_level == "trace"
    assert package.level == 5


def test_the_cli_refuses_an_unknown_log_level(
    served: dict[str, Any], capsys: pytest.CaptureFixture[str]
) -> None:
    from rag_rerank_plugins import cli

    argv = ["serve", "--reranker", "r=m", "--reranker-backend", "fake-reranker"]
    assert cli.main([*argv, "--log-level", "verbose"]) == 1
    assert "must be one of critical, error, warning, info, debug, trace" in capsys.readouterr().err
    assert served == {}


@pytest.mark.parametrize(
    ("value", "needle"),
    [
        ("=b", "'=b' has an empty name"),
        (" = b", "'= b' has an empty name"),
        ("a=", "'a=' has no model"),
        ("=", "empty entry '='"),
        ("a==b", "'a==b' has a stray '='"),
        ("a=x,=y", "'=y' has an empty name"),
        ("a,,b", "empty entry (#2 of 3)"),
        ("a, ,b", "empty entry (#2 of 3)"),
        (",a", "empty entry (#1 of 2)"),
        ("a,b,", "empty entry (#3 of 3)"),
        ("a=x,a=y", "Two served models are named 'a' ('x' and 'y')"),
        ("m,m", "Two served models are named 'm'"),
    ],
)
def test_malformed_model_entries_are_refused_naming_the_entry(value: str, needle: str) -> None:
    """'=b' served the model b under the name '' (no client can ask for it); 'a==b' loaded the
    model '=b'; 'a,,b' dropped an entry without a word."""
    as_embedders = {"RAG_RERANK_EMBEDDERS": value, "RAG_RERANK_EMBEDDER_BACKEND": "fake-embedder"}
    for variables in ({"RAG_RERANK_RERANKERS": value}, as_embedders):
        with pytest.raises(ConfigurationError) as info:
            _server_config(**variables)
        assert needle in str(info.value), (variables, str(info.value))


@pytest.mark.parametrize("entry", ["=b", "a=", "", "a==b"])
def test_malformed_entries_are_refused_as_flags_and_as_arguments(
    served: dict[str, Any], capsys: pytest.CaptureFixture[str], entry: str
) -> None:
    from rag_rerank_plugins import cli
    from rag_rerank_plugins.server.config import ServerConfig

    argv = ["serve", "--reranker-backend", "fake-reranker", "--reranker", entry]
    try:
        code = cli.main(argv)
    except SystemExit as exc:  # argparse: a usage error
        code = int(str(exc.code))
    assert code in (1, 2)
    assert repr(entry) in capsys.readouterr().err
    assert served == {}
    with pytest.raises(ConfigurationError, match=r"NAME=\]?MODEL"):
        ServerConfig(rerankers=[entry], reranker_backend="fake-reranker")


@pytest.mark.parametrize(
    ("value", "served_as"),
    [
        ("a=/models/a,b=/models/b", [("a", "/models/a"), ("b", "/models/b")]),
        ("a=/models/a, b=/models/b", [("a", "/models/a"), ("b", "/models/b")]),
        ("bge=BAAI/bge-reranker-v2-m3", [("bge", "BAAI/bge-reranker-v2-m3")]),
        ("BAAI/bge-reranker-v2-m3", [("BAAI/bge-reranker-v2-m3", "BAAI/bge-reranker-v2-m3")]),
        ("a=/m/a\nb=/m/b\n", [("a", "/m/a"), ("b", "/m/b")]),  # one per line (a YAML block)
        ("a=/m/a,\nb=/m/b", [("a", "/m/a"), ("b", "/m/b")]),
        (" r = m ", [("r", "m")]),
        ("x=/data/run=3", [("x", "/data/run=3")]),  # a named path may hold '='
    ],
)
def test_every_documented_form_still_works(value: str, served_as: list[tuple[str, str]]) -> None:
    config = _server_config(RAG_RERANK_RERANKERS=value)
    assert [(m.name, m.spec.model) for m in config.served_models()] == served_as


@pytest.mark.parametrize("name", ["", "  ", None, 3])
def test_a_spec_with_an_empty_or_non_text_name_is_refused(name: Any) -> None:
    import json

    spec = {"name": name, "model": "m", "backend": "fake-reranker"}
    with pytest.raises(ConfigurationError, match="non-empty string name"):
        _server_config(RAG_RERANK_RERANKERS="", RAG_RERANK_SPECS=json.dumps([spec]))


REMOTE = {"RAG_RERANK_RERANKER_BACKEND": "remote-reranker"}


@pytest.mark.parametrize(
    "variables",
    [
        {"RAG_RERANK_RERANKERS": f"http://alice:{PASSWORD}@h:1", **REMOTE},
        {"RAG_RERANK_RERANKERS": f"r=http://alice:{PASSWORD}@h:1", **REMOTE},
        {
            "RAG_RERANK_SPECS": '[{"name": "r", "model": "m", "backend": "remote-reranker", '
            f'"options": {{"url": "http://:{PASSWORD}@h:1"}}}}]'
        },
    ],
)
def test_a_served_url_with_credentials_is_refused_before_the_server_shows_it(
    variables: dict[str, str],
) -> None:
    """Unnamed, the URL was also the served name: printed at start-up ('serving http://alice:
    ...') and in /info, before the remote backend refused it at load time."""
    from rag_rerank_plugins.server.config import ServerConfig

    with pytest.raises(ConfigurationError, match="api_key_env") as info:
        ServerConfig.from_env(variables)
    assert not [text for text in _exception_texts(info.value) if PASSWORD in text]


@pytest.mark.parametrize(
    "variables",
    [
        {"RAG_RERANK_RERANKERS": f"r=http://alice:{PASSWORD}@h:1,,x", **REMOTE},
        {"RAG_RERANK_RERANKERS": f"=http://alice:{PASSWORD}@h:1", **REMOTE},
        {"RAG_RERANK_SPECS": f'[{{"name": "", "model": "http://alice:{PASSWORD}@h:1"}}]'},
        {"RAG_RERANK_SPECS": f'[{{"model": "http://a:{PASSWORD}@h:1", "bogus": 3}}]'},
    ],
)
def test_a_settings_error_never_echoes_a_urls_password(variables: dict[str, str]) -> None:
    """Settings errors quote the variable to say what was wrong: with a URL's password in it
    (a stray comma next to it, an empty name), the password went to stderr and the logs."""
    from rag_rerank_plugins.server.config import ServerConfig

    with pytest.raises(ConfigurationError) as info:
        ServerConfig.from_env(variables)
    assert not [text for text in _exception_texts(info.value) if PASSWORD in text]
    assert "***@h:1" in str(info.value)  # the value is still shown, to say which one
