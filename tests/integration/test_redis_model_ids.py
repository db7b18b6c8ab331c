"""On a real redis-server: once the key checker has listed a key's model ids, the key
serves only those models (or dated snapshots of them) on every replica, in every way
a key is chosen: Get, a waiting Get, GetLockoutPeriod."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest
import redis.asyncio as aioredis

from keysvc.errors import KeysBusy, NoKeysForFamily
from keysvc.keys import hash_key
from keysvc.models import ModelTable
from keysvc.pool.redis import RedisBackend
from tests.redis_server import RedisServer, two_replicas

A, B = "sk-listing-a", "sk-listing-b"


@pytest.fixture
async def client(redis_server: RedisServer) -> AsyncIterator[aioredis.Redis]:
    client = aioredis.Redis.from_url(redis_server.url)
    yield client
    await client.aclose()


async def test_a_listed_key_serves_its_models_only_on_every_replica(
    client: aioredis.Redis, redis_prefix: str
) -> None:
    checker, other = two_replicas(client, redis_prefix)
    for replica in (checker, other):
        await replica.add_keys([A, B])
    # The checker lists A's ids: gpt-4o and turbo, but not gpt-4o-mini (turbo's too).
    await checker.apply_check(hash_key(A), model_ids=["gpt-4o", "gpt-3.5-turbo"], is_trial=False)
    # The census counts keys of every index, listed ones too.
    census = {item.family: item.counts for item in (await other.census()).summaries}
    assert census["turbo"]["active"] == census["gpt4"]["active"] + 1 == 2
    # A is first in load order and unused, yet the other replica never gives it for
    # gpt-4o-mini: B, then B again (locked, but the only key that may serve it).
    assert (await other.get("gpt-4o-mini")).hash == hash_key(B)
    assert (await other.get("gpt-4o-mini")).hash == hash_key(B)
    # A dated snapshot of a listed model is served by the key that lists the model.
    assert (await other.get("gpt-4o-2024-08-06")).hash == hash_key(A)
    # B lists gpt-4 only: no key may serve gpt-4o-mini now, and its lockout says go.
    await checker.apply_check(hash_key(B), model_ids=["gpt-4"], is_trial=False)
    with pytest.raises(NoKeysForFamily):
        await other.get("gpt-4o-mini")
    assert await other.lockout_period("gpt-4o-mini") == 0.0
    assert (await other.get("gpt-4-0613")).hash == hash_key(B)
    # A check that could not read the list keeps the listing.
    await checker.apply_check(hash_key(A), model_ids=None, is_trial=False)
    with pytest.raises(NoKeysForFamily):
        await other.get("gpt-4o-mini")


async def test_waits_and_lockouts_count_only_keys_listing_the_model(
    client: aioredis.Redis, redis_prefix: str
) -> None:
    pool = RedisBackend(
        client, models=ModelTable(), prefix=redis_prefix, timeout=5.0, reuse_delay=1.0
    )
    await pool.add_keys([A, B])
    await pool.apply_check(hash_key(A), model_ids=["gpt-4o-mini"], is_trial=False)
    await pool.apply_check(hash_key(B), model_ids=["gpt-3.5-turbo"], is_trial=False)
    assert (await pool.get("gpt-4o-mini")).hash == hash_key(A)
    # A is locked for a second; B is free but does not list gpt-4o-mini.
    assert await pool.lockout_period("gpt-4o-mini") > 0.5
    assert await pool.lockout_period("gpt-3.5-turbo") == 0.0
    with pytest.raises(KeysBusy):
        await pool.get("gpt-4o-mini", max_wait=0.05)
    # A waiter for gpt-4o-mini waits for A; one for gpt-3.5-turbo (the same family)
    # that comes after it is not held up behind it: B is free for it now.
    mini = asyncio.ensure_future(pool.get("gpt-4o-mini", max_wait=5.0))
    await asyncio.sleep(0.05)
    turbo = await pool.get("gpt-3.5-turbo", max_wait=5.0)
    assert turbo.hash == hash_key(B)
    assert not mini.done()
    assert (await mini).hash == hash_key(A)
    await pool.aclose()
