"""Overload through a real server: bursts beyond the in-flight limit are refused with
RESOURCE_EXHAUSTED / OVERLOADED and counted, never CANCELLED; replies a client does not
read hold their slots; idle connections do not lock a good client out."""

from __future__ import annotations

import asyncio
import collections
import contextlib
import resource
import time
from collections.abc import Awaitable, Callable, Iterator
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from bench.hostile import NonReadingClient, close_all, idle_connections
from keysvc.clock import ManualClock
from keysvc.interceptors import Behavior, UnaryInterceptor
from keysvc.metrics import Metrics
from keysvc.models import ModelTable
from keysvc.pool import KeyPool
from keysvc.v1 import keysvc_pb2 as pb
from keysvc.v1 import keysvc_pb2_grpc
from tests.exposition import parse, value
from tests.helpers import error_reason, keysvc_process, make_pool, serving

from .observed import fetch, observed_server

SECRETS = [f"sk-overload-{n:02d}-cccccccccccccccc" for n in range(4)]
GET = "/keysvc.v1.KeyService/Get"
LIST = "/keysvc.v1.KeyService/List"


class Gate(UnaryInterceptor):
    """Holds every KeyService call until opened, so calls stay in flight."""

    def __init__(self) -> None:
        super().__init__()
        self.opened = asyncio.Event()
        self.entered = 0

    def applies_to(self, method: str) -> bool:
        return method.startswith("/keysvc.v1.KeyService/")

    def wrap(self, method: str, behavior: Behavior) -> Behavior:
        async def gated(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
            self.entered += 1
            await self.opened.wait()
            return await behavior(request, context)

        return gated


async def burst(
    port: int, calls: int, channels: int, call: Callable[[Any], Awaitable[object]] | None = None
) -> collections.Counter[str]:
    """``calls`` concurrent Gets over ``channels`` connections; outcome → count."""
    opened = [
        grpc.aio.insecure_channel(
            f"127.0.0.1:{port}", options=[("grpc.use_local_subchannel_pool", 1)]
        )
        for _ in range(channels)
    ]
    stubs = [keysvc_pb2_grpc.KeyServiceStub(channel) for channel in opened]
    outcomes: collections.Counter[str] = collections.Counter()

    async def one(n: int) -> None:
        try:
            await stubs[n % channels].Get(pb.GetRequest(model="gpt-4o"), timeout=60)
            outcomes["OK"] += 1
        except grpc.aio.AioRpcError as error:
            outcomes[f"{error.code().name}/{error_reason(error)}"] += 1

    try:
        for channel in opened:  # connected before the burst
            await channel.channel_ready()
        await asyncio.gather(*(one(n) for n in range(calls)))
    finally:
        for channel in opened:
            await channel.close()
    return outcomes


@pytest.fixture
def metrics_pool() -> tuple[KeyPool, Metrics]:
    metrics = Metrics()
    pool = KeyPool.from_secrets(SECRETS, models=ModelTable(), clock=ManualClock(), observer=metrics)
    return pool, metrics


async def test_a_burst_beyond_the_limit_is_refused_with_overloaded_and_counted(
    metrics_pool: tuple[KeyPool, Metrics],
) -> None:
    pool, metrics = metrics_pool
    gate = Gate()
    server_options = {"interceptors": [gate], "metrics": metrics, "max_in_flight": 100}
    async with serving(pool, **server_options) as server:
        calls = asyncio.ensure_future(burst(server.port, 3_000, 30))
        # Every call gets an answer: the first 100 hold their slots at the gate...
        deadline = time.monotonic() + 60
        while gate.entered < 100 or metrics_total(metrics, "keysvc_overloaded_total") < 2_900:
            assert time.monotonic() < deadline, (
                gate.entered,
                server.limit.in_flight,
                metrics_total(metrics, "keysvc_overloaded_total"),
                metrics_total(metrics, "keysvc_rpcs_total"),
            )
            await asyncio.sleep(0.05)
        assert server.limit.in_flight == 100
        gate.opened.set()
        outcomes = await calls
        # ...and are answered once it opens; slots are given back when the RPCs end.
        for _ in range(100):
            if server.limit.in_flight == 0:
                break
            await asyncio.sleep(0.02)
        assert server.limit.in_flight == 0
    assert outcomes == {"OK": 100, "RESOURCE_EXHAUSTED/OVERLOADED": 2_900}
    samples = parse(scrape(metrics))
    assert value(samples, "keysvc_overloaded_total", method=GET) == 2_900
    assert value(samples, "keysvc_rpcs_total", method=GET, code="RESOURCE_EXHAUSTED") == 2_900
    assert value(samples, "keysvc_in_flight") == 0


def scrape(metrics: Metrics) -> str:
    from prometheus_client import generate_latest

    return generate_latest(metrics.registry).decode()


def metrics_total(metrics: Metrics, name: str) -> float:
    return sum(v for (n, _), v in parse(scrape(metrics)).items() if n == name)


async def test_3000_concurrent_gets_at_the_default_limit_are_never_cancelled() -> None:
    # gRPC's own pending-call queue used to shed ~500 of these as CANCELLED.
    pool, _ = make_pool(SECRETS)
    async with serving(pool) as server:
        outcomes = await burst(server.port, 3_000, 30)
    assert set(outcomes) <= {"OK", "RESOURCE_EXHAUSTED/OVERLOADED"}, outcomes
    assert sum(outcomes.values()) == 3_000


async def test_overloaded_error_says_what_to_do() -> None:
    pool, _ = make_pool(SECRETS)
    gate = Gate()
    async with serving(pool, interceptors=[gate], max_in_flight=1) as server:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
            stub = keysvc_pb2_grpc.KeyServiceStub(channel)
            held = asyncio.ensure_future(stub.Get(pb.GetRequest(model="gpt-4o")))
            while gate.entered < 1:
                await asyncio.sleep(0.01)
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await stub.Available(pb.AvailableRequest())
            # Health is not limited: probes see a live server during an overload.
            health = health_pb2_grpc.HealthStub(channel)
            reply = await health.Check(health_pb2.HealthCheckRequest(service=""))
            assert reply.status == health_pb2.HealthCheckResponse.SERVING
            gate.opened.set()
            await held
    assert refused.value.code() is grpc.StatusCode.RESOURCE_EXHAUSTED
    assert error_reason(refused.value) == "OVERLOADED"
    assert "KEYSVC_MAX_IN_FLIGHT" in (refused.value.details() or "")


async def test_reports_have_room_of_their_own_when_waiting_gets_fill_the_limit() -> None:
    """A server full of waiting Gets still takes the reports that free keys (refused,
    they left the keys' reservations in place and every Get waited for them to lapse)."""
    pool, _ = make_pool(SECRETS)
    gate = Gate()
    async with serving(pool, interceptors=[gate], max_in_flight=1) as server:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
            stub = keysvc_pb2_grpc.KeyServiceStub(channel)
            report = pb.ReportOutcomeRequest(hash=pool.keys()[0].hash, model="gpt-4o", status=200)
            held = [asyncio.ensure_future(stub.Get(pb.GetRequest(model="gpt-4o")))]
            while gate.entered < 1:
                await asyncio.sleep(0.01)
            with pytest.raises(grpc.aio.AioRpcError) as refused_get:
                await stub.Get(pb.GetRequest(model="gpt-4o"))
            held.append(asyncio.ensure_future(stub.ReportOutcome(report)))
            for _ in range(500):
                if gate.entered == 2 or held[1].done():
                    break
                await asyncio.sleep(0.01)
            assert not held[1].done(), held[1].exception()  # let in, not refused
            assert server.limit.in_flight == 2
            # Reports are bounded too: their own room is as large as the limit.
            with pytest.raises(grpc.aio.AioRpcError) as refused_report:
                await stub.MarkRateLimited(pb.MarkRateLimitedRequest(hash=report.hash))
            gate.opened.set()
            await asyncio.gather(*held)
    for refused in (refused_get, refused_report):
        assert refused.value.code() is grpc.StatusCode.RESOURCE_EXHAUSTED
        assert error_reason(refused.value) == "OVERLOADED"


async def test_unread_list_replies_hold_their_slots_until_the_connection_closes(
    metrics_pool: tuple[KeyPool, Metrics],
) -> None:
    pool, metrics = metrics_pool
    async with observed_server(pool, metrics) as observed:
        server = observed.server
        raw = NonReadingClient(server.port)
        try:
            raw.calls(LIST, 8)  # the default KEYSVC_MAX_IN_FLIGHT_LISTS
            for _ in range(200):
                raw.drain()
                if server.limit.in_flight == 8:
                    break
                await asyncio.sleep(0.01)
            # The handlers are done; the replies wait for a window that never opens.
            await asyncio.sleep(0.2)
            assert server.limit.in_flight == 8
            async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
                stub = keysvc_pb2_grpc.KeyServiceStub(channel)
                with pytest.raises(grpc.aio.AioRpcError) as refused:
                    await stub.List(pb.ListRequest())
                assert refused.value.code() is grpc.StatusCode.RESOURCE_EXHAUSTED
                assert error_reason(refused.value) == "OVERLOADED"
                assert "KEYSVC_MAX_IN_FLIGHT_LISTS" in (refused.value.details() or "")
                # Other calls still have room.
                await stub.Get(pb.GetRequest(model="gpt-4o"))
                raw.close()
                for _ in range(200):
                    if server.limit.in_flight == 0:
                        break
                    await asyncio.sleep(0.02)
                assert server.limit.in_flight == 0
                assert len((await stub.List(pb.ListRequest())).keys) == len(SECRETS)
        finally:
            raw.close()
        _, _, text = await fetch(observed.base_url + "/metrics")
    assert value(parse(text), "keysvc_overloaded_total", method=LIST) == 1


@contextlib.contextmanager
def open_files_soft_limit(limit: int) -> Iterator[None]:
    """This process's soft RLIMIT_NOFILE is ``limit`` inside (children inherit it)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (limit, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


async def test_idle_connections_do_not_stop_a_good_clients_gets() -> None:
    # The server starts with the usual soft limit of 1,024 open files; with it, this
    # many idle connections left no descriptor for a good client.
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    idle_target = 2_000 if hard == resource.RLIM_INFINITY else min(2_000, hard - 300)
    assert idle_target > 1_100, "the hard open-files limit is too low for this test"
    env = {"OPENAI_KEY": ",".join(SECRETS)}
    with contextlib.ExitStack() as stack:
        with open_files_soft_limit(1_024):
            child = stack.enter_context(keysvc_process(env=env))
        # This process opens the idle connections: it needs the descriptors.
        stack.enter_context(open_files_soft_limit(idle_target + 300))
        started = time.monotonic()
        idle = idle_connections(child.port, idle_target)
        try:
            assert len(idle) == idle_target, f"opened {len(idle)} in {time.monotonic() - started}"
            await asyncio.sleep(1)  # the server has accepted them all
            async with grpc.aio.insecure_channel(f"127.0.0.1:{child.port}") as channel:
                stub = keysvc_pb2_grpc.KeyServiceStub(channel)
                for _ in range(20):
                    reply = await stub.Get(pb.GetRequest(model="gpt-4o"), timeout=5)
                    assert reply.secret in SECRETS
            with open(f"/proc/{child.process.pid}/limits", encoding="ascii") as limits:
                line = next(row for row in limits if row.startswith("Max open files"))
            assert int(line.split()[3]) > 1_024
        finally:
            close_all(idle)
        code, _ = child.stop()
    assert code == 0
    assert "raised the open files limit" in child.startup_log
