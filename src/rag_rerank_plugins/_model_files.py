"""Reading one field of a model's JSON files when they are on this machine, without a download.

Decisions made before a load (a default token limit, which backend ``"auto"`` means) need a
number from ``config.json`` or ``tokenizer_config.json``: read from a local folder, or from the
Hugging Face cache for a hub name (``try_to_load_from_cache``: never the network). Anything not on
this machine is None, and the caller keeps its safe default.
"""

from __future__ import annotations

import functools
import json
import os

__all__ = ["json_int_field"]


@functools.lru_cache(maxsize=256)
def json_int_field(
    model: str, filename: str, key: str, revision: str | None, cache_folder: str | None
) -> int | None:
    """An int field of one of the model's JSON files when it is on this machine, else None."""
    path: str | None = os.path.join(model, filename) if os.path.isdir(model) else None
    if path is None:
        try:
            from huggingface_hub import try_to_load_from_cache

            found = try_to_load_from_cache(
                model, filename, cache_dir=cache_folder, revision=revision
            )
        except Exception:  # not a repo id, no hub library: unknown
            return None
        path = found if isinstance(found, str) else None
    if path is None or not os.path.isfile(path):
        return None
    try:
        with open(path, encoding="utf-8") as f:
            value = json.load(f).get(key)
    except (OSError, ValueError, AttributeError):
        return None
    return value if isinstance(value, int) and 0 < value < 1_000_000 else None
