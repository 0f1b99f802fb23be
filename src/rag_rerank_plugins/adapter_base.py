"""Fields and behaviour every framework adapter shares: spec building, pool access, reranking.

An adapter is a cheap, pydantic-validated *description* of a model plus per-call settings. It
never holds the weights: each call asks the pool, which is why building one per request costs
microseconds and why ``release()`` frees memory even while adapters exist.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Callable, Mapping, Sequence
from contextlib import AbstractContextManager
from typing import TYPE_CHECKING, Any, ClassVar, Literal, cast

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PrivateAttr,
    ValidationInfo,
    field_serializer,
    field_validator,
    model_validator,
)
from pydantic.json_schema import SkipJsonSchema

from ._exitsafe import to_thread
from ._stock import hf_model_kwargs, lift_spec_fields, st_backend
from .backend_choice import choose_backend, is_auto, note_failed_pick, torch_backend
from .backends import backend_info, check_options
from .exceptions import (
    ConfigurationError,
    InvalidInputError,
    MissingDependencyError,
    ModelLoadError,
    ModelNotFoundError,
)
from .handle import ModelHandle
from .pool import ModelPool, get_pool
from .ranking import Ranked, rank, validate_threshold, validate_top_n
from .spec import SECRET_OPTIONS, ModelSpec, Secret, redact_urls
from .tracing import model_span
from .windows import WindowInfo, WindowPlan, WindowSettings, windower_for

if TYPE_CHECKING:
    from .backends.base import LoadedModel

__all__ = ["RerankSettings", "SharedModelFields", "from_settings", "sync_override"]

logger = logging.getLogger(__name__)

#: Longest ``rerank_error`` message put on a passed-through document.
_ERROR_CHARS = 200


def sync_override(obj: object, base: type, sync: str, async_: str) -> bool:
    """Whether the sync method ``obj`` would run is a user's override (a subclass of ``base``)
    whose class does not also define the async twin. The stock classes' async methods run the
    sync one in a thread, so such an override (a query prefix, a filter, a calibration) applied
    to async pipelines too; ours have their own async paths, which must then run the override
    the same way. Only the nearest class defining the sync method counts: an async override
    further down that calls ``super()`` still reaches it, as in stock; a class that defines
    both keeps our async path (its own async method is what runs). LlamaIndex's span decorator
    wraps methods, so they are compared unwrapped."""

    def plain(method: Any) -> Any:
        return getattr(method, "__wrapped__", method)

    for cls in type(obj).__mro__:
        if sync in vars(cls):
            if plain(vars(cls)[sync]) is plain(getattr(base, sync)):
                return False
            return async_ not in vars(cls)
    return False


def _hint(name: str, value: Any) -> str:
    """``; pass name=3`` when ``value`` is a str holding a number, else ``""``."""
    if isinstance(value, str):
        for parse in (int, float):
            try:
                return f"; pass {name}={parse(value.strip())!r}"
            except ValueError:
                continue
    return ""


def _strict_int(name: str, value: Any, *, allowed: str = "a positive int") -> Any:
    """``value`` unchanged unless it is a bool, str or float where an int belongs.

    Pydantic's lax mode turns ``top_n=True`` into 1 and ``batch_size="4"`` into 4, which hides
    the caller's bug (a flag passed in the wrong place, an unparsed environment variable).
    Runs before pydantic's own int validation, so the field's constraints still apply after it.
    """
    if isinstance(value, (bool, str, float)):
        raise ConfigurationError(
            f"{name} must be {allowed}, got {value!r} ({type(value).__name__}){_hint(name, value)}."
        )
    return value


def _strict_number(name: str, value: Any, *, allowed: str = "a number (int or float)") -> Any:
    """Like :func:`_strict_int` for float fields: ints are fine (1 means 1.0), str/bool are not."""
    if isinstance(value, (bool, str)):
        raise ConfigurationError(
            f"{name} must be {allowed}, got {value!r} ({type(value).__name__}){_hint(name, value)}."
        )
    return value


def _hide_secrets(value: Any) -> Any:
    """``value`` with every ``token``/``use_auth_token`` (at any depth) wrapped in a Secret."""
    if isinstance(value, dict):
        return {
            k: Secret(v) if k in SECRET_OPTIONS and v is not None else _hide_secrets(v)
            for k, v in value.items()
        }
    return value


def _shown_url(value: Any) -> Any:
    """A server URL as repr and dumps show it: one that construction refuses (credentials, a
    query string) as ``ModelSpec.label`` shows it; any other value as it is, so that a dump
    loads back the same adapter (an ``@`` in a URL's path, a prompt quoting a URL)."""
    from .backends.remote.settings import _refuse_url_secrets

    try:
        _refuse_url_secrets(value)
    except ConfigurationError:
        return redact_urls(value)
    return value


def _shown_kwargs(value: Any) -> Any:
    """``model_kwargs`` as repr and dumps show them: tokens hidden, the server URL shown."""
    value = _hide_secrets(value)
    if isinstance(value, dict) and "url" in value:
        return {**value, "url": _shown_url(value["url"])}
    return value


def _refusal(backend: str, options: Mapping[str, Any]) -> str | None:
    """Why ``backend`` refuses ``options`` (:func:`check_options`' message); None if it takes
    them all."""
    try:
        check_options(backend, options)
    except ConfigurationError as exc:
        return str(exc)
    return None


def _device_name(value: Any) -> Any:
    """``torch.device("cuda", 0)`` -> ``"cuda:0"``: the stock classes (and sentence-transformers)
    take torch's device objects as well as strings; torch is not imported to recognise one."""
    kind = type(value)
    return str(value) if kind.__module__ == "torch" and kind.__name__ == "device" else value


def _device_names(data: dict[str, Any]) -> dict[str, Any]:
    """``data`` with torch device objects as names where the adapters read a device: the
    ``device`` field and the ``device`` key of ``model_kwargs`` / ``encode_kwargs``."""
    data = {**data, "device": _device_name(data["device"])} if "device" in data else data
    for field in ("model_kwargs", "encode_kwargs", "query_encode_kwargs"):
        kwargs = data.get(field)
        if isinstance(kwargs, dict) and "device" in kwargs:
            data = {**data, field: {**kwargs, "device": _device_name(kwargs["device"])}}
    return data


def from_settings(name: str) -> Callable[[], Any]:
    """A ``default_factory`` reading field ``name`` of the cached process
    :class:`~rag_rerank_plugins.settings.Settings` (``RAG_RERANK_*`` variables, read once)."""

    def factory() -> Any:
        from .settings import get_settings  # pydantic-settings only once an adapter is built

        return getattr(get_settings(), name)

    factory.__name__ = f"settings.{name}"
    return factory


class SharedModelFields(BaseModel):
    """Mixin: what identifies the shared model (-> :class:`ModelSpec`) and which pool serves it.

    Subclasses say where the model name lives (``_model_field``) and which backend kind they need.
    """

    model_config = ConfigDict(
        arbitrary_types_allowed=True, protected_namespaces=(), hide_input_in_errors=True
    )

    _kind: ClassVar[str] = "reranker"
    _model_field: ClassVar[str] = "model"
    #: True where ``model_kwargs`` are sentence-transformers loader keyword arguments, as in
    #: LangChain's HuggingFaceCrossEncoder/HuggingFaceEmbeddings (see :mod:`._stock`).
    _st_model_kwargs: ClassVar[bool] = False

    backend: str = Field(
        description="Backend name, e.g. 'cross-encoder' or 'bi-encoder'; 'auto' picks the fastest "
        "measured for this CPU (rag_rerank_plugins.backend_choice)."
    )
    device: str = Field(
        default_factory=from_settings("device"),
        description="'auto', 'cpu', 'cuda', 'cuda:N' or 'mps' (default: RAG_RERANK_DEVICE, auto).",
    )
    dtype: str = Field(
        default_factory=from_settings("dtype"),
        description="'auto', 'float32', 'float16' or 'bfloat16' (default: RAG_RERANK_DTYPE, auto).",
    )
    max_length: int | None = Field(
        default=None, description="Token limit fixed at load time (None: the model's own)."
    )
    model_kwargs: dict[str, Any] = Field(
        default_factory=dict,
        description="Backend options that change the loaded model (trust_remote_code, revision, "
        "token, config_kwargs={...}, ...): nested dicts are fine, a token is never shown.",
    )
    pool: SkipJsonSchema[ModelPool | None] = Field(  # no schema: model_json_schema() failed
        default=None, exclude=True, repr=False, description="Pool to use; None = get_pool()."
    )
    priority: Literal["interactive", "bulk"] = Field(
        default="interactive",
        description="Scheduler lane: 'interactive' (query time) is served before 'bulk' (e.g. "
        "re-embedding a corpus); bulk work waiting longer than EngineConfig.bulk_aging_ms is "
        "served as interactive, so it never starves.",
    )

    #: The backend ``backend="auto"`` picked when it is not torch, until its first load
    #: succeeded (:meth:`_confirm_auto_pick`); None otherwise.
    _unconfirmed_pick: str | None = PrivateAttr(default=None)

    # The pool is a process-wide resource, like a connection (locks, threads, loaded models):
    # a deep copy (``copy.deepcopy``, ``model_copy(deep=True)``) shares it, and a pickled adapter
    # leaves it behind: unpickled, it uses the default pool of the process that loads it. Before,
    # both raised "cannot pickle '_thread.lock' object" for an adapter built with ``pool=``.
    # (The LlamaIndex adapters refine this in ``llama_index._state``, as LlamaIndex expects.)
    def __deepcopy__(self, memo: dict[int, Any] | None = None) -> Any:
        memo = {} if memo is None else memo
        pool = self.__dict__.get("pool")
        if pool is not None:
            memo.setdefault(id(pool), pool)  # copied as itself: one pool per process
        return super().__deepcopy__(memo)

    def __getstate__(self) -> dict[Any, Any]:
        state = super().__getstate__()
        return {**state, "__dict__": {**state["__dict__"], "pool": None}}

    # A token set past the validators (``model_copy(update=...)``, assignment, or a write into
    # the dict) is a plain str: hidden wherever the adapter is shown or dumped, whatever its way in.
    # The same for a server URL's credentials or query string (refused at construction by
    # _check_spec, but a field can be set later), shown as ModelSpec.label shows them.
    @field_serializer("model_kwargs")
    def _dump_hidden(self, value: dict[str, Any]) -> dict[str, Any]:
        return cast("dict[str, Any]", _shown_kwargs(value))

    @field_serializer("model", "model_name", check_fields=False)
    def _dump_model(self, value: Any) -> Any:
        return _shown_url(value)

    def __repr_args__(self) -> Any:
        for name, value in super().__repr_args__():
            if name == "model_kwargs":
                value = _shown_kwargs(value)
            elif name in ("model", "model_name"):
                value = _shown_url(value)
            yield name, value

    @field_validator("max_length", "batch_size", mode="before", check_fields=False)
    @classmethod
    def _strict_ints(cls, value: Any, info: ValidationInfo) -> Any:
        # batch_size is declared by the subclasses; check_fields=False lets this cover it there.
        if value is None and info.field_name == "max_length":
            return value
        allowed = "a positive int or None" if info.field_name == "max_length" else "a positive int"
        return _strict_int(str(info.field_name), value, allowed=allowed)

    @model_validator(mode="before")
    @classmethod
    def _migrate_hf_kwargs(cls, data: Any) -> Any:
        # HuggingFaceCrossEncoder / HuggingFaceEmbeddings users pass model_kwargs={"device": ...,
        # "max_length": ...} (keyword arguments of sentence-transformers' loaders). Both are spec
        # fields here; left in model_kwargs, max_length reached CrossEncoder(...) twice and the
        # first call failed with "got multiple values for keyword argument 'max_length'".
        if isinstance(data, dict):
            data = st_backend(_device_names(data), cls._kind)
        if isinstance(data, dict) and cls._st_model_kwargs:
            data = hf_model_kwargs(data, cls._kind, cls.model_fields)
        if isinstance(data, dict):
            kwargs = data.get("model_kwargs")
            if isinstance(kwargs, dict) and ("device" in kwargs or "max_length" in kwargs):
                kwargs = dict(kwargs)
                data = {**data, "model_kwargs": kwargs}
                lift_spec_fields(data, kwargs)
            if data.get("device") is None and "device" in data:
                # LlamaIndex passes device=None for "infer": the default applies.
                data = {k: v for k, v in data.items() if k != "device"}
            if isinstance(data.get("model_kwargs"), dict):
                # A token stays a Secret from here on: never in the adapter's repr or dumps.
                data = {**data, "model_kwargs": _hide_secrets(data["model_kwargs"])}
        return data

    @model_validator(mode="after")
    def _check_spec(self) -> SharedModelFields:
        auto = is_auto(self.backend)
        if auto:  # the measured pick for this CPU (backend_choice), kept
            options = {**self.model_kwargs, **self._extra_options()}
            model = getattr(self, self._model_field)
            self.backend = choose_backend(self._kind, options, self.device, self.dtype, model)
            if self.backend != torch_backend(self._kind):
                self._unconfirmed_pick = self.backend
        info = backend_info(self.backend)
        if info.kind != self._kind:
            article = {"reranker": "a reranker", "embedder": "an embedder"}
            raise ConfigurationError(
                f"{type(self).__name__} needs {article[self._kind]} backend, but "
                f"{self.backend!r} is {article[info.kind]} backend."
            )
        # Validate model, device, dtype, max_length and option names now, not at the first call
        # (the load). check_options is set arithmetic: construction stays microseconds.
        from .backends.remote.settings import _refuse_url_secrets

        _refuse_url_secrets(getattr(self, self._model_field))  # before anything shows it
        _refuse_url_secrets(self.model_kwargs.get("url"))
        spec = self.spec
        try:
            check_options(self.backend, spec.options_dict)
        except ConfigurationError as exc:
            if not auto:
                raise
            # The user never named this backend: say that auto picked it on this CPU.
            raise ConfigurationError(
                f"backend='auto' picked {self.backend!r} for this model on this CPU (the "
                f"measured fastest; `rag-rerank info` shows the CPU kind), and {exc} Those "
                "options belong to the ONNX/OpenVINO backends: name one of them as backend "
                "(e.g. 'openvino-"
                + ("cross-encoder" if self._kind == "reranker" else "embedder")
                + "') to use them, or drop them."
            ) from None
        return self

    @property
    def spec(self) -> ModelSpec:
        """The pool key this adapter uses (rebuilt from the fields, so it is never stale)."""
        return ModelSpec(
            model=getattr(self, self._model_field),
            backend=self.backend,
            device=self.device,
            dtype=self.dtype,
            max_length=self.max_length,
            options=tuple({**_hide_secrets(self.model_kwargs), **self._extra_options()}.items()),
        )

    def _extra_options(self) -> dict[str, Any]:
        """Backend options that come from adapter fields rather than ``model_kwargs``."""
        return {}

    def _pool(self) -> ModelPool:
        return self.pool if self.pool is not None else get_pool()

    def _model_lookup(self, spec: ModelSpec) -> tuple[ModelHandle, LoadedModel]:
        """The loaded handle and model of ``spec``, for what is read off the model beside a call
        (prompts, window plans, the auto pick's check): a racing release starts it over, and the
        calls' deadline (``request_timeout_s``) bounds the wait for a load, as for the calls."""
        pool = self._pool()
        return pool._lookup(spec, pool._deadline(None))

    # ``backend="auto"``: a measured pick that cannot load this model (an export or conversion
    # its runtime fails on, or a runtime installed but not importable) falls back to torch
    # once, with a warning, instead of failing every call; auto then answers torch for that
    # model in this process (backend_choice). With options torch does not take, there is no
    # fallback: the pick's load error is raised, its message saying auto made the pick.

    def _confirm_auto_pick(self) -> None:
        pick = self._unconfirmed_pick
        if pick is None or self.backend != pick:
            return
        try:
            self._model_lookup(self.spec)
        except ModelNotFoundError:
            raise  # no backend can load a model that is not there
        except (ModelLoadError, MissingDependencyError) as exc:
            fallback = torch_backend(self._kind)
            refused = _refusal(fallback, self.spec.options_dict)
            if refused is not None:
                # Options only the pick takes (cache_dir, opset, intra_op_threads, ...) tie this
                # adapter to it: its load error is the answer, as for a backend named outright
                # (and auto keeps the pick: torch would refuse these options at construction).
                note = (
                    f"backend='auto' picked {pick} for {self.spec.model} and cannot fall back to "
                    f"{fallback}: {refused} Drop those options to let auto use {fallback}."
                )
                if exc.args and note not in str(exc.args[0]):  # the pool may re-raise it
                    exc.args = (f"{exc.args[0]}\n{note}", *exc.args[1:])
                raise
            logger.warning(
                "rag-rerank: backend='auto' picked %s for %s, which failed to load it (%s); "
                "using %s instead. Name a backend to choose yourself.",
                pick,
                self.spec.model,
                exc,
                fallback,
            )
            note_failed_pick(pick, str(getattr(self, self._model_field)))
            self.backend = fallback
        self._unconfirmed_pick = None

    def _checked_spec(self, spec: ModelSpec) -> ModelSpec:
        """``spec`` after the auto pick is confirmed (or replaced by torch's)."""
        if self._unconfirmed_pick is not None:
            self._confirm_auto_pick()
        if spec.backend != self.backend:
            return dataclasses.replace(spec, backend=self.backend)
        return spec

    async def _achecked_spec(self, spec: ModelSpec) -> ModelSpec:
        if self._unconfirmed_pick is not None:  # the first load runs off the event loop
            await to_thread(self._confirm_auto_pick)
        return self._checked_spec(spec)

    # The pool calls of every adapter, with this adapter's scheduling lane, each in an
    # OpenTelemetry span when opentelemetry-api is installed (rag_rerank_plugins.tracing).

    def _span(
        self, operation: str, spec: ModelSpec, items: int, batch_size: int
    ) -> AbstractContextManager[None]:
        adapter = type(self).__name__
        return model_span(operation, spec, batch_size=batch_size, items=items, adapter=adapter)

    def _pool_score(
        self, spec: ModelSpec, pairs: Sequence[tuple[str, str]], batch_size: int
    ) -> list[float]:
        spec = self._checked_spec(spec)
        with self._span("rerank", spec, len(pairs), batch_size):
            return self._pool().score_pairs(spec, pairs, batch_size, priority=self.priority)

    async def _pool_ascore(
        self, spec: ModelSpec, pairs: Sequence[tuple[str, str]], batch_size: int
    ) -> list[float]:
        spec = await self._achecked_spec(spec)
        with self._span("rerank", spec, len(pairs), batch_size):
            return await self._pool().ascore_pairs(spec, pairs, batch_size, priority=self.priority)

    def _pool_embed(
        self, spec: ModelSpec, texts: Sequence[str], batch_size: int, **kw: Any
    ) -> list[list[float]]:
        spec = self._checked_spec(spec)
        with self._span("embed", spec, len(texts), batch_size):
            return self._pool().embed(spec, texts, batch_size, priority=self.priority, **kw)

    async def _pool_aembed(
        self, spec: ModelSpec, texts: Sequence[str], batch_size: int, **kw: Any
    ) -> list[list[float]]:
        spec = await self._achecked_spec(spec)
        with self._span("embed", spec, len(texts), batch_size):
            return await self._pool().aembed(spec, texts, batch_size, priority=self.priority, **kw)

    def handle(self) -> ModelHandle:
        """The shared handle (loads on first use). Prefer the adapter methods for calls."""
        return self._pool().get(self._checked_spec(self.spec))

    def preload(self, warmup: bool = True) -> None:
        """Load the model now (and run one tiny forward pass), e.g. at application start-up."""
        self._pool().preload(self._checked_spec(self.spec), warmup=warmup)

    def stats(self) -> dict[str, Any]:
        """This model's pool counters (loads, calls, items, device, dtype, ...)."""
        return self._pool().spec_stats(self.spec)

    def release(self) -> bool:
        """Free this adapter's model in its pool (every adapter sharing it reloads on next use)."""
        return self._pool().release(self.spec)


class RerankSettings(SharedModelFields):
    """Mixin for rerankers: batch size, top_n, score threshold and the shared rerank routine."""

    top_n: int | None = Field(default=3, description="Documents to keep; None keeps all.")
    score_threshold: float | None = Field(
        default=None, description="Drop documents scoring below this (after reranking)."
    )
    batch_size: int = Field(
        default_factory=from_settings("batch_size"),
        gt=0,
        description="Pairs per forward pass (default: RAG_RERANK_BATCH_SIZE, 32).",
    )
    score_mode: Literal["raw", "sigmoid"] | None = Field(
        default=None,
        description="'sigmoid' (sigmoid of the logit) or 'raw' (the logit), both from FP32 logits; "
        "None = the backend's default (sigmoid for single-logit rerankers). Part of the spec.",
    )
    window_tokens: int | Literal["auto"] | None = Field(
        default=None,
        description="Long passages: score overlapping windows of this many tokens ('auto': fill "
        "the model's input). None: off, the model truncates.",
    )
    window_stride: int | None = Field(
        default=None, description="Tokens between window starts (None: half a window)."
    )
    window_query_tokens: int = Field(
        default=64, description="Query token budget per window (longer queries are cut)."
    )
    window_aggregate: Literal["max", "mean", "first"] = Field(
        default="max", description="How window scores become the passage score."
    )
    on_error: Literal["raise", "passthrough"] = Field(
        default="raise",
        description="When scoring fails (load, inference, OOM, timeout, full queue): 'raise' the "
        "error, or 'passthrough': return the documents in retrieval order (top_n applies, no "
        "threshold, no scores), each with metadata['rerank_error'], counted in "
        "stats()['passthrough']. Invalid input (missing query, non-text documents) always raises.",
    )

    # mode="before": checked on the caller's value, before pydantic's lax coercion ("3" -> 3).
    @field_validator("top_n", mode="before")
    @classmethod
    def _check_top_n(cls, value: Any) -> int | None:
        if value is None:
            return None
        return validate_top_n(_strict_int("top_n", value, allowed="a positive int or None"))

    @field_validator("score_threshold", mode="before")
    @classmethod
    def _check_threshold(cls, value: Any) -> float | None:
        if value is None:
            return None
        allowed = "a number (int or float) or None"
        return validate_threshold(_strict_number("score_threshold", value, allowed=allowed))

    @field_validator("window_tokens", mode="before")
    @classmethod
    def _check_window_tokens(cls, value: Any) -> Any:
        if value is None or value == "auto":
            return value
        return _strict_int("window_tokens", value, allowed="a positive int, 'auto' or None")

    @field_validator("window_stride", "window_query_tokens", mode="before")
    @classmethod
    def _check_window_ints(cls, value: Any, info: ValidationInfo) -> Any:
        if value is None:
            return value
        return _strict_int(str(info.field_name), value, allowed="a positive int")

    @model_validator(mode="after")
    def _check_windows(self) -> RerankSettings:
        _ = self.window_settings  # invalid window settings fail at construction, not per call
        return self

    def _extra_options(self) -> dict[str, Any]:
        # Only when set, so the spec equals that of adapters leaving the backend's default.
        return {"score_mode": self.score_mode} if self.score_mode is not None else {}

    @property
    def window_settings(self) -> WindowSettings | None:
        """The long-document window settings, or None when windows are off."""
        if self.window_tokens is None:
            return None
        return WindowSettings(
            tokens=self.window_tokens,
            stride=self.window_stride,
            query_tokens=self.window_query_tokens,
            aggregate=self.window_aggregate,
        )

    def _window_plan(
        self, query: str, texts: Sequence[str], settings: WindowSettings
    ) -> WindowPlan:
        spec = self._checked_spec(self.spec)
        _, model = self._model_lookup(spec)
        return windower_for(model).plan(query, texts, settings)

    @staticmethod
    def _check_query(query: Any) -> str:
        if not isinstance(query, str):
            raise InvalidInputError(
                f"The query must be a str, got {type(query).__name__}. Pass the user's question."
            )
        return query

    def _pairs(self, query: str, texts: Sequence[str]) -> list[tuple[str, str]]:
        return [(query, text) for text in texts]

    def _check_assigned_settings(self) -> None:
        """``top_n`` and ``score_threshold`` checked again at each call, as at construction.

        Rerankers are tuned by assignment or copy (``reranker.top_n = 5`` at query time,
        ``model_copy(update=...)``), which pydantic does not validate: ``top_n = 0`` returned no
        documents and ``-1`` all but the last (a silent drop), ``"0.5"`` failed deep in ranking.
        """
        validate_top_n(self.top_n)
        validate_threshold(self.score_threshold)

    def rank_texts(self, query: str, texts: Sequence[str]) -> list[Ranked]:
        """Score ``texts`` against ``query`` and rank them (indices into ``texts``)."""
        return self.rank_texts_windowed(query, texts)[0]

    async def arank_texts(self, query: str, texts: Sequence[str]) -> list[Ranked]:
        """Async :meth:`rank_texts`: the forward pass runs off the event loop."""
        return (await self.arank_texts_windowed(query, texts))[0]

    def rank_texts_windowed(
        self, query: str, texts: Sequence[str]
    ) -> tuple[list[Ranked], list[WindowInfo] | None]:
        """:meth:`rank_texts` plus, when windows are on, the deciding window of every text
        (indexed like ``texts``); None when windows are off."""
        self._check_assigned_settings()
        query = self._check_query(query)
        if not texts:
            return [], None
        settings = self.window_settings
        if settings is None:
            scores = self._pool_score(self.spec, self._pairs(query, texts), self.batch_size)
            return rank(scores, self.top_n, self.score_threshold), None
        plan = self._window_plan(query, texts, settings)
        window_scores = self._pool_score(self.spec, plan.pairs, self.batch_size)
        scores, infos = plan.aggregate(window_scores)
        return rank(scores, self.top_n, self.score_threshold), infos

    def rank_texts_guarded(
        self, query: str, texts: Sequence[str]
    ) -> tuple[list[Ranked], list[WindowInfo] | None, str | None]:
        """:meth:`rank_texts_windowed` plus ``on_error``: the third item is None on success, or,
        with ``on_error="passthrough"``, the error message when texts come in retrieval order."""
        try:
            ranked, windows = self.rank_texts_windowed(query, texts)
        except ConfigurationError:  # the caller's mistake (incl. InvalidInputError): never hidden
            raise
        except Exception as exc:
            if self.on_error != "passthrough":
                raise
            return self._passthrough(len(texts), exc)
        return ranked, windows, None

    async def arank_texts_guarded(
        self, query: str, texts: Sequence[str]
    ) -> tuple[list[Ranked], list[WindowInfo] | None, str | None]:
        """Async :meth:`rank_texts_guarded` (cancellation always propagates)."""
        try:
            ranked, windows = await self.arank_texts_windowed(query, texts)
        except ConfigurationError:
            raise
        except Exception as exc:
            if self.on_error != "passthrough":
                raise
            return self._passthrough(len(texts), exc)
        return ranked, windows, None

    def _passthrough(self, n: int, exc: Exception) -> tuple[list[Ranked], None, str]:
        """Retrieval order, cut to ``top_n``, NaN scores; logged and counted in the pool."""
        message = f"{type(exc).__name__}: {exc}".splitlines()[0][:_ERROR_CHARS]
        spec = self.spec
        keep = n if self.top_n is None else min(n, self.top_n)
        logger.warning(
            "rag-rerank: reranking with %s failed; returning the first %d of %d documents in "
            "retrieval order (on_error='passthrough'): %s",
            spec.model,
            keep,
            n,
            message,
        )
        try:
            self._pool().record_passthrough(spec)
        except Exception:  # counting must never turn a degraded answer into an error
            logger.debug("rag-rerank: could not count a passthrough", exc_info=True)
        return [Ranked(i, math.nan) for i in range(keep)], None, message

    async def arank_texts_windowed(
        self, query: str, texts: Sequence[str]
    ) -> tuple[list[Ranked], list[WindowInfo] | None]:
        """Async :meth:`rank_texts_windowed`: tokenizing and the forward pass run off the loop."""
        self._check_assigned_settings()
        query = self._check_query(query)
        if not texts:
            return [], None
        settings = self.window_settings
        if settings is None:
            scores = await self._pool_ascore(self.spec, self._pairs(query, texts), self.batch_size)
            return rank(scores, self.top_n, self.score_threshold), None
        plan = await to_thread(self._window_plan, query, texts, settings)
        window_scores = await self._pool_ascore(self.spec, plan.pairs, self.batch_size)
        scores, infos = plan.aggregate(window_scores)
        return rank(scores, self.top_n, self.score_threshold), infos
