"""RedisBackend calls on the test session's redis-server (two backends = two replicas)."""

from __future__ import annotations

import redis.asyncio as aioredis

from keysvc.keys import DisableReason, hash_key
from keysvc.models import ModelTable
from keysvc.pool.redis import RedisBackend
from tests.redis_server import RedisServer


async def test_an_organization_clone_serves_from_every_replica(
    redis_server: RedisServer, redis_prefix: str
) -> None:
    client = aioredis.Redis.from_url(redis_server.url)
    try:
        first, second = (
            RedisBackend(client, models=ModelTable(), prefix=redis_prefix, timeout=5.0)
            for _ in range(2)
        )
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
