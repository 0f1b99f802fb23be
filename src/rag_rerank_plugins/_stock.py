"""The stock classes' arguments: the one refusal list, and sentence-transformers' keyword
arguments (``model_kwargs=`` of LangChain's classes) mapped to ours with the same meaning.

Adoption is one line: swap the stock class for ours. So every argument of the five stock classes
(langchain-community ``HuggingFaceCrossEncoder``, langchain-classic ``CrossEncoderReranker``,
langchain-huggingface ``HuggingFaceEmbeddings``, llama-index ``SentenceTransformerRerank`` and
``HuggingFaceEmbedding``) is honoured, mapped to a spec field, a backend option, the tokenizer,
the encode call or the adapter. The few that cannot apply to a shared pool are listed in
:data:`REFUSED`, once, with what to use instead; ``tests/test_stock_signatures_*.py`` fail when
a stock argument is neither handled nor listed here. Plain data and dict rewriting: no imports
beyond the exceptions, so adapters stay cheap to build.
"""

from __future__ import annotations

from collections.abc import Container, Mapping
from typing import Any

from .exceptions import ConfigurationError

__all__ = [
    "REFUSED",
    "check_truncate_dim",
    "hf_model_kwargs",
    "refusal",
    "st_backend",
]

_SERVE = (
    "the shared pool already batches concurrent requests into one model per process; for "
    "several processes, GPUs or machines sharing one model, run `rag-rerank serve` (one per "
    "device) and use backend='remote-embedder'"
)

#: ``(stock class, argument) -> what to use instead``: the whole refusal list (at most three).
#: A refused argument is accepted at its default (``multi_process=False``) and refused otherwise.
REFUSED: dict[tuple[str, str], str] = {
    ("HuggingFaceEmbeddings", "multi_process"): _SERVE,
    ("HuggingFaceEmbedding", "parallel_process"): _SERVE,
}


def refusal(owner: str, argument: str, value: Any = None) -> str:
    """The message for a refused stock argument (``value``, when given, is shown)."""
    instead = REFUSED[(owner, argument)]
    shown = f" ({value!r})" if value is not None else ""
    return f"{owner}'s {argument}{shown} is not supported: {instead}."


#: Deprecated names sentence-transformers still accepts, by loader ("reranker": CrossEncoder's
#: ``cross_encoder_init_args_decorator``; "embedder": SentenceTransformer's).
_ALIASES = {
    "reranker": {
        "automodel_args": "model_kwargs",
        "tokenizer_args": "processor_kwargs",
        "tokenizer_kwargs": "processor_kwargs",
        "config_args": "config_kwargs",
        "cache_dir": "cache_folder",
        "default_activation_function": "activation_fn",
        "use_auth_token": "token",  # a secret as the embedder's (migration.md promises both)
    },
    "embedder": {"tokenizer_kwargs": "processor_kwargs", "use_auth_token": "token"},
}
#: sentence-transformers' ``backend=`` -> ours, per kind ("ipex": HuggingFaceEmbeddings warns
#: and uses torch).
_BACKENDS = {
    "reranker": {"onnx": "onnx-cross-encoder", "openvino": "openvino-cross-encoder"},
    "embedder": {"onnx": "onnx-sentence-transformers", "openvino": "openvino-embedder"},
}
_TORCH = {"reranker": "cross-encoder", "embedder": "sentence-transformers"}
#: Loader arguments whose default means "not given": dropped, so the spec equals one without it.
_DEFAULTS = {
    "trust_remote_code": False,
    "local_files_only": False,
    "use_kernels": False,
    "revision": None,
    "cache_folder": None,
    "token": None,
    "modules": None,
    "prompts": None,
    "default_prompt_name": None,
    "kernel_config": None,
    "truncate_dim": None,
    "keep_in_fp32_modules": None,
    "activation_fn": None,
}
#: Only describe the model (the model card; ``similarity()``, which LangChain never calls):
#: never change a loaded weight, a score or a vector, so they are accepted and not kept.
_NO_EFFECT = frozenset({"model_card_data", "similarity_fn_name"})
_DTYPE_KEYS = ("dtype", "torch_dtype")


