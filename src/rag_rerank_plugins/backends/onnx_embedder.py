"""ONNX Runtime sentence-transformers embedder (``backend="onnx-sentence-transformers"``, extra
``onnx``).

Vectors are the ``sentence-transformers`` backend's (``encode_query`` for queries,
``encode_document`` for documents, an explicit ``prompt`` replacing the model's own), computed
by onnxruntime on the CPU from an export cached like the cross-encoder's (:mod:`._onnx_common`:
one entry per model files, mode and opset; atomic publish; a cached entry loads without torch).

**What is exported.** Only the transformer, returning token embeddings (dynamic batch and sequence
axes). Pooling (mean, CLS, max, mean_sqrt_len_tokens, weightedmean, lasttoken, as the model's
``Pooling`` module is configured, ``include_prompt`` included) and the model's ``Normalize``
module run in numpy in FP32 in :meth:`OnnxSentenceTransformer.finish`: the pooled vector keeps
full precision in int8 mode too, and the graph stays the plain encoder that onnxruntime's fused
attention kernels recognise. Models whose pipeline holds anything else (a ``Dense`` projection,
a ``Router``, chat templates, query expansion) are refused with a ``ConfigurationError`` naming
``backend="sentence-transformers"``, never run approximately. Option ``file_name`` runs the
repository's own transformer file instead (optimum's ``last_hidden_state``, e.g. a quantized
``onnx/model_qint8_avx512_vnni.onnx``; :mod:`._repo_file`), pooled and checked the same way.

**Prompts.** The model's ``prompts`` and ``default_prompt_name`` are recorded in the export;
option ``default_prompt_name`` overrides the recorded one, as it does for ``SentenceTransformer``.
A request's prompt is resolved as ``st_embedder.SentenceTransformerEmbedder`` resolves it (the
explicit prompt, else the "query"/"document" prompt, else the default prompt) and prepended to
each text; with ``include_prompt=False`` pooling skips the prompt's tokens (counted as
sentence-transformers counts them: the prompt tokenised alone, less a trailing special token).

**Checked before publishing.** Token ids against ``SentenceTransformer.preprocess`` and vectors
against ``SentenceTransformer.encode`` on probe texts (padding, truncation, non-ASCII, a prompt).

Two phases: ``prepare`` tokenises (``tokenizers``, the prepare thread's own) and feeds the graph's
inputs (recorded in ``meta.json`` as ``feeds``), ``forward`` runs the session, ``finish`` pools and
normalises.
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..exceptions import ConfigurationError, ModelLoadError
from . import backend_info
from ._onnx_common import (
    OnnxRuntimeModel,
    cached_entry,
    check_cpu_float32,
    default_threads,
    export_graph,
    fast_tokenizer_json,
    publish_export,
    same_tokens,
    st_for_export,
    threads_for,
    tmp_entry,
    tokenizer_meta,
)
from ._repo_file import copy_file, file_option, located, repo_file
from ._torch_common import cap_to_positions, position_table_limit
from .base import EmbedderModel, ModelProvider, Prepared, Task

if TYPE_CHECKING:
    from ..spec import ModelSpec

__all__ = ["FORMAT_VERSION", "OPTIONS", "POOLING_MODES", "OnnxSentenceTransformer", "load", "pool"]

#: Bumped whenever the layout or the exported graph changes, so old entries are not reused.
FORMAT_VERSION = 1
#: Every option the loader reads: its registry row's (declared there, once).
OPTIONS = backend_info("onnx-sentence-transformers").options
#: sentence-transformers' Pooling modes, all reproduced by :func:`pool`.
POOLING_MODES = ("cls", "max", "mean", "mean_sqrt_len_tokens", "weightedmean", "lasttoken")
_FALLBACK = "sentence-transformers"

#: Probe texts for the export checks: padding, truncation of a long text, non-ASCII, empty.
_PROBES = [
    "what is the role of energy in the cell",
    "a passage " * 400,
    "Die Zelle — 細胞 — uses energy. Qu'est-ce que l'énergie ?",
    "",
]


# -- pooling (numpy, FP32) ----------------------------------------------------------------------


def pool(
    tokens: Any,
    attention_mask: Any,
    modes: Sequence[str],
    prompt_length: int | None = None,
) -> Any:
    """Sentence vectors from token embeddings, as sentence-transformers' ``Pooling`` computes them
    on padded batches; several modes are concatenated in order. ``prompt_length`` (the prompt's
    tokens, only when the model pools without them) masks the first tokens of every text."""
    import numpy as np

    tokens = np.asarray(tokens, dtype=np.float32)
    original = np.asarray(attention_mask, dtype=np.int64)
    batch, length, _ = tokens.shape
    pad_lengths = original.argmax(axis=1)  # left padding: where each text starts
    mask = original
    if prompt_length:
        positions = np.arange(length)[None, :]
        mask = np.where(positions < (pad_lengths + prompt_length)[:, None], 0, original)
    weights = mask[:, :, None].astype(np.float32)
    rows = np.arange(batch)
    out = []
    for mode in modes:
        if mode == "cls":
            out.append(tokens[rows, mask.argmax(axis=1)])
        elif mode == "max":
            out.append(np.where(weights > 0, tokens, -np.inf).max(axis=1).astype(np.float32))
        elif mode in ("mean", "mean_sqrt_len_tokens"):
            total = (tokens * weights).sum(axis=1)
            count = np.maximum(weights.sum(axis=1), np.float32(1e-9))
            out.append(total / (count if mode == "mean" else np.sqrt(count)))
        elif mode == "weightedmean":
            position = np.arange(1, length + 1, dtype=np.float32)[None, :, None]
            weighted = weights * (position - pad_lengths[:, None, None].astype(np.float32))
            total = (tokens * weighted).sum(axis=1)
            out.append(total / np.maximum(weighted.sum(axis=1), np.float32(1e-9)))
        elif mode == "lasttoken":
            flipped = mask[:, ::-1]
            last = np.where(flipped.max(axis=1) == 0, length - 1, flipped.argmax(axis=1))
            out.append((tokens * weights)[rows, length - last - 1])
        else:
            raise ValueError(f"unknown pooling mode {mode!r}")
    return np.concatenate(out, axis=-1).astype(np.float32, copy=False)


def _unit(vectors: Any) -> Any:
    """L2-normalised rows in FP32, as ``torch.nn.functional.normalize`` (eps 1e-12)."""
    import numpy as np

    norms = np.linalg.norm(vectors, axis=1, keepdims=True)
    return vectors / np.maximum(norms, np.float32(1e-12))


# -- export -------------------------------------------------------------------------------------


def _pipeline(spec: ModelSpec, model: Any) -> dict[str, Any]:
    """The parts of a SentenceTransformer the ONNX path reproduces, or a ConfigurationError."""
    modules = list(model)
    names = [type(m).__name__ for m in modules]

    def refuse(why: str) -> ConfigurationError:
        return ConfigurationError(
            f"{spec.model!r} {why}, which the ONNX embedder does not reproduce (it exports "
            f"Transformer -> Pooling -> optional Normalize); use backend={_FALLBACK!r}."
        )

    if names[:2] != ["Transformer", "Pooling"] or names[2:] not in ([], ["Normalize"]):
        raise refuse(f"has the modules {names}")
    transformer, pooling = modules[0], modules[1]
    if set(getattr(transformer, "modality_config", {"text": None})) != {"text"}:
        raise refuse("is not a text-only model")
    for attribute in ("query_length", "document_length", "query_expansion"):
        if getattr(transformer, attribute, None) is not None:
            raise refuse(f"sets {attribute}")
    if len(modules) == 3 and getattr(modules[2], "module_input_name", "sentence_embedding") != (
        "sentence_embedding"
    ):
        raise refuse("normalizes token embeddings")
    modes = pooling.pooling_mode
    modes = [modes] if isinstance(modes, str) else list(modes)
    if any(m not in POOLING_MODES for m in modes):
        raise refuse(f"pools with {modes}")
    return {
        "pooling": modes,
        "include_prompt": bool(getattr(pooling, "include_prompt", True)),
        "normalize": len(modules) == 3,
    }


def _export(spec: ModelSpec, model_dir: Path, final: Path, mode: str, opset: int) -> None:
    """Export (and quantize) ``spec``'s transformer into the cache entry ``final`` (atomically)."""
    import numpy as np

    start = time.perf_counter()
    file_name = file_option(spec)
    model = st_for_export(spec, model_dir, "SentenceTransformer")
    import torch  # after st_for_export: without torch, its error names the extra to install

    cap_to_positions(model, None, spec.model)  # the recorded max_length fits the position table
    pipeline = _pipeline(spec, model)
    transformer = model[0]
    tokenizer = transformer.tokenizer
    tokenizer_json = fast_tokenizer_json(spec, tokenizer, _FALLBACK)
    names = [n for n in tokenizer.model_input_names if n in ("input_ids", "attention_mask")]
    names += [n for n in tokenizer.model_input_names if n == "token_type_ids"]
    limit = model.max_seq_length
    meta: dict[str, Any] = {
        "format": FORMAT_VERSION,
        "model": spec.model,
        "mode": mode,
        "opset": opset,
        "inputs": names,
        **pipeline,
        "dimension": int(model[1].get_embedding_dimension()),
        "max_length": int(limit) if isinstance(limit, int) and 0 < limit < 1_000_000 else None,
        "positions": position_table_limit(model),
        **tokenizer_meta(tokenizer),
        "special_ids": sorted(int(i) for i in tokenizer.all_special_ids),
        "prompts": dict(model.prompts or {}),
        "default_prompt_name": model.default_prompt_name,
        "torch": torch.__version__,
    }
    if file_name is not None:  # the repository's own file, run as it is (_repo_file)
        meta["file_name"] = file_name

    class _Tokens(torch.nn.Module):
        def __init__(self, module: Any) -> None:
            super().__init__()
            self.module = module

        def forward(self, *tensors: Any) -> Any:
            return self.module(dict(zip(names, tensors, strict=True)))["token_embeddings"]

    with tmp_entry(final, tokenizer_json, meta) as tmp:
        if file_name is None:
            features = model.preprocess(_PROBES[:2])  # padded: the mask stays in the graph
            export_graph(
                _Tokens(transformer),
                tuple(features[n] for n in names),
                tmp,
                inputs=names,
                output="token_embeddings",
                output_axes={0: "batch", 1: "sequence"},
                mode=mode,
                opset=opset,
            )
        else:
            copy_file(repo_file(spec, model_dir, file_name), tmp)
        # Check token ids and vectors (with and without a prompt) before publishing anything.
        runtime = OnnxSentenceTransformer(tmp, threads=default_threads())
        if file_name is not None:  # optimum's output is "last_hidden_state"; ours differs
            outputs = [o.name for o in runtime.ensure_session().get_outputs()]
            runtime.output = meta["output"] = next(
                (n for n in ("token_embeddings", "last_hidden_state") if n in outputs), outputs[0]
            )
        for prompt in (None, "Represent this sentence for retrieval: "):
            task = Task("embed", prompt=prompt)  # a document: what encode_document does
            prepared = runtime.prepare(task, _PROBES)
            resolved = runtime.resolve_prompt(False, prompt)
            reference = model.preprocess(_PROBES, prompt=resolved, task="document")
            feed, mask, _ = prepared.payload
            for name, ids in {**feed, "attention_mask": mask}.items():
                if not same_tokens(ids, reference[name].numpy(), name):
                    raise ModelLoadError(
                        spec.model,
                        spec.backend,
                        f"the exported tokenizer's {name} differ from "
                        "SentenceTransformer.preprocess",
                    )
            want = model.encode_document(_PROBES, prompt=prompt, convert_to_numpy=True)
            got = np.asarray(runtime.finish(task, runtime.forward(task, prepared)))
            if got.shape != want.shape:
                runtime.close()
                raise ModelLoadError(
                    spec.model,
                    spec.backend,
                    f"the ONNX graph gives vectors of shape {list(got.shape)}, "
                    f"SentenceTransformer.encode {list(want.shape)}",
                )
            if mode == "float32" and file_name is None:
                error = float(np.abs(got - want).max())
                bad = error > 1e-3
            else:  # int8 (maybe a repository's file) moves every coordinate: directions
                cosine = (got * want).sum(1) / np.linalg.norm(got, axis=1)
                error = 1 - float((cosine / np.linalg.norm(want, axis=1)).min())
                bad = error > 0.1
            if bad:
                raise ModelLoadError(
                    spec.model,
                    spec.backend,
                    f"the ONNX export's vectors differ from SentenceTransformer.encode's "
                    f"({'max error' if mode == 'float32' else '1 - min cosine'} {error:.3g})",
                )
        # The graph's inputs, so a load never needs a session to know what to feed.
        meta["feeds"] = list(runtime._feeds)
        (tmp / "meta.json").write_text(json.dumps(meta, indent=1), encoding="utf-8")
        runtime.close()
        publish_export(spec, tmp, final, start)


