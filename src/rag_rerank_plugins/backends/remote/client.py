"""The HTTP client of the remote backends: pooled connections, retries, and error mapping.

One :class:`RemoteClient` per loaded remote model. Its logic is written once, sans I/O, as
*plans*: generators that yield what to do next (:class:`Send` a request, :class:`Wait` before a
retry) and receive each request's :class:`Outcome`. :meth:`RemoteClient.limits_plan` asks the
protocol's limits discovery (``GET /info``) once per client; :meth:`RemoteClient.post_plan`
posts a JSON body under the :class:`RetryPolicy` and maps the final answer through the status
table (:data:`STATUS_RULES`: status -> error class, hint). One driver runs any plan, the models'
own plans included: :meth:`RemoteClient.run` hands it a pooled ``httpx.Client`` and
``time.sleep``, :meth:`RemoteClient.arun` the event loop's ``httpx.AsyncClient`` and
``asyncio.sleep``. So the sync and async paths cannot drift apart: they share every decision and
differ only in how they send and wait.

An ``httpx.AsyncClient`` (its sockets, its connection pool) belongs to one event loop, so there
is one per loop, reused by every request on that loop, and closed *with* that loop: the loop's
own ``shutdown_asyncgens()`` step (what ``asyncio.run`` and ``asyncio.Runner`` do before closing
it) closes it (:meth:`RemoteClient.async_client` explains how). So 100 ``asyncio.run`` calls
leave no client, socket or loop behind, while a long-lived server loop keeps its connections.

:func:`use_transport` routes the clients of one base URL through an httpx transport (an
``httpx.MockTransport`` in tests) instead of the network.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import email.utils
import logging
import math
import os
import random
import re
import threading
import time
import weakref
from collections.abc import AsyncGenerator, Awaitable, Callable, Generator, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar

from ...exceptions import (
    MissingDependencyError,
    ModelReleasedError,
    RemoteAuthError,
    RemoteError,
    RemoteRequestError,
    RemoteTimeoutError,
    RemoteUnavailableError,
)
from ..base import current_call
from .packing import RequestLimits
from .protocols import Protocol, ServerInfo

if TYPE_CHECKING:
    import httpx

    from .settings import RemoteSettings

#: The header naming the caller's engine lane (``rag-rerank serve`` queues by it).
PRIORITY_HEADER = "x-priority"

__all__ = [
    "PRIORITY_HEADER",
    "RETRY_STATUSES",
    "ClientClosedError",
    "STATUS_RULES",
    "Outcome",
    "Plan",
    "RemoteClient",
    "RetryPolicy",
    "Send",
    "StatusRule",
    "Wait",
    "load_httpx",
    "use_transport",
]

logger = logging.getLogger(__name__)
T = TypeVar("T")


def load_httpx() -> Any:
    """httpx, imported on first use (the ``remote`` extra)."""
    try:
        import httpx
    except ImportError:
        raise MissingDependencyError("httpx", "remote", "The remote backend") from None
    return httpx


# -- the steps of a plan ---------------------------------------------------------------------


@dataclass(frozen=True)
class Send:
    """Send one request; the driver answers with its :class:`Outcome`."""

    method: str
    url: str
    headers: dict[str, str]
    content: bytes | None = None
    timeout: Any = None  # an httpx.Timeout; None: the client's own
    #: Seconds for the whole answer, headers and body: httpx's timeouts bound each wait for
    #: bytes, so a server sending one byte a second would otherwise hold the call forever.
    budget: float = math.inf

    def kwargs(self) -> dict[str, Any]:
        kwargs: dict[str, Any] = {"headers": self.headers, "content": self.content}
        if self.timeout is not None:
            kwargs["timeout"] = self.timeout
        return kwargs


@dataclass(frozen=True)
class Wait:
    """Sleep before the next attempt; the driver answers with None."""

    seconds: float


@dataclass(frozen=True)
class Outcome:
    """What one request came to: a response (any status) or a transport error."""

    response: httpx.Response | None
    error: BaseException | None = None

    def label(self) -> str:
        """The status, or the transport error's type, for logs."""
        if self.response is not None:
            return str(self.response.status_code)
        return type(self.error).__name__


