"""The keysvc under test in the allocation simulator, in a process of its own.

``python -m bench.sim_server POLICY SCALE KEYS_FILE`` serves, through keysvc's
own ``create_server`` and servicer, either keysvc's ``KeyPool`` (POLICY
``keysvc``) or the seed's provider (``seed``, bench/seed_pool.py), on a clock
that runs SCALE times faster than the wall clock, so the pool's 1 s reuse
delay, 10 s clamp and the seed's 30 s window are simulated seconds like the
upstream's limits. Prints the port; serves until SIGTERM.
"""

from __future__ import annotations

import asyncio
import logging
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import cast

from keysvc.clock import Timer
from keysvc.models import ModelTable
from keysvc.pool import KeyPool, MemoryBackend
from keysvc.reload import read_keys_file

from .child import serve_until_sigterm
from .seed_pool import SeedPool

__all__ = ["ScaledClock"]


class ScaledClock:
    """Epoch seconds that pass ``scale`` times faster than real ones."""

    def __init__(self, scale: float) -> None:
        self._scale = scale
        self._wall = time.time()
        self._mono = time.monotonic()

    def now(self) -> float:
        return self._wall + (time.monotonic() - self._mono) * self._scale

    def call_at(self, when: float, callback: Callable[[], None]) -> Timer:
        delay = max(0.0, when - self.now()) / self._scale
        return asyncio.get_running_loop().call_later(delay, callback)


async def main(policy: str, scale: float, keys_file: Path) -> None:
    secrets = read_keys_file(keys_file)
    clock = ScaledClock(scale)
    models = ModelTable()
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
    asyncio.run(main(sys.argv[1], float(sys.argv[2]), Path(sys.argv[3])))
