"""The stock LlamaIndex classes' arguments, translated to our fields with the same meaning.

``SentenceTransformerRerank`` (llama-index-postprocessor-sbert-rerank) and
``HuggingFaceEmbedding`` (llama-index-embeddings-huggingface) are the classes users swap for
ours. Their constructors take arguments our fields name differently or hold elsewhere:
positional arguments, ``cross_encoder_kwargs`` (keyword arguments of sentence-transformers'
``CrossEncoder``), ``HuggingFaceEmbedding``'s ``**model_kwargs`` (keyword arguments of
``SentenceTransformer``; its ``model_kwargs`` is the *transformers* model's), deprecated
arguments, and ``backend`` in sentence-transformers' sense ("torch", "onnx", "openvino"). This
module rewrites a constructor's keyword dict into our fields once, before validation, so every
path (``__init__``, ``model_validate``, ``from_dict``) means the same as the stock class.
Anything that cannot apply to a shared pool is refused with the message of the shared list
(:mod:`rag_rerank_plugins._stock`).
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Mapping, Sequence
from typing import Any

from .._model_files import json_int_field
from ..exceptions import ConfigurationError

__all__ = [
    "EMBEDDING_POSITIONAL",
    "RERANK_POSITIONAL",
    "ST_EMBEDDER_KWARGS",
    "STOCK_RERANK_MAX_LENGTH",
    "bind_positional",
    "default_query_instruction",
    "default_text_instruction",
    "embedding_arguments",
    "rerank_arguments",
    "rerank_default_max_length",
]

#: ``SentenceTransformerRerank.__init__``'s parameters, in order (all may be given positionally).
RERANK_POSITIONAL = (
    "model",
    "device",
    "cache_folder",
    "top_n",
    "keep_retrieval_score",
    "cross_encoder_kwargs",
)
#: ``HuggingFaceEmbedding.__init__``'s parameters before ``**model_kwargs``, in order.
EMBEDDING_POSITIONAL = (
    "model_name",
    "tokenizer_name",
    "pooling",
    "max_length",
    "query_instruction",
    "text_instruction",
    "normalize",
    "model",
    "tokenizer",
    "embed_batch_size",
    "cache_folder",
    "trust_remote_code",
    "device",
    "callback_manager",
    "parallel_process",
    "target_devices",
    "show_progress_bar",
)

#: ``SentenceTransformerRerank`` gives ``CrossEncoder`` ``max_length=512`` unless
#: ``cross_encoder_kwargs`` names one (``DEFAULT_SENTENCE_TRANSFORMER_MAX_LENGTH``), so a model with
#: 1024 positions still reads 512 tokens.
STOCK_RERANK_MAX_LENGTH = 512

#: ``SentenceTransformer(...)`` keyword arguments that ``HuggingFaceEmbedding(**model_kwargs)``
#: passes on (those it sets itself, such as ``prompts`` and ``device``, fail there as here).
ST_EMBEDDER_KWARGS = frozenset(
    {
        "modules",
        "default_prompt_name",
        "revision",
        "local_files_only",
        "token",
        "use_auth_token",
        "processor_kwargs",
        "config_kwargs",
        "use_kernels",
        "kernel_config",
        "model_card_data",
        "similarity_fn_name",
        "truncate_dim",
        "tokenizer_kwargs",  # sentence-transformers' deprecated name of processor_kwargs
    }
)
# HuggingFaceEmbedding: BGE and Instructor names get a default instruction (its utils module).
_BGE_QUERY_EN = "Represent this question for searching relevant passages: "
_BGE_QUERY_ZH = "为这个句子生成表示以用于检索相关文章\uff1a"  # ends in a full-width colon
_INSTRUCTOR_QUERY = "Represent the question for retrieving supporting documents: "
_INSTRUCTOR_TEXT = "Represent the document for retrieval: "
_BGE_MODELS = frozenset(
    f"BAAI/bge-{size}-{lang}{version}"
    for size in ("small", "base", "large")
    for lang in ("en", "zh")
    for version in ("", "-v1.5")
)
_INSTRUCTOR_MODELS = frozenset(
    f"{org}/instructor-{size}" for org in ("hku-nlp", "hkunlp") for size in ("base", "large", "xl")
)


def default_query_instruction(model_name: str) -> str:
    """HuggingFaceEmbedding's query prompt when ``query_instruction`` is None or ''."""
    if model_name in _INSTRUCTOR_MODELS:
        return _INSTRUCTOR_QUERY
    if model_name in _BGE_MODELS:
        return _BGE_QUERY_ZH if "zh" in model_name else _BGE_QUERY_EN
    return ""


