"""Remote backends: a model served over HTTP used exactly like a local one (extra ``remote``).

``backend="remote-reranker"`` and ``backend="remote-embedder"`` talk to a model server instead of
loading weights, so every adapter (LangChain compressor/embeddings, LlamaIndex postprocessor/
embedding) can use one model shared by many processes or machines. Three wire protocols:

* ``tei`` (default): Hugging Face text-embeddings-inference, ``POST /rerank`` and ``POST /embed``;
  also what ``rag-rerank serve`` speaks.
* ``cohere``: ``POST /v1/rerank`` and ``POST /v1/embed`` (Cohere's API shape; ``rag-rerank serve``
  answers both too).
* ``infinity``: michaelfeil/infinity, ``POST /rerank`` (``documents``) and ``POST /embeddings``
  (OpenAI shape).

The spec's ``model`` is either the server URL (``ModelSpec("http://10.0.0.5:8080",
backend="remote-reranker")``) or the model name the server knows, with the URL in the ``url``
option. Options (all plain values, so the spec stays a hashable pool key)::

    url            base URL when ``model`` is a model name
    model_name     model name to send when ``model`` is the URL (cohere/infinity need one)
    protocol       "tei" | "cohere" | "infinity"                            (default "tei")
    timeout        seconds to wait for an answer                              (default 30)
    connect_timeout seconds to wait for a connection                          (default 5)
    retries        extra attempts on 429, 5xx and connection errors           (default 3)
    backoff        first retry delay in seconds, doubled per attempt, jittered (default 0.25)
    max_backoff    cap on one delay, also on the server's Retry-After          (default 8)
    api_key_env    name of the environment variable holding the bearer token
    truncate       ask the server to truncate long inputs (TEI)             (default True)
    query_prompt_name  TEI ``prompt_name`` sent for queries (e.g. "query")  (default none)
    max_connections    connection pool size per client                         (default 32)
    verify         verify TLS certificates                                  (default True)

Secrets never go into the spec (its label shows up in stats, metrics and logs): the token is read
from the environment variable named by ``api_key_env`` on every request, so rotation works.

One loaded remote model owns a pooled ``httpx.Client`` (thread-safe: the pool skips its call lock)
and one ``httpx.AsyncClient`` per event loop for :meth:`ascore_pairs`/:meth:`aembed`. Its device is
``"remote"``: after ``fork`` a child builds fresh clients instead of sharing sockets.
"""

from __future__ import annotations

import asyncio
import logging
import math
import os
import random
import threading
import time
import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ..exceptions import (
    ConfigurationError,
    MissingDependencyError,
    RemoteAuthError,
    RemoteError,
    RemoteRequestError,
    RemoteTimeoutError,
    RemoteUnavailableError,
)
from .base import EmbedderModel, RerankerModel

if TYPE_CHECKING:
    import httpx

    from ..pool import ModelPool
    from ..spec import ModelSpec

__all__ = [
    "PROTOCOLS",
    "RemoteEmbedder",
    "RemoteReranker",
    "RemoteSettings",
    "load_embedder",
    "load_reranker",
]

logger = logging.getLogger(__name__)

PROTOCOLS = ("tei", "cohere", "infinity")
#: Statuses worth another attempt: overloaded, or a server/gateway failure that may be transient.
RETRY_STATUSES = frozenset({429, 500, 502, 503, 504})
_SECRET_OPTIONS = ("api_key", "token", "bearer", "password", "authorization")
_OPTIONS = frozenset(
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
        "max_connections",
        "verify",
    }
)


def _httpx() -> Any:
    try:
        import httpx
    except ImportError:
        raise MissingDependencyError("httpx", "remote", "The remote backends") from None
    return httpx


def _is_url(text: str) -> bool:
    return text.startswith(("http://", "https://"))


