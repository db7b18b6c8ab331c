"""100k keys under load: Get latency with and without a disturbance, in one run.

The server runs in a process of its own (``python -m bench.loaded_server``: 100,000
keys, 20,000 of them used, built and served as ``keysvc serve`` does, with the HTTP
port on). A grpc.aio client keeps 8 Gets in flight over 2 channels. Rounds of
1,500 Gets alternate: one undisturbed, then one with the disturbance going on, so
both halves see the same machine; the figures are p50 and p99 over all rounds of
each half, and the ratio of the p99s is the target (≤ 2).

Disturbances (each a function of the server's ports returning an async context
manager, so another one is a few lines: see ``DISTURBANCES``):

- **HTTP views**: two clients fetch the status page and /metrics in a loop, without
  pause (two clients reloading the page pushed Get p50 to 700 ms before).
- **2,000 idle connections**: 1,000 TCP connections that send nothing and 1,000 that
  finish the HTTP/2 handshake and start no call, open for the whole disturbed round.
"""

from __future__ import annotations

import asyncio
import contextlib
import resource
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass

import grpc

from keysvc.v1 import keysvc_pb2, keysvc_pb2_grpc

from . import aio
from .child import stop
from .hostile import close_all, idle_connections, idle_http2_connections
from .report import Section, Target, percentile, table

__all__ = ["DISTURBANCES", "Comparison", "Ports", "compare", "run", "serving_loaded"]

KEYS = 100_000
IN_FLIGHT = 8
CHANNELS = 2
TARGET_RATIO = 2.0


@dataclass(frozen=True, slots=True)
class Ports:
    grpc: int
    http: int


#: A disturbance: given the server's ports, an async context manager during which it goes on.
Disturbance = Callable[[Ports], AbstractAsyncContextManager[object]]


@contextlib.contextmanager
def serving_loaded(keys: int) -> Iterator[tuple[subprocess.Popen[str], Ports]]:
    """``python -m bench.loaded_server keys``; yields the child and its two ports."""
    child = subprocess.Popen(
        [sys.executable, "-m", "bench.loaded_server", str(keys)],
        stdout=subprocess.PIPE,
        stdin=subprocess.DEVNULL,
        text=True,
    )
    try:
        assert child.stdout is not None
        grpc_port, http_port = (int(word) for word in child.stdout.readline().split())
        yield child, Ports(grpc=grpc_port, http=http_port)
    finally:
        stop(child)


@contextlib.asynccontextmanager
async def http_views(ports: Ports, clients: int = 2) -> AsyncIterator[dict[str, int]]:
    """``clients`` loops fetching / and /metrics back to back (``bench.http_views``, in
    a process of its own); the dict yielded has the fetch counts once it is over."""
    fetched: dict[str, int] = {}
    child = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "bench.http_views", str(ports.http), str(clients),
        stdout=asyncio.subprocess.PIPE, stdin=asyncio.subprocess.DEVNULL,
    )  # fmt: skip
    assert child.stdout is not None
    await child.stdout.readline()  # "started"
    try:
        yield fetched
    finally:
        child.send_signal(signal.SIGTERM)
        counts, _ = await child.communicate()
        if child.returncode == 0 and counts.split():
            pages, scrapes = (int(word) for word in counts.split())
            fetched.update({"/": pages, "/metrics": scrapes})


