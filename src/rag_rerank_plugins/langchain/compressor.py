"""``SharedRerankCompressor``: a LangChain document compressor on a shared reranker handle."""

from __future__ import annotations

# First: a clear MissingDependencyError when langchain-core is missing, not a bare ImportError.
from . import _compat  # noqa: F401  # isort: skip

import time
from collections.abc import Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, Literal

from langchain_core.callbacks import Callbacks
from langchain_core.callbacks.manager import AsyncCallbackManager, CallbackManager
from langchain_core.cross_encoders import BaseCrossEncoder
from langchain_core.documents import BaseDocumentCompressor, Document
from pydantic import (
    ConfigDict,
    Field,
    PrivateAttr,
    SerializerFunctionWrapHandler,
    model_serializer,
    model_validator,
)

from .._exitsafe import to_thread
from ..adapter_base import RerankSettings, SharedModelFields, from_settings, sync_override
from ..exceptions import ConfigurationError, InferenceError, InvalidInputError
from ..ranking import Ranked
from ..spec import ModelSpec
from ..windows import WindowInfo
from .cross_encoder import SharedCrossEncoder

if TYPE_CHECKING:
    from ..pool import ModelPool

__all__ = ["SharedRerankCompressor"]

#: Metadata key of the score on returned documents (same as LangChain's Cohere/Jina rerankers).
SCORE_KEY = "relevance_score"
#: Metadata key of the deciding window (a dict, see WindowInfo) when long-document windows are on.
WINDOW_KEY = "rerank_window"
#: Metadata key set (to a short message) on documents passed through unscored (on_error).
ERROR_KEY = "rerank_error"
#: Name of the custom callback event sent to ``callbacks`` after each rerank (``on_custom_event``).
EVENT_NAME = "rag_rerank"
#: Fields that say how a shared model loads and scores. With ``model=<a custom BaseCrossEncoder>``
#: nothing loads (the object scores), so they could only be ignored: refused instead.
_SHARED_MODEL_ONLY = ("backend", "max_length", "score_mode", "model_kwargs")


def _custom_scores(scorer: BaseCrossEncoder, pairs: Sequence[tuple[str, str]]) -> list[float]:
    """``scorer.score(pairs)`` as one float per pair, checked.

    A custom cross-encoder is the caller's code: a wrong number of scores silently dropped
    documents (``zip`` in the stock ``CrossEncoderReranker``, the ranking here) or crashed
    with an ``IndexError`` deep in the result building. Raised as :class:`InferenceError`, so
    ``on_error="passthrough"`` still degrades to retrieval order.
    """
    name = type(scorer).__qualname__
    raw = scorer.score([(q, t) for q, t in pairs])
    try:
        scores = [float(s) for s in raw]
    except (TypeError, ValueError) as exc:
        raise InferenceError(
            f"{name}.score must return one number per (query, passage) pair (for a two-label "
            f"model, the 'relevant' column: scores[:, 1]); it returned {type(raw).__name__}: {exc}"
        ) from exc
    if len(scores) != len(pairs):
        raise InferenceError(
            f"{name}.score returned {len(scores)} scores for {len(pairs)} (query, passage) pairs; "
            "it must return exactly one score per pair, in input order."
        )
    return scores


def _document_list(documents: Any) -> list[Document]:
    """``documents`` read once into a list (a generator cannot be indexed after scoring).

    A single Document or str is iterable too (pydantic models iterate over their fields), so
    each would be taken apart into confusing items; they and non-iterables fail here instead.
    """
    if isinstance(documents, (str, Document)) or not isinstance(documents, Iterable):
        raise InvalidInputError(
            "documents must be a list (or other iterable) of langchain_core Documents, got "
            f"{type(documents).__name__}. For one document pass [document]."
        )
    return list(documents)


