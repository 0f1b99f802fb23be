"""The docs name what exists, and say what really happens.

Cheap checks that catch drift between README.md / docs/ and the code: every ``RAG_RERANK_*``
variable, ``rag-rerank`` flag, exception class and extra the docs name exists; the error types
and messages they quote are the ones raised; the metric table is the collector's; the README's
relative links resolve (``mkdocs build --strict`` checks docs/ only); and the README's quick
starts run offline with local models and give what they say. Model-free except the quick start.
"""

from __future__ import annotations

import argparse
import ast
import builtins
import re
import sys
import textwrap
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError

from rag_rerank_plugins import ConfigurationError, EngineConfig, InvalidInputError

if sys.version_info >= (3, 11):
    import tomllib
else:  # Python 3.10
    import tomli as tomllib  # type: ignore[import-not-found,unused-ignore]

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]


def _text(page: Path) -> str:
    return page.read_text(encoding="utf-8")


def _where(page: Path) -> str:
    return str(page.relative_to(ROOT))


def _code(page: Path) -> list[str]:
    """Fenced blocks and inline code spans of a page, in order."""
    text = _text(page)
    fenced = re.findall(r"^[ \t]*```[^\n]*\n(.*?)^[ \t]*```", text, flags=re.M | re.S)
    prose = re.sub(r"^[ \t]*```[^\n]*\n.*?^[ \t]*```", "", text, flags=re.M | re.S)
    return fenced + re.findall(r"`([^`\n]+)`", prose)


# -- environment variables ------------------------------------------------------------------------

#: Names the docs use as examples of a variable the user chooses (``api_key_env=...``).
EXAMPLE_VARIABLES = {"RAG_RERANK_TOKEN"}


def _variables_read() -> set[str]:
    """Every RAG_RERANK_* variable something reads: the settings models' table, plus the names
    spelt out in code (quoted in Python, expanded in shell scripts)."""
    from rag_rerank_plugins.settings import config_rows

    names = {row["variable"] for row in config_rows()}
    for path in [*(ROOT / "src").rglob("*.py"), *(ROOT / "tests").glob("*.py")]:
        if path.name == Path(__file__).name:
            continue
        names |= set(re.findall(r"[\"'](RAG_RERANK_[A-Z0-9_]+)[\"']", path.read_text()))
    for path in (ROOT / "scripts").iterdir():
        if path.is_file():
            names |= set(re.findall(r"\$\{?(RAG_RERANK_[A-Z0-9_]+)", path.read_text()))
    return names


def test_every_variable_the_docs_name_is_read_somewhere() -> None:
    known = _variables_read() | EXAMPLE_VARIABLES
    unknown = {
        (_where(page), name)
        for page in PAGES
        for name in re.findall(r"\bRAG_RERANK_[A-Z0-9_]*[A-Z0-9]\b(?!_?<)", _text(page))
        if name not in known
    }
    assert not unknown, f"documented variables nothing reads: {sorted(unknown)}"


# -- rag-rerank flags -----------------------------------------------------------------------------

#: Flags of other programs that the docs quote on their own (`--flag`), by program.
OTHER_PROGRAMS_FLAGS = {
    "--auto-truncate": "text-embeddings-inference",
    "--gpu-memory-utilization": "vLLM",
    "--gap": "benchmarks/peers.py",
    "--group": "pip",
    "--preload": "gunicorn",
    "--shape": "benchmarks/peers.py",
    "--systems": "benchmarks/peers.py",
}


def _cli_flags() -> set[str]:
    from rag_rerank_plugins.cli import build_parser

    flags: set[str] = set()
    todo = [build_parser()]
    while todo:
        parser = todo.pop()
        for action in parser._actions:
            flags.update(action.option_strings)
            if isinstance(action, argparse._SubParsersAction):
                todo.extend(action.choices.values())
    return flags


def _documented_flags(page: Path) -> set[str]:
    """Flags in ``rag-rerank ...`` command lines (with their continuation lines) and in code
    spans that are a flag alone (``--max-queue``, ``--warmup / --no-warmup``)."""
    flags: set[str] = set()
    for code in _code(page):
        joined = code.replace("\\\n", " ")
        for line in joined.splitlines():
            for command in re.findall(r"\brag-rerank\s+(?:serve|demo|info)\b[^|;&#]*", line):
                flags |= set(re.findall(r"(?<![\w-])--[a-z][a-z0-9-]*", command))
        if code.startswith("--") and "\n" not in code:
            flags |= set(re.findall(r"(?<![\w-])--[a-z][a-z0-9-]*", code))
    return flags


