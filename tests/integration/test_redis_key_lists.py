"""Replicas whose key lists differ: each hands out only the keys it holds a secret for."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import redis.asyncio as aioredis

from keysvc.errors import NoKeysForFamily
from keysvc.keys import hash_key
from keysvc.models import ModelTable
from keysvc.pool.redis import RedisBackend
from keysvc.reload import KeysFileWatcher
from tests.redis_server import RedisServer

#: Only the second replica holds these; registered first, they head every index.
ONLY_SECOND = [f"sk-second-{i:03d}" for i in range(100)]
SHARED = [f"sk-shared-{i}" for i in range(3)]
ONLY_FIRST = [f"sk-first-{i}" for i in range(3)]


@pytest.fixture
async def client(redis_server: RedisServer) -> AsyncIterator[aioredis.Redis]:
    client = aioredis.Redis.from_url(redis_server.url)
    yield client
    await client.aclose()


def _replica(client: aioredis.Redis, prefix: str, clock: list[float]) -> RedisBackend:
    return RedisBackend(
        client, models=ModelTable(), prefix=prefix, timeout=5.0, now=lambda: clock[0]
    )


async def _hand_outs(backend: RedisBackend, clock: list[float], count: int) -> list[str]:
    """The hashes of ``count`` Gets, a tenth of the reuse delay apart."""
    handed = []
    for _ in range(count):
        key = await backend.get("gpt-4")
        assert key.secret and hash_key(key.secret) == key.hash
        handed.append(key.hash)
        clock[0] += 0.1
    return handed


def _hashes(secrets: list[str]) -> set[str]:
    return {hash_key(secret) for secret in secrets}


def _lacking_logged(caplog: pytest.LogCaptureFixture) -> list[tuple[int, set[str]]]:
    return [
        (record.__dict__["lacking"], set(record.__dict__["hashes"].split(",")))
        for record in caplog.records
        if record.getMessage().startswith("this replica lacks keys")
    ]


async def test_each_replica_hands_out_only_its_own_keys(
    client: aioredis.Redis,
    redis_prefix: str,
    caplog: pytest.LogCaptureFixture,
    tmp_path: Path,
) -> None:
    caplog.set_level(logging.INFO, logger="keysvc.pool")
    clock = [1000.0]
    first, second = _replica(client, redis_prefix, clock), _replica(client, redis_prefix, clock)
    await second.add_keys([*ONLY_SECOND, *SHARED])
    assert _lacking_logged(caplog) == []
    await first.add_keys([*SHARED, *ONLY_FIRST])
    # The first lacks the second's own keys, and says which (by hash).
    assert _lacking_logged(caplog) == [(100, _hashes(ONLY_SECOND))]

    # The 100 keys at the head of the indexes are the second's: the first looks past them.
    mine = _hashes([*SHARED, *ONLY_FIRST])
    theirs = _hashes([*ONLY_SECOND, *SHARED])
    for _ in range(3):
        assert set(await _hand_outs(first, clock, 30)) == mine
        assert set(await _hand_outs(second, clock, 10)) <= theirs
    assert await first.lockout_period("gpt-4") >= 0.0

    # A reload drops a shared key from the first: it stops handing it out; the
    # second still does. The first now also lacks that key, and logs it.
    dropped = hash_key(SHARED[0])
    keys_file = tmp_path / "keys"
    keys_file.write_text("\n".join([*SHARED[1:], *ONLY_FIRST]) + "\n")
    caplog.clear()
    assert await KeysFileWatcher(keys_file, pool=first, base_keys=[]).reload("SIGHUP")
    [(count, logged)] = _lacking_logged(caplog)
    # 101 lacked (the dropped key last, in load order); the first 100 are named.
    assert count == 101 and logged == _hashes(ONLY_SECOND)
    assert set(await _hand_outs(first, clock, 25)) == mine - {dropped}
    assert dropped in await _hand_outs(second, clock, 110)

    # Every hash logged, never a secret.
    text = "\n".join(str(record.__dict__) for record in caplog.records)
    assert not any(secret in text for secret in [*ONLY_SECOND, *SHARED, *ONLY_FIRST])


async def test_a_replica_with_none_of_a_familys_keys_has_none(
    client: aioredis.Redis, redis_prefix: str
) -> None:
    clock = [1000.0]
    first, second = _replica(client, redis_prefix, clock), _replica(client, redis_prefix, clock)
    await second.add_keys(["sk-only-second"])
    await first.add_keys([])
    with pytest.raises(NoKeysForFamily):
        await first.get("gpt-4")
    assert await first.lockout_period("gpt-4") == 0.0
    assert (await second.get("gpt-4")).secret == "sk-only-second"