@dataclass(frozen=True)
class RemoteSettings:
    """The remote options of one spec, validated once at load time."""

    base_url: str
    model_name: str | None
    protocol: str
    timeout: float = 30.0
    connect_timeout: float = 5.0
    retries: int = 3
    backoff: float = 0.25
    max_backoff: float = 8.0
    api_key_env: str | None = None
    truncate: bool = True
    query_prompt_name: str | None = None
    max_connections: int = 32
    verify: bool = True

    @classmethod
    def from_spec(cls, spec: ModelSpec) -> RemoteSettings:
        options = spec.options_dict
        for key in options:
            if key.lower() in _SECRET_OPTIONS:
                raise ConfigurationError(
                    f"Do not put secrets in a spec (option {key!r}): specs are shown in stats, "
                    "metrics and logs. Export the token in an environment variable and name it "
                    "with the option api_key_env='MY_TOKEN_VAR'."
                )
        unknown = sorted(set(options) - _OPTIONS)
        if unknown:
            raise ConfigurationError(
                f"Unknown remote backend option(s) {', '.join(map(repr, unknown))}; "
                f"valid options: {', '.join(sorted(_OPTIONS))}."
            )
        if spec.max_length is not None:
            raise ConfigurationError(
                "max_length cannot be set on a remote spec: the server fixes it when it loads "
                "the model. Set it there (e.g. `rag-rerank serve --max-length N`)."
            )
        base_url: Any
        if _is_url(spec.model):
            base_url, model_name = spec.model, options.get("model_name")
            if options.get("url") not in (None, spec.model):
                raise ConfigurationError(
                    f"The spec names two URLs ({spec.model!r} and url={options['url']!r}); "
                    "give the URL once, as the model or as the url option."
                )
        else:
            base_url, model_name = options.get("url"), options.get("model_name", spec.model)
            if not isinstance(base_url, str) or not _is_url(base_url):
                raise ConfigurationError(
                    f"The remote backend needs the server's URL: use model='http://host:port' or "
                    f"keep model={spec.model!r} and pass the option url='http://host:port' "
                    f"(got url={base_url!r})."
                )
        protocol = str(options.get("protocol", "tei")).lower()
        if protocol not in PROTOCOLS:
            raise ConfigurationError(
                f"Unknown remote protocol {protocol!r}; use one of {', '.join(PROTOCOLS)}."
            )
        if protocol in ("cohere", "infinity") and not model_name:
            raise ConfigurationError(
                f"Protocol {protocol!r} sends a model name with every request: pass the option "
                "model_name='...' (or use the model name as the spec's model and url=...)."
            )
        api_key_env = options.get("api_key_env")
        if api_key_env is not None and not os.environ.get(str(api_key_env)):
            raise ConfigurationError(
                f"Option api_key_env={api_key_env!r} names an environment variable that is not "
                f"set. Export the server's token first: export {api_key_env}=..."
            )
        try:
            settings = cls(
                base_url=str(base_url).rstrip("/"),
                model_name=str(model_name) if model_name else None,
                protocol=protocol,
                timeout=float(options.get("timeout", 30.0)),
                connect_timeout=float(options.get("connect_timeout", 5.0)),
                retries=int(options.get("retries", 3)),
                backoff=float(options.get("backoff", 0.25)),
                max_backoff=float(options.get("max_backoff", 8.0)),
                api_key_env=str(api_key_env) if api_key_env is not None else None,
                truncate=bool(options.get("truncate", True)),
                query_prompt_name=options.get("query_prompt_name"),
                max_connections=int(options.get("max_connections", 32)),
                verify=bool(options.get("verify", True)),
            )
        except (TypeError, ValueError) as exc:
            raise ConfigurationError(f"Invalid remote backend option: {exc}") from None
        if settings.timeout <= 0 or settings.connect_timeout <= 0:
            raise ConfigurationError("Remote timeouts must be positive numbers of seconds.")
        if settings.retries < 0 or settings.backoff < 0 or settings.max_backoff < 0:
            raise ConfigurationError("retries, backoff and max_backoff must not be negative.")
        if settings.max_connections < 1:
            raise ConfigurationError("max_connections must be at least 1.")
        return settings


# -- the retry policy, shared by the sync and async paths ------------------------------------


def _retry_after(response: httpx.Response) -> float | None:
    value = response.headers.get("retry-after")
    if value is None:
        return None
    try:
        seconds = float(value)
    except ValueError:
        return None
    return seconds if seconds >= 0 and math.isfinite(seconds) else None


def _server_message(response: httpx.Response) -> str:
    """The error text a TEI/Cohere/infinity/FastAPI server put in its body, if any."""
    try:
        body = response.json()
    except ValueError:
        return response.text[:300].strip()
    if isinstance(body, dict):
        for key in ("error", "message", "detail"):
            if body.get(key):
                detail = body[key]
                return detail if isinstance(detail, str) else str(detail)[:300]
    return str(body)[:300]


