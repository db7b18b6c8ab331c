"""Benchmark servers run as child processes, so their CPU and memory are their own."""

from __future__ import annotations

import asyncio
import contextlib
import signal
import subprocess
import sys
from collections.abc import Iterator

from keysvc.pool import KeyPool, PoolBackend
from keysvc.server import create_server

__all__ = ["serve_until_sigterm", "serving_module", "stop"]


def stop(child: subprocess.Popen[str] | subprocess.Popen[bytes]) -> None:
    """SIGTERM, then SIGKILL if the child has not exited within 15 s."""
    child.send_signal(signal.SIGTERM)
    try:
        child.wait(15)
    except subprocess.TimeoutExpired:
        child.kill()
        child.wait()


@contextlib.contextmanager
def serving_module(*args: str) -> Iterator[tuple[subprocess.Popen[str], int]]:
    """``python -m *args``, which prints the port it serves on as its first line.

    Yields the child and that port; stops the child on exit.
    """
    child = subprocess.Popen(
        [sys.executable, "-m", *args],
        stdout=subprocess.PIPE,
        stdin=subprocess.DEVNULL,
        text=True,
    )
    try:
        assert child.stdout is not None
        yield child, int(child.stdout.readline())
    finally:
        stop(child)


async def serve_until_sigterm(pool: KeyPool | PoolBackend) -> None:
    """The child's side: serves ``pool`` on a free loopback port, prints the port, and
    stops on SIGTERM."""
    running = create_server(pool, host="127.0.0.1", port=0)
    await running.start()
    print(running.port, flush=True)
    stopped = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stopped.set)
    await stopped.wait()
    await running.shutdown(0)