# -- the loaded model ---------------------------------------------------------------------------


class OnnxSentenceTransformer(OnnxRuntimeModel, EmbedderModel):
    """A cached ONNX export of a SentenceTransformer's encoder; see the module docstring."""

    def __init__(
        self,
        entry: Path,
        *,
        threads: int,
        max_length: int | None = None,
        truncate_dim: int | None = None,
        default_prompt_name: str | None = None,
    ) -> None:
        """Open a published cache entry (see :class:`OnnxRuntimeModel`)."""
        super().__init__(entry, threads=threads, max_length=max_length)
        self.truncate_dim = truncate_dim
        self.prompts: dict[str, str] = dict(self.meta.get("prompts") or {})
        self.default_prompt_name = default_prompt_name or self.meta.get("default_prompt_name")
        self._feed_names: list[str] | None = list(self.meta.get("feeds") or ()) or None
        self._prompt_lengths: dict[str, int | None] = {}
        #: The graph's output: "token_embeddings" in our exports, a repository file's own name.
        self.output: str = str(self.meta.get("output") or "token_embeddings")

    @property
    def _feeds(self) -> list[str]:
        """The graph's inputs (the exporter drops inputs the model never reads): recorded in
        ``meta.json`` at export; an entry exported before that asks the session on first use
        (after an OpenVINO swap, the compiled model), so loading opens no onnxruntime session."""
        if self._feed_names is None:
            self._feed_names = [i.name for i in self.session.get_inputs()]
        return self._feed_names

    @property
    def dimension(self) -> int:
        return int(self.truncate_dim or self.meta["dimension"])

    def resolve_prompt(self, is_query: bool, prompt: str | None) -> str | None:
        """What ``encode_query``/``encode_document`` prepend: the explicit prompt, else the
        model's "query"/"document" prompt, else its default prompt (None: no prompt)."""
        if prompt is not None:
            return prompt
        name = "query" if is_query else "document"
        if name in self.prompts:
            return self.prompts[name]
        if self.default_prompt_name is not None:
            return self.prompts.get(self.default_prompt_name)
        return None

    def _prompt_length(self, prompt: str) -> int | None:
        """The prompt's tokens as pooling counts them (only for ``include_prompt=False``)."""
        if self.meta["include_prompt"]:
            return None
        if prompt not in self._prompt_lengths:
            ids = self.tokenizer.encode(prompt).ids
            drop = 1 if ids and ids[-1] in self.meta["special_ids"] else 0
            self._prompt_lengths[prompt] = len(ids) - drop
        return self._prompt_lengths[prompt]

    def embed(
        self,
        texts: Sequence[str],
        *,
        batch_size: int,
        is_query: bool,
        normalize: bool = False,
        prompt: str | None = None,
    ) -> list[list[float]]:
        task = Task("embed", is_query=is_query, normalize=normalize, prompt=prompt)
        step = max(1, batch_size)
        out: list[list[float]] = []
        for start in range(0, len(texts), step):
            batch = self.prepare(task, texts[start : start + step])
            out.extend(self.finish(task, self.forward(task, batch)))
        return out

    # -- two phases ------------------------------------------------------------------------

    def prepare(self, task: Task, items: Sequence[Any]) -> Prepared:
        prompt = self.resolve_prompt(task.is_query, task.prompt)
        arrays = self.tokenize([prompt + str(t) if prompt else str(t) for t in items])
        feed = {n: arrays[n] for n in self._feeds}
        mask = arrays["attention_mask"]
        prompt_length = self._prompt_length(prompt) if prompt else None
        return Prepared((feed, mask, prompt_length), len(items), int(mask.size), int(mask.sum()))

    def forward(self, task: Task, batch: Prepared) -> Any:
        feed, mask, prompt_length = batch.payload
        tokens = self.session.run([self.output], feed)[0]
        return tokens, mask, prompt_length

    def finish(self, task: Task, pending: Any) -> list[Any]:
        tokens, mask, prompt_length = pending
        vectors = pool(tokens, mask, self.meta["pooling"], prompt_length)
        if self.meta["normalize"]:  # the model's own Normalize module
            vectors = _unit(vectors)
        if self.truncate_dim is not None:
            vectors = vectors[:, : self.truncate_dim]
        if task.normalize:
            vectors = _unit(vectors)
        rows: list[list[float]] = vectors.tolist()
        return rows