class _Attempt:
    """What to do after one attempt: return the JSON, wait and retry, or raise."""

    __slots__ = ("delay", "error")

    def __init__(self, delay: float | None = None, error: RemoteError | None = None) -> None:
        self.delay = delay
        self.error = error


class _Client:
    """Pooled HTTP clients plus the retry loop, for one base URL."""

    def __init__(self, settings: RemoteSettings, what: str) -> None:
        self.settings = settings
        self.what = what
        self._httpx = _httpx()
        self._lock = threading.Lock()
        self._sync: httpx.Client | None = None
        self._async: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, httpx.AsyncClient] = (
            weakref.WeakKeyDictionary()
        )
        self._closed = False

    def _client_kwargs(self) -> dict[str, Any]:
        s = self.settings
        httpx = self._httpx
        return {
            "timeout": httpx.Timeout(s.timeout, connect=s.connect_timeout),
            "limits": httpx.Limits(
                max_connections=s.max_connections, max_keepalive_connections=s.max_connections
            ),
            "verify": s.verify,
            "headers": {"user-agent": "rag-rerank-plugins remote backend"},
        }

    def sync_client(self) -> httpx.Client:
        client = self._sync
        if client is None:
            with self._lock:
                self._check_open()
                if self._sync is None:
                    self._sync = self._httpx.Client(**self._client_kwargs())
                client = self._sync
        return client

    def async_client(self) -> httpx.AsyncClient:
        loop = asyncio.get_running_loop()
        with self._lock:
            self._check_open()
            client = self._async.get(loop)
            if client is None or client.is_closed:
                client = self._async[loop] = self._httpx.AsyncClient(**self._client_kwargs())
            return client

    def _check_open(self) -> None:
        if self._closed:
            raise RemoteError(f"{self.what}: the client was closed (the model was released).")

    def headers(self) -> dict[str, str]:
        env = self.settings.api_key_env
        if env is None:
            return {}
        token = os.environ.get(env)
        if not token:
            raise RemoteAuthError(
                f"{self.what}: environment variable {env} (option api_key_env) is empty; export "
                "the server's bearer token there."
            )
        return {"authorization": f"Bearer {token}"}

    def _delay(self, attempt: int, hint: float | None) -> float:
        s = self.settings
        delay = min(s.max_backoff, s.backoff * (2**attempt)) * random.uniform(0.5, 1.0)
        if hint is not None:
            delay = max(delay, min(hint, s.max_backoff))
        return delay

    def judge(
        self, url: str, attempt: int, response: httpx.Response | None, exc: BaseException | None
    ) -> _Attempt:
        """Classify one attempt (``response`` or transport ``exc``)."""
        httpx = self._httpx
        retries = self.settings.retries
        if exc is not None:
            connection_failed = isinstance(
                exc,
                (
                    httpx.ConnectError,
                    httpx.ConnectTimeout,
                    httpx.PoolTimeout,
                    httpx.RemoteProtocolError,
                    httpx.ReadError,
                    httpx.WriteError,
                ),
            )
            if isinstance(exc, httpx.TimeoutException) and not connection_failed:
                return _Attempt(
                    error=RemoteTimeoutError(
                        f"{self.what}: {url} did not answer within {self.settings.timeout:g}s "
                        f"({type(exc).__name__}). Not retried, since the server may still be "
                        "working on it: raise the 'timeout' option or send smaller batches.",
                        url=url,
                    )
                )
            if attempt < retries:
                return _Attempt(delay=self._delay(attempt, None))
            return _Attempt(
                error=RemoteUnavailableError(
                    f"{self.what}: could not reach {url} after {attempt + 1} attempt(s): "
                    f"{type(exc).__name__}: {exc}. Check that the server is running and the URL "
                    "is right (`curl <url>/health`).",
                    url=url,
                )
            )
        assert response is not None
        status = response.status_code
        if status < 400:
            return _Attempt()
        message = _server_message(response)
        if status in RETRY_STATUSES:
            if attempt < retries:
                return _Attempt(delay=self._delay(attempt, _retry_after(response)))
            advice = (
                "it stayed overloaded; add replicas or raise its --max-concurrency/--max-pending"
                if status == 429
                else "it kept failing; check the server's logs"
            )
            return _Attempt(
                error=RemoteUnavailableError(
                    f"{self.what}: {url} answered HTTP {status} to all {attempt + 1} attempt(s) "
                    f"({advice}): {message}",
                    url=url,
                    status=status,
                )
            )
        if status in (401, 403):
            env = self.settings.api_key_env
            hint = (
                f"check the token in ${env}"
                if env
                else "the server wants a bearer token: export it and pass "
                "model_kwargs={'api_key_env': 'VAR_NAME'}"
            )
            return _Attempt(
                error=RemoteAuthError(
                    f"{self.what}: {url} refused the request with HTTP {status} ({hint}): "
                    f"{message}",
                    url=url,
                    status=status,
                )
            )
        hint = ""
        if status == 413:
            hint = " Send fewer texts per request (lower batch_size) or shorter texts."
        elif status == 404:
            hint = f" Is protocol={self.settings.protocol!r} the one this server speaks?"
        return _Attempt(
            error=RemoteRequestError(
                f"{self.what}: {url} rejected the request with HTTP {status}: {message}.{hint}",
                url=url,
                status=status,
            )
        )

    def post(self, path: str, payload: dict[str, Any]) -> Any:
        url = self.settings.base_url + path
        client = self.sync_client()
        attempt = 0
        while True:
            response: httpx.Response | None = None
            exc: BaseException | None = None
            try:
                response = client.post(url, json=payload, headers=self.headers())
            except self._httpx.TransportError as error:
                exc = error
            verdict = self.judge(url, attempt, response, exc)
            if verdict.error is not None:
                raise verdict.error
            if verdict.delay is None:
                assert response is not None
                return self._json(url, response)
            self._log_retry(url, verdict.delay, attempt, response, exc)
            time.sleep(verdict.delay)
            attempt += 1

    async def apost(self, path: str, payload: dict[str, Any]) -> Any:
        url = self.settings.base_url + path
        client = self.async_client()
        attempt = 0
        while True:
            response: httpx.Response | None = None
            exc: BaseException | None = None
            try:
                response = await client.post(url, json=payload, headers=self.headers())
            except self._httpx.TransportError as error:
                exc = error
            verdict = self.judge(url, attempt, response, exc)
            if verdict.error is not None:
                raise verdict.error
            if verdict.delay is None:
                assert response is not None
                return self._json(url, response)
            self._log_retry(url, verdict.delay, attempt, response, exc)
            await asyncio.sleep(verdict.delay)
            attempt += 1

    @staticmethod
    def _log_retry(
        url: str,
        delay: float,
        attempt: int,
        response: httpx.Response | None,
        exc: BaseException | None,
    ) -> None:
        """One log line per retry, for the sync and the async path alike."""
        logger.info(
            "rag-rerank remote: retrying %s in %.2fs (attempt %d: %s)",
            url,
            delay,
            attempt + 1,
            response.status_code if response is not None else type(exc).__name__,
        )

    def _json(self, url: str, response: httpx.Response) -> Any:
        try:
            return response.json()
        except ValueError:
            raise RemoteError(
                f"{self.what}: {url} answered HTTP {response.status_code} with a body that is not "
                f"JSON ({response.text[:120]!r}). Is this the model server's URL?",
                url=url,
                status=response.status_code,
            ) from None

    def close(self) -> None:
        with self._lock:
            self._closed = True
            sync, self._sync = self._sync, None
            self._async = weakref.WeakKeyDictionary()
        if sync is not None:
            sync.close()
        # AsyncClients hold sockets bound to their loop; they are dropped, not awaited here.


