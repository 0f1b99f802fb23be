"""A lighter install than the full set: every public entry point names the extra it lacks.

The promise (``exceptions.MissingDependencyError``): a missing optional package fails with the
package's error naming ``pip install 'rag-rerank-plugins[<extra>]'``, never a bare
ModuleNotFoundError from deep inside. Each case blocks the modules in a subprocess (a meta-path
finder refusing them), so this runs whatever is installed here. Found by installing the wheel
with one extra at a time: the demo, ``server.create_app`` and the ``testing`` builders raised
bare ModuleNotFoundErrors, and the semantic cache needed numpy, which no extra but the model
ones installed (now a core dependency).
"""

from __future__ import annotations

import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

BLOCK = textwrap.dedent(
    """
    import importlib.abc, sys

    BLOCKED = {blocked!r}

    class _Blocked(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in BLOCKED:
                raise ImportError(f"No module named {{name!r}} (blocked by the test)", name=name)
            return None

    for _name in [m for m in sys.modules if m.split(".")[0] in BLOCKED]:
        del sys.modules[_name]
    sys.meta_path.insert(0, _Blocked())
    from rag_rerank_plugins import MissingDependencyError
    """
)


def _run(blocked: set[str], code: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", BLOCK.format(blocked=blocked) + textwrap.dedent(code)],
        capture_output=True,
        text=True,
        timeout=180,
    )


@pytest.mark.parametrize(
    ("blocked", "extra"),
    [({"langchain_core"}, "langchain"), ({"llama_index"}, "llama-index")],
)
def test_demo_names_the_missing_extra(blocked: set[str], extra: str) -> None:
    result = _run(
        blocked,
        """
        from rag_rerank_plugins.cli import main
        raise SystemExit(main(["demo", "--requests", "1"]))
        """,
    )
    assert result.returncode == 1, result.stderr
    assert "Traceback" not in result.stderr
    assert f"pip install 'rag-rerank-plugins[{extra}]'" in result.stderr


def _names_the_extra(blocked: set[str], setup: str, statement: str, extra: str) -> None:
    """``statement`` (after ``setup``), with ``blocked`` unimportable, raises
    MissingDependencyError for ``extra``, whose message says what to install."""
    check = (
        f"try:\n    {statement}\nexcept MissingDependencyError as exc:\n"
        f"    assert exc.extra == {extra!r}, exc\n    print(exc)\n"
        "else:\n    raise SystemExit('no error')\n"
    )
    result = _run(blocked, textwrap.dedent(setup) + check)
    assert result.returncode == 0, result.stderr
    assert f"pip install 'rag-rerank-plugins[{extra}]'" in result.stdout


def test_create_app_without_fastapi_names_the_server_extra() -> None:
    setup = "from rag_rerank_plugins.server import ServerConfig  # the config needs no fastapi\n"
    statement = "from rag_rerank_plugins.server import create_app"
    _names_the_extra({"fastapi", "starlette"}, setup, statement, "server")


def test_create_app_with_a_broken_fastapi_quotes_its_error() -> None:
    """fastapi installed, its starlette not importable: reinstalling the extra is not the fix,
    so the message says it is installed and quotes the import error."""
    result = _run(
        {"starlette"},
        """
        try:
            from rag_rerank_plugins.server import create_app
        except MissingDependencyError as exc:
            assert exc.extra == "server", exc
            assert isinstance(exc.__cause__, ImportError)
            print(exc)
        """,
    )
    assert result.returncode == 0, result.stderr
    assert "installed but cannot be imported" in result.stdout
    assert "starlette" in result.stdout


def test_the_tokenizer_builder_needs_no_torch(monkeypatch: pytest.MonkeyPatch) -> None:
    """train_byte_bpe_tokenizer uses tokenizers and transformers only (an [onnx] install): it
    checks transformers, not torch; the model builders check both."""
    from rag_rerank_plugins import testing
    from rag_rerank_plugins.backends import _torch_common

    checked: list[str] = []
    monkeypatch.setattr(_torch_common, "import_optional", lambda module, *_: checked.append(module))
    testing.train_byte_bpe_tokenizer(["yes no a b"], vocab_size=300)
    assert checked == ["transformers"]
    checked.clear()
    testing._require_st("build_cross_encoder")
    assert checked == ["torch", "transformers"]


@pytest.mark.parametrize(
    "call",
    [
        "build_cross_encoder(tmp)",
        "build_cross_encoder_from_encoder(tmp)",
        "build_causal_lm_reranker(tmp)",
        "train_byte_bpe_tokenizer(['a b'])",
    ],
)
def test_testing_builders_name_the_st_extra(call: str) -> None:
    setup = """
        import tempfile
        from rag_rerank_plugins.testing import *  # the fakes import without transformers
        from rag_rerank_plugins.testing import (
            build_causal_lm_reranker, build_cross_encoder, build_cross_encoder_from_encoder,
            train_byte_bpe_tokenizer,
        )
        tmp = tempfile.mkdtemp()
        """
    _names_the_extra({"transformers"}, setup, call, "st")


def test_the_semantic_cache_needs_only_core_dependencies() -> None:
    """RemoteSemanticCache (HTTP only) and the stores import numpy: it is a core dependency, so
    ``pip install 'rag-rerank-plugins[langchain,remote]'`` on a torch-free client host works."""
    pyproject = (Path(__file__).parents[1] / "pyproject.toml").read_text(encoding="utf-8")
    [core] = re.findall(r"^dependencies = \[(.*)\]$", pyproject, flags=re.MULTILINE)
    assert '"numpy' in core
    result = _run(
        {"torch", "transformers", "sentence_transformers"},
        """
        from rag_rerank_plugins.semantic_cache import SemanticCache
        from rag_rerank_plugins.semantic_cache.remote import RemoteSemanticCache
        SemanticCache()  # the default embedder loads on first use, not here
        print("ok")
        """,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ok"


def test_a_broken_pipe_that_is_not_stdout_is_an_error(monkeypatch: pytest.MonkeyPatch) -> None:
    """Only stdout's reader going away ends a command quietly; any other BrokenPipeError (a
    socket, a child process) is a real error and keeps its traceback."""
    from rag_rerank_plugins import cli

    def handler(*_: object) -> int:
        raise BrokenPipeError("a socket")

    monkeypatch.setattr(cli, "_cmd_info", handler)
    with pytest.raises(BrokenPipeError, match="a socket"):
        cli.main(["info"])


def test_info_into_a_closed_pipe_prints_no_traceback() -> None:
    """``rag-rerank info | head -1``: the reader leaves early; BrokenPipeError was a traceback."""
    result = subprocess.run(
        f"{sys.executable} -m rag_rerank_plugins info | head -1",
        shell=True,
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert result.stdout.strip()
    assert "Traceback" not in result.stderr
    assert "BrokenPipeError" not in result.stderr
