"""KEYSVC_REDIS_TIMEOUT bounds the whole time one RPC spends on Redis, not each call."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest
import redis.asyncio as aioredis

from keysvc.errors import StoreUnavailable
from keysvc.models import ModelTable
from keysvc.pool.redis import RedisBackend
from tests.redis_server import RedisServer


async def test_a_waiting_get_has_one_timeout_for_all_its_redis_calls(tmp_path: Path) -> None:
    server = RedisServer(tmp_path)
    server.start()
    client = aioredis.Redis.from_url(server.url)
    try:
        backend = RedisBackend(
            client, models=ModelTable(), prefix="budget", timeout=1.0, reuse_delay=3.0
        )
        await backend.add_keys(["sk-budget"])
        await backend.get("gpt-4")  # the only key: locked for 3 s
        started = time.monotonic()
        server.pause()
        waiting = asyncio.create_task(backend.get("gpt-4", max_wait=10.0))
        # Redis answers the Get's first call 0.7 s late: 0.3 s of its budget is left.
        await asyncio.sleep(0.7)
        server.resume()
        await asyncio.sleep(0.5)
        # Hung from now on. The Get sleeps until the key unlocks (not Redis time), then
        # asks again: that call has the 0.3 s left, not a whole second of its own.
        server.pause()
        with pytest.raises(StoreUnavailable):
            await waiting
        took = time.monotonic() - started
        assert 2.9 < took < 3.65, took
    finally:
        server.stop()
        await client.aclose()


async def test_calls_outside_an_rpc_each_have_the_whole_timeout(tmp_path: Path) -> None:
    server = RedisServer(tmp_path)
    server.start()
    client = aioredis.Redis.from_url(server.url)
    try:
        backend = RedisBackend(client, models=ModelTable(), prefix="each", timeout=0.5)
        await backend.add_keys(["sk-each"])
        # Two RPCs one after the other: the second's budget is not the first's remainder.
        server.pause()
        loop = asyncio.get_running_loop()
        loop.call_later(0.4, server.resume)
        assert await backend.available() == 1  # 0.4 s of its 0.5 s
        server.pause()
        loop.call_later(0.4, server.resume)
        assert await backend.available() == 1
    finally:
        server.stop()
        await client.aclose()
