"""A fake upstream's lifecycle: an HTTP handler served on 127.0.0.1 from a thread.

The fake OpenAI and Anthropic APIs differ in what they answer, not in how they are
started, stopped and addressed; this is that part, once.
"""

from __future__ import annotations

import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import TracebackType
from typing import Generic, Self, TypeVar

__all__ = ["ThreadedUpstream", "UpstreamServer"]

StateT = TypeVar("StateT")


class UpstreamServer(ThreadingHTTPServer, Generic[StateT]):
    """The HTTP server of a fake upstream; handlers read ``state`` (the fake's)."""

    daemon_threads = True
    block_on_close = False
    # A checker batch opens dozens of connections at once; the default backlog of 5
    # drops SYNs.
    request_queue_size = 256
    state: StateT


class ThreadedUpstream(Generic[StateT]):
    """Serves ``handler`` on a free port of 127.0.0.1 from a thread named ``name``;
    ``start``/``stop`` or ``with``. ``base_url`` ends in ``/v1``."""

    def __init__(self, handler: type[BaseHTTPRequestHandler], state: StateT, *, name: str) -> None:
        self._handler = handler
        self._state = state
        self._name = name
        self._server: UpstreamServer[StateT] | None = None
        self._thread: threading.Thread | None = None

    def start(self) -> str:
        """Binds a free port on 127.0.0.1 and serves on a thread; returns ``base_url``."""
        if self._server is not None:
            raise RuntimeError("the fake upstream is already running")
        server: UpstreamServer[StateT] = UpstreamServer(("127.0.0.1", 0), self._handler)
        server.state = self._state
        self._server = server
        self._thread = threading.Thread(
            target=server.serve_forever,
            kwargs={"poll_interval": 0.05},
            name=self._name,
            daemon=True,
        )
        self._thread.start()
        return self.base_url

    def stop(self) -> None:
        """Stops serving and closes the socket; requests still sleeping are abandoned."""
        if self._server is None:
            return
        self._server.shutdown()
        self._server.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)
        self._server = self._thread = None

    @property
    def port(self) -> int:
        if self._server is None:
            raise RuntimeError("the fake upstream is not running")
        return int(self._server.server_address[1])

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.stop()
