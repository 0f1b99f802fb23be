"""What the OpenVINO backends share: the IR cache, precision, calibration and the loaded model.

``openvino-cross-encoder`` and ``openvino-embedder`` run the graph of their ONNX twin
(``onnx-cross-encoder``, ``onnx-sentence-transformers``) with OpenVINO instead of onnxruntime.
Why build on the ONNX export rather than beside it: that export already carries everything the
engine relies on and is checked against the torch model before it is published (tokenizer ids,
logits or vectors, the pruned last layer, prompts, pooling, score labels). So the ONNX model
object is loaded through the registry (exported once, with torch; a cached entry loads without)
under :func:`~._onnx_common.deferred_sessions`, so it opens no onnxruntime session; its session
is then set to an OpenVINO compiled model (:class:`OpenVinoSession` answers the same
``run(names, feed)`` and ``get_inputs()`` calls), and its ``prepare`` (tokenizer, passes padded
to the bucket lengths of :mod:`rag_rerank_plugins._shapes` in finer steps, :data:`LENGTH_STEPS`,
so OpenVINO compiles a bounded set of shapes), ``finish`` (labels, activation, pooling) and
long-document window source are used as they are. Load errors of the twin are re-raised naming
the OpenVINO backend (same class).

**The IR cache.** ``openvino.convert_model`` turns the entry's ``model.onnx`` into an IR
(``model.xml`` + ``model.bin``, weights kept in FP32: ``compress_to_fp16=False``), saved beside the
ONNX entry as ``ov-<key>``. The key hashes the ONNX entry's name (itself a hash of the model
files, opset, pruning and kind), the OpenVINO version, the IR mode and, for INT8, the calibration
set. Entries are written in a scratch folder (the permissions of a plain ``mkdir``) and renamed
into place (concurrent processes never see half an IR), their ``meta.json`` records the sha256 of
both files, and every load checks them: a damaged entry (a file changed or missing, a
``meta.json`` unreadable or not what was written) is logged, removed and built again; an entry
that was missing at the first look is looked at again before anything is removed, since another
process may have just published it. Builds of one entry are serialised among threads and
processes (:mod:`._build_lock`), so many threads or worker processes loading at once
convert once: the others wait, then load the published IR. Option ``file_name`` naming the
repository's own IR (``.xml``, sentence-transformers'
``openvino/openvino_model_qint8_quantized.xml``) replaces the conversion with a copy of that IR,
keyed by its contents (:mod:`._repo_file`); at load it must take the tokenizer's inputs and give
[pairs, labels] logits on a probe pair.

**Precision.** The spec's dtype is the compile hint: ``bfloat16`` (what ``dtype="auto"`` means on
CPUs with native BF16, AVX512-BF16 or AMX; the row's ``cpu_bf16`` tells the policy) or
``float32``. ``quantize="int8"`` builds an INT8 IR by NNCF's calibrated static quantization
(``nncf.quantize``, transformer preset) over the ``calibration`` option's pairs or texts, else a
default set of 300 pairs (150 texts for embedders) built from the packaged sample corpus; the
layers NNCF leaves in float run under the dtype's hint. ``calibration`` without
``quantize="int8"`` is a ConfigurationError (it would be ignored).

**Speed** (issue 22). The conversion fuses each attention block of the export into one
``ScaledDotProductAttention`` op (:func:`fuse_attention`: the exporter's NaN guard kept the CPU
plugin from fusing it), and the model is compiled with one stream per core; passes run in the
engine's parallel CPU device workers, a lone pass split over the streams
(:class:`OpenVinoSession`). 1 x 50 SciFact, MiniLM-L6, BF16, 2-core AMX Xeon: 1.9x the speed of
the unfused IR on one two-thread stream (``benchmarks/openvino_ab.py``). ``stats()["kernels"]``
says what runs: the hint (option ``ov_config``'s settings win over ours,
:func:`compile_config`), the precision the CPU plugin chose for it (read back from the compiled
model: a BF16 hint runs FP32 on a CPU without native BF16, and ``stats()["dtype"]`` then says
``float32``), streams x threads, fused blocks.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import shutil
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from importlib import resources
from pathlib import Path
from types import SimpleNamespace
from typing import TYPE_CHECKING, Any

from .._forksafe import ForkSafeLock
from ..exceptions import ConfigurationError, MissingDependencyError, ModelLoadError
from . import load_backend
from ._build_lock import build_lock
from ._common import quantize_mode
from ._onnx_common import (
    deferred_sessions,
    discard_entry,
    entry_bytes,
    entry_damage,
    file_sha256,
    publish,
    scratch_dir,
    threads_for,
)
from ._repo_file import file_option, located
from ._torch_common import import_optional
from .base import ModelProvider, Prepared, Task

if TYPE_CHECKING:
    from ..spec import ModelSpec
    from .base import LoadedModel

__all__ = [
    "FORMAT_VERSION",
    "OpenVinoModel",
    "OpenVinoSession",
    "calibration_items",
    "compiled_precision",
    "load_openvino",
]

logger = logging.getLogger(__name__)

#: Bumped whenever the IR layout or the conversion changes, so old entries are not reused.
#: 2: attention blocks fused into ``ScaledDotProductAttention`` (:func:`fuse_attention`).
FORMAT_VERSION = 2
#: Options the OpenVINO backends read themselves; every other one goes to the ONNX twin.
OWN_OPTIONS = ("quantize", "calibration", "ov_config")
#: The compile hint for each dtype the backends accept.
HINTS = {"bfloat16": "bf16", "float32": "f32"}
#: The compiled model's ``PERFORMANCE_HINT`` (see :func:`compile_config`).
PERFORMANCE_HINT = "THROUGHPUT"
#: Whether the engine may run this backend's passes in its parallel CPU device workers.
PARALLEL_PASSES = True
#: Bucket steps per doubling of the pass length (``_shapes.bucket_length``; torch and ONNX
#: Runtime keep 4): 16-token steps up to 512 instead of 64 above 256. A new shape costs OpenVINO
#: ~4 ms once and ~1 MB that it keeps; padding costs every pass. MiniLM-L6 1 x 50 SciFact, BF16,
#: 2-core AMD EPYC, one process alternating (7 rounds): 4 steps 1520 ms, 8 steps 1459, 16 steps
#: 1436, passes padded to their own longest 1423; XLM-R large 1 x 20: 15.0 -> 14.4 s. Resident
#: memory after every (batch, bucket) shape of a pass: MiniLM +85 MB with 4 steps (60 shapes),
#: +123 MB with 16 (112); XLM-R large (2.9 GB process) +152 MB (56 shapes), +211 MB (100).
LENGTH_STEPS = 16
#: At most this many streams (each holds its own activations); as the engine's at most 8 CPU
#: device workers, so every worker's pass has a stream of its own when all are busy.
MAX_STREAMS = 8

_builds = 0


def build_count() -> int:
    """IRs this process has converted (a cached, verified entry reused does not count)."""
    return _builds


_bindings_lock = ForkSafeLock()
_bindings_ready = False


def warm_bindings() -> None:
    """Initialise, once per process and in one thread, the numpy state of OpenVINO's Python
    bindings; every OpenVINO call of these backends comes after it (:func:`load_openvino`).

    Why: ``_pyopenvino`` builds its element-type <-> numpy dtype maps in C++ function-local
    statics on first use, and building them looks up pybind11's numpy API, which drops the GIL
    while it waits for its ``call_once``. So when two threads touched numpy through the bindings
    for the first time together (the engine's device workers running the first passes of a fresh
    process: ``Tensor.data`` in ``InferRequest.infer``), one held the static's guard and waited
    for the GIL while the other held the GIL and waited for the guard: a process idle forever
    (the rare hang of a fresh process scoring with a cached IR). Built here first, the maps are
    only read afterwards.
    """
    global _bindings_ready
    if _bindings_ready:
        return
    with _bindings_lock:
        if _bindings_ready:
            return
        import numpy as np
        import openvino as ov

        # A Tensor from an array: pybind11's numpy API (outside any static), then the dtype ->
        # element type map; reading it back: the element type -> dtype map.
        ov.Tensor(np.zeros((1, 1), dtype=np.int64)).data  # noqa: B018 (the read is the point)
        _bindings_ready = True


# -- calibration ----------------------------------------------------------------------------


def _sample_corpus() -> list[dict[str, str]]:
    text = (resources.files("rag_rerank_plugins.data") / "sample_corpus.jsonl").read_text("utf-8")
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def default_calibration(kind: str) -> list[Any]:
    """300 (query, passage) pairs, or 150 texts, from the packaged sample corpus: each title as a
    keyword query and as a question, against its own passage and two others (real relevant and
    irrelevant pairs of varied lengths; offline, no download)."""
    rows = _sample_corpus()
    if kind == "embedder":
        return (
            [r["text"] for r in rows]
            + [r["title"] for r in rows]
            + [f"what is known about {r['title'].lower()}?" for r in rows]
        )
    pairs = []
    for i, row in enumerate(rows):
        for query in (row["title"], f"what is known about {row['title'].lower()}?"):
            for j in (i, (i + 7) % len(rows), (i + 23) % len(rows)):
                pairs.append((query, rows[j]["text"]))
    return pairs


#: Fewer calibration items than this get a warning at load: NNCF then takes every activation
#: range from one or two engine passes (8 items each), and scores of inputs unlike them come out
#: clipped. The docs ask for a few hundred items like the traffic. Not refused: a tiny set is a
#: legitimate choice for a smoke test or a narrow domain, and NNCF itself accepts one item.
MIN_CALIBRATION_ITEMS = 8


def _is_pair(item: Any) -> bool:
    """A (query, passage) pair: a 2-sequence of strings that is not itself a string (``"ab"``
    would otherwise pass as the pair ``("a", "b")``)."""
    return (
        isinstance(item, Sequence)
        and not isinstance(item, (str, bytes))
        and len(item) == 2
        and all(isinstance(s, str) for s in item)
    )


def _file_items(path: Path, kind: str) -> list[Any]:
    """The items of a JSON-lines calibration file; a line that is not an object with string
    fields (a number, null, a list) is refused naming the line, not turned into text with
    ``str()``, which calibrated on strings such as ``"None"``."""
    fields = ("query", "passage") if kind == "reranker" else ("text",)
    wanted = " and ".join(repr(f) for f in fields)
    try:
        lines = path.read_text("utf-8-sig").splitlines()  # a BOM (Windows editors) is no JSON
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigurationError(
            f"calibration file {str(path)!r} cannot be read ({type(exc).__name__}: {exc}); "
            "give a readable UTF-8 JSON-lines file."
        ) from None
    items: list[Any] = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except ValueError as exc:
            row, problem = None, f"not JSON ({exc})"
        else:
            problem = "not a JSON object"
        if isinstance(row, dict):
            values = [row.get(f) for f in fields]
            if all(isinstance(v, str) for v in values):
                items.append(tuple(values) if kind == "reranker" else values[0])
                continue
            problem = f"{wanted} must be strings, got {str(row)[:80]!r}"
        raise ConfigurationError(
            f"calibration file {str(path)!r}, line {number}: every line must be a JSON object "
            f"with {wanted} strings; {problem}."
        )
    return items


def calibration_items(spec: ModelSpec, kind: str) -> list[Any]:
    """The INT8 calibration set: option ``calibration`` (a JSON-lines file, or a sequence of
    (query, passage) pairs for rerankers / texts for embedders), else :func:`default_calibration`.
    A file's lines hold ``query`` and ``passage`` (rerankers) or ``text`` (embedders), strings;
    anything else is a ConfigurationError. The size is checked at load
    (:func:`check_calibration_size`)."""
    value = spec.option("calibration")
    if value is None:
        return default_calibration(kind)
    want = "(query, passage) pairs" if kind == "reranker" else "texts"
    how = (
        f"calibration must be a path to a JSON-lines file or a non-empty sequence of {want}; "
        f"got {str(value)[:80]!r}."
    )
    if isinstance(value, (str, Path)):
        path = Path(value).expanduser()
        if not path.exists():
            raise ConfigurationError(f"calibration file {str(path)!r} does not exist. {how}")
        if not path.is_file():
            raise ConfigurationError(f"calibration {str(path)!r} is not a file. {how}")
        items = _file_items(path, kind)
    elif isinstance(value, Sequence) and not isinstance(value, bytes):
        items = list(value)
        good = _is_pair if kind == "reranker" else (lambda t: isinstance(t, str))
        bad = next((i for i, item in enumerate(items) if not good(item)), None)
        if bad is not None:  # named: one bad row of hundreds is otherwise hard to find
            one = "a (query, passage) pair of strings" if kind == "reranker" else "a str"
            raise ConfigurationError(
                f"calibration[{bad}] is {str(items[bad])[:80]!r} ({type(items[bad]).__name__}), "
                f"not {one}. {how}"
            )
        if kind == "reranker":
            items = [(q, p) for q, p in items]
    else:
        items = []
    if not items:
        raise ConfigurationError(how)
    return items


def check_calibration_size(items: list[Any], kind: str) -> None:
    """Warn, at load and before NNCF runs, about a calibration set smaller than
    :data:`MIN_CALIBRATION_ITEMS`: NNCF quantizes such a set without complaint, and the scores
    of inputs unlike it come out clipped."""
    if len(items) < MIN_CALIBRATION_ITEMS:
        want = "(query, passage) pairs" if kind == "reranker" else "texts"
        logger.warning(
            "calibration has %d item(s), too few to calibrate INT8 activation ranges well: give "
            "at least %d %s (a few hundred like your traffic work best), or leave calibration "
            "out for the packaged default set.",
            len(items),
            MIN_CALIBRATION_ITEMS,
            want,
        )


# -- attention --------------------------------------------------------------------------------


def _scalar(output: Any) -> float | None:
    """The value of a one-element ``Constant`` behind ``output``; None for anything else."""
    node = output.get_node()
    if node.get_type_name() != "Constant":
        return None
    value = node.get_data()
    return float(value.reshape(-1)[0]) if value.size == 1 else None


def _scaled(output: Any) -> tuple[Any, float]:
    """``(x, c)`` for ``output = x * c`` with a scalar constant ``c``, else ``(output, 1.0)``."""
    node = output.get_node()
    if node.get_type_name() == "Multiply":
        for i in (0, 1):
            factor = _scalar(node.input_value(i))
            if factor is not None:
                return node.input_value(1 - i), factor
    return output, 1.0


def _no_transpose(node: Any) -> bool:
    attributes = node.get_attributes()
    return not (attributes.get("transpose_a") or attributes.get("transpose_b"))


def fuse_attention(model: Any) -> int:
    """Replace each attention block of the exported graph by one ``ScaledDotProductAttention``
    op; returns how many were replaced.

    Why: torch's ONNX exporter spells ``scaled_dot_product_attention`` with a boolean mask as
    ``MatMul(Q*s, K^T*s) + mask -> Softmax -> Where(IsNaN, 0, .) -> MatMul(., V)``. The NaN guard
    (for rows with every key masked, which a padded encoder batch never has: its first token is
    real) keeps OpenVINO's CPU plugin from fusing the block, so it ran softmax, mask and guard as
    separate passes over the ``[batch, heads, length, length]`` scores: 60 % of a 2 x 512
    MiniLM-L6 pass in BF16, twice the time of every linear layer together. As one op the CPU
    plugin runs each block as one fused kernel (what ``convert_model`` makes of the torch model
    itself): a pass ran ~1.5x faster in BF16 and in FP32 (AMX Xeon, issue 22); scores moved
    by < 2e-7 in FP32. Blocks of any other shape are left as they are.
    """
    import numpy as np
    from openvino import opset13 as ops

    fused = 0
    for softmax in model.get_ordered_ops():
        if softmax.get_type_name() != "Softmax":
            continue
        add = softmax.input_value(0).get_node()
        if add.get_type_name() != "Add":
            continue
        sides = [add.input_value(i) for i in (0, 1)]
        pick = [i for i in (0, 1) if sides[i].get_node().get_type_name() == "MatMul"]
        if len(pick) != 1 or not _no_transpose(scores := sides[pick[0]].get_node()):
            continue
        mask = sides[1 - pick[0]]
        (query, q_scale), (key_t, k_scale) = (_scaled(scores.input_value(i)) for i in (0, 1))
        if query.get_partial_shape().rank.get_length() != 4:
            continue
        weights = softmax.output(0)
        users = [t.get_node() for t in weights.get_target_inputs()]
        guard = [u for u in users if u.get_type_name() == "IsNaN"]
        if guard:  # Where(IsNaN(w), 0, w): take the Where's output as the weights
            where = [t.get_node() for t in guard[0].output(0).get_target_inputs()]
            if len(where) != 1 or where[0].get_type_name() != "Select":
                continue
            if where[0].input_value(2) != weights or len(users) != 2:
                continue
            weights = where[0].output(0)
            users = [t.get_node() for t in weights.get_target_inputs()]
        if len(users) != 1 or users[0].get_type_name() != "MatMul":
            continue
        product = users[0]
        if product.input_value(0) != weights or not _no_transpose(product):
            continue
        key = ops.transpose(key_t, ops.constant(np.array([0, 1, 3, 2], dtype=np.int64)))
        attention = ops.scaled_dot_product_attention(
            query,
            key,
            product.input_value(1),
            mask,
            ops.constant(np.float32(q_scale * k_scale)),
            causal=False,
            name=f"{product.get_friendly_name()}/sdpa",
        )
        product.output(0).replace(attention.output(0))
        fused += 1
    if fused:
        model.validate_nodes_and_infer_types()
    return fused


# -- the IR cache -----------------------------------------------------------------------------


#: The IR's files, whose sha256 every entry's ``meta.json`` must record.
IR_FILES = ("model.xml", "model.bin")


def _verified(
    entry: Path, *, log: bool = True, expect: dict[str, Any] | None = None
) -> dict[str, Any] | None:
    """The entry's meta when both files match the hashes it recorded (and its fields match
    ``expect``, the meta the key was made of); None when it is missing or damaged (a damaged one
    is logged, unless ``log`` is False). A meta.json that lost a field the load reads (``ir``,
    ``openvino``, ``calibration``) or a file's hash is damage too: it failed the load with a
    KeyError, or let a changed file through unchecked, until the folder was deleted by hand."""
    warn = logger.warning if log else logger.debug
    try:
        meta = json.loads((entry / "meta.json").read_text("utf-8"))
    except FileNotFoundError:
        if entry.is_dir() and any(entry.iterdir()):  # files without their record: damage
            warn("rag-rerank: OpenVINO IR %s lost its meta.json: rebuilding", entry)
        return None
    except (OSError, ValueError) as exc:
        warn("rag-rerank: OpenVINO IR %s has an unreadable meta.json (%s): rebuilding", entry, exc)
        return None
    hashes = meta.get("sha256") if isinstance(meta, dict) else None
    if not isinstance(hashes, dict) or not set(IR_FILES) <= set(hashes):
        warn(
            "rag-rerank: OpenVINO IR %s is damaged (meta.json %s records no file hashes): "
            "rebuilding",
            entry,
            str(meta)[:80],
        )
        return None
    for name, want in hashes.items():
        try:
            got = file_sha256(entry / str(name))
        except OSError:
            got = "missing"
        if got != want:
            warn(
                "rag-rerank: OpenVINO IR %s is damaged (%s: sha256 %s, recorded %s): rebuilding",
                entry,
                name,
                got[:12],
                str(want)[:12],
            )
            return None
    wrong = sorted(k for k, v in (expect or {}).items() if k != "model" and meta.get(k) != v)
    if wrong:
        warn(
            "rag-rerank: OpenVINO IR %s is damaged (meta.json: %s not what was written): "
            "rebuilding",
            entry,
            ", ".join(wrong),
        )
        return None
    return meta


def _convert(inner: Any, final: Path, meta: dict[str, Any], calibration: list[Any]) -> None:
    """``inner``'s ONNX graph to an IR in ``final`` (atomically), NNCF-quantized when asked."""
    global _builds
    import openvino as ov

    start = time.perf_counter()
    model = ov.convert_model(str(inner.path / "model.onnx"))
    meta["fused_attention"] = fuse_attention(model)
    if meta["ir"] == "int8":
        nncf = import_optional("nncf", "nncf", "openvino", "INT8 quantization with OpenVINO")
        task = Task("score") if inner.kind == "reranker" else Task("embed")
        feeds = []
        for begin in range(0, len(calibration), 8):  # passes as the engine cuts them
            payload = inner.prepare(task, calibration[begin : begin + 8]).payload
            feeds.append(payload if inner.kind == "reranker" else payload[0])
        model = nncf.quantize(
            model,
            nncf.Dataset(feeds),
            model_type=nncf.ModelType.TRANSFORMER,
            subset_size=len(feeds),
        )
    tmp = scratch_dir(final.parent, f".tmp-{final.name}-")
    try:
        try:
            ov.save_model(model, str(tmp / "model.xml"), compress_to_fp16=False)
        except RuntimeError as exc:
            # OpenVINO's C++ writer fails a full disk or a refused write as a RuntimeError
            # ("basic_ios::clear: iostream error"), which _writable would not name.
            if not any(word in str(exc).lower() for word in ("iostream", "write", "open")):
                raise
            raise OSError(f"OpenVINO could not write the IR ({exc})") from exc
        meta["sha256"] = {name: file_sha256(tmp / name) for name in ("model.xml", "model.bin")}
        (tmp / "meta.json").write_text(json.dumps(meta, indent=1), encoding="utf-8")
        publish(tmp, final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    _builds += 1
    logger.info(
        "rag-rerank: converted %s to an OpenVINO IR (%s) in %.1fs: %s",
        meta["model"],
        meta["ir"],
        time.perf_counter() - start,
        final,
    )


def _prebuilt(spec: ModelSpec, kind: str, ir: str) -> tuple[Path, str] | None:
    """Option ``file_name`` naming the repository's own IR (``.xml``; sentence-transformers'
    ``openvino/openvino_model_qint8_quantized.xml``): its local path and cache-key part
    (:func:`._repo_file.located`). An ``.onnx``
    name goes to the ONNX twin (None here), which runs that file's graph."""
    name = file_option(spec, (".onnx", ".xml"))
    if name is None or not name.endswith(".xml"):
        return None
    if ir == "int8":
        raise ConfigurationError(
            f"file_name={name!r} and quantize='int8': the repository's IR is run as it is "
            "(openvino_model_qint8_quantized.xml is INT8 already); give one of them."
        )
    return located(spec, name)


def _copy_ir(source: Path, final: Path, meta: dict[str, Any]) -> None:
    """The repository's IR (``source`` and its ``.bin``) into ``final`` (atomically), once
    OpenVINO has read it: a file it cannot read is never published."""
    global _builds
    import openvino as ov

    model = ov.Core().read_model(str(source))
    meta["fused_attention"] = None  # run as it is
    meta["output"] = None
    unnamed = len(model.outputs) == 1 and not model.outputs[0].get_names()
    if unnamed:  # e.g. converted straight from a torch module: name it to read it
        model.outputs[0].get_tensor().set_names({"logits"})
    if len(model.outputs) == 1:
        meta["output"] = model.outputs[0].get_any_name()
    tmp = scratch_dir(final.parent, f".tmp-{final.name}-")
    try:
        if unnamed:
            ov.save_model(model, str(tmp / "model.xml"), compress_to_fp16=False)
        else:
            shutil.copyfile(source, tmp / "model.xml")
            shutil.copyfile(source.with_suffix(".bin"), tmp / "model.bin")
        meta["sha256"] = {name: file_sha256(tmp / name) for name in IR_FILES}
        (tmp / "meta.json").write_text(json.dumps(meta, indent=1), encoding="utf-8")
        publish(tmp, final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    _builds += 1
    logger.info("rag-rerank: cached %s's own OpenVINO IR %s: %s", meta["model"], source, final)


def has_fake_quantize(xml: Path) -> bool:
    """Whether an IR is statically quantized (NNCF / POT INT8 IRs carry ``FakeQuantize`` ops).
    Read from the graph file, a few MB at most (the weights are in ``model.bin``)."""
    try:
        with xml.open("rb") as f:
            return any(b'type="FakeQuantize"' in line for line in f)
    except OSError:
        return False


def _check_prebuilt(spec: ModelSpec, inner: Any, meta: dict[str, Any]) -> None:
    """Point the twin's ``forward`` at the IR's output, and check on one probe that it gives
    what the twin's ``finish`` reads: a cross-encoder's logits ([pairs, labels]), an embedder's
    token vectors ([texts, tokens, dimension]). Another task's IR would otherwise be read as
    scores or vectors."""
    import numpy as np

    name = spec.option("file_name")
    if not meta.get("output"):
        raise ConfigurationError(
            f"file_name={name!r}: that IR has several outputs; a cross-encoder's has one (its "
            "logits), an embedder's one (its token vectors)."
        )
    inner.output = meta["output"]
    names = [port.name for port in inner.session.get_inputs()]
    known = ("input_ids", "attention_mask", "token_type_ids")
    if "input_ids" not in names or not set(names) <= set(known):
        raise ConfigurationError(
            f"file_name={name!r}: that IR's inputs are {names}; the model's tokenizer gives "
            f"{list(known)} (token_type_ids where the model has them)."
        )
    inner._feed_names = names  # the IR's own inputs (optimum drops unused token types)
    if inner.kind == "reranker":
        task = Task("score")
        got = np.asarray(inner.forward(task, inner.prepare(task, [("a query", "a passage")])))
        labels = int(getattr(inner, "num_labels", 1))
        if got.shape != (1, labels) and not (labels == 1 and got.shape == (1,)):
            raise ConfigurationError(
                f"file_name={name!r}: that IR gives {list(got.shape)} for one pair, not a "
                f"cross-encoder's [1, {labels}] logits; name the reranker's IR."
            )
        return
    task = Task("embed")
    tokens = np.asarray(inner.forward(task, inner.prepare(task, ["a text"]))[0])
    dimension = int(inner.meta["dimension"])
    if tokens.ndim != 3 or tokens.shape[0] != 1 or tokens.shape[2] != dimension:
        raise ConfigurationError(
            f"file_name={name!r}: that IR gives {list(tokens.shape)} for one text, not the "
            f"embedder's token vectors [1, tokens, {dimension}]; name the embedder's IR."
        )


@contextlib.contextmanager
def _writable(spec: ModelSpec, final: Path, doing: str) -> Iterator[None]:
    """An OSError writing the cache (a read-only folder or file system, a full disk) as a
    ModelLoadError that names the folder and the way out, not a bare ``[Errno 30] Read-only file
    system: '.../.tmp-ov-...'``. A cache holding a verified IR loads read-only: nothing is
    written then."""
    try:
        yield
    except OSError as exc:
        raise ModelLoadError(
            spec.model,
            spec.backend,
            f"cannot {doing} in the cache folder {str(final.parent)!r} "
            f"({type(exc).__name__}: {exc}). Make it writable (and free some space), or point "
            "option cache_dir or RAG_RERANK_ONNX_CACHE at a writable folder; a folder that "
            "already holds this model's verified IR is only read.",
        ) from exc


def _ir_entry(
    spec: ModelSpec,
    inner: Any,
    ir: str,
    calibration: list[Any],
    prebuilt: tuple[Path, str] | None = None,
) -> tuple[Path, dict[str, Any], bool]:
    """The verified IR entry for ``spec`` (built first when missing or damaged: converted from
    the twin's graph, or the repository's own IR copied, ``prebuilt``), its meta, and whether it
    was a cache hit."""
    import openvino as ov

    calibration_key = hashlib.sha256(json.dumps(calibration).encode()).hexdigest()
    meta = {
        "format": FORMAT_VERSION,
        "model": spec.model,
        "onnx_entry": inner.path.name,
        "openvino": ov.__version__,
        "ir": ir,
        # The calibration passes are tokenized at the spec's max_length: another one
        # calibrates other activations, so it is another IR.
        "calibration": {
            "items": len(calibration),
            "sha256": calibration_key,
            "max_length": spec.max_length,
        }
        if calibration
        else None,
    }
    if prebuilt is not None:  # a key of its own per file and contents
        meta["file"] = prebuilt[1]
    key = hashlib.sha256(
        json.dumps({k: v for k, v in meta.items() if k != "model"}, sort_keys=True).encode()
    ).hexdigest()[:32]
    final = inner.path.parent / f"ov-{key}"
    found = _verified(final, log=False, expect=meta)
    if found is not None:
        return final, found, True
    with build_lock(final, "OpenVINO IR"):
        return _build_ir(spec, inner, final, meta, calibration, prebuilt)


class _TwinDamaged(Exception):
    """The ONNX twin's entry was damaged and has been removed: load the twin again."""


def _load_twin(spec: ModelSpec, twin_spec: ModelSpec, provider: Any) -> LoadedModel:
    try:
        with deferred_sessions():  # the compiled IR replaces the session: never open it
            return load_backend(twin_spec, provider)
    except ModelLoadError as exc:
        raise _named(exc, spec.backend) from exc.__cause__
    except MissingDependencyError as exc:  # name the backend asked for, and its extra
        broken = exc.__cause__ if "cannot be imported" in str(exc) else None
        raise MissingDependencyError(
            exc.package, "openvino", f"The {spec.backend!r} backend", broken=broken
        ) from exc


def _build_ir(
    spec: ModelSpec,
    inner: Any,
    final: Path,
    meta: dict[str, Any],
    calibration: list[Any],
    prebuilt: tuple[Path, str] | None,
) -> tuple[Path, dict[str, Any], bool]:
    """The IR entry ``final``, missing or damaged at the first look, built under
    :func:`._build_lock.build_lock`: a process that waited for another's conversion finds it
    published here and converts nothing."""
    if final.exists():
        # Published by another process since the first look, or damaged: look again (with the
        # warning this time) before removing anything.
        found = _verified(final, expect=meta)
        if found is not None:
            return final, found, True
        with _writable(spec, final, "remove the damaged OpenVINO IR"):
            discard_entry(final)
    # The twin was opened without hashing its graph (deferred sessions): check it now,
    # before converting it into an IR that every later load would trust.
    damage = entry_damage(inner.path)
    if damage is not None:
        # As the ONNX backends do with a damaged entry: logged, removed, exported again (by
        # load_openvino, which loads the twin anew); never converted into an IR.
        logger.warning(
            "rag-rerank: the ONNX export %s is damaged (%s): removing it and exporting again",
            inner.path,
            damage,
        )
        with _writable(spec, final, "remove the damaged ONNX export"):
            discard_entry(inner.path)
        raise _TwinDamaged(str(damage))
    with _writable(spec, final, "write the OpenVINO IR"):
        if prebuilt is not None:
            _copy_ir(prebuilt[0], final, dict(meta))
        else:
            _convert(inner, final, dict(meta), calibration)
    found = _verified(final, expect=meta)
    if found is None:
        raise ModelLoadError(spec.model, spec.backend, f"the OpenVINO IR {final} is damaged")
    return final, found, False


# -- the runtime ----------------------------------------------------------------------------


class OpenVinoSession:
    """An OpenVINO compiled model behind onnxruntime's ``run(output_names, feed)`` call, so the
    ONNX models' ``forward`` runs it unchanged. Outputs are copies (the engine finishes pass k
    after launching pass k+1).

    The model is compiled with one stream per core, up to :data:`MAX_STREAMS`
    (:func:`compile_config`), and each calling thread (an engine device worker) holds its own
    infer requests. A thread runs a pass on as many streams as its share of the cores hold
    (:meth:`bind`, from the engine's ``bind_worker_thread``; default: every stream): the pass's
    rows are split into that many slices, run at once and joined. So a lone pass still gets
    every core, and passes that run together get a stream each, where a one-stream model ran
    them one after the other. Results do not depend on the split (each row is computed alone;
    measured identical).
    """

    def __init__(self, compiled: Any, streams: int, threads: int) -> None:
        warm_bindings()  # before any pass of any thread (see there)
        self.compiled = compiled
        self.streams = max(1, streams)
        self.threads = max(1, threads)
        self._local = threading.local()

    def bind(self, threads: int) -> None:
        """Run this thread's passes with ``threads`` of the model's threads: on that many
        threads' worth of streams (at least one, at most every stream)."""
        share = threads * self.streams // self.threads
        self._local.share = max(1, min(share, self.streams))

    def get_inputs(self) -> list[Any]:
        """The compiled model's inputs, as onnxruntime's session lists them (``.name``)."""
        return [SimpleNamespace(name=port.get_any_name()) for port in self.compiled.inputs]

    def _requests(self, count: int) -> list[Any]:
        requests: list[Any] = getattr(self._local, "requests", None) or []
        while len(requests) < count:
            requests.append(self.compiled.create_infer_request())
        self._local.requests = requests
        return requests[:count]

    def run(self, names: Sequence[str], feed: dict[str, Any]) -> list[Any]:
        rows = len(next(iter(feed.values())))
        parts = min(getattr(self._local, "share", self.streams), rows)
        requests = self._requests(max(1, parts))
        if parts <= 1:
            results = requests[0].infer(feed, share_outputs=False)
            return [results[name] for name in names]
        import numpy as np

        bounds = [rows * i // parts for i in range(parts + 1)]
        for i, request in enumerate(requests):
            request.start_async({k: v[bounds[i] : bounds[i + 1]] for k, v in feed.items()})
        for request in requests:
            request.wait()
        return [
            np.concatenate([request.get_tensor(name).data for request in requests])
            for name in names
        ]


def compile_config(
    dtype: str, threads: int, user: Mapping[str, Any] | None = None
) -> dict[str, Any]:
    """The CPU plugin's settings: the dtype's precision hint and ``threads`` threads shared by
    one stream per core, at most :data:`MAX_STREAMS` (:class:`OpenVinoSession` spreads a lone
    pass over them). Single-threaded streams ran 1 x 50 SciFact requests ~1.25x faster than one
    stream of two threads on 2 cores (issue 22, ``benchmarks/openvino_ab.py``).

    ``user`` is option ``ov_config`` (sentence-transformers' ``ov_config``, its precision hint
    already read as ``dtype``): its settings win over ours, as they would in
    ``OVModel.from_pretrained(ov_config=...)``. A ``PERFORMANCE_HINT`` of its own drops our
    stream count, which only our hint implies."""
    config: dict[str, Any] = {
        "INFERENCE_PRECISION_HINT": HINTS[dtype],
        "PERFORMANCE_HINT": PERFORMANCE_HINT,
        "INFERENCE_NUM_THREADS": threads,
    }
    if PERFORMANCE_HINT == "THROUGHPUT":
        config["NUM_STREAMS"] = max(1, min(threads, MAX_STREAMS))
    user = dict(user or {})
    user.pop("INFERENCE_PRECISION_HINT", None)  # read as dtype by the adapters (_stock)
    if "PERFORMANCE_HINT" in user and "NUM_STREAMS" not in user:
        config.pop("NUM_STREAMS", None)
    config.update(user)
    return config


def _compile(spec: ModelSpec, entry: Path, dtype: str, threads: int) -> Any:
    import openvino as ov

    user = _ov_config(spec)
    config = compile_config(dtype, threads, user)
    try:
        return ov.Core().compile_model(str(entry / "model.xml"), "CPU", config)
    except Exception as exc:
        if not user:
            raise
        raise ConfigurationError(  # the user's settings, not a damaged IR
            f"OpenVINO refused ov_config={user!r} ({type(exc).__name__}: "
            f"{str(exc).strip()[:300]}); fix or drop those settings."
        ) from exc


def _ov_config(spec: ModelSpec) -> dict[str, Any]:
    """Option ``ov_config``: OpenVINO compile settings (a dict of property names)."""
    value = spec.option("ov_config")
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise ConfigurationError(
            f"ov_config={value!r} must be a dict of OpenVINO properties, e.g. "
            "{'PERFORMANCE_HINT': 'LATENCY'}."
        )
    config = {str(k): v for k, v in value.items()}
    hint = config.get("INFERENCE_PRECISION_HINT")
    if hint is not None and str(hint).lower() != HINTS.get(spec.dtype):
        # The adapters read sentence-transformers' hint as dtype; given here it must agree.
        raise ConfigurationError(
            f"ov_config's INFERENCE_PRECISION_HINT={hint!r} contradicts dtype={spec.dtype!r}: "
            "the precision is the dtype here ('float32': f32, 'bfloat16': bf16); set dtype "
            "and drop the hint."
        )
    return config


def describe_compiled(compiled: Any) -> str:
    """What the compiled model runs with, as the CPU plugin reports it (for ``stats()``)."""
    found = {}
    for name in ("PERFORMANCE_HINT", "NUM_STREAMS", "INFERENCE_NUM_THREADS"):
        try:
            found[name] = str(compiled.get_property(name))
        except Exception:  # a plugin without the property: say so, run anyway
            found[name] = "?"
    try:
        each = f"{int(found['INFERENCE_NUM_THREADS']) // max(1, int(found['NUM_STREAMS']))}"
    except ValueError:
        each = "?"
    return f"{found['PERFORMANCE_HINT']}, {found['NUM_STREAMS']} stream(s) x {each} thread(s)"


#: OpenVINO element type names (``Type.get_type_name()``) as this package's dtype names.
_PRECISIONS = {"bf16": "bfloat16", "f32": "float32", "f16": "float16"}


def compiled_precision(compiled: Any) -> str | None:
    """The precision the compiled model really runs its float layers in, as the CPU plugin
    reports it after compiling (``INFERENCE_PRECISION_HINT`` read back: a ``bf16`` hint on a CPU
    without native BF16 reads back ``f32``), as a dtype name; None where the plugin does not
    say."""
    try:
        value = compiled.get_property("INFERENCE_PRECISION_HINT")
    except Exception:  # a plugin without the property: the hint is all we know
        return None
    name = value.get_type_name() if hasattr(value, "get_type_name") else str(value)
    return _PRECISIONS.get(str(name).strip().lower())


class OpenVinoModel:
    """The ONNX twin's loaded model with an OpenVINO session: its phases, run as they are.
    Mixed in before ``RerankerModel`` / ``EmbedderModel`` by the two backend modules."""

    inner: Any
    device = "cpu"
    #: A compiled model's stream executors hang in a forked child (stock OpenVINO with our
    #: THROUGHPUT streams too): the child reloads it from the IR cache instead.
    fork_safe = False

    def __init__(
        self, inner: Any, entry: Path, meta: dict[str, Any], hit: bool, dtype: str
    ) -> None:
        self.inner = inner
        self.entry = entry
        session = getattr(inner, "session", None)
        compiled = getattr(session, "compiled", None)
        # What the CPU plugin chose, not what was asked: a BF16 hint runs FP32 without native
        # BF16, and stats said BF16 (an explicit dtype="bfloat16" on such a CPU).
        runs = compiled_precision(compiled) if compiled is not None else None
        # A repository's IR (file_name) may be INT8 already (sentence-transformers'
        # openvino_model_qint8_quantized.xml): its FakeQuantize ops say so, not our meta.
        prebuilt_int8 = bool(meta.get("file")) and has_fake_quantize(entry / "model.xml")
        self.dtype = "int8" if meta["ir"] == "int8" or prebuilt_int8 else (runs or dtype)
        self.max_tokens = inner.max_tokens
        self.ir_cache_hit = hit
        # Passes run in the engine's parallel CPU device workers, one infer request per thread
        # (the twin's forward and finish keep no state between calls).
        self.parallel_forward = PARALLEL_PASSES
        calibrated = (
            f", INT8 by NNCF on {meta['calibration']['items']} calibration items"
            if meta["ir"] == "int8"
            else ""
        )
        fused = int(meta.get("fused_attention") or 0)
        attention = f", {fused} attention blocks fused" if fused else ""
        extra = f", {inner.kernels}" if inner.kernels else ""
        built = "converted"
        if meta.get("file"):  # the repository's IR runs, not the twin's graph it describes
            extra, built = f", the repository's IR {meta['file'].split(':')[0]}, as it is", "copied"
            if prebuilt_int8:
                extra += " (INT8: FakeQuantize ops)"
        version = meta["openvino"].split("-")[0]
        streams = f" ({describe_compiled(compiled)})" if compiled is not None else ""
        precision = ""
        if runs is not None:
            precision = f", runs {HINTS.get(runs, runs).upper()}"
            if runs != dtype:
                precision += " (the CPU plugin's choice: the hint is not native on this CPU)"
        self.kernels = (
            f"OpenVINO {version} CPU, {HINTS[dtype].upper()} hint{precision}{streams}"
            f"{calibrated}{attention}, IR cache {'hit' if hit else f'miss ({built})'}{extra}"
        )

    def prepare(self, task: Task, items: Sequence[Any]) -> Prepared:
        return self.inner.prepare(task, items)

    def forward(self, task: Task, batch: Prepared) -> Any:
        return self.inner.forward(task, batch)

    def finish(self, task: Task, pending: Any) -> list[Any]:
        return self.inner.finish(task, pending)

    def bind_worker_thread(self, threads: int) -> None:
        session = getattr(self.inner, "session", None)
        if isinstance(session, OpenVinoSession):
            session.bind(threads)

    def footprint_bytes(self) -> int | None:
        return sum(f.stat().st_size for f in self.entry.glob("model.*")) or entry_bytes(self.entry)

    def close(self) -> None:
        self.inner.close()


def _named(exc: ModelLoadError, backend: str) -> ModelLoadError:
    """``exc`` (its class, e.g. ModelNotFoundError, and its reason) as raised by ``backend``: the
    twin's load errors name the backend the user asked for, not the ONNX twin."""
    renamed = type(exc).__new__(type(exc))
    renamed.__dict__.update(exc.__dict__)
    renamed.backend = backend
    message = str(exc.args[0]) if exc.args else ""
    old, new = f"with backend {exc.backend!r}", f"with backend {backend!r}"
    renamed.args = (message.replace(old, new, 1),)
    return renamed


def load_openvino(
    spec: ModelSpec, provider: ModelProvider, twin: str, kind: str
) -> tuple[Any, Path, dict[str, Any], bool, str]:
    """Load ``spec``'s ONNX ``twin`` (exported first if needed), make sure its IR is cached, and
    swap the twin's session for the compiled IR. Returns (twin model, entry, meta, cache hit,
    dtype hint) for the backend module's class."""
    import_optional("openvino", "openvino", "openvino", f"The {spec.backend!r} backend")
    warm_bindings()  # before converting, compiling or running anything (see there)
    if spec.device != "cpu":
        raise ConfigurationError(
            f"The {spec.backend!r} backend runs on the CPU (OpenVINO's CPU plugin); "
            f"device={spec.device!r} was requested. Use device='cpu' or 'auto'."
        )
    if spec.dtype not in HINTS:
        raise ConfigurationError(
            f"dtype={spec.dtype!r}: the {spec.backend!r} backend runs 'bfloat16' (CPUs with "
            "AVX512-BF16 or AMX), 'float32', or 'auto' (the first where native, else the second); "
            "int8 with model_kwargs={'quantize': 'int8'}."
        )
    threads = threads_for(spec)
    _ov_config(spec)  # a malformed ov_config fails before any export or conversion
    ir = "int8" if quantize_mode(spec.option("quantize")) else "float32"
    if ir != "int8" and spec.option("calibration") is not None:
        raise ConfigurationError(
            "calibration is the INT8 calibration set and is used only with quantize='int8': "
            "add quantize='int8' to the options (model_kwargs={'quantize': 'int8', "
            "'calibration': ...}) or leave calibration out."
        )
    calibration = calibration_items(spec, kind) if ir == "int8" else []
    if spec.option("calibration") is not None:
        check_calibration_size(calibration, kind)
    prebuilt = _prebuilt(spec, kind, ir)
    own = (*OWN_OPTIONS, "file_name") if prebuilt else OWN_OPTIONS
    options = {k: v for k, v in spec.options_dict.items() if k not in own}
    twin_spec = spec.with_options(backend=twin, dtype="float32", options=options)
    inner = _load_twin(spec, twin_spec, provider)
    try:
        try:
            entry, meta, hit = _ir_entry(spec, inner, ir, calibration, prebuilt)
        except _TwinDamaged:  # removed: export it again, once
            inner.close()
            inner = _load_twin(spec, twin_spec, provider)
            entry, meta, hit = _ir_entry(spec, inner, ir, calibration, prebuilt)
        try:
            compiled = _compile(spec, entry, spec.dtype, threads)
        except ConfigurationError:
            raise
        except Exception as exc:
            logger.warning(
                "rag-rerank: OpenVINO IR %s does not compile (%s): rebuilding", entry, exc
            )
            discard_entry(entry)
            entry, meta, hit = _ir_entry(spec, inner, ir, calibration, prebuilt)
            compiled = _compile(spec, entry, spec.dtype, threads)
    except BaseException:
        inner.close()
        raise
    inner.length_steps = LENGTH_STEPS  # type: ignore[attr-defined]
    inner.session = OpenVinoSession(  # type: ignore[attr-defined]
        compiled,
        int(compiled.get_property("NUM_STREAMS")),
        int(compiled.get_property("INFERENCE_NUM_THREADS")),
    )
    if prebuilt is not None:  # the repository's IR: its own names, checked on a probe
        try:
            _check_prebuilt(spec, inner, meta)
        except BaseException:
            inner.close()
            raise
    logger.info(
        "rag-rerank: OpenVINO %s for %s, %s hint, runs %s, %d thread(s) (IR %s, %s)",
        meta["ir"],
        spec.model,
        HINTS[spec.dtype],
        compiled_precision(compiled) or "?",
        threads,
        entry,
        "cached" if hit else "converted",
    )
    return inner, entry, meta, hit, spec.dtype