def check_truncate_dim(value: Any, source: str) -> None:
    """Refuse a ``truncate_dim`` that is not a positive int or None, before any model work.

    sentence-transformers slices ``vectors[:, :truncate_dim]`` unchecked: 0 gave empty vectors,
    -1 cut the last dimension (and our shape check then blamed the backend), a float or a str
    failed deep in torch at the first call. ``source`` names the argument in the message.
    """
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value <= 0):
        raise ConfigurationError(
            f"{source} must be a positive int (how many leading dimensions to keep) or None, "
            f"got {value!r}."
        )


def _put(data: dict[str, Any], key: str, value: Any, source: str) -> None:
    if data.get(key) is not None and data[key] != value:
        raise ConfigurationError(
            f"{key}={data[key]!r} and {source}={value!r} disagree; give it once."
        )
    data[key] = value


def _dict(value: Any, source: str) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise ConfigurationError(f"{source} must be a dict, got {type(value).__name__}.")
    return dict(value)


def _activation(value: Any) -> str | None:
    """torch.nn.Identity -> "raw", torch.nn.Sigmoid -> "sigmoid" (our score_mode, the same on
    every reranker backend); None for any other activation, handed to CrossEncoder itself."""
    cls = type(value)
    if not cls.__module__.startswith("torch.nn"):
        return None
    return {"Identity": "raw", "Sigmoid": "sigmoid"}.get(cls.__name__)


def _backend(data: dict[str, Any], kind: str, value: Any, source: str) -> None:
    if value in (None, "torch", "ipex"):
        data.setdefault("backend", _TORCH[kind])
        return
    ours = _BACKENDS[kind].get(value) if isinstance(value, str) else None
    if ours is None:
        raise ConfigurationError(
            f"{source}={value!r}: sentence-transformers' backends are 'torch', 'onnx' and "
            "'openvino'; ours are chosen with backend= (see available_backends())."
        )
    from .backends import available_backends

    if ours not in available_backends():
        raise ConfigurationError(
            f"{source}={value!r} runs on our {ours!r} backend, which this installation does not "
            f"have; install the extra that provides it (pip install 'rag-rerank-plugins[{value}]') "
            "or leave backend at 'torch'."
        )
    _put(data, "backend", ours, source)


#: Our runtimes behind sentence-transformers' ``backend="onnx"`` / ``"openvino"``.
_RUNTIMES = frozenset(name for names in _BACKENDS.values() for name in names.values())
#: ``ov_config``'s precision hint -> our dtype.
_OV_PRECISIONS = {"f32": "float32", "bf16": "bfloat16"}


def st_backend(data: dict[str, Any], kind: str) -> dict[str, Any]:
    """``data`` with a top-level ``backend`` in sentence-transformers' sense ("torch", "onnx",
    "openvino": what ``CrossEncoder(name, backend=...)`` takes) read as that: our torch backend
    for the kind, or the runtime that serves the same files. Our own names pass unchanged."""
    value = data.get("backend")
    if value not in ("torch", "onnx", "openvino", "ipex"):
        return data
    data = dict(data)
    del data["backend"]
    _backend(data, kind, value, "backend")
    return data


