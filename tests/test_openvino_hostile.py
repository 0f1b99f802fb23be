"""The OpenVINO backends against a hostile user: calibration input that used to be accepted and
quietly mangled (non-string rows turned into ``"None"``, two-character strings taken as pairs),
too few calibration items, a cache folder that cannot be written, and a ``meta.json`` that lost
fields or file hashes (a KeyError at load, or a changed ``model.bin`` served unchecked).

Offline, on the session's tiny random cross-encoder; each test converts at most twice.
"""

from __future__ import annotations

import errno
import json
import logging
from pathlib import Path
from typing import Any

import pytest

from rag_rerank_plugins import ModelPool, ModelSpec
from rag_rerank_plugins.exceptions import ConfigurationError, ModelLoadError

pytest.importorskip("openvino")
pytest.importorskip("onnxruntime")
pytest.importorskip("sentence_transformers")

from rag_rerank_plugins.backends import _onnx_common, _openvino_common

RERANKER = "openvino-cross-encoder"
EMBEDDER = "openvino-embedder"
PAIRS = [("q", "a short passage"), ("another query", "a longer passage about energy")]


@pytest.fixture(scope="module", autouse=True)
def _fp32(float32_policy: None) -> None:
    """dtype='auto' means float32 here, whatever RAG_RERANK_CPU_BF16 says."""


def ov_spec(path: str, cache: str | Path, backend: str = RERANKER, **kw: Any) -> ModelSpec:
    return ModelSpec(
        path,
        backend=backend,
        dtype="float32",
        options=tuple({"cache_dir": str(cache), **kw}.items()),
    )


def items(value: Any, kind: str = "reranker") -> list[Any]:
    backend = RERANKER if kind == "reranker" else EMBEDDER
    spec = ModelSpec("m", backend=backend, options=(("quantize", "int8"), ("calibration", value)))
    return _openvino_common.calibration_items(spec, kind)


def write_lines(path: Path, rows: list[Any]) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return str(path)


# -- calibration input -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kind", "row"),
    [
        ("reranker", {"query": 5, "passage": None}),
        ("reranker", {"query": ["a", "b"], "passage": "p"}),
        ("reranker", {"query": "q", "passage": {"text": "p"}}),
        ("embedder", {"text": None}),
        ("embedder", {"text": 3.5}),
    ],
)
def test_calibration_file_rows_that_are_not_strings_are_refused(
    kind: str, row: dict[str, Any], tmp_path: Path
) -> None:
    """A row whose fields are not strings was turned into text with ``str()``: INT8 ranges
    calibrated on ``"5"``, ``"None"`` or ``"['a', 'b']"`` without a word. Now the load fails
    naming the file and the line."""
    good = {"query": "q", "passage": "p"} if kind == "reranker" else {"text": "t"}
    path = write_lines(tmp_path / "cal.jsonl", [good, row, good])
    with pytest.raises(ConfigurationError, match=r"line 2: .*must be strings"):
        items(path, kind)


@pytest.mark.parametrize("value", [("ab", "cd"), ["xy"], [("q", "p"), "ab"]])
def test_two_character_strings_are_not_pairs(value: Any) -> None:
    """``"ab"`` is a sequence of two strings: it was taken as the pair ``("a", "b")``."""
    with pytest.raises(ConfigurationError, match=r"sequence of \(query, passage\) pairs"):
        items(value)
    assert items([("q", "p"), ["q2", "p2"]]) == [("q", "p"), ("q2", "p2")]  # tuples and lists


def test_a_folder_is_not_a_calibration_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigurationError, match="is not a file"):
        items(str(tmp_path))


def test_a_calibration_file_with_a_byte_order_mark_is_read(tmp_path: Path) -> None:
    """Windows editors start a UTF-8 file with a BOM: its first line was "not JSON"."""
    path = tmp_path / "cal.jsonl"
    path.write_text('\ufeff{"text": "first"}\n\n  \n{"text": "second"}\n', encoding="utf-8")
    assert items(str(path), "embedder") == ["first", "second"]


def test_too_few_calibration_items_load_with_a_warning(
    tiny_ce_path: str, tmp_path: Path, pool: ModelPool, caplog: pytest.LogCaptureFixture
) -> None:
    """NNCF calibrates on a single pair without complaint, and other inputs' activations are
    then clipped to that pair's ranges: the load says so (and still serves: a tiny set is a
    legitimate choice for a smoke test). An empty set stays refused."""
    calibration = [(f"query {i}", f"passage {i}") for i in range(2)]
    with caplog.at_level("WARNING", logger="rag_rerank_plugins"):
        scores = pool.score_pairs(
            ov_spec(tiny_ce_path, tmp_path, quantize="int8", calibration=calibration), PAIRS
        )
    assert len(scores) == len(PAIRS)
    assert "calibration has 2 item(s), too few" in caplog.text
    with pytest.raises(ConfigurationError, match="non-empty sequence"):
        pool.embed(
            ov_spec(tiny_ce_path, tmp_path, EMBEDDER, quantize="int8", calibration=[]), ["t"]
        )


