"""GetLockoutPeriod's holds (docs/allocation.md) behave alike on both backends: the
memory pool and the Redis one on the session's redis-server, each on a manual clock."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest
import redis.asyncio as aioredis

from keysvc.clock import ManualClock
from keysvc.errors import NoKeysForFamily
from keysvc.keys import DisableReason
from keysvc.models import ModelTable
from keysvc.pool import KEY_REUSE_DELAY, PROMISE_TTL, MemoryBackend, PoolBackend
from keysvc.pool.redis import RedisBackend
from tests.helpers import PAID, pool_of
from tests.redis_server import RedisServer

PROXY_A = "ipv4:127.0.0.1:40001"
PROXY_B = "ipv4:127.0.0.1:40002"
#: 1 of 10 requests a minute left, refilling slowly: a fraction of a second brings no room.
ONE_LEFT = {
    "x-ratelimit-limit-requests": "10",
    "x-ratelimit-remaining-requests": "1",
    "x-ratelimit-reset-requests": "59s",
}


@pytest.fixture(params=["memory", "redis"])
async def backend(
    request: pytest.FixtureRequest, redis_server: RedisServer, redis_prefix: str
) -> AsyncIterator[tuple[PoolBackend, ManualClock, str]]:
    """A backend with two keys, each with one request's room known for gpt-4o."""
    pool, clock, keys = pool_of([PAID, PAID])
    if request.param == "memory":
        chosen: PoolBackend = MemoryBackend(pool)
        client = None
    else:
        client = aioredis.Redis.from_url(redis_server.url)
        chosen = RedisBackend(
            client, models=ModelTable(), prefix=redis_prefix, timeout=5.0, now=clock.now
        )
        for key in keys:
            await chosen.add_keys([key.secret], profile=PAID)
    for _ in keys:
        lease = await chosen.get("gpt-4o")
        await chosen.update_rate_limits(lease.hash, ONE_LEFT, "gpt-4o")
        clock.advance(KEY_REUSE_DELAY)
    try:
        yield chosen, clock, request.param
    finally:
        if client is not None:
            await client.aclose()


async def test_each_zero_holds_a_room_until_the_caller_s_get(
    backend: tuple[PoolBackend, ManualClock, str],
) -> None:
    pool, clock, _ = backend
    assert await pool.lockout_period("gpt-4o", caller=PROXY_A) == 0.0
    assert await pool.lockout_period("gpt-4o", caller=PROXY_A) == 0.0  # the second key's room
    # Both rooms are A's: B is told to wait for the holds' end, not sent to race.
    lockout = await pool.lockout_period("gpt-4o", caller=PROXY_B)
    assert 0.0 < lockout <= PROMISE_TTL
    first = await pool.get("gpt-4o", caller=PROXY_A)
    second = await pool.get("gpt-4o", caller=PROXY_A)
    assert first.hash != second.hash  # each Get had its own room
    assert await pool.lockout_period("gpt-4o", caller=PROXY_B) > PROMISE_TTL  # spent


async def test_a_hold_nobody_uses_lapses_and_its_caller_holds_no_more(
    backend: tuple[PoolBackend, ManualClock, str],
) -> None:
    pool, clock, _ = backend
    assert await pool.lockout_period("gpt-4o", caller=PROXY_A) == 0.0
    clock.advance(PROMISE_TTL)
    # A's hold lapsed unused: A is told 0 but holds nothing, so B still gets both rooms.
    assert await pool.lockout_period("gpt-4o", caller=PROXY_A) == 0.0
    assert await pool.lockout_period("gpt-4o", caller=PROXY_B) == 0.0
    assert await pool.lockout_period("gpt-4o", caller=PROXY_B) == 0.0
    assert await pool.lockout_period("gpt-4o", caller=PROXY_A) > 0.0


async def test_a_report_without_a_model_is_not_taken_for_a_hold(
    backend: tuple[PoolBackend, ManualClock, str],
) -> None:
    pool, clock, _ = backend
    assert await pool.lockout_period("gpt-4o", caller=PROXY_A) == 0.0
    lease = await pool.get("gpt-3.5-turbo")  # a hand-out of another family, in flight
    await pool.update_rate_limits(lease.hash, {"x-ratelimit-remaining-requests": "100"})
    # The hold still holds: B sees only the other key's room.
    assert await pool.lockout_period("gpt-4o", caller=PROXY_B) == 0.0
    assert await pool.lockout_period("gpt-4o", caller=PROXY_B) > 0.0


async def test_a_key_disabled_while_held_stays_out_when_its_caller_gets(
    backend: tuple[PoolBackend, ManualClock, str],
) -> None:
    """Giving a held room back re-places its key only while the key is in service."""
    pool, _, _ = backend
    assert await pool.lockout_period("gpt-4o", caller=PROXY_A) == 0.0
    assert await pool.lockout_period("gpt-4o", caller=PROXY_A) == 0.0
    keys = await pool.keys()
    for key in keys:
        await pool.disable(key.hash, DisableReason.REVOKED)
    with pytest.raises(NoKeysForFamily):
        await pool.get("gpt-4o", caller=PROXY_A)
