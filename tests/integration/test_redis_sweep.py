"""On a real redis-server: keys that no replica's key list holds any more leave the
shared pool (``RedisBackend.sweep``, run by the checker lease's holder), as the memory
backend removes a key a reload drops. A list lapses when nobody renews it; here the
test deletes it, as its expiry would."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import pytest
import redis.asyncio as aioredis

from keysvc.keys import hash_key
from keysvc.pool import redis as redis_backend
from keysvc.server import _sweep_under_lease
from tests.redis_server import RedisServer, two_replicas

X, Y, Z = "sk-sweep-x", "sk-sweep-y", "sk-sweep-z"
CLAUDE = "sk-ant-sweep-w"


@pytest.fixture
async def client(redis_server: RedisServer) -> AsyncIterator[aioredis.Redis]:
    client = aioredis.Redis.from_url(redis_server.url)
    yield client
    await client.aclose()


async def _lapse_list_of(client: aioredis.Redis, prefix: str, key_hash: str) -> None:
    """Deletes the held sets (key lists) that have ``key_hash``, as their expiry would."""
    for name in await client.keys(f"{{{prefix}}}:held:*"):
        if await client.sismember(name, key_hash):
            await client.delete(name)


async def _names_with(client: aioredis.Redis, prefix: str, key_hash: str) -> list[Any]:
    return [n for n in await client.keys(f"{{{prefix}}}:*") if key_hash in n.decode()]


async def test_keys_no_list_holds_leave_the_pool_with_their_state(
    client: aioredis.Redis, redis_prefix: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(redis_backend, "SWEEP_BATCH", 2)  # several batches for 4 keys
    first, second = two_replicas(client, redis_prefix)
    await first.add_keys([X, Y])
    await second.add_keys([Y, Z, CLAUDE])
    z = hash_key(Z)
    # Z gets state: a hand-out, usage, a listing, an organization clone.
    await second.apply_check(z, model_ids=["gpt-4o-mini"], is_trial=False)
    await second.apply_check(hash_key(Y), model_ids=["gpt-4"], is_trial=False)
    assert (await second.get("gpt-4o-mini")).hash == z
    await second.increment_usage(z, "gpt-4o-mini", 700)
    clone = await second.clone_for_org(z, "org-b")
    assert clone is not None
    assert await first.sweep() == []  # every key is in a live list
    assert await first.available() == 5
    assert (await first.census()).providers["anthropic"]["active"] == 1
    await _lapse_list_of(client, redis_prefix, z)
    assert sorted(await first.sweep()) == sorted([z, clone.hash, hash_key(CLAUDE)])
    assert await first.available() == 2
    # The census's keys per provider lose them too.
    providers = (await first.census()).providers
    assert providers.get("anthropic", {}).get("active", 0) == 0
    assert providers["openai"]["active"] == 2
    assert {key.hash for key in await first.keys()} == {hash_key(X), hash_key(Y)}
    # Nothing of Z is left: its record, indexes, states, usage, listing and ids.
    assert await _names_with(client, redis_prefix, z) == []
    assert len(await client.keys(f"{{{redis_prefix}}}:ids:*")) == 1  # Y's
    assert await client.smembers(f"{{{redis_prefix}}}:lists:turbo") == set()
    census = {item.family: item.tokens for item in (await first.census()).summaries}
    assert census["turbo"] == 0
    # The replica whose list lapsed holds it again and adds its keys back, anew.
    assert await second.ping()
    assert await first.available() == 4
    back = await second.key(z)
    assert back.prompt_count == 0 and back.last_used == 0.0


async def test_nothing_is_removed_while_no_list_is_held(
    client: aioredis.Redis, redis_prefix: str
) -> None:
    first, _ = two_replicas(client, redis_prefix)
    await first.add_keys([X, Y])
    await _lapse_list_of(client, redis_prefix, hash_key(X))
    assert await first.sweep() == []
    assert await first.available() == 2


async def test_the_sweeper_lease_holder_sweeps_with_key_checking_off(
    client: aioredis.Redis, redis_prefix: str
) -> None:
    first, second = two_replicas(client, redis_prefix)
    await first.add_keys([X])
    await second.add_keys([Z])
    # Two replicas compete for the lease; the holder sweeps (no key checker runs).
    sweepers = [
        asyncio.ensure_future(_sweep_under_lease(replica, lease=0.3, every=0.0))
        for replica in (first, second)
    ]
    try:
        await asyncio.sleep(0.5)
        assert await first.available() == 2
        await _lapse_list_of(client, redis_prefix, hash_key(Z))
        for _ in range(50):
            if await first.available() == 1:
                break
            await asyncio.sleep(0.1)
        assert [key.hash for key in await first.keys()] == [hash_key(X)]
        # The sweeper lease is its own: the key checker's is still free.
        assert await client.get(f"{{{redis_prefix}}}:checker") is None
        assert await client.get(f"{{{redis_prefix}}}:sweeper") is not None
    finally:
        for sweeper in sweepers:
            sweeper.cancel()
        await asyncio.gather(*sweepers, return_exceptions=True)
