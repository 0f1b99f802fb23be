"""``SharedRerankPostprocessor``: a LlamaIndex node postprocessor on a shared reranker handle."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING, Any, Literal

# The guard first: without llama-index-core, a MissingDependencyError naming the extra.
from .._exitsafe import to_thread
from . import _compat  # noqa: F401

# isort: split

from llama_index.core.callbacks import CBEventType, EventPayload
from llama_index.core.instrumentation import get_dispatcher
from llama_index.core.instrumentation.events.rerank import ReRankEndEvent, ReRankStartEvent
from llama_index.core.postprocessor.types import BaseNodePostprocessor
from llama_index.core.schema import MetadataMode, NodeWithScore, QueryBundle
from pydantic import BaseModel, ConfigDict, Field, model_validator

from ..adapter_base import RerankSettings, from_settings, sync_override
from ..exceptions import ConfigurationError, InvalidInputError
from ..ranking import Ranked
from ..spec import ModelSpec
from ..windows import WindowInfo
from ._args import check_arguments
from ._state import SharedPoolState
from ._stock_args import (
    RERANK_POSITIONAL,
    bind_positional,
    rerank_arguments,
    rerank_default_max_length,
)

if TYPE_CHECKING:
    import os

    from llama_index.core.callbacks import CallbackManager

    from ..pool import ModelPool

__all__ = ["SharedRerankPostprocessor"]

dispatcher = get_dispatcher(__name__)

#: Metadata key for the retriever's score when ``keep_retrieval_score`` is on (as in LlamaIndex).
RETRIEVAL_SCORE_KEY = "retrieval_score"
#: Metadata key of the deciding window (a dict, see WindowInfo) when long-document windows are on.
WINDOW_KEY = "rerank_window"
#: Metadata key set (to a short message) on nodes passed through unscored (on_error).
ERROR_KEY = "rerank_error"
#: Backends where SentenceTransformerRerank's 512-token default applies (CrossEncoder models).
_CROSS_ENCODER_BACKENDS = frozenset(
    {"cross-encoder", "onnx-cross-encoder", "openvino-cross-encoder"}
)


class SharedRerankPostprocessor(SharedPoolState, RerankSettings, BaseNodePostprocessor):
    """Rerank retrieved nodes with a model loaded once per process.

    Takes every argument of ``SentenceTransformerRerank`` (llama-index-postprocessor-sbert-rerank)
    with the same meaning, positionally too: ``model``, ``device``, ``cache_folder``, ``top_n``,
    ``keep_retrieval_score`` and ``cross_encoder_kwargs`` (``max_length``,
    ``trust_remote_code``, ``revision``, ``activation_fn``, ``model_kwargs={"dtype": ...}``,
    ``backend="onnx"``, ...). Left unset, ``max_length`` is 512 as there (a model with more
    positions still reads 512 tokens). Also ``FlagEmbeddingReranker``'s (``model``, ``top_n``,
    ``use_fp16``; with ``backend="flag-reranker"``), so switching is a one-line change.
    Like them it rejects unknown arguments (``topn=5`` raises, naming ``top_n``), where a
    pydantic default would silently ignore them and rerank with the defaults.
    Returns new ``NodeWithScore`` objects best first; the input nodes and their scores are never
    modified. With ``window_tokens`` set, a copy of each node gets ``metadata["rerank_window"]``.
    With ``on_error="passthrough"`` a failed scoring returns the first ``top_n`` nodes in retrieval
    order, each a copy with ``metadata["rerank_error"]`` and ``score=None``.
    ``top_n`` and ``score_threshold`` assigned after construction are checked at the next call.
    A deep copy shares the pool; a pickled adapter uses the default pool where it is unpickled.
    """

    # extra="forbid": SentenceTransformerRerank raises TypeError for topn=5; silently keeping the
    # default top_n instead would change results unseen.
    model_config = ConfigDict(
        arbitrary_types_allowed=True,
        protected_namespaces=(),
        extra="forbid",
        hide_input_in_errors=True,  # a token or a URL's password would show (the start of it)
    )

    model: str = Field(
        default_factory=from_settings("reranker_model"),
        description="Hub name or local path (default: RAG_RERANK_RERANKER_MODEL).",
    )
    backend: str = Field(default_factory=from_settings("reranker_backend"))
    top_n: int | None = Field(default=2, description="Nodes to keep; None keeps all.")
    keep_retrieval_score: bool = Field(
        default=False,
        description="Copy the retriever's score into metadata['retrieval_score'] (on a copy).",
    )
    trust_remote_code: bool = Field(
        default=False, description="Allow custom model code from the hub (off: safer default)."
    )
    cache_folder: str | None = Field(
        default=None,
        description="Where the backend keeps downloaded files (None: the Hugging Face cache). "
        "A backend option, so part of the spec.",
    )
    use_fp16: bool | None = Field(
        default=None,
        description="FlagEmbeddingReranker compatibility: True = dtype 'float16' (float32 on a "
        "CPU, by policy), False = 'float32'. None: use dtype.",
    )

    if TYPE_CHECKING:

        def __init__(
            self,
            model: str = ...,
            device: str | None = ...,
            cache_folder: str | os.PathLike[str] | None = None,
            top_n: int | None = 2,
            keep_retrieval_score: bool = False,
            cross_encoder_kwargs: dict[str, Any] | None = None,
            *,
            backend: str = ...,
            trust_remote_code: bool = False,
            use_fp16: bool | None = None,
            score_threshold: float | None = None,
            batch_size: int = ...,
            score_mode: Literal["raw", "sigmoid"] | None = None,
            window_tokens: int | Literal["auto"] | None = None,
            window_stride: int | None = None,
            window_query_tokens: int = 64,
            window_aggregate: Literal["max", "mean", "first"] = "max",
            on_error: Literal["raise", "passthrough"] = "raise",
            dtype: str = ...,
            max_length: int | None = None,
            model_kwargs: dict[str, Any] = ...,
            pool: ModelPool | None = None,
            priority: Literal["interactive", "bulk"] = "interactive",
            callback_manager: CallbackManager | None = None,
        ) -> None:
            """For type checkers only: SentenceTransformerRerank's parameters (positional too),
            then ours. The runtime ``__init__(*args, **data)`` binds the positional ones, and
            told type checkers that any keyword, ``topn=5`` too, was fine."""

    else:

        def __init__(self, *args: Any, **data: Any) -> None:
            self._init(args, data)

    def _init(self, args: tuple[Any, ...], data: dict[str, Any]) -> None:
        """``__init__``'s work: SentenceTransformerRerank's parameters may be given positionally
        (model first)."""
        if args and isinstance(args[0], int) and not isinstance(args[0], bool):
            # llama_index.core.postprocessor.SentenceTransformerRerank takes top_n first.
            raise ConfigurationError(
                f"SharedRerankPostprocessor takes the model first (as llama-index-postprocessor-"
                f"sbert-rerank's SentenceTransformerRerank), got {args[0]!r}. The older "
                f"llama_index.core.postprocessor.SentenceTransformerRerank took top_n first: pass "
                f"top_n={args[0]!r} by keyword."
            )
        super().__init__(
            **bind_positional("SharedRerankPostprocessor", RERANK_POSITIONAL, args, data)
        )

    @model_validator(mode="before")
    @classmethod
    def _stock_arguments(cls, data: Any) -> Any:
        # cross_encoder_kwargs first (it is not a field), then the unknown-name check, then
        # use_fp16 (FlagEmbeddingReranker's) as a dtype.
        data = check_arguments(cls, rerank_arguments(data), frozenset(RERANK_POSITIONAL))
        return cls._use_fp16_to_dtype(data)

    @staticmethod
    def _use_fp16_to_dtype(data: Any) -> Any:
        if isinstance(data, dict) and data.get("use_fp16") is not None:
            wanted = "float16" if data["use_fp16"] else "float32"
            given = data.get("dtype", "auto")
            if given not in ("auto", wanted):
                raise ConfigurationError(
                    f"use_fp16={data['use_fp16']} contradicts dtype={given!r}; pass only one."
                )
            data = {**data, "dtype": wanted}
        return data

    def _extra_options(self) -> dict[str, Any]:
        # Only when on, so the spec equals that of other adapters naming the same model.
        options = super()._extra_options()
        if self.trust_remote_code:
            options["trust_remote_code"] = True
        if self.cache_folder is not None:
            options["cache_folder"] = self.cache_folder
        return options

    @property
    def spec(self) -> ModelSpec:
        """The pool key; ``max_length`` unset means SentenceTransformerRerank's 512 tokens on
        CrossEncoder backends (the model's own limit where it has fewer positions)."""
        spec = super().spec
        if self.max_length is not None or spec.backend not in _CROSS_ENCODER_BACKENDS:
            return spec
        limit = rerank_default_max_length(
            spec.model,
            spec.option("revision"),
            spec.option("cache_folder"),
            spec.option("processor_kwargs"),
        )
        return spec if limit is None else spec.with_options(max_length=limit)

    @classmethod
    def class_name(cls) -> str:
        return "SharedRerankPostprocessor"

    def postprocess_nodes(
        self,
        nodes: Iterable[NodeWithScore],
        query_bundle: QueryBundle | None = None,
        query_str: str | None = None,
    ) -> list[NodeWithScore]:
        """Rerank ``nodes`` (any iterable of ``NodeWithScore``: a list, a tuple, a generator).

        LlamaIndex's own signature says ``List``; a generator is accepted too because the nodes
        are read several times (texts, events, results) and a generator can be read only once.
        """
        return super().postprocess_nodes(self._as_list(nodes), query_bundle, query_str)

    async def apostprocess_nodes(
        self,
        nodes: Iterable[NodeWithScore],
        query_bundle: QueryBundle | None = None,
        query_str: str | None = None,
    ) -> list[NodeWithScore]:
        """Async :meth:`postprocess_nodes`: the forward pass never blocks the event loop."""
        return await super().apostprocess_nodes(self._as_list(nodes), query_bundle, query_str)

    @staticmethod
    def _as_list(nodes: Iterable[NodeWithScore]) -> list[NodeWithScore]:
        """``nodes`` as a list, read once; a list is used as it is (nothing is copied)."""
        if isinstance(nodes, list):
            return nodes
        # A single node, a str or a dict are iterable too, but iterating them yields no nodes.
        if isinstance(nodes, (str, bytes, BaseModel, Mapping)) or not isinstance(nodes, Iterable):
            raise InvalidInputError(
                f"nodes must be a list (or another iterable) of NodeWithScore, got "
                f"{type(nodes).__name__}. Wrap a single node: [NodeWithScore(node=..., score=...)]."
            )
        return list(nodes)

    def _query(self, query_bundle: QueryBundle | None) -> str:
        """The query text, after checking the settings a caller may have assigned since."""
        self._check_assigned_settings()
        if query_bundle is None:
            raise InvalidInputError(
                "SharedRerankPostprocessor needs a query: call postprocess_nodes(nodes, "
                "query_str='...') or pass query_bundle=QueryBundle('...'). Query engines do this."
            )
        if not hasattr(query_bundle, "query_str"):
            # postprocess_nodes(nodes, "question"): the 2nd positional argument is the bundle.
            hint = (
                f" For a plain string pass query_str={query_bundle!r} (by keyword)."
                if isinstance(query_bundle, str)
                else ""
            )
            raise InvalidInputError(
                f"query_bundle must be a QueryBundle, got {type(query_bundle).__name__}.{hint}"
            )
        return query_bundle.query_str

    def _start(self, nodes: list[NodeWithScore], query_bundle: QueryBundle) -> dict[Any, Any]:
        dispatcher.event(
            ReRankStartEvent(
                query=query_bundle,
                nodes=nodes,
                top_n=self.top_n if self.top_n is not None else len(nodes),
                model_name=self.model,
            )
        )
        return {
            EventPayload.NODES: nodes,
            EventPayload.MODEL_NAME: self.model,
            EventPayload.QUERY_STR: query_bundle.query_str,
            EventPayload.TOP_K: self.top_n,
        }

    @staticmethod
    def _texts(nodes: list[NodeWithScore]) -> list[str]:
        texts = []
        for i, item in enumerate(nodes):
            node = getattr(item, "node", None)
            if node is None:
                raise InvalidInputError(
                    f"nodes[{i}] is {type(item).__name__}, not NodeWithScore; wrap nodes as "
                    "NodeWithScore(node=..., score=...)."
                )
            texts.append(node.get_content(metadata_mode=MetadataMode.EMBED))
        return texts

    def _build(
        self,
        nodes: list[NodeWithScore],
        ranked: list[Ranked],
        windows: list[WindowInfo] | None = None,
        error: str | None = None,
    ) -> list[NodeWithScore]:
        out = []
        for index, score in ranked:
            item = nodes[index]
            node = item.node
            extra: dict[str, Any] = {}
            if self.keep_retrieval_score:
                extra[RETRIEVAL_SCORE_KEY] = item.score
            if windows is not None:
                extra[WINDOW_KEY] = windows[index].as_dict()
            if error is not None:
                extra[ERROR_KEY] = error
            if extra:
                # On a copy: the caller's node (often shared with a docstore) stays untouched, and
                # the keys are hidden from the LLM and embedding text like other bookkeeping keys.
                node = node.model_copy(
                    update={
                        "metadata": {**node.metadata, **extra},
                        "excluded_llm_metadata_keys": [
                            *node.excluded_llm_metadata_keys,
                            *extra,
                        ],
                        "excluded_embed_metadata_keys": [
                            *node.excluded_embed_metadata_keys,
                            *extra,
                        ],
                    }
                )
            out.append(NodeWithScore(node=node, score=score if error is None else None))
        return out

    def _postprocess_nodes(
        self,
        nodes: list[NodeWithScore],
        query_bundle: QueryBundle | None = None,
    ) -> list[NodeWithScore]:
        query = self._query(query_bundle)
        assert query_bundle is not None
        texts = self._texts(nodes)
        payload = self._start(nodes, query_bundle)
        with self.callback_manager.event(CBEventType.RERANKING, payload=payload) as event:
            result = self._build(nodes, *self.rank_texts_guarded(query, texts))
            event.on_end(payload={EventPayload.NODES: result})
        dispatcher.event(ReRankEndEvent(nodes=result))
        return result

    # A span of its own, as the sync path gets from the mixin (the base's async method is
    # neither abstract nor decorated): without it, async pipelines (aquery) showed no rerank
    # step in tracing tools, and the ReRank events carried no span id.
    @dispatcher.span
    async def _apostprocess_nodes(
        self,
        nodes: list[NodeWithScore],
        query_bundle: QueryBundle | None = None,
    ) -> list[NodeWithScore]:
        if sync_override(
            self, SharedRerankPostprocessor, "_postprocess_nodes", "_apostprocess_nodes"
        ):
            # As stock: a subclass's _postprocess_nodes serves async pipelines too.
            return await to_thread(self._postprocess_nodes, nodes, query_bundle)
        query = self._query(query_bundle)
        assert query_bundle is not None
        texts = self._texts(nodes)
        payload = self._start(nodes, query_bundle)
        with self.callback_manager.event(CBEventType.RERANKING, payload=payload) as event:
            result = self._build(nodes, *(await self.arank_texts_guarded(query, texts)))
            event.on_end(payload={EventPayload.NODES: result})
        dispatcher.event(ReRankEndEvent(nodes=result))
        return result
