"""Shared test helpers: a pool with a manual clock, a live server on a free port."""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc

from keysvc.clock import ManualClock
from keysvc.keys import Key, KeyProfile, hash_key
from keysvc.models import ModelTable
from keysvc.pool import KeyPool
from keysvc.server import KeysvcServer, create_server
from keysvc.store import MemoryKeyStore
from keysvc.testing.status import error_reason as error_reason  # re-exported for the tests
from keysvc.v1 import keysvc_pb2_grpc


def make_pool(
    secrets: Sequence[str],
    clock: ManualClock | None = None,
    *,
    allowed_families: frozenset[str] | None = None,
) -> tuple[KeyPool, ManualClock]:
    clock = clock or ManualClock()
    pool = KeyPool.from_secrets(
        secrets, models=ModelTable(), clock=clock, allowed_families=allowed_families
    )
    return pool, clock


@contextlib.asynccontextmanager
async def serving(
    pool: KeyPool,
    interceptors: Sequence[grpc.aio.ServerInterceptor] = (),
    **options: Any,
) -> AsyncIterator[KeysvcServer]:
    """A started keysvc server on a free loopback port; stopped on exit.

    ``options`` go to ``create_server`` (tokens, tls, ...).
    """
    server = create_server(pool, host="127.0.0.1", port=0, interceptors=interceptors, **options)
    await server.start()
    try:
        yield server
    finally:
        await server.shutdown(grace=0)


@contextlib.asynccontextmanager
async def client(port: int) -> AsyncIterator[keysvc_pb2_grpc.KeyServiceStub]:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        yield keysvc_pb2_grpc.KeyServiceStub(channel)


def pool_of(
    profiles: Sequence[KeyProfile],
    clock: ManualClock | None = None,
    *,
    allowed_families: frozenset[str] | None = None,
) -> tuple[KeyPool, ManualClock, list[Key]]:
    """A pool whose i-th key has ``profiles[i]`` (as if the checker had seen it)."""
    clock = clock or ManualClock()
    store = MemoryKeyStore()
    keys = []
    for i, profile in enumerate(profiles):
        # A profile of Claude families is an Anthropic key's (the secret says which).
        anthropic = bool(profile.families) and profile.families <= ANTHROPIC_FAMILIES
        secret = f"sk-ant-test-{i:04d}" if anthropic else f"sk-test-{i:04d}"
        key = Key(secret=secret, hash=hash_key(secret), profile=profile, seq=0)
        store.add(key)
        keys.append(key)
    pool = KeyPool(store=store, models=ModelTable(), clock=clock, allowed_families=allowed_families)
    return pool, clock, keys


DEFAULT_FAMILIES = ModelTable().default_key_families()
ANTHROPIC_FAMILIES = ModelTable().default_key_families("anthropic")
PAID = KeyProfile(DEFAULT_FAMILIES)
TRIAL = KeyProfile(DEFAULT_FAMILIES, is_trial=True)
PAID_32K = KeyProfile(DEFAULT_FAMILIES | {"gpt4-32k"})
TURBO_ONLY = KeyProfile(frozenset({"turbo"}))
CLAUDE_ALL = KeyProfile(ANTHROPIC_FAMILIES)
HAIKU_ONLY = KeyProfile(frozenset({"claude-haiku"}))


@dataclass
class Child:
    """A keysvc child process that has reported where it serves."""

    process: subprocess.Popen[str]
    port: int
    startup_log: str

    def stop(self, signum: int = signal.SIGTERM, timeout: float = 20) -> tuple[int, str]:
        """Signals the child and returns its exit code and whole log."""
        self.process.send_signal(signum)
        code = self.process.wait(timeout=timeout)
        assert self.process.stderr is not None
        return code, self.startup_log + self.process.stderr.read()


@contextlib.contextmanager
def keysvc_process(
    *args: str, env: dict[str, str] | None = None, module: bool = False
) -> Iterator[Child]:
    """``keysvc serve --port 0`` (or ``python -m keysvc serve``) as a child process.

    Yields once the child reports the port it serves on; kills it on exit if it
    is still running.
    """
    command = (
        [sys.executable, "-m", "keysvc", "serve"]
        if module
        else [str(Path(sys.executable).parent / "keysvc"), "serve"]
    )
    full_env = {k: v for k, v in os.environ.items() if not k.startswith(("KEYSVC_", "OPENAI_"))}
    full_env.update({"CHECK_KEYS": "false", **(env or {})})
    process = subprocess.Popen(
        [*command, "--port", "0", *args],
        env=full_env,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        port, startup_log = wait_for_port(process)
        yield Child(process, port, startup_log)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()


def wait_for_port(process: subprocess.Popen[str], timeout: float = 30.0) -> tuple[int, str]:
    """Reads the child's log until it says where it is serving."""
    assert process.stderr is not None
    deadline = time.monotonic() + timeout
    seen = []
    while time.monotonic() < deadline:
        line = process.stderr.readline()
        if not line:
            raise AssertionError(f"keysvc exited before serving: {''.join(seen)}")
        seen.append(line)
        match = re.search(r"serving.*address\W*[^\s\"]*:(\d+)", line)
        if match:
            return int(match.group(1)), "".join(seen)
    raise AssertionError(f"keysvc did not report serving in {timeout}s: {''.join(seen)}")
