"""Run the server on loopback inside a test: a real uvicorn on 127.0.0.1, in a thread.

For tests of apps that use the remote backend (ours included): ``with ServerThread(app) as url:``
gives a real HTTP server on a free loopback port, bound before it starts (no port race), waits
(bounded) until it accepts connections, and stops it gracefully afterwards.
"""

from __future__ import annotations

import socket
import threading
import time
from typing import Any

__all__ = ["ServerThread", "wait_until_healthy"]


def wait_until_healthy(url: str, timeout: float = 60.0, interval: float = 0.05) -> dict[str, Any]:
    """Poll ``GET {url}/health`` until it answers 200 or ``timeout`` passes (then TimeoutError)."""
    import httpx

    deadline = time.monotonic() + timeout
    last: str = "no answer"
    while time.monotonic() < deadline:
        try:
            response = httpx.get(f"{url}/health", timeout=2.0)
        except httpx.HTTPError as exc:
            last = f"{type(exc).__name__}: {exc}"
        else:
            if response.status_code == 200:
                body: dict[str, Any] = response.json() if response.content else {}
                return body
            last = f"HTTP {response.status_code}: {response.text[:200]}"
        time.sleep(interval)
    raise TimeoutError(f"{url}/health did not answer 200 within {timeout:g}s (last: {last})")


class ServerThread:
    """A uvicorn server for ``app`` on ``127.0.0.1:<free port>``, run in a daemon thread."""

    def __init__(
        self,
        app: Any,
        *,
        host: str = "127.0.0.1",
        graceful_timeout: float = 10.0,
        start_timeout: float = 30.0,
    ) -> None:
        import uvicorn

        self.app = app
        self.host = host
        self.start_timeout = start_timeout
        self._sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._sock.bind((host, 0))
        self.port: int = self._sock.getsockname()[1]
        self.url = f"http://{host}:{self.port}"
        self.server = uvicorn.Server(
            uvicorn.Config(
                app,
                lifespan="on",
                log_level="warning",
                # uvicorn annotates int, but only passes it to asyncio.wait_for (floats work).
                timeout_graceful_shutdown=graceful_timeout,  # type: ignore[arg-type]
            )
        )
        self._thread = threading.Thread(
            target=self.server.run, kwargs={"sockets": [self._sock]}, daemon=True
        )

    def start(self) -> str:
        self._thread.start()
        deadline = time.monotonic() + self.start_timeout
        while not self.server.started:
            if not self._thread.is_alive():
                raise RuntimeError("the test server thread exited during start-up")
            if time.monotonic() > deadline:
                raise TimeoutError(f"server did not start within {self.start_timeout:g}s")
            time.sleep(0.01)
        return self.url

    def stop(self, timeout: float = 30.0) -> None:
        """Graceful: stop accepting, let in-flight requests finish, run the lifespan shutdown."""
        self.server.should_exit = True
        self._thread.join(timeout)
        self._sock.close()

    def __enter__(self) -> str:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