def test_every_rag_rerank_flag_the_docs_name_exists() -> None:
    known = _cli_flags() | set(OTHER_PROGRAMS_FLAGS)

    def exists(flag: str) -> bool:  # "--pool-..." names a family of flags
        return flag in known or (flag.endswith("-") and any(k.startswith(flag) for k in known))

    unknown = {(_where(p), f) for p in PAGES for f in _documented_flags(p) if not exists(f)}
    assert not unknown, f"documented flags rag-rerank does not have: {sorted(unknown)}"


def test_the_flag_extractor_sees_commands_and_lone_flags(tmp_path: Path) -> None:
    page = tmp_path / "p.md"
    page.write_text(
        "```bash\nrag-rerank serve --reranker a=b \\\n    --no-such-flag 3  # --comment\n```\n"
        "Use `--max-queue` or `pip install --upgrade x` (not ours).\n"
    )
    assert _documented_flags(page) == {"--reranker", "--no-such-flag", "--max-queue"}


# -- exception names and quoted messages ----------------------------------------------------------

#: Exception classes of other libraries that the docs name, and where they come from.
OTHER_EXCEPTIONS = {
    "ValidationError": "pydantic",
    "BadRequestError": "openai",
    "UnprocessableEntityError": "openai",
}


def _classes_defined_in_src() -> set[str]:
    names: set[str] = set()
    for path in (ROOT / "src").rglob("*.py"):
        tree = ast.parse(path.read_text())
        names |= {node.name for node in ast.walk(tree) if isinstance(node, ast.ClassDef)}
    return names


def test_every_exception_the_docs_name_exists() -> None:
    known = _classes_defined_in_src() | set(dir(builtins)) | set(OTHER_EXCEPTIONS)
    unknown = {
        (_where(page), name)
        for page in PAGES
        for name in re.findall(r"\b[A-Z]\w*(?:Error|Exception)\b", _text(page))
        if name not in known
    }
    assert not unknown, f"documented exceptions that do not exist: {sorted(unknown)}"


def _adapter(**kwargs: Any) -> Callable[[], object]:
    def build() -> object:
        from rag_rerank_plugins.langchain import SharedRerankCompressor

        return SharedRerankCompressor(model="m", **kwargs)

    return build


def _postprocessor(**kwargs: Any) -> Callable[[], object]:
    def build() -> object:
        from rag_rerank_plugins.llama_index import SharedRerankPostprocessor

        return SharedRerankPostprocessor(model="m", **kwargs)

    return build


def _embeddings(**kwargs: Any) -> Callable[[], object]:
    def build() -> object:
        from rag_rerank_plugins.langchain import SharedEmbeddings

        return SharedEmbeddings(**kwargs)

    return build


def _engine_config_from(variable: str, value: str) -> Callable[[], object]:
    def build() -> object:
        with pytest.MonkeyPatch.context() as patch:
            patch.setenv(variable, value)
            return EngineConfig.from_env()

    return build