# -- loader -------------------------------------------------------------------------------------


def _truncate_dim(spec: ModelSpec) -> int | None:
    value = spec.option("truncate_dim")
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ConfigurationError(f"truncate_dim must be a positive int, got {value!r}.")
    return value


def _file_key(spec: ModelSpec) -> dict[str, str]:
    """The cache key's part for option ``file_name``: an entry per file and contents."""
    file_name = file_option(spec)
    if file_name is None:
        return {}
    return {"file": located(spec, file_name)[1]}


def load(spec: ModelSpec, provider: ModelProvider) -> OnnxSentenceTransformer:
    check_cpu_float32(spec, _FALLBACK)
    threads = threads_for(spec)
    truncate_dim = _truncate_dim(spec)
    default_prompt_name = spec.option("default_prompt_name")
    model: OnnxSentenceTransformer = cached_entry(
        spec,
        format_version=FORMAT_VERSION,
        export=_export,
        open_entry=lambda entry: OnnxSentenceTransformer(
            entry,
            threads=threads,
            max_length=spec.max_length,
            truncate_dim=truncate_dim,
            default_prompt_name=default_prompt_name,
        ),
        threads=threads,
        kind="sentence-transformer",
        **_file_key(spec),
    )
    if default_prompt_name is not None and default_prompt_name not in model.prompts:
        model.close()
        raise ConfigurationError(
            f"default_prompt_name={default_prompt_name!r} is not one of the model's prompts "
            f"{sorted(model.prompts)}; pass one of those or leave it out."
        )
    if truncate_dim is not None and truncate_dim > model.meta["dimension"]:
        model.close()
        raise ConfigurationError(
            f"truncate_dim={truncate_dim} exceeds the model's dimension "
            f"{model.meta['dimension']}; pass a smaller one or leave it out."
        )
    return model
