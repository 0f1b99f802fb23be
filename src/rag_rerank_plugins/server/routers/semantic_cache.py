"""The semantic cache over HTTP: ``POST /v1/semantic-cache/lookup``, ``/put``, ``/invalidate``,
``/clear`` and ``GET /v1/semantic-cache/stats``.

Why a server endpoint pair: past one host, processes cannot share an in-memory cache or a SQLite
file, but they can share ``rag-rerank serve``, which already holds the embedder (and the
cross-encoder a ``rerank`` guard needs) warm. Clients use
:class:`~rag_rerank_plugins.semantic_cache.remote.RemoteSemanticCache`, which has the same
``lookup``/``put`` API as the in-process cache, so the LangChain and LlamaIndex adapters take
either.

Off unless enabled: ``rag-rerank serve --semantic-cache memory`` (or ``sqlite:///path``; env
``RAG_RERANK_SEMANTIC_CACHE``). :func:`protocol_for` returns the protocol only then, and
:func:`~..app.create_app` mounts it; the cache itself is built on the first request, on the
server's pool. Like the model endpoints, it needs the bearer token when one is set.
"""

from __future__ import annotations

import asyncio
import functools
import threading
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel, ConfigDict, Field, StrictBool, model_validator

from ...exceptions import ConfigurationError, InvalidInputError
from ..cache_slot import CACHES
from ..endpoints import Endpoint, ServerProtocol
from ..errors import ApiError
from ..schemas import refuse_invalid_unicode

if TYPE_CHECKING:  # the state (and the pool) are imported once an app is built
    from ...semantic_cache import SemanticCache
    from ..config import ServerConfig
    from ..state import ServerState

__all__ = ["PREFIX", "PROTOCOL", "protocol_for"]

PREFIX = "/v1/semantic-cache"


class _Request(BaseModel):
    """Request bodies are strict like every other endpoint's: an unknown field is a 400, and a
    string with a lone surrogate escape is refused (it could not be written back on a hit)."""

    model_config = ConfigDict(extra="forbid")

    @model_validator(mode="before")
    @classmethod
    def _valid_unicode(cls, data: Any) -> Any:
        return refuse_invalid_unicode(data)


class LookupRequest(_Request):
    # No length cap beyond --max-request-bytes: a RAG prompt (context included) is a query too,
    # and an in-process cache takes it (exact-match past the guard's word limit).
    query: str = Field(min_length=1)
    namespace: str = Field(default="default", min_length=1, max_length=512)


class LookupResponse(BaseModel):
    """On a miss ``hit: false`` and every other field null."""

    hit: bool
    value: Any = None
    query: str | None = None
    score: float | None = None
    namespace: str | None = None
    age_s: float | None = None


class PutRequest(_Request):
    # No length cap beyond --max-request-bytes: a RAG prompt (context included) is a query too,
    # and an in-process cache takes it (exact-match past the guard's word limit).
    query: str = Field(min_length=1)
    value: Any
    namespace: str = Field(default="default", min_length=1, max_length=512)


class PutResponse(BaseModel):
    """``stored: false`` when the cache skipped the put (its store or embedder failed: logged
    and counted in ``stats()["errors"]``)."""

    stored: bool


class InvalidateRequest(_Request):
    namespace: str = Field(min_length=1, max_length=512)
    #: The namespaces under it too (``namespace + ":..."``).
    subspaces: StrictBool = False


class InvalidateResponse(BaseModel):
    removed: int


class ClearRequest(_Request):
    pass


class ClearResponse(BaseModel):
    cleared: bool


_CACHES = CACHES  # one cache per app state (GET /metrics reads it there)
_BUILD_LOCK = threading.Lock()


def _served_spec(state: ServerState, kind: str, name: str | None) -> Any:
    """The spec of the served ``kind`` named ``name`` (None: the only one of its kind)."""
    served = [m for m in state.served if m.kind == kind]
    if name is not None:
        served = [m for m in served if name in (m.name, m.spec.model)]
    if len(served) != 1:
        names = ", ".join(f"{m.name} ({m.kind})" for m in state.served)
        wanted = f"the served {kind} {name!r}" if name else f"exactly one served {kind}"
        flag = " (--semantic-cache-embedder)" if kind == "embedder" else ""
        raise ConfigurationError(
            f"The semantic cache needs {wanted}{flag}; this server serves: {names}. Serve it "
            f"with --{kind} NAME=MODEL, or name one of these."
        )
    return served[0].spec


