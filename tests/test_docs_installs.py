"""What the README tells a new user to install is enough for what it tells them to run.

Offline: these tests read pyproject.toml and README.md; the one check that needs PyPI (the floor
wheel really contains the modules) is ``scripts/check-langchain-floor``, which CI can run.
"""

from __future__ import annotations

import ast
import importlib.util
import re
import sys
import textwrap
from importlib.machinery import SourceFileLoader
from importlib.metadata import distribution, packages_distributions
from pathlib import Path
from types import ModuleType

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib  # type: ignore[no-redef]

ROOT = Path(__file__).resolve().parents[1]

#: First langchain-core release with ``langchain_core.cross_encoders`` (SharedCrossEncoder's
#: base class), found with ``scripts/check-langchain-floor --version X``: 1.2.18 lacks it,
#: 1.2.19 has it (as do 1.2.20 and later; 1.2.10 and 1.2.15 lack it).
VERIFIED_LANGCHAIN_CORE_FLOOR = "1.2.19"


def _floor_script() -> ModuleType:
    path = ROOT / "scripts" / "check-langchain-floor"
    loader = SourceFileLoader("check_langchain_floor", str(path))
    spec = importlib.util.spec_from_loader(loader.name, loader)
    assert spec is not None
    module = importlib.util.module_from_spec(spec)
    loader.exec_module(module)
    return module


def test_langchain_extra_floor_has_cross_encoders() -> None:
    floor = _floor_script().declared_floor()
    assert Version(floor) >= Version(VERIFIED_LANGCHAIN_CORE_FLOOR), (
        f"the 'langchain' extra admits langchain-core {floor}, which has no "
        "langchain_core.cross_encoders; raise the floor (scripts/check-langchain-floor)"
    )


def test_floor_script_recognises_missing_modules() -> None:
    script = _floor_script()
    complete = {
        "langchain_core/cross_encoders.py",
        "langchain_core/documents/__init__.py",
        "langchain_core/embeddings/__init__.py",
        "langchain_core/callbacks/manager.py",
    }
    assert script.missing_modules(complete) == []
    assert script.missing_modules(complete - {"langchain_core/cross_encoders.py"}) == [
        "langchain_core.cross_encoders"
    ]


def test_installed_langchain_core_has_the_modules_the_script_checks() -> None:
    pytest.importorskip("langchain_core")
    for module in _floor_script().REQUIRED_MODULES:
        assert importlib.util.find_spec(module) is not None, module


# -- every import of a documented snippet is installed by a documented install line ------------

SELF = "rag-rerank-plugins"
FIRST_PARTY = "rag_rerank_plugins"
#: Pages whose ```python snippets run after their own ``pip install "rag-rerank-plugins[...]"``.
PAGES = ["README.md", "docs/guides/langchain.md", "docs/guides/offline.md"]


def _extras() -> dict[str, list[str]]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    return project["optional-dependencies"]


def _resolve(extras: set[str], table: dict[str, list[str]]) -> set[str]:
    """Distribution names (canonical) that installing ``SELF[extras]`` pulls in directly,
    following self-references such as ``rag-rerank-plugins[st,langchain]``."""
    seen: set[str] = set()
    names: set[str] = set()
    todo = list(extras)
    while todo:
        extra = todo.pop()
        if extra in seen:
            continue
        seen.add(extra)
        assert extra in table, f"unknown extra {extra!r}"
        for line in table[extra]:
            requirement = Requirement(line)
            if canonicalize_name(requirement.name) == SELF:
                todo.extend(requirement.extras)
            else:
                names.add(canonicalize_name(requirement.name))
    return names


def _install_options(text: str) -> list[set[str]]:
    """One set of extras per documented alternative: ``pip install "pkg[a,b]"  # or [c], or [d]``
    gives {a, b}, {c} and {d}."""
    options = []
    for line in text.splitlines():
        if "pip install" in line and SELF in line:
            options.extend(
                {e.strip() for e in group.split(",")}
                for group in re.findall(r"\[([\w,\s-]+)\]", line)
            )
    return options


