"""``SemanticCacheQueryEngine``: a LlamaIndex query engine that answers repeated questions from the
guarded semantic cache and stores the answers of new ones.

Why a query-engine wrapper rather than an LLM cache: a LlamaIndex query is retrieval plus
synthesis, and the expensive, repeatable unit is the whole answer with its sources. Caching at
the engine keeps the question the user asked (not a prompt stuffed with retrieved context) as the
key, so paraphrases hit and "Art. 75" does not hit "Art. 72" (the cache's ``hybrid`` guard).

What is stored (JSON): the response text, each source node's id, score, text, metadata,
relationships (``ref_doc_id`` for citations) and metadata settings (excluded keys, templates), and
the response metadata; a hit rebuilds a ``Response`` with ``TextNode`` sources and adds
``metadata["semantic_cache"]`` (cached question, score, age). Non-finite numbers (NaN, inf: an
empty cell of a DataFrame row) are stored as null: JSON has none, and every put of such an
answer failed. Streaming and pydantic engines are passed through uncached, lookups included
(:func:`passes_through`): a cached ``Response`` has no ``response_gen`` for a streaming caller
to iterate. So are queries whose ``QueryBundle`` retrieves with more than the
question (``custom_embedding_strs`` other than the question, an ``image_path``): the question
alone would not say what was retrieved. A cache failure never fails the query: it is a miss,
logged and counted in :meth:`SemanticCacheQueryEngine.stats`.
"""

from __future__ import annotations

import hashlib
import json
import math
from typing import Any

# The guard first: without llama-index-core, a MissingDependencyError naming the extra.
from . import _compat  # noqa: F401

# isort: split

from llama_index.core.base.base_query_engine import BaseQueryEngine
from llama_index.core.base.response.schema import RESPONSE_TYPE, Response
from llama_index.core.prompts.mixin import PromptMixinType
from llama_index.core.schema import MetadataMode, NodeWithScore, QueryBundle, TextNode

from ..exceptions import ConfigurationError
from ..semantic_cache._adapter import AdapterCounters, CacheBackend, logger

__all__ = ["SemanticCacheQueryEngine"]

#: Key of ``Response.metadata`` that says an answer came from the cache.
CACHE_KEY = "semantic_cache"


def _jsonable(value: Any) -> Any:
    """``value`` with anything JSON cannot carry written as its ``str``, and NaN and infinities
    as None: JSON has no such numbers, and the cache refuses them (metadata only)."""
    return json.loads(json.dumps(value, default=str), parse_constant=lambda _: None)


def _score(value: Any) -> float | None:
    """A source node's score as JSON can carry it: None when missing or not finite."""
    if value is None:
        return None
    score = float(value)
    return score if math.isfinite(score) else None


#: Retriever attributes that restrict what it may retrieve (LlamaIndex's ``VectorIndexRetriever``):
#: metadata filters (a tenant, a user), node ids, document ids, and the vector store's own
#: query arguments (``vector_store_kwargs``: Chroma's ``where``, Qdrant's ``qdrant_filters``,
#: Pinecone's ``filter`` restrict a tenant there).
_SCOPE_ATTRS = ("_filters", "_node_ids", "_doc_ids", "_kwargs")


def _scope_digest(retriever: Any, index: Any) -> str | None:
    """A digest of what restricts ``retriever``'s results (see :data:`_SCOPE_ATTRS`), or None
    when nothing does."""
    # VectorStoreIndex.as_retriever() passes every node id of the index (the in-memory store
    # keeps no text): that is no restriction, and must not change as the index grows.
    every = getattr(getattr(index, "index_struct", None), "nodes_dict", None)
    scope: dict[str, Any] = {}
    for attr in _SCOPE_ATTRS:
        value = getattr(retriever, attr, None)
        if value is None or (isinstance(value, list | tuple | dict) and not value):
            continue
        if hasattr(value, "model_dump"):  # MetadataFilters (pydantic)
            value = value.model_dump(mode="json")
        elif isinstance(value, dict):  # vector_store_kwargs: store filter objects as their text
            value = {str(k): _plain(v) for k, v in value.items()}
        elif isinstance(value, list | tuple):
            value = sorted(map(str, value))
            if (
                attr == "_node_ids"
                and isinstance(every, dict)
                and set(value) == set(map(str, every.values()))
            ):
                continue
        scope[attr.lstrip("_")] = value
    if not scope:
        return None
    text = json.dumps(scope, sort_keys=True, default=str)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


def _plain(value: Any) -> Any:
    """``value`` as JSON-able data for the scope digest: pydantic models (a Qdrant ``Filter``)
    by their fields, containers item by item, anything else by its ``repr``."""
    if hasattr(value, "model_dump"):
        return value.model_dump(mode="json")
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, set | frozenset):  # iteration order varies between processes
        return sorted((_plain(v) for v in value), key=repr)
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    if value is None or isinstance(value, str | int | float | bool):
        return value
    return repr(value)