def _unexpected(what: str, url: str, body: Any, expected: str) -> RemoteError:
    return RemoteError(
        f"{what}: unexpected response from {url}: expected {expected}, got "
        f"{str(body)[:160]!r}. Check the 'protocol' option (tei, cohere or infinity).",
        url=url,
    )


def _chunks(items: Sequence[Any], size: int) -> list[Sequence[Any]]:
    return [items[i : i + size] for i in range(0, len(items), size)]


def _normalize(vector: list[float]) -> list[float]:
    norm = math.sqrt(sum(v * v for v in vector))
    return [v / norm for v in vector] if norm else vector


# -- protocols -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Call:
    path: str
    payload: dict[str, Any]
    parse: Callable[[Any, str], list[Any]]


class _Protocol:
    """Builds requests and parses responses for one wire protocol."""

    def __init__(self, settings: RemoteSettings, what: str) -> None:
        self.s = settings
        self.what = what

    def _with_model(self, payload: dict[str, Any]) -> dict[str, Any]:
        if self.s.model_name:
            payload["model"] = self.s.model_name
        return payload

    def rerank(self, query: str, texts: Sequence[str]) -> _Call:
        n = len(texts)
        if self.s.protocol == "tei":
            payload: dict[str, Any] = {
                "query": query,
                "texts": list(texts),
                "raw_scores": False,
                "return_text": False,
                "truncate": self.s.truncate,
            }
            return _Call("/rerank", payload, lambda body, url: self._scores(body, url, n, None))
        path = "/v1/rerank" if self.s.protocol == "cohere" else "/rerank"
        payload = self._with_model(
            {"query": query, "documents": list(texts), "return_documents": False, "top_n": n}
        )
        if self.s.protocol == "infinity":
            payload["raw_scores"] = False
        return _Call(path, payload, lambda body, url: self._scores(body, url, n, "results"))

    def _scores(self, body: Any, url: str, n: int, key: str | None) -> list[float]:
        items = body.get(key) if key is not None and isinstance(body, dict) else body
        score_key = "score" if key is None else "relevance_score"
        expected = (
            f"a list of {{index, {score_key}}}"
            if key is None
            else f"{{'{key}': [{{index, {score_key}}}]}}"
        )
        if not isinstance(items, list):
            raise _unexpected(self.what, url, body, expected)
        scores: list[float | None] = [None] * n
        try:
            for item in items:
                scores[int(item["index"])] = float(item[score_key])
        except (KeyError, TypeError, ValueError, IndexError):
            raise _unexpected(self.what, url, body, expected) from None
        if any(score is None for score in scores):
            raise _unexpected(self.what, url, body, f"one score for each of the {n} texts")
        return [float(score) for score in scores]  # type: ignore[arg-type]

    def embed(self, texts: Sequence[str], is_query: bool, normalize: bool) -> _Call:
        n = len(texts)
        if self.s.protocol == "tei":
            payload: dict[str, Any] = {
                "inputs": list(texts),
                "normalize": normalize,
                "truncate": self.s.truncate,
            }
            if is_query and self.s.query_prompt_name:
                payload["prompt_name"] = self.s.query_prompt_name
            return _Call("/embed", payload, lambda body, url: self._vectors(body, url, n))
        if self.s.protocol == "cohere":
            payload = self._with_model(
                {
                    "texts": list(texts),
                    "input_type": "search_query" if is_query else "search_document",
                    "embedding_types": ["float"],
                    "truncate": "END" if self.s.truncate else "NONE",
                }
            )
            return _Call("/v1/embed", payload, lambda body, url: self._cohere(body, url, n))
        payload = self._with_model({"input": list(texts), "encoding_format": "float"})
        return _Call("/embeddings", payload, lambda body, url: self._openai(body, url, n))

    def _vectors(self, body: Any, url: str, n: int) -> list[list[float]]:
        if not isinstance(body, list) or len(body) != n:
            raise _unexpected(self.what, url, body, f"a list of {n} vectors")
        try:
            return [[float(x) for x in vector] for vector in body]
        except (TypeError, ValueError):
            raise _unexpected(self.what, url, body, "lists of numbers") from None

    def _cohere(self, body: Any, url: str, n: int) -> list[list[float]]:
        vectors = body.get("embeddings") if isinstance(body, dict) else None
        if isinstance(vectors, dict):
            vectors = vectors.get("float")
        return self._vectors(vectors, url, n)

    def _openai(self, body: Any, url: str, n: int) -> list[list[float]]:
        data = body.get("data") if isinstance(body, dict) else None
        if not isinstance(data, list):
            raise _unexpected(self.what, url, body, "{'data': [{index, embedding}]}")
        try:
            ordered = sorted(data, key=lambda item: int(item["index"]))
            vectors = [item["embedding"] for item in ordered]
        except (KeyError, TypeError, ValueError):
            raise _unexpected(self.what, url, body, "{'data': [{index, embedding}]}") from None
        return self._vectors(vectors, url, n)


