"""Every error the server answers, in one shape, from one table.

* :func:`error_body` is the documented shape: ``error`` and ``error_type`` (TEI clients read these)
  and ``message`` (Cohere-style clients read that one); on OpenAI's paths ``error`` is OpenAI's
  object (``{"message", "type", "param", "code"}``), which the ``openai`` SDK reads. Every
  4xx/5xx uses it, including the ones FastAPI and Starlette would answer themselves (400, 404
  and 405 for unknown paths or methods, 422 for invalid bodies). A body field the endpoint
  does not know is a 400 naming it (never silently ignored). A 405's ``Allow`` lists the
  methods of every route on the path. A body sent with a content type other than JSON (or none)
  is a 415. On OpenAI's paths an invalid request is a 400 (OpenAI never answers 422; the
  ``openai`` SDK raises ``BadRequestError`` for 400 only), with ``param`` naming the field when
  one is known.
* :data:`STATUS` maps exceptions to a status, an ``error_type``, a ``Retry-After`` and the
  ``/metrics`` rejection reason; :func:`rule_for` reads it along the exception's MRO, so a new
  exception class needs one line there, not a new ``except``.
* :func:`error_response` is the one exception handler the app installs for all of them.
* :func:`internal_error` is the 500 of an exception no rule maps (a bug): the guard middleware
  answers it, logs the traceback under the request id (:mod:`.request_id`) and keeps the
  connection usable.

Importing this module does not import FastAPI (the guard middleware and the CLI use it). It
imports nothing of the server but :mod:`.request_id`: what it reads of the server state is the
:class:`ErrorContext` protocol, so :mod:`.state` (which raises :class:`ApiError`) can import it.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

from ..exceptions import (
    InvalidInputError,
    ModelLoadError,
    QueueFullError,
    RagRerankError,
    RequestTimeoutError,
)
from .request_id import request_id_of

if TYPE_CHECKING:
    from starlette.requests import Request
    from starlette.responses import JSONResponse

__all__ = [
    "STATUS",
    "ApiError",
    "ErrorContext",
    "OPENAI_PATHS",
    "ErrorRule",
    "Overloaded",
    "error_body",
    "error_response",
    "internal_error",
    "route_path",
    "rule_for",
]

logger = logging.getLogger(__name__)


#: Paths whose clients (the ``openai`` SDK) read ``error`` as an object with a ``message``.
OPENAI_PATHS = ("/embeddings", "/v1/embeddings", "/models", "/v1/models")
#: OpenAI's ``error.type`` per status class.
_OPENAI_TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error"}


def route_path(scope: Mapping[str, Any]) -> str:
    """The request's path inside this app: without ``root_path``, which an ASGI server or a
    parent app puts in front of it (Ray Serve's ``route_prefix``, a ``mount("/rr", app)``).
    The paths the app matches (public, known, OpenAI's) are its own, never the prefixed ones."""
    path = str(scope.get("path", ""))
    root = str(scope.get("root_path", "")).rstrip("/")
    if root and path.startswith(root) and path[len(root) : len(root) + 1] in ("", "/"):
        return path[len(root) :] or "/"
    return path


def _openai_path(path: str | None) -> bool:
    return path is not None and any(path == p or path.startswith(p + "/") for p in OPENAI_PATHS)


def error_body(
    message: str,
    error_type: str,
    path: str | None = None,
    status: int = 400,
    param: str | None = None,
) -> dict[str, Any]:
    """Error JSON readable by TEI clients (``error``, ``error_type``) and Cohere-style clients
    (``message``). On OpenAI's paths ``error`` is OpenAI's object (``message``, ``type``,
    ``param``: the request field at fault, when known; ``code``), which the ``openai`` SDK puts
    in its exception's text."""
    if _openai_path(path):
        kind = _OPENAI_TYPES.get(
            status, "server_error" if status >= 500 else "invalid_request_error"
        )
        error: Any = {"message": message, "type": kind, "param": param, "code": error_type}
        return {"error": error, "error_type": error_type, "message": message}
    return {"error": message, "error_type": error_type, "message": message}


class ApiError(Exception):
    """An error the endpoint code decided on: answered with ``status`` and the common body."""

    def __init__(
        self,
        status: int,
        message: str,
        error_type: str = "Validation",
        headers: dict[str, str] | None = None,
        param: str | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.error_type = error_type
        self.headers = headers
        #: The request field at fault (OpenAI's ``error.param``), when known.
        self.param = param


class Overloaded(Exception):
    """Raised by :meth:`~.limits.Admission.enter` when running + queued requests are at the
    limit; ``retry_after`` is the estimated wait in seconds."""

    def __init__(self, retry_after: int, message: str) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class _RetryEstimate(Protocol):
    def retry_after(self) -> int: ...


class _Rejections(Protocol):
    def reject(self, reason: str) -> None: ...


class ErrorContext(Protocol):
    """What answering an error reads of the app's state (a :class:`~.state.ServerState`):
    the admission's ``Retry-After`` estimate and the rejection counters of ``/metrics``."""

    @property
    def admission(self) -> _RetryEstimate: ...

    @property
    def metrics(self) -> _Rejections: ...


RetryAfter = Callable[[BaseException, ErrorContext], int]


@dataclass(frozen=True)
class ErrorRule:
    """How one exception class is answered."""

    status: int
    error_type: str
    #: Seconds for the ``Retry-After`` header (None: no header), from the exception and state.
    retry_after: RetryAfter | None = None
    #: Counted in ``rag_rerank_http_rejected_total{reason=...}`` when set.
    reject_reason: str | None = None


def _own_retry_after(exc: BaseException, state: ErrorContext) -> int:
    return int(getattr(exc, "retry_after", 1))


def _estimated_retry_after(exc: BaseException, state: ErrorContext) -> int:
    return state.admission.retry_after()


def _fixed(seconds: int) -> RetryAfter:
    return lambda exc, state: seconds


#: Exception class -> answer. Looked up along the MRO: the most specific class wins, and any
#: other :class:`RagRerankError` is the model's failure (500).
STATUS: dict[type[Exception], ErrorRule] = {
    Overloaded: ErrorRule(429, "Overloaded", _own_retry_after, "overloaded"),
    # The pool's own per-model queue (EngineConfig.max_queue) is full.
    QueueFullError: ErrorRule(429, "Overloaded", _estimated_retry_after, "overloaded"),
    InvalidInputError: ErrorRule(422, "Validation", reject_reason="invalid"),
    RequestTimeoutError: ErrorRule(503, "Overloaded", _fixed(1)),
    ModelLoadError: ErrorRule(503, "Unhealthy", _fixed(5)),
    RagRerankError: ErrorRule(500, "Backend"),
}

#: ``rag_rerank_http_rejected_total`` reason of an endpoint's own :class:`ApiError` by status
#: (too many texts, token ids, an unknown model, an empty list); other statuses are no refusal.
_REFUSED = {400: "invalid", 404: "invalid", 413: "too_large", 422: "invalid"}

#: ``error_type`` of statuses FastAPI/Starlette answer themselves (HTTPException).
_HTTP_ERROR_TYPES = {
    400: "Validation",
    404: "NotFound",
    405: "MethodNotAllowed",
    408: "Timeout",
    413: "Validation",
}


def rule_for(exc: BaseException) -> ErrorRule | None:
    """The :data:`STATUS` rule of the most specific class of ``exc``; None if none applies."""
    for cls in type(exc).__mro__:
        rule = STATUS.get(cls)
        if rule is not None:
            return rule
    return None


#: Our body-wide checks (schemas.refuse_invalid_unicode): one message for the whole body.
_WHOLE_BODY = frozenset({"invalid_unicode", "non_finite_number", "nested_too_deeply"})
#: pydantic's error types for "this value should have been an object" (its location ends with
#: the model's name).
_NOT_AN_OBJECT = frozenset({"model_type", "model_attributes_type", "dataclass_type"})


def _validation_message(errors: list[dict[str, Any]]) -> str:
    parts = []
    for error in errors:
        if error.get("type") == "json_invalid":
            detail = (error.get("ctx") or {}).get("error", "")
            return f"Request body is not valid JSON ({detail}). Send a JSON object."
        if error.get("type") in _WHOLE_BODY:  # the whole body: one message says it all
            return f"Invalid request: {error.get('msg', 'not valid Unicode')}"
        where = ".".join(_json_path(error)) or "body"
        parts.append(f"{where}: {error.get('msg', 'invalid')}")
    return "Invalid request: " + "; ".join(parts[:5])


def _json_path(error: dict[str, Any]) -> list[str]:
    """An error's location as a path into the client's JSON. FastAPI puts ``body`` first, and
    pydantic names the branch of a union of models (``RerankRequest``, ``Document``) before its
    fields: neither is in the JSON. A branch name is last only when the value there is not an
    object at all; otherwise a field follows it, so a client's own capitalised field
    (``TopN``), which is last, stays."""
    loc = [str(p) for p in error.get("loc", ())]
    last = len(loc) if error.get("type") in _NOT_AN_OBJECT else len(loc) - 1
    return [p for i, p in enumerate(loc) if p != "body" and not (i < last and p[:1].isupper())]


def _unknown_fields(errors: list[dict[str, Any]]) -> list[str]:
    """The fields of the body no endpoint model knows (pydantic's ``extra_forbidden``), as
    dotted paths (``documents.0.title``); union branches repeat a path once."""
    found: list[str] = []
    for error in errors:
        if error.get("type") != "extra_forbidden":
            continue
        where = ".".join(_json_path(error)) or "body"
        if where not in found:
            found.append(where)
    return found


def _param(errors: list[dict[str, Any]]) -> str | None:
    """The top-level body field of the first validation error (OpenAI's ``error.param``)."""
    for error in errors:
        if error.get("type") == "json_invalid":  # its location is a character offset
            return None
        if error.get("type") in _WHOLE_BODY:
            where = str((error.get("ctx") or {}).get("where", ""))
            field = re.split(r"[.\[]", where, maxsplit=1)[0]
            if field and " " not in field:
                return field
            continue
        parts = _json_path(error)
        if parts:
            return parts[0]
    return None


def _body_not_read_as_json(errors: list[dict[str, Any]]) -> bool:
    """Whether FastAPI validated the raw body bytes: it reads a body as JSON only when its
    content type says JSON (``application/json``, ``application/*+json``)."""
    return any(
        isinstance(error.get("input"), (bytes, bytearray)) and error.get("loc", ())[:1] == ("body",)
        for error in errors
    )


def _not_json(request: Request) -> ApiError:
    content_type = request.headers.get("content-type")
    sent = f"as {content_type!r}" if content_type else "without a Content-Type"
    return ApiError(
        415,
        f"The request body was sent {sent}; {request.url.path} reads JSON only. Send it with "
        "the header 'Content-Type: application/json' (curl: -H 'Content-Type: "
        "application/json').",
        "Validation",
    )


#: The methods a 405's ``Allow`` may name (each is tried against the app's routes).
_METHODS = ("DELETE", "GET", "HEAD", "OPTIONS", "PATCH", "POST", "PUT")


def _allowed_methods(request: Request) -> str | None:
    """The methods some route answers on the request's path (``Allow`` of a 405). Starlette
    names the first matching route's only (``/`` has a GET and a POST route). Asked of the
    routes' public ``matches``, which nested (included) routers answer too."""
    from starlette.routing import Match

    routes = request.app.router.routes
    allowed = [
        method
        for method in _METHODS
        if any(
            route.matches({**request.scope, "method": method})[0] is Match.FULL for route in routes
        )
    ]
    return ", ".join(allowed) or None


def _unknown_message(fields: list[str], path: str) -> str:
    names = ", ".join(f"'{f}'" for f in fields[:5])
    return (
        f"Unknown or unsupported field(s) {names} for {path}: this server does not know them and "
        "never ignores a field silently. Remove them; docs/wire-protocols.md (and GET /docs) "
        "list the fields each endpoint honours."
    )


def _http_error(status: int, detail: Any, request: Request) -> ApiError:
    """Starlette's own 404/405/400 in our shape, with a message that says what to do."""
    if status == 404:
        message = (
            f"No endpoint at {request.url.path}. GET /docs lists the endpoints this server has."
        )
    elif status == 405:
        message = (
            f"{request.method} is not allowed on {request.url.path}. GET /docs lists the "
            "methods of every endpoint."
        )
    else:
        message = str(detail) if detail else f"HTTP {status}"
    return ApiError(status, message, _HTTP_ERROR_TYPES.get(status, "Validation"))


class BodyRefused(ValueError):
    """A JSON body that parses but must not be read (:mod:`.body`: a repeated key, an integer
    too long to read); the message says what to send instead. Answered as a ``422``."""


def _unreadable_body(exc: BaseException) -> ApiError | None:
    """FastAPI's 400 "There was an error parsing the body" for a JSON body it could not read
    other than by bad syntax (which is a 422 already), as the 422 the docs promise: bytes that
    are not UTF-8 (a Latin-1 body), nesting so deep that the parser gave up, or what
    :mod:`.body` refuses (a repeated key, an integer too long to read)."""
    cause = exc.__cause__
    if isinstance(cause, UnicodeDecodeError):
        return ApiError(
            422,
            "Invalid request: the body is not valid UTF-8 "
            f"({cause.reason} at byte {cause.start}). Send the JSON encoded as UTF-8.",
            "Validation",
        )
    if isinstance(cause, RecursionError):
        return ApiError(
            422,
            "Invalid request: the body's JSON is nested too deeply to read. Send a flatter body.",
            "Validation",
        )
    if isinstance(cause, BodyRefused):
        return ApiError(422, f"Invalid request: {cause}", "Validation")
    return None


def as_api_error(exc: BaseException, request: Request, state: ErrorContext) -> ApiError | None:
    """``exc`` as an :class:`ApiError`, or None when it is not ours to answer (a bug: 500)."""
    from fastapi.exceptions import RequestValidationError
    from starlette.exceptions import HTTPException

    if isinstance(exc, ApiError):  # an endpoint's own refusal, before any model work
        reason = _REFUSED.get(exc.status)
        if reason is not None:
            state.metrics.reject(reason)
        return exc
    if isinstance(exc, RequestValidationError):
        state.metrics.reject("invalid")
        errors = list(exc.errors())
        if _body_not_read_as_json(errors):
            return _not_json(request)
        unknown = _unknown_fields(errors)
        if unknown:
            message = _unknown_message(unknown, request.url.path)
            return ApiError(400, message, "Validation", param=unknown[0].split(".")[0])
        return ApiError(422, _validation_message(errors), "Validation", param=_param(errors))
    if isinstance(exc, HTTPException):
        unread = _unreadable_body(exc)
        if unread is not None:
            state.metrics.reject("invalid")
            return unread
        error = _http_error(exc.status_code, exc.detail, request)
        given = dict(exc.headers) if exc.headers else {}
        if exc.status_code == 405:
            allowed = _allowed_methods(request)
            if allowed is not None:
                given = {k: v for k, v in given.items() if k.lower() != "allow"}
                given["allow"] = allowed
        error.headers = given or None
        return error
    rule = rule_for(exc)
    if rule is None:
        return None
    if rule.reject_reason is not None:
        state.metrics.reject(rule.reject_reason)
    headers = None
    if rule.retry_after is not None:
        headers = {"retry-after": str(rule.retry_after(exc, state))}
    return ApiError(rule.status, str(exc), rule.error_type, headers)


def internal_error(exc: BaseException, request_id: str) -> ApiError:
    """The 500 of an exception no rule maps (a bug, or a backend error the engine let through):
    the message names the class and the request id, under which the log has the traceback."""
    return ApiError(
        500,
        f"Internal server error ({type(exc).__name__}) in request {request_id}; the server log "
        "has the traceback under that request id.",
        "Backend",
    )


def handled_exceptions() -> tuple[type[Exception], ...]:
    """What :func:`error_response` is installed for: :class:`ApiError`, FastAPI's request
    validation, Starlette's HTTP errors, every class in :data:`STATUS`, and ``Exception``.

    Unmapped exceptions from the endpoints are answered by the guard middleware (which keeps
    the connection open); the ``Exception`` entry is Starlette's outermost last resort, for a
    failure of the middleware itself (Starlette then closes the connection)."""
    from fastapi.exceptions import RequestValidationError
    from starlette.exceptions import HTTPException

    return (ApiError, RequestValidationError, HTTPException, *STATUS, Exception)


async def error_response(request: Request, exc: Exception) -> JSONResponse:
    """The app's one exception handler: every error in the documented shape. A 500 is logged
    with the request id (with the traceback when no rule maps the exception)."""
    from starlette.responses import JSONResponse

    state: ErrorContext = request.app.state.server
    error = as_api_error(exc, request, state)
    request_id = request_id_of(request.scope)
    if error is None:
        logger.error(
            "rag-rerank serve: request %s (%s %s) failed: unhandled %s",
            request_id,
            request.method,
            request.url.path,
            type(exc).__name__,
            exc_info=exc,
        )
        error = internal_error(exc, request_id)
    elif error.status >= 500 and error.status != 503:
        # The model failed (503s are readiness and timeouts: expected, and counted elsewhere).
        logger.error(
            "rag-rerank serve: request %s (%s %s) failed: %s",
            request_id,
            request.method,
            request.url.path,
            error.message,
            exc_info=exc,
        )
    path = route_path(request.scope)
    # OpenAI answers every invalid request with 400 (the openai SDK's BadRequestError): never 422.
    status = 400 if error.status == 422 and _openai_path(path) else error.status
    return JSONResponse(
        error_body(error.message, error.error_type, path, status, error.param),
        status_code=status,
        headers=error.headers,
    )
