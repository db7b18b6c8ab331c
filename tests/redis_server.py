"""A real ``redis-server`` for the tests (``keysvc.testing.redis``, which benchmarks use too)."""

from __future__ import annotations

from collections.abc import Sequence

import redis.asyncio as aioredis

from keysvc.models import ModelTable
from keysvc.pool.redis import RedisBackend
from keysvc.testing.redis import RedisServer, free_port

__all__ = ["RedisServer", "free_port", "replica_env", "two_replicas"]


def two_replicas(client: aioredis.Redis, prefix: str) -> tuple[RedisBackend, RedisBackend]:
    """Two in-process replicas of the pool ``prefix`` (the tests' generous timeout)."""
    first, second = (
        RedisBackend(client, models=ModelTable(), prefix=prefix, timeout=5.0) for _ in range(2)
    )
    return first, second


def replica_env(url: str, prefix: str, secrets: Sequence[str]) -> dict[str, str]:
    """The environment of a ``keysvc serve`` replica of the pool ``prefix`` at ``url``."""
    return {
        "OPENAI_KEY": ",".join(secrets),
        "KEYSVC_REDIS_URL": url,
        "KEYSVC_REDIS_PREFIX": prefix,
        # Not the 250 ms default: a loaded CI machine can stall a process that long.
        "KEYSVC_REDIS_TIMEOUT": "2s",
    }
