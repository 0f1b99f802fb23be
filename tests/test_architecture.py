"""Architecture rules checked from the source, without importing anything.

* No import circle anywhere in ``rag_rerank_plugins``. Every ``import`` and ``from ... import``
  of a package module counts, wherever it stands: at module level, under ``if TYPE_CHECKING:``
  (a type-only circle still couples the modules and breaks as soon as one import becomes real)
  and inside functions (a lazy import defers a circle, it does not remove it).
* The engine modules stay small enough to read in one sitting (:data:`MAX_ENGINE_LINES`).

What an edge is (so that ordinary package layouts are not circles):

* ``import a.b.c`` and ``from a.b import c`` (``c`` a submodule) are edges to ``a.b.c`` only.
  Python also runs the ``__init__`` of ``a`` and ``a.b`` first, but that implicit step is not
  an edge: otherwise ``pkg/__init__`` re-exporting ``pkg.a`` while ``pkg.a`` imports ``pkg.b``
  would be a circle, and every package re-exporting its submodules would be one.
* ``from a.b import name`` (``name`` not a submodule) and ``import a.b`` (``a.b`` a package) are
  edges to ``a/b/__init__``: the importer needs what that ``__init__`` defines or re-exports. So
  ``pkg.a`` doing ``from pkg import x`` while ``pkg/__init__`` imports ``pkg.a`` is a circle, and
  is reported as one.
* Relative imports are resolved against the importing module's package.
"""

from __future__ import annotations

import ast
from collections import deque
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1] / "src"
PACKAGE = "rag_rerank_plugins"

#: The longest an engine module may be: the engine is split into packages so that each part
#: (scheduling, execution, handles, the pool) reads in one sitting and is reviewed on its own.
MAX_ENGINE_LINES = 350
ENGINE_PACKAGES = ("engine", "pool")
ENGINE_MODULES = ("scheduler.py", "executor.py", "handle.py", "pool.py")


@dataclass(frozen=True)
class Edge:
    """One import statement from ``source`` to ``target`` (module names), for messages."""

    source: str
    target: str
    line: int
    type_only: bool
    in_function: bool

    def where(self) -> str:
        tags = [
            tag for tag, on in (("TYPE_CHECKING", self.type_only), ("lazy", self.in_function)) if on
        ]
        suffix = f" [{', '.join(tags)}]" if tags else ""
        return f"{self.source}:{self.line} -> {self.target}{suffix}"


