"""Admission control and request guards of the server: 401, 408, 413, 415, 429 before inference.

* :class:`Admission` bounds work: ``max_concurrency`` model calls run, ``max_pending`` more wait,
  and anything beyond is refused at once with 429 and a ``Retry-After`` estimated from recent
  request durations. Refusing early keeps latency bounded under overload, and tells clients (our
  remote backend retries with backoff) and load balancers to try again or elsewhere.
* :class:`GuardMiddleware` (pure ASGI, outermost) gives every request its id
  (:mod:`.request_id`, answered as ``X-Request-ID``), checks the bearer token, then the body
  size (``Content-Length`` or the bytes actually received) and the time the body takes to arrive
  (``body_timeout``: a client that sends headers and then stalls gets 408 instead of holding a
  connection forever) before FastAPI parses anything, and counts every request by endpoint and
  status for ``/metrics``. Which paths exist and which need no token is passed in by
  :func:`~.app.create_app` (from :mod:`.registry`). A compressed body (``Content-Encoding``
  other than ``identity``) is a 415 once read within the byte limit: the server never inflates
  one, so no small body expands past the limit (a zip bomb). A 413 is sent before the whole body
  was read and closes the connection, so the server never keeps reading (and discarding) the
  rest of a body it already refused.
* A client that disconnects while its request runs gets its work cancelled: the admission slot
  is freed at once (a queued request is withdrawn from the engine, a running one's remaining
  items skipped), so clients that give up cannot hold ``max_concurrency`` + ``max_pending``
  slots for answers nobody reads. Such a request is counted with status 499 (nginx's "client
  closed request"), never as a 500 or a 200.
* It is also the last resort for exceptions no rule of :mod:`.errors` maps (a bug, or a backend
  error the engine let through): it logs the traceback under the request id and answers 500 in
  the documented shape itself. Starlette's own last resort answers too, but then re-raises to the
  server, which closes the connection: the client's next request on that keep-alive connection
  would fail.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import math
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Collection, MutableMapping
from contextlib import asynccontextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any

from .errors import Overloaded, error_body, internal_error, route_path
from .metrics import RequestMetrics
from .request_id import HEADER, assign_request_id

__all__ = ["CLIENT_CLOSED", "Admission", "GuardMiddleware"]

logger = logging.getLogger(__name__)

#: Seconds and bytes of a refused (413) body read and dropped before the answer and the close:
#: see :meth:`GuardMiddleware._drain`.
LINGER_S = 2.0
LINGER_BYTES = 64 * 1024 * 1024
#: The status ``/metrics`` counts a request under when its client left before the answer
#: (nginx's 499 "client closed request"; never sent, there is nobody to send it to).
CLIENT_CLOSED = 499


def _cancelling() -> bool:
    """Whether the current task has a cancellation request pending (Python 3.11+; before, a
    cancellation of the task itself cannot be told apart here and this says False)."""
    task = asyncio.current_task()
    cancelling = getattr(task, "cancelling", None)
    return bool(cancelling()) if cancelling is not None else False


def _at_shutdown(cancelled: asyncio.CancelledError) -> bool:
    """Whether uvicorn cancelled this request at shutdown (its graceful timeout ended: the
    cancellation says so), rather than a proxy running the app (Ray Serve cancels the task when
    its client disconnects or its ``request_timeout_s`` passes)."""
    return any("shutdown" in str(arg) for arg in cancelled.args)


#: The path of the request this task answers (the error shape depends on the protocol).
_PATH: ContextVar[str | None] = ContextVar("rag_rerank_path", default=None)

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]


class Admission:
    """Bounded concurrency plus a bounded queue, for one event loop."""

    def __init__(
        self, max_concurrency: int, max_pending: int, retry_after: int | None = None
    ) -> None:
        self.max_concurrency = max_concurrency
        self.max_pending = max_pending
        self.fixed_retry_after = retry_after
        self.admitted = 0  # running + waiting
        self.running = 0
        self._semaphore: asyncio.Semaphore | None = None
        self._mean_seconds = 0.0

    @property
    def queued(self) -> int:
        return self.admitted - self.running

    def retry_after(self) -> int:
        """Seconds until a slot is likely free: queue length x mean duration / concurrency."""
        if self.fixed_retry_after is not None:
            return self.fixed_retry_after
        waiting = self.queued + 1
        estimate = self._mean_seconds * waiting / self.max_concurrency
        return max(1, min(60, math.ceil(estimate)))

    def refuse_if_full(self) -> None:
        """Raise :class:`Overloaded` now when no slot could be had. Called before the work ahead
        of a model call too (tokenizing for truncation or token counts): a request refused with
        429 tokenized its whole body first, seconds of CPU taken from the admitted requests."""
        if self.admitted >= self.max_concurrency + self.max_pending:
            raise Overloaded(
                self.retry_after(),
                f"Server busy: {self.running} request(s) running and {self.queued} queued "
                f"(limits: --max-concurrency {self.max_concurrency}, --max-pending "
                f"{self.max_pending}). Retry after the Retry-After delay, or add replicas.",
            )

    @asynccontextmanager
    async def enter(self) -> AsyncIterator[None]:
        """Hold one slot for the body of the ``async with``; raise :class:`Overloaded` if full."""
        self.refuse_if_full()
        if self._semaphore is None:
            self._semaphore = asyncio.Semaphore(self.max_concurrency)
        self.admitted += 1
        try:
            async with self._semaphore:
                self.running += 1
                start = time.perf_counter()
                try:
                    yield
                finally:
                    self.running -= 1
                    elapsed = time.perf_counter() - start
                    self._mean_seconds = 0.8 * self._mean_seconds + 0.2 * elapsed
        finally:
            self.admitted -= 1


async def _send_json(
    send: Send, status: int, body: dict[str, Any], headers: dict[str, str] | None = None
) -> None:
    payload = json.dumps(body).encode()
    raw_headers = [
        (b"content-type", b"application/json"),
        (b"content-length", str(len(payload)).encode()),
    ]
    raw_headers += [(k.lower().encode(), v.encode()) for k, v in (headers or {}).items()]
    await send({"type": "http.response.start", "status": status, "headers": raw_headers})
    await send({"type": "http.response.body", "body": payload})


@dataclass
class _Progress:
    """How far the answer to one request got."""

    status: int = 500
    started: bool = False
    finished: bool = False


class GuardMiddleware:
    """Outermost ASGI layer: request id, metrics per request, bearer token (401), body size
    (413), body time (408), and the 500 of unmapped exceptions. ``known_paths`` are counted
    under their own name in ``/metrics``; ``public_paths`` need no token."""

    def __init__(
        self,
        app: ASGIApp,
        *,
        api_key: str | None,
        max_request_bytes: int,
        metrics: RequestMetrics,
        known_paths: Collection[str],
        public_paths: Collection[str],
        body_timeout: float | None = None,
    ) -> None:
        self.app = app
        self.api_key = api_key.encode() if api_key else None
        self.max_request_bytes = max_request_bytes
        self.metrics = metrics
        self.body_timeout = body_timeout
        #: Paths counted under their own name in /metrics; anything else is "other" (bounded).
        self.known_paths = frozenset(known_paths)
        #: Paths answered without a token: load balancers and orchestrators probe them.
        self.public_paths = frozenset(public_paths)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path = route_path(scope)  # the app's own path, under a Ray route_prefix or a mount too
        _PATH.set(path)
        endpoint = path if path in self.known_paths else "other"
        start = time.perf_counter()
        request_id = assign_request_id(scope)
        id_header = (HEADER.encode(), request_id.encode())
        progress = _Progress()

        async def tracking_send(message: Message) -> None:
            if message["type"] == "http.response.start":
                progress.status = int(message["status"])
                progress.started = True
                message = {**message, "headers": [*message.get("headers", ()), id_header]}
            elif message["type"] == "http.response.body" and not message.get("more_body"):
                progress.finished = True
            await send(message)

        try:
            await self._guarded(scope, receive, tracking_send, path, progress)
        except asyncio.CancelledError as exc:
            if progress.started or not _cancelling():
                raise
            if not _at_shutdown(exc):  # a proxy (Ray Serve) stopped it: its client left
                progress.status = CLIENT_CLOSED
                raise
            await self._shutting_down(tracking_send)
        except Exception as exc:
            logger.exception(
                "rag-rerank serve: request %s (%s %s) failed: unhandled %s",
                request_id,
                scope.get("method"),
                path,
                type(exc).__name__,
            )
            if progress.started and not progress.finished:
                # Part of the answer is out: only closing the connection ends it unambiguously.
                raise
            if not progress.started:
                error = internal_error(exc, request_id)
                body = error_body(error.message, error.error_type, path, 500)
                await _send_json(tracking_send, 500, body)
            # Not re-raised: the answer is complete, so the connection stays usable.
        finally:
            self.metrics.observe(endpoint, progress.status, time.perf_counter() - start)

    def _authorized(self, scope: Scope) -> bool:
        assert self.api_key is not None
        for name, value in scope.get("headers", []):
            if name == b"authorization":
                scheme, _, token = value.partition(b" ")
                return scheme.lower() == b"bearer" and hmac.compare_digest(
                    token.strip(), self.api_key
                )
        return False

    async def _guarded(
        self, scope: Scope, receive: Receive, send: Send, path: str, progress: _Progress
    ) -> None:
        if (
            self.api_key is not None
            and path not in self.public_paths
            and not self._authorized(scope)
        ):
            await self._refuse(
                send,
                "auth",
                401,
                "Missing or wrong bearer token. Send 'Authorization: Bearer <token>' with the "
                "token the server was started with (RAG_RERANK_API_KEY).",
                "Unauthorized",
                {"www-authenticate": "Bearer"},
            )
            return
        if scope.get("method") not in ("POST", "PUT", "PATCH"):
            await self.app(scope, receive, send)
            return
        limit = self.max_request_bytes
        compressed: bytes | None = None
        # With "Expect: 100-continue" no body is on the wire until it is read: none to drain.
        expects = any(n == b"expect" and v.lower() == b"100-continue" for n, v in scope["headers"])
        for name, value in scope.get("headers", []):
            if name == b"content-encoding" and value.strip().lower() not in (b"", b"identity"):
                compressed = value  # refused once read (bounded, never inflated): see below
            if name == b"content-length":
                try:
                    declared = int(value)
                except ValueError:
                    declared = 0
                if declared > limit:
                    if not expects:
                        await self._drain(receive, declared)
                    await self._too_large(send, declared)
                    return
        # Read the body here (bounded), then replay it: a chunked body cannot sneak past the limit.
        chunks: list[bytes] = []
        size = 0
        deadline = None if self.body_timeout is None else time.monotonic() + self.body_timeout
        while True:
            try:
                message = await self._receive_before(receive, deadline)
            except asyncio.TimeoutError:
                await self._too_slow(send, size)
                return
            if message["type"] == "http.disconnect":
                progress.status = CLIENT_CLOSED
                return
            body = message.get("body", b"")
            size += len(body)
            if size > limit:
                if message.get("more_body", False):
                    await self._drain(receive, LINGER_BYTES)
                await self._too_large(send, size)
                return
            chunks.append(body)
            if not message.get("more_body", False):
                break
        if compressed is not None:
            # Refused after the (still compressed) body was read within the limits: answering
            # and closing while the client still sends makes its TCP stack drop our answer.
            await self._compressed(send, compressed)
            return
        await self._run_until_disconnect(scope, b"".join(chunks), receive, send, progress)

    async def _run_until_disconnect(
        self, scope: Scope, body: bytes, receive: Receive, send: Send, progress: _Progress
    ) -> None:
        """Run the app on the (already read) ``body`` while watching the connection: if the
        client goes away before the answer is complete, the app's task is cancelled, which
        frees its admission slot and withdraws its model work. Starlette itself never notices
        a disconnect during a plain (non-streaming) endpoint, so without this every abandoned
        request would run to the end, holding its slot. The watcher is the only reader of the
        server's ``receive``; the app reads the body replayed, then waits for the disconnect."""
        gone = asyncio.Event()
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            await gone.wait()
            return {"type": "http.disconnect"}

        app_task = asyncio.ensure_future(self.app(scope, replay, send))
        client_left = False

        async def watch() -> None:
            nonlocal client_left
            while (await receive())["type"] != "http.disconnect":
                pass  # the body is complete: nothing but the disconnect should come
            gone.set()
            if not progress.finished:
                client_left = True
                app_task.cancel()

        watcher = asyncio.ensure_future(watch())
        try:
            await app_task
        except asyncio.CancelledError:
            if not client_left or not app_task.cancelled() or _cancelling():
                raise  # this task itself was cancelled (server shutdown): pass it on
            if not progress.started:
                progress.status = CLIENT_CLOSED
        finally:
            watcher.cancel()
            if not app_task.done():
                app_task.cancel()

    @classmethod
    async def _drain(cls, receive: Receive, expected: int) -> None:
        """Read and drop the rest of a refused body, within :data:`LINGER_S` seconds and
        :data:`LINGER_BYTES` bytes (nginx's lingering close): closing the connection with the
        client's data unread makes the kernel answer with a reset, and the client's TCP stack
        then drops the 413 before its program reads it (a connection error for 6 to 19 of 40
        oversized bodies on loopback, so a client could not tell "split it" from a network
        failure, and retried)."""
        deadline = time.monotonic() + LINGER_S
        read = 0
        while read < min(expected, LINGER_BYTES):
            try:
                message = await cls._receive_before(receive, deadline)
            except asyncio.TimeoutError:
                return
            if message["type"] == "http.disconnect":
                return
            read += len(message.get("body", b""))
            if not message.get("more_body", False):
                return

    @staticmethod
    async def _receive_before(receive: Receive, deadline: float | None) -> Message:
        if deadline is None:
            return await receive()
        return await asyncio.wait_for(receive(), max(0.0, deadline - time.monotonic()))

    async def _refuse(
        self,
        send: Send,
        reason: str,
        status: int,
        message: str,
        error_type: str,
        headers: dict[str, str] | None = None,
    ) -> None:
        """Answer ``status`` in the documented error shape, counted as rejected for ``reason``."""
        self.metrics.reject(reason)
        body = error_body(message, error_type, _PATH.get(), status)
        await _send_json(send, status, body, headers)

    async def _shutting_down(self, send: Send) -> None:
        """This request's task was cancelled before its answer started: the server gave up
        waiting for it at shutdown (uvicorn cancels what is left after its graceful timeout).
        A documented 503 with ``Retry-After`` that clients and load balancers retry elsewhere,
        not the server's plain-text 500 and an error traceback. The cancellation ends here:
        this task's only work was this answer."""
        await self._refuse(
            send,
            "shutdown",
            503,
            "The server is shutting down and stopped this request before it was answered: "
            "send it again (to another replica).",
            "Unhealthy",
            {"retry-after": "1", "connection": "close"},
        )
        task = asyncio.current_task()
        uncancel = getattr(task, "uncancel", None)
        if uncancel is not None:
            uncancel()

    async def _compressed(self, send: Send, encoding: bytes) -> None:
        await self._refuse(
            send,
            "invalid",
            415,
            f"Content-Encoding {encoding.decode('latin-1')[:64]!r} is not supported: send the "
            "request body uncompressed (the server never inflates request bodies, so that a "
            "small compressed body cannot expand past --max-request-bytes).",
            "Validation",
            {"accept-encoding": "identity"},
        )

    async def _too_slow(self, send: Send, size: int) -> None:
        await self._refuse(
            send,
            "timeout",
            408,
            f"The request body did not arrive within {self.body_timeout:g} s ({size} bytes "
            "received). Send the whole body at once; the limit is RAG_RERANK_BODY_TIMEOUT.",
            "Timeout",
            # The rest of the body may still come: this connection cannot carry another request.
            {"connection": "close"},
        )

    async def _too_large(self, send: Send, size: int) -> None:
        await self._refuse(
            send,
            "too_large",
            413,
            f"Request body of {size} bytes or more exceeds the limit of "
            f"{self.max_request_bytes} bytes (--max-request-bytes). Split the texts over "
            "several requests.",
            "Validation",
            # The rest of the body is not read: closing is the only way not to keep reading it.
            {"connection": "close"},
        )