def _runtime_kwargs(
    data: dict[str, Any], kind: str, nested: dict[str, Any], options: dict[str, Any]
) -> None:
    """sentence-transformers' ONNX / OpenVINO loading arguments (``nested``: its
    ``model_kwargs``) -> our options, with the same meaning:

    * ``file_name`` (with ``subfolder``): run that file of the repository instead of our export
      (option ``file_name``): an ONNX file (e.g. ``onnx/model_qint8_avx512_vnni.onnx``), or with
      ``backend="openvino"`` an IR (``openvino/openvino_model_qint8_quantized.xml``).
    * ``export``: True ignores ``file_name`` (sentence-transformers exports from the weights
      then, as ours always does); False is its default.
    * ``provider``: onnxruntime's CPU provider only (our ONNX runtimes run on the CPU).
    * ``ov_config``: a dict or a JSON file of OpenVINO settings; ``INFERENCE_PRECISION_HINT``
      sets ``dtype``, the rest is handed to OpenVINO's compile (option ``ov_config``).
    """
    backend = data["backend"]
    export = nested.pop("export", None)
    if export is not None and not isinstance(export, bool):
        raise ConfigurationError(
            f"model_kwargs['model_kwargs']['export'] must be a bool, got {export!r}."
        )
    file_name = nested.pop("file_name", None)
    subfolder = nested.pop("subfolder", None)
    provider = nested.pop("provider", None)
    if provider not in (None, "CPUExecutionProvider"):
        raise ConfigurationError(
            f"model_kwargs['model_kwargs']['provider']={provider!r}: our {backend!r} backend runs "
            "on the CPU (onnxruntime's CPUExecutionProvider, or OpenVINO's CPU plugin). For a "
            "GPU use backend='torch' (ours: 'cross-encoder' / 'sentence-transformers') with "
            "device='cuda'."
        )
    ov_config = nested.pop("ov_config", None)
    if ov_config is not None:
        _ov_config(data, backend, ov_config, options)
    if file_name is not None and not export:
        from .backends._repo_file import check_file_name

        source = "model_kwargs['model_kwargs']['file_name']"
        name = str(file_name)
        if subfolder:
            name = f"{str(subfolder).strip('/')}/{name}"
        name = check_file_name(name, (".onnx", ".xml"), source)
        if name.endswith(".xml") and not backend.startswith("openvino"):
            raise ConfigurationError(
                f"model_kwargs['model_kwargs']['file_name']={file_name!r} is an OpenVINO IR: "
                "run it with backend='openvino'."
            )
        _put(options, "file_name", name, source)


def _ov_config(data: dict[str, Any], backend: str, value: Any, options: dict[str, Any]) -> None:
    source = "model_kwargs['model_kwargs']['ov_config']"
    if not backend.startswith("openvino"):
        raise ConfigurationError(f"{source} is for backend='openvino'; {backend!r} is onnxruntime.")
    if not isinstance(value, Mapping):  # sentence-transformers: a dict or a path to a JSON file
        import json
        from pathlib import Path

        try:
            value = json.loads(Path(value).read_text(encoding="utf-8"))
        except (OSError, TypeError, ValueError) as exc:
            raise ConfigurationError(
                f"{source}={value!r} must be a dict or the path of a JSON file holding one "
                f"({type(exc).__name__}: {exc})."
            ) from None
        if not isinstance(value, Mapping):
            raise ConfigurationError(f"{source}: the JSON file must hold an object.")
    config = {str(k): v for k, v in value.items()}
    hint = config.pop("INFERENCE_PRECISION_HINT", None)
    if hint is not None:
        dtype = _OV_PRECISIONS.get(str(hint).lower())
        if dtype is None:
            raise ConfigurationError(
                f"{source}['INFERENCE_PRECISION_HINT']={hint!r}: ours runs 'f32' or 'bf16' "
                f"(dtype='float32' / 'bfloat16')."
            )
        _put(data, "dtype", dtype, f"{source}['INFERENCE_PRECISION_HINT']")
    if config:
        _put(options, "ov_config", config, source)


