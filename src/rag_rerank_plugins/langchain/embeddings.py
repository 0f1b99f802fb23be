"""``SharedEmbeddings``: LangChain ``Embeddings`` on a shared embedder handle."""

from __future__ import annotations

import numbers

# First: a clear MissingDependencyError when langchain-core is missing, not a bare ImportError.
from . import _compat  # noqa: F401  # isort: skip

import weakref
from collections.abc import Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, Literal

from langchain_core.embeddings import Embeddings
from pydantic import AliasChoices, ConfigDict, Field, PrivateAttr, model_validator

from .._exitsafe import to_thread
from .._progress import chunks, progress_bar
from .._stock import check_truncate_dim, refusal
from ..adapter_base import SharedModelFields, from_settings, sync_override
from ..exceptions import ConfigurationError, InvalidInputError
from ..inputs import text_list

if TYPE_CHECKING:
    from ..pool import ModelPool

__all__ = ["SharedEmbeddings"]


def _document_texts(texts: Any) -> list[str]:
    """``texts`` as a list of str, checked before the model loads (:func:`text_list`)."""
    example = repr(texts) if isinstance(texts, str) and len(texts) <= 40 else "text"
    return text_list(
        texts,
        "embed_documents",
        f"Wrap it in a list: embed_documents([{example}]) (or embed_query({example}) for a query).",
    )


#: ``SentenceTransformer.encode`` arguments that ``encode_kwargs`` / ``query_encode_kwargs`` may
#: hold, and the adapter field each one sets (None: read per call from the dict, see
#: :meth:`SharedEmbeddings._call_settings`). Queries: only normalisation has a field.
_ENCODE_KEYS: dict[str, str | None] = {
    "normalize_embeddings": "normalize_embeddings",
    "batch_size": "batch_size",
    "show_progress_bar": "show_progress",
    "device": "device",
    "prompt": None,
    "prompt_name": None,
    "precision": None,
    "truncate_dim": None,
    "convert_to_numpy": None,
    "convert_to_tensor": None,
    "output_value": None,
    "task": None,
    "pool": None,
    "chunk_size": None,
}
_QUERY_ENCODE_KEYS = {
    **_ENCODE_KEYS,
    "normalize_embeddings": "query_normalize_embeddings",
    "batch_size": None,  # one query is one batch: accepted, nothing to set
    "show_progress_bar": None,
    "device": "device",
}
_PRECISIONS = ("float32", "int8", "uint8", "binary", "ubinary")


def _set_once(data: dict[str, Any], field: str, value: Any, source: str) -> None:
    """``data[field] = value`` unless the caller set ``field`` to something else."""
    if field in data and data[field] != value:
        raise ConfigurationError(
            f"{field}={data[field]!r} and {source}={value!r} disagree; give it once."
        )
    data[field] = value


def _check_encode_value(argument: str, key: str, value: Any) -> None:
    """Values ``encode`` would take but that cannot apply here, refused with what to do."""
    where = f"{argument}[{key!r}]"
    if key == "output_value" and value != "sentence_embedding":
        raise ConfigurationError(
            f"{where}={value!r}: embeddings are one vector per text (HuggingFaceEmbeddings fails "
            "on anything but 'sentence_embedding' too); leave it out."
        )
    if key == "precision" and value not in _PRECISIONS:
        raise ConfigurationError(f"{where}={value!r}: use one of {', '.join(_PRECISIONS)}.")
    if key == "truncate_dim":
        check_truncate_dim(value, where)
    if key in ("prompt", "prompt_name") and value is not None and not isinstance(value, str):
        raise ConfigurationError(f"{where} must be a str or None, got {type(value).__name__}.")
    if key == "batch_size" and (
        isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1
    ):
        raise ConfigurationError(f"{where}={value!r}: use a positive int (e.g. 32).")
    if key == "task" and value not in (None, "query", "document"):
        raise ConfigurationError(f"{where}={value!r}: use 'query' or 'document'.")
    if (key == "pool" and value is not None) or (key == "device" and isinstance(value, list)):
        raise ConfigurationError(
            f"{where}: multi-process encoding; " + refusal("HuggingFaceEmbeddings", "multi_process")
        )