# -- the loaded models ---------------------------------------------------------------------------


def _group_by_query(pairs: Sequence[tuple[str, str]]) -> dict[str, list[int]]:
    groups: dict[str, list[int]] = {}
    for i, (query, _text) in enumerate(pairs):
        groups.setdefault(query, []).append(i)
    return groups


class _RemoteModel:
    thread_safe = True
    device = "remote"
    dtype = "remote"

    def __init__(self, spec: ModelSpec, settings: RemoteSettings) -> None:
        self.settings = settings
        what = f"{spec.backend} {settings.base_url}"
        self.client = _Client(settings, what)
        self.protocol = _Protocol(settings, what)

    def close(self) -> None:
        self.client.close()


class RemoteReranker(_RemoteModel, RerankerModel):
    """Scores pairs on a rerank server: one request per distinct query and ``batch_size`` texts."""

    def _calls(self, pairs: Sequence[tuple[str, str]], batch_size: int) -> list[list[int]]:
        groups: list[list[int]] = []
        for indices in _group_by_query(pairs).values():
            groups.extend(list(chunk) for chunk in _chunks(indices, batch_size))
        return groups

    def score_pairs(self, pairs: Sequence[tuple[str, str]], batch_size: int) -> list[float]:
        scores = [0.0] * len(pairs)
        for indices in self._calls(pairs, batch_size):
            call = self.protocol.rerank(pairs[indices[0]][0], [pairs[i][1] for i in indices])
            body = self.client.post(call.path, call.payload)
            parsed = call.parse(body, self.settings.base_url + call.path)
            for i, score in zip(indices, parsed, strict=True):
                scores[i] = score
        return scores

    async def ascore_pairs(
        self, pairs: Sequence[tuple[str, str]], batch_size: int = 32
    ) -> list[float]:
        """Like :meth:`score_pairs` on the event loop's own pooled ``AsyncClient``."""
        scores = [0.0] * len(pairs)
        for indices in self._calls(pairs, batch_size):
            call = self.protocol.rerank(pairs[indices[0]][0], [pairs[i][1] for i in indices])
            body = await self.client.apost(call.path, call.payload)
            parsed = call.parse(body, self.settings.base_url + call.path)
            for i, score in zip(indices, parsed, strict=True):
                scores[i] = score
        return scores


