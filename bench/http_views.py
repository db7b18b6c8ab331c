"""Clients of the HTTP port in a process of their own, for the "under load" benchmark.

``python -m bench.http_views PORT CLIENTS`` runs CLIENTS loops that fetch the status
page and /metrics back to back until SIGTERM, then prints how many of each it
fetched. A process of its own, so its CPU does not delay the benchmark's Get
client (which would count against the server).
"""

from __future__ import annotations

import asyncio
import signal
import sys

import aiohttp

PATHS = ("/", "/metrics")


async def main(port: int, clients: int) -> None:
    fetched = dict.fromkeys(PATHS, 0)
    stopping = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stopping.set)

    async def reload(session: aiohttp.ClientSession) -> None:
        while not stopping.is_set():
            for path in PATHS:
                async with session.get(f"http://127.0.0.1:{port}{path}") as response:
                    await response.read()
                    assert response.status == 200, response.status
                fetched[path] += 1

    print("started", flush=True)
    async with aiohttp.ClientSession() as session:
        await asyncio.gather(*(reload(session) for _ in range(clients)))
    print(" ".join(str(fetched[path]) for path in PATHS), flush=True)


if __name__ == "__main__":
    asyncio.run(main(int(sys.argv[1]), int(sys.argv[2])))
