"""Remote backends: a model served over HTTP used exactly like a local one (extra ``remote``).

``backend="remote-reranker"`` and ``backend="remote-embedder"`` talk to a model server instead of
loading weights, so every adapter (LangChain compressor/embeddings, LlamaIndex postprocessor/
embedding) can use one model shared by many processes or machines. Three wire protocols are
registered (more with :func:`register_protocol`):

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
    protocol       a registered protocol: "tei" | "cohere" | "infinity" | yours (default "tei")
    timeout        seconds to wait for the whole answer, per attempt          (default 30)
    connect_timeout seconds to wait for a connection                          (default 5)
    retries        extra attempts on 429, 5xx and connection errors           (default 3)
    backoff        first retry delay in seconds, doubled per attempt, jittered (default 0.25)
    max_backoff    cap on one delay, also on the server's Retry-After          (default 8)
    api_key_env    name of the environment variable holding the bearer token
    truncate       False: a too-long input is an error, not a cut; honoured by tei and
                   cohere's embed, refused at load time by the others       (default True)
    truncation_direction  which end a long input loses: "right" | "left"      (default "right")
    query_prompt_name  TEI ``prompt_name`` sent for queries (e.g. "query")  (default none)
    max_connections    connection pool size per client                         (default 32)
    verify         verify TLS certificates                                  (default True)
    max_request_bytes  largest request body the server (and any proxy) accepts
                   (default: what ``GET /info`` advertises, else 1 MiB)

Requests are split by count *and* by bytes. The client asks ``GET /info`` once (``rag-rerank
serve`` advertises ``max_request_bytes`` and ``max_client_batch_size``, TEI the latter), takes the
``max_request_bytes`` option over it when given and 1 MiB when neither says, then packs texts, in
order, into requests of at most ``batch_size`` texts (and the server's batch limit) whose encoded
JSON body, query and envelope included, stays under that limit minus ``HEADROOM_BYTES``
(:func:`plan_chunks`); results are mapped back to the input's positions. A text too large to fit
in a request even alone is cut to its longest prefix that fits (:func:`truncate_json`; a warning
says so). Rerankers and embedders read only their first ``max_length`` tokens (~512; 8192 for
long-context models), and a prefix of hundreds of KB holds far more than that, so the scores and
vectors are those of the whole text. With ``truncate=False`` such a text is an
:class:`InvalidInputError` instead, raised before anything is sent; so is a query that alone
fills a request.

Every request carries ``X-Priority: interactive`` or ``bulk``, the engine lane of the call it
serves (``pool.score_pairs(..., priority="bulk")``), so ``rag-rerank serve`` queues it the same
way on its side; other servers ignore the header.

Secrets never go into the spec (its label shows up in stats, metrics and logs): the token is read
from the environment variable named by ``api_key_env`` on every request, so rotation works. A URL
with ``user:password@`` or a query string is a :class:`ConfigurationError` for the same reason.

A call's ``timeout`` bounds the remote work too: each attempt's timeouts are cut to what is left
of it, and no retry starts whose wait would end past it. Redirects are followed, as the openai
and cohere clients do (307/308 keep the POST; httpx drops the token on a cross-origin redirect).
A rerank answer must score each text exactly once (an index in range, no duplicate); vectors must
be non-empty lists of numbers, and keep the dimension of the first answer.

One loaded remote model owns a pooled ``httpx.Client`` (thread-safe: the pool skips its call lock)
and one ``httpx.AsyncClient`` per event loop for :meth:`~RemoteReranker.ascore_pairs`/
:meth:`~RemoteEmbedder.aembed`, reused on that loop and closed when the loop shuts down (so
repeated ``asyncio.run`` calls leave no sockets behind). Its device is ``"remote"``: after
``fork`` a child builds fresh clients instead of sharing sockets.

Layout of this package (imports point down the list; httpx is imported only when a model loads):

* :mod:`.models`: the loaded models and the pool's loaders; each operation is one plan, run by
  the client's driver from sync or async code.
* :mod:`.client`: :class:`RemoteClient`: pooled httpx clients, the :class:`RetryPolicy`, the
  status -> (error class, hint) table, ``GET /info`` once per client; sans-I/O plans and the one
  driver that runs them, sync or async; :func:`use_transport` for tests.
* :mod:`.protocols`: the protocol registry, and one module per wire protocol (``tei.py``,
  ``cohere.py``, ``openai.py``: infinity / OpenAI-style) building requests and parsing answers.
* :mod:`.packing`: request limits, and packing texts into requests by count and bytes.
* :mod:`.settings`: :class:`RemoteSettings`, the spec's options parsed and checked.

Adding a wire protocol is one module with a :class:`Protocol` subclass plus one
:func:`register_protocol` line (docs/guides/extending.md, "Adding a client protocol").
"""

from __future__ import annotations

from .client import (
    PRIORITY_HEADER,
    RETRY_STATUSES,
    STATUS_RULES,
    RemoteClient,
    RetryPolicy,
    StatusRule,
    use_transport,
)
from .models import RemoteEmbedder, RemoteReranker, load_embedder, load_reranker
from .packing import (
    DEFAULT_MAX_REQUEST_BYTES,
    HEADROOM_BYTES,
    RequestLimits,
    plan_chunks,
    truncate_json,
)
from .protocols import (
    PROTOCOLS,
    Call,
    CallSettings,
    Protocol,
    ServerInfo,
    UnexpectedResponse,
    get_protocol,
    register_protocol,
)
from .settings import MIN_REQUEST_BYTES, RemoteSettings

__all__ = [
    "DEFAULT_MAX_REQUEST_BYTES",
    "HEADROOM_BYTES",
    "MIN_REQUEST_BYTES",
    "PRIORITY_HEADER",
    "PROTOCOLS",
    "RETRY_STATUSES",
    "STATUS_RULES",
    "Call",
    "CallSettings",
    "Protocol",
    "RemoteClient",
    "RemoteEmbedder",
    "RemoteReranker",
    "RemoteSettings",
    "RequestLimits",
    "RetryPolicy",
    "ServerInfo",
    "StatusRule",
    "UnexpectedResponse",
    "get_protocol",
    "load_embedder",
    "load_reranker",
    "plan_chunks",
    "register_protocol",
    "truncate_json",
    "use_transport",
]
