"""A keysvc server for the state-file benchmark, in a process of its own.

``python -m bench.state_server KEYS STATE`` builds the pool as ``keysvc serve``
does (``build_pool``, ``create_server``) over ``KEYS`` keys, with its state in
the SQLite database ``STATE`` (written, batched and flushed as in production),
or in memory when ``STATE`` is ``-``; prints the port and serves until SIGTERM.
"""

from __future__ import annotations

import asyncio
import signal
import sys
from pathlib import Path

from keysvc.clock import SystemClock
from keysvc.config import Settings
from keysvc.server import build_pool, create_server
from keysvc.state import SqliteStateStore

from .pool_scale import secrets


async def main(keys: int, state_path: str) -> None:
    state = None if state_path == "-" else SqliteStateStore.open(Path(state_path))
    pool = build_pool(Settings(), SystemClock(), store=state, extra_keys=secrets(keys))
    if state is not None:
        await state.flush()  # every key's first row, before serving, as `keysvc serve` does
        state.start()
    running = create_server(pool, host="127.0.0.1", port=0, state=state)
    await running.start()
    print(running.port, flush=True)
    stopped = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stopped.set)
    await stopped.wait()
    await running.shutdown(0)
    if state is not None:
        await state.close()


if __name__ == "__main__":
    asyncio.run(main(int(sys.argv[1]), sys.argv[2]))