def _check_encode_kwargs(argument: str, kwargs: Any, table: Mapping[str, str | None]) -> None:
    """``encode_kwargs`` / ``query_encode_kwargs``: a dict of keys ``table`` knows, with values
    ``encode`` would take (at construction, and per call: they are read per call)."""
    if not isinstance(kwargs, dict):
        raise ConfigurationError(f"{argument} must be a dict, got {type(kwargs).__name__}.")
    unknown = sorted(set(kwargs) - set(table))
    if unknown:
        raise ConfigurationError(
            f"{argument} key(s) {', '.join(map(repr, unknown))} have no meaning here. Supported "
            f"(SentenceTransformer.encode's): {', '.join(sorted(table))}. Tokenizer settings are "
            "fixed per model (max_length=), not per call."
        )
    for key, value in kwargs.items():
        _check_encode_value(argument, key, value)


def _map_encode_kwargs(
    data: dict[str, Any], argument: str, table: Mapping[str, str | None]
) -> dict[str, Any]:
    kwargs = data.get(argument)
    if kwargs is None:
        data[argument] = {}
        return data
    _check_encode_kwargs(argument, kwargs, table)
    for key, value in kwargs.items():
        field = table[key]
        # None is encode's "not given" for these (HuggingFaceEmbeddings passes it on: no
        # normalisation); as a field value it was a pydantic "valid boolean" error.
        if field is not None and not (key in ("device", "normalize_embeddings") and value is None):
            _set_once(data, field, value, f"{argument}[{key!r}]")
    if argument == "query_encode_kwargs" and kwargs:
        # As HuggingFaceEmbeddings: non-empty query_encode_kwargs *replace* encode_kwargs for
        # queries, so a normalisation given only in encode_kwargs does not apply to queries.
        data.setdefault("query_normalize_embeddings", False)
    return data


def _check_call_truncation(data: Mapping[str, Any]) -> None:
    """Refuse a per-call ``truncate_dim`` wider than ``model_kwargs["truncate_dim"]``.

    ``encode(truncate_dim=64)`` on a model built with ``truncate_dim=32`` returns 64 dimensions
    (the call's value replaces the model's); the shared model's vectors are already cut to 32,
    so ours were 32 wide: a silent shape change. Narrower per-call values cut further, as there.
    """
    model_kwargs = data.get("model_kwargs")
    model_dim = model_kwargs.get("truncate_dim") if isinstance(model_kwargs, Mapping) else None
    if not isinstance(model_dim, int) or isinstance(model_dim, bool):
        return
    for argument in ("encode_kwargs", "query_encode_kwargs"):
        call_dim = (data.get(argument) or {}).get("truncate_dim")
        if isinstance(call_dim, int) and call_dim > model_dim:
            raise ConfigurationError(
                f"{argument}['truncate_dim']={call_dim} is wider than model_kwargs['truncate_dim']"
                f"={model_dim}: the shared model's vectors are cut to {model_dim} dimensions. "
                f"Give the wider value in model_kwargs and the narrower one per call."
            )


def _query_text(text: Any) -> str:
    if not isinstance(text, str):
        raise InvalidInputError(
            f"embed_query takes one str, got {type(text).__name__}. "
            "Use embed_documents for a list of texts."
        )
    return text


