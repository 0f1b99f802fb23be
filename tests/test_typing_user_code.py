"""The public API as a typed user's code sees it: ``mypy --strict`` on code written from the docs
(tests/typing/user_code.py) finds no error, and on the mistakes of tests/typing/user_errors.py
finds each one. The package ships ``py.typed``, so a false error there is one every typed user
hits (before: ``ModelSpec(options={...})``, the extending guide's remote protocol,
``SharedCrossEncoder(model_name=...)`` and ``embed_documents(<generator>)`` failed), and a
missing one is a typo found only when the code runs (before: ``SharedRerankCompressor(topn=5)``).

The adapters' constructors take ``**data`` at runtime (pydantic aliases, LlamaIndex's positional
arguments), so each declares its signature for type checkers under ``if TYPE_CHECKING:``; the
last test keeps that signature's names equal to what the constructor accepts.
"""

from __future__ import annotations

import ast
import inspect
import re
import sys
import tempfile
from pathlib import Path
from typing import Any

import pytest

TYPING = Path(__file__).parent / "typing"
USER_CODE = TYPING / "user_code.py"
USER_ERRORS = TYPING / "user_errors.py"
#: ``# E: <error code> <text the message must contain>`` marks a statement that must fail.
MARKER = re.compile(r"#\s*E:\s*(?P<code>[\w-]+)\s+(?P<text>.+?)\s*$")
ERROR_LINE = re.compile(
    r"^(?P<path>[^:]+):(?P<line>\d+): error: (?P<message>.*?)\s+\[(?P<code>[\w-]+)\]$"
)


@pytest.fixture(scope="module")
def mypy_cache() -> Path:
    """mypy's incremental cache, kept between runs: checking code that imports the LangChain and
    LlamaIndex adapters analyses langchain-core and llama-index-core, minutes from cold and
    seconds from this cache (mypy re-checks whatever changed since, as in a user's project)."""
    api = pytest.importorskip("mypy.api")
    version = api.run(["--version"])[0].split()[1]
    return Path(tempfile.gettempdir()) / f"rag-rerank-plugins-typing-mypy-{version}"


def _mypy(path: Path, cache: Path) -> tuple[str, int]:
    api = pytest.importorskip("mypy.api")
    stdout, stderr, status = api.run(
        [
            "--strict",
            "--cache-dir",
            str(cache),
            "--config-file",
            "",  # the user's defaults, not this repository's settings for src/
            "--show-error-codes",
            "--no-pretty",
            str(path),
        ]
    )
    return stdout + stderr, status


@pytest.mark.slow  # mypy over langchain-core and llama-index-core (cold cache: minutes)
def test_documented_usage_type_checks_strictly(mypy_cache: Path) -> None:
    output, status = _mypy(USER_CODE, mypy_cache)
    assert status == 0, output


def _marked_statements() -> list[tuple[ast.stmt, str, str]]:
    """user_errors.py's marked statements, each with its expected error code and text."""
    source = USER_ERRORS.read_text()
    lines = source.splitlines()
    marked = []
    for statement in ast.parse(source).body:
        end = statement.end_lineno or statement.lineno
        for line in lines[statement.lineno - 1 : end]:
            found = MARKER.search(line)
            if found:
                marked.append((statement, found["code"], found["text"]))
    return marked


@pytest.mark.slow
def test_mistakes_are_type_errors(mypy_cache: Path) -> None:
    """Each marked statement reports its error (a misspelt keyword, a wrong type) and nothing
    else reports any: the constructors' real parameters, not ``**data: Any``, reach mypy."""
    output, status = _mypy(USER_ERRORS, mypy_cache)
    assert status == 1, output
    errors = [m for m in map(ERROR_LINE.match, output.splitlines()) if m]
    marked = _marked_statements()
    assert len(marked) >= 9, "user_errors.py lost its markers"
    for statement, code, text in marked:
        end = statement.end_lineno or statement.lineno
        hits = [e for e in errors if statement.lineno <= int(e["line"]) <= end]
        assert any(e["code"] == code and text in e["message"] for e in hits), (
            f"line {statement.lineno}: expected [{code}] mentioning {text}; mypy said "
            f"{[e.group(0) for e in hits] or 'nothing'}\n{output}"
        )
    covered = {
        line
        for statement, _, _ in marked
        for line in range(statement.lineno, (statement.end_lineno or statement.lineno) + 1)
    }
    stray = [e.group(0) for e in errors if int(e["line"]) not in covered]
    assert not stray, stray


