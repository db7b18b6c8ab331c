"""A keysvc server for the RPC-cost benchmark, in a process of its own.

``python -m bench.rpc_server KEYS`` builds the pool and the server exactly as
``keysvc serve`` does (``create_server``: the RPC observer, error mapping and
drain interceptors, health, reflection), prints the port and serves until SIGTERM.
"""

from __future__ import annotations

import asyncio
import sys

from keysvc.clock import SystemClock
from keysvc.models import ModelTable
from keysvc.pool import KeyPool

from .child import serve_until_sigterm
from .pool_scale import secrets


async def main(keys: int) -> None:
    pool = KeyPool.from_secrets(secrets(keys), models=ModelTable(), clock=SystemClock())
    await serve_until_sigterm(pool)


if __name__ == "__main__":
    asyncio.run(main(int(sys.argv[1])))
