"""What the README tells a new user to install is enough for what it tells them to run.

Offline: these tests read pyproject.toml and README.md; the one check that needs PyPI (the floor
wheel really contains the modules) is ``scripts/check-langchain-floor``, which CI can run.
"""

from __future__ import annotations

import importlib.util
from importlib.machinery import SourceFileLoader
from pathlib import Path
from types import ModuleType

import pytest
from packaging.version import Version

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
