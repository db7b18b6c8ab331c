"""A state write that fails: the RPC says so (UNAVAILABLE, STATE_WRITE_FAILED), the
change holds in memory, the failure is logged and counted, and KeyService health
and /readyz say NOT_SERVING until a write succeeds.

The failure is SQLite's own: the store's connection is switched to
``query_only``, so every write is refused as on a read-only file system (the
tests run as root, where file permissions do not stop a write).
"""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from keysvc.clock import ManualClock
from keysvc.keys import hash_key
from keysvc.metrics import Metrics
from keysvc.models import ModelTable
from keysvc.pool import KeyPool
from keysvc.server import SERVICE_NAME
from keysvc.state import SqliteStateStore, connect_database
from keysvc.v1 import keysvc_pb2 as pb
from keysvc.v1 import keysvc_pb2_grpc
from tests.exposition import parse, value
from tests.helpers import error_reason

from .observed import fetch, observed_server

SECRETS = [f"sk-write-fail-{n:02d}-cccccccccccccccc" for n in range(3)]
A, B, C = (hash_key(s) for s in SECRETS)


def _disabled_on_disk(path: Path) -> set[str]:
    with contextlib.closing(sqlite3.connect(path)) as reader:
        return {row[0] for row in reader.execute("SELECT hash FROM keys WHERE is_disabled")}


async def test_a_failed_state_write_is_reported_until_a_write_succeeds(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "state.db"
    connections: list[sqlite3.Connection] = []

    def connect(at: Path) -> sqlite3.Connection:
        connections.append(connect_database(at))
        return connections[-1]

    store = SqliteStateStore.open(path, connect=connect, batch_seconds=0.05)
    metrics = Metrics()
    pool = KeyPool(store=store, models=ModelTable(), clock=ManualClock(), observer=metrics)
    for secret in SECRETS:
        pool.add_key(secret)
    await pool.flush()
    store.start()
    (connection,) = connections
    async with (
        observed_server(pool, metrics, state=store) as observed,
        grpc.aio.insecure_channel(f"127.0.0.1:{observed.server.port}") as channel,
    ):
        stub = keysvc_pb2_grpc.KeyServiceStub(channel)
        health = health_pb2_grpc.HealthStub(channel)

        async def health_status() -> int:
            reply = await health.Check(health_pb2.HealthCheckRequest(service=SERVICE_NAME))
            return reply.status

        async def readyz() -> int:
            return (await fetch(observed.base_url + "/readyz"))[0]

        assert await health_status() == health_pb2.HealthCheckResponse.SERVING
        connection.execute("PRAGMA query_only = ON")

        with pytest.raises(grpc.aio.AioRpcError) as disable:
            await stub.Disable(pb.DisableRequest(hash=A, reason=pb.DISABLE_REASON_REVOKED))
        assert disable.value.code() is grpc.StatusCode.UNAVAILABLE
        assert error_reason(disable.value) == "STATE_WRITE_FAILED"
        assert "in memory" in (disable.value.details() or "")
        with pytest.raises(grpc.aio.AioRpcError) as report:
            await stub.ReportOutcome(
                pb.ReportOutcomeRequest(hash=B, model="gpt-4o", status=401)  # revokes B
            )
        assert report.value.code() is grpc.StatusCode.UNAVAILABLE
        assert error_reason(report.value) == "STATE_WRITE_FAILED"

        # Both keys are out of the pool in memory; calls that write nothing now still work.
        assert (await stub.Available(pb.AvailableRequest())).count == 1
        assert (await stub.Get(pb.GetRequest(model="gpt-4o"))).key.hash == C
        await asyncio.sleep(0.01)  # the health update is a task of its own
        assert await health_status() == health_pb2.HealthCheckResponse.NOT_SERVING
        assert await readyz() == 503
        assert (await fetch(observed.base_url + "/healthz"))[0] == 200  # alive: no restart

        def logged() -> int:
            return sum("cannot write the state file" in r.getMessage() for r in caplog.records)

        # The store keeps retrying in the background, so more failures may come while
        # /metrics is fetched: one log line per failure counted, before and after.
        logged_before = logged()
        failures = value(
            parse((await fetch(observed.base_url + "/metrics"))[2]),
            "keysvc_state_write_failures_total",
        )
        assert failures >= 2 and logged_before <= failures <= logged()
        assert _disabled_on_disk(path) == set()

        connection.execute("PRAGMA query_only = OFF")  # the disk has room again
        for _ in range(100):
            if await health_status() == health_pb2.HealthCheckResponse.SERVING:
                break
            await asyncio.sleep(0.02)
        assert await health_status() == health_pb2.HealthCheckResponse.SERVING
        assert await readyz() == 200
        assert _disabled_on_disk(path) == {A, B}
        reply = await stub.Disable(pb.DisableRequest(hash=C, reason=pb.DISABLE_REASON_MANUAL))
        assert reply.key.is_disabled
        assert _disabled_on_disk(path) == {A, B, C}
    await store.close()