#: A plan: yields steps, receives their outcomes, returns its result.
Plan = Generator[Send | Wait, Outcome | None, T]


# -- the retry policy and the status table ---------------------------------------------------


@dataclass(frozen=True)
class RetryPolicy:
    """How often and how long to retry: ``retries`` extra attempts on the retried statuses and
    on connection errors, waiting ``backoff * 2**attempt`` (capped at ``max_backoff``, jittered
    down to half), or the server's ``Retry-After`` when longer (capped too)."""

    retries: int = 3
    backoff: float = 0.25
    max_backoff: float = 8.0

    @classmethod
    def from_settings(cls, settings: RemoteSettings) -> RetryPolicy:
        return cls(settings.retries, settings.backoff, settings.max_backoff)

    def delay(self, attempt: int, retry_after: float | None = None) -> float:
        delay = min(self.max_backoff, self.backoff * (2**attempt)) * random.uniform(0.5, 1.0)
        if retry_after is not None:
            delay = max(delay, min(retry_after, self.max_backoff))
        return delay


@dataclass(frozen=True)
class StatusRule:
    """What an HTTP error status means: the error raised (when not retried, or after the last
    retry) and a hint on what to do, computed from the client (its settings and limits)."""

    error: type[RemoteError]
    hint: Callable[[RemoteClient], str]
    retry: bool = False


def _auth_hint(client: RemoteClient) -> str:
    env = client.settings.api_key_env
    if env:
        return f"check the token in ${env}"
    return (
        "the server wants a bearer token: export it and pass "
        "model_kwargs={'api_key_env': 'VAR_NAME'}"
    )


def _size_hint(client: RemoteClient) -> str:
    limits = client.planned_limits
    packed = f" of up to {limits.max_bytes} bytes ({limits.source})" if limits else ""
    return (
        f"The client sent requests{packed}: a proxy on the way may take less. Set the option "
        "max_request_bytes to the smallest body limit between client and model (or lower "
        "batch_size)."
    )


#: A 413 about the model's input length rather than the body's bytes (TEI: "must have less than
#: 512 tokens"; rag-rerank serve: "longer than the model's 512 tokens").
_TOKENS_413 = re.compile(r"\btokens?\b", re.IGNORECASE)


def _too_many_tokens(message: str) -> bool:
    """Whether a 413's server message is about a text longer than the model's input."""
    return _TOKENS_413.search(message) is not None


def _tokens_hint(client: RemoteClient) -> str:
    if not client.settings.truncate:
        return (
            "A text is longer than the model's input, and truncate=False asks the server for "
            "an error instead of a cut: leave truncate=True (the default) to have the server "
            "cut it to the model's tokens, or send shorter texts."
        )
    return (
        "A text is longer than the model's input and the server would not cut it: send "
        "shorter texts, or let the server truncate (TEI: --auto-truncate)."
    )


def _protocol_hint(client: RemoteClient) -> str:
    settings = client.settings
    if settings.model_name and not client.protocol.needs_model_name:
        # The name was given, but this protocol has no field for it: "is it the protocol?"
        # pointed the wrong way when the server (one serving several models) wanted a name.
        return (
            f"Protocol {settings.protocol!r} sends no model name, so {settings.model_name!r} "
            "never reached the server: to pick one of several served models by name use "
            "protocol='infinity' (or 'cohere'); else check that the URL is the server's."
        )
    return f"Is protocol={settings.protocol!r} the one this server speaks?"


def _overloaded(client: RemoteClient) -> str:
    return "it stayed overloaded; add replicas or raise its --max-concurrency/--max-pending"


def _failing(client: RemoteClient) -> str:
    return "it kept failing; check the server's logs"