def default_text_instruction(model_name: str) -> str:
    """HuggingFaceEmbedding's document prompt when ``text_instruction`` is None or ''."""
    return _INSTRUCTOR_TEXT if model_name in _INSTRUCTOR_MODELS else ""


def bind_positional(
    owner: str, names: Sequence[str], args: Sequence[Any], data: dict[str, Any]
) -> dict[str, Any]:
    """``data`` plus ``args`` bound to ``names`` in order, as Python binds the stock signature."""
    if len(args) > len(names):
        raise ConfigurationError(
            f"{owner} takes at most {len(names)} positional arguments ({', '.join(names)}), "
            f"got {len(args)}."
        )
    bound = dict(data)
    for name, value in zip(names, args, strict=False):
        if name in bound:
            raise ConfigurationError(
                f"{owner} got {name!r} twice (positionally and as a keyword); pass it once."
            )
        bound[name] = value
    return bound


def _st_backend(value: Any) -> bool:
    """True for sentence-transformers' own backend names (ours are longer: "cross-encoder", ...)."""
    return value in ("torch", "onnx", "openvino", "ipex")


def _deprecated(data: dict[str, Any], names: Sequence[str], hint: Mapping[str, str]) -> None:
    """HuggingFaceEmbedding raises ValueError for these unless left at "deprecated"."""
    for name in names:
        if name in data:
            value = data.pop(name)
            if value != "deprecated":
                raise ConfigurationError(
                    f"{name} is deprecated (HuggingFaceEmbedding raises for it too): remove it"
                    f"{hint.get(name, '')}."
                )


def _refuse_parallel(data: dict[str, Any]) -> None:
    parallel = data.pop("parallel_process", False)
    devices = data.pop("target_devices", None)  # read by HuggingFaceEmbedding only with parallel
    if parallel:
        from .._stock import refusal

        raise ConfigurationError(refusal("HuggingFaceEmbedding", "parallel_process", devices))


#: Fields that are also backend options: given in both places, they must agree (bad-input L05).
_FIELD_OPTIONS = ("trust_remote_code", "cache_folder")


def _fields_from_model_kwargs(data: dict[str, Any]) -> None:
    """``trust_remote_code`` / ``cache_folder`` given in ``model_kwargs`` move to their fields
    (one spelling, one pool key: ``model_kwargs={"trust_remote_code": False}`` is the default);
    given in both places with different values, refused, never one picked. Checked on the
    arguments as given, before they are translated: the translation moved the option out of
    ``model_kwargs`` (or kept the field's), so ``True`` won silently and remote code ran where
    the user had turned it off."""
    options = data.get("model_kwargs")
    if not isinstance(options, Mapping) or not any(key in options for key in _FIELD_OPTIONS):
        return
    options = dict(options)
    for key in _FIELD_OPTIONS:
        if key not in options:
            continue
        option = options.pop(key)
        if option is None:  # not given
            continue
        if key in data:
            field, given = data[key], option
            if key == "cache_folder" and given is not None and field is not None:
                field, given = os.fspath(field), os.fspath(given)
            if field != given:
                raise ConfigurationError(
                    f"{key}={data[key]!r} contradicts model_kwargs[{key!r}]={option!r}; pass "
                    "only one."
                )
        data[key] = option
    data["model_kwargs"] = options


