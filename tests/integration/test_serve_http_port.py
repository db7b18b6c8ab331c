"""``keysvc serve`` with KEYSVC_METRICS_PORT: the HTTP port comes up with the server,
counts what the server does, and goes away cleanly on SIGTERM."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import sys

import aiohttp

from keysvc.v1 import keysvc_pb2 as pb
from tests.helpers import client

from .observed import fetch


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


async def wait_ready(url: str, process: asyncio.subprocess.Process) -> None:
    for _ in range(200):
        assert process.returncode is None, "keysvc serve exited early"
        try:
            if (await fetch(url))[0] == 200:
                return
        except aiohttp.ClientError:
            pass
        await asyncio.sleep(0.05)
    raise AssertionError(f"{url} never answered 200")


async def test_serve_exposes_the_http_port() -> None:
    grpc_port, http_port = free_port(), free_port()
    env = {
        **os.environ,
        "OPENAI_KEY": "sk-serve-test-aaaaaaaaaaaaaaaa,sk-serve-test-bbbbbbbbbbbbbbbb",
        "KEYSVC_METRICS_PORT": str(http_port),
        "KEYSVC_LOG_FORMAT": "json",
    }
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "keysvc", "serve", "--port", str(grpc_port),
        "--no-check-keys", "--shutdown-grace", "2",
        env=env, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    base = f"http://127.0.0.1:{http_port}"
    try:
        await wait_ready(base + "/readyz", process)
        async with client(grpc_port) as stub:
            await stub.Get(pb.GetRequest(model="gpt-4"))
        status, _, text = await fetch(base + "/metrics")
        assert status == 200
        assert 'keysvc_key_handouts_total{family="gpt4"} 1.0' in text
        assert 'keysvc_keys{family="gpt4",state="locked"} 1.0' in text
        assert (await fetch(base + "/healthz"))[0] == 200
        # /readyz turning 503 at shutdown is checked in-process (test_http.py): here
        # the server drains in milliseconds, too fast to observe from outside.
        process.send_signal(signal.SIGTERM)
        _, stderr = await asyncio.wait_for(process.communicate(), timeout=30)
        assert process.returncode == 0
        assert b"sk-serve-test" not in stderr
        assert b"serving metrics and status page" in stderr
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
