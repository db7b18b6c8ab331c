"""One asyncio event loop for every benchmark run in this process.

grpc.aio binds its completion-queue poller to each event loop it is used on
and keeps it bound after the loop closes; with one ``asyncio.run`` per run,
later runs' gRPC events were also handed to the closed loops, which printed
"Event loop is closed" tracebacks (harmless, but dozens of them). Reusing one
loop, closed when the process exits, avoids that.
"""

from __future__ import annotations

import asyncio
import atexit
from collections.abc import Coroutine
from typing import Any, TypeVar

__all__ = ["run"]

T = TypeVar("T")

_runner: asyncio.Runner | None = None


def run(coroutine: Coroutine[Any, Any, T]) -> T:
    """``asyncio.run``, on the process's one benchmark loop."""
    global _runner
    if _runner is None:
        _runner = asyncio.Runner()
        atexit.register(_runner.close)
    return _runner.run(coroutine)