def embedding_arguments(data: Any) -> Any:
    """HuggingFaceEmbedding's keyword arguments -> SharedEmbedding's fields (same meaning).

    Its ``**model_kwargs`` (:data:`ST_EMBEDDER_KWARGS`, ``backend`` in sentence-transformers'
    sense, and ``model_kwargs``: the transformers model's) are gathered into one dict of
    ``SentenceTransformer`` keyword arguments and translated by the shared
    :func:`rag_rerank_plugins._stock.hf_model_kwargs` (as for LangChain's classes). Any other
    unknown name is left for the unknown-argument check (a typo gets a suggestion).
    """
    if not isinstance(data, dict):
        return data
    data = dict(data)
    _fields_from_model_kwargs(data)
    _deprecated(
        data,
        ("tokenizer_name", "pooling", "model", "tokenizer"),
        {"model": " and name the model with model_name=..."},
    )
    _refuse_parallel(data)
    if data.get("max_length") == 0:  # HuggingFaceEmbedding: `if max_length:`, 0 = the model's own
        data["max_length"] = None
    if data.get("cache_folder") is not None:
        data["cache_folder"] = os.fspath(data["cache_folder"])
    st_kwargs = {k: data.pop(k) for k in list(data) if k in ST_EMBEDDER_KWARGS}
    if not data.get("model_prompts"):
        # No effect on text there: HuggingFaceEmbedding always names its "query"/"text" prompt.
        st_kwargs.pop("default_prompt_name", None)
    if _st_backend(data.get("backend")):
        st_kwargs["backend"] = data.pop("backend")
    model_kwargs = data.pop("model_kwargs", None)
    if model_kwargs is not None:
        st_kwargs.update(_own_options(model_kwargs, data.get("backend")))
    if not st_kwargs:
        return data
    return _translate(data, st_kwargs, "embedder", "")


def _translate(data: dict[str, Any], kwargs: dict[str, Any], kind: str, source: str) -> Any:
    """sentence-transformers keyword arguments ``kwargs`` -> our fields and backend options
    (the shared translation), added to the options ``data`` already has."""
    from .._stock import hf_model_kwargs

    own = data.pop("model_kwargs", None) or {}
    translated = hf_model_kwargs({**data, "model_kwargs": kwargs}, kind, _FIELDS[kind])
    merged = dict(own)
    for key, value in translated.get("model_kwargs", {}).items():
        if key in merged and merged[key] != value:
            raise ConfigurationError(
                f"{source or 'argument'} {key}={value!r} contradicts model_kwargs[{key!r}]="
                f"{merged[key]!r}; give it once."
            )
        merged[key] = value
    translated["model_kwargs"] = merged
    return translated


#: The adapter fields :func:`hf_model_kwargs` may write besides the options.
_FIELDS = {
    "reranker": frozenset({"score_mode", "max_length", "device", "dtype", "backend"}),
    "embedder": frozenset({"max_length", "device", "dtype", "backend"}),
}


def _own_options(model_kwargs: Any, backend: Any) -> dict[str, Any]:
    """HuggingFaceEmbedding's ``model_kwargs`` as sentence-transformers keyword arguments:
    names that are our backend's options (trust_remote_code, revision, ...: SharedEmbedding's
    meaning, the same there) stay options; the rest is the transformers model's
    ``model_kwargs`` (HuggingFaceEmbedding's meaning: dtype, attn_implementation, ...)."""
    if not isinstance(model_kwargs, Mapping):
        raise ConfigurationError(
            f"model_kwargs must be a dict of transformers from_pretrained arguments, got "
            f"{type(model_kwargs).__name__}."
        )
    from ..backends import backend_info
    from ..exceptions import UnknownBackendError

    try:
        known = backend_info(backend or "sentence-transformers").options
    except UnknownBackendError:
        known = None
    if known is None:
        return dict(model_kwargs)
    own = {k: v for k, v in model_kwargs.items() if k in known and k != "model_kwargs"}
    nested = {k: v for k, v in model_kwargs.items() if k not in own}
    if isinstance(nested.get("model_kwargs"), Mapping):  # already nested: keep both levels
        nested = {**nested.pop("model_kwargs"), **nested}
    if nested:
        own["model_kwargs"] = nested
    return own


def _own_max_length(data: dict[str, Any], kwargs: dict[str, Any]) -> None:
    """``cross_encoder_kwargs={"max_length": None}``: handed to ``CrossEncoder`` as it is, which
    means the model's own limit, not the 512 the stock class gives when the key is absent. Our
    field's None means that 512, so the model's own limit is written as a number where this
    machine knows it (its config files); where not, the 512 stays and a warning says so."""
    kwargs.pop("max_length")
    if data.get("max_length") is not None:
        return  # given as our field too: that one is the limit
    model = data.get("model")
    revision = kwargs.get("revision")
    cache_folder = data.get("cache_folder") or kwargs.get("cache_folder")
    own = None
    if isinstance(model, str):
        own = _limits(
            model,
            revision if isinstance(revision, str) else None,
            cache_folder if isinstance(cache_folder, str) else None,
            kwargs.get("processor_kwargs"),
        )[1]
    if own is None:
        warnings.warn(
            f"cross_encoder_kwargs={{'max_length': None}} asks for {model!r}'s own token limit, "
            f"which its files on this machine do not say: reading {STOCK_RERANK_MAX_LENGTH} "
            "tokens. Give max_length= to choose.",
            stacklevel=4,
        )
        return
    data["max_length"] = own


