"""ONNX Runtime cross-encoder backend (``backend="onnx-cross-encoder"``, extra ``onnx``).

The model is exported once with ``torch.onnx.export`` (TorchScript exporter; dynamic batch and
sequence axes) into a cache directory and run with onnxruntime's CPU execution provider. Scores
are ``CrossEncoder.predict``'s: the same tokenizer, the same logits, the same activation.

**The export cache.** One entry per (model files, mode, opset, format version) under
``RAG_RERANK_ONNX_CACHE`` or option ``cache_dir`` (default ``~/.cache/rag-rerank-plugins/onnx``).
The key hashes every file of the model folder: path, size and modification time of each file,
plus the full contents of files under 4 MiB (config, tokenizer), so a changed model exports
again and an unchanged one is reused by every later process. An entry is written in a temporary
directory and renamed into place, so concurrent processes never see half an export (the loser
of a race discards its copy). An entry holds ``model.onnx``, the tokenizer as ``tokenizer.json``
and ``meta.json`` (activation, input names, truncation and padding settings). Exporting needs
the ``st`` extra (torch, sentence-transformers); loading a cached entry needs only onnxruntime
and ``tokenizers``, never torch, so a second process starts in a fraction of the torch load.
Every export is checked before it is published: token ids against ``CrossEncoder.preprocess``
and logits against the torch model on probe pairs.

**Modes** (option ``quantize``): absent = float32; ``"int8"`` = onnxruntime dynamic
quantization of every MatMul (int8 per-channel weights, activations quantized per pass; signed
weights and per-channel were the fastest and most accurate of the variants measured, see
docs/onnx.md). ``dtype`` must be ``"float32"`` (or ``"auto"``): onnxruntime's CPU provider has no
fast FP16/BF16 matmuls on x86, so those requests are refused rather than run slowly.

**Threads.** Intra-op threads = option ``intra_op_threads``, else ``RAG_RERANK_ORT_THREADS``,
else the physical cores this process may use (affinity mask and cgroup quota; SMT siblings count
once). Inter-op threads = 1 (the graph is a chain). Spinning is off, so an idle model does not
burn the cores of a shared box. The choice is logged at load and kept in
:attr:`OnnxCrossEncoder.threads`.

Two phases: ``prepare`` tokenises into int64 numpy arrays (the prepare thread owns the
tokenizer), ``forward`` runs the session on the device worker, ``finish`` applies the activation
and returns floats. The tokenizer is not shared across threads, so ``thread_safe`` stays False.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import os
import shutil
import tempfile
import threading
import time
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..exceptions import ConfigurationError, MissingDependencyError, ModelLoadError
from ._torch_common import import_optional, loading_errors
from .base import ModelProvider, Prepared, RerankerModel, Task
from .flag import score_mode_of  # light: flag.py imports FlagEmbedding only inside its loaders
from .options import ONNX_OPTIONS

if TYPE_CHECKING:
    from ..spec import ModelSpec

__all__ = [
    "CACHE_ENV",
    "FORMAT_VERSION",
    "OPTIONS",
    "QUANTIZE_MODES",
    "THREADS_ENV",
    "OnnxCrossEncoder",
    "default_cache_dir",
    "default_threads",
    "export_count",
    "load",
    "model_fingerprint",
]

logger = logging.getLogger(__name__)

#: Environment variable: where exports are cached (option ``cache_dir`` wins).
CACHE_ENV = "RAG_RERANK_ONNX_CACHE"
#: Environment variable: onnxruntime intra-op threads (option ``intra_op_threads`` wins).
THREADS_ENV = "RAG_RERANK_ORT_THREADS"
#: Bumped whenever the layout or the exported graph changes, so old entries are not reused.
FORMAT_VERSION = 1
DEFAULT_OPSET = 17
QUANTIZE_MODES = ("int8",)
#: Files under this size are hashed by content; larger ones (weights) by size and mtime.
_HASH_CONTENT_BELOW = 4 * 1024 * 1024
#: sentence-transformers loading options, used when exporting (and to find hub snapshots).
_ST_LOADING = ("trust_remote_code", "revision", "cache_folder", "local_files_only")
#: Every option the loader reads (declared once, in options.py, for the registry too).
OPTIONS = ONNX_OPTIONS

_exports = 0
_exports_lock = threading.Lock()


def export_count() -> int:
    """How many exports this process has run (a cached entry reused does not count)."""
    return _exports


# -- threads ----------------------------------------------------------------------------------


def _cgroup_cpu_limit() -> int | None:
    """Whole CPUs allowed by a cgroup v2 ``cpu.max`` quota, rounded up; None without a quota."""
    try:
        quota, period = Path("/sys/fs/cgroup/cpu.max").read_text().split()[:2]
    except (OSError, ValueError):
        return None
    if quota == "max":
        return None
    try:
        return max(1, math.ceil(int(quota) / int(period)))
    except (ValueError, ZeroDivisionError):
        return None


def default_threads() -> int:
    """Physical cores this process may run on: its affinity mask with SMT siblings counted once,
    capped by a cgroup CPU quota. More threads than cores only adds contention."""
    try:
        cpus = sorted(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cpus = list(range(os.cpu_count() or 1))
    cores = set()
    for cpu in cpus:
        try:
            siblings = Path(
                f"/sys/devices/system/cpu/cpu{cpu}/topology/thread_siblings_list"
            ).read_text()
        except OSError:
            siblings = str(cpu)
        cores.add(siblings.strip())
    count = max(1, len(cores))
    limit = _cgroup_cpu_limit()
    return min(count, limit) if limit else count


def _threads_for(spec: ModelSpec) -> int:
    value = spec.option("intra_op_threads")
    source = "intra_op_threads"
    if value is None:
        value = os.environ.get(THREADS_ENV) or None
        source = THREADS_ENV
    if value is None:
        return default_threads()
    try:
        threads = int(value)
    except (TypeError, ValueError):
        raise ConfigurationError(f"{source} must be a positive integer, got {value!r}.") from None
    if threads <= 0 or isinstance(value, bool):
        raise ConfigurationError(f"{source} must be a positive integer, got {value!r}.")
    return threads


# -- the export cache -------------------------------------------------------------------------


def default_cache_dir() -> Path:
    env = os.environ.get(CACHE_ENV)
    if env:
        return Path(env).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "rag-rerank-plugins" / "onnx"


def model_fingerprint(model_dir: Path) -> str:
    """sha256 over the model folder's files: relative path, size and mtime of each, and the
    contents of the small ones (config, tokenizer). Hidden folders (.git, .cache) are skipped."""
    digest = hashlib.sha256()
    files = sorted(
        p
        for p in model_dir.rglob("*")
        if p.is_file() and not any(part.startswith(".") for part in p.relative_to(model_dir).parts)
    )
    for path in files:
        stat = path.stat()  # follows hub-cache symlinks to the blob
        digest.update(f"{path.relative_to(model_dir).as_posix()}\0{stat.st_size}\0".encode())
        if stat.st_size < _HASH_CONTENT_BELOW:
            digest.update(path.read_bytes())
        else:
            digest.update(str(stat.st_mtime_ns).encode())
        digest.update(b"\0")
    return digest.hexdigest()


def _model_dir(spec: ModelSpec) -> Path:
    """The local folder holding the model's files (a hub name: its snapshot)."""
    if spec.is_local_path:
        path = Path(spec.model).resolve()
        return path if path.is_dir() else path.parent
    from huggingface_hub import snapshot_download

    local_only = bool(spec.option("local_files_only", False)) or os.environ.get(
        "HF_HUB_OFFLINE", ""
    ).strip().lower() in ("1", "true", "yes")
    return Path(
        snapshot_download(
            spec.model,
            revision=spec.option("revision"),
            cache_dir=spec.option("cache_folder"),
            local_files_only=local_only,
            # What CrossEncoder reads; a repo's onnx/, openvino/ or .bin duplicates stay remote.
            allow_patterns=["*.json", "*.safetensors", "*.txt", "*.model", "*.py"],
        )
    )