#: Error statuses with a meaning of their own; any other status >= 400 is a
#: :class:`RemoteRequestError` without a hint (:data:`OTHER_ERROR`).
STATUS_RULES: dict[int, StatusRule] = {
    401: StatusRule(RemoteAuthError, _auth_hint),
    403: StatusRule(RemoteAuthError, _auth_hint),
    404: StatusRule(RemoteRequestError, _protocol_hint),
    413: StatusRule(RemoteRequestError, _size_hint),
    # Overloaded, or a server/gateway failure that may be transient: worth another attempt.
    429: StatusRule(RemoteUnavailableError, _overloaded, retry=True),
    500: StatusRule(RemoteUnavailableError, _failing, retry=True),
    502: StatusRule(RemoteUnavailableError, _failing, retry=True),
    503: StatusRule(RemoteUnavailableError, _failing, retry=True),
    504: StatusRule(RemoteUnavailableError, _failing, retry=True),
}
OTHER_ERROR = StatusRule(RemoteRequestError, lambda client: "")
RETRY_STATUSES = frozenset(status for status, rule in STATUS_RULES.items() if rule.retry)


#: Seconds GET /info is not asked again after it got no answer (a timeout, no connection).
INFO_QUIET_S = 60.0


def _retry_after(response: httpx.Response) -> float | None:
    """``Retry-After`` in seconds: delay-seconds, or an HTTP-date (RFC 9110, as gateways send)."""
    value = response.headers.get("retry-after")
    if value is None:
        return None
    try:
        seconds = float(value)
    except ValueError:
        try:
            when = email.utils.parsedate_to_datetime(value)
        except (TypeError, ValueError, IndexError):
            return None
        if when.tzinfo is None:  # RFC 9110 dates are GMT
            when = when.replace(tzinfo=datetime.timezone.utc)
        seconds = max(0.0, when.timestamp() - time.time())
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


class ClientClosedError(ModelReleasedError, RemoteError):
    """A released remote model's client was asked for a new request. A
    :class:`ModelReleasedError`, so the pool loads the model again and retries the call (a call
    that started as the model was released); a :class:`RemoteError`, as it always was."""


# -- transports for tests ----------------------------------------------------------------------

_TRANSPORTS: dict[str, Any] = {}


@contextlib.contextmanager
def use_transport(base_url: str, transport: Any) -> Iterator[None]:
    """Route remote clients for ``base_url`` through ``transport`` instead of the network.

    For tests: pass an ``httpx.MockTransport(handler)`` (it serves sync and async clients
    alike) and load the spec inside the block. A client keeps the transport it was built with;
    clients are built on a model's first request, so release the model (or close its pool)
    before the block ends.
    """
    key = base_url.rstrip("/")
    if key in _TRANSPORTS:
        raise RuntimeError(f"A transport is already in use for {key}: nest no blocks for it.")
    _TRANSPORTS[key] = transport
    try:
        yield
    finally:
        _TRANSPORTS.pop(key, None)


# -- the client ------------------------------------------------------------------------------


@dataclass
class _LoopClient:
    """One loop's ``httpx.AsyncClient`` and the async generator that closes it with the loop."""

    client: httpx.AsyncClient
    finaliser: AsyncGenerator[None, None]


#: Close tasks scheduled by :func:`_close_on`, held until done (a loop holds its tasks weakly).
_CLOSING: set[asyncio.Task[None]] = set()


def _close_on(loop: asyncio.AbstractEventLoop, client: httpx.AsyncClient) -> None:
    """Close ``client`` on ``loop``, from any thread (it runs when the loop next runs).

    Nothing to do once the loop is closed: its transports close their sockets when collected,
    since nothing can be closed on it any more.
    """

    def start() -> None:
        task = loop.create_task(client.aclose())
        _CLOSING.add(task)
        task.add_done_callback(_CLOSING.discard)

    # A task whose loop closed before it finished never calls back: do not let it pin the loop.
    _CLOSING.difference_update([task for task in _CLOSING if task.get_loop().is_closed()])
    if not loop.is_closed():
        with contextlib.suppress(RuntimeError):  # it closed meanwhile
            loop.call_soon_threadsafe(start)