def _id_made_up(index: Any) -> bool:
    """Whether ``index``'s id names nothing that outlives the process: a vector-store index
    whose store keeps the text (its nodes are not in the index struct) and that holds no
    node of its own. ``VectorStoreIndex.from_vector_store`` builds such an index with a new
    random ``index_id`` each time; one loaded from storage looks the same (its id is kept, but
    nothing tells the two apart), so both are refused rather than guessed about."""
    store = getattr(index, "vector_store", None)
    nodes = getattr(getattr(index, "index_struct", None), "nodes_dict", None)
    return getattr(store, "stores_text", False) is True and isinstance(nodes, dict) and not nodes


def default_namespace(query_engine: BaseQueryEngine) -> str:
    """``llama_index:<engine class>:<index id>`` when the engine's index can be found (a
    ``RetrieverQueryEngine`` over an index retriever); else a :class:`ConfigurationError`.

    When the retriever is restricted (metadata filters such as a tenant, node ids, document
    ids, ``vector_store_kwargs`` such as Chroma's ``where``), a digest of the restriction
    follows: ``...:<index id>:<digest>``, so two engines on one index filtered to two tenants
    never share answers. Without one the namespace is as it
    always was (entries stored by earlier versions keep hitting).

    An index over a vector store that keeps the text (``from_vector_store``: Chroma, Qdrant,
    ...) gets a warning: its id may be drawn anew in each process (:func:`_id_made_up`), so a
    shared cache (SQLite, remote) would not hit across restarts. Not an error: an index loaded
    with ``load_index_from_storage`` looks the same and keeps its id, and a cache in one
    process hits either way."""
    retriever = getattr(query_engine, "retriever", None) or getattr(
        query_engine, "_retriever", None
    )
    index = getattr(retriever, "_index", None) or getattr(retriever, "index", None)
    index_id = getattr(index, "index_id", None)
    if not isinstance(index_id, str) or not index_id:
        raise ConfigurationError(
            f"Cannot tell which index {type(query_engine).__name__} answers from, so cached "
            "answers could leak between indexes. Pass namespace='...' naming the index (and the "
            "prompt or LLM if several engines share one index)."
        )
    if _id_made_up(index):
        logger.warning(
            f"The index of {type(query_engine).__name__} is over a vector store that keeps the "
            f"text ({type(getattr(index, 'vector_store', None)).__name__}: Chroma, Qdrant, "
            "pgvector, ..., e.g. VectorStoreIndex.from_vector_store(...)), so its index_id is "
            "a random id drawn in this process: a namespace made from it changes with every "
            "restart and host, and a shared cache (SQLite, RemoteSemanticCache) would never hit. "
            "Pass namespace='...' naming the collection (e.g. namespace='legal-index'); for an "
            "index loaded with load_index_from_storage, whose id is kept, "
            "namespace=index.index_id silences this."
        )
    name = f"llama_index:{type(query_engine).__name__}:{index_id}"
    scope = _scope_digest(retriever, index)
    return name if scope is None else f"{name}:{scope}"


def _streams_or_structures(owner: Any) -> bool:
    """Whether ``owner`` (an engine or its response synthesizer) is marked as answering with a
    stream or a pydantic object, as llama-index-core marks them (``_streaming``,
    ``_output_cls``; public spellings too). Only a real ``True``/class counts: an attribute
    an engine does not have, or a mock's, says nothing."""
    for name in ("_streaming", "streaming"):
        if getattr(owner, name, None) is True:
            return True
    return any(
        isinstance(getattr(owner, name, None), type) for name in ("_output_cls", "output_cls")
    )


def passes_through(query_engine: Any) -> bool:
    """Whether ``query_engine`` streams or answers with structured output (``streaming=True``,
    ``output_cls=...`` of ``as_query_engine``): looked for on the engine, its response
    synthesizer, and the engines it wraps (a few levels). Such an engine is never answered
    from the cache: a ``Response`` cached by a plain engine on the same index (the same
    default namespace) has no ``response_gen`` and is no pydantic object, and crashed the
    caller's streaming loop."""
    engine, seen = query_engine, set()
    for _ in range(5):
        if engine is None or id(engine) in seen:
            break
        seen.add(id(engine))
        synthesizer = getattr(engine, "_response_synthesizer", None) or getattr(
            engine, "response_synthesizer", None
        )
        if any(_streams_or_structures(o) for o in (engine, synthesizer) if o is not None):
            return True
        engine = getattr(engine, "_query_engine", None) or getattr(engine, "query_engine", None)
    return False