# -- a cache folder that cannot be written -----------------------------------------------------


def _read_only(monkeypatch: pytest.MonkeyPatch) -> None:
    """Writes into the cache fail as on a read-only mount (tests may run as root, for whom
    ``chmod`` does not stop a write)."""

    def refuse(*args: Any, **kwargs: Any) -> Any:
        raise OSError(errno.EROFS, "Read-only file system", str(args[0] if args else ""))

    monkeypatch.setattr(_openvino_common, "scratch_dir", refuse)
    monkeypatch.setattr(_onnx_common, "scratch_dir", refuse)  # discard_entry's trash folder


def test_a_read_only_cache_serves_its_ir_and_says_how_to_fix_a_missing_one(
    tiny_ce_path: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A verified IR loads from a read-only cache (an image built once, run read-only). One that
    must be converted or replaced there failed with a bare ``OSError: [Errno 30] Read-only file
    system: '.../.tmp-ov-...'``; now the error names the cache folder and the way out."""
    warm = ModelPool()
    want = warm.score_pairs(ov_spec(tiny_ce_path, tmp_path), PAIRS)
    warm.clear()
    (entry,) = tmp_path.glob("ov-*")
    _read_only(monkeypatch)
    pool = ModelPool()
    try:
        assert pool.score_pairs(ov_spec(tiny_ce_path, tmp_path), PAIRS) == want
        assert "IR cache hit" in pool.spec_stats(ov_spec(tiny_ce_path, tmp_path))["kernels"]
        pool.clear()

        bin_file = entry / "model.bin"
        bin_file.write_bytes(bin_file.read_bytes()[:-16])  # truncated: must be replaced
        with pytest.raises(ModelLoadError) as damaged:
            pool.score_pairs(ov_spec(tiny_ce_path, tmp_path), PAIRS)
        assert "remove the damaged OpenVINO IR" in str(damaged.value)
        assert str(tmp_path) in str(damaged.value)
        assert "cache_dir" in str(damaged.value)

        # The INT8 IR of the same model is missing: it must be converted.
        calibration = [(f"query {i}", f"passage {i}") for i in range(8)]
        spec = ov_spec(tiny_ce_path, tmp_path, quantize="int8", calibration=calibration)
        with pytest.raises(ModelLoadError) as missing:
            pool.score_pairs(spec, PAIRS)
        assert "write the OpenVINO IR" in str(missing.value)
        assert "RAG_RERANK_ONNX_CACHE" in str(missing.value)
        assert missing.value.backend == RERANKER
    finally:
        pool.clear()
    assert len(list(tmp_path.glob("ov-*"))) == 1  # nothing half-written beside it


# -- meta.json -------------------------------------------------------------------------------


def _hashes(entry: Path) -> dict[str, str]:
    return {name: _onnx_common.file_sha256(entry / name) for name in ("model.xml", "model.bin")}


@pytest.mark.parametrize("damage", ["fields dropped", "bin hash dropped", "ir changed"])
def test_a_meta_json_that_lost_fields_or_hashes_is_rebuilt(
    damage: str, tiny_ce_path: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """``meta.json`` holding the right hashes but none of the fields the load reads failed every
    load with ``KeyError: 'ir'``; one recording the hash of ``model.xml`` only let a changed
    ``model.bin`` through unchecked (other weights served as the verified IR); one whose fields
    were edited (``"ir": "int8"`` on a float IR) failed with a TypeError. Each is damage: logged,
    removed and converted again."""
    spec = ov_spec(tiny_ce_path, tmp_path, score_mode="raw")
    first = ModelPool()
    want = first.score_pairs(spec, PAIRS)
    first.clear()
    (entry,) = tmp_path.glob("ov-*")
    meta = json.loads((entry / "meta.json").read_text(encoding="utf-8"))
    if damage == "fields dropped":
        meta = {"sha256": _hashes(entry)}
    elif damage == "bin hash dropped":
        data = bytearray((entry / "model.bin").read_bytes())
        middle = len(data) // 2
        data[middle : middle + 256] = bytes(256)  # zeroed weights, same size
        (entry / "model.bin").write_bytes(bytes(data))
        meta["sha256"] = {"model.xml": _hashes(entry)["model.xml"]}
    else:
        meta["ir"] = "int8"
    (entry / "meta.json").write_text(json.dumps(meta), encoding="utf-8")
    builds = _openvino_common.build_count()
    second = ModelPool()
    try:
        with caplog.at_level(logging.WARNING, logger=_openvino_common.__name__):
            assert second.score_pairs(spec, PAIRS) == want
        stats = second.spec_stats(spec)
        assert "IR cache miss" in stats["kernels"]
        assert stats["dtype"] == "float32"
    finally:
        second.clear()
    assert "rebuilding" in caplog.text
    assert _openvino_common.build_count() == builds + 1
    assert _openvino_common._verified(entry) is not None


def test_a_damaged_export_is_not_converted_into_an_ir(
    tiny_ce_path: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A load whose IR is cached never hashes (or needs) the ONNX graph; but when the IR must be
    built, a graph that changed since its export is never converted into an IR every later load
    would trust as verified. It is logged, removed and exported again, as the ONNX backends do
    (before: a hard error asking to delete the folder by hand, after every OpenVINO upgrade)."""
    from rag_rerank_plugins.backends import onnx as onnx_backend

    spec = ov_spec(tiny_ce_path, tmp_path)
    warm = ModelPool()
    want = warm.score_pairs(spec, PAIRS)
    warm.clear()
    (entry,) = [p for p in tmp_path.iterdir() if (p / "model.onnx").exists()]
    with (entry / "model.onnx").open("ab") as fh:
        fh.write(b"\0")  # still parses; no longer the recorded bytes
    pool = ModelPool()
    try:
        assert pool.score_pairs(spec, PAIRS) == want  # the verified IR runs; the graph unread
        pool.clear()
        for ir in tmp_path.glob("ov-*"):
            for f in ir.iterdir():
                f.unlink()
            ir.rmdir()
        exports = onnx_backend.export_count()
        with caplog.at_level(logging.WARNING):
            assert pool.score_pairs(spec, PAIRS) == pytest.approx(want, abs=1e-6)
        assert "is damaged" in caplog.text
        assert onnx_backend.export_count() == exports + 1
    finally:
        pool.clear()


def test_an_int8_ir_is_keyed_by_the_max_length_its_calibration_ran_at(
    tiny_ce_path: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The calibration passes are tokenized at the spec's max_length, but the key left it
    out: whichever load built the IR first decided the other's scores (max |diff| 0.017)."""
    built: list[Path] = []

    def record(spec: Any, inner: Any, final: Path, *args: Any) -> Any:
        built.append(final)
        raise RuntimeError("recorded")

    monkeypatch.setattr(_openvino_common, "_build_ir", record)
    calibration = [("q", f"passage {i}") for i in range(8)]
    for max_length in (24, None, 24):
        spec = ov_spec(tiny_ce_path, tmp_path, quantize="int8", calibration=calibration)
        if max_length is not None:
            spec = ModelSpec(spec.model, backend=RERANKER, dtype="float32",
                             max_length=max_length, options=spec.options)  # fmt: skip
        with pytest.raises(ModelLoadError, match="recorded"):
            ModelPool().get(spec)
    assert built[0] != built[1], "another max_length, another IR"
    assert built[0] == built[2], "the same spec, the same IR"


def test_a_full_disk_while_writing_the_ir_names_the_folder(
    tiny_ce_path: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """OpenVINO's writer fails a full disk as RuntimeError('basic_ios::clear: iostream error'),
    which reached the user as such: no folder, no way out (the ONNX export's OSError did)."""
    import openvino

    def full(*args: Any, **kwargs: Any) -> None:
        raise RuntimeError("basic_ios::clear: iostream error")

    monkeypatch.setattr(openvino, "save_model", full)
    with pytest.raises(ModelLoadError, match=r"cache folder .*free some space") as caught:
        ModelPool().get(ov_spec(tiny_ce_path, tmp_path))
    assert str(tmp_path) in str(caught.value)
    assert not [p for p in tmp_path.rglob(".tmp-*")], "the scratch folder is removed"


@pytest.mark.parametrize(("kind", "good"), [("reranker", ("q", "p")), ("embedder", "text")])
def test_a_bad_calibration_item_is_named_by_its_index(kind: str, good: Any) -> None:
    """One None among 300 pairs: the error quoted only the first 80 characters of the set,
    all of them valid."""
    value = [good] * 300
    value[157] = None
    with pytest.raises(ConfigurationError, match=r"calibration\[157\] is 'None' \(NoneType\)"):
        items(value, kind)


def test_openvino_without_onnxruntime_names_its_own_backend_and_extra(
    tiny_ce_path: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The ONNX twin's MissingDependencyError named 'onnx-cross-encoder', a backend the user
    never asked for."""
    import sys

    from rag_rerank_plugins.exceptions import MissingDependencyError

    monkeypatch.setitem(sys.modules, "onnxruntime", None)
    with pytest.raises(MissingDependencyError) as caught:
        ModelPool().get(ov_spec(tiny_ce_path, tmp_path))
    assert "'openvino-cross-encoder' backend" in str(caught.value)
    assert "rag-rerank-plugins[openvino]" in str(caught.value)
