"""A real ``redis-server`` for the tests (``keysvc.testing.redis``, which benchmarks use too)."""

from __future__ import annotations

from keysvc.testing.redis import RedisServer, free_port

__all__ = ["RedisServer", "free_port"]