def rerank_arguments(data: Any) -> Any:
    """SentenceTransformerRerank's keyword arguments -> SharedRerankPostprocessor's fields:
    ``cross_encoder_kwargs`` (``CrossEncoder`` keyword arguments) through the shared
    translation, as LangChain's ``HuggingFaceCrossEncoder(model_kwargs=...)``."""
    if not isinstance(data, dict):
        return data
    data = dict(data)
    _fields_from_model_kwargs(data)
    if data.get("cache_folder") is not None:
        data["cache_folder"] = os.fspath(data["cache_folder"])
    if "cross_encoder_kwargs" not in data:
        return data
    kwargs = data.pop("cross_encoder_kwargs") or {}
    if not isinstance(kwargs, Mapping):
        raise ConfigurationError(
            f"cross_encoder_kwargs must be a dict of CrossEncoder keyword arguments, got "
            f"{type(kwargs).__name__}."
        )
    if "device" in kwargs or "model" in kwargs:
        raise ConfigurationError(
            "'device' and 'model' should not be specified in 'cross_encoder_kwargs'. Use the "
            "top-level 'device' and 'model' parameters instead (as in SentenceTransformerRerank)."
        )
    kwargs = dict(kwargs)
    # SentenceTransformerRerank: a truthy top-level cache_folder wins over the kwargs' one.
    if data.get("cache_folder"):
        kwargs.pop("cache_folder", None)
    if "max_length" in kwargs and kwargs["max_length"] is None:
        _own_max_length(data, kwargs)
    if not kwargs:
        return data
    if _st_backend(data.get("backend")):
        kwargs.setdefault("backend", data.pop("backend"))
    return _translate(data, kwargs, "reranker", "cross_encoder_kwargs")


def _limits(
    model: str, revision: str | None, cache_folder: str | None, processor_kwargs: Any
) -> tuple[int | None, int | None]:
    """``(positions, own)``: the model's ``max_position_embeddings`` (config.json), and the
    token limit sentence-transformers gives it when none is asked for: the smaller of that and
    the tokenizer's ``model_max_length`` (tokenizer_config.json, or ``processor_kwargs``' when
    given; XLM-R: 514 positions, 512 tokens). None where unknown on this machine."""
    positions = json_int_field(
        model, "config.json", "max_position_embeddings", revision, cache_folder
    )
    tokenizer = json_int_field(
        model, "tokenizer_config.json", "model_max_length", revision, cache_folder
    )
    if isinstance(processor_kwargs, dict):
        given = processor_kwargs.get("model_max_length")
        if isinstance(given, int) and not isinstance(given, bool):
            tokenizer = given
    limits = [n for n in (positions, tokenizer) if n is not None]
    return positions, (min(limits) if limits else None)


def rerank_default_max_length(
    model: str, revision: Any, cache_folder: str | None, processor_kwargs: Any = None
) -> int | None:
    """SentenceTransformerRerank's token limit when none is given: ``max_length=512`` handed to
    CrossEncoder, which overrides the tokenizer's own (smaller) limit too. Where the model's own
    limit is that same number (512 tokens, or as many positions as it has when fewer), None: the
    same truncation, and the same pool key as the LangChain adapters' (one load for both). Below
    512 positions the stock class fails on a long passage; we truncate at the positions instead.
    A tokenizer limit below it (``model_max_length=128``) is not the model's: stock reads 512."""
    positions, own = _limits(
        model, revision if isinstance(revision, str) else None, cache_folder, processor_kwargs
    )
    stock = (
        STOCK_RERANK_MAX_LENGTH if positions is None else min(STOCK_RERANK_MAX_LENGTH, positions)
    )
    if own is not None and own == stock:
        return None
    return stock
