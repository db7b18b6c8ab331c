"""Bearer tokens and roles through a real server."""

from __future__ import annotations

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from keysvc.auth import METHOD_ROLES, SERVICE_PREFIX, AuthTokens, Role
from keysvc.keys import hash_key
from keysvc.server import SERVICE_NAME
from keysvc.v1 import keysvc_pb2 as pb
from keysvc.v1 import keysvc_pb2_grpc
from tests.helpers import error_reason, make_pool, serving

PROXY = "proxy-token-0123456789abcdef"
ADMIN = "admin-token-0123456789abcdef"
TOKENS = AuthTokens(proxy=frozenset({PROXY, "second-proxy-token"}), admin=frozenset({ADMIN}))
SECRET = "sk-auth-test-000000000000000000"
HASH = hash_key(SECRET)
MISSING_HASH = "oai-00000000" if HASH != "oai-00000000" else "oai-11111111"

# Every RPC with a request that succeeds for a caller allowed to make it.
CALLS: dict[str, object] = {
    "Get": pb.GetRequest(model="gpt-4o"),
    "Disable": pb.DisableRequest(hash=HASH, reason=pb.DISABLE_REASON_MANUAL),
    "MarkRateLimited": pb.MarkRateLimitedRequest(hash=HASH),
    "UpdateRateLimits": pb.UpdateRateLimitsRequest(hash=HASH, headers={}),
    "GetLockoutPeriod": pb.GetLockoutPeriodRequest(model="gpt-4o"),
    "IncrementUsage": pb.IncrementUsageRequest(hash=HASH, model="gpt-4o", tokens=5),
    "List": pb.ListRequest(),
    "Available": pb.AvailableRequest(),
    "Recheck": pb.RecheckRequest(),
    "ReportOutcome": pb.ReportOutcomeRequest(hash=HASH, model="gpt-4o", status=200),
}
PROXY_ALLOWED = {
    "Get",
    "Disable",
    "MarkRateLimited",
    "UpdateRateLimits",
    "GetLockoutPeriod",
    "IncrementUsage",
    "Available",
    "ReportOutcome",
}


def _bearer(token: str) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {token}"),)


async def _call(
    stub: keysvc_pb2_grpc.KeyServiceStub, rpc: str, request: object, metadata: object
) -> object:
    return await getattr(stub, rpc)(request, metadata=metadata)


def test_every_rpc_has_a_role_and_proxy_set_is_the_documented_one() -> None:
    rpcs = set(pb.DESCRIPTOR.services_by_name["KeyService"].methods_by_name)
    assert rpcs == set(CALLS)
    for rpc in rpcs:
        assert SERVICE_PREFIX + rpc in METHOD_ROLES
    proxy = {m.removeprefix(SERVICE_PREFIX) for m, r in METHOD_ROLES.items() if r is Role.PROXY}
    assert proxy & rpcs == PROXY_ALLOWED


@pytest.mark.parametrize("rpc", sorted(CALLS))
async def test_roles_per_rpc(rpc: str) -> None:
    pool, _ = make_pool([SECRET])
    async with serving(pool, tokens=TOKENS) as server:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
            stub = keysvc_pb2_grpc.KeyServiceStub(channel)
            request = CALLS[rpc]
            # No token, a garbage token, a wrong scheme: UNAUTHENTICATED.
            for metadata, reason in (
                ((), "MISSING_TOKEN"),
                (_bearer("not-a-token"), "BAD_TOKEN"),
                ((("authorization", f"Basic {ADMIN}"),), "BAD_TOKEN"),
                (_bearer(ADMIN[:-1]), "BAD_TOKEN"),
            ):
                with pytest.raises(grpc.aio.AioRpcError) as exc:
                    await _call(stub, rpc, request, metadata)
                assert exc.value.code() == grpc.StatusCode.UNAUTHENTICATED
                assert error_reason(exc.value) == reason
                assert ADMIN not in (exc.value.details() or "")
            # Proxy token: allowed or PERMISSION_DENIED with ROLE_DENIED.
            if rpc in PROXY_ALLOWED:
                await _call(stub, rpc, request, _bearer(PROXY))
            else:
                with pytest.raises(grpc.aio.AioRpcError) as exc:
                    await _call(stub, rpc, request, _bearer(PROXY))
                assert exc.value.code() == grpc.StatusCode.PERMISSION_DENIED
                assert error_reason(exc.value) == "ROLE_DENIED"
            # Admin token: everything; the scheme name is case-insensitive.
            await _call(stub, rpc, request, (("authorization", f"bearer {ADMIN}"),))
            await _call(stub, rpc, request, _bearer(ADMIN))


async def test_second_proxy_token_works_and_role_checked_before_not_found() -> None:
    pool, _ = make_pool([SECRET])
    async with serving(pool, tokens=TOKENS) as server:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
            stub = keysvc_pb2_grpc.KeyServiceStub(channel)
            await stub.Available(pb.AvailableRequest(), metadata=_bearer("second-proxy-token"))
            # Unknown hash without any token: UNAUTHENTICATED, not NOT_FOUND.
            with pytest.raises(grpc.aio.AioRpcError) as exc:
                await stub.Disable(pb.DisableRequest(hash=MISSING_HASH))
            assert exc.value.code() == grpc.StatusCode.UNAUTHENTICATED
            # With the admin token the same call reaches the pool: NOT_FOUND.
            with pytest.raises(grpc.aio.AioRpcError) as exc:
                await stub.Disable(pb.DisableRequest(hash=MISSING_HASH), metadata=_bearer(ADMIN))
            assert exc.value.code() == grpc.StatusCode.NOT_FOUND


async def test_health_and_reflection_are_open() -> None:
    pool, _ = make_pool([SECRET])
    async with serving(pool, tokens=TOKENS) as server:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
            health = health_pb2_grpc.HealthStub(channel)
            reply = await health.Check(health_pb2.HealthCheckRequest(service=SERVICE_NAME))
            assert reply.status == health_pb2.HealthCheckResponse.SERVING
            reflection = reflection_pb2_grpc.ServerReflectionStub(channel)
            names: list[str] = []
            async for answer in reflection.ServerReflectionInfo(
                iter([reflection_pb2.ServerReflectionRequest(list_services="")])
            ):
                names = [s.name for s in answer.list_services_response.service]
            assert SERVICE_NAME in names


async def test_no_tokens_means_auth_off() -> None:
    pool, _ = make_pool([SECRET])
    async with serving(pool, tokens=AuthTokens()) as server:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
            stub = keysvc_pb2_grpc.KeyServiceStub(channel)
            reply = await stub.List(pb.ListRequest())
            assert [k.hash for k in reply.keys] == [HASH]


def test_role_of_compares_whole_tokens() -> None:
    assert TOKENS.role_of(ADMIN) is Role.ADMIN
    assert TOKENS.role_of(PROXY) is Role.PROXY
    assert TOKENS.role_of(PROXY + "x") is None
    assert TOKENS.role_of("") is None
    both = AuthTokens(proxy=frozenset({"same"}), admin=frozenset({"same"}))
    assert both.role_of("same") is Role.ADMIN
    assert PROXY not in repr(TOKENS) and ADMIN not in repr(TOKENS)
