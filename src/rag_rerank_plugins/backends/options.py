"""Option names each built-in backend reads: the one list the registry and the loaders share.

The registry checks an adapter's backend options against these when the adapter is built (a typo
fails where it was written, not at the first request's load); the loaders validate against the
same sets, so the two can never disagree. Plain data, no imports: the registry stays cheap.
"""

from __future__ import annotations

__all__ = [
    "CAUSAL_LM_OPTIONS",
    "CAUSAL_LM_PROMPT",
    "CROSS_ENCODER_OPTIONS",
    "FAKE_OPTIONS",
    "FLAG_LLM_OPTIONS",
    "FLAG_LLM_PREPROCESSING",
    "FLAG_M3_OPTIONS",
    "FLAG_RERANKER_OPTIONS",
    "HF_LOADING",
    "ONNX_EMBEDDER_OPTIONS",
    "ONNX_OPTIONS",
    "REMOTE_OPTIONS",
    "ST_EMBEDDER_OPTIONS",
    "ST_LOADING",
]


#: Keyword arguments of sentence-transformers' loaders that are plain values (hashable, one per
#: spec) and only change where/which weights load. Dict-valued ones (model_kwargs,
#: config_kwargs, tokenizer/processor_kwargs, prompts) are left out: a spec freezes a dict into a
#: tuple of pairs, which the loaders would reject at load time. So is ``token``: a spec is shown
#: in stats, metrics and logs, and the hub reads HF_TOKEN / ``hf auth login`` by itself.
ST_LOADING = frozenset({"trust_remote_code", "revision", "cache_folder", "local_files_only"})
#: The fakes stand in for real models in users' tests, so they take (and ignore) the loading
#: options a real model would get: switching a test to backend="fake-..." changes nothing else.
#: Their own options (``delay_ms``, ``dim``, ``footprint_mb``: the simulated size a pool with a
#: memory budget sees) are declared with them in the registry.
FAKE_OPTIONS = ST_LOADING | {"score_mode"}
#: cross_encoder.py: score_mode, quantize, cpu_kernels and prune_last_layer are ours; the rest
#: goes to CrossEncoder(...).
CROSS_ENCODER_OPTIONS = ST_LOADING | {"score_mode", "quantize", "cpu_kernels", "prune_last_layer"}
#: st_embedder.py: quantize and cpu_kernels are ours; the rest goes to SentenceTransformer(...).
ST_EMBEDDER_OPTIONS = ST_LOADING | {
    "quantize",
    "cpu_kernels",
    "truncate_dim",
    "default_prompt_name",
}
#: flag.py: the FlagReranker / BGEM3FlagModel keyword arguments the loaders pass on (and
#: cpu_kernels, and the reranker's score_mode and prune_last_layer, which are ours).
FLAG_RERANKER_OPTIONS = frozenset(
    {
        "score_mode",
        "prune_last_layer",
        "cpu_kernels",
        "query_max_length",
        "query_instruction_for_rerank",
        "query_instruction_format",
        "passage_instruction_for_rerank",
        "passage_instruction_format",
        "trust_remote_code",
        "cache_dir",
    }
)
FLAG_M3_OPTIONS = frozenset(
    {
        "cpu_kernels",
        "query_max_length",
        "query_instruction_for_retrieval",
        "query_instruction_format",
        "normalize_embeddings",
        "pooling_method",
        "colbert_dim",
        "trust_remote_code",
        "cache_dir",
    }
)
#: ``from_pretrained`` options of the LLM rerankers' tokenizer and model (plain values, as above).
HF_LOADING = frozenset({"trust_remote_code", "revision", "cache_dir", "local_files_only"})
#: causal_lm.py: the prompt's slots and answer tokens (CausalLMReranker keyword arguments)...
CAUSAL_LM_PROMPT = frozenset(
    {"system", "prefix", "template", "suffix", "instruction", "yes_token", "no_token"}
)
#: ... with the score mode and the loading options.
CAUSAL_LM_OPTIONS = HF_LOADING | CAUSAL_LM_PROMPT | {"score_mode"}
#: flag_llm.py: FlagEmbedding's LLM reranker pre-processing (FlagLLMReranker keyword arguments)...
FLAG_LLM_PREPROCESSING = frozenset(
    {
        "prompt",
        "query_max_length",
        "query_instruction_for_rerank",
        "query_instruction_format",
        "passage_instruction_for_rerank",
        "passage_instruction_format",
    }
)
#: ... with the score mode, the layer to read (layer-wise models) and which of the two model
#: classes it is (read from the model's config when absent).
FLAG_LLM_OPTIONS = (
    HF_LOADING | FLAG_LLM_PREPROCESSING | {"score_mode", "model_class", "cutoff_layers"}
)
#: onnx.py: sentence-transformers loading options (used when exporting) and ours.
ONNX_OPTIONS = ST_LOADING | {
    "score_mode",
    "quantize",
    "opset",
    "cache_dir",
    "intra_op_threads",
    "prune_last_layer",
}
#: onnx_embedder.py: the same export and thread options, plus the sentence-transformers
#: embedder's own truncate_dim and default_prompt_name (applied at run time, not exported).
ONNX_EMBEDDER_OPTIONS = (ONNX_OPTIONS - {"score_mode", "prune_last_layer"}) | {
    "truncate_dim",
    "default_prompt_name",
}
#: remote/settings.py: RemoteSettings.from_spec reads these.
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
