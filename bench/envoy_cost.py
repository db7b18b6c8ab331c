"""Envoy + keysvc: added latency and server CPU per request, against the upstream direct.

Three processes of their own: the fake OpenAI upstream (``bench/envoy_upstream.py``,
``keysvc.testing.fake_openai``), keysvc (``bench/rpc_server.py``: ``create_server``
as ``keysvc serve`` builds it, ext_proc included) and Envoy with the repo's
bootstrap (``deploy/envoy/envoy.yaml``, one worker thread). An aiohttp client keeps
32 chat completions in flight, either straight to the upstream with a key of its
own (**direct**) or to Envoy with no key, Envoy asking keysvc for one per request
and reporting the answer back (**through Envoy**: request headers, buffered body,
response headers and the JSON body with its usage: four ext_proc messages).

Rounds of the two routes alternate. Server CPU is the sum over each server's
threads of ``/proc/<pid>/task/*/schedstat``; the figure per route is the median
over rounds of CPU / requests, for each server. Latency is the client's, per
request, over every round. Keys: enough that every request finds one free (each
is held back 1 s after a hand-out).
"""

from __future__ import annotations

import asyncio
import json
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import aiohttp

from keysvc.testing.envoy import EnvoyProcess

from . import aio
from .child import serving_module
from .pool_scale import secrets
from .report import Section, Target, median, percentile, table
from .rpc_cost import server_cpu_seconds

__all__ = ["run"]