class RemoteEmbedder(_RemoteModel, EmbedderModel):
    """Embeds texts on an embedding server, ``batch_size`` texts per request."""

    def __init__(self, spec: ModelSpec, settings: RemoteSettings) -> None:
        super().__init__(spec, settings)
        self._dimension: int | None = None

    @property
    def dimension(self) -> int:
        if self._dimension is None:
            self.embed(["dimension probe"], batch_size=1, is_query=False)
        assert self._dimension is not None
        return self._dimension

    def _finish(self, vectors: list[list[float]], normalize: bool) -> list[list[float]]:
        if vectors:
            self._dimension = len(vectors[0])
        # Normalising here too makes normalize=True hold whatever the server's defaults are.
        return [_normalize(v) for v in vectors] if normalize else vectors

    def embed(
        self,
        texts: Sequence[str],
        *,
        batch_size: int,
        is_query: bool,
        normalize: bool = False,
        prompt: str | None = None,
    ) -> list[list[float]]:
        vectors: list[list[float]] = []
        texts = [prompt + t for t in texts] if prompt is not None else texts  # sent as text
        for chunk in _chunks(list(texts), batch_size):
            call = self.protocol.embed(chunk, is_query, normalize)
            body = self.client.post(call.path, call.payload)
            vectors.extend(call.parse(body, self.settings.base_url + call.path))
        return self._finish(vectors, normalize)

    async def aembed(
        self,
        texts: Sequence[str],
        *,
        batch_size: int = 32,
        is_query: bool = False,
        normalize: bool = False,
        prompt: str | None = None,
    ) -> list[list[float]]:
        """Like :meth:`embed` on the event loop's own pooled ``AsyncClient``."""
        vectors: list[list[float]] = []
        texts = [prompt + t for t in texts] if prompt is not None else texts
        for chunk in _chunks(list(texts), batch_size):
            call = self.protocol.embed(chunk, is_query, normalize)
            body = await self.client.apost(call.path, call.payload)
            vectors.extend(call.parse(body, self.settings.base_url + call.path))
        return self._finish(vectors, normalize)


def load_reranker(spec: ModelSpec, pool: ModelPool) -> RemoteReranker:
    """Loader of ``backend="remote-reranker"``: validates options, contacts nothing yet."""
    _httpx()
    return RemoteReranker(spec, RemoteSettings.from_spec(spec))


def load_embedder(spec: ModelSpec, pool: ModelPool) -> RemoteEmbedder:
    """Loader of ``backend="remote-embedder"``: validates options, contacts nothing yet."""
    _httpx()
    return RemoteEmbedder(spec, RemoteSettings.from_spec(spec))