def _running_loop() -> asyncio.AbstractEventLoop | None:
    try:
        return asyncio.get_running_loop()
    except RuntimeError:
        return None


class RemoteClient:
    """Pooled HTTP clients for one base URL, the retry policy, and the request limits."""

    def __init__(self, settings: RemoteSettings, what: str, protocol: Protocol) -> None:
        self.settings = settings
        self.what = what  # "<backend> <url>": the start of every message
        self.protocol = protocol
        self.policy = RetryPolicy.from_settings(settings)
        self._httpx = load_httpx()
        # Built once, here (a model loads in a thread): loading the CA bundle takes 40-120 ms,
        # which every new AsyncClient (one per event loop) paid on the loop itself.
        self._verify: Any = (
            self._httpx.create_ssl_context(verify=True) if settings.verify else False
        )
        self._lock = threading.Lock()
        self._sync: httpx.Client | None = None
        self._async: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, _LoopClient] = (
            weakref.WeakKeyDictionary()
        )
        self._closed = False
        #: Plans running now (sync or async): :meth:`close` leaves their clients open for them.
        self._active = 0
        self._limits: RequestLimits | None = None
        #: Monotonic time before which GET /info is not asked again after it got no answer.
        self._info_quiet_until = 0.0
        #: The limits the last requests were planned with (for the 413 hint).
        self.planned_limits: RequestLimits | None = None

    # -- pooled httpx clients ----------------------------------------------------------------

    def _client_kwargs(self) -> dict[str, Any]:
        s = self.settings
        httpx = self._httpx
        kwargs: dict[str, Any] = {
            "timeout": httpx.Timeout(s.timeout, connect=s.connect_timeout),
            "limits": httpx.Limits(
                max_connections=s.max_connections, max_keepalive_connections=s.max_connections
            ),
            "verify": self._verify,
            # As the openai and cohere clients do: an http -> https or trailing-slash redirect
            # is followed (307/308 keep the POST and its body; httpx drops the token when the
            # redirect leaves the origin) instead of parsing the redirect's own body.
            "follow_redirects": True,
            "headers": {"user-agent": "rag-rerank-plugins remote backend"},
        }
        transport = _TRANSPORTS.get(s.base_url)
        if transport is not None:
            kwargs["transport"] = transport
        return kwargs

    def sync_client(self) -> httpx.Client:
        client = self._sync
        if client is None:
            with self._lock:
                self._check_open()
                if self._sync is None:
                    self._sync = self._httpx.Client(**self._client_kwargs())
                client = self._sync
        return client

    async def async_client(self) -> httpx.AsyncClient:
        """The running loop's pooled ``httpx.AsyncClient``, built on the loop's first request.

        The client is closed when its loop shuts down. Its sockets are bound to the loop, and
        its connections hold the loop, so neither can outlive the other safely: a client kept
        past its loop pins the loop and an open socket per pooled connection (the leak of one
        client, loop and socket per ``asyncio.run``), and ``loop.close()`` closes no transport.
        How: with each client starts a tiny async generator (:meth:`_close_with_loop`),
        advanced once here on the loop. The loop registers it (its ``firstiter`` hook); and
        ``loop.shutdown_asyncgens()``, which ``asyncio.run`` and ``asyncio.Runner`` (and the
        runners built on them) call while the loop still runs, closes it, which awaits
        ``client.aclose()`` on the loop. That is the loop's own public shutdown step: nothing of
        the loop is patched (unlike wrapping ``loop.close``), and it works for any thread's
        loop. ``weakref.finalize`` on the loop would never fire (the client's connections hold
        the loop), and anything run after ``loop.close()`` can no longer close transports.

        A loop closed without ``shutdown_asyncgens()`` (a hand-driven ``new_event_loop()``) is
        the fallback: the next client built (on any loop) or :meth:`close` drops the clients of
        closed loops, so their transports close their sockets when collected.
        """
        loop = asyncio.get_running_loop()
        with self._lock:
            entry = self._async.get(loop)
            if entry is not None and not entry.client.is_closed:
                return entry.client  # closed meanwhile, the plans still running keep it
            self._check_open()
            self._drop_closed_loops()
            client = self._httpx.AsyncClient(**self._client_kwargs())
            entry = self._async[loop] = _LoopClient(client, self._close_with_loop(client))
        # Runs to the generator's first yield without suspending; the loop now tracks it.
        await entry.finaliser.asend(None)
        return client

    async def _close_with_loop(self, client: httpx.AsyncClient) -> AsyncGenerator[None, None]:
        """Closes ``client`` when the loop closes this generator (see :meth:`async_client`).

        Holds no reference to the loop, so a dropped entry never pins one. Dropped unfinished
        (by :meth:`close`, or when a closed client is replaced), it is handed to the loop's
        ``finalizer`` hook, which runs this cleanup on the loop if it is still open, and does
        nothing once it is closed. Collected off any loop (a loop without asyncgen hooks) it
        awaits nothing: the transports then close their sockets when collected.
        """
        try:
            yield
        finally:
            loop = _running_loop()
            if loop is not None:
                with self._lock:
                    entry = self._async.get(loop)
                    if entry is not None and entry.client is client:
                        del self._async[loop]
                try:
                    await client.aclose()
                except Exception:  # shutting down: a failed close must not mask the loop's work
                    logger.debug(
                        "rag-rerank remote: %s: closing a client failed", self.what, exc_info=True
                    )

    def _drop_closed_loops(self) -> None:
        """Forget the clients of loops closed without ``shutdown_asyncgens()`` (the caller holds
        the lock); their transports close the sockets when collected."""
        for loop in [loop for loop in self._async if loop.is_closed()]:
            del self._async[loop]

    def _check_open(self) -> None:
        if self._closed:
            raise ClientClosedError(
                f"{self.what}: the client was closed (the model was released). Ask the pool "
                "again (pool.get(spec)) to reload it."
            )

    def close(self) -> None:
        """Refuse new plans; close the sync client and each loop's async client on its own loop
        (from any thread: it is scheduled there, since its sockets belong to that loop), now, or
        when the last plan still running ends: a release on the event loop does not wait for
        the calls awaited on that loop (it cannot), and they must still finish, not fail."""
        with self._lock:
            self._closed = True
            if self._active:
                return
        self._close_clients()

    @contextlib.contextmanager
    def _running(self) -> Iterator[None]:
        """One plan running: refused once closed; the last one out after :meth:`close` closes
        the clients."""
        with self._lock:
            self._check_open()
            self._active += 1
        try:
            yield
        finally:
            with self._lock:
                self._active -= 1
                last = self._closed and not self._active
            if last:
                self._close_clients()

    def _close_clients(self) -> None:
        with self._lock:
            sync, self._sync = self._sync, None
            entries, self._async = list(self._async.items()), weakref.WeakKeyDictionary()
        if sync is not None:
            sync.close()
        for loop, entry in entries:
            _close_on(loop, entry.client)

    def headers(self) -> dict[str, str]:
        """The bearer token, read from the environment on every request (rotation works)."""
        env = self.settings.api_key_env
        if env is None:
            return {}
        # Stripped: a mounted secret file often ends in a newline (as --api-key-file is read).
        token = (os.environ.get(env) or "").strip()
        if not token:
            raise RemoteAuthError(
                f"{self.what}: environment variable {env} (option api_key_env) is empty; export "
                "the server's bearer token there."
            )
        if not (token.isascii() and token.isprintable()) or " " in token:
            # Checked here, never sent: the HTTP library's own error quotes the header, token
            # included, into messages, logs and passthrough metadata.
            raise RemoteAuthError(
                f"{self.what}: the token in environment variable {env} (option api_key_env) "
                "holds a space, a control character or a non-ASCII character (a pasted quote?), "
                "which no HTTP header can carry. Export the token as the server issued it."
            )
        return {"authorization": f"Bearer {token}"}

    # -- the driver: runs a plan, sync or async -----------------------------------------------

    async def _drive(
        self,
        plan: Plan[T],
        send: Callable[[Send], Awaitable[httpx.Response]],
        sleep: Callable[[float], Awaitable[None]],
    ) -> T:
        """Feed ``plan`` the outcome of each step until it returns. Written once: :meth:`run`
        passes ``send``/``sleep`` that block and never suspend, :meth:`arun` awaitable ones."""
        reply: Outcome | None = None
        try:
            while True:
                step = plan.send(reply)
                if isinstance(step, Wait):
                    await sleep(step.seconds)
                    reply = None
                    continue
                try:
                    reply = Outcome(await send(step))
                except self._httpx.RequestError as exc:
                    # Transport errors, and answers httpx could not take: a redirect loop, a
                    # body that does not decode. Judged by :meth:`_judge_transport`.
                    reply = Outcome(None, exc)
        except StopIteration as done:
            return done.value

    def run(self, plan: Plan[T]) -> T:
        """Run ``plan`` on the pooled ``httpx.Client`` (built on the plan's first request)."""

        async def send(step: Send) -> httpx.Response:
            client = self.sync_client()
            started = time.monotonic()
            request = client.build_request(step.method, step.url, **step.kwargs())
            response = client.send(request, stream=True)
            try:
                return self._read_within(response, started + step.budget, step.budget)
            finally:
                response.close()

        async def sleep(seconds: float) -> None:
            time.sleep(seconds)

        # Nothing in this coroutine suspends, so one send() runs it to the end, on this thread.
        with self._running():
            coroutine = self._drive(plan, send, sleep)
            try:
                coroutine.send(None)
            except StopIteration as done:
                return done.value
            coroutine.close()
        raise RuntimeError("the sync driver suspended: a step awaited something asynchronous")

    async def arun(self, plan: Plan[T]) -> T:
        """:meth:`run` on the event loop's own pooled ``httpx.AsyncClient``."""

        async def send(step: Send) -> httpx.Response:
            client = await self.async_client()
            request = client.request(step.method, step.url, **step.kwargs())
            if step.budget == math.inf:
                return await request
            try:
                return await asyncio.wait_for(request, step.budget)
            except TimeoutError:  # wait_for's; httpx raises its own TimeoutException
                raise self._over_budget(step.budget) from None

        with self._running():
            return await self._drive(plan, send, asyncio.sleep)

    def _read_within(self, response: httpx.Response, deadline: float, budget: float) -> Any:
        """The body of a streamed ``response``, read as it arrives and refused once the
        attempt's ``budget`` is spent (checked between chunks, so a trickling server is cut at
        most one read timeout after it). Returns a complete response (the body decoded)."""
        httpx = self._httpx
        chunks = []
        for chunk in response.iter_bytes():
            chunks.append(chunk)
            if time.monotonic() > deadline:
                raise self._over_budget(budget)
        headers = [
            (key, value)
            for key, value in response.headers.multi_items()
            # The body is decoded now: a gzip header would decode it a second time.
            if key.lower() not in ("content-encoding", "content-length", "transfer-encoding")
        ]
        return httpx.Response(
            response.status_code,
            headers=headers,
            content=b"".join(chunks),
            request=response.request,
            extensions=response.extensions,
        )

    def _over_budget(self, budget: float) -> BaseException:
        return self._httpx.ReadTimeout(f"the whole answer took over {budget:g}s")

    # -- plans -------------------------------------------------------------------------------

    def limits_plan(self) -> Plan[RequestLimits]:
        """The request limits; the first call asks the protocol's limits discovery."""
        limits = self._limits
        if limits is None:
            path = self.protocol.info_path
            if path is None:
                limits = self._limits = RequestLimits.resolve(self.settings, ServerInfo())
            elif time.monotonic() < self._info_quiet_until:
                limits = RequestLimits.resolve(self.settings, ServerInfo())
            else:
                s = self.settings
                # A slice of the call's time at most: the limits are a refinement, and a server
                # that never answers GET /info must not use up the deadline of the real request.
                left = current_call().remaining()
                read = min(s.timeout, 5.0) if left is None else min(s.timeout, 5.0, left / 4)
                timeout, budget = self._timeout(read)
                outcome = yield Send(
                    "GET", s.base_url + path, self.headers(), timeout=timeout, budget=budget
                )
                assert outcome is not None
                limits = self._settle_limits(outcome)
        self.planned_limits = limits
        return limits

    def _settle_limits(self, outcome: Outcome) -> RequestLimits:
        """The limits after one ``GET /info``. A definite answer (200, or a 4xx such as
        TEI-less servers' 404) is cached for the client's life; a failure that may pass (429,
        5xx, 401/403) is not: asked again next call; no answer at all (a timeout, no connection)
        is not asked again for :data:`INFO_QUIET_S` (each call paid the wait again)."""
        response = outcome.response
        info = ServerInfo()
        definite = False
        if response is not None:
            status = response.status_code
            definite = status not in RETRY_STATUSES and status not in (401, 403)
            if status == 200:
                with contextlib.suppress(ValueError):  # not JSON: nothing advertised
                    info = self.protocol.read_info(response.json())
        limits = RequestLimits.resolve(self.settings, info)
        if definite:
            self._limits = limits
            logger.debug(
                "rag-rerank remote: %s: requests of up to %d bytes (%s) and %s texts",
                self.what,
                limits.max_bytes,
                limits.source,
                limits.max_items or "batch_size",
            )
        else:
            logger.debug("rag-rerank remote: %s: GET /info failed (%s)", self.what, outcome.label())
            if response is None:  # no answer at all (a hang costs every call its wait): a minute
                self._info_quiet_until = time.monotonic() + INFO_QUIET_S
        return limits

    def post_plan(self, path: str, body: bytes) -> Plan[Any]:
        """POST the JSON ``body`` (already encoded: its size was planned) under the retry
        policy; returns the answer's JSON. The ``X-Priority`` header carries the engine lane of
        the call being served (``interactive`` or ``bulk``); servers that do not know it ignore
        headers they do not know."""
        url = self.settings.base_url + path
        attempt = 0
        while True:
            left = current_call().remaining()
            if left is not None and left <= 0:  # its caller gave up: never sent for nobody
                raise RemoteTimeoutError(
                    f"{self.what}: the call's timeout ended before {url} was sent; not sent.",
                    url=url,
                )
            headers = {
                "content-type": "application/json",
                # The engine lane of the call, so a rag-rerank server queues it the same way.
                PRIORITY_HEADER: current_call().priority,
                **self.headers(),
            }
            timeout, budget = self._timeout(self.settings.timeout, keep_default=True)
            outcome = yield Send("POST", url, headers, content=body, timeout=timeout, budget=budget)
            assert outcome is not None
            delay = self._judge(url, attempt, outcome)
            if delay is None:
                assert outcome.response is not None
                return self._json(url, outcome.response)
            logger.info(
                "rag-rerank remote: retrying %s in %.2fs (attempt %d: %s)",
                url,
                delay,
                attempt + 1,
                outcome.label(),
            )
            yield Wait(delay)
            attempt += 1

    def _timeout(self, read: float, keep_default: bool = False) -> tuple[Any, float]:
        """The timeouts of one attempt: ``read`` seconds for each wait and for the whole answer
        (connect: the option), all cut to what is left of the call's deadline
        (:func:`current_call`), so a call with ``timeout=2`` never waits 30 s on a server after
        its caller gave up. None (``keep_default``): the client's own, when the deadline cuts
        nothing."""
        s = self.settings
        left = current_call().remaining()
        if left is not None and left < read:
            return self._httpx.Timeout(left, connect=min(s.connect_timeout, left)), left
        if keep_default:
            return None, read
        return self._httpx.Timeout(read, connect=s.connect_timeout), read

    @staticmethod
    def _past_deadline(delay: float) -> bool:
        """Whether waiting ``delay`` seconds before a retry would end past the call's deadline:
        then nobody waits for the answer, and the retry is not made."""
        left = current_call().remaining()
        return left is not None and delay >= left

    # -- judging one attempt -----------------------------------------------------------------

    def _judge(self, url: str, attempt: int, outcome: Outcome) -> float | None:
        """None when the answer is a success, the delay before the next attempt when it is
        worth one; raises the mapped error otherwise."""
        if outcome.response is None:
            return self._judge_transport(url, attempt, outcome.error)
        response = outcome.response
        status = response.status_code
        if status < 300:
            return None
        rule = STATUS_RULES.get(status, OTHER_ERROR)
        if rule.retry and attempt < self.policy.retries:
            delay = self.policy.delay(attempt, _retry_after(response))
            if not self._past_deadline(delay):
                return delay
        message = _server_message(response).rstrip(".")
        if status == 413 and _too_many_tokens(message):
            # The model's input length, not the body's bytes: the limits stand.
            hint = _tokens_hint(self)
        else:
            hint = rule.hint(self)
            if status == 413:
                self._limits = None  # the limits were wrong: ask GET /info again next call
        if status < 400:  # a 3xx left unfollowed (no Location, 300, 304, ...)
            location = response.headers.get("location")
            hint = f"Redirected to {location!r}: use that URL." if location else hint
        if rule.error is RemoteUnavailableError:
            text = f"answered HTTP {status} to all {attempt + 1} attempt(s) ({hint}): {message}"
        elif rule.error is RemoteAuthError:
            text = f"refused the request with HTTP {status} ({hint}): {message}"
        else:
            text = f"rejected the request with HTTP {status}: {message}." + (
                f" {hint}" if hint else ""
            )
        raise rule.error(f"{self.what}: {url} {text}", url=url, status=status)

    def _judge_transport(self, url: str, attempt: int, exc: BaseException | None) -> float:
        httpx = self._httpx
        if isinstance(exc, httpx.LocalProtocolError):
            # Our request could not be written (a header no HTTP can carry): the same request
            # fails again, and the library's message may quote a header's value, a token.
            raise RemoteError(
                f"{self.what}: the request to {url} could not be written "
                f"({type(exc).__name__}; a header value HTTP cannot carry). Not retried.",
                url=url,
            )
        if isinstance(exc, (httpx.TooManyRedirects, httpx.DecodingError)):
            # The server answered, wrongly; the same request would get the same answer.
            what = (
                "redirected in a loop (or more than 20 times)"
                if isinstance(exc, httpx.TooManyRedirects)
                else "answered with a body that does not decode as its Content-Encoding says"
            )
            raise RemoteError(
                f"{self.what}: {url} {what} ({type(exc).__name__}: {exc}). Is this the model "
                "server's URL, and is anything between us (a proxy) rewriting its answers?",
                url=url,
            )
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
            raise RemoteTimeoutError(
                f"{self.what}: {url} did not answer within {self.settings.timeout:g}s or the "
                f"call's timeout ({type(exc).__name__}). Not retried, since the server may still "
                "be working on it: raise the 'timeout' option (or the call's) or send smaller "
                "batches.",
                url=url,
            )
        if attempt < self.policy.retries:
            delay = self.policy.delay(attempt)
            if not self._past_deadline(delay):
                return delay
        raise RemoteUnavailableError(
            f"{self.what}: could not reach {url} after {attempt + 1} attempt(s): "
            f"{type(exc).__name__}: {exc}. Check that the server is running and the URL "
            "is right (`curl <url>/health`).",
            url=url,
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
