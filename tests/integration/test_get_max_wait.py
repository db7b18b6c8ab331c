"""Get with max_wait through a real server on the real clock (waits here are < 1.5 s)."""

from __future__ import annotations

import asyncio
import time

import grpc
import pytest
from google.protobuf.duration_pb2 import Duration
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from keysvc.clock import SystemClock
from keysvc.keys import hash_key
from keysvc.models import ModelTable
from keysvc.pool import KeyPool
from keysvc.v1 import keysvc_pb2 as pb
from tests.helpers import client, error_reason, serving

SECRETS = ["sk-wait-0001", "sk-wait-0002"]


def real_pool() -> KeyPool:
    return KeyPool.from_secrets(SECRETS, models=ModelTable(), clock=SystemClock(), reuse_delay=0.6)


def seconds(value: float) -> Duration:
    duration = Duration()
    duration.FromNanoseconds(int(value * 1e9))
    return duration


async def test_a_locked_pool_answers_when_the_first_key_unlocks() -> None:
    pool = real_pool()
    async with serving(pool) as server, client(server.port) as stub:
        first = await stub.Get(pb.GetRequest(model="gpt-4"))
        await stub.Get(pb.GetRequest(model="gpt-4"))  # both keys throttled for 0.6 s
        started = time.monotonic()
        reply = await stub.Get(pb.GetRequest(model="gpt-4", max_wait=seconds(5)), timeout=10)
        waited = time.monotonic() - started
    assert reply.key.hash == first.key.hash
    assert 0.3 < waited < 2.0, waited


async def test_without_max_wait_get_does_not_wait() -> None:
    pool = real_pool()
    async with serving(pool) as server, client(server.port) as stub:
        for _ in SECRETS:
            await stub.Get(pb.GetRequest(model="gpt-4"))
        started = time.monotonic()
        await stub.Get(pb.GetRequest(model="gpt-4"))
        assert time.monotonic() - started < 0.3


async def test_a_caller_that_gives_up_leaves_no_waiter_behind() -> None:
    pool = KeyPool.from_secrets(SECRETS[:1], models=ModelTable(), clock=SystemClock())
    pool.mark_rate_limited(hash_key(SECRETS[0]), "gpt-4")  # locked 10 s
    async with serving(pool) as server, client(server.port) as stub:
        call = stub.Get(pb.GetRequest(model="gpt-4", max_wait=seconds(30)))
        await asyncio.sleep(0.3)
        call.cancel()
        with pytest.raises(asyncio.CancelledError):
            await call
        for _ in range(50):
            if not pool._queues:
                break
            await asyncio.sleep(0.02)
        assert pool._queues == {}
        assert pool._timer is None
        assert pool.key(hash_key(SECRETS[0])).last_used == 0  # never handed out


async def test_the_wait_ends_before_the_caller_s_deadline() -> None:
    # A deadline equal to max_wait: keysvc answers before the caller has gone (every key
    # still locked: KEYS_BUSY, with when to retry), never for a caller that is gone.
    pool = KeyPool.from_secrets(SECRETS[:1], models=ModelTable(), clock=SystemClock())
    pool.mark_rate_limited(hash_key(SECRETS[0]), "gpt-4")  # locked 10 s
    async with serving(pool) as server, client(server.port) as stub:
        started = time.monotonic()
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await stub.Get(pb.GetRequest(model="gpt-4", max_wait=seconds(1)), timeout=1.0)
        waited = time.monotonic() - started
    assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert error_reason(caught.value) == "KEYS_BUSY"
    assert 0.7 < waited < 1.0, waited
    # The status says when to retry, as a google.rpc.RetryInfo detail.
    status = rpc_status.from_call(caught.value)
    assert status is not None
    retry = [d for d in status.details if d.Is(error_details_pb2.RetryInfo.DESCRIPTOR)]
    assert len(retry) == 1
    info = error_details_pb2.RetryInfo()
    retry[0].Unpack(info)
    assert 8.0 < info.retry_delay.ToTimedelta().total_seconds() <= 9.3
    assert pool.key(hash_key(SECRETS[0])).last_used == 0.0  # nothing was handed out


@pytest.mark.parametrize("max_wait", [-1.0, 60.5])
async def test_max_wait_out_of_range_is_invalid_argument(max_wait: float) -> None:
    pool = real_pool()
    async with serving(pool) as server, client(server.port) as stub:
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await stub.Get(pb.GetRequest(model="gpt-4", max_wait=seconds(max_wait)))
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert error_reason(caught.value) == "INVALID_ARGUMENT"
    assert "max_wait" in (caught.value.details() or "")
