"""A backend is one module plus one registry row, and the registry's check is the only one.

* The load path checks option names against the row for every backend, built-in or registered,
  before the backend's own code runs (adapters check the same way when they are built).
* Backend modules never import one another: shared helpers live in private modules.
* Every built-in row points at a loader, and the guide's worked example runs as written.

Nothing here loads a model or imports torch.
"""

from __future__ import annotations

import ast
import contextlib
import io
import re
import sys
import uuid
from pathlib import Path
from typing import Any

import pytest

from rag_rerank_plugins import ConfigurationError, ModelPool, ModelSpec
from rag_rerank_plugins.backends import (
    available_backends,
    check_options,
    get_loader,
    load_backend,
    register_backend,
)
from rag_rerank_plugins.testing import FakeReranker

ROOT = Path(__file__).resolve().parents[1]
BACKENDS = ROOT / "src" / "rag_rerank_plugins" / "backends"
BUILTINS = [name for name, info in available_backends().items() if isinstance(info.target, str)]


class _NoProvider:
    """A provider no checked load may reach."""

    def embed(self, *args: Any, **kwargs: Any) -> list[list[float]]:
        raise AssertionError("the loader ran")

    def model_info(self, spec: ModelSpec) -> tuple[str, str]:
        raise AssertionError("the loader ran")


# -- one check, in the load path ----------------------------------------------------------------


@pytest.mark.parametrize("backend", BUILTINS)
def test_the_load_path_refuses_undeclared_options_of_every_builtin(backend: str) -> None:
    spec = ModelSpec("m", backend=backend, device="cpu", options={"not_an_option": 1})
    with pytest.raises(ConfigurationError, match=r"does not accept option\(s\) 'not_an_option'"):
        load_backend(spec, _NoProvider())


def test_a_registered_backends_options_are_checked_before_its_loader_runs() -> None:
    calls: list[ModelSpec] = []

    def loader(spec: ModelSpec, provider: Any) -> FakeReranker:
        calls.append(spec)
        return FakeReranker()

    name = f"declared-{uuid.uuid4().hex[:8]}"
    register_backend(name, loader, "reranker", uses_torch=False, options={"alpha"})
    pool = ModelPool()
    try:
        bad = ModelSpec("m", backend=name, options={"beta": 1})
        with pytest.raises(ConfigurationError, match=r"'beta'.*Accepted: alpha"):
            pool.get(bad)  # the pool's own load path, not an adapter
        assert calls == []
        assert pool.score_pairs(ModelSpec("m", backend=name, options={"alpha": 1}), [("q", "q")])
        assert len(calls) == 1
        # get_loader hands out the checked loader too.
        with pytest.raises(ConfigurationError, match="beta"):
            get_loader(name)(bad, _NoProvider())
        assert len(calls) == 1
    finally:
        pool.clear()


def test_a_secret_in_a_remote_spec_gets_the_api_key_env_hint() -> None:
    for name in ("api_key", "token"):
        with pytest.raises(ConfigurationError, match=r"Never put a secret.*api_key_env="):
            check_options("remote-reranker", {name: "x"})
    with pytest.raises(ConfigurationError, match="HF_TOKEN"):  # not a remote backend
        check_options("onnx-cross-encoder", {"token": "x"})
    check_options("cross-encoder", {"token": "x"})  # a Secret in the spec (issue 25)


# -- one module per backend, no imports between them ---------------------------------------------


def _backend_modules() -> list[str]:
    """Backend modules: every public module of the package but the registry's own."""
    names = [p.stem for p in BACKENDS.glob("*.py") if not p.stem.startswith("_")]
    return [*sorted(set(names) - {"base", "options"}), "remote"]


def _imported(path: Path) -> set[str]:
    """Sibling names ``path`` imports from ``rag_rerank_plugins.backends``, at any depth."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            module = node.module or ""
            if node.level == 1:
                found.add(module.split(".")[0] if module else "")
                if not module:
                    found.update(alias.name for alias in node.names)
            elif module.startswith("rag_rerank_plugins.backends."):
                found.add(module.split(".")[2])
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.startswith("rag_rerank_plugins.backends."):
                    found.add(alias.name.split(".")[2])
    return found


def test_no_backend_module_imports_another() -> None:
    backends = set(_backend_modules())
    assert {"flag", "st_cross_encoder", "causal_lm", "onnx"} <= backends
    offenders = {}
    for path in sorted(BACKENDS.glob("*.py")):
        if path.stem == "__init__":
            continue  # the registry names backends by "module:function" strings only
        siblings = (_imported(path) & backends) - {path.stem}
        if siblings:
            offenders[path.name] = sorted(siblings)
    assert offenders == {}, "import shared helpers from a private module (_common, ...)"


def test_every_builtin_row_points_at_a_loader() -> None:
    import importlib

    heavy = ("torch", "transformers", "sentence_transformers", "FlagEmbedding", "onnxruntime")
    before = {m for m in heavy if m in sys.modules}
    for name in BUILTINS:
        target = available_backends()[name].target
        assert isinstance(target, str)
        module, _, function = target.partition(":")
        assert callable(getattr(importlib.import_module(module), function)), name
    # Backend modules import their libraries inside the loaders only.
    assert {m for m in heavy if m in sys.modules} == before


# -- the guide ----------------------------------------------------------------------------------


def _guide_section() -> str:
    text = (ROOT / "docs" / "guides" / "extending.md").read_text()
    return text.split("## Adding a backend", 1)[1].split("\n## ", 1)[0]


def _guide_blocks() -> list[str]:
    """The section's code blocks, indented ones (inside a list item) dedented."""
    blocks = re.findall(r"^( *)```python\n(.*?)^\1```", _guide_section(), flags=re.S | re.M)
    return ["\n".join(line[len(indent) :] for line in b.splitlines()) for indent, b in blocks]


def test_the_guides_backend_example_runs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("langchain_core")
    from rag_rerank_plugins import backends

    blocks = _guide_blocks()
    module = next(b for b in blocks if b.startswith("# overlap_backend.py"))
    usage = next(b for b in blocks if b.startswith("import overlap_backend"))
    (tmp_path / "overlap_backend.py").write_text(module)
    monkeypatch.syspath_prepend(str(tmp_path))
    out = io.StringIO()
    try:
        with contextlib.redirect_stdout(out):
            exec(compile(usage, "extending.md", "exec"), {})
        assert out.getvalue().strip() == "[0.5, 0.0]"
        message = (
            "Backend 'word-overlap' does not accept option(s) 'case_sensitiv' (model_kwargs or "
            "an adapter field). Accepted: case_sensitive."
        )
        with pytest.raises(ConfigurationError) as caught:
            ModelPool().get(ModelSpec("o", backend="word-overlap", options={"case_sensitiv": 1}))
        assert str(caught.value) == message
        assert message in " ".join(_guide_section().split())
    finally:
        backends._REGISTRY.pop("word-overlap", None)
        sys.modules.pop("overlap_backend", None)


def test_the_guides_builtin_row_is_a_valid_row() -> None:
    from rag_rerank_plugins import backends

    row = next(b for b in _guide_blocks() if b.startswith("_row("))
    info = eval(row.strip().rstrip(","), {"_row": backends._row})  # our own docs
    assert info.target == "rag_rerank_plugins.backends.word_overlap:load"
    assert (info.kind, info.options, info.uses_torch) == (
        "reranker",
        frozenset({"case_sensitive"}),
        False,
    )
