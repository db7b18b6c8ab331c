"""The Redis backend's cost: server CPU per Get, Redis CPU per Get, 1 vs 2 workers.

Each part runs ``keysvc serve`` with ``KEYSVC_REDIS_URL`` (as deployed, keys from a
keys file, the key checker off) on a redis-server of its own (``keysvc.testing.redis``,
nothing saved to disk), all on this machine's loopback.

- **Server CPU per Get ÷ per Health/Check**: the RPC-cost harness (bench/rpc_cost.py:
  the same client, rounds and medians, server CPU from ``/proc``) against one
  ``keysvc serve`` on Redis. A Get here is one script call (select, throttle, reserve)
  plus the reply; Redis's own CPU is not in the figure.
- **Redis CPU per Get**: after those rounds, Redis's statistics are reset
  (``CONFIG RESETSTAT``) and Gets made alone; ``INFO commandstats`` gives the µs Redis
  spent running the scripts (``evalsha``: a Get is one call), and ``/proc`` the
  redis-server process's CPU in all (the script plus reading, parsing and answering
  the call). Get/s one Redis core could serve is 10⁶ ÷ the µs: the ceiling of a fleet
  of replicas on one Redis, on paper.
- **1 vs 2 processes**: ``keysvc serve --workers 1``, then ``--workers 2``, each driven
  by this process's grpc.aio client (many connections, so the kernel spreads them over
  the workers) for rounds of a few seconds; the median Get/s, and each process's share
  of the machine's CPU (100 % = every core busy) during the rounds. The client, the
  workers and Redis share the machine's cores, so the client's and Redis's shares are
  what the workers could not have.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import redis

from keysvc.testing.redis import RedisServer
from keysvc.v1 import keysvc_pb2, keysvc_pb2_grpc

from . import aio, rpc_cost
from .child import stop
from .pool_scale import secrets
from .report import Section, Target, median, table

__all__ = ["run"]

KEYS = 1_000
TARGET_RATIO = 1.5
#: Client connections for the workers' throughput (the kernel spreads connections).
CONNECTIONS = 16
IN_FLIGHT = 64

_SERVING = re.compile(r"keysvc\.server: serving address=\S*:(\d+)")


@contextlib.contextmanager
def keysvc_on_redis(
    url: str, keys_file: Path, workers: int = 1
) -> Iterator[tuple[subprocess.Popen[str], int]]:
    """``keysvc serve --workers N`` on ``url``; yields the process and its port once
    every worker serves."""
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith(("KEYSVC_", "OPENAI_"))},
        "CHECK_KEYS": "false",
        "KEYSVC_KEYS_FILE": str(keys_file),
        "KEYSVC_REDIS_URL": url,
        "KEYSVC_REDIS_TIMEOUT": "2s",
        "KEYSVC_WORKERS": str(workers),
    }
    command = [str(Path(sys.executable).parent / "keysvc"), "serve", "--port", "0"]
    child = subprocess.Popen(
        command, env=env, stdin=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
    )
    try:
        assert child.stderr is not None
        ports: list[int] = []
        seen: list[str] = []
        while len(ports) < workers:
            line = child.stderr.readline()
            if not line:
                raise RuntimeError("keysvc serve exited before serving:\n" + "".join(seen))
            seen.append(line)
            found = _SERVING.search(line)
            if found:
                ports.append(int(found.group(1)))
        yield child, ports[0]
    finally:
        stop(child)


def _processes(pid: int) -> list[int]:
    """``pid`` and its children (the workers)."""
    try:
        with open(f"/proc/{pid}/task/{pid}/children", encoding="ascii") as children:
            return [pid, *(int(p) for p in children.read().split())]
    except OSError:
        return [pid]


def _cpu(pids: list[int]) -> float:
    total = 0.0
    for pid in pids:
        with contextlib.suppress(OSError):
            total += rpc_cost.server_cpu_seconds(pid)
    return total


def _commandstats(client: redis.Redis) -> dict[str, dict[str, float]]:
    stats: dict[str, dict[str, float]] = client.info("commandstats")
    return stats


async def _gets(port: int, calls: int) -> None:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = keysvc_pb2_grpc.KeyServiceStub(channel)
        request = keysvc_pb2.GetRequest(model="gpt-4o")
        left = calls

        async def one() -> None:
            nonlocal left
            while left > 0:
                left -= 1
                await stub.Get(request)

        await asyncio.gather(*(one() for _ in range(rpc_cost.IN_FLIGHT)))


async def _throughput(
    port: int, rounds: int, seconds: float, pids: list[int], redis_pid: int
) -> dict[str, float]:
    """Median Get/s over ``rounds`` of ``seconds``, and the CPU shares over them all."""
    channels = [
        grpc.aio.insecure_channel(
            f"127.0.0.1:{port}", options=[("grpc.use_local_subchannel_pool", 1)]
        )
        for _ in range(CONNECTIONS)
    ]
    try:
        stubs = [keysvc_pb2_grpc.KeyServiceStub(c) for c in channels]
        request = keysvc_pb2.GetRequest(model="gpt-4o")
        done = 0
        until = 0.0

        async def one(n: int) -> None:
            nonlocal done
            stub = stubs[n % CONNECTIONS]
            while time.monotonic() < until:
                await stub.Get(request)
                done += 1

        until = time.monotonic() + min(1.0, seconds)  # warm-up: every connection up
        await asyncio.gather(*(one(n) for n in range(IN_FLIGHT)))
        rates: list[float] = []
        cpu = {"keysvc": 0.0, "client": 0.0, "redis": 0.0}
        wall = 0.0
        for _ in range(rounds):
            before = (_cpu(pids), time.process_time(), _cpu([redis_pid]))
            done, started = 0, time.monotonic()
            until = started + seconds
            await asyncio.gather(*(one(n) for n in range(IN_FLIGHT)))
            elapsed = time.monotonic() - started
            wall += elapsed
            rates.append(done / elapsed)
            cpu["keysvc"] += _cpu(pids) - before[0]
            cpu["client"] += time.process_time() - before[1]
            cpu["redis"] += _cpu([redis_pid]) - before[2]
        cores = os.cpu_count() or 1
        shares = {f"{name}_share": used / (wall * cores) for name, used in cpu.items()}
        return {"gets_per_s": median(rates), **shares}
    finally:
        for channel in channels:
            await channel.close()


def run(*, smoke: bool = False) -> Section:
    calls, rounds = (200, 2) if smoke else (2_000, 11)
    alone = 300 if smoke else 10_000
    spans, span = (1, 0.5) if smoke else (5, 3.0)
    keys = 100 if smoke else KEYS
    with tempfile.TemporaryDirectory(prefix="keysvc-redis-bench-") as tmp:
        keys_file = Path(tmp, "keys")
        keys_file.write_text("\n".join(secrets(keys)) + "\n", encoding="utf-8")
        server = RedisServer(Path(tmp))
        server.start()
        client = redis.Redis.from_url(server.url)
        try:
            with keysvc_on_redis(server.url, keys_file) as (child, port):
                costs = aio.run(rpc_cost.measure(child.pid, port, calls, rounds))
                client.config_resetstat()
                redis_before = _cpu([server.pid])
                aio.run(_gets(port, alone))
                redis_cpu_us = (_cpu([server.pid]) - redis_before) / alone * 1e6
                scripts = _commandstats(client).get("cmdstat_evalsha", {})
            by_workers: dict[int, dict[str, float]] = {}
            for workers in (1, 2):
                client.flushall()
                with keysvc_on_redis(server.url, keys_file, workers) as (child, port):
                    time.sleep(0.2)  # the workers' start-up log is written; they are idle
                    by_workers[workers] = aio.run(
                        _throughput(port, spans, span, _processes(child.pid), server.pid)
                    )
        finally:
            client.close()
            server.stop()
    ratio = costs["Get"]["cpu_us"] / costs["Health/Check"]["cpu_us"]
    script_calls = float(scripts.get("calls", 0))
    script_us = float(scripts.get("usec", 0)) / alone
    ceiling = 1e6 / script_us if script_us else 0.0
    one, two = by_workers[1], by_workers[2]
    speedup = two["gets_per_s"] / one["gets_per_s"]
    worker_rows = [
        (
            str(n),
            f"{r['gets_per_s']:,.0f}",
            f"{r['keysvc_share']:.0%}",
            f"{r['client_share']:.0%}",
            f"{r['redis_share']:.0%}",
        )
        for n, r in by_workers.items()
    ]
    body = [
        __doc__.split("\n\n", 1)[1].strip() if __doc__ else "",
        "",
        "### Server CPU per RPC, Redis backend",
        "",
        rpc_cost.cost_table(costs),
        "",
        f"{rounds} rounds of {calls:,} calls per RPC, {rpc_cost.IN_FLIGHT} in flight,"
        f" {keys:,} keys.",
        "",
        "### Redis CPU per Get",
        "",
        table(
            ("", "per Get"),
            [
                ("script calls (commandstats evalsha)", f"{script_calls / alone:.2f}"),
                ("script time, µs (commandstats)", f"{script_us:.1f}"),
                ("redis-server process CPU, µs (/proc)", f"{redis_cpu_us:.1f}"),
                ("Get/s one Redis core, from the script time", f"{ceiling:,.0f}"),
                (
                    "Get/s one Redis core, from the process CPU",
                    f"{1e6 / redis_cpu_us:,.0f}" if redis_cpu_us else "-",
                ),
            ],
        ),
        "",
        f"{alone:,} Gets after the statistics were reset.",
        "",
        "### Aggregate Get/s, 1 vs 2 processes",
        "",
        table(("workers", "Get/s (median)", "keysvc CPU", "client CPU", "Redis CPU"), worker_rows),
        "",
        f"{spans} rounds of {span:g} s each, {IN_FLIGHT} Gets in flight over {CONNECTIONS}"
        f" connections; CPU as a share of all {os.cpu_count()} cores over the rounds.",
    ]
    targets = [
        Target(
            "server CPU per Get ÷ per Health/Check, Redis backend",
            f"{ratio:.2f}",
            f"≤ {TARGET_RATIO}",
            ratio <= TARGET_RATIO,
        ),
        Target(
            "Redis CPU per Get (commandstats) and Get/s one Redis core could serve",
            f"{script_us:.1f} µs → {ceiling:,.0f} Get/s"
            f" (process CPU {redis_cpu_us:.1f} µs per Get)",
            "reported",
            True,
            informational=True,
        ),
        Target(
            "aggregate Get/s, --workers 1 vs 2 (two cores)",
            f"{one['gets_per_s']:,.0f} → {two['gets_per_s']:,.0f} (×{speedup:.2f}); with 2:"
            f" keysvc {two['keysvc_share']:.0%}, client {two['client_share']:.0%},"
            f" Redis {two['redis_share']:.0%} of the CPU",
            "reported",
            True,
            informational=True,
        ),
    ]
    figures = {
        "ratio": ratio,
        "script_calls_per_get": script_calls / alone,
        "script_us_per_get": script_us,
        "redis_cpu_us_per_get": redis_cpu_us,
        "redis_core_gets_per_s": ceiling,
        "speedup": speedup,
    }
    for name, r in costs.items():
        for field, value in r.items():
            figures[f"{name}:{field}"] = value
    for n, r in by_workers.items():
        for field, value in r.items():
            figures[f"workers{n}:{field}"] = value
    return Section("Redis backend cost", "\n".join(body), targets, figures)