@contextlib.asynccontextmanager
async def idle_clients(ports: Ports, count: int = 2_000) -> AsyncIterator[dict[str, int]]:
    """``count`` idle connections, half raw TCP and half HTTP/2, open inside."""
    raw = idle_connections(ports.grpc, count // 2)
    http2 = idle_http2_connections(ports.grpc, count - count // 2)
    await asyncio.sleep(0.5)
    for client in http2:
        client.drain()  # reads the server's SETTINGS and acknowledges them
    try:
        yield {"raw": len(raw), "http2": len(http2)}
    finally:
        close_all(raw)
        close_all(http2)


DISTURBANCES: dict[str, Disturbance] = {
    "HTTP views (status page and /metrics in a loop, 2 clients)": http_views,
    "2,000 idle connections": idle_clients,
}


@dataclass(frozen=True, slots=True)
class Comparison:
    """Get latencies (seconds) without and with one disturbance."""

    name: str
    quiet: list[float]
    disturbed: list[float]
    #: What the disturbance reported (fetches made, connections opened), last round.
    extent: dict[str, int]

    def p(self, which: str, q: float) -> float:
        return percentile(self.quiet if which == "quiet" else self.disturbed, q)

    @property
    def ratio(self) -> float:
        return self.p("disturbed", 0.99) / self.p("quiet", 0.99)


async def _gets(stubs: list[keysvc_pb2_grpc.KeyServiceAsyncStub], calls: int) -> list[float]:
    latencies: list[float] = []
    request = keysvc_pb2.GetRequest(model="gpt-4o")
    next_call = 0

    async def worker() -> None:
        nonlocal next_call
        timer = time.perf_counter
        while next_call < calls:
            n = next_call
            next_call += 1
            start = timer()
            await stubs[n % len(stubs)].Get(request)
            latencies.append(timer() - start)

    await asyncio.gather(*(worker() for _ in range(IN_FLIGHT)))
    return latencies


async def compare(
    ports: Ports, name: str, disturbance: Disturbance, *, rounds: int, calls: int
) -> Comparison:
    """Alternates quiet and disturbed rounds of ``calls`` Gets; all latencies of each."""
    channels = [grpc.aio.insecure_channel(f"127.0.0.1:{ports.grpc}") for _ in range(CHANNELS)]
    try:
        stubs = [keysvc_pb2_grpc.KeyServiceStub(channel) for channel in channels]
        await _gets(stubs, calls // 3)  # warm-up: connections, caches
        quiet: list[float] = []
        disturbed: list[float] = []
        extent: dict[str, int] = {}
        for _ in range(rounds):
            quiet += await _gets(stubs, calls)
            async with disturbance(ports) as reported:
                await asyncio.sleep(0.2)  # under way before the first Get
                disturbed += await _gets(stubs, calls)
            if isinstance(reported, dict):
                extent = dict(reported)
        return Comparison(name, quiet, disturbed, extent)
    finally:
        for channel in channels:
            await channel.close()


@contextlib.contextmanager
def _descriptors(needed: int) -> Iterator[None]:
    """This process's soft open-files limit raised for ``needed`` sockets, if it allows."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = needed if hard == resource.RLIM_INFINITY else min(needed, hard)
    if soft != resource.RLIM_INFINITY and soft < target:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def run(*, smoke: bool = False) -> Section:
    keys, rounds, calls = (5_000, 1, 300) if smoke else (KEYS, 6, 1_500)
    disturbances = dict(DISTURBANCES)
    if smoke:
        disturbances["2,000 idle connections"] = lambda ports: idle_clients(ports, 200)
    results: list[Comparison] = []
    with _descriptors(4_096), serving_loaded(keys) as (_, ports):
        for name, disturbance in disturbances.items():
            results.append(aio.run(compare(ports, name, disturbance, rounds=rounds, calls=calls)))
    rows = [
        (
            r.name,
            f"{r.p('quiet', 0.5) * 1e3:.2f}",
            f"{r.p('quiet', 0.99) * 1e3:.2f}",
            f"{r.p('disturbed', 0.5) * 1e3:.2f}",
            f"{r.p('disturbed', 0.99) * 1e3:.2f}",
            f"{r.ratio:.2f}",
            ", ".join(f"{k} {v:,}" for k, v in r.extent.items()),
        )
        for r in results
    ]
    body = [
        __doc__.split("\n\n", 1)[1].strip() if __doc__ else "",
        "",
        table(
            (
                "disturbance",
                "quiet p50 ms",
                "quiet p99 ms",
                "disturbed p50 ms",
                "disturbed p99 ms",
                "p99 ratio",
                "disturbance extent (last round)",
            ),
            rows,
        ),
        "",
        f"{rounds} rounds of {calls:,} Gets per half, {IN_FLIGHT} in flight, {keys:,} keys.",
    ]
    targets = [
        Target(
            f"Get p99 with {r.name} ÷ without",
            f"{r.ratio:.2f}",
            f"≤ {TARGET_RATIO:g}",
            r.ratio <= TARGET_RATIO,
        )
        for r in results
    ]
    figures: dict[str, float] = {}
    for r in results:
        figures[f"{r.name}:ratio"] = r.ratio
        for which in ("quiet", "disturbed"):
            figures[f"{r.name}:{which}:p50"] = r.p(which, 0.5)
            figures[f"{r.name}:{which}:p99"] = r.p(which, 0.99)
            figures[f"{r.name}:{which}:calls"] = len(r.quiet if which == "quiet" else r.disturbed)
        for key, count in r.extent.items():
            figures[f"{r.name}:extent:{key}"] = count
    return Section("100k keys under load", "\n".join(body), targets, figures)
