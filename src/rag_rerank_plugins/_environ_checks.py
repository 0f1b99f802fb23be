"""Checks run on ``os.environ`` whenever a settings section reads it.

The engine's sections (:class:`~rag_rerank_plugins.engine_config.EngineConfig`,
:class:`~rag_rerank_plugins.engine_config.PoolConfig`) are read by ``ModelPool()`` far below the
adapters and the server, which add variables of their own: only the package root knows every
variable, so it installs the misspelt-variable warning here, and the sections call it without
importing anything above them. No imports: the package root stays cheap to import.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

__all__ = ["CHECKS", "check_environ"]

#: Called with the environment each time a section is read from ``os.environ``.
CHECKS: list[Callable[[Mapping[str, str]], None]] = []


def check_environ(environ: Mapping[str, str]) -> None:
    for check in CHECKS:
        check(environ)
