"""The status page and /metrics over a shared pool: the pool's counts come from Redis
(the census), the RPC and failure counters are each replica's own."""

from __future__ import annotations

import asyncio
import os
import signal
import sys

import pytest
import redis.asyncio as aioredis

from keysvc.errors import StoreUnavailable
from keysvc.keys import DisableReason, hash_key
from keysvc.models import ModelTable
from keysvc.pool.redis import RedisBackend
from keysvc.status import PoolSnapshot
from keysvc.v1 import keysvc_pb2 as pb
from tests.exposition import parse, value
from tests.helpers import client
from tests.redis_server import RedisServer, free_port, two_replicas

from .observed import fetch
from .test_serve_http_port import wait_ready

SECRETS = [f"sk-census-{i:02d}" for i in range(4)]


def _family(snapshot: PoolSnapshot, family: str) -> dict[str, int]:
    return next(s.counts for s in snapshot.summaries if s.family == family)


async def test_the_census_counts_the_shared_pool(
    redis_server: RedisServer, redis_prefix: str
) -> None:
    client_a = aioredis.Redis.from_url(redis_server.url)
    try:
        first, second = two_replicas(client_a, redis_prefix)
        for backend in (first, second):
            await backend.add_keys(SECRETS)
        # On one replica: two Gets for gpt-4 (two keys locked in gpt4 only), one key
        # revoked, 100 tokens of gpt-4.
        handed = [await first.get("gpt-4") for _ in range(2)]
        revoked = next(h for h in map(hash_key, SECRETS) if h not in {k.hash for k in handed})
        await first.disable(revoked, DisableReason.REVOKED)
        await first.increment_usage(handed[0].hash, "gpt-4", 100)

        # The other replica's census sees it all.
        snapshot = await second.census(listed=10)
        assert snapshot.total_keys == 4
        gpt4 = _family(snapshot, "gpt4")
        assert (gpt4["active"], gpt4["locked"], gpt4["disabled"]) == (1, 2, 1)
        assert (gpt4["revoked"], gpt4["over_quota"], gpt4["trial"]) == (1, 0, 0)
        turbo = _family(snapshot, "turbo")
        assert (turbo["active"], turbo["locked"], turbo["disabled"]) == (3, 0, 1)
        by_family = {s.family: s for s in snapshot.summaries}
        assert by_family["gpt4"].tokens == 100 and by_family["gpt4"].lockout == 0.0
        assert snapshot.providers == {
            "openai": {
                "active": 1, "locked": 2, "trial": 0, "disabled": 1, "revoked": 1,
                "over_quota": 0,
            }
        }  # fmt: skip
        lists = {listed.state: listed for listed in snapshot.lists}
        assert [k.hash for k in lists["disabled"].keys] == [revoked]
        assert {k.hash for k in lists["locked"].keys} == {k.hash for k in handed}
        assert lists["active"].count == 1 and len(lists["active"].keys) == 1

        # The last free gpt4 key handed out: the family's lockout is the first unlock.
        await second.get("gpt-4")
        snapshot = await first.census()
        gpt4_summary = next(s for s in snapshot.summaries if s.family == "gpt4")
        assert gpt4_summary.counts["active"] == 0 and gpt4_summary.counts["locked"] == 3
        assert 0.0 < (gpt4_summary.lockout or 0.0) <= 1.0
        assert snapshot.lists == ()
    finally:
        await client_a.aclose()


async def test_the_census_counts_each_provider_s_keys_apart(
    redis_server: RedisServer, redis_prefix: str
) -> None:
    client_a = aioredis.Redis.from_url(redis_server.url)
    anthropic = ["sk-ant-census-0", "sk-ant-census-1", "sk-ant-census-2"]
    try:
        first, second = two_replicas(client_a, redis_prefix)
        for backend in (first, second):
            await backend.add_keys([*SECRETS, *anthropic])
        # One Claude key handed out (locked in its family), one over quota; an OpenAI
        # key handed out for gpt-4.
        handed = await first.get("claude-sonnet-4-5")
        await first.get("gpt-4")
        benched = next(h for h in map(hash_key, anthropic) if h != handed.hash)
        await first.disable(benched, DisableReason.QUOTA)
        snapshot = await second.census()
        assert snapshot.total_keys == 7
        assert snapshot.providers == {
            "openai": {
                "active": 3, "locked": 1, "trial": 0, "disabled": 0, "revoked": 0,
                "over_quota": 0,
            },
            "anthropic": {
                "active": 1, "locked": 1, "trial": 0, "disabled": 1, "revoked": 0,
                "over_quota": 1,
            },
        }  # fmt: skip
        sonnet = _family(snapshot, "claude-sonnet")
        assert (sonnet["active"], sonnet["locked"], sonnet["disabled"]) == (1, 1, 1)
    finally:
        await client_a.aclose()