def hf_model_kwargs(data: dict[str, Any], kind: str, fields: Container[str]) -> dict[str, Any]:
    """``data`` with ``data["model_kwargs"]`` read as LangChain's classes read it: keyword
    arguments of ``CrossEncoder`` (``kind="reranker"``) or ``SentenceTransformer``
    (``"embedder"``). Each becomes what means the same here:

    * ``device``, ``max_length``, ``backend`` ("onnx"/"openvino" -> our runtimes) and the dtype
      inside the nested transformers ``model_kwargs`` -> spec fields;
    * ``activation_fn`` Sigmoid/Identity -> ``score_mode``; ``num_labels`` and
      ``classifier_dropout`` -> ``config_kwargs`` (as CrossEncoder does); deprecated names ->
      current ones; defaults and ``None`` dropped (one spec for "given at its default" and "not
      given");
    * the rest (``token``, ``config_kwargs``, ``processor_kwargs``, ``prompts``, ...) stay backend
      options, handed to the loader (a ``token`` never shown, see ``spec.Secret``).

    ``fields`` are the adapter's field names: ``score_mode`` goes to the field when there is one.
    """
    kwargs = data.get("model_kwargs")
    if not isinstance(kwargs, Mapping):
        return data
    data, kw = dict(data), dict(kwargs)
    ours = data.get("backend") not in (None, _TORCH[kind])
    for old, new in _ALIASES[kind].items():
        if old in kw and not (ours and old == "cache_dir"):
            # (Our ONNX / OpenVINO / flag / LLM backends take cache_dir as their own option.)
            value = kw.pop(old)
            if value is None:  # not given, as sentence-transformers reads it
                continue
            if kw.get(new) is not None and kw[new] != value:
                raise ConfigurationError(
                    f"model_kwargs[{old!r}] (the old name of {new!r}) and model_kwargs[{new!r}] "
                    "disagree; give it once."
                )
            kw[new] = value
    if kind == "reranker":
        config = _dict(kw.pop("config_kwargs", None), "model_kwargs['config_kwargs']")
        for key in ("num_labels", "classifier_dropout"):
            if kw.get(key) is not None:
                _put(config, key, kw.pop(key), f"model_kwargs[{key!r}]")
            kw.pop(key, None)
        if config:
            kw["config_kwargs"] = config
    if kind == "embedder" and "truncate_dim" in kw:
        check_truncate_dim(kw["truncate_dim"], "truncate_dim")
    if "backend" in kw:
        _backend(data, kind, kw.pop("backend"), "model_kwargs['backend']")
    nested = _dict(kw.pop("model_kwargs", None), "model_kwargs['model_kwargs']")
    if data.get("backend") in _RUNTIMES:
        _runtime_kwargs(data, kind, nested, kw)
    for key in _DTYPE_KEYS:
        if key in nested:
            given = nested.pop(key)
            # None is transformers' "not given" (``torch_dtype=torch.float16 if gpu else None``).
            value = "auto" if given is None else str(given).removeprefix("torch.")
            if value != "auto":  # theirs: the checkpoint's dtype; ours: chosen per device
                _put(data, "dtype", value, f"model_kwargs['model_kwargs'][{key!r}]")
    if nested:
        kw["model_kwargs"] = nested
    if kw.get("activation_fn") is not None:
        if not callable(kw["activation_fn"]):
            raise ConfigurationError(
                f"model_kwargs['activation_fn']={kw['activation_fn']!r} must be a callable such "
                "as torch.nn.Sigmoid() (as CrossEncoder takes it); or use score_mode='sigmoid' "
                "or score_mode='raw'."
            )
        mode = _activation(kw["activation_fn"])
        if mode is not None:
            kw.pop("activation_fn")
            target = data if "score_mode" in fields else kw
            _put(target, "score_mode", mode, "model_kwargs['activation_fn']")
    for key in list(kw):
        if key in _NO_EFFECT or (key in _DEFAULTS and kw[key] == _DEFAULTS[key]):
            del kw[key]
    lift_spec_fields(data, kw)
    data["model_kwargs"] = kw
    return data


def _device_name(device: Any) -> str:
    """A device as compared for a contradiction: as a spec names it (``torch.device("cpu")``,
    ``"CPU"`` and ``" cpu"`` agree, so do ``"cuda"`` and ``"cuda:0"``); a device no spec takes
    as written, for the spec to refuse later."""
    from .spec import _normalize_device

    try:
        return _normalize_device(device)
    except ConfigurationError:
        return str(device).strip().lower()


def lift_spec_fields(data: dict[str, Any], kw: dict[str, Any]) -> None:
    """Move ``device`` and ``max_length`` out of a loader's keyword arguments ``kw`` into the
    adapter's fields ``data`` (both are spec fields; left in ``kw``, ``max_length`` reached
    ``CrossEncoder(...)`` twice). A ``device`` or ``max_length`` given both ways must agree."""
    device = kw.pop("device", None)
    if device is not None:
        explicit = data.get("device")
        if explicit is not None and _device_name(explicit) != _device_name(device):
            raise ConfigurationError(
                f"device={explicit!r} and model_kwargs['device']={device!r} disagree; give the "
                "device once, as device=."
            )
        data["device"] = explicit if explicit is not None else device
    max_length = kw.pop("max_length", None)
    if max_length is not None:
        explicit = data.get("max_length")
        if explicit is not None and explicit != max_length:
            raise ConfigurationError(
                f"max_length={explicit!r} and model_kwargs['max_length']={max_length!r} "
                "disagree; give the token limit once, as max_length=."
            )
        data["max_length"] = max_length
