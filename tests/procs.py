"""A keysvc server in its own process, for tests of signals, restarts and logs."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

_SERVING = re.compile(r"serving address=\S*:(\d+)")


class ServerProcess:
    """``python -m keysvc serve --port 0`` with its stderr collected line by line."""

    def __init__(
        self,
        env: Mapping[str, str],
        args: Sequence[str] = (),
        *,
        cwd: Path | None = None,
    ) -> None:
        full_env = {
            k: v
            for k, v in os.environ.items()
            if not k.startswith(("KEYSVC_", "OPENAI_")) and k != "CHECK_KEYS"
        }
        full_env.update({"CHECK_KEYS": "false", "KEYSVC_HOST": "127.0.0.1"})
        full_env.update(env)
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "keysvc", "serve", "--port", "0", *args],
            env=full_env,
            cwd=cwd,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        self.lines: list[str] = []
        self.port: int | None = None
        self._ready = threading.Event()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            self.lines.append(line.rstrip("\n"))
            match = _SERVING.search(line)
            if match and self.port is None:
                self.port = int(match.group(1))
                self._ready.set()
        self._ready.set()

    @property
    def log(self) -> str:
        return "\n".join(self.lines)

    def wait_serving(self, timeout: float = 20.0) -> int:
        """The port, once the server logs that it serves."""
        self._ready.wait(timeout)
        if self.port is None:
            self.proc.kill()
            self.proc.wait(5)
            self._reader.join(5)
            raise AssertionError(f"server did not start:\n{self.log}")
        return self.port

    def wait_for_log(self, pattern: str, timeout: float = 10.0, start: int = 0) -> str:
        """The first log line from index ``start`` on that matches ``pattern``."""
        deadline = time.monotonic() + timeout
        regex = re.compile(pattern)
        while time.monotonic() < deadline:
            for line in self.lines[start:]:
                if regex.search(line):
                    return line
            time.sleep(0.05)
        raise AssertionError(f"no log line matches {pattern!r}:\n{self.log}")

    def signal(self, signum: signal.Signals) -> None:
        self.proc.send_signal(signum)

    def wait_exit(self, timeout: float = 20.0) -> int:
        code = self.proc.wait(timeout)
        self._reader.join(5)
        return code

    def stop(self) -> None:
        """Ends the process if it still runs (SIGKILL: tests that care send SIGTERM)."""
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(10)
        self._reader.join(5)
        if self.proc.stdout is not None:
            self.proc.stdout.close()
        if self.proc.stderr is not None:
            self.proc.stderr.close()


def run_keysvc(
    env: Mapping[str, str], args: Sequence[str] = (), timeout: float = 20.0
) -> subprocess.CompletedProcess[str]:
    """Runs ``keysvc serve`` expecting it to refuse to start; returns the finished process."""
    server = ServerProcess(env, args)
    try:
        code = server.proc.wait(timeout)
    except subprocess.TimeoutExpired:
        server.stop()
        raise AssertionError(f"keysvc did not exit:\n{server.log}") from None
    server._reader.join(5)
    assert server.proc.stdout is not None
    out = server.proc.stdout.read()
    server.stop()
    return subprocess.CompletedProcess(server.proc.args, code, out, server.log)


def kill9(server: ServerProcess) -> None:
    server.proc.send_signal(signal.SIGKILL)
    server.proc.wait(10)