def test_mistakes_fail_at_runtime_too() -> None:
    """What the type checker refuses, the constructor refuses: no signature refuses a call that
    would have worked."""
    source = USER_ERRORS.read_text()
    namespace: dict[str, Any] = {}
    module = ast.parse(source)
    imports = [s for s in module.body if isinstance(s, (ast.Import, ast.ImportFrom))]
    exec(compile(ast.Module(imports, []), str(USER_ERRORS), "exec"), namespace)
    for statement, _, _ in _marked_statements():
        code = compile(ast.Module([statement], []), str(USER_ERRORS), "exec")
        with pytest.raises((TypeError, ValueError)):
            exec(code, namespace)


def _adapters() -> list[tuple[type[Any], frozenset[str], tuple[str, ...]]]:
    """(adapter, names its validators translate besides fields, stock positional parameters)."""
    pytest.importorskip("langchain_core")
    pytest.importorskip("llama_index.core")
    from rag_rerank_plugins.langchain import (
        SharedCrossEncoder,
        SharedEmbeddings,
        SharedRerankCompressor,
    )
    from rag_rerank_plugins.llama_index import SharedEmbedding, SharedRerankPostprocessor
    from rag_rerank_plugins.llama_index._stock_args import EMBEDDING_POSITIONAL, RERANK_POSITIONAL
    from rag_rerank_plugins.llama_index.embedding import STOCK_NAMES

    return [
        (SharedCrossEncoder, frozenset(), ()),
        # HuggingFaceEmbeddings' cache_folder: moved into model_kwargs by a before-validator.
        (SharedEmbeddings, frozenset({"cache_folder"}), ()),
        (SharedRerankCompressor, frozenset(), ()),
        (SharedRerankPostprocessor, frozenset(RERANK_POSITIONAL), RERANK_POSITIONAL),
        (SharedEmbedding, STOCK_NAMES, EMBEDDING_POSITIONAL),
    ]


def _checker_init(cls: type[Any]) -> ast.FunctionDef:
    """The ``__init__`` declared for type checkers (``if TYPE_CHECKING:``) in ``cls``'s body."""
    tree = ast.parse(inspect.getsource(sys.modules[cls.__module__]))
    for node in ast.walk(tree):
        if not (isinstance(node, ast.ClassDef) and node.name == cls.__name__):
            continue
        for branch in node.body:
            if isinstance(branch, ast.If) and ast.unparse(branch.test) == "TYPE_CHECKING":
                for item in branch.body:
                    if isinstance(item, ast.FunctionDef) and item.name == "__init__":
                        return item
    pytest.fail(
        f"{cls.__name__} declares no __init__ under `if TYPE_CHECKING:`; type checkers then see "
        "pydantic's fields without their aliases, or the runtime **data (any keyword)."
    )


def test_type_checker_signatures_match_the_fields() -> None:
    """The ``if TYPE_CHECKING:`` signatures name exactly the keywords the constructors accept
    (fields, their aliases, the stock arguments the validators translate), the LlamaIndex ones
    the stock class's positional parameters in its order, and a literal default equals the
    field's: a field added, renamed or re-defaulted without the signature fails here."""
    pytest.importorskip("llama_index.core")
    from pydantic_core import PydanticUndefined

    from rag_rerank_plugins.llama_index._args import accepted_arguments

    for cls, translated, positional in _adapters():
        init = _checker_init(cls)
        params = [a.arg for a in init.args.args[1:]]
        keywords = [a.arg for a in init.args.kwonlyargs]
        declared = params + keywords
        assert len(declared) == len(set(declared)), f"{cls.__name__}: a parameter twice"
        expected = set(accepted_arguments(cls)) | translated
        assert set(declared) == expected, (
            f"{cls.__name__}: only in the TYPE_CHECKING __init__: "
            f"{sorted(set(declared) - expected)}; accepted but missing there: "
            f"{sorted(expected - set(declared))}"
        )
        assert tuple(params) == positional, cls.__name__
        assert init.args.vararg is None, cls.__name__
        assert init.args.kwarg is None, cls.__name__
        all_args = init.args.args[1:] + init.args.kwonlyargs
        defaults = [*init.args.defaults, *init.args.kw_defaults]
        # Every field has a default (a settings value at the least): so does every parameter.
        assert len(defaults) == len(all_args), cls.__name__
        assert None not in defaults, cls.__name__
        for arg, default in zip(all_args, defaults, strict=True):
            field = cls.model_fields.get(arg.arg)
            if field is None or field.default is PydanticUndefined:
                continue
            assert isinstance(default, ast.Constant), f"{cls.__name__}.{arg.arg}"
            assert default.value == field.default, (
                f"{cls.__name__}.{arg.arg}: TYPE_CHECKING default {default.value!r}, field "
                f"default {field.default!r}"
            )
