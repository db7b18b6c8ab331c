"""Drain on shutdown: NOT_SERVING at once, new calls UNAVAILABLE, in-flight calls finish."""

from __future__ import annotations

import asyncio
import contextlib
import signal
import sqlite3
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from keysvc.clock import ManualClock
from keysvc.interceptors import wrap_unary
from keysvc.keys import hash_key
from keysvc.models import ModelTable
from keysvc.pool import KeyPool
from keysvc.server import SERVICE_NAME, create_server
from keysvc.state import SqliteStateStore
from keysvc.v1 import keysvc_pb2 as pb
from keysvc.v1 import keysvc_pb2_grpc
from tests.helpers import error_reason
from tests.procs import ServerProcess

SECRET = "sk-drain-000000000000000000000"
HASH = hash_key(SECRET)


class HoldIncrementUsage(grpc.aio.ServerInterceptor):
    """Test-only: IncrementUsage calls wait for ``release`` before reaching the pool."""

    def __init__(self) -> None:
        self.entered = asyncio.Event()
        self.release = asyncio.Event()

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[Any]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> Any:
        handler = await continuation(handler_call_details)
        if not handler_call_details.method.endswith("/IncrementUsage"):
            return handler

        def hold(behavior: Any) -> Any:
            async def held(request: Any, context: Any) -> Any:
                self.entered.set()
                await self.release.wait()
                return await behavior(request, context)

            return held

        return wrap_unary(handler, hold)


def _saved(state: Path, *columns: str) -> tuple[object, ...]:
    """``columns`` of the key's row in the state database."""
    with contextlib.closing(sqlite3.connect(state)) as reader:
        row = reader.execute(f"SELECT {', '.join(columns)} FROM keys WHERE hash = ?", (HASH,))
        return tuple(row.fetchone())


async def _health(channel: grpc.aio.Channel) -> int:
    stub = health_pb2_grpc.HealthStub(channel)
    reply = await stub.Check(health_pb2.HealthCheckRequest(service=SERVICE_NAME), timeout=5)
    return reply.status


async def test_shutdown_drains_calls_in_flight_and_writes_state(tmp_path: Path) -> None:
    state = tmp_path / "state.db"
    store = SqliteStateStore.open(state)
    pool = KeyPool(store=store, models=ModelTable(), clock=ManualClock())
    pool.add_key(SECRET)
    hold = HoldIncrementUsage()
    server = create_server(pool, port=0, interceptors=[hold])
    await server.start()
    async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        stub = keysvc_pb2_grpc.KeyServiceStub(channel)
        assert await _health(channel) == health_pb2.HealthCheckResponse.SERVING
        in_flight = asyncio.ensure_future(
            stub.IncrementUsage(
                pb.IncrementUsageRequest(hash=HASH, model="gpt-4o", tokens=42), timeout=20
            )
        )
        await asyncio.wait_for(hold.entered.wait(), 5)
        stopping = asyncio.ensure_future(server.shutdown(grace=10))
        await asyncio.sleep(0.1)

        # At once: NOT_SERVING, and new KeyService calls are refused.
        assert await _health(channel) == health_pb2.HealthCheckResponse.NOT_SERVING
        with pytest.raises(grpc.aio.AioRpcError) as exc:
            await stub.Available(pb.AvailableRequest(), timeout=5)
        assert exc.value.code() == grpc.StatusCode.UNAVAILABLE
        assert error_reason(exc.value) == "SHUTTING_DOWN"
        assert not stopping.done() and not in_flight.done()

        # The call in flight finishes normally, then the server stops.
        hold.release.set()
        await asyncio.wait_for(in_flight, 5)
        await asyncio.wait_for(stopping, 5)
    assert _saved(state, "token_usage", "prompt_count") == ('{"gpt4o": 42}', 1)


async def test_grace_period_ends_calls_that_do_not_finish() -> None:
    pool = KeyPool.from_secrets([SECRET], models=ModelTable(), clock=ManualClock())
    hold = HoldIncrementUsage()
    server = create_server(pool, port=0, interceptors=[hold])
    await server.start()
    async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        stub = keysvc_pb2_grpc.KeyServiceStub(channel)
        in_flight = asyncio.ensure_future(
            stub.IncrementUsage(pb.IncrementUsageRequest(hash=HASH, model="gpt-4o", tokens=1))
        )
        await asyncio.wait_for(hold.entered.wait(), 5)
        started = time.monotonic()
        await asyncio.wait_for(server.shutdown(grace=0.5), 5)
        assert 0.4 <= time.monotonic() - started < 4
        with pytest.raises(grpc.aio.AioRpcError):
            await asyncio.wait_for(in_flight, 5)


def test_sigterm_exits_0_and_writes_batched_state(tmp_path: Path) -> None:
    state = tmp_path / "state.db"
    server = ServerProcess({"OPENAI_KEY": SECRET, "KEYSVC_STATE_FILE": str(state)})
    try:
        port = server.wait_serving()
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = keysvc_pb2_grpc.KeyServiceStub(channel)
            stub.IncrementUsage(pb.IncrementUsageRequest(hash=HASH, model="o3", tokens=9))
        # Inside the batch window: only the shutdown write can have it.
        server.signal(signal.SIGTERM)
        assert server.wait_exit() == 0
        server.wait_for_log("shutting down")
        server.wait_for_log("stopped")
    finally:
        server.stop()
    assert _saved(state, "token_usage") == ('{"o3": 9}',)