class SharedRerankCompressor(RerankSettings, BaseDocumentCompressor):
    """Rerank retrieved documents with a model loaded once per process.

    Drop-in for ``ContextualCompressionRetriever(base_compressor=..., base_retriever=...)``.
    Build one per request if you like: construction validates a few fields and never loads.

    Returns new documents of the caller's class (a ``Document`` subclass keeps its type and extra
    fields: shallow copies), best first, each with ``metadata["relevance_score"]`` (float) and the
    input's ``id``; the input documents are never modified. With ``window_tokens`` set,
    ``metadata["rerank_window"]`` says which token window of the document decided its score.
    With ``on_error="passthrough"`` a failed scoring returns the first ``top_n`` documents in
    retrieval order with ``metadata["rerank_error"]`` set and no ``relevance_score`` key.

    A drop-in for langchain-classic's ``CrossEncoderReranker(model=..., top_n=3)`` too: ``model``
    may be a ``BaseCrossEncoder``. A :class:`SharedCrossEncoder` or a ``HuggingFaceCrossEncoder``
    becomes the shared model it describes (its name and ``model_kwargs``, same scores; the stock
    one's own loaded copy is not used, so drop it); any other cross-encoder scores the pairs
    itself (no pool, no windows; ``backend``, ``max_length``, ``score_mode`` and ``model_kwargs``
    are refused with it rather than ignored) and must return one score per pair
    (:class:`InferenceError` otherwise). ``model_kwargs`` takes ``CrossEncoder``'s keyword
    arguments, as in ``HuggingFaceCrossEncoder``.
    """

    model_config = ConfigDict(
        arbitrary_types_allowed=True,
        protected_namespaces=(),
        extra="forbid",
        hide_input_in_errors=True,  # a token or a URL's password would show (the start of it)
    )
    _st_model_kwargs = True

    model: str = Field(
        default_factory=from_settings("reranker_model"),
        description="Hub name or local path (default: RAG_RERANK_RERANKER_MODEL); or, as for "
        "LangChain's CrossEncoderReranker, a BaseCrossEncoder (see the class docstring).",
    )
    backend: str = Field(default_factory=from_settings("reranker_backend"))
    _scorer: BaseCrossEncoder | None = PrivateAttr(default=None)

    @model_validator(mode="before")
    @classmethod
    def _cross_encoder_model(cls, data: Any) -> Any:
        """``model=<BaseCrossEncoder>`` as ``CrossEncoderReranker`` takes it: a SharedCrossEncoder
        or a ``HuggingFaceCrossEncoder`` becomes its shared model (same spec and meaning, one
        copy per process); any other cross-encoder scores as it is (kept in ``_scorer``)."""
        if not isinstance(data, dict) or not isinstance(data.get("model"), BaseCrossEncoder):
            return data
        data = dict(data)
        encoder = data.pop("model")
        if not _describes_shared(encoder):
            data["model"] = encoder  # a custom cross-encoder: taken by __init__ only
            return data
        if isinstance(encoder, SharedModelFields):
            taken: dict[str, Any] = {"model": getattr(encoder, encoder._model_field)}
            for name in ("backend", "device", "dtype", "max_length", "model_kwargs", "pool"):
                taken[name] = getattr(encoder, name)
            for name in ("priority", "batch_size"):
                taken[name] = getattr(encoder, name, None)
            for name, value in taken.items():
                if value is not None and name not in data:
                    data[name] = value
            return data
        # A HuggingFaceCrossEncoder: its name and CrossEncoder keyword arguments.
        data.setdefault("model_kwargs", dict(getattr(encoder, "model_kwargs", None) or {}))
        data["model"] = encoder.model_name
        return data

    if TYPE_CHECKING:

        def __init__(
            self,
            *,
            model: str | BaseCrossEncoder = ...,
            backend: str = ...,
            top_n: int | None = 3,
            score_threshold: float | None = None,
            batch_size: int = ...,
            score_mode: Literal["raw", "sigmoid"] | None = None,
            window_tokens: int | Literal["auto"] | None = None,
            window_stride: int | None = None,
            window_query_tokens: int = 64,
            window_aggregate: Literal["max", "mean", "first"] = "max",
            on_error: Literal["raise", "passthrough"] = "raise",
            device: str | None = ...,
            dtype: str = ...,
            max_length: int | None = None,
            model_kwargs: dict[str, Any] = ...,
            pool: ModelPool | None = None,
            priority: Literal["interactive", "bulk"] = "interactive",
        ) -> None:
            """For type checkers only: the runtime ``__init__(**data)`` (it unwraps a
            cross-encoder ``model``) told them that any keyword, ``topn=5`` too, was fine."""

    else:

        def __init__(self, **data: Any) -> None:
            self._init(data)

    def _init(self, data: dict[str, Any]) -> None:
        """``__init__``'s work: a custom cross-encoder ``model`` becomes the scorer."""
        scorer = None
        encoder = data.get("model")
        if isinstance(encoder, BaseCrossEncoder) and not _describes_shared(encoder):
            scorer = encoder
            ignored = [k for k in _SHARED_MODEL_ONLY if data.get(k) not in (None, {})]
            if ignored:
                names = ", ".join(ignored)
                raise ConfigurationError(
                    f"{names} set with model=<a custom BaseCrossEncoder> "
                    f"({type(encoder).__name__}): that object scores the pairs itself and no "
                    f"shared model loads, so {names} would be ignored. Configure your "
                    "cross-encoder instead, or pass model='<name or path>' for a shared model."
                )
            kind = type(encoder)
            # Never loaded (the scorer scores): the name is what stats and callbacks show.
            data = {**data, "model": f"{kind.__module__}.{kind.__qualname__}"}
            data.setdefault("backend", "fake-reranker")
        super().__init__(**data)
        self._scorer = scorer
        if scorer is not None and self.window_tokens is not None:
            raise ConfigurationError(
                "window_tokens needs a shared model's tokenizer; with model=<a custom "
                "BaseCrossEncoder> leave windows off (or pass model='<name>')."
            )

    def model_copy(self, *, update: Mapping[str, Any] | None = None, deep: bool = False) -> Any:
        """As pydantic's, except that a new ``model`` goes through the constructor: here it is
        more than a name (a cross-encoder object becomes a shared spec or the scorer), and
        pydantic's copy skips validation, so the copy kept the old scorer, or failed at its
        first call with a cross-encoder object. ``CrossEncoderReranker`` switches models both
        ways (``model_copy(update={"model": other})``, ``reranker.model = other``)."""
        if not update or "model" not in update:
            return super().model_copy(update=update, deep=deep)
        # The dump holds a custom scorer itself, without the placeholder backend (_dump_...);
        # fields a dump leaves out (the pool) are carried over as they are.
        data = self.model_dump(exclude_unset=True)
        for name, field in type(self).model_fields.items():
            if field.exclude and name in self.model_fields_set:
                data[name] = getattr(self, name)
        return type(self)(**{**data, **update})

    def __setattr__(self, name: str, value: Any) -> None:
        if name != "model":
            super().__setattr__(name, value)
            return
        fresh = self.model_copy(update={"model": value})  # validated, as at construction
        for field, field_value in fresh.__dict__.items():
            super().__setattr__(field, field_value)
        self._scorer = fresh._scorer

    @model_serializer(mode="wrap")
    def _dump_with_the_scorer(self, handler: SerializerFunctionWrapHandler) -> Any:
        """With a custom cross-encoder, ``model`` holds a placeholder name and ``backend`` the
        test fake: a dump rebuilt (``SharedRerankCompressor(**c.model_dump())``) scored by word
        overlap without a word. The dump holds the scorer itself instead, as stock
        ``CrossEncoderReranker``'s holds its model object (so, as there, a JSON dump fails:
        the object has no JSON form)."""
        data = handler(self)
        if self._scorer is not None and isinstance(data, dict) and "model" in data:
            data["model"] = self._scorer
            if data.get("backend") == "fake-reranker":  # set by __init__ with the placeholder
                del data["backend"]
        return data

    def _pool_score(
        self, spec: ModelSpec, pairs: Sequence[tuple[str, str]], batch_size: int
    ) -> list[float]:
        if self._scorer is None:
            return super()._pool_score(spec, pairs, batch_size)
        return _custom_scores(self._scorer, pairs)

    async def _pool_ascore(
        self, spec: ModelSpec, pairs: Sequence[tuple[str, str]], batch_size: int
    ) -> list[float]:
        if self._scorer is None:
            return await super()._pool_ascore(spec, pairs, batch_size)
        return await to_thread(self._pool_score, spec, pairs, batch_size)

    def _texts(self, documents: Sequence[Document]) -> list[str]:
        """The texts to score, checked before any model work.

        Only ``Document`` instances (subclasses included) are accepted: a look-alike (a dict, an
        object with a ``page_content`` attribute) could not be returned as what it is, since
        results are copies made with ``Document.model_copy``.
        """
        texts = []
        for i, doc in enumerate(documents):
            if not isinstance(doc, Document):
                raise InvalidInputError(
                    f"documents[{i}] is {type(doc).__name__}, not a langchain_core Document. "
                    "Wrap the text: Document(page_content=text, metadata={...})."
                )
            content = doc.page_content
            if not isinstance(content, str):
                raise InvalidInputError(
                    f"documents[{i}] has no text page_content ({type(content).__name__}); "
                    "page_content must be a str."
                )
            texts.append(content)
        return texts

    @staticmethod
    def _build(
        documents: Sequence[Document],
        ranked: list[Ranked],
        windows: list[WindowInfo] | None = None,
        error: str | None = None,
    ) -> list[Document]:
        out = []
        for index, score in ranked:
            doc = documents[index]
            if error is None:
                metadata = {**doc.metadata, SCORE_KEY: score}
            else:  # unscored: drop any earlier stage's score rather than pass it off as ours
                metadata = {k: v for k, v in doc.metadata.items() if k != SCORE_KEY}
                metadata[ERROR_KEY] = error
            if windows is not None:
                metadata[WINDOW_KEY] = windows[index].as_dict()
            # A copy of the caller's own class (subclass fields kept); the input stays untouched.
            out.append(doc.model_copy(update={"metadata": metadata}))
        return out

    def _event(self, n_in: int, n_out: int, seconds: float, error: str | None) -> dict[str, Any]:
        return {
            "model": self.model,
            "backend": self.backend,
            "documents_in": n_in,
            "documents_out": n_out,
            "seconds": seconds,
            "error": error,
        }

    def compress_documents(
        self,
        documents: Iterable[Document],
        query: str,
        callbacks: Callbacks | None = None,
    ) -> Sequence[Document]:
        """Rerank ``documents`` for ``query``; keep ``top_n`` scoring >= ``score_threshold``.

        ``documents`` may be any iterable (a generator too): it is read once, before scoring.
        With ``callbacks``, their handlers get ``on_custom_event("rag_rerank", data)`` after
        scoring, ``data`` = {model, backend, documents_in, documents_out, seconds, error}.
        """
        start = time.perf_counter()
        documents = _document_list(documents)
        ranked, windows, error = self.rank_texts_guarded(query, self._texts(documents))
        out = self._build(documents, ranked, windows, error)
        if callbacks is not None:
            manager = CallbackManager.configure(inheritable_callbacks=callbacks)
            data = self._event(len(documents), len(out), time.perf_counter() - start, error)
            manager.on_custom_event(EVENT_NAME, data, run_id=manager.parent_run_id)
        return out

    async def acompress_documents(
        self,
        documents: Iterable[Document],
        query: str,
        callbacks: Callbacks | None = None,
    ) -> Sequence[Document]:
        """Async version; the forward pass runs in a worker thread, never on the event loop."""
        if sync_override(self, SharedRerankCompressor, "compress_documents", "acompress_documents"):
            # As stock: a subclass's compress_documents serves async pipelines too.
            return await to_thread(self.compress_documents, documents, query, callbacks)
        start = time.perf_counter()
        documents = _document_list(documents)
        ranked, windows, error = await self.arank_texts_guarded(query, self._texts(documents))
        out = self._build(documents, ranked, windows, error)
        if callbacks is not None:
            manager = AsyncCallbackManager.configure(inheritable_callbacks=callbacks)
            data = self._event(len(documents), len(out), time.perf_counter() - start, error)
            await manager.on_custom_event(EVENT_NAME, data, run_id=manager.parent_run_id)
        return out


def _describes_shared(encoder: BaseCrossEncoder) -> bool:
    """Whether ``encoder`` only names a model the pool can share: a :class:`SharedCrossEncoder`
    whose class keeps our ``score``, or a stock ``HuggingFaceCrossEncoder`` (its exact class).
    A subclass with its own ``score`` (a calibration, a query prefix) scores the pairs itself,
    as it does under ``CrossEncoderReranker``: taking its fields only dropped that ``score``."""
    if isinstance(encoder, SharedModelFields):
        return getattr(type(encoder), "score", None) is SharedCrossEncoder.score
    return type(encoder).__name__ == "HuggingFaceCrossEncoder" and isinstance(
        getattr(encoder, "model_name", None), str
    )
