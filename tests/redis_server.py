"""A real ``redis-server`` on a free loopback port, started and stopped by the tests."""

from __future__ import annotations

import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Sequence
from pathlib import Path

__all__ = ["RedisServer", "free_port", "replica_env"]


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


def replica_env(url: str, prefix: str, secrets: Sequence[str]) -> dict[str, str]:
    """The environment of a ``keysvc serve`` replica of the pool ``prefix`` at ``url``."""
    return {
        "OPENAI_KEY": ",".join(secrets),
        "KEYSVC_REDIS_URL": url,
        "KEYSVC_REDIS_PREFIX": prefix,
        # Not the 250 ms default: a loaded CI machine can stall a process that long.
        "KEYSVC_REDIS_TIMEOUT": "2s",
    }


class RedisServer:
    """``redis-server`` bound to 127.0.0.1 only, nothing saved to disk.

    redis-server cannot be told to pick a port itself (``--port 0`` turns TCP
    off), so a port the kernel just gave out is used; if another process takes
    it first, the start is tried again on a new one.
    """

    def __init__(self, workdir: Path) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            raise RuntimeError("redis-server is not installed (.ci/run installs it)")
        self._binary = binary
        self._workdir = workdir
        self.port = 0
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self, port: int = 0) -> None:
        """Starts on ``port``, or (0) on a free one."""
        for _ in range(1 if port else 5):
            self.port = port or free_port()
            self._proc = subprocess.Popen(
                [
                    self._binary,
                    "--bind",
                    "127.0.0.1",
                    "--port",
                    str(self.port),
                    "--save",
                    "",
                    "--appendonly",
                    "no",
                    "--dir",
                    str(self._workdir),
                    "--loglevel",
                    "warning",
                ],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
            if self._wait_ready():
                return
            self.stop()
        raise RuntimeError("redis-server did not start")

    def _wait_ready(self, timeout: float = 10.0) -> bool:
        deadline = time.monotonic() + timeout
        assert self._proc is not None
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                return False  # the port was taken, or it could not start
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.5) as conn:
                    conn.sendall(b"PING\r\n")
                    if conn.recv(16).startswith(b"+PONG"):
                        return True
            except OSError:
                pass
            time.sleep(0.02)
        return False

    def pause(self) -> None:
        """SIGSTOP: the port still accepts connections, nothing is answered (a hung Redis)."""
        assert self._proc is not None
        self._proc.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        assert self._proc is not None
        self._proc.send_signal(signal.SIGCONT)

    def stop(self) -> None:
        if self._proc is not None:
            self._proc.send_signal(signal.SIGCONT)  # a paused one must see the TERM
            self._proc.terminate()
            try:
                self._proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()
            self._proc = None
