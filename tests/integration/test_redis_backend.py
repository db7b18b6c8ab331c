"""RedisBackend calls on the test session's redis-server (two backends = two replicas)."""

from __future__ import annotations

import time

import pytest
import redis.asyncio as aioredis

from keysvc.errors import KeysBusy
from keysvc.keys import DisableReason, hash_key
from keysvc.models import ModelTable
from keysvc.outcomes import UpstreamError
from keysvc.pool.redis import RECHECK_BATCH, RedisBackend
from tests.redis_server import RedisServer, two_replicas


async def test_an_organization_clone_serves_from_every_replica(
    redis_server: RedisServer, redis_prefix: str
) -> None:
    client = aioredis.Redis.from_url(redis_server.url)
    try:
        first, second = two_replicas(client, redis_prefix)
        for backend in (first, second):
            await backend.add_keys(["sk-parent"])
        clone = await first.clone_for_org(hash_key("sk-parent"), "org-b")
        assert clone is not None and clone.hash == hash_key("sk-parent", "org-b")
        assert await first.clone_for_org(hash_key("sk-parent"), "org-b") is None
        # The parent goes; the other replica hands out the clone, with the parent's secret.
        await second.disable(hash_key("sk-parent"), DisableReason.MANUAL)
        got = await second.get("gpt-4")
        assert got.hash == clone.hash and got.secret == "sk-parent"
        assert got.organization_id == "org-b"
    finally:
        await client.aclose()


async def test_a_waiting_get_sleeps_the_pool_seconds_over_the_time_scale(
    redis_server: RedisServer, redis_prefix: str
) -> None:
    # The allocation simulator's scaled time: the pool's seconds pass 100 times faster.
    started = time.monotonic()
    client = aioredis.Redis.from_url(redis_server.url)

    def now() -> float:
        return 1_000.0 + (time.monotonic() - started) * 100

    try:
        backend = RedisBackend(
            client, models=ModelTable(), prefix=redis_prefix, timeout=5.0, now=now,
            time_scale=100,
        )  # fmt: skip
        await backend.add_keys(["sk-scaled"])
        await backend.get("gpt-4")  # locked for the 1 s reuse delay: 10 ms real
        began = time.monotonic()
        got = await backend.get("gpt-4", max_wait=30.0)  # 0.3 s real at most
        assert got.hash == hash_key("sk-scaled")
        # ~10 ms; unscaled, the wait would be the whole second (a loaded machine adds some).
        assert time.monotonic() - began < 0.6
        await backend.disable(got.hash, DisableReason.MANUAL)
        await backend.add_keys(["sk-scaled-2"])
        await backend.get("gpt-4")
        await backend.report_outcome(
            hash_key("sk-scaled-2"), "gpt-4", status=429, headers={}, error=UpstreamError()
        )  # locked for the 10 s fallback: 0.1 s real
        began = time.monotonic()
        with pytest.raises(KeysBusy):
            await backend.get("gpt-4", max_wait=5.0)  # 50 ms real, not 5 s
        assert time.monotonic() - began < 2.0
    finally:
        await client.aclose()


async def test_recheck_walks_the_pool_in_batches(
    redis_server: RedisServer, redis_prefix: str
) -> None:
    client = aioredis.Redis.from_url(redis_server.url)
    try:
        backend = RedisBackend(client, models=ModelTable(), prefix=redis_prefix, timeout=5.0)
        secrets = [f"sk-batch-{i:04d}" for i in range(2 * RECHECK_BATCH + 200)]
        await backend.add_keys(secrets)
        await backend.recheck()  # Redis knows the script from now on (no NOSCRIPT below)
        disabled = [hash_key(secrets[i]) for i in (0, RECHECK_BATCH, len(secrets) - 1)]
        for key_hash in disabled:
            await backend.disable(key_hash, DisableReason.REVOKED)
        calls_before = await _script_calls(client)
        await backend.recheck()
        # Three script calls (500, 500 and 200 keys), none over the whole pool.
        assert await _script_calls(client) - calls_before == 3
        assert await backend.available() == len(secrets)
        keys = await backend.keys()
        assert len(keys) == len(secrets)
        assert all(key.last_checked == 0 and not key.is_disabled for key in keys)
        # With a key checker: the disabled stay so, marked to come back when found alive.
        await backend.disable(disabled[2], DisableReason.QUOTA)
        await backend.recheck(until_checked=True)
        assert (await backend.key(disabled[2])).revive_if_alive
        assert await backend.available() == len(secrets) - 1
    finally:
        await client.aclose()


async def _script_calls(client: aioredis.Redis) -> int:
    stats = await client.info("commandstats")
    return int(stats.get("cmdstat_evalsha", {}).get("calls", 0))
