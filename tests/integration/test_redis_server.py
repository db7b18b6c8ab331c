"""The test tier's own redis-server: up, on loopback only, nothing kept on disk."""

from __future__ import annotations

import redis.asyncio as aioredis

from tests.redis_server import RedisServer


async def test_the_session_redis_answers_on_loopback_only(redis_server: RedisServer) -> None:
    client = aioredis.Redis.from_url(redis_server.url)
    try:
        assert await client.ping()
        assert await client.config_get("bind") == {"bind": "127.0.0.1"}
        assert await client.config_get("save") == {"save": ""}
    finally:
        await client.aclose()
