"""A real keysvc server (``keysvc serve --port 0``) for the client tests."""

from __future__ import annotations

import hashlib
import os
import re
import signal
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass

import pytest

#: Known keys the server is started with.
SECRETS = ("sk-client-test-1", "sk-client-test-2", "sk-client-test-3")
_SERVING = re.compile(r"keysvc\.server: serving address=(\S+):(\d+)")


def key_hash(secret: str) -> str:
    return "oai-" + hashlib.sha256(secret.encode()).hexdigest()[:8]


@dataclass(frozen=True)
class LiveServer:
    target: str
    secrets: tuple[str, ...]


@pytest.fixture
def server() -> Iterator[LiveServer]:
    """A fresh keysvc process per test, on a free loopback port, stopped with SIGTERM."""
    yield from _serve(SECRETS, {})


#: Keys of the paging server: with a page size of 2, four pages.
PAGED_SECRETS = tuple(f"sk-client-page-{n}" for n in range(7))


@pytest.fixture
def paged_server() -> Iterator[LiveServer]:
    """Like ``server``, with seven keys and a server maximum page size of 2."""
    yield from _serve(PAGED_SECRETS, {"KEYSVC_LIST_MAX_PAGE_SIZE": "2"})


def _serve(secrets: tuple[str, ...], extra_env: dict[str, str]) -> Iterator[LiveServer]:
    env = {**os.environ, "OPENAI_KEY": ",".join(secrets), "CHECK_KEYS": "false", **extra_env}
    proc = subprocess.Popen(
        [sys.executable, "-m", "keysvc", "serve", "--host", "127.0.0.1", "--port", "0"],
        env=env,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert proc.stderr is not None
    target = None
    seen: list[str] = []
    for line in proc.stderr:  # ends when the process exits
        seen.append(line)
        match = _SERVING.search(line)
        if match:
            target = f"{match.group(1)}:{match.group(2)}"
            break
    if target is None:
        proc.kill()
        pytest.fail("keysvc did not start:\n" + "".join(seen))
    try:
        yield LiveServer(target=target, secrets=secrets)
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.stderr.read()
        assert proc.wait(timeout=15) == 0