#: (page, the sentence as the page words it, what the sentence is about, the exception it names,
#: a piece of the message the page quotes or None). The page must still say it, and the code do it.
CLAIMS: list[tuple[str, str, Callable[[], object], type[BaseException], str | None]] = [
    (
        "docs/migration.md",
        "`top_n=0` or negative is a pydantic `ValidationError` at construction",
        _adapter(top_n=0),
        ValidationError,
        None,
    ),
    (
        "docs/migration.md",
        "0 or negative is a pydantic `ValidationError` at construction",
        _postprocessor(top_n=-1),
        ValidationError,
        None,
    ),
    (
        "docs/bad-input.md",
        'fails at construction: `ValidationError` "top_n must be >= 1 (or None',
        _adapter(top_n=0),
        ValidationError,
        "top_n must be >= 1 (or None",
    ),
    (
        "docs/bad-input.md",
        "top_n must be a positive int or None, got '3' (str); pass top_n=3",
        _adapter(top_n="3"),
        ValidationError,
        "top_n must be a positive int or None, got '3' (str); pass top_n=3",
    ),
    (
        "README.md",
        "an option the backend does not read fails\nthere with a pydantic `ValidationError`",
        _adapter(model_kwargs={"no_such_option": 1}),
        ValidationError,
        "does not accept option(s) 'no_such_option'",
    ),
    (
        "docs/guides/langchain.md",
        "fails right there with a pydantic\n`ValidationError`",
        _adapter(model_kwargs={"no_such_option": 1}),
        ValidationError,
        "Accepted:",
    ),
    (
        "docs/guides/langchain.md",
        "| `multi_process=True` (or `encode_kwargs` `device=[...]`/`pool`) | `ValidationError`",
        _embeddings(multi_process=True),
        ValidationError,
        "rag-rerank serve",
    ),
    (
        "docs/guides/langchain.md",
        "unknown keys raise a `ValidationError`",
        _embeddings(encode_kwargs={"no_such_key": 1}),
        ValidationError,
        "no_such_key",
    ),
    (
        "docs/guides/llama_index.md",
        "# ValidationError: SharedRerankPostprocessor got unknown argument(s) 'topn' (did you mean",
        _postprocessor(topn=5),
        ValidationError,
        "SharedRerankPostprocessor got unknown argument(s) 'topn' (did you mean 'top_n'?)",
    ),
    (
        "docs/configuration.md",
        "`EngineConfig.max_queue must be positive (from RAG_RERANK_MAX_QUEUE='0').`",
        _engine_config_from("RAG_RERANK_MAX_QUEUE", "0"),
        ConfigurationError,
        "EngineConfig.max_queue must be positive (from RAG_RERANK_MAX_QUEUE='0').",
    ),
]


@pytest.mark.parametrize(("page", "sentence", "call", "error", "message"), CLAIMS)
def test_documented_error_is_the_one_raised(
    page: str,
    sentence: str,
    call: Callable[[], object],
    error: type[BaseException],
    message: str | None,
) -> None:
    assert sentence in _text(ROOT / page), f"{page} no longer says: {sentence!r}"
    with pytest.raises(error) as caught:
        call()
    if message is not None:
        assert message in str(caught.value)


def test_adapter_construction_errors_are_not_configuration_errors() -> None:
    """Why the docs say ValidationError for adapters: pydantic wraps our ConfigurationError,
    which stays reachable in the error's context (docs/troubleshooting.md says how)."""
    with pytest.raises(ValidationError) as caught:
        _adapter(model_kwargs={"no_such_option": 1})()
    assert not isinstance(caught.value, ConfigurationError)
    assert isinstance(caught.value.errors()[0]["ctx"]["error"], ConfigurationError)
    assert '`exc.errors()[0]["ctx"]["error"]` is ours' in _text(ROOT / "docs/troubleshooting.md")


# -- extras ---------------------------------------------------------------------------------------


def _extras() -> dict[str, list[str]]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    extras: dict[str, list[str]] = project["optional-dependencies"]
    return extras


def _self_extras(extra: str) -> set[str]:
    """The extras ``extra`` names through ``rag-rerank-plugins[...]`` (one level, as pip reads)."""
    found: set[str] = set()
    for line in _extras()[extra]:
        match = re.match(r"rag-rerank-plugins\[([^\]]+)\]", line)
        if match:
            found |= {name.strip() for name in match.group(1).split(",")}
    return found


def _extras_table(page: str) -> dict[str, str]:
    """``| `extra` | brings | for |`` rows of a page: extra -> its "brings" cell."""
    rows = re.findall(r"^\| `([\w-]+)` \| ([^|]+) \|", _text(ROOT / page), flags=re.M)
    table = dict(rows)
    assert "all" in table, f"{page} has no extras table"
    return {name: cell for name, cell in table.items() if name in _extras()}


@pytest.mark.parametrize("page", ["README.md", "docs/index.md"])
def test_extras_tables_list_every_extra_and_what_all_brings(page: str) -> None:
    table = _extras_table(page)
    # notebooks is [all] + a kernel: the README gives it its own section.
    missing = set(_extras()) - set(table) - {"notebooks"}
    assert not missing, f"{page}'s extras table lacks {sorted(missing)}"
    in_all = _self_extras("all")
    cell = table["all"]
    if "all of the above but `bench`" in cell:  # docs/index.md
        listed = set(table) - {"all", "bench", "notebooks"}
    else:
        listed = {name.strip() for name in cell.split("+")}
    assert listed == in_all, f"{page}: `all` is {sorted(in_all)}, the table says {sorted(listed)}"