class SharedEmbeddings(SharedModelFields, Embeddings):
    """Embeddings for vector stores and retrievers; one model per process however many instances.

    A drop-in for langchain-huggingface's ``HuggingFaceEmbeddings``: every argument is taken with
    the same meaning (``model_name``, ``cache_folder``, ``model_kwargs`` with
    sentence-transformers' loader arguments, ``encode_kwargs`` / ``query_encode_kwargs`` with
    ``encode``'s, ``show_progress``;
    ``multi_process=True`` is refused with what to do instead), and vectors equal its vectors:
    newlines become spaces, and texts are embedded as ``SentenceTransformer.encode`` embeds them,
    so **without** the model's "query"/"document" prompts (only its ``default_prompt_name`` one,
    or the ``prompt`` / ``prompt_name`` of the encode kwargs). An index built with the stock class
    keeps matching queries after the swap. ``model_prompts=True`` opts in to the model's query and
    document prompts (``encode_query`` / ``encode_document``: better retrieval for E5/BGE-style
    models, for a new index). ``prompt=""`` turns every prompt off.
    """

    model_config = ConfigDict(
        arbitrary_types_allowed=True,
        protected_namespaces=(),
        populate_by_name=True,
        extra="forbid",
        hide_input_in_errors=True,  # a token or a URL's password would show (the start of it)
    )
    _kind = "embedder"
    _st_model_kwargs = True

    model: str = Field(
        default_factory=from_settings("embedder_model"),
        validation_alias=AliasChoices("model", "model_name"),
        description="Hub name or local path.",
    )
    backend: str = Field(default_factory=from_settings("embedder_backend"))
    batch_size: int = Field(default_factory=from_settings("batch_size"), gt=0)
    normalize_embeddings: bool = Field(default=False, description="Scale vectors to unit length.")
    show_progress: bool = Field(
        default=False,
        description="Show a tqdm bar (on stderr) while embed_documents works through the texts.",
    )
    query_normalize_embeddings: bool | None = Field(
        default=None,
        description="Unit-length query vectors? None: as normalize_embeddings. Set by "
        "HuggingFaceEmbeddings' query_encode_kwargs={'normalize_embeddings': ...}.",
    )
    encode_kwargs: dict[str, Any] = Field(
        default_factory=dict,
        description="SentenceTransformer.encode arguments for documents (and queries, unless "
        "query_encode_kwargs is given): prompt, prompt_name, precision, truncate_dim, "
        "normalize_embeddings, batch_size, show_progress_bar, ... as in HuggingFaceEmbeddings.",
    )
    query_encode_kwargs: dict[str, Any] = Field(
        default_factory=dict,
        description="encode arguments for queries; when not empty they replace encode_kwargs "
        "for queries (as in HuggingFaceEmbeddings).",
    )
    multi_process: Literal[False] = Field(
        default=False, description="Accepted at False only (see the refusal message)."
    )
    model_prompts: bool = Field(
        default=False,
        description="True: queries get the model's 'query' prompt and documents its 'document' "
        "prompt (encode_query/encode_document). False (default, as HuggingFaceEmbeddings): only "
        "the model's default prompt, or encode_kwargs' prompt/prompt_name.",
    )
    replace_newlines: bool = Field(
        default=True,
        description="Replace '\\n' with ' ' before embedding, as HuggingFaceEmbeddings does.",
    )
    #: spec -> (the handle read, its model's prompts): a reload (after a release) may bring new
    #: prompts, so an entry holds only for the handle it was read from.
    _prompt_cache: dict[Any, tuple[Any, tuple[dict[str, str] | None, str | None]]] = PrivateAttr(
        default_factory=dict
    )
    #: The normalisation fields read from encode_kwargs / query_encode_kwargs at construction:
    #: for them the kwargs decide per call (a key removed since means encode's default).
    _from_kwargs: frozenset[str] = PrivateAttr(default=frozenset())

    if TYPE_CHECKING:

        def __init__(
            self,
            *,
            model: str = ...,
            model_name: str = ...,
            backend: str = ...,
            batch_size: int = ...,
            normalize_embeddings: bool = False,
            show_progress: bool = False,
            query_normalize_embeddings: bool | None = None,
            encode_kwargs: dict[str, Any] | None = ...,
            query_encode_kwargs: dict[str, Any] | None = ...,
            multi_process: Literal[False] = False,
            model_prompts: bool = False,
            replace_newlines: bool = True,
            cache_folder: str | None = None,
            device: str | None = ...,
            dtype: str = ...,
            max_length: int | None = None,
            model_kwargs: dict[str, Any] = ...,
            pool: ModelPool | None = None,
            priority: Literal["interactive", "bulk"] = "interactive",
        ) -> None:
            """For type checkers only (runtime: pydantic's): they do not read validation
            aliases or before-validators, so ``model_name=`` and ``cache_folder=``
            (HuggingFaceEmbeddings' arguments) were false errors."""

    def __getstate__(self) -> dict[Any, Any]:
        state = super().__getstate__()
        private = dict(state.get("__pydantic_private__") or {})
        private["_prompt_cache"] = {}  # weak references to this process's handles: re-read
        return {**state, "__pydantic_private__": private}

    @model_validator(mode="after")
    def _note_fields_from_kwargs(self) -> SharedEmbeddings:
        lifted = set()
        if self.encode_kwargs.get("normalize_embeddings") is not None:
            lifted.add("normalize_embeddings")
        if self.query_encode_kwargs.get("normalize_embeddings") is not None:
            lifted.add("query_normalize_embeddings")
        self._from_kwargs = frozenset(lifted)
        return self

    @model_validator(mode="before")
    @classmethod
    def _migrate_hf_embeddings_kwargs(cls, data: Any) -> Any:
        """Take ``HuggingFaceEmbeddings``' arguments with their meaning, and say what to do
        instead where there is none (rather than pydantic's bare "Extra inputs are not
        permitted"): encode_kwargs / query_encode_kwargs, cache_folder, multi_process."""
        if not isinstance(data, dict):
            return data
        data = dict(data)
        if data.get("multi_process"):
            raise ConfigurationError(refusal("HuggingFaceEmbeddings", "multi_process"))
        data.pop("multi_process", None)
        data = _map_encode_kwargs(data, "encode_kwargs", _ENCODE_KEYS)
        data = _map_encode_kwargs(data, "query_encode_kwargs", _QUERY_ENCODE_KEYS)
        _check_call_truncation(data)
        if "cache_folder" in data:
            folder = data.pop("cache_folder")
            kwargs = dict(data.get("model_kwargs") or {})
            if folder is not None:
                if kwargs.get("cache_folder", folder) != folder:
                    raise ConfigurationError(
                        f"cache_folder={folder!r} and model_kwargs['cache_folder']="
                        f"{kwargs['cache_folder']!r} disagree; give it once."
                    )
                kwargs["cache_folder"] = folder  # the sentence-transformers backend option
                data["model_kwargs"] = kwargs
        return data

    # HuggingFaceEmbeddings' attribute names, read back as there: code that logs
    # ``embeddings.model_name`` or uses it as a CacheBackedEmbeddings namespace keeps working.
    @property
    def model_name(self) -> str:
        """The model's hub name or local path: :attr:`model` under ``HuggingFaceEmbeddings``'
        name (settable too, as there)."""
        return self.model

    @model_name.setter
    def model_name(self, value: str) -> None:
        self.model = value

    @property
    def cache_folder(self) -> Any:
        """The ``cache_folder`` given (None: the Hugging Face cache), as ``HuggingFaceEmbeddings``
        reports it; held as the loading option ``model_kwargs["cache_folder"]``."""
        return self.model_kwargs.get("cache_folder")

    def _own(self, name: str) -> bool | None:
        """A normalisation field as set on this object; None where it was only read from the
        encode kwargs at construction (a key removed from them since must not linger here)."""
        return None if name in self._from_kwargs else getattr(self, name)

    def _normalize_queries(self) -> bool:
        query = self._own("query_normalize_embeddings")
        return bool(self._own("normalize_embeddings")) if query is None else query

    def _normalize_for(self, is_query: bool, kwargs: Mapping[str, Any]) -> bool:
        """Whether one call normalises, read per call as HuggingFaceEmbeddings reads it: from
        the call's encode kwargs (so model_copy(update=...) and in-place changes apply, a
        removed key included), else False for queries with their own query_encode_kwargs (they
        replace encode_kwargs), else the fields set on this object."""
        if "normalize_embeddings" in kwargs:
            return bool(kwargs["normalize_embeddings"])
        if is_query and self.query_encode_kwargs:
            return bool(self._own("query_normalize_embeddings"))
        return self._normalize_queries() if is_query else bool(self._own("normalize_embeddings"))

    def _call_kwargs(self, is_query: bool) -> dict[str, Any]:
        """The encode arguments of one call kind (queries: query_encode_kwargs when given),
        checked as at construction: read per call, as HuggingFaceEmbeddings reads them, they
        may have changed since (``model_copy(update=...)``, assignment, an in-place edit), and
        an unknown key or a value ``encode`` refuses was silently ignored."""
        use_query = is_query and bool(self.query_encode_kwargs)
        argument = "query_encode_kwargs" if use_query else "encode_kwargs"
        kwargs = self.query_encode_kwargs if use_query else self.encode_kwargs
        _check_encode_kwargs(argument, kwargs, _QUERY_ENCODE_KEYS if use_query else _ENCODE_KEYS)
        _check_call_truncation({"model_kwargs": self.model_kwargs, argument: kwargs})
        return kwargs

    def _texts(self, texts: Sequence[str]) -> list[str]:
        return [t.replace("\n", " ") for t in texts] if self.replace_newlines else list(texts)

    def _named_prompts(self) -> tuple[dict[str, str] | None, str | None]:
        """The loaded model's (prompts, default_prompt_name); (None, None) for a backend without
        named prompts (its own prompt handling applies). Loads the model on first use."""
        spec = self._checked_spec(self.spec)
        handle, model = self._model_lookup(spec)  # a dict lookup once loaded
        cached = self._prompt_cache.get(spec)
        if cached is None or cached[0]() is not handle:
            prompts = getattr(model, "prompts", None)
            default = getattr(model, "default_prompt_name", None)
            named = (dict(prompts) if isinstance(prompts, Mapping) else None, default)
            cached = self._prompt_cache[spec] = (weakref.ref(handle), named)
        return cached[1]

    def _resolve(self, kwargs: Mapping[str, Any], named: Any) -> str | None:
        """The prompt string for the backend, as ``SentenceTransformer.encode`` resolves it:
        the explicit prompt, else the named one, else the default prompt, else ``""`` (none).
        None lets the backend choose (its query/document prompt): only with model_prompts."""
        prompt, name = kwargs.get("prompt"), kwargs.get("prompt_name")
        if prompt is not None:
            return str(prompt)
        if self.model_prompts and name is None:
            return None
        prompts, default = named() if callable(named) else named
        if prompts is None:
            if name is not None:
                raise ConfigurationError(
                    f"prompt_name={name!r}: backend {self.backend!r} has no named prompts; pass "
                    "the prompt text as prompt=... instead."
                )
            return None
        chosen = name if name is not None else default
        if chosen is None:
            return ""
        if name is not None and name not in prompts:
            raise ConfigurationError(
                f"Prompt name {name!r} not found in the model's prompts {sorted(prompts)!r}; add "
                "it with model_kwargs={'prompts': {...}} or pass prompt=... instead."
            )
        return prompts.get(chosen) or ""

    def _needs_prompts(self, kwargs: Mapping[str, Any]) -> bool:
        return kwargs.get("prompt") is None and (
            not self.model_prompts or kwargs.get("prompt_name") is not None
        )

    def _finish(
        self, vectors: list[list[float]], kwargs: Mapping[str, Any], normalize: bool
    ) -> list[list[float]]:
        """Per-call truncation (then normalisation, as encode does) and precision, over the
        whole call (int8/uint8 ranges come from the call's own vectors, as in encode)."""
        truncate = kwargs.get("truncate_dim")
        precision = kwargs.get("precision") or "float32"
        if truncate is None and precision == "float32":
            return vectors
        import numpy as np

        array = np.asarray(vectors, dtype=np.float32)
        if truncate is not None:
            array = array[:, :truncate]
            if normalize:
                norms = np.linalg.norm(array, axis=1, keepdims=True)
                array = array / np.maximum(norms, 1e-12)
        if precision != "float32" and len(array):
            array = _quantize()(array, precision=precision)
        result: list[list[float]] = array.tolist()
        return result

    def _plan(self, is_query: bool, named: Any) -> tuple[Mapping[str, Any], str | None, bool, bool]:
        kwargs = self._call_kwargs(is_query)
        normalize = self._normalize_for(is_query, kwargs)
        # Normalise after a per-call truncation, so the backend returns raw vectors then.
        in_backend = normalize and kwargs.get("truncate_dim") is None
        return kwargs, self._resolve(kwargs, named), normalize, in_backend

    def embed_documents(self, texts: Iterable[str]) -> list[list[float]]:
        """One vector per text, in order; ``texts`` is a list or any iterable of str (read once,
        before the model loads)."""
        items = self._texts(_document_texts(texts))
        if not items:
            return []
        kwargs, prompt, normalize, in_backend = self._plan(False, self._named_prompts)
        spec, kw = self.spec, {"normalize": in_backend, "prompt": prompt}
        if not self.show_progress:
            vectors = self._pool_embed(spec, items, self.batch_size, **kw)
        else:
            vectors = []
            with progress_bar(len(items), "Embedding documents", enabled=True) as bar:
                for chunk in chunks(items, self.batch_size):
                    vectors.extend(self._pool_embed(spec, chunk, self.batch_size, **kw))
                    bar.update(len(chunk))
        return self._finish(vectors, kwargs, normalize)

    def embed_query(self, text: str) -> list[float]:
        text = self._texts([_query_text(text)])[0]
        kwargs, prompt, normalize, in_backend = self._plan(True, self._named_prompts)
        vectors = self._pool_embed(
            self.spec, [text], self.batch_size, is_query=True, normalize=in_backend, prompt=prompt
        )
        return self._finish(vectors, kwargs, normalize)[0]

    async def _anamed(self, is_query: bool) -> tuple[dict[str, str] | None, str | None]:
        if not self._needs_prompts(self._call_kwargs(is_query)):
            return None, None
        return await to_thread(self._named_prompts)  # may load: off the event loop

    async def aembed_documents(self, texts: Iterable[str]) -> list[list[float]]:
        if sync_override(self, SharedEmbeddings, "embed_documents", "aembed_documents"):
            return await to_thread(self.embed_documents, texts)  # as stock: the override
        items = self._texts(_document_texts(texts))
        if not items:
            return []
        kwargs, prompt, normalize, in_backend = self._plan(False, await self._anamed(False))
        spec, kw = self.spec, {"normalize": in_backend, "prompt": prompt}
        if not self.show_progress:
            vectors = await self._pool_aembed(spec, items, self.batch_size, **kw)
        else:
            vectors = []
            with progress_bar(len(items), "Embedding documents", enabled=True) as bar:
                for chunk in chunks(items, self.batch_size):
                    vectors.extend(await self._pool_aembed(spec, chunk, self.batch_size, **kw))
                    bar.update(len(chunk))
        return self._finish(vectors, kwargs, normalize)

    async def aembed_query(self, text: str) -> list[float]:
        if sync_override(self, SharedEmbeddings, "embed_query", "aembed_query"):
            return await to_thread(self.embed_query, text)  # as stock: the override
        text = self._texts([_query_text(text)])[0]
        kwargs, prompt, normalize, in_backend = self._plan(True, await self._anamed(True))
        vectors = await self._pool_aembed(
            self.spec, [text], self.batch_size, is_query=True, normalize=in_backend, prompt=prompt
        )
        return self._finish(vectors, kwargs, normalize)[0]


def _quantize() -> Any:
    """sentence-transformers' ``quantize_embeddings``: from ``util.quantization`` where it lives
    now (importing the old ``sentence_transformers.quantization`` warns of its removal)."""
    try:
        from sentence_transformers.util.quantization import quantize_embeddings
    except ImportError:  # releases before the move
        from sentence_transformers.quantization import quantize_embeddings
    return quantize_embeddings
