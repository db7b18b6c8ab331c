"""Benchmark servers run as child processes, so their CPU and memory are their own."""

from __future__ import annotations

import contextlib
import signal
import subprocess
import sys
from collections.abc import Iterator

__all__ = ["serving_module", "stop"]


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
