"""ONNX Runtime cross-encoder backend (``backend="onnx-cross-encoder"``, extra ``onnx``).

The model is exported once with ``torch.onnx.export`` (TorchScript exporter; dynamic batch and
sequence axes) into a cache directory and run with onnxruntime's CPU execution provider. Scores
are ``CrossEncoder.predict``'s: the same tokenizer, the same logits, the same activation.
Option ``file_name`` runs one of the repository's own ONNX files instead of our export (what
sentence-transformers' ``model_kwargs={"file_name": ...}`` means; :mod:`._repo_file`).

**The export cache.** One entry per (model files, mode, opset, pruning, format version) under
``RAG_RERANK_ONNX_CACHE`` or option ``cache_dir`` (default ``~/.cache/rag-rerank-plugins/onnx``).
The key hashes every file of the model folder: path, size and modification time of each file
(for a link into a Hugging Face hub cache, the blob's name: its content hash), plus the full
contents of files under 4 MiB (config, tokenizer), so a changed model exports again and an
unchanged one is reused by every later process (a plain weights file replaced by one of the same
size with its mtime kept is not noticed: see ``_onnx_common.model_fingerprint``). An entry is
written in a temporary directory and renamed into place, so concurrent processes never see half
an export (the loser of a race discards its copy; threads of one process export an entry once).
``meta.json`` records the sha256 of the entry's files and every load checks them: a damaged entry
(a changed or truncated graph, a lost ``meta.json``) is logged, removed and exported again, never
served; a cache folder that cannot be written fails naming it (``_onnx_common.writable``), and
one holding the model's intact export is only read. An entry holds ``model.onnx``, the tokenizer
as ``tokenizer.json`` and ``meta.json`` (activation, the graph's inputs, which the exporter
trims to those the model reads, e.g. no ``token_type_ids`` for DistilBERT, truncation and padding
settings). Exporting needs the ``st`` extra (torch, sentence-transformers); loading a cached
entry needs only onnxruntime and ``tokenizers``, never torch, so a second process starts in a
fraction of the torch load (the onnxruntime session is opened during the load, so a graph it
cannot open fails there, not at the first call). Every export is checked before it is
published: token ids against ``CrossEncoder.preprocess`` and logits against the torch model on
probe pairs.

**Pruning** (option ``prune_last_layer``, default True): the export computes the last layer for
the first token only, the one the classification head reads (see ``_first_token``); the checks
compare it with the unpruned model, and a pruned export is a cache entry of its own.

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

**Labels** (option ``score_label``): the graph returns every logit; ``finish`` takes the label
``_common.label_index`` resolves (the only one; label 1 of two, as LangChain; a named one of
more) and applies the activation to it, as the ``cross-encoder`` backend does. ``meta.json``
keeps ``num_labels`` and ``id2label`` (entries exported before ``id2label`` was kept know their
labels by transformers' default names ``LABEL_<i>``, or by index).

Two phases: ``prepare`` tokenises into int64 numpy arrays (the prepare thread owns the
tokenizer), ``forward`` runs the session on the device worker, ``finish`` applies the activation
and returns floats. The tokenizer is not shared across threads, so ``thread_safe`` stays False.

**Long-document windows** (:meth:`OnnxCrossEncoder.window_source`): the export's
``tokenizer.json`` as a transformers ``PreTrainedTokenizerFast``, with the model's truncation
length, so windows are cut exactly as for the ``cross-encoder`` backend. transformers (never
torch) is imported only when windows are first used; loading stays free of it. The file is read
once, at load, and kept in memory (its size, e.g. 17 MB for XLM-R's vocabulary): a loaded model
reads nothing from its cache entry afterwards, so deleting the cache folder while it serves
breaks no later call. Without transformers installed there is no window source (windows are
refused, with a logged hint).

The cache, the thread policy and the load-time checks live in :mod:`._onnx_common`, shared with
the embedder backend (:mod:`.onnx_embedder`); this module holds what is the cross-encoder's own.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..exceptions import ConfigurationError, ModelLoadError, ModelReleasedError
from . import backend_info
from ._common import label_index, score_mode_of
from ._onnx_common import (
    CACHE_ENV,
    DEFAULT_OPSET,
    QUANTIZE_MODES,
    THREADS_ENV,
    OnnxRuntimeModel,
    cached_entry,
    check_cpu_float32,
    default_cache_dir,
    default_threads,
    export_count,
    export_graph,
    fast_tokenizer_json,
    model_fingerprint,
    publish_export,
    same_tokens,
    st_for_export,
    threads_for,
    tmp_entry,
    tokenizer_meta,
)
from ._repo_file import copy_file, file_option, located, repo_file
from ._torch_common import (
    cap_to_positions,
    position_table_limit,
    prune_last_layer,
    prune_last_layer_option,
)
from .base import ModelProvider, Prepared, RerankerModel, Task

if TYPE_CHECKING:
    from ..spec import ModelSpec

__all__ = [
    "CACHE_ENV",
    "DEFAULT_OPSET",
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

#: Bumped whenever the layout or the exported graph changes, so old entries are not reused.
FORMAT_VERSION = 1
#: Every option the loader reads: its registry row's (declared there, once).
OPTIONS = backend_info("onnx-cross-encoder").options


#: Whether the missing-transformers hint of ``window_source`` was logged (once per process).
_warned_no_transformers = False

#: Probe pairs for the export checks: padding, truncation of a long passage, non-ASCII text.
_PROBES = [
    ("what is the role of energy in the cell", "Mitochondria produce ATP, the cell's energy."),
    ("short", "a passage " * 400),
    ("Qu'est-ce que l'énergie ?", "Die Zelle — 細胞 — uses energy. " * 3),
    ("", "an empty query"),
]


def _export(spec: ModelSpec, model_dir: Path, final: Path, mode: str, opset: int) -> None:
    """Export (and quantize) ``spec`` into the cache entry ``final`` (atomically)."""
    import numpy as np

    start = time.perf_counter()
    file_name = file_option(spec)
    ce = st_for_export(spec, model_dir, "CrossEncoder")
    import torch  # after st_for_export: without torch, its error names the extra to install

    cap_to_positions(ce, None, spec.model)  # the recorded max_length fits the position table
    tokenizer = ce.tokenizer
    tokenizer_json = fast_tokenizer_json(spec, tokenizer, "cross-encoder")
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
        "id2label": _id2label(ce),
        "max_length": _max_length(ce),
        "positions": position_table_limit(ce.model),
        **tokenizer_meta(tokenizer),
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
    features = ce.preprocess(probes, prompt=None)
    with torch.inference_mode():  # the unpruned model's logits: what the export must give
        want = ce(dict(features))["scores"].float().reshape(len(probes), -1).numpy()
    if file_name is None:
        meta["kernels"] = prune_last_layer(ce, _prune(spec))
    else:  # the repository's own file, run as it is (_repo_file)
        meta["kernels"] = f"the repository's {file_name}, as it is"
        meta["file_name"] = file_name
    with tmp_entry(final, tokenizer_json, meta) as tmp:
        if file_name is None:
            sample = ce.preprocess(probes[:2], prompt=None)  # padded: the mask stays in the graph
            export_graph(
                _Scores(ce),
                tuple(sample[n] for n in names),
                tmp,
                inputs=names,
                output="scores",
                output_axes={0: "batch"},
                mode=mode,
                opset=opset,
            )
        else:
            copy_file(repo_file(spec, model_dir, file_name), tmp)
        # Check the tokenizer and (float32) the logits before publishing anything.
        runtime = OnnxCrossEncoder(tmp, threads=default_threads(), score_label=0)
        if file_name is not None:  # optimum names it "logits"; ours "scores"
            outputs = runtime.ensure_session().get_outputs()
            if len(outputs) != 1:
                runtime.close()
                raise ModelLoadError(
                    spec.model,
                    spec.backend,
                    f"{file_name} has {len(outputs)} outputs; a cross-encoder's graph has one "
                    "(its logits)",
                )
            runtime.output = meta["output"] = outputs[0].name
        prepared = runtime.prepare(Task("score"), _PROBES)
        for name in prepared.payload:
            ref = features[name].numpy()
            if not same_tokens(prepared.payload[name], ref, name):
                raise ModelLoadError(
                    spec.model,
                    spec.backend,
                    f"the exported tokenizer's {name} differ from CrossEncoder.preprocess",
                )
        got = np.asarray(runtime.forward(Task("score"), prepared)).reshape(len(probes), -1)
        # A repository's file may be quantized (its name does not say so reliably): checked
        # with int8's tolerance, which still catches another model's or task's graph.
        exact = mode == "float32" and file_name is None
        tolerance = 1e-3 if exact else 0.25 * max(1.0, float(np.ptp(want)))
        if got.shape != want.shape or not np.allclose(got, want, atol=tolerance, rtol=0):
            raise ModelLoadError(
                spec.model,
                spec.backend,
                f"the ONNX export's logits differ from the torch model's by "
                f"{float(np.abs(got - want).max()):.3g}",
            )
        # The graph's inputs, so a load never needs a session to know what to feed.
        meta["feeds"] = list(runtime._feeds)
        (tmp / "meta.json").write_text(json.dumps(meta, indent=1), encoding="utf-8")
        runtime.close()
        publish_export(spec, tmp, final, start)


def _id2label(ce: Any) -> dict[str, str] | None:
    """The label names of the CrossEncoder's transformers model, JSON-ready (None without)."""
    names = getattr(getattr(getattr(ce, "model", None), "config", None), "id2label", None)
    return {str(k): str(v) for k, v in names.items()} if isinstance(names, dict) else None


