"""``python -m rag_rerank_plugins``: the ``rag-rerank`` console script, for environments where
the script is not on ``PATH`` (a venv not activated, ``pipx run``, a container's python)."""

from __future__ import annotations

import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
