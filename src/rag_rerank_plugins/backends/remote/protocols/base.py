"""What a wire protocol is: :class:`Protocol`, the :class:`Call` it builds, and parsing helpers.

A protocol knows nothing of HTTP clients, retries or request sizes: for a list of texts it
builds one request (:class:`Call`: the path, the JSON payload, and how to read the answer's
JSON), and it tells which ``GET`` path, if any, advertises the server's request limits. The
client sends, retries and maps errors; the model splits inputs by count and bytes (it measures
the payload the protocol built) and puts results back in the caller's order. A parser that does
not find what it expects raises :class:`UnexpectedResponse` naming what it expected; the model
turns that into a :class:`~rag_rerank_plugins.exceptions.RemoteError` with the URL and the body.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any
from typing import Protocol as Structural

__all__ = [
    "Call",
    "CallSettings",
    "Protocol",
    "ServerInfo",
    "UnexpectedResponse",
    "documents_rerank",
    "scores_by_index",
    "vector_list",
]


class CallSettings(Structural):
    """What a protocol reads of the remote settings (``CallSettings`` has them). Declared here
    so protocols do not import the settings module, which imports the protocol registry."""

    @property
    def model_name(self) -> str | None: ...

    @property
    def truncate(self) -> bool: ...

    @property
    def truncation_direction(self) -> str: ...

    @property
    def query_prompt_name(self) -> str | None: ...


class UnexpectedResponse(Exception):
    """An answer that is not what the protocol expects; ``expected`` says what it wanted."""

    def __init__(self, expected: str) -> None:
        super().__init__(expected)
        self.expected = expected


@dataclass(frozen=True)
class Call:
    """One request of a protocol: ``POST path`` with ``payload`` as JSON; ``parse`` reads the
    answer's JSON into one result per text sent (scores, or vectors), in the texts' order."""

    path: str
    payload: dict[str, Any]
    parse: Callable[[Any], list[Any]]


@dataclass(frozen=True)
class ServerInfo:
    """The request limits a server advertised (None: it did not say)."""

    max_request_bytes: int | None = None
    max_client_batch_size: int | None = None


def _positive_int(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else None


class Protocol:
    """How one wire protocol asks a server to rerank and embed, and reads the answers.

    Subclass it, implement :meth:`rerank` and/or :meth:`embed`, and register an instance under a
    name with :func:`~rag_rerank_plugins.backends.remote.register_protocol`; specs then select
    it with the option ``protocol="name"``. Instances are shared by every model that uses the
    protocol: keep them stateless (everything per-spec is in ``settings``).
    """

    #: Whether every request names the model (the spec must then give ``model_name``).
    needs_model_name: bool = False
    #: ``GET`` path answering the server's request limits as JSON (see :meth:`read_info`), asked
    #: once per client; None for servers that have none (the defaults then apply).
    info_path: str | None = "/info"
    #: The operations (``"rerank"``, ``"embed"``) whose request honours ``settings.truncate``
    #: being False: the server then answers a too-long text with an error instead of cutting
    #: it. A spec with ``truncate=False`` for an operation not listed is refused at load time
    #: (the server would cut silently).
    honours_no_truncate: frozenset[str] = frozenset({"rerank", "embed"})

    def rerank(self, settings: CallSettings, query: str, texts: Sequence[str]) -> Call:
        """The request scoring ``texts`` against ``query``; ``parse`` returns one float each."""
        raise NotImplementedError(f"{type(self).__name__} does not rerank")

    def embed(
        self, settings: CallSettings, texts: Sequence[str], *, is_query: bool, normalize: bool
    ) -> Call:
        """The request embedding ``texts``; ``parse`` returns one vector (list of floats) each."""
        raise NotImplementedError(f"{type(self).__name__} does not embed")

    def read_info(self, body: Any) -> ServerInfo:
        """The limits in the JSON answer of ``GET info_path``. The default reads the keys that
        ``rag-rerank serve`` (both) and TEI (``max_client_batch_size``) advertise."""
        if not isinstance(body, dict):
            return ServerInfo()
        return ServerInfo(
            _positive_int(body.get("max_request_bytes")),
            _positive_int(body.get("max_client_batch_size")),
        )


# -- parsing helpers shared by the built-in protocols -------------------------------------------


def scores_by_index(items: Any, n: int, score_key: str, expected: str) -> list[float]:
    """Scores from ``[{"index": i, score_key: s}, ...]`` (any order) for ``n`` texts."""
    if not isinstance(items, list):
        raise UnexpectedResponse(expected)
    scores: list[float | None] = [None] * n
    try:
        for item in items:
            index, score = item["index"], item[score_key]
            # Exactly one score per text, at an index in range: a negative index (Python would
            # count it from the end), a duplicate (a silent overwrite), a bool or a string is a
            # broken answer, never a score put at some other passage's position.
            if not _is_index(index) or not 0 <= index < n or scores[index] is not None:
                raise UnexpectedResponse(f"one score for each of the {n} texts, indices 0..{n - 1}")
            if isinstance(score, (bool, str)):
                raise TypeError(score)
            scores[index] = float(score)
    except (KeyError, TypeError, ValueError, OverflowError):  # Overflow: an int of 400 digits
        raise UnexpectedResponse(expected) from None
    if any(score is None for score in scores):
        raise UnexpectedResponse(f"one score for each of the {n} texts")
    return [float(score) for score in scores]  # type: ignore[arg-type]


def _is_index(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def vector_list(body: Any, n: int) -> list[list[float]]:
    """``n`` vectors from a JSON list of lists of numbers."""
    if not isinstance(body, list) or len(body) != n:
        raise UnexpectedResponse(f"a list of {n} vectors")
    try:
        vectors = [[x if type(x) is float else _number(x) for x in vector] for vector in body]
    except (TypeError, OverflowError):  # Overflow: an int too large for a float
        raise UnexpectedResponse("lists of numbers") from None
    if not all(vectors):  # an empty vector has no dimension a vector store could take
        raise UnexpectedResponse("non-empty lists of numbers")
    return vectors


def _number(value: Any) -> float:
    """A JSON number as a float; a string or a bool (``float("0.1")``, ``float(True)``) is a
    broken answer, not a coordinate."""
    if type(value) is not int:
        raise TypeError(value)
    return float(value)


def documents_rerank(
    settings: CallSettings, path: str, query: str, texts: Sequence[str], **extra: Any
) -> Call:
    """The ``documents`` rerank shape of Cohere and infinity (and ``rag-rerank serve``):
    ``{query, documents, top_n, model}`` answered by ``{"results": [{index, relevance_score}]}``."""
    n = len(texts)
    payload: dict[str, Any] = {
        "query": query,
        "documents": list(texts),
        "return_documents": False,
        "top_n": n,
    }
    if settings.model_name:
        payload["model"] = settings.model_name
    payload.update(extra)

    def parse(body: Any) -> list[float]:
        results = body.get("results") if isinstance(body, dict) else None
        return scores_by_index(
            results, n, "relevance_score", "{'results': [{index, relevance_score}]}"
        )

    return Call(path, payload, parse)
