"""The keysvc under test in the allocation simulator, in a process of its own.

``python -m bench.sim_server POLICY SCALE KEYS_FILE`` serves, through keysvc's
own ``create_server`` and servicer, either keysvc's ``KeyPool`` (POLICY
``keysvc``) or the seed's provider (``seed``, bench/seed_pool.py), on a clock
that runs SCALE times faster than the wall clock, so the pool's 1 s reuse
delay, 10 s clamp and the seed's 30 s window are simulated seconds like the
upstream's limits. Prints the port; serves until SIGTERM.

``python -m bench.sim_server redis SCALE KEYS_FILE URL PREFIX ORIGIN`` serves one
replica of a shared pool in Redis (``RedisBackend``), the scripts given the scaled
time from ORIGIN (an epoch time every replica of the run is given, so they agree).
"""

from __future__ import annotations

import asyncio
import logging
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import cast

from redis.asyncio import Redis

from keysvc.clock import Timer
from keysvc.models import ModelTable
from keysvc.pool import KeyPool, MemoryBackend
from keysvc.pool.redis import RedisBackend
from keysvc.reload import read_keys_file

from .child import serve_until_sigterm
from .seed_pool import SeedPool

__all__ = ["ScaledClock"]


class ScaledClock:
    """Epoch seconds that pass ``scale`` times faster than real ones, from ``origin``
    (an epoch time; now when not given). Replicas given one origin tell the same time."""

    def __init__(self, scale: float, origin: float | None = None) -> None:
        self._scale = scale
        self._wall = time.time() if origin is None else origin
        # Monotonic from here on; the origin is placed on the wall clock once.
        self._mono = time.monotonic() - (time.time() - self._wall)

    def now(self) -> float:
        return self._wall + (time.monotonic() - self._mono) * self._scale

    def call_at(self, when: float, callback: Callable[[], None]) -> Timer:
        delay = max(0.0, when - self.now()) / self._scale
        return asyncio.get_running_loop().call_later(delay, callback)


async def main(policy: str, scale: float, keys_file: Path, *shared: str) -> None:
    secrets = read_keys_file(keys_file)
    models = ModelTable()
    if policy == "redis":
        url, prefix, origin = shared
        clock = ScaledClock(scale, float(origin))
        client = Redis.from_url(url)
        backend = RedisBackend(
            client, models=models, prefix=prefix, timeout=5.0, now=clock.now, time_scale=scale
        )
        await backend.add_keys(secrets)
        try:
            await serve_until_sigterm(backend)
        finally:
            await backend.aclose()
        return
    clock = ScaledClock(scale)
    pool: KeyPool | MemoryBackend
    if policy == "keysvc":
        pool = KeyPool.from_secrets(secrets, models=models, clock=clock)
    elif policy == "seed":
        # Duck-typed: the memory backend calls only methods SeedPool has.
        seed = SeedPool.from_secrets(secrets, models=models, clock=clock)
        pool = MemoryBackend(cast(KeyPool, seed))
    else:
        raise SystemExit(f"unknown policy {policy!r}")
    await serve_until_sigterm(pool)


if __name__ == "__main__":
    logging.basicConfig(level=logging.WARNING)
    logging.getLogger("keysvc.pool").setLevel(logging.WARNING)  # no line per 429
    asyncio.run(main(sys.argv[1], float(sys.argv[2]), Path(sys.argv[3]), *sys.argv[4:]))