def build_cache(state: ServerState) -> SemanticCache:
    """The cache ``state.config`` describes, on the server's pool: the served embedder named
    by ``semantic_cache_embedder`` (default: the cache's own default embedder) and, for the
    ``rerank`` guard, the served reranker."""
    from ...semantic_cache import SemanticCache

    config = state.config
    options: dict[str, Any] = {
        "guard": config.semantic_cache_guard,
        "threshold": config.semantic_cache_threshold,
        "ttl": config.semantic_cache_ttl,
        "max_entries": config.semantic_cache_max_entries,
        "store": config.semantic_cache,
        "pool": state.pool,
    }
    if config.semantic_cache_embedder:
        options["embedder"] = _served_spec(state, "embedder", config.semantic_cache_embedder)
    if config.semantic_cache_guard == "rerank":
        options["reranker"] = _served_spec(state, "reranker", None)
    return SemanticCache(**options)


def _built(state: ServerState) -> SemanticCache:
    with _BUILD_LOCK:  # a thread lock: apps (and their loops) come and go, the module stays
        cache = _CACHES.get(state)
        if cache is None:
            cache = _CACHES[state] = build_cache(state)
        return cache


async def _cache(state: ServerState) -> SemanticCache:
    cache = _CACHES.get(state)
    return cache if cache is not None else await asyncio.to_thread(_built, state)


def _invalid(exc: ConfigurationError) -> ApiError:
    return ApiError(422, str(exc), "Validation")


def _store_down(action: str, exc: Exception) -> ApiError:
    """A 503 for an invalidation or clear the store could not do (it raises there rather than
    count a miss: an invalidation that silently failed would serve stale answers)."""
    return ApiError(
        503,
        f"The semantic cache's store failed to {action} ({type(exc).__name__}: {exc}); the "
        "entries may still be served. Retry once the store is reachable (a locked or "
        "unwritable SQLite file?).",
        "Unhealthy",
    )


async def lookup(body: LookupRequest, state: ServerState) -> LookupResponse:
    """The cached value for ``query`` (or a paraphrase the guard accepts) in ``namespace``."""
    cache = await _cache(state)
    try:
        hit = await cache.alookup(body.query, namespace=body.namespace)
    except ConfigurationError as exc:
        raise _invalid(exc) from None
    if hit is None:
        return LookupResponse(hit=False)
    return LookupResponse(
        hit=True,
        value=hit.value,
        query=hit.query,
        score=float(hit.score),
        namespace=hit.namespace,
        age_s=float(hit.age_s),
    )


async def put(body: PutRequest, state: ServerState) -> PutResponse:
    """Store ``value`` (any JSON) for ``query`` in ``namespace``."""
    cache = await _cache(state)
    try:
        stored = await cache.aput(body.query, body.value, namespace=body.namespace)
    except ConfigurationError as exc:
        raise _invalid(exc) from None
    return PutResponse(stored=stored)


async def invalidate(body: InvalidateRequest, state: ServerState) -> InvalidateResponse:
    """Drop every entry of one namespace."""
    cache = await _cache(state)
    try:
        removed = await asyncio.to_thread(
            functools.partial(cache.invalidate, body.namespace, subspaces=body.subspaces)
        )
    except InvalidInputError:
        raise  # 422 (a blank namespace)
    except Exception as exc:
        raise _store_down("invalidate the namespace", exc) from None
    return InvalidateResponse(removed=int(removed))


async def clear(body: ClearRequest, state: ServerState) -> ClearResponse:
    """Drop every entry of every namespace."""
    cache = await _cache(state)
    try:
        await asyncio.to_thread(cache.clear)
    except Exception as exc:
        raise _store_down("clear", exc) from None
    return ClearResponse(cleared=True)


async def stats(state: ServerState) -> dict[str, Any]:
    """Hits, misses, guard rejections, entries and lookup latency of the served cache."""
    cache = await _cache(state)
    result: dict[str, Any] = cache.stats()
    return result


PROTOCOL = ServerProtocol(
    name="semantic-cache",
    title="Semantic cache (--semantic-cache)",
    endpoints=(
        Endpoint("POST", f"{PREFIX}/lookup", lookup, "cached value of a query or a paraphrase"),
        Endpoint("POST", f"{PREFIX}/put", put, "store a JSON value for a query"),
        Endpoint("POST", f"{PREFIX}/invalidate", invalidate, "drop one namespace"),
        Endpoint("POST", f"{PREFIX}/clear", clear, "drop every namespace"),
        Endpoint("GET", f"{PREFIX}/stats", stats, "hits, misses, guard rejections, latency"),
    ),
)


def protocol_for(config: ServerConfig) -> ServerProtocol | None:
    """:data:`PROTOCOL` when ``config`` enables the semantic cache, else None."""
    return PROTOCOL if config.semantic_cache else None
