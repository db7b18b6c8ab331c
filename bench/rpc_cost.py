"""RPC cost: server CPU per Get against server CPU per empty RPC on the same server.

The server runs in a process of its own (``bench/rpc_server.py``: ``create_server``
as ``keysvc serve`` builds it, 10,000 keys so a Get finds an unlocked key); its
CPU time is the sum over its threads of ``/proc/<pid>/task/*/schedstat`` (ns),
so client CPU does not count. A grpc.aio client keeps 32 calls in flight over 4
channels. Rounds of Get(``gpt-4o``), Health/Check and Available alternate; the
figure for each RPC is the median over rounds of server CPU / calls.

The empty RPC is **grpc.health.v1.Health/Check**: it is answered by the same
grpc.aio server through the same interceptor chain (RPC observer, error
mapping; the drain interceptor passes it through), and its handler does one
dict lookup. Available (a KeyService RPC whose pool call is a sum over a
handful of profile indexes) is shown too; it also passes the drain counter.
Latency is measured by the client, per call, over every round.
"""

from __future__ import annotations

import asyncio
import glob
import os
import time
from collections.abc import Awaitable, Callable

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from keysvc.v1 import keysvc_pb2, keysvc_pb2_grpc

from . import aio
from .child import serving_module
from .report import Section, Target, median, percentile, table

__all__ = ["run"]

IN_FLIGHT = 32
CHANNELS = 4
KEYS = 10_000
TARGET_RATIO = 1.25


def server_cpu_seconds(pid: int) -> float:
    """CPU time of every thread of ``pid`` so far (threads that ended are in the main one)."""
    total = 0
    tasks = glob.glob(f"/proc/{pid}/task/*/schedstat")
    if tasks:
        for path in tasks:
            try:
                with open(path, encoding="ascii") as stat:
                    total += int(stat.read().split()[0])
            except (OSError, ValueError):
                continue  # the thread ended between the listing and the read
        return total / 1e9
    with open(f"/proc/{pid}/stat", encoding="ascii") as stat:
        fields = stat.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


Call = Callable[[int], Awaitable[object]]


async def _round(call: Call, calls: int, latencies: list[float]) -> None:
    next_call = 0

    async def worker() -> None:
        nonlocal next_call
        timer = time.perf_counter
        while next_call < calls:
            n = next_call
            next_call += 1
            start = timer()
            await call(n)
            latencies.append(timer() - start)

    await asyncio.gather(*(worker() for _ in range(IN_FLIGHT)))


async def measure(pid: int, port: int, calls: int, rounds: int) -> dict[str, dict[str, float]]:
    channels = [grpc.aio.insecure_channel(f"127.0.0.1:{port}") for _ in range(CHANNELS)]
    try:
        keys = [keysvc_pb2_grpc.KeyServiceStub(c) for c in channels]
        health = [health_pb2_grpc.HealthStub(c) for c in channels]
        get_request = keysvc_pb2.GetRequest(model="gpt-4o")
        check_request = health_pb2.HealthCheckRequest(service="keysvc.v1.KeyService")
        available_request = keysvc_pb2.AvailableRequest()

        async def get(n: int) -> object:
            return await keys[n % CHANNELS].Get(get_request)

        async def check(n: int) -> object:
            return await health[n % CHANNELS].Check(check_request)

        async def available(n: int) -> object:
            return await keys[n % CHANNELS].Available(available_request)

        methods: dict[str, Call] = {
            "Get": get,
            "Health/Check": check,
            "Available": available,
        }
        for call in methods.values():  # warm-up: connections, caches
            await _round(call, calls // 5, [])
        cpu: dict[str, list[float]] = {name: [] for name in methods}
        latencies: dict[str, list[float]] = {name: [] for name in methods}
        for _ in range(rounds):
            for name, call in methods.items():
                before = server_cpu_seconds(pid)
                started = time.perf_counter()
                await _round(call, calls, latencies[name])
                wall = time.perf_counter() - started
                cpu[name].append((server_cpu_seconds(pid) - before) / calls)
                latencies[name + " wall"] = [*latencies.get(name + " wall", []), wall]
        return {
            name: {
                "cpu_us": median(cpu[name]) * 1e6,
                "p50_us": percentile(latencies[name], 0.5) * 1e6,
                "p99_us": percentile(latencies[name], 0.99) * 1e6,
                "calls_per_s": calls / median(latencies[name + " wall"]),
            }
            for name in methods
        }
    finally:
        for channel in channels:
            await channel.close()


def cost_table(results: dict[str, dict[str, float]]) -> str:
    """``measure``'s results as a table: server CPU per call, ÷ Health/Check, latency."""
    empty = results["Health/Check"]["cpu_us"]
    rows = [
        (
            name,
            f"{r['cpu_us']:.0f}",
            f"{r['cpu_us'] / empty:.2f}",
            f"{r['p50_us']:.0f}",
            f"{r['p99_us']:.0f}",
            f"{r['calls_per_s']:,.0f}",
        )
        for name, r in results.items()
    ]
    header = ("RPC", "server CPU µs/call (median)", "÷ Health/Check", "p50 µs", "p99 µs", "calls/s")
    return table(header, rows)


def run(*, smoke: bool = False) -> Section:
    # 15 rounds: on a shared two-core machine the median of 5 moved from run to run
    # by ±0.12 in the ratio (same code), the median of 15 by ±0.03.
    calls, rounds = (300, 2) if smoke else (2_000, 15)
    keys = 1_000 if smoke else KEYS
    with serving_module("bench.rpc_server", str(keys)) as (child, port):
        results = aio.run(measure(child.pid, port, calls, rounds))
    ratio = results["Get"]["cpu_us"] / results["Health/Check"]["cpu_us"]
    body = [
        __doc__.split("\n\n", 1)[1].strip() if __doc__ else "",
        "",
        cost_table(results),
        "",
        f"{rounds} rounds of {calls:,} calls per RPC, {IN_FLIGHT} in flight, {keys:,} keys.",
    ]
    targets = [
        Target(
            "server CPU per Get ÷ per Health/Check",
            f"{ratio:.2f}",
            f"≤ {TARGET_RATIO}",
            ratio <= TARGET_RATIO,
        )
    ]
    figures = {"ratio": ratio}
    for name, r in results.items():
        for field, value in r.items():
            figures[f"{name}:{field}"] = value
    return Section(
        "RPC cost: server CPU per Get vs an empty RPC", "\n".join(body), targets, figures
    )