#: ``TextNode`` fields kept besides id, text and metadata: without the excluded keys and templates
#: a cached source's ``get_content(MetadataMode.LLM)`` showed metadata the index hides from the
#: LLM, and without relationships its ``ref_doc_id`` (what citations use) was None.
_NODE_FIELDS = frozenset(
    {
        "excluded_embed_metadata_keys",
        "excluded_llm_metadata_keys",
        "relationships",
        "metadata_template",
        "metadata_separator",
        "text_template",
        "start_char_idx",
        "end_char_idx",
        "mimetype",
    }
)


def _node_fields(node: Any) -> dict[str, Any]:
    """``node``'s :data:`_NODE_FIELDS` as JSON values; {} for what cannot be written as JSON."""
    try:
        dumped = node.model_dump(mode="json", include=set(_NODE_FIELDS))
        return {k: v for k, v in _jsonable(dumped).items() if k in _NODE_FIELDS}
    except Exception:  # a relationship whose metadata JSON cannot hold: the node without them
        return {}


def response_payload(response: Response) -> dict[str, Any]:
    """What the cache stores of a response: text, sources and metadata, as JSON values."""
    sources = [
        {
            "id": item.node.node_id,
            "score": _score(item.score),
            "text": item.node.get_content(metadata_mode=MetadataMode.NONE),
            "metadata": _jsonable(item.node.metadata),
            "node": _node_fields(item.node),
        }
        for item in response.source_nodes
    ]
    return {
        "response": response.response,
        "source_nodes": sources,
        "metadata": _jsonable(response.metadata) if response.metadata else None,
    }


def response_from_payload(payload: Any, hit: Any) -> Response:
    """A ``Response`` rebuilt from :func:`response_payload`'s output (``TextNode`` sources)."""
    if not isinstance(payload, dict) or not isinstance(payload.get("response"), str):
        raise TypeError(f"not a cached query-engine response: {type(payload).__name__}")
    nodes = [
        NodeWithScore(
            node=TextNode(
                id_=str(s["id"]),
                text=str(s["text"]),
                metadata=dict(s["metadata"]),
                # Entries stored by earlier versions have no "node": id, text and metadata only.
                **{k: v for k, v in (s.get("node") or {}).items() if k in _NODE_FIELDS},
            ),
            score=s["score"],
        )
        for s in payload.get("source_nodes", [])
    ]
    metadata = dict(payload.get("metadata") or {})
    metadata[CACHE_KEY] = {
        "hit": True,
        "cached_query": hit.query,
        "score": hit.score,
        "age_s": hit.age_s,
        "namespace": hit.namespace,
    }
    return Response(response=payload["response"], source_nodes=nodes, metadata=metadata)