def _max_length(ce: Any) -> int | None:
    """The CrossEncoder's truncation length (``max_seq_length``; ``max_length`` before ST 6)."""
    limit = getattr(ce, "max_seq_length", None)
    if limit is None:
        limit = getattr(ce, "max_length", None)
    return int(limit) if isinstance(limit, int) and 0 < limit < 1_000_000 else None


# -- the loaded model ---------------------------------------------------------------------------


class OnnxCrossEncoder(OnnxRuntimeModel, RerankerModel):
    """A cached ONNX export in an onnxruntime session; see the module docstring."""

    keep_tokenizer_json = True  # the window tokenizer is built from it (window_source)

    def __init__(
        self,
        entry: Path,
        *,
        threads: int,
        max_length: int | None = None,
        score_mode: str | None = None,
        score_label: int | str | None = None,
    ) -> None:
        """Open a published cache entry (see :class:`OnnxRuntimeModel`); ``score_label`` is the
        option's value (see ``_common.label_index``)."""
        super().__init__(entry, threads=threads, max_length=max_length)
        meta = self.meta
        self.num_labels = int(meta.get("num_labels") or 1)
        self.label = label_index(score_label, self.num_labels, meta.get("id2label"), meta["model"])
        self._feed_names: list[str] | None = list(meta.get("feeds") or ()) or None
        self._prompt = self.meta.get("prompt") or ""
        #: The graph's output: "scores" in our exports, a repository's file's own name else.
        self.output: str = str(self.meta.get("output") or "scores")
        if score_mode is None:
            score_mode = "sigmoid" if self.meta["activation"] == "sigmoid" else "raw"
        self.score_mode = score_mode

    @property
    def _feeds(self) -> list[str]:
        """The graph's inputs, which can be fewer than the tokenizer's (an exporter drops an
        input the model never reads, e.g. ``token_type_ids``; onnxruntime refuses a feed the
        graph lacks): recorded in ``meta.json`` at export; an entry exported before that asks
        the session on first use (after an OpenVINO swap, the compiled model)."""
        if self._feed_names is None:
            self._feed_names = [i.name for i in self.session.get_inputs()]
        return self._feed_names

    # -- two phases ------------------------------------------------------------------------

    def prepare(self, task: Task, items: Sequence[Any]) -> Prepared:
        arrays = self.tokenize([(self._prompt + str(q), str(p)) for q, p in items])
        payload = {n: arrays[n] for n in self._feeds}
        mask = arrays["attention_mask"]
        return Prepared(payload, len(items), int(mask.size), int(mask.sum()))

    def forward(self, task: Task, batch: Prepared) -> Any:
        return self.session.run([self.output], batch.payload)[0]

    def finish(self, task: Task, pending: Any) -> list[Any]:
        import numpy as np

        logits = np.asarray(pending, dtype=np.float32).reshape(len(pending), -1)[:, self.label]
        if self.score_mode == "sigmoid":  # as predict: sigmoid of the FP32 logit
            logits = np.exp(-np.logaddexp(np.float32(0), -logits)).astype(np.float32)
        return [float(s) for s in logits]

    def window_source(self) -> tuple[Any, int] | None:
        """The export's tokenizer as a Hugging Face fast tokenizer (what the ``cross-encoder``
        backend's windows use: the same ids, offsets and special tokens) and the model's input
        limit (0 without one: windows then ask for ``max_length``). A new object per call, never
        the prepare thread's tokenizer; imports transformers (not torch) on first use. None, with
        a warning, where transformers cannot be imported (the ``onnx`` extra alone).

        Built from the ``tokenizer.json`` read at load (:attr:`tokenizer_json`), never from the
        cache entry: the cache folder may have been deleted since ("delete the folder to start
        over"), and reading it here failed every windowed call of the loaded model."""
        global _warned_no_transformers
        if self.tokenizer_json is None:
            raise ModelReleasedError(
                f"{self.meta.get('model')} was closed (released from its pool); get the model "
                "from the pool again to use long-document windows."
            )
        try:
            from transformers import PreTrainedTokenizerFast
        except ImportError as exc:
            if not _warned_no_transformers:
                _warned_no_transformers = True
                logger.warning(
                    "rag-rerank: long-document windows on %s need the transformers package "
                    "(pip install transformers; no torch needed): %s",
                    self.meta.get("model"),
                    exc,
                )
            return None
        from tokenizers import Tokenizer

        tokenizer = PreTrainedTokenizerFast(
            tokenizer_object=Tokenizer.from_buffer(self.tokenizer_json)
        )
        # The model's default prompt is prepended to every query (prepare): windows get what is
        # left after it, as on cross-encoder, or each (prompt + query, window) input ran past
        # the limit and lost the window's end (the passage's own end, on the last window).
        prompt = len(tokenizer(self._prompt, add_special_tokens=False)["input_ids"])
        return tokenizer, max((self.max_tokens or 0) - (prompt if self._prompt else 0), 0)

    def score_pairs(self, pairs: Sequence[tuple[str, str]], batch_size: int) -> list[float]:
        task = Task("score")
        out: list[float] = []
        for start in range(0, len(pairs), max(1, batch_size)):
            chunk = pairs[start : start + max(1, batch_size)]
            out.extend(self.finish(task, self.forward(task, self.prepare(task, chunk))))
        return out


# -- loader -----------------------------------------------------------------------------------


def _prune(spec: ModelSpec) -> bool:
    return prune_last_layer_option(spec.options_dict)


def load(spec: ModelSpec, provider: ModelProvider) -> OnnxCrossEncoder:
    check_cpu_float32(spec, "cross-encoder")
    score_mode = score_mode_of(spec, None)
    threads = threads_for(spec)
    # A pruned graph is another entry; the unpruned one keeps the key of earlier releases.
    extra = {"prune": "last-layer"} if _prune(spec) else {}
    file_name = file_option(spec)
    if file_name is not None:  # the repository's file: an entry per file and contents
        extra = {"file": located(spec, file_name)[1]}
    model: OnnxCrossEncoder = cached_entry(
        spec,
        format_version=FORMAT_VERSION,
        export=_export,
        open_entry=lambda entry: OnnxCrossEncoder(
            entry,
            threads=threads,
            max_length=spec.max_length,
            score_mode=score_mode,
            score_label=spec.option("score_label"),
        ),
        threads=threads,
        **extra,
    )
    return model
