"""The semantic-cache guide's snippets run as written, offline, and do what their comments say.

Every ```python block of docs/guides/semantic-cache.md runs in order in one namespace, except the
one that needs a running cache server (``RemoteSemanticCache("http://cache-host...")``, covered by
tests/test_semantic_cache_server.py). Then the claims in their comments are checked: the
paraphrase is a hit and "Art. 75" a miss, the LLM behind ``set_llm_cache`` was called twice for
three questions, the LlamaIndex paraphrase came from the cache with the same sources. The table
in the guide is the one the chart script prints from the eval's JSON.
"""

from __future__ import annotations

import re
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[1]
GUIDE = ROOT / "docs" / "guides" / "semantic-cache.md"


def _blocks() -> list[str]:
    text = GUIDE.read_text(encoding="utf-8")
    found = re.findall(r"^[ \t]*```python\n(.*?)^[ \t]*```", text, flags=re.MULTILINE | re.DOTALL)
    return [textwrap.dedent(block) for block in found]


def test_guide_snippets_run_and_do_what_they_say(minilm_path: str) -> None:
    pytest.importorskip("langchain_core")
    pytest.importorskip("llama_index.core")
    from langchain_core.globals import get_llm_cache, set_llm_cache

    blocks = _blocks()
    remote = [b for b in blocks if "RemoteSemanticCache(" in b]
    assert len(remote) == 1
    namespace: dict[str, Any] = {}
    previous = get_llm_cache()
    try:
        for block in blocks:
            if block in remote:
                continue
            exec(compile(block, str(GUIDE), "exec"), namespace)
    finally:
        set_llm_cache(previous)
    cache = namespace["cache"]
    assert cache.lookup("O que diz o artigo 72?", namespace="legal-qa") is not None
    assert cache.lookup("O que diz o Art. 75?", namespace="legal-qa") is None
    stats = namespace["llm_cache"].stats()  # three questions, two LLM calls
    assert (stats["hits"], stats["misses"], stats["updates"], stats["errors"]) == (1, 2, 2, 0)
    again, first = namespace["again"], namespace["first"]
    assert again.metadata["semantic_cache"]["hit"] is True
    assert [n.node.node_id for n in again.source_nodes] == [
        n.node.node_id for n in first.source_nodes
    ]


def test_guide_table_is_the_charts_table() -> None:
    text = GUIDE.read_text(encoding="utf-8")
    table = text.split("<!-- semantic-cache-table:start -->\n")[1].split("\n<!--")[0]
    printed = subprocess.run(
        [sys.executable, "-c", "import json,sys; sys.path.insert(0, 'benchmarks');"
         "import semantic_cache_chart as c; print(c.table(json.load(open(c.DATA))))"],
        cwd=ROOT, capture_output=True, text=True, check=True,
    ).stdout.strip()  # fmt: skip
    assert table.strip() == printed, (
        "docs/guides/semantic-cache.md's table is out of date: paste the table "
        "`python benchmarks/semantic_cache_chart.py` prints"
    )
