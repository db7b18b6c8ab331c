"""Anthropic keys on the Redis backend: what the differential machine's one clock cannot
show (it gives the replica and the scripts the same time)."""

from __future__ import annotations

import time
from datetime import UTC, datetime

import pytest
import redis.asyncio as aioredis

from keysvc.clock import ManualClock
from keysvc.errors import NoKeysForFamily
from keysvc.keys import DisableReason, hash_key
from keysvc.models import ModelTable
from keysvc.outcomes import UpstreamError
from keysvc.pool.redis import RedisBackend
from tests.redis_server import RedisServer, two_replicas

SONNET = "claude-sonnet-4-5"


def _at(moment: float) -> str:
    return datetime.fromtimestamp(moment, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


async def test_reset_times_are_read_on_redis_s_clock(
    redis_server: RedisServer, redis_prefix: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A replica whose clock runs 30 s behind reads "reset at T" as 30 s longer away than
    it is; the script moves it to Redis's clock, so the input budget is whole again at T."""
    client = aioredis.Redis.from_url(redis_server.url)
    try:
        replica, _ = two_replicas(client, redis_prefix)
        monkeypatch.setattr(replica, "_now_here", lambda: time.time() - 30.0)
        secret = "sk-ant-api03-skewed"
        await replica.add_keys([secret])
        key = await replica.get(SONNET)
        reset = time.time() + 30.0
        headers = {
            "anthropic-ratelimit-input-tokens-limit": "40000",
            "anthropic-ratelimit-input-tokens-remaining": "0",
            "anthropic-ratelimit-input-tokens-reset": _at(reset),
            "anthropic-ratelimit-output-tokens-limit": "8000",
            "anthropic-ratelimit-output-tokens-remaining": "8000",
            "anthropic-ratelimit-output-tokens-reset": _at(reset),
        }
        await replica.report_outcome(
            key.hash, SONNET, status=200, headers=headers, error=UpstreamError()
        )
        state = f"{{{redis_prefix}}}:st:claude-sonnet:{hash_key(secret)}"
        whole_at = float(await client.hget(state, "fa3") or 0)
        assert abs(whole_at - int(reset)) < 2.0  # not 30 s later
    finally:
        await client.aclose()


async def test_a_spend_limit_benches_the_key_until_the_named_time(
    redis_server: RedisServer, redis_prefix: str
) -> None:
    clock = ManualClock()
    client = aioredis.Redis.from_url(redis_server.url)
    try:
        replica = RedisBackend(
            client, models=ModelTable(), prefix=redis_prefix, timeout=5.0, now=clock.now
        )
        await replica.add_keys(["sk-ant-api03-spender"])
        key = await replica.get(SONNET)
        back = clock.now() + 5.0
        error = UpstreamError(
            "rate_limit_error",
            "",
            f"You have reached your usage limits. Usage blocked until {_at(back)}.",
        )
        decision, benched = await replica.report_outcome(
            key.hash, SONNET, status=429, headers={}, error=error
        )
        assert decision.disable is DisableReason.QUOTA and decision.quota_until == back
        assert benched.is_over_quota and benched.over_quota_until == back
        with pytest.raises(NoKeysForFamily):
            await replica.get(SONNET)
        clock.advance(4.9)
        assert await replica.available() == 0
        clock.advance(0.1)  # the named time: back in service by itself
        assert (await replica.get(SONNET)).hash == key.hash
        assert await replica.available() == 1
    finally:
        await client.aclose()


async def test_an_overload_backs_the_provider_off_for_every_replica(
    redis_server: RedisServer, redis_prefix: str
) -> None:
    client = aioredis.Redis.from_url(redis_server.url)
    try:
        first, second = two_replicas(client, redis_prefix)
        for replica in (first, second):
            await replica.add_keys(["sk-ant-api03-busy"])
        key = await first.get(SONNET)
        overloaded = UpstreamError("overloaded_error", "", "Overloaded")

        async def report(replica: RedisBackend, status: int) -> float | None:
            error = overloaded if status == 529 else UpstreamError()
            decision, after = await replica.report_outcome(
                key.hash, SONNET, status=status, headers={}, error=error
            )
            assert not after.is_disabled  # the provider's trouble, not the key's
            return decision.retry_after

        first_wait = await report(first, 529)
        assert first_wait is not None and 0.9 < first_wait <= 1.0
        second_wait = await report(second, 529)  # the second in a row, on the other replica
        assert second_wait is not None and 1.9 < second_wait <= 2.0
        assert await report(second, 200) is None  # a success ends it for both
        again = await report(first, 529)
        assert again is not None and 0.9 < again <= 1.0
    finally:
        await client.aclose()
