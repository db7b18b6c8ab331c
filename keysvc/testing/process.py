"""Runs ``keysvc serve`` as a child process on a free loopback port (tests and the demo)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

__all__ = ["KeysvcProcess", "start_keysvc"]

LogSink = Callable[[dict[str, Any]], None]


@dataclass(slots=True)
class KeysvcProcess:
    """A running ``keysvc serve``; ``logs`` collects its JSON log lines as they come."""

    process: asyncio.subprocess.Process
    port: int
    logs: list[dict[str, Any]]
    raw_stderr: list[str] = field(default_factory=list)
    _drain: asyncio.Task[None] | None = None

    async def stop(self, timeout: float = 15.0) -> int:
        """SIGTERM, then waits for the exit; returns the exit code (kills after ``timeout``)."""
        if self.process.returncode is None:
            self.process.send_signal(signal.SIGTERM)
        try:
            code = await asyncio.wait_for(self.process.wait(), timeout)
        except TimeoutError:
            self.process.kill()
            code = await self.process.wait()
        if self._drain is not None:
            await self._drain
        return code


async def start_keysvc(
    *,
    keys: Sequence[str],
    base_url: str,
    args: Sequence[str] = (),
    env: Mapping[str, str] | None = None,
    on_log: LogSink | None = None,
    timeout: float = 30.0,
) -> KeysvcProcess:
    """Starts keysvc with ``keys`` against ``base_url`` and waits until it serves.

    Raises:
        RuntimeError: keysvc exited or did not report serving within ``timeout``.
    """
    child_env = {
        **os.environ,
        "OPENAI_KEY": ",".join(keys),
        "OPENAI_BASE_URL": base_url,
        "KEYSVC_LOG_FORMAT": "json",
        **(env or {}),
    }
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "keysvc",
        "serve",
        "--host",
        "127.0.0.1",
        "--port",
        "0",
        *args,
        env=child_env,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE,
    )
    assert process.stderr is not None
    logs: list[dict[str, Any]] = []
    raw: list[str] = []
    port_found: asyncio.Future[int] = asyncio.get_running_loop().create_future()

    async def drain() -> None:
        assert process.stderr is not None
        async for line in process.stderr:
            text = line.decode(errors="replace").rstrip("\n")
            raw.append(text)
            try:
                record = json.loads(text)
            except ValueError:
                continue
            if not isinstance(record, dict):
                continue
            logs.append(record)
            if on_log is not None:
                on_log(record)
            if record.get("event") == "serving" and not port_found.done():
                port_found.set_result(int(str(record["address"]).rsplit(":", 1)[1]))
        if not port_found.done():
            port_found.set_exception(RuntimeError("keysvc exited before serving"))

    drain_task = asyncio.create_task(drain())
    try:
        port = await asyncio.wait_for(asyncio.shield(port_found), timeout)
    except (TimeoutError, RuntimeError) as exc:
        with contextlib.suppress(ProcessLookupError):
            process.kill()
        await process.wait()
        await drain_task
        tail = "\n".join(raw[-20:])
        raise RuntimeError(f"keysvc did not start: {exc}\n{tail}") from exc
    return KeysvcProcess(process, port, logs, raw, drain_task)
