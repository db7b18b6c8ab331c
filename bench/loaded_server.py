"""A keysvc server with a large, used pool and its HTTP port, in a process of its own.

``python -m bench.loaded_server KEYS`` builds KEYS keys as ``keysvc serve`` does with
KEYSVC_METRICS_PORT set (``build_pool`` with the metrics observer and a
``KeyCensus``), hands out and reports usage for a fifth of them (so the pool has
locks, usage and indexed families), then serves (``create_server`` with metrics,
``start_http_port``), prints "GRPC_PORT HTTP_PORT" and serves until SIGTERM.
"""

from __future__ import annotations

import asyncio
import signal
import sys

from keysvc.clock import SystemClock
from keysvc.config import Settings
from keysvc.metrics import Metrics
from keysvc.overload import raise_open_files_limit
from keysvc.server import build_pool, create_server, start_http_port
from keysvc.status import KeyCensus

from .pool_scale import secrets

MODELS = ("gpt-4o", "gpt-4", "gpt-3.5-turbo", "o3")


async def main(keys: int) -> None:
    raise_open_files_limit()
    metrics = Metrics()
    census = KeyCensus()
    pool = build_pool(
        Settings(), SystemClock(), extra_keys=secrets(keys), observer=metrics, census=census
    )
    for n in range(keys // 5):
        model = MODELS[n % len(MODELS)]
        key = pool.get(model)
        pool.increment_usage(key.hash, model, 10)
    running = create_server(pool, host="127.0.0.1", port=0, metrics=metrics)
    http = await start_http_port(running, pool, metrics, host="127.0.0.1", port=0, census=census)
    await running.start()
    print(running.port, http.port, flush=True)
    stopped = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stopped.set)
    await stopped.wait()
    await running.shutdown(0)
    await http.stop()


if __name__ == "__main__":
    asyncio.run(main(int(sys.argv[1])))
