"""Option names that several backends read through shared code: the registry rows build on them.

Each built-in backend declares the option names its loader reads in its own registry row (in
:mod:`rag_rerank_plugins.backends`); the registry checks a spec's options against that row once,
before any loader runs. A row lists its backend's own names and adds the groups below, which
are read by shared helpers (:mod:`._onnx_common`, :mod:`._last_token`, the remote settings)
rather than by one backend, so they are written once. Plain data, no imports: the registry
stays cheap to import.
"""

from __future__ import annotations

__all__ = ["HF_LOADING", "ONNX_EXPORT", "REMOTE_OPTIONS", "ST_LOADING"]


#: Keyword arguments of sentence-transformers' loaders that are plain values (hashable, one per
#: spec) and only change where/which weights load. Dict-valued ones (model_kwargs,
#: config_kwargs, tokenizer/processor_kwargs, prompts) are left out: a spec freezes a dict into a
#: tuple of pairs, which the loaders would reject at load time. So is ``token``: a spec is shown
#: in stats, metrics and logs, and the hub reads HF_TOKEN / ``hf auth login`` by itself.
ST_LOADING = frozenset({"trust_remote_code", "revision", "cache_folder", "local_files_only"})
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
        "query_prompt_name",
        "max_request_bytes",
        "max_connections",
        "verify",
    }
)