def _python_blocks(text: str) -> list[str]:
    """The ```python blocks, dedented (blocks inside list items are indented)."""
    blocks = re.findall(r"^[ \t]*```python\n(.*?)^[ \t]*```", text, flags=re.MULTILINE | re.DOTALL)
    return [textwrap.dedent(block) for block in blocks]


def _imported_modules(code: str) -> set[str]:
    modules = set()
    for node in ast.walk(ast.parse(code)):
        if isinstance(node, ast.Import):
            modules.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            modules.add(node.module)
    return modules


def _distribution_of(module: str) -> str | None:
    """The installed distribution providing ``module`` (canonical name); None for the standard
    library and this package. Namespace packages (llama_index) are told apart by their files."""
    top = module.split(".")[0]
    if top in sys.stdlib_module_names or top == FIRST_PARTY:
        return None
    candidates = packages_distributions().get(top, [])
    if not candidates:
        pytest.fail(f"{module!r} is imported by a documented snippet but is not installed here")
    if len(set(candidates)) > 1:
        # A package's folder or a module's file: llama_index.core.schema is schema.py.
        path = module.replace(".", "/")
        candidates = [
            name
            for name in candidates
            if any(
                str(f).startswith(path + "/") or str(f) == path + ".py"
                for f in distribution(name).files or ()
            )
        ]
    assert len(set(candidates)) == 1, (module, candidates)
    return canonicalize_name(candidates[0])


@pytest.mark.parametrize("page", PAGES)
def test_documented_snippets_run_after_the_documented_install(page: str) -> None:
    text = (ROOT / page).read_text()
    table = _extras()
    options = [_resolve(extras, table) for extras in _install_options(text)]
    assert options, f"{page} has no pip install line for {SELF}"
    for code in _python_blocks(text):
        needed = {d for m in _imported_modules(code) if (d := _distribution_of(m)) is not None}
        if not needed:
            continue
        assert any(needed <= installed for installed in options), (
            f"{page}: a snippet imports {sorted(needed)}, but no documented install "
            f"({[sorted(o) for o in _install_options(text)]}) requires all of them:\n{code}"
        )


def test_resolve_follows_self_references() -> None:
    table = {"a": ["x>=1"], "b": ["rag-rerank-plugins[a]", "Y_Z"], "c": ["rag-rerank-plugins[b,c]"]}
    assert _resolve({"c"}, table) == {"x", "y-z"}


# -- the notebooks run after the install the README gives for them ---------------------------


def _notebook_imports(path: Path) -> set[str]:
    import json

    modules: set[str] = set()
    for cell in json.loads(path.read_text())["cells"]:
        if cell["cell_type"] != "code":
            continue
        source = "".join(cell["source"])
        lines = source.splitlines()
        code = "\n".join(x for x in lines if not x.lstrip().startswith(("%", "!")))
        modules |= _imported_modules(code)
    return modules


@pytest.mark.parametrize("notebook", sorted(p.name for p in (ROOT / "notebooks").glob("*.ipynb")))
def test_notebooks_run_after_the_readmes_notebook_install(notebook: str) -> None:
    readme = (ROOT / "README.md").read_text()
    section = readme.split("## Notebooks", 1)[1].split("\n## ", 1)[0]
    table = _extras()
    options = [_resolve(extras, table) for extras in _install_options(section)]
    assert options, "README's Notebooks section has no pip install line"
    needed = {
        d
        for m in _notebook_imports(ROOT / "notebooks" / notebook)
        if (d := _distribution_of(m)) is not None
    }
    assert any(needed <= installed for installed in options), (
        f"{notebook} imports {sorted(needed)}; the README's notebook install misses "
        f"{sorted(needed - max(options, key=lambda o: len(needed & o)))}"
    )
