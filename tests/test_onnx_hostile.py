"""The ONNX backends against a hostile user: a cache folder that cannot be written, a damaged
cache entry (changed weights that onnxruntime still opens, a lost ``meta.json``, a truncated
graph), threads exporting one entry at once, thread counts that are not positive integers, and
(OpenVINO) stats that reported the requested precision hint instead of the one that ran.

Offline, on the session's tiny random cross-encoder; each test exports at most twice.
"""

from __future__ import annotations

import errno
import json
import logging
import shutil
import threading
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from rag_rerank_plugins import ModelPool, ModelSpec
from rag_rerank_plugins.exceptions import ConfigurationError, ModelLoadError

pytest.importorskip("onnxruntime")
pytest.importorskip("sentence_transformers")

from rag_rerank_plugins.backends import _onnx_common
from rag_rerank_plugins.backends import onnx as onnx_backend

BACKEND = "onnx-cross-encoder"
PAIRS = [("q", "a short passage"), ("another query", "a longer passage about energy")]


@pytest.fixture(scope="module")
def exported(tiny_ce_path: str, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A cache holding the tiny cross-encoder's export (made once; tests copy it)."""
    cache = tmp_path_factory.mktemp("onnx-hostile-cache")
    pool = ModelPool()
    pool.score_pairs(onnx_spec(tiny_ce_path, cache), PAIRS)
    pool.clear()
    return cache


def onnx_spec(path: str, cache: str | Path, **options: Any) -> ModelSpec:
    return ModelSpec(
        path, backend=BACKEND, options=tuple({"cache_dir": str(cache), **options}.items())
    )


def copy_cache(source: Path, target: Path) -> Path:
    shutil.copytree(source, target)
    return target


def entry_of(cache: Path) -> Path:
    (entry,) = [p for p in cache.iterdir() if not p.name.startswith(".")]
    return entry


def scores(spec: ModelSpec) -> list[float]:
    pool = ModelPool()
    try:
        return pool.score_pairs(spec, PAIRS)
    finally:
        pool.clear()


# -- a cache folder that cannot be written -----------------------------------------------------


def _read_only(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every new folder in the cache fails as on a read-only mount (tests may run as root, for
    whom ``chmod`` does not stop a write)."""

    def refuse(*args: Any, **kwargs: Any) -> Any:
        raise OSError(errno.EROFS, "Read-only file system", str(args[0] if args else ""))

    monkeypatch.setattr(_onnx_common, "scratch_dir", refuse)


def test_a_read_only_cache_serves_its_export_and_says_how_to_fix_a_missing_one(
    tiny_ce_path: str, exported: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An export loads from a read-only cache (an image built once, run read-only). One that must
    be exported there failed with a bare ``[Errno 30] Read-only file system:
    '.../.tmp-<key>-...'``; now the error names the cache folder and the way out."""
    cache = copy_cache(exported, tmp_path / "cache")
    want = scores(onnx_spec(tiny_ce_path, exported))
    _read_only(monkeypatch)
    assert scores(onnx_spec(tiny_ce_path, cache)) == want

    with pytest.raises(ModelLoadError) as missing:  # opset 16: another entry, not cached
        scores(onnx_spec(tiny_ce_path, cache, opset=16))
    message = str(missing.value)
    assert "cannot write the ONNX export in the cache folder" in message
    assert str(cache) in message
    assert "cache_dir" in message
    assert _onnx_common.CACHE_ENV in message
    assert missing.value.backend == BACKEND
    assert [p.name for p in cache.iterdir()] == [entry_of(exported).name]


def test_a_read_only_cache_with_a_damaged_entry_says_so(
    tiny_ce_path: str, exported: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cache = copy_cache(exported, tmp_path / "cache")
    (entry_of(cache) / "model.onnx").write_bytes(b"not a graph")
    _read_only(monkeypatch)
    with pytest.raises(ModelLoadError, match="remove the damaged ONNX export") as damaged:
        scores(onnx_spec(tiny_ce_path, cache))
    assert str(cache) in str(damaged.value)


# -- damaged entries ---------------------------------------------------------------------------


def _negate_the_head(entry: Path) -> None:
    """Other weights in a graph onnxruntime still opens: the classifier's, negated."""
    import onnx
    from onnx import numpy_helper

    graph = onnx.load(str(entry / "model.onnx"))
    (head,) = [t for t in graph.graph.initializer if "classifier" in t.name and "weight" in t.name]
    head.CopyFrom(numpy_helper.from_array(-numpy_helper.to_array(head), head.name))
    onnx.save(graph, str(entry / "model.onnx"))


@pytest.mark.parametrize(
    "damage", ["weights changed", "graph truncated", "meta.json lost", "meta.json garbage"]
)
def test_a_damaged_entry_is_exported_again_not_served(
    damage: str,
    tiny_ce_path: str,
    exported: Path,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A changed ``model.onnx`` that onnxruntime still opens was served with other weights
    (negated scores here); a truncated one failed every load until the folder was deleted by
    hand; an entry folder without ``meta.json`` was exported again at every load and then failed
    to publish ("Directory not empty"). Each is damage now: logged, removed, exported again."""
    want = scores(onnx_spec(tiny_ce_path, exported))
    cache = copy_cache(exported, tmp_path / "cache")
    entry = entry_of(cache)
    if damage == "weights changed":
        _negate_the_head(entry)
    elif damage == "graph truncated":
        graph = entry / "model.onnx"
        graph.write_bytes(graph.read_bytes()[: graph.stat().st_size // 2])
    elif damage == "meta.json lost":
        (entry / "meta.json").unlink()
    else:
        (entry / "meta.json").write_text("{not json", encoding="utf-8")
    before = onnx_backend.export_count()
    with caplog.at_level(logging.WARNING, logger="rag_rerank_plugins"):
        assert scores(onnx_spec(tiny_ce_path, cache)) == pytest.approx(want, abs=1e-6)
    assert onnx_backend.export_count() == before + 1
    assert "is damaged" in caplog.text
    assert str(entry) in caplog.text
    assert _onnx_common.entry_damage(entry) is None  # the new export is intact
    assert [p.name for p in cache.iterdir()] == [entry.name]  # no scratch or trash left
    assert scores(onnx_spec(tiny_ce_path, cache)) == pytest.approx(want, abs=1e-6)
    assert onnx_backend.export_count() == before + 1  # and then served


def test_an_entry_of_an_earlier_release_without_hashes_is_still_served(
    tiny_ce_path: str, exported: Path, tmp_path: Path
) -> None:
    cache = copy_cache(exported, tmp_path / "cache")
    meta_path = entry_of(cache) / "meta.json"
    meta = json.loads(meta_path.read_text(encoding="utf-8"))
    assert set(meta.pop("sha256")) == {"model.onnx", "tokenizer.json"}
    meta_path.write_text(json.dumps(meta), encoding="utf-8")
    before = onnx_backend.export_count()
    assert scores(onnx_spec(tiny_ce_path, cache)) == scores(onnx_spec(tiny_ce_path, exported))
    assert onnx_backend.export_count() == before


def test_threads_loading_one_entry_export_it_once(tiny_ce_path: str, tmp_path: Path) -> None:
    """Specs that differ only in what the export does not depend on (threads, labels) share an
    entry: loaded together into an empty cache, each thread exported it (and all but one
    discarded their copy)."""
    cache = tmp_path / "cache"
    specs = [onnx_spec(tiny_ce_path, cache, intra_op_threads=n) for n in (1, 2)]
    results: dict[int, list[float]] = {}
    errors: list[BaseException] = []
    before = onnx_backend.export_count()

    def run(i: int) -> None:
        try:
            results[i] = scores(specs[i])
        except BaseException as exc:  # reported below
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(specs))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors
    assert results[0] == results[1]
    assert onnx_backend.export_count() == before + 1
    assert len(list(cache.iterdir())) == 1


# -- options -----------------------------------------------------------------------------------


@pytest.mark.parametrize("value", [1.5, 0.5, "2.5", True, float("nan"), float("inf"), 0, -2])
def test_intra_op_threads_must_be_a_positive_integer(value: Any, tiny_ce_path: str) -> None:
    """``intra_op_threads=1.5`` ran on 1 thread, ``0.5`` failed as "got 0.5" only by luck of
    truncating to 0: a fraction is refused, not truncated."""
    with pytest.raises(ConfigurationError, match="intra_op_threads must be a positive integer"):
        _onnx_common.threads_for(onnx_spec(tiny_ce_path, "/unused", intra_op_threads=value))


def test_intra_op_threads_accepts_integers_as_written(tiny_ce_path: str) -> None:
    for value, want in ((3, 3), ("4", 4), (2.0, 2)):
        spec = onnx_spec(tiny_ce_path, "/unused", intra_op_threads=value)
        assert _onnx_common.threads_for(spec) == want


@pytest.mark.parametrize("value", [5, True, ["/tmp/x"]])
def test_a_cache_dir_that_is_no_path_is_refused_naming_the_option(
    value: Any, tiny_ce_path: str
) -> None:
    """It failed as ModelLoadError("TypeError: expected str, bytes or os.PathLike object")."""
    spec = ModelSpec(tiny_ce_path, backend=BACKEND, options=(("cache_dir", value),))
    with pytest.raises(ConfigurationError, match="cache_dir must be a folder path"):
        ModelPool().get(spec)


# -- OpenVINO: what the compiled model runs ----------------------------------------------------


class _Compiled:
    """A compiled model as the CPU plugin reports it: ``precision`` read back for the hint."""

    def __init__(self, precision: str) -> None:
        self.precision = precision

    def get_property(self, name: str) -> Any:
        values = {"PERFORMANCE_HINT": "THROUGHPUT", "NUM_STREAMS": 2, "INFERENCE_NUM_THREADS": 2}
        if name == "INFERENCE_PRECISION_HINT":
            return SimpleNamespace(get_type_name=lambda: self.precision)
        return values[name]


def _openvino_model(precision: str, dtype: str, ir: str = "float32") -> Any:
    from rag_rerank_plugins.backends._openvino_common import OpenVinoModel

    inner = SimpleNamespace(
        session=SimpleNamespace(compiled=_Compiled(precision)), max_tokens=512, kernels=""
    )
    meta = {"ir": ir, "openvino": "2026.4.1-x", "calibration": {"items": 8}}
    return OpenVinoModel(inner, Path("/unused"), meta, True, dtype)


def test_openvino_stats_say_what_the_cpu_plugin_runs_not_the_hint() -> None:
    """On a CPU without native BF16, ``dtype="bfloat16"`` compiles to FP32 (the plugin reads
    back ``f32``), and stats said BF16 (dtype "bfloat16", kernels "BF16 hint" only)."""
    pytest.importorskip("openvino")
    fallen_back = _openvino_model("f32", "bfloat16")
    assert fallen_back.dtype == "float32"
    assert "BF16 hint, runs F32 (the CPU plugin's choice" in fallen_back.kernels
    native = _openvino_model("bf16", "bfloat16")
    assert native.dtype == "bfloat16"
    assert "BF16 hint, runs BF16 (THROUGHPUT" in native.kernels
    assert "choice" not in native.kernels
    assert _openvino_model("f32", "bfloat16", ir="int8").dtype == "int8"


def test_openvino_precision_is_read_back_from_a_real_compiled_model() -> None:
    """An explicit f32 hint reads back as float32 on every CPU (the host's flags do not matter)."""
    ov = pytest.importorskip("openvino")
    import numpy as np
    from openvino import opset13 as ops

    from rag_rerank_plugins.backends._openvino_common import compile_config, compiled_precision

    x = ops.parameter([1, 4], np.float32, name="x")
    model = ov.Model([ops.matmul(x, ops.constant(np.eye(4, dtype=np.float32)), False, False)], [x])
    compiled = ov.Core().compile_model(model, "CPU", compile_config("float32", 1))
    assert compiled_precision(compiled) == "float32"
    assert compiled_precision(SimpleNamespace()) is None  # a plugin that does not say


# -- the cache inside the model folder; no torch on a cold cache ---------------------------------


def test_a_cache_inside_the_model_folder_is_reused(tiny_ce_path: str, tmp_path: Path) -> None:
    """The model's fingerprint hashed every file under its folder, the cache's own entries
    too: with cache_dir inside the model folder, each load exported again under a new key."""
    model = Path(shutil.copytree(tiny_ce_path, tmp_path / "model"))
    cache = model / "onnx-cache"
    before = onnx_backend.export_count()
    first = scores(onnx_spec(str(model), cache))
    again = scores(onnx_spec(str(model), cache))
    assert onnx_backend.export_count() == before + 1
    assert again == first
    assert len([p for p in cache.iterdir() if not p.name.startswith(".")]) == 1


NO_TORCH = """
import importlib.abc, sys
class NoTorch(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name == "torch" or name.startswith("torch."):
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
sys.meta_path.insert(0, NoTorch())
from rag_rerank_plugins import ModelPool, ModelSpec
from rag_rerank_plugins.exceptions import MissingDependencyError
spec = ModelSpec(sys.argv[1], backend="onnx-cross-encoder", options=(("cache_dir", sys.argv[2]),))
try:
    ModelPool().score_pairs(spec, [("q", "p")])
except MissingDependencyError as exc:
    print("missing", "[st]" in str(exc) or "'st'" in str(exc))
except Exception as exc:
    print("other", type(exc).__name__, exc)
"""


def test_a_cold_cache_without_torch_names_the_extra_to_install(
    tiny_ce_path: str, tmp_path: Path
) -> None:
    """Exporting imported torch before the check that names the 'st' extra, so a user who
    installed only [onnx] got ModelLoadError: No module named 'torch'."""
    import os
    import subprocess
    import sys

    src = str(Path(__file__).resolve().parents[1] / "src")
    done = subprocess.run(
        [sys.executable, "-c", NO_TORCH, tiny_ce_path, str(tmp_path / "cache")],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": src},
        timeout=120,
    )
    assert done.stdout.strip() == "missing True", done.stdout + done.stderr[-1500:]