class SemanticCacheQueryEngine(BaseQueryEngine):
    """Answer from ``cache`` when the question (or a paraphrase the guard accepts) was answered
    before in ``namespace``; else ask ``query_engine`` and store its answer.

    ``cache``: a :class:`~rag_rerank_plugins.semantic_cache.SemanticCache` or a
    ``RemoteSemanticCache``; ``namespace``: default ``llama_index:<engine>:<index id>``, plus a
    digest of the retriever's filters when it has some (:func:`default_namespace`); name it
    yourself when several engines (prompts, LLMs) share an index, or when the index is over a
    vector store that keeps the text (``from_vector_store``). An engine that streams or
    answers with a pydantic object (:func:`passes_through`, or found so by its first such
    answer) is passed through: never looked up, never stored.

    Example::

        engine = SemanticCacheQueryEngine(index.as_query_engine(), SemanticCache())
        engine.query("What does Art. 72 say?")  # asks the engine, stores the answer
        engine.query("What does article 72 say?")  # from the cache
    """

    def __init__(
        self,
        query_engine: BaseQueryEngine,
        cache: CacheBackend,
        namespace: str | None = None,
    ) -> None:
        if not isinstance(query_engine, BaseQueryEngine):
            raise ConfigurationError(
                "query_engine must be a LlamaIndex BaseQueryEngine (e.g. index.as_query_engine()),"
                f" got {type(query_engine).__name__}."
            )
        if not isinstance(cache, CacheBackend):
            raise ConfigurationError(
                "cache must be a SemanticCache or RemoteSemanticCache (lookup/put/alookup/aput),"
                f" got {type(cache).__name__}."
            )
        if namespace is not None and (not isinstance(namespace, str) or not namespace.strip()):
            raise ConfigurationError(f"namespace must be a non-empty str, got {namespace!r}.")
        self.query_engine = query_engine
        self.cache = cache
        self.namespace = namespace if namespace is not None else default_namespace(query_engine)
        self._counters = AdapterCounters("SemanticCacheQueryEngine")
        #: True when the wrapped engine streams or answers with structured output: no cache.
        self.passthrough = passes_through(query_engine)
        super().__init__(callback_manager=query_engine.callback_manager)

    def _get_prompt_modules(self) -> PromptMixinType:
        return {"query_engine": self.query_engine}

    # -- cache steps that never raise --------------------------------------------------------

    def _answer(self, hit: Any) -> Response | None:
        if hit is None:
            self._counters.count("misses")
            return None
        try:
            response = response_from_payload(hit.value, hit)
        except Exception as exc:  # a value another writer put in this namespace
            self._counters.count("misses")  # the caller got a miss
            self._counters.failed("reading a cached answer", exc)
            return None
        self._counters.count("hits")
        return response

    def _payload(self, response: RESPONSE_TYPE) -> dict[str, Any] | None:
        if not isinstance(response, Response) and not self.passthrough:
            # A streaming or pydantic answer from an engine not marked as such: pass its
            # later queries through too, lookups included (a cached Response is not one).
            self.passthrough = True
            logger.info(
                "SemanticCacheQueryEngine: the wrapped engine answered with a %s: its queries "
                "go uncached from now on.",
                type(response).__name__,
            )
        if type(response) is not Response or response.response is None:
            return None  # streaming/pydantic responses and empty answers are not cached
        try:
            return response_payload(response)
        except Exception as exc:
            self._counters.failed("serialising the answer", exc)
            return None

    @staticmethod
    def _cacheable(query_bundle: QueryBundle) -> bool:
        """Whether the question alone says what the wrapped engine answers.

        Not for a blank question, nor when the bundle retrieves with other text
        (``custom_embedding_strs`` other than the question) or an image: keyed by the question
        only, such a query was answered from the cache with sources retrieved for something
        else. A precomputed ``embedding`` is taken to be the question's (retrievers store it on
        the bundle they were given).
        """
        query = query_bundle.query_str
        if not isinstance(query, str) or not query.strip():
            return False
        custom = query_bundle.custom_embedding_strs
        return (custom is None or list(custom) == [query]) and not query_bundle.image_path

    def _lookup(self, query: str) -> tuple[Response | None, bool]:
        """The cached answer or None, and whether the lookup failed on the transport (then
        the put that follows is skipped: it would wait for the same server for nothing)."""
        try:
            hit = self.cache.lookup(query, namespace=self.namespace)
        except Exception as exc:
            return None, self._counters.lookup_failed(exc)
        return self._answer(hit), False

    async def _alookup(self, query: str) -> tuple[Response | None, bool]:
        try:
            hit = await self.cache.alookup(query, namespace=self.namespace)
        except Exception as exc:
            return None, self._counters.lookup_failed(exc)
        return self._answer(hit), False

    def _storable(self, response: RESPONSE_TYPE, unreachable: bool) -> dict[str, Any] | None:
        """What to put for ``response``, or None: nothing to store, or its lookup failed on
        the transport (counted as skipped)."""
        payload = self._payload(response)
        if payload is not None and unreachable:
            self._counters.skipped("put", "its lookup failed on the transport")
            return None
        return payload

    def _stored(self, stored: bool | None) -> None:
        # False: the cache skipped it (and logged why); None: a cache that does not say.
        self._counters.count("errors" if stored is False else "updates")

    # -- BaseQueryEngine ---------------------------------------------------------------------

    def _query(self, query_bundle: QueryBundle) -> RESPONSE_TYPE:
        if self.passthrough or not self._cacheable(query_bundle):
            return self.query_engine.query(query_bundle)
        query = query_bundle.query_str
        cached, unreachable = self._lookup(query)
        if cached is not None:
            return cached
        response = self.query_engine.query(query_bundle)
        payload = self._storable(response, unreachable)
        if payload is not None:
            try:
                stored = self.cache.put(query, payload, namespace=self.namespace)
            except Exception as exc:
                self._counters.update_failed("put", exc)
            else:
                self._stored(stored)
        return response

    async def _aquery(self, query_bundle: QueryBundle) -> RESPONSE_TYPE:
        if self.passthrough or not self._cacheable(query_bundle):
            return await self.query_engine.aquery(query_bundle)
        query = query_bundle.query_str
        cached, unreachable = await self._alookup(query)
        if cached is not None:
            return cached
        response = await self.query_engine.aquery(query_bundle)
        payload = self._storable(response, unreachable)
        if payload is not None:
            try:
                stored = await self.cache.aput(query, payload, namespace=self.namespace)
            except Exception as exc:
                self._counters.update_failed("put", exc)
            else:
                self._stored(stored)
        return response

    def stats(self) -> dict[str, Any]:
        """This wrapper's hits, misses, updates, errors and skipped calls (a cache server that
        was failing), and the cache's own ``stats()``."""
        return self._counters.snapshot(self.cache)

    def __repr__(self) -> str:
        return (
            f"SemanticCacheQueryEngine({type(self.query_engine).__name__}, "
            f"namespace={self.namespace!r})"
        )