# -- metrics --------------------------------------------------------------------------------------


def _documented_metrics() -> set[str]:
    """``rag_rerank_model_*`` names of the observability table; ``_x`` continues the previous
    full name's family (``_load_failures_total`` after ``rag_rerank_model_loads_total``)."""
    names: set[str] = set()
    page = ROOT / "docs/guides/observability.md"
    for line in _text(page).splitlines():
        if not line.startswith("| `rag_rerank_model_"):
            continue
        full = ""
        for token in re.findall(r"`([^`]+)`", line.split("|")[1]):
            if token.startswith("rag_rerank_model_"):
                full = token
                names.add(token)
            elif re.fullmatch(r"_p\d+", token):
                names.add(re.sub(r"_p\d+$", token, full))
            else:
                names.add("rag_rerank_model" + token)
    return names


def test_observability_table_is_the_collectors_metrics() -> None:
    from rag_rerank_plugins.metrics import MODEL_HISTOGRAMS, MODEL_METRICS

    real = {metric.name for metric in MODEL_METRICS} | {v[0] for v in MODEL_HISTOGRAMS.values()}
    documented = _documented_metrics()
    assert documented == real, (sorted(documented - real), sorted(real - documented))


# -- README links ---------------------------------------------------------------------------------


def _anchors(page: Path) -> set[str]:
    """GitHub/mkdocs heading ids: lower case, punctuation dropped, spaces as dashes."""
    headings = re.findall(r"^#+\s+(.+?)\s*$", _text(page), flags=re.M)
    return {re.sub(r"[^\w\- ]", "", h.replace("`", "").lower()).replace(" ", "-") for h in headings}


def test_readme_links_resolve() -> None:
    readme = ROOT / "README.md"
    broken = []
    for target in re.findall(r"\]\(([^)\s]+)\)", _text(readme)):
        if re.match(r"[a-z]+://", target):
            continue
        path, _, anchor = target.partition("#")
        file = (readme.parent / path) if path else readme
        if not file.exists() or (anchor and file.suffix == ".md" and anchor not in _anchors(file)):
            broken.append(target)
    assert not broken, f"README links that lead nowhere: {broken}"


def test_readme_test_command_is_what_ci_runs() -> None:
    assert "bash scripts/test" in _text(ROOT / "README.md")
    assert re.search(r"^exec bash scripts/test\b", (ROOT / ".ci/run").read_text(), flags=re.M)


# -- the README's snippets run ---------------------------------------------------------------------


def _readme_block(starting: str) -> str:
    blocks = re.findall(r"^```python\n(.*?)^```", _text(ROOT / "README.md"), flags=re.M | re.S)
    matches = [textwrap.dedent(b) for b in blocks if b.startswith(starting)]
    assert len(matches) == 1, f"README has {len(matches)} python blocks starting {starting!r}"
    return matches[0]


def _offline(code: str, reranker: str) -> str:
    return code.replace('"BAAI/bge-reranker-v2-m3"', repr(reranker))


TEXTS = [
    "Heat pumps move heat from the outside air into the house.",
    "Bananas are yellow when ripe.",
    "A compressor raises the refrigerant's pressure and temperature.",
    "The heat pump's evaporator absorbs heat even in cold weather.",
    "Paris is the capital of France.",
]


def test_readme_langchain_quick_start_runs_offline(real_ce_path: str, minilm_path: str) -> None:
    from rag_rerank_plugins import get_pool

    code = _readme_block("from langchain_classic.retrievers import ContextualCompressionRetriever")
    namespace: dict[str, Any] = {"texts": TEXTS}
    try:
        exec(compile(_offline(code, real_ce_path), "README.md", "exec"), namespace)
        docs = namespace["docs"]
        assert len(docs) == 3  # top_n=3
        scores = [d.metadata["relevance_score"] for d in docs]
        assert all(isinstance(s, float) for s in scores)
        assert scores == sorted(scores, reverse=True)
        assert {d.page_content for d in docs} <= set(TEXTS)
        # The first snippet: a compressor built per request over any retriever.
        first = _readme_block("from rag_rerank_plugins.langchain import SharedRerankCompressor\n")
        exec(compile(_offline(first, real_ce_path), "README.md", "exec"), namespace)
        spec = namespace["retriever"].base_compressor.spec
        loads = get_pool().spec_stats(spec)["loads"]
        retriever = namespace["store"].as_retriever(search_kwargs={"k": 4})
        again = namespace["handle_request"]("How do heat pumps work?", retriever)
        assert len(again) == 4  # top_n=5 keeps all 4 retrieved
        assert get_pool().spec_stats(spec)["loads"] == loads  # built per request, loads nothing
    finally:
        get_pool().clear()


