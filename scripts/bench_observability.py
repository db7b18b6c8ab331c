"""Cost of observability at 100k keys: hot-path metric updates, a scrape, a page view.

Run: .venv/bin/python scripts/bench_observability.py
"""

from __future__ import annotations

import asyncio
import time
import timeit

import aiohttp
from prometheus_client import generate_latest

from keysvc.clock import ManualClock
from keysvc.metrics import Metrics
from keysvc.models import ModelTable
from keysvc.pool import KeyPool
from keysvc.web import build_app, start_http

KEYS = 100_000
MODELS = ("gpt-4o", "gpt-4", "gpt-3.5-turbo", "o3")


async def over_http(pool: KeyPool, metrics: Metrics) -> None:
    app = build_app(pool, metrics.registry, live=lambda: True, ready=lambda: True)
    http = await start_http(app, host="127.0.0.1", port=0)
    try:
        async with aiohttp.ClientSession() as session:
            for path in ("/", "/metrics"):
                start = time.perf_counter()
                async with session.get(f"http://127.0.0.1:{http.port}{path}") as response:
                    body = await response.read()
                elapsed = (time.perf_counter() - start) * 1000
                print(f"GET {path}: {elapsed:.0f} ms, {len(body)} bytes")
    finally:
        await http.stop()


def main() -> None:
    metrics = Metrics()
    per_update = timeit.timeit(lambda: metrics.handed_out("gpt4"), number=200_000) / 200_000
    print(f"one counter update (handed_out): {per_update * 1e6:.2f} µs")
    clock = ManualClock()
    secrets = [f"sk-bench-{n:08d}" for n in range(KEYS)]
    pool = KeyPool.from_secrets(secrets, models=ModelTable(), clock=clock, observer=metrics)
    for n in range(20_000):
        model = MODELS[n % len(MODELS)]
        key = pool.get(model)
        pool.increment_usage(key.hash, model, 10)
        clock.advance(0.001)
    metrics.watch_pool(pool)
    start = time.perf_counter()
    text = generate_latest(metrics.registry)
    print(f"scrape in process: {(time.perf_counter() - start) * 1000:.0f} ms, {len(text)} bytes")
    asyncio.run(over_http(pool, metrics))


if __name__ == "__main__":
    main()