async def test_failed_redis_calls_are_counted_by_problem() -> None:
    port = free_port()  # nothing listens there
    failures: list[str] = []
    client_a = aioredis.Redis.from_url(f"redis://127.0.0.1:{port}/0")
    backend = RedisBackend(client_a, models=ModelTable(), timeout=1.0, on_failure=failures.append)
    try:
        with pytest.raises(StoreUnavailable):
            # Registering the replica's keys is its first call to Redis (the pool's other
            # calls refuse without one, before any call is made).
            await backend.add_keys(["sk-counted"])
        assert failures == ["connection"]
    finally:
        await client_a.aclose()


async def _serve(url: str, prefix: str) -> tuple[asyncio.subprocess.Process, int, str]:
    grpc_port, http_port = free_port(), free_port()
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith(("KEYSVC_", "OPENAI_"))},
        "OPENAI_KEY": ",".join(SECRETS),
        "KEYSVC_REDIS_URL": url,
        "KEYSVC_REDIS_PREFIX": prefix,
        "KEYSVC_REDIS_TIMEOUT": "2s",
        "KEYSVC_METRICS_PORT": str(http_port),
    }
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "keysvc", "serve", "--port", str(grpc_port),
        "--no-check-keys", "--shutdown-grace", "2",
        env=env, stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    base = f"http://127.0.0.1:{http_port}"
    await wait_ready(base + "/readyz", process)
    return process, grpc_port, base


async def test_two_replicas_show_the_shared_pool_and_their_own_rpcs(
    redis_server: RedisServer, redis_prefix: str
) -> None:
    started = []
    try:
        for _ in range(2):
            started.append(await _serve(redis_server.url, redis_prefix))
        (_, port_a, base_a), (_, _, base_b) = started
        async with client(port_a) as stub:
            got = await stub.Get(pb.GetRequest(model="gpt-4"))
            await stub.Disable(
                pb.DisableRequest(
                    hash=next(h for h in map(hash_key, SECRETS) if h != got.key.hash),
                    reason=pb.DISABLE_REASON_REVOKED,
                )
            )
        status, _, text = await fetch(base_b + "/metrics")
        assert status == 200
        seen_b = parse(text)
        # The pool's state, as the other replica sees it in Redis.
        assert value(seen_b, "keysvc_keys", family="gpt4", state="locked") == 1
        assert value(seen_b, "keysvc_keys", family="gpt4", state="active") == 2
        assert value(seen_b, "keysvc_keys", family="gpt4", state="revoked") == 1
        assert value(seen_b, "keysvc_provider_keys", provider="openai", state="disabled") == 1
        # Each replica's own RPCs and Redis failures.
        get = "/keysvc.v1.KeyService/Get"
        assert ("keysvc_rpcs_total", (("code", "OK"), ("method", get))) not in seen_b
        assert value(seen_b, "keysvc_redis_failures_total", problem="timeout") == 0
        seen_a = parse((await fetch(base_a + "/metrics"))[2])
        assert value(seen_a, "keysvc_rpcs_total", method=get, code="OK") == 1
        status, _, page = await fetch(base_b + "/")
        assert status == 200
        assert got.key.hash in page and "4 keys" in page
        assert all(secret not in page and secret not in text for secret in SECRETS)
    finally:
        for process, _, _ in started:
            if process.returncode is None:
                process.send_signal(signal.SIGTERM)
                _, stderr = await asyncio.wait_for(process.communicate(), timeout=30)
                assert process.returncode == 0, stderr.decode()[-2000:]
