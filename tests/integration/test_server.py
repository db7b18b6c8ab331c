"""Every RPC and every status code through a real server and a real channel."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from keysvc.clock import ManualClock
from keysvc.keys import hash_key
from keysvc.models import ModelTable
from keysvc.pool import KeyPool
from keysvc.server import SERVICE_NAME, KeysvcServer
from keysvc.v1 import keysvc_pb2 as pb
from keysvc.v1 import keysvc_pb2_grpc
from tests.helpers import client, error_reason, make_pool, serving

SECRETS = ["sk-alpha-0001", "sk-bravo-0002", "sk-charlie-0003"]


@pytest.fixture
async def running() -> AsyncIterator[tuple[KeysvcServer, KeyPool, ManualClock]]:
    pool, clock = make_pool(SECRETS, allowed_families=None)
    async with serving(pool) as server:
        yield server, pool, clock


@pytest.fixture
async def stub(
    running: tuple[KeysvcServer, KeyPool, ManualClock],
) -> AsyncIterator[keysvc_pb2_grpc.KeyServiceStub]:
    async with client(running[0].port) as stub:
        yield stub


async def expect_error(call: Any, code: grpc.StatusCode, reason: str) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await call
    assert caught.value.code() == code, caught.value.details()
    assert error_reason(caught.value) == reason
    return caught.value


# -- every RPC -------------------------------------------------------------------


async def test_get_returns_secret_and_public_key(stub: keysvc_pb2_grpc.KeyServiceStub) -> None:
    reply = await stub.Get(pb.GetRequest(model="gpt-4o"))
    assert reply.secret == SECRETS[0]
    assert reply.key.hash == hash_key(SECRETS[0])
    assert reply.key.service == "openai"
    assert "gpt4o" in reply.key.model_families and "gpt4-32k" not in reply.key.model_families
    assert reply.key.HasField("last_used")
    until = reply.key.rate_limited_until.ToNanoseconds() - reply.key.last_used.ToNanoseconds()
    assert until == 1_000_000_000


async def test_key_message_has_no_secret_field() -> None:
    assert "secret" not in pb.Key.DESCRIPTOR.fields_by_name
    assert [f.name for f in pb.GetResponse.DESCRIPTOR.fields] == ["secret", "key"]


async def test_gets_rotate_across_keys(stub: keysvc_pb2_grpc.KeyServiceStub) -> None:
    hashes = [(await stub.Get(pb.GetRequest(model="gpt-4"))).key.hash for _ in SECRETS]
    assert hashes == [hash_key(s) for s in SECRETS]


async def test_disable_and_available(stub: keysvc_pb2_grpc.KeyServiceStub) -> None:
    target = hash_key(SECRETS[0])
    reply = await stub.Disable(pb.DisableRequest(hash=target, reason=pb.DISABLE_REASON_REVOKED))
    assert reply.key.is_disabled and reply.key.is_revoked
    assert reply.key.disable_reason == pb.DISABLE_REASON_REVOKED
    assert reply.key.HasField("disabled_at")
    assert (await stub.Available(pb.AvailableRequest())).count == 2
    for _ in range(6):
        assert (await stub.Get(pb.GetRequest(model="gpt-4"))).key.hash != target


async def test_rate_limits_and_lockout(
    stub: keysvc_pb2_grpc.KeyServiceStub, running: tuple[KeysvcServer, KeyPool, ManualClock]
) -> None:
    _, _, clock = running
    for secret in SECRETS:
        await stub.MarkRateLimited(pb.MarkRateLimitedRequest(hash=hash_key(secret)))
        clock.advance(1)
    await stub.UpdateRateLimits(
        pb.UpdateRateLimitsRequest(
            hash=hash_key(SECRETS[0]),
            headers={"x-ratelimit-reset-requests": "1m30s", "x-ratelimit-reset-tokens": "20ms"},
        )
    )
    # First key: 429 at t=0, resets clamped to 10 s → free at t=10; now t=3.
    reply = await stub.GetLockoutPeriod(pb.GetLockoutPeriodRequest(model="gpt-4"))
    assert reply.lockout.ToMilliseconds() == 7000
    empty_model = await stub.GetLockoutPeriod(pb.GetLockoutPeriodRequest())
    assert empty_model.lockout == reply.lockout
    listed = {k.hash: k for k in (await stub.List(pb.ListRequest())).keys}
    first = listed[hash_key(SECRETS[0])]
    assert first.rate_limit_requests_reset.ToMilliseconds() == 10_000
    assert first.rate_limit_tokens_reset.ToMilliseconds() == 20


async def test_increment_usage_and_list(stub: keysvc_pb2_grpc.KeyServiceStub) -> None:
    target = hash_key(SECRETS[1])
    await stub.IncrementUsage(pb.IncrementUsageRequest(hash=target, model="gpt-4o", tokens=120))
    await stub.IncrementUsage(
        pb.IncrementUsageRequest(hash=target, model="gpt-3.5-turbo", tokens=3)
    )
    keys = (await stub.List(pb.ListRequest())).keys
    assert [k.hash for k in keys] == [hash_key(s) for s in SECRETS]
    (listed,) = [k for k in keys if k.hash == target]
    assert dict(listed.token_usage) == {"gpt4o": 120, "turbo": 3}
    assert listed.prompt_count == 2
    assert not listed.HasField("last_used")


async def test_recheck_revives_disabled_keys(stub: keysvc_pb2_grpc.KeyServiceStub) -> None:
    for secret in SECRETS:
        await stub.Disable(pb.DisableRequest(hash=hash_key(secret)))
    assert (await stub.Available(pb.AvailableRequest())).count == 0
    await stub.Recheck(pb.RecheckRequest())
    assert (await stub.Available(pb.AvailableRequest())).count == 3
    keys = (await stub.List(pb.ListRequest())).keys
    assert not any(k.is_disabled or k.HasField("last_checked") for k in keys)


async def test_list_never_carries_a_secret(stub: keysvc_pb2_grpc.KeyServiceStub) -> None:
    await stub.Get(pb.GetRequest(model="gpt-4"))
    raw = (await stub.List(pb.ListRequest())).SerializeToString()
    assert not any(secret.encode() in raw for secret in SECRETS)


# -- every status code ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("method", "request_"),
    [
        ("Get", pb.GetRequest()),
        ("Get", pb.GetRequest(model="x" * 300)),
        ("Disable", pb.DisableRequest()),
        ("Disable", pb.DisableRequest(hash=hash_key(SECRETS[0]), reason=42)),  # type: ignore[arg-type]
        ("MarkRateLimited", pb.MarkRateLimitedRequest(hash="")),
        (
            "UpdateRateLimits",
            pb.UpdateRateLimitsRequest(hash=hash_key(SECRETS[0]), headers={"a": "b" * 10_000}),
        ),
        (
            "IncrementUsage",
            pb.IncrementUsageRequest(hash=hash_key(SECRETS[0]), model="gpt-4", tokens=-5),
        ),
        ("IncrementUsage", pb.IncrementUsageRequest(hash=hash_key(SECRETS[0]), tokens=5)),
    ],
)
async def test_bad_input_is_invalid_argument(
    stub: keysvc_pb2_grpc.KeyServiceStub, method: str, request_: Any
) -> None:
    error = await expect_error(
        getattr(stub, method)(request_), grpc.StatusCode.INVALID_ARGUMENT, "INVALID_ARGUMENT"
    )
    assert error.details()


async def test_a_secret_sent_as_hash_is_not_echoed(stub: keysvc_pb2_grpc.KeyServiceStub) -> None:
    error = await expect_error(
        stub.Disable(pb.DisableRequest(hash=SECRETS[0])),
        grpc.StatusCode.INVALID_ARGUMENT,
        "INVALID_ARGUMENT",
    )
    assert SECRETS[0] not in (error.details() or "")
    assert SECRETS[0] not in str(error.trailing_metadata())


async def test_unknown_hash_is_not_found(stub: keysvc_pb2_grpc.KeyServiceStub) -> None:
    for call in (
        stub.Disable(pb.DisableRequest(hash="oai-00000000")),
        stub.MarkRateLimited(pb.MarkRateLimitedRequest(hash="oai-00000000")),
        stub.UpdateRateLimits(pb.UpdateRateLimitsRequest(hash="oai-00000000")),
        stub.IncrementUsage(pb.IncrementUsageRequest(hash="oai-00000000", model="gpt-4")),
    ):
        await expect_error(call, grpc.StatusCode.NOT_FOUND, "KEY_NOT_FOUND")


async def test_an_unknown_model_is_invalid_argument_naming_it_in_every_rpc(
    running: tuple[KeysvcServer, KeyPool, ManualClock],
    stub: keysvc_pb2_grpc.KeyServiceStub,
) -> None:
    # The seed served unknown names from gpt4; now they are refused (KEYSVC_UNKNOWN_MODELS
    # decides otherwise), before anything changes: no key is handed out or touched.
    _, pool, _ = running
    key_hash = hash_key(SECRETS[0])
    model = "gtp-4o"
    waiting = pb.GetRequest(model=model)
    waiting.max_wait.FromMilliseconds(200)
    for call in (
        stub.Get(pb.GetRequest(model=model)),
        stub.Get(waiting),
        stub.GetLockoutPeriod(pb.GetLockoutPeriodRequest(model=model)),
        stub.MarkRateLimited(pb.MarkRateLimitedRequest(hash=key_hash, model=model)),
        stub.UpdateRateLimits(
            pb.UpdateRateLimitsRequest(
                hash=key_hash, model=model, headers={"x-ratelimit-remaining-requests": "0"}
            )
        ),
        stub.IncrementUsage(pb.IncrementUsageRequest(hash=key_hash, model=model, tokens=5)),
        stub.ReportOutcome(pb.ReportOutcomeRequest(hash=key_hash, model=model, status=200)),
    ):
        error = await expect_error(call, grpc.StatusCode.INVALID_ARGUMENT, "UNKNOWN_MODEL")
        assert f"unknown model {model!r}" in (error.details() or "")
    assert all(k.last_used == 0 and k.prompt_count == 0 for k in pool.keys())
    assert all(not k.family_states() and k.wide is None for k in pool.keys())


async def test_no_usable_key_is_failed_precondition_naming_the_family(
    stub: keysvc_pb2_grpc.KeyServiceStub,
) -> None:
    error = await expect_error(
        stub.Get(pb.GetRequest(model="gpt-4-32k")),
        grpc.StatusCode.FAILED_PRECONDITION,
        "NO_KEYS_FOR_FAMILY",
    )
    assert "gpt4-32k" in (error.details() or "")
    for secret in SECRETS:
        await stub.Disable(pb.DisableRequest(hash=hash_key(secret)))
    await expect_error(
        stub.Get(pb.GetRequest(model="gpt-4")),
        grpc.StatusCode.FAILED_PRECONDITION,
        "NO_KEYS_FOR_FAMILY",
    )


async def test_disallowed_family_is_permission_denied() -> None:
    pool, _ = make_pool(SECRETS, allowed_families=frozenset({"turbo"}))
    async with serving(pool) as server, client(server.port) as stub:
        assert (await stub.Get(pb.GetRequest(model="gpt-3.5-turbo"))).secret
        error = await expect_error(
            stub.Get(pb.GetRequest(model="gpt-4o")),
            grpc.StatusCode.PERMISSION_DENIED,
            "FAMILY_DISALLOWED",
        )
        assert "gpt4o" in (error.details() or "")


async def test_unexpected_errors_are_internal_never_unknown(
    caplog: pytest.LogCaptureFixture,
) -> None:
    class BrokenPool(KeyPool):
        def available(self) -> int:
            raise RuntimeError("boom: internal detail")

    pool = BrokenPool.from_secrets(SECRETS, models=ModelTable(), clock=ManualClock())
    async with serving(pool) as server, client(server.port) as stub:
        error = await expect_error(
            stub.Available(pb.AvailableRequest()), grpc.StatusCode.INTERNAL, "INTERNAL"
        )
        assert "boom" not in (error.details() or "")
        # The server is still fine afterwards.
        assert (await stub.Get(pb.GetRequest(model="gpt-4"))).secret
    assert "boom: internal detail" in caplog.text


# -- concurrency -------------------------------------------------------------------


async def test_64_concurrent_gets_hand_out_64_distinct_keys() -> None:
    secrets = [f"sk-concurrent-{i:03d}" for i in range(64)]
    pool, _ = make_pool(secrets)
    async with serving(pool) as server, client(server.port) as stub:
        replies = await asyncio.gather(*(stub.Get(pb.GetRequest(model="gpt-4")) for _ in range(64)))
    assert len({r.key.hash for r in replies}) == 64
    assert {r.secret for r in replies} == set(secrets)


# -- health and reflection -----------------------------------------------------------


async def test_health_reports_serving(running: tuple[KeysvcServer, KeyPool, ManualClock]) -> None:
    server = running[0]
    async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        health = health_pb2_grpc.HealthStub(channel)
        for service in ("", SERVICE_NAME):
            reply = await health.Check(health_pb2.HealthCheckRequest(service=service))
            assert reply.status == health_pb2.HealthCheckResponse.SERVING
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await health.Check(health_pb2.HealthCheckRequest(service="no.such.Service"))
        assert caught.value.code() == grpc.StatusCode.NOT_FOUND


async def test_reflection_lists_and_describes_the_service(
    running: tuple[KeysvcServer, KeyPool, ManualClock],
) -> None:
    server = running[0]
    async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        stub = reflection_pb2_grpc.ServerReflectionStub(channel)

        async def ask(request: reflection_pb2.ServerReflectionRequest) -> Any:
            call = stub.ServerReflectionInfo()
            await call.write(request)
            await call.done_writing()
            return await call.read()

        listed = await ask(reflection_pb2.ServerReflectionRequest(list_services=""))
        names = {s.name for s in listed.list_services_response.service}
        assert {SERVICE_NAME, "grpc.health.v1.Health"} <= names
        described = await ask(
            reflection_pb2.ServerReflectionRequest(file_containing_symbol=SERVICE_NAME)
        )
        protos = described.file_descriptor_response.file_descriptor_proto
        assert any(b"keysvc/v1/keysvc.proto" in p for p in protos)


# -- shutdown ------------------------------------------------------------------------


class _SlowGet(grpc.aio.ServerInterceptor):
    """Holds every Get for a while so a shutdown finds it in flight."""

    def __init__(self, delay: float) -> None:
        self.delay = delay
        self.entered = asyncio.Event()

    async def intercept_service(self, continuation: Any, details: Any) -> Any:
        handler = await continuation(details)
        if not details.method.endswith("/Get"):
            return handler
        inner = handler.unary_unary

        async def slow(request: Any, context: Any) -> Any:
            self.entered.set()
            await asyncio.sleep(self.delay)
            return await inner(request, context)

        return grpc.unary_unary_rpc_method_handler(
            slow,
            request_deserializer=handler.request_deserializer,
            response_serializer=handler.response_serializer,
        )


async def test_shutdown_drains_in_flight_calls_and_refuses_new_ones() -> None:
    pool, _ = make_pool(SECRETS)
    slow = _SlowGet(delay=0.5)
    async with serving(pool, interceptors=[slow]) as server:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
            stub = keysvc_pb2_grpc.KeyServiceStub(channel)
            health = health_pb2_grpc.HealthStub(channel)
            watch = health.Watch(health_pb2.HealthCheckRequest(service=SERVICE_NAME))
            assert (await watch.read()).status == health_pb2.HealthCheckResponse.SERVING
            in_flight = asyncio.ensure_future(stub.Get(pb.GetRequest(model="gpt-4")))
            await slow.entered.wait()
            shutdown = asyncio.ensure_future(server.shutdown(grace=5))
            assert (await watch.read()).status == health_pb2.HealthCheckResponse.NOT_SERVING
            reply = await in_flight
            assert reply.secret == SECRETS[0]
            await shutdown
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await stub.Available(pb.AvailableRequest(), timeout=2)
            assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
