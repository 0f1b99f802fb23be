"""The public API as a typed user's code sees it: ``mypy --strict`` on code written from the docs
(tests/typing/user_code.py) finds no error. The package ships ``py.typed``, so a false error
there is one every typed user hits (before: ``ModelSpec(options={...})`` and the extending
guide's remote protocol failed)."""

from __future__ import annotations

from pathlib import Path

import pytest

USER_CODE = Path(__file__).parent / "typing" / "user_code.py"


def test_documented_usage_type_checks_strictly(tmp_path: Path) -> None:
    api = pytest.importorskip("mypy.api")
    stdout, stderr, status = api.run(
        [
            "--strict",
            "--cache-dir",
            str(tmp_path / "mypy-cache"),
            "--config-file",
            "",  # the user's defaults, not this repository's settings for src/
            str(USER_CODE),
        ]
    )
    assert status == 0, stdout + stderr
