"""A real ``redis-server`` for the tests (``keysvc.testing.redis``, which benchmarks use too)."""

from __future__ import annotations

from collections.abc import Sequence

from keysvc.testing.redis import RedisServer, free_port

__all__ = ["RedisServer", "free_port", "replica_env"]


def replica_env(url: str, prefix: str, secrets: Sequence[str]) -> dict[str, str]:
    """The environment of a ``keysvc serve`` replica of the pool ``prefix`` at ``url``."""
    return {
        "OPENAI_KEY": ",".join(secrets),
        "KEYSVC_REDIS_URL": url,
        "KEYSVC_REDIS_PREFIX": prefix,
        # Not the 250 ms default: a loaded CI machine can stall a process that long.
        "KEYSVC_REDIS_TIMEOUT": "2s",
    }
