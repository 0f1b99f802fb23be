"""Without llama-index-core, the LlamaIndex adapters fail with the promised MissingDependencyError.

The import is blocked in a subprocess (a meta-path finder refusing ``llama_index``), so this runs
whether or not the extra is installed here.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

BLOCK = textwrap.dedent(
    """
    import importlib.abc, sys

    class _NoLlamaIndex(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name == "llama_index" or name.startswith("llama_index."):
                raise ImportError(f"No module named {name!r} (blocked by the test)", name=name)
            return None

    for _name in [m for m in sys.modules if m == "llama_index" or m.startswith("llama_index.")]:
        del sys.modules[_name]
    sys.meta_path.insert(0, _NoLlamaIndex())
    from rag_rerank_plugins import MissingDependencyError
    """
)


def _run(code: str) -> str:
    result = subprocess.run(
        [sys.executable, "-c", BLOCK + textwrap.dedent(code)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    return result.stdout.strip()


@pytest.mark.parametrize(
    "statement",
    [
        "from rag_rerank_plugins.llama_index import SharedRerankPostprocessor",
        "from rag_rerank_plugins.llama_index import SharedEmbedding",
        "import rag_rerank_plugins.llama_index as li; li.SharedEmbedding",
        "import rag_rerank_plugins.llama_index.postprocessor",
        "import rag_rerank_plugins.llama_index.embedding",
    ],
)
def test_missing_llama_index_names_the_extra(statement: str) -> None:
    out = _run(
        f"""
        try:
            {statement}
        except MissingDependencyError as exc:
            assert isinstance(exc, ImportError)
            assert exc.extra == "llama-index"
            print(exc)
        else:
            raise SystemExit("no error")
        # Asked again (a retry, another request): the same clear error, never a stale half-import.
        try:
            {statement}
        except MissingDependencyError:
            print("again")
        """
    )
    message, again = out.splitlines()
    assert "'llama-index-core'" in message
    assert "pip install 'rag-rerank-plugins[llama-index]'" in message
    assert again == "again"


def test_package_itself_imports_without_llama_index() -> None:
    out = _run(
        """
        import rag_rerank_plugins.llama_index as li
        print(sorted(li.__all__))
        try:
            li.NotAnAdapter
        except AttributeError:
            print("attribute error")
        """
    )
    assert out.splitlines() == [
        "['SemanticCacheQueryEngine', 'SharedEmbedding', 'SharedRerankPostprocessor']",
        "attribute error",
    ]