IN_FLIGHT = 32
KEYS = 5_000
BODY = {"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 16}
PAYLOAD = json.dumps(BODY).encode()
JSON = {"content-type": "application/json"}

Send = Callable[[int], Awaitable[None]]


async def _round(
    send: Send, requests: int, latencies: list[float], in_flight: int = IN_FLIGHT
) -> None:
    next_request = 0

    async def worker() -> None:
        nonlocal next_request
        timer = time.perf_counter
        while next_request < requests:
            n = next_request
            next_request += 1
            start = timer()
            await send(n)
            latencies.append(timer() - start)

    await asyncio.gather(*(worker() for _ in range(in_flight)))


async def measure(
    pids: dict[str, int], upstream_url: str, envoy_url: str, requests: int, rounds: int
) -> dict[str, dict[str, float]]:
    keys = secrets(KEYS)
    # aiohttp rather than httpx: the client shares the two cores with the servers, and
    # httpx's own CPU per request made the client, not the hop, set the pace.
    connector = aiohttp.TCPConnector(limit=IN_FLIGHT)
    timeout = aiohttp.ClientTimeout(total=60)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as http:

        async def post(url: str, headers: dict[str, str]) -> None:
            async with http.post(url, data=PAYLOAD, headers=headers) as response:
                await response.read()
                if response.status != 200:
                    raise RuntimeError(f"{url} answered {response.status}")

        async def direct(n: int) -> None:
            headers = {**JSON, "authorization": f"Bearer {keys[n % len(keys)]}"}
            await post(f"{upstream_url}/chat/completions", headers)

        async def through(n: int) -> None:
            await post(f"{envoy_url}/chat/completions", JSON)

        routes: dict[str, Send] = {"direct": direct, "through Envoy": through}
        for send in routes.values():  # warm-up: connections, caches, Envoy's gRPC stream setup
            await _round(send, max(IN_FLIGHT, requests // 5), [])
        cpu: dict[str, dict[str, list[float]]] = {
            route: {server: [] for server in pids} for route in routes
        }
        latencies: dict[str, list[float]] = {route: [] for route in routes}
        walls: dict[str, list[float]] = {route: [] for route in routes}
        for _ in range(rounds):
            for route, send in routes.items():
                before = {server: server_cpu_seconds(pid) for server, pid in pids.items()}
                started = time.perf_counter()
                await _round(send, requests, latencies[route])
                walls[route].append(time.perf_counter() - started)
                for server, pid in pids.items():
                    spent = server_cpu_seconds(pid) - before[server]
                    cpu[route][server].append(spent / requests)
        # One request at a time: the hop's own latency, without queueing behind the others.
        alone: dict[str, list[float]] = {route: [] for route in routes}
        for route, send in routes.items():
            await _round(send, max(50, requests // 10), alone[route], in_flight=1)
    results: dict[str, dict[str, float]] = {}
    for route in routes:
        figures = {f"{server}_cpu_us": median(cpu[route][server]) * 1e6 for server in pids}
        figures["servers_cpu_us"] = sum(figures.values())
        figures["p50_ms"] = percentile(latencies[route], 0.5) * 1e3
        figures["p99_ms"] = percentile(latencies[route], 0.99) * 1e3
        figures["requests_per_s"] = requests / median(walls[route])
        figures["p50_ms_alone"] = percentile(alone[route], 0.5) * 1e3
        results[route] = figures
    return results


def run(*, smoke: bool = False) -> Section:
    requests, rounds = (200, 1) if smoke else (1_000, 5)
    keys = 1_000 if smoke else KEYS
    with (
        tempfile.TemporaryDirectory(prefix="keysvc-bench-envoy-") as folder,
        serving_module("bench.envoy_upstream", str(keys)) as (upstream, upstream_port),
        serving_module("bench.rpc_server", str(keys)) as (keysvc, keysvc_port),
        EnvoyProcess(
            upstream_port=upstream_port,
            keysvc_port=keysvc_port,
            log=Path(folder) / "envoy.log",
            log_level="warning",
        ) as envoy,
    ):
        assert envoy.process is not None
        pids = {"upstream": upstream.pid, "keysvc": keysvc.pid, "envoy": envoy.process.pid}
        results = aio.run(
            measure(
                pids,
                f"http://127.0.0.1:{upstream_port}/v1",
                envoy.base_url,
                requests,
                rounds,
            )
        )
    direct, through = results["direct"], results["through Envoy"]
    added_ms = through["p50_ms"] - direct["p50_ms"]
    added_alone_ms = through["p50_ms_alone"] - direct["p50_ms_alone"]
    # keysvc and Envoy idle through the direct rounds: their few µs there are in "direct".
    added_cpu = through["servers_cpu_us"] - direct["servers_cpu_us"]
    cpu_ratio = through["servers_cpu_us"] / direct["servers_cpu_us"]
    rows = [
        (
            route,
            f"{r['upstream_cpu_us']:.0f}",
            f"{r['keysvc_cpu_us']:.0f}",
            f"{r['envoy_cpu_us']:.0f}",
            f"{r['servers_cpu_us']:.0f}",
            f"{r['p50_ms']:.1f}",
            f"{r['p99_ms']:.1f}",
            f"{r['p50_ms_alone']:.2f}",
            f"{r['requests_per_s']:,.0f}",
        )
        for route, r in results.items()
    ]
    body = [
        __doc__.split("\n\n", 1)[1].strip() if __doc__ else "",
        "",
        table(
            (
                "route",
                "upstream CPU µs/req",
                "keysvc CPU µs/req",
                "Envoy CPU µs/req",
                "all servers µs/req",
                "p50 ms",
                "p99 ms",
                "p50 ms, 1 in flight",
                "requests/s",
            ),
            rows,
        ),
        "",
        f"Added by Envoy + keysvc: p50 latency +{added_ms:.1f} ms "
        f"({through['p50_ms'] / direct['p50_ms']:.2f}× direct); server CPU "
        f"+{added_cpu:.0f} µs per request (keysvc {through['keysvc_cpu_us']:.0f}, Envoy "
        f"{through['envoy_cpu_us']:.0f}); all servers {cpu_ratio:.2f}× direct. One request "
        f"at a time, the hop adds {added_alone_ms:.2f} ms: at 32 in flight most of the added "
        "latency is queueing for keysvc's CPU.",
        "",
        f"{rounds} rounds of {requests:,} requests per route, {IN_FLIGHT} in flight, "
        f"{keys:,} keys. The fake upstream answers at once, so the figures are the cost of "
        "the hop, not of a model.",
    ]
    targets = [
        Target(
            "Envoy + keysvc: added p50 latency per request",
            f"+{added_ms:.1f} ms",
            "measured",
            True,
            informational=True,
        ),
        Target(
            "Envoy + keysvc: added server CPU per request",
            f"{added_cpu:.0f} µs ({cpu_ratio:.2f}× all servers direct)",
            "measured",
            True,
            informational=True,
        ),
    ]
    figures = {
        "added_p50_ms": added_ms,
        "added_p50_ms_alone": added_alone_ms,
        "added_cpu_us": added_cpu,
        "cpu_ratio": cpu_ratio,
    }
    for route, r in results.items():
        for field, value in r.items():
            figures[f"{route}:{field}"] = value
    return Section(
        "Envoy + keysvc: added latency and server CPU per request",
        "\n".join(body),
        targets,
        figures,
    )
