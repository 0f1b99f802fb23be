"""Option names that several backends read through shared code: the registry rows build on them.

Each built-in backend declares the option names its loader reads in its own registry row (in
:mod:`rag_rerank_plugins.backends`); the registry checks a spec's options against that row once,
before any loader runs. A row lists its backend's own names and adds the groups below, which
are read by shared helpers (:mod:`._onnx_common`, :mod:`._last_token`, the remote settings)
rather than by one backend, so they are written once. Plain data, no imports: the registry
stays cheap to import.
"""

from __future__ import annotations

__all__ = [
    "CLASSIFIER_SCORES",
    "HF_LOADING",
    "ONNX_EXPORT",
    "REMOTE_OPTIONS",
    "ST_CROSS_ENCODER",
    "ST_EMBEDDER",
    "ST_LOADING",
    "ST_MODEL",
]


#: Keyword arguments of sentence-transformers' loaders that are plain values and only change
#: where/which weights load: what every backend loading through sentence-transformers reads
#: (the ONNX ones when exporting, the fakes to stand in for a real model).
ST_LOADING = frozenset({"trust_remote_code", "revision", "cache_folder", "local_files_only"})
#: The rest of ``SentenceTransformer(...)``'s and ``CrossEncoder(...)``'s shared keyword
#: arguments, handed through unchanged by the torch backends: the nested dicts (a spec holds them
#: frozen, :func:`~rag_rerank_plugins.spec.freeze`, and the loader gets plain dicts back; the
#: transformers ``model_kwargs`` are merged with the dtype, see ``_torch_common``), the prompts,
#: kernels, ``modules`` and the hub ``token`` (a secret: kept out of the pool key, its label,
#: stats and logs, see :class:`~rag_rerank_plugins.spec.Secret`).
ST_MODEL = ST_LOADING | {
    "token",
    "model_kwargs",
    "config_kwargs",
    "processor_kwargs",
    "prompts",
    "default_prompt_name",
    "use_kernels",
    "kernel_config",
    "modules",
}
#: ``CrossEncoder(...)``'s own on top: an activation that is neither Sigmoid nor Identity (those
#: two are ``score_mode``), and the layers kept in FP32.
ST_CROSS_ENCODER = ST_MODEL | {"activation_fn", "keep_in_fp32_modules"}
#: ``SentenceTransformer(...)``'s own on top (``truncate_dim`` is also read at run time).
ST_EMBEDDER = ST_MODEL | {"truncate_dim"}
#: How a classification reranker (cross-encoder, ONNX cross-encoder, flag-reranker) turns its
#: logits into one score: which label (``score_label``, see ``_common.label_index``) and the
#: activation (``score_mode``). The same names, values and meaning on each of them.
CLASSIFIER_SCORES = frozenset({"score_mode", "score_label"})
#: ``from_pretrained`` options of the LLM rerankers' tokenizer and model (plain values, as above;
#: :func:`~._last_token.load_causal_lm` reads them).
HF_LOADING = frozenset({"trust_remote_code", "revision", "cache_dir", "local_files_only"})
#: What both ONNX backends read through :mod:`._onnx_common`: the sentence-transformers loading
#: options (used when exporting), the int8 mode, the opset, the export cache and the threads.
ONNX_EXPORT = ST_LOADING | {"quantize", "opset", "cache_dir", "intra_op_threads"}
#: Both remote backends: ``RemoteSettings.from_spec`` (remote/settings.py) reads these.
REMOTE_OPTIONS = frozenset(
    {
        "url",
        "model_name",
        "protocol",
        "timeout",
        "connect_timeout",
        "retries",
        "backoff",
        "max_backoff",
        "api_key_env",
        "truncate",
        "truncation_direction",
        "query_prompt_name",
        "max_request_bytes",
        "max_connections",
        "verify",
    }
)
