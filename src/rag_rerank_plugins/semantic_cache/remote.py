"""``RemoteSemanticCache``: the semantic cache served by ``rag-rerank serve --semantic-cache``,
with the in-process cache's ``lookup``/``put`` API.

Why: one process can keep the cache in memory, several processes on one host can share a SQLite
file, but processes on several hosts need one owner of the entries and of the embedder that
compares them. That owner is the server (:mod:`rag_rerank_plugins.server.routers.semantic_cache`);
this client is what the LangChain and LlamaIndex adapters (or your code) hold instead of a
:class:`~rag_rerank_plugins.semantic_cache.SemanticCache`.

The HTTP part is the remote backends' client (:class:`~..backends.remote.client.RemoteClient`):
pooled connections (one ``httpx.AsyncClient`` per event loop), retries with backoff on
connection errors, 429 and 5xx, and errors that say what to do. httpx is imported on first use
(extra ``remote``). Errors are raised here; the adapters turn them into misses.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ..backends.remote.client import RemoteClient, Send, Wait
from ..backends.remote.protocols import get_protocol
from ..backends.remote.settings import RemoteSettings, is_url
from ..exceptions import ConfigurationError, InvalidInputError, RemoteRequestError
from ._helpers import _valid_text

if TYPE_CHECKING:
    from ..backends.remote.client import Plan

__all__ = ["RemoteCacheHit", "RemoteSemanticCache"]

#: The server's path prefix (:data:`rag_rerank_plugins.server.routers.semantic_cache.PREFIX`).
PREFIX = "/v1/semantic-cache"


@dataclass(frozen=True)
class RemoteCacheHit:
    """A hit answered by the server: the same fields as the in-process ``CacheHit``."""

    value: Any
    query: str
    score: float
    namespace: str
    age_s: float


def _check_query(query: Any) -> str:
    if not isinstance(query, str):
        raise InvalidInputError(f"query must be a str, got {type(query).__name__}.")
    if not query.strip():
        raise InvalidInputError("query is empty; pass the question text to look up or store.")
    _valid_text(query, "query")  # as the in-process cache (the server would answer 422)
    return query


def _check_namespace(namespace: Any) -> str:
    if not isinstance(namespace, str) or not namespace.strip():
        raise InvalidInputError(f"namespace must be a non-empty str, got {namespace!r}.")
    _valid_text(namespace, "namespace")
    return namespace


def _encode(body: dict[str, Any]) -> bytes:
    try:
        return json.dumps(body, allow_nan=False, separators=(",", ":")).encode("utf-8")
    except (TypeError, ValueError) as exc:
        raise InvalidInputError(
            f"The value cannot be sent as JSON ({exc}). Store JSON values (str, numbers, bools, "
            "None, lists and dicts of them), e.g. a dict made with model.model_dump()."
        ) from None


class RemoteSemanticCache:
    """The cache of ``rag-rerank serve --semantic-cache ...`` at ``url``.

    ``api_key_env`` names the environment variable holding the server's bearer token (read on
    every request, so rotation works); ``timeout`` and ``retries`` as for the remote backends.

    Example::

        cache = RemoteSemanticCache("http://cache-host:8080")
        cache.put("What does Art. 72 say?", {"answer": "..."}, namespace="legal-qa")
        hit = cache.lookup("What does article 72 say?", namespace="legal-qa")
    """

    def __init__(
        self,
        url: str,
        *,
        api_key_env: str | None = None,
        timeout: float = 10.0,
        connect_timeout: float = 5.0,
        retries: int = 2,
        max_connections: int = 32,
        verify: bool = True,
    ) -> None:
        if not isinstance(url, str) or not is_url(url):
            raise ConfigurationError(
                f"url must be the server's http(s) URL (e.g. 'http://127.0.0.1:8080'), got {url!r}."
            )
        settings = RemoteSettings(
            base_url=url.rstrip("/"),
            model_name=None,
            protocol="tei",
            timeout=float(timeout),
            connect_timeout=float(connect_timeout),
            retries=int(retries),
            api_key_env=api_key_env,
            max_connections=int(max_connections),
            verify=verify,
        )
        settings._check_ranges()
        self.url = settings.base_url
        self._client = RemoteClient(settings, f"semantic cache {self.url}", get_protocol("tei"))

    # -- requests ----------------------------------------------------------------------------

    def _post(self, path: str, body: dict[str, Any]) -> Plan[Any]:
        content = _encode(body)
        try:
            return (yield from self._client.post_plan(PREFIX + path, content))
        except RemoteRequestError as exc:
            if exc.status == 404:
                raise RemoteRequestError(
                    f"{self.url} has no semantic cache ({PREFIX}{path} answered 404): start the "
                    "server with --semantic-cache memory (or sqlite:///path), or set "
                    "RAG_RERANK_SEMANTIC_CACHE.",
                    url=exc.url,
                    status=404,
                ) from None
            raise

    def _get(self, path: str) -> Plan[Any]:
        url = self.url + PREFIX + path
        attempt = 0
        while True:
            outcome = yield Send("GET", url, self._client.headers())
            assert outcome is not None
            delay = self._client._judge(url, attempt, outcome)  # the remote client's status table
            if delay is None:
                assert outcome.response is not None
                return self._client._json(url, outcome.response)
            yield Wait(delay)
            attempt += 1

    @staticmethod
    def _hit(answer: Any) -> RemoteCacheHit | None:
        if not isinstance(answer, dict) or not answer.get("hit"):
            return None
        score = float(answer["score"])
        return RemoteCacheHit(
            value=answer.get("value"),
            query=str(answer["query"]),
            score=score if math.isfinite(score) else 0.0,
            namespace=str(answer["namespace"]),
            age_s=float(answer.get("age_s") or 0.0),
        )

    def _lookup_body(self, query: str, namespace: str) -> dict[str, Any]:
        return {"query": _check_query(query), "namespace": _check_namespace(namespace)}

    def _put_body(self, query: str, value: Any, namespace: str) -> dict[str, Any]:
        return {
            "query": _check_query(query),
            "value": value,
            "namespace": _check_namespace(namespace),
        }

    # -- the SemanticCache API ---------------------------------------------------------------

    def lookup(self, query: str, namespace: str = "default") -> RemoteCacheHit | None:
        """The server's hit for ``query`` in ``namespace``, or None."""
        body = self._lookup_body(query, namespace)
        return self._hit(self._client.run(self._post("/lookup", body)))

    @staticmethod
    def _stored(answer: Any) -> bool:
        return isinstance(answer, dict) and answer.get("stored") is True

    def put(self, query: str, value: Any, namespace: str = "default") -> bool:
        """Store ``value`` (JSON) for ``query`` in ``namespace`` on the server; False when the
        server's cache skipped it (its store failed: counted in the server's ``stats()``)."""
        return self._stored(
            self._client.run(self._post("/put", self._put_body(query, value, namespace)))
        )

    async def alookup(self, query: str, namespace: str = "default") -> RemoteCacheHit | None:
        body = self._lookup_body(query, namespace)
        return self._hit(await self._client.arun(self._post("/lookup", body)))

    async def aput(self, query: str, value: Any, namespace: str = "default") -> bool:
        return self._stored(
            await self._client.arun(self._post("/put", self._put_body(query, value, namespace)))
        )

    def invalidate(self, namespace: str, *, subspaces: bool = False) -> int:
        """Drop one namespace on the server (with ``subspaces``, those under it too); the number
        of entries removed."""
        body: dict[str, Any] = {"namespace": _check_namespace(namespace)}
        if subspaces:  # only when asked: a server before this field refuses unknown fields
            body["subspaces"] = True
        answer = self._client.run(self._post("/invalidate", body))
        return int(answer.get("removed", 0)) if isinstance(answer, dict) else 0

    def clear(self) -> None:
        """Drop every entry on the server (every client's namespaces)."""
        self._client.run(self._post("/clear", {}))

    def stats(self) -> dict[str, Any]:
        """The server cache's ``stats()``."""
        answer: dict[str, Any] = self._client.run(self._get("/stats"))
        return answer

    def close(self) -> None:
        """Close the pooled connections."""
        self._client.close()

    def __repr__(self) -> str:
        return f"RemoteSemanticCache({self.url!r})"