def _entry_key(fingerprint: str, mode: str, opset: int) -> str:
    payload = json.dumps(
        {"format": FORMAT_VERSION, "model": fingerprint, "mode": mode, "opset": opset},
        sort_keys=True,
    )
    return hashlib.sha256(payload.encode()).hexdigest()[:32]


def _publish(tmp: Path, final: Path) -> None:
    """Rename a finished entry into place; if another process got there first, keep theirs."""
    try:
        os.rename(tmp, final)
    except OSError:
        if not (final / "meta.json").exists():
            raise
        shutil.rmtree(tmp, ignore_errors=True)


@contextlib.contextmanager
def _tmp_entry(cache: Path, key: str) -> Iterator[Path]:
    cache.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{key}-", dir=cache))
    try:
        yield tmp
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # gone already when published


#: Probe pairs for the export checks: padding, truncation of a long passage, non-ASCII text.
_PROBES = [
    ("what is the role of energy in the cell", "Mitochondria produce ATP, the cell's energy."),
    ("short", "a passage " * 400),
    ("Qu'est-ce que l'énergie ?", "Die Zelle — 細胞 — uses energy. " * 3),
    ("", "an empty query"),
]


def _export(spec: ModelSpec, model_dir: Path, final: Path, mode: str, opset: int) -> None:
    """Export (and quantize) ``spec`` into the cache entry ``final`` (atomically)."""
    global _exports
    st = import_optional(
        "sentence_transformers",
        "sentence-transformers",
        "st",
        f"Exporting {spec.model!r} to ONNX (once; a cached export needs only onnxruntime)",
    )
    import numpy as np
    import torch

    start = time.perf_counter()
    loading = {k: spec.option(k) for k in _ST_LOADING if spec.option(k) is not None}
    from .st_cross_encoder import model_kwargs_for

    with loading_errors(spec):
        ce = st.CrossEncoder(
            str(model_dir) if spec.is_local_path else spec.model,
            device="cpu",
            model_kwargs=model_kwargs_for("float32"),
            **loading,
        )
    ce.eval()
    tokenizer = ce.tokenizer
    backend_tok = getattr(tokenizer, "backend_tokenizer", None)
    if backend_tok is None:
        raise ConfigurationError(
            f"{spec.model!r} has no fast (Rust) tokenizer, which the ONNX backend runs without "
            "transformers; use backend='cross-encoder'."
        )
    activation = type(ce.activation_fn).__name__ if ce.activation_fn is not None else "Identity"
    if activation not in ("Sigmoid", "Identity"):
        raise ConfigurationError(
            f"{spec.model!r} uses the activation {activation}, which the ONNX backend does not "
            "reproduce; use backend='cross-encoder'."
        )
    resolve = getattr(ce, "_resolve_prompt", None)
    prompt = resolve(None, None) if callable(resolve) else None
    names = [n for n in tokenizer.model_input_names if n in ("input_ids", "attention_mask")]
    names += [n for n in tokenizer.model_input_names if n == "token_type_ids"]
    meta: dict[str, Any] = {
        "format": FORMAT_VERSION,
        "model": spec.model,
        "mode": mode,
        "opset": opset,
        "inputs": names,
        "activation": activation.lower(),
        "num_labels": int(getattr(ce, "num_labels", 1)),
        "max_length": _max_length(ce),
        "truncation_side": tokenizer.truncation_side,
        "padding_side": tokenizer.padding_side,
        "pad_token": tokenizer.pad_token,
        "pad_token_id": tokenizer.pad_token_id,
        "pad_token_type_id": int(getattr(tokenizer, "pad_token_type_id", 0) or 0),
        "prompt": prompt,
        "torch": torch.__version__,
    }

    class _Scores(torch.nn.Module):
        def __init__(self, model: Any) -> None:
            super().__init__()
            self.model = model

        def forward(self, *tensors: Any) -> Any:
            return self.model(dict(zip(names, tensors, strict=True)))["scores"]

    probes = [(prompt + q if prompt else q, p) for q, p in _PROBES]
    with _tmp_entry(final.parent, final.name) as tmp:
        (tmp / "tokenizer.json").write_text(backend_tok.to_str(), encoding="utf-8")
        (tmp / "meta.json").write_text(json.dumps(meta, indent=1), encoding="utf-8")
        # The export must see padding, or the traced graph may drop the attention mask.
        features = ce.preprocess(probes[:2], prompt=None)
        args = tuple(features[n] for n in names)
        fp32 = tmp / ("model.onnx" if mode == "float32" else "model-fp32.onnx")
        axes = {n: {0: "batch", 1: "sequence"} for n in names}
        axes["scores"] = {0: "batch"}
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(
                _Scores(ce).eval(),
                args,
                str(fp32),
                input_names=names,
                output_names=["scores"],
                dynamic_axes=axes,
                opset_version=opset,
                do_constant_folding=True,
                dynamo=False,
            )
        if mode == "int8":
            _quantize_int8(fp32, tmp / "model.onnx")
            fp32.unlink()
            for extra in tmp.glob("*.data"):
                extra.unlink()
        # Check the tokenizer and (float32) the logits before publishing anything.
        runtime = OnnxCrossEncoder.from_entry(tmp, threads=default_threads())
        prepared = runtime.prepare(Task("score"), _PROBES)
        reference = ce.preprocess(probes, prompt=None)
        for name in names:
            if not np.array_equal(prepared.payload[name], reference[name].numpy()):
                raise ModelLoadError(
                    spec.model,
                    spec.backend,
                    f"the exported tokenizer's {name} differ from CrossEncoder.preprocess",
                )
        with torch.inference_mode():
            want = ce(dict(reference))["scores"].float().reshape(len(probes), -1)[:, 0].numpy()
        got = np.asarray(runtime.forward(Task("score"), prepared)).reshape(len(probes), -1)[:, 0]
        tolerance = 1e-3 if mode == "float32" else 0.25 * max(1.0, float(np.ptp(want)))
        if not np.allclose(got, want, atol=tolerance, rtol=0):
            raise ModelLoadError(
                spec.model,
                spec.backend,
                f"the ONNX export's logits differ from the torch model's by "
                f"{float(np.abs(got - want).max()):.3g}",
            )
        runtime.close()
        _publish(tmp, final)
    with _exports_lock:
        _exports += 1
    logger.info(
        "rag-rerank: exported %s to ONNX (%s, opset %d) in %.1fs: %s",
        spec.model,
        mode,
        opset,
        time.perf_counter() - start,
        final,
    )