def test_readme_testing_block_runs_without_models() -> None:
    from langchain_core.documents import Document

    namespace: dict[str, Any] = {}
    exec(
        compile(_readme_block("from rag_rerank_plugins import ModelPool\n"), "README", "exec"),
        namespace,
    )
    comp = namespace["comp"]
    out = comp.compress_documents(
        [Document(page_content="red car"), Document(page_content="x")], "red"
    )
    assert [d.page_content for d in out] == ["red car", "x"]
    assert namespace["pool"].stats()  # the isolated pool did the work
    with pytest.raises(InvalidInputError):
        comp.compress_documents([Document(page_content="a")], None)


def test_extending_guide_example_prints_what_it_says(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """docs/guides/extending.md: the backend module, then its use, printing ``# [0.5, 0.0]``."""
    from rag_rerank_plugins import backends

    page = _text(ROOT / "docs/guides/extending.md")
    blocks = re.findall(r"^```python\n(.*?)^```", page, flags=re.M | re.S)
    module = next(b for b in blocks if b.startswith("# overlap_backend.py"))
    usage = next(b for b in blocks if b.startswith("import overlap_backend"))
    (tmp_path / "overlap_backend.py").write_text(module)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(backends, "_REGISTRY", dict(backends._REGISTRY))
    monkeypatch.delitem(sys.modules, "overlap_backend", raising=False)
    exec(compile(usage, "extending.md", "exec"), {})
    claimed = re.search(r"^# (\[.*\])$", usage, flags=re.M)
    assert claimed is not None
    assert capsys.readouterr().out.strip() == claimed.group(1)


# -- the source maps ------------------------------------------------------------------------------


def _fenced_without_language(page: str) -> list[str]:
    """Fenced blocks with no language: the source maps (the fences are paired in order)."""
    blocks = re.findall(r"^[ \t]*```(\w*)\n(.*?)^[ \t]*```", _text(ROOT / page), flags=re.M | re.S)
    return [body for language, body in blocks if not language]


@pytest.mark.parametrize("page", ["README.md", "docs/architecture.md"])
def test_source_maps_name_files_that_exist(page: str) -> None:
    package = ROOT / "src" / "rag_rerank_plugins"
    files = {path.name for path in package.rglob("*.py")}
    named = {n for block in _fenced_without_language(page) for n in re.findall(r"\w+\.py", block)}
    assert named, f"{page} has no source map"
    assert named <= files, f"{page} names files that do not exist: {sorted(named - files)}"


def test_architecture_map_names_every_backend_module() -> None:
    diagram = "\n".join(_fenced_without_language("docs/architecture.md"))
    backends = ROOT / "src" / "rag_rerank_plugins" / "backends"
    modules = {p.name for p in backends.glob("*.py") if p.name != "__init__.py"}
    modules |= {p.name + "/" for p in backends.iterdir() if (p / "__init__.py").exists()}
    missing = {m for m in modules if not re.search(rf"(?<![\w/]){re.escape(m)}", diagram)}
    assert not missing, f"docs/architecture.md's map lacks backends/{sorted(missing)}"


def test_readme_backend_table_is_the_registry() -> None:
    """Every built-in backend has a row with its kind; every row names a real backend."""
    from rag_rerank_plugins import backends

    section = _text(ROOT / "README.md").split("\n## Backends\n", 1)[1].split("\n## ", 1)[0]
    rows = re.findall(r"^\| ((?:`[\w-]+`(?:, )?)+) \| (\w+) \|", section, flags=re.M)
    documented = {name: kind for names, kind in rows for name in re.findall(r"`([\w-]+)`", names)}
    builtin = {info.name for info in backends._BUILTINS}  # tests may register more
    assert builtin <= set(documented), f"README's backend table lacks {builtin - set(documented)}"
    for name, kind in documented.items():
        if name == "auto":  # resolved when an adapter is built, not a registry row
            continue
        expected = {"reranker", "embedder"} if kind == "both" else {kind}
        assert backends.backend_info(name).kind in expected, (name, kind)