def discover_modules(root: Path = ROOT, package: str = PACKAGE) -> dict[str, Path]:
    """Module name -> file, for every ``.py`` file of the package (packages by ``__init__``)."""
    modules: dict[str, Path] = {}
    for path in sorted((root / package).rglob("*.py")):
        parts = list(path.relative_to(root).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        modules[".".join(parts)] = path
    return modules


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


class _Imports(ast.NodeVisitor):
    """The package-internal import edges of one module."""

    def __init__(self, module: str, is_package: bool, modules: dict[str, Path]) -> None:
        self.module = module
        # The package relative imports are resolved against.
        self.package = module if is_package else module.rpartition(".")[0]
        self.modules = modules
        self.edges: list[Edge] = []
        self._type_only = 0
        self._functions = 0

    def _add(self, target: str, node: ast.stmt) -> None:
        if target in self.modules and target != self.module:
            self.edges.append(
                Edge(self.module, target, node.lineno, self._type_only > 0, self._functions > 0)
            )

    def visit_If(self, node: ast.If) -> None:
        if _is_type_checking(node.test):
            self._type_only += 1
            for child in node.body:
                self.visit(child)
            self._type_only -= 1
            for child in node.orelse:
                self.visit(child)
        else:
            self.generic_visit(node)

    def _visit_function(self, node: ast.FunctionDef | ast.AsyncFunctionDef) -> None:
        self._functions += 1
        self.generic_visit(node)
        self._functions -= 1

    visit_FunctionDef = _visit_function
    visit_AsyncFunctionDef = _visit_function

    def visit_Import(self, node: ast.Import) -> None:
        for alias in node.names:
            self._add(alias.name, node)

    def visit_ImportFrom(self, node: ast.ImportFrom) -> None:
        if node.level:
            parts = self.package.split(".")
            if node.level - 1 > len(parts) - 1:
                raise AssertionError(
                    f"{self.module}:{node.lineno}: relative import beyond the root"
                )
            base = ".".join(parts[: len(parts) - (node.level - 1)])
            source = f"{base}.{node.module}" if node.module else base
        else:
            source = node.module or ""
        for alias in node.names:
            submodule = f"{source}.{alias.name}"
            if alias.name != "*" and submodule in self.modules:
                self._add(submodule, node)  # from pkg import submodule: that submodule only
            else:
                self._add(source, node)  # a name defined or re-exported by ``source``


def import_graph(root: Path = ROOT, package: str = PACKAGE) -> dict[str, list[Edge]]:
    """Module -> its import edges to other modules of the package."""
    modules = discover_modules(root, package)
    graph: dict[str, list[Edge]] = {}
    for name, path in modules.items():
        visitor = _Imports(name, path.name == "__init__.py", modules)
        visitor.visit(ast.parse(path.read_text(encoding="utf-8"), filename=str(path)))
        graph[name] = visitor.edges
    return graph


def strongly_connected(graph: dict[str, list[Edge]]) -> list[list[str]]:
    """The components with a circle (more than one module), by Tarjan's algorithm (iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[list[str]] = []
    for start in sorted(graph):
        if start in index:
            continue
        work = [(start, iter(sorted({e.target for e in graph[start]})))]
        index[start] = low[start] = len(index)
        stack.append(start)
        on_stack.add(start)
        while work:
            node, targets = work[-1]
            for target in targets:
                if target not in index:
                    index[target] = low[target] = len(index)
                    stack.append(target)
                    on_stack.add(target)
                    work.append((target, iter(sorted({e.target for e in graph[target]}))))
                    break
                if target in on_stack:
                    low[node] = min(low[node], index[target])
            else:
                work.pop()
                if work:
                    parent = work[-1][0]
                    low[parent] = min(low[parent], low[node])
                if low[node] == index[node]:
                    component = []
                    while True:
                        member = stack.pop()
                        on_stack.discard(member)
                        component.append(member)
                        if member == node:
                            break
                    if len(component) > 1:
                        components.append(sorted(component))
    return sorted(components)


def _shortest_path(
    graph: dict[str, list[Edge]], start: str, goal: str, within: set[str]
) -> list[Edge]:
    previous: dict[str, Edge | None] = {start: None}
    queue = deque([start])
    while queue:
        node = queue.popleft()
        if node == goal:
            path: list[Edge] = []
            edge = previous[node]
            while edge is not None:
                path.append(edge)
                edge = previous[edge.source]
            return path[::-1]
        for edge in graph[node]:
            if edge.target in within and edge.target not in previous:
                previous[edge.target] = edge
                queue.append(edge.target)
    raise AssertionError(f"no path {start} -> {goal} inside its component")


def find_cycles(graph: dict[str, list[Edge]]) -> list[list[Edge]]:
    """Circles covering every edge of every circular component: for each edge ``a -> b`` inside
    a component, ``a -> b`` then the shortest way back from ``b`` to ``a``. Breaking all of them
    (every listed edge that is not needed) removes every circle; duplicates are dropped."""
    cycles: dict[tuple[str, ...], list[Edge]] = {}
    for component in strongly_connected(graph):
        members = set(component)
        for source in component:
            for edge in graph[source]:
                if edge.target not in members:
                    continue
                cycle = [edge, *_shortest_path(graph, edge.target, source, members)]
                names = [e.source for e in cycle]
                first = names.index(min(names))
                key = tuple(names[first:] + names[:first])
                cycles.setdefault(key, cycle[first:] + cycle[:first])
    return [cycles[key] for key in sorted(cycles)]


def describe(cycles: list[list[Edge]]) -> str:
    lines = []
    for n, cycle in enumerate(cycles, 1):
        modules = " -> ".join([e.source for e in cycle] + [cycle[0].source])
        lines.append(f"{n}. {modules}")
        lines.extend(f"     {edge.where()}" for edge in cycle)
    return "\n".join(lines)


# -- the rules ---------------------------------------------------------------------------------


def test_no_import_cycles() -> None:
    graph = import_graph()
    cycles = find_cycles(graph)
    if cycles:
        components = strongly_connected(graph)
        pytest.fail(
            f"{len(cycles)} import circle(s) in {len(components)} group(s) of modules (type-only "
            "and function-level imports count). Break each by moving the shared names down "
            "into a module both import, or by passing the dependency in:\n" + describe(cycles),
            pytrace=False,
        )


def engine_modules(root: Path = ROOT, package: str = PACKAGE) -> list[Path]:
    """The engine's modules that exist: everything under ``engine/`` and ``pool/``, and the
    top-level ``scheduler.py``, ``executor.py``, ``handle.py`` and ``pool.py``."""
    base = root / package
    paths = [base / name for name in ENGINE_MODULES if (base / name).is_file()]
    for sub in ENGINE_PACKAGES:
        if (base / sub).is_dir():
            paths.extend(sorted((base / sub).rglob("*.py")))
    return paths


def test_engine_modules_stay_short() -> None:
    paths = engine_modules()
    if not paths:
        pytest.skip("no engine modules found")
    too_long = {
        str(path.relative_to(ROOT)): n
        for path in paths
        if (n := len(path.read_text(encoding="utf-8").splitlines())) > MAX_ENGINE_LINES
    }
    assert not too_long, (
        f"engine modules over {MAX_ENGINE_LINES} lines (split them by responsibility): "
        + ", ".join(f"{path} ({n})" for path, n in sorted(too_long.items()))
    )


# -- the checker checks itself on a throwaway package -------------------------------------------


def _write(root: Path, files: dict[str, str]) -> None:
    for name, text in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")


def test_reexporting_package_is_not_a_circle(tmp_path: Path) -> None:
    _write(
        tmp_path,
        {
            "pkg/__init__.py": "from .a import A\nfrom . import b\n",
            "pkg/a.py": "from .b import B\nfrom pkg.sub import c\nA = 1\n",
            "pkg/b.py": "import pkg.sub.d\nB = 1\n",
            "pkg/sub/__init__.py": "from .c import C\n",
            "pkg/sub/c.py": "from .. import b as _b\nfrom .d import D\nC = 1\n",
            "pkg/sub/d.py": "D = 1\n",
        },
    )
    graph = import_graph(tmp_path, "pkg")
    assert {e.target for e in graph["pkg"]} == {"pkg.a", "pkg.b"}
    assert {e.target for e in graph["pkg.a"]} == {"pkg.b", "pkg.sub.c"}
    assert {e.target for e in graph["pkg.b"]} == {"pkg.sub.d"}
    assert {e.target for e in graph["pkg.sub.c"]} == {"pkg.b", "pkg.sub.d"}
    assert find_cycles(graph) == []


def test_circles_through_init_type_checking_and_functions_are_found(tmp_path: Path) -> None:
    _write(
        tmp_path,
        {
            # pkg.a needs pkg/__init__, which imports pkg.a: a circle.
            "pkg/__init__.py": "from .a import A\n",
            "pkg/a.py": "from pkg import VERSION\nA = 1\n",
            # A type-only import and a function-level one close a second circle.
            "pkg/x.py": (
                "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from .y import Y\n"
            ),
            "pkg/y.py": "def f():\n    from . import x\n",
        },
    )
    cycles = find_cycles(import_graph(tmp_path, "pkg"))
    assert [[e.source for e in cycle] for cycle in cycles] == [["pkg", "pkg.a"], ["pkg.x", "pkg.y"]]
    text = describe(cycles)
    assert "pkg.x:3 -> pkg.y [TYPE_CHECKING]" in text
    assert "pkg.y:2 -> pkg.x [lazy]" in text