def _max_length(ce: Any) -> int | None:
    """The CrossEncoder's truncation length (``max_seq_length``; ``max_length`` before ST 6)."""
    limit = getattr(ce, "max_seq_length", None)
    if limit is None:
        limit = getattr(ce, "max_length", None)
    return int(limit) if isinstance(limit, int) and 0 < limit < 1_000_000 else None


def _quantize_int8(source: Path, target: Path) -> None:
    """Dynamic int8: int8 per-channel weights for every MatMul, activations quantized per pass."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    quant_logger = logging.getLogger()  # it warns on the root logger about pre-processing
    level = quant_logger.level
    quant_logger.setLevel(logging.ERROR)
    try:
        quantize_dynamic(
            source,
            target,
            op_types_to_quantize=["MatMul"],
            per_channel=True,
            weight_type=QuantType.QInt8,
            use_external_data_format=source.stat().st_size > 1_800_000_000,
        )
    finally:
        quant_logger.setLevel(level)


# -- the loaded model ---------------------------------------------------------------------------


class OnnxCrossEncoder(RerankerModel):
    """A cached ONNX export in an onnxruntime session; see the module docstring."""

    def __init__(
        self,
        session: Any,
        tokenizer: Any,
        meta: dict[str, Any],
        *,
        score_mode: str | None,
        threads: int,
        path: Path,
    ) -> None:
        self.session = session
        self.tokenizer = tokenizer
        self.meta = meta
        self.device = "cpu"
        self.dtype = "int8" if meta["mode"] == "int8" else "float32"
        self.max_tokens = tokenizer.truncation["max_length"] if tokenizer.truncation else None
        self.threads = threads
        self.path = path
        self._inputs = list(meta["inputs"])
        self._prompt = meta.get("prompt") or ""
        if score_mode is None:
            score_mode = "sigmoid" if meta["activation"] == "sigmoid" else "raw"
        self.score_mode = score_mode

    @classmethod
    def from_entry(
        cls,
        entry: Path,
        *,
        threads: int,
        max_length: int | None = None,
        score_mode: str | None = None,
    ) -> OnnxCrossEncoder:
        """Open a cache entry; ``max_length`` overrides the model's own (None: the model's)."""
        import onnxruntime as ort
        from tokenizers import Tokenizer

        meta = json.loads((entry / "meta.json").read_text(encoding="utf-8"))
        tokenizer = Tokenizer.from_file(str(entry / "tokenizer.json"))
        max_length = max_length or meta["max_length"]
        if max_length:
            tokenizer.enable_truncation(
                int(max_length), strategy="longest_first", direction=meta["truncation_side"]
            )
        else:
            tokenizer.no_truncation()
        tokenizer.enable_padding(
            direction=meta["padding_side"],
            pad_id=int(meta["pad_token_id"] or 0),
            pad_type_id=int(meta["pad_token_type_id"]),
            pad_token=meta["pad_token"] or "[PAD]",
        )
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        # Idle worker threads sleep instead of spinning: a model between requests costs no CPU.
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        options.add_session_config_entry("session.inter_op.allow_spinning", "0")
        options.log_severity_level = 3
        session = ort.InferenceSession(
            str(entry / "model.onnx"), options, providers=["CPUExecutionProvider"]
        )
        return cls(session, tokenizer, meta, score_mode=score_mode, threads=threads, path=entry)

    # -- two phases ------------------------------------------------------------------------

    def prepare(self, task: Task, items: Sequence[Any]) -> Prepared:
        import numpy as np

        pairs = [(self._prompt + str(q), str(p)) for q, p in items]
        encodings = self.tokenizer.encode_batch(pairs)
        columns = {
            "input_ids": [e.ids for e in encodings],
            "attention_mask": [e.attention_mask for e in encodings],
            "token_type_ids": [e.type_ids for e in encodings],
        }
        payload = {n: np.asarray(columns[n], dtype=np.int64) for n in self._inputs}
        ids = payload["input_ids"]
        return Prepared(payload, len(items), int(ids.size))

    def forward(self, task: Task, batch: Prepared) -> Any:
        return self.session.run(["scores"], batch.payload)[0]

    def finish(self, task: Task, pending: Any) -> list[Any]:
        import numpy as np

        logits = np.asarray(pending, dtype=np.float32).reshape(len(pending), -1)[:, 0]
        if self.score_mode == "sigmoid":  # as predict: sigmoid of the FP32 logit
            logits = np.exp(-np.logaddexp(np.float32(0), -logits)).astype(np.float32)
        return [float(s) for s in logits]

    def score_pairs(self, pairs: Sequence[tuple[str, str]], batch_size: int) -> list[float]:
        task = Task("score")
        out: list[float] = []
        for start in range(0, len(pairs), max(1, batch_size)):
            chunk = pairs[start : start + max(1, batch_size)]
            out.extend(self.finish(task, self.forward(task, self.prepare(task, chunk))))
        return out

    def footprint_bytes(self) -> int | None:
        """The ONNX graph's size on disk (with external weights): a fair proxy for what
        onnxruntime holds (its arena grows with batch shapes, on top)."""
        try:
            return sum(
                f.stat().st_size
                for f in self.path.iterdir()
                if f.is_file() and (f.suffix == ".onnx" or f.name.endswith(".onnx_data"))
            )
        except OSError:
            return 0

    def close(self) -> None:
        self.session = None
        self.tokenizer = None


# -- loader -----------------------------------------------------------------------------------


def _mode_of(spec: ModelSpec) -> str:
    mode = spec.option("quantize")
    if mode is None:
        return "float32"
    if mode not in QUANTIZE_MODES:
        raise ConfigurationError(f"quantize={mode!r} is not supported; use 'int8' or leave it out.")
    return str(mode)


def _opset_of(spec: ModelSpec) -> int:
    opset = spec.option("opset", DEFAULT_OPSET)
    if isinstance(opset, bool) or not isinstance(opset, int) or not 14 <= opset <= 21:
        raise ConfigurationError(f"opset must be an int from 14 to 21, got {opset!r}.")
    return opset


def load(spec: ModelSpec, provider: ModelProvider) -> OnnxCrossEncoder:
    import_optional("onnxruntime", "onnxruntime", "onnx", "The 'onnx-cross-encoder' backend")
    import_optional("tokenizers", "tokenizers", "onnx", "The 'onnx-cross-encoder' backend")
    if spec.device != "cpu":
        raise ConfigurationError(
            f"The 'onnx-cross-encoder' backend runs on the CPU (onnxruntime's CPU provider); "
            f"device={spec.device!r} was requested. Use device='cpu' or 'auto', or "
            "backend='cross-encoder' on a GPU."
        )
    if spec.dtype != "float32":
        raise ConfigurationError(
            f"dtype={spec.dtype!r}: onnxruntime's CPU provider has no fast FP16/BF16 matmuls "
            "on x86, so the ONNX backend runs float32 (dtype='float32' or 'auto'), or int8 with "
            "model_kwargs={'quantize': 'int8'}."
        )
    mode = _mode_of(spec)
    opset = _opset_of(spec)
    score_mode = score_mode_of(spec, None)
    threads = _threads_for(spec)
    cache = Path(spec.option("cache_dir") or default_cache_dir()).expanduser()
    with loading_errors(spec):
        model_dir = _model_dir(spec)
        entry = cache / _entry_key(model_fingerprint(model_dir), mode, opset)
        if not (entry / "meta.json").exists():
            _export(spec, model_dir, entry, mode, opset)
        try:
            model = OnnxCrossEncoder.from_entry(
                entry, threads=threads, max_length=spec.max_length, score_mode=score_mode
            )
        except (MissingDependencyError, ConfigurationError):
            raise
        except Exception as exc:  # a damaged entry: say where it is, so it can be deleted
            raise ModelLoadError(
                spec.model, spec.backend, f"cached ONNX export {entry} cannot be loaded: {exc}"
            ) from exc
    logger.info(
        "rag-rerank: onnxruntime %s for %s: %d intra-op thread(s), 1 inter-op, spinning off "
        "(export %s)",
        model.dtype,
        spec.model,
        threads,
        entry,
    )
    return model
