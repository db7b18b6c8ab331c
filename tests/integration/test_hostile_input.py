"""Generated hostile requests against a real server process.

Hypothesis builds batches of requests for every RPC (odd models, hashes,
headers, token counts, reasons, credentials) and fires each batch
concurrently. Every answer must have a documented status, never UNKNOWN or
INTERNAL; the server must stay up; and the pool must still be sound after.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

import grpc
from google.rpc import error_details_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_status import rpc_status
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from keysvc.keys import hash_key
from keysvc.pool import Limits
from keysvc.server import SERVICE_NAME
from keysvc.v1 import keysvc_pb2 as pb
from keysvc.v1 import keysvc_pb2_grpc
from tests.procs import ServerProcess

SECRETS = [f"sk-fuzz-{i:02d}-{'x' * 24}" for i in range(12)]
HASHES = [hash_key(s) for s in SECRETS]
PROXY, ADMIN = "fuzz-proxy-token", "fuzz-admin-token"
ALLOWED = "turbo,gpt4o,gpt4,gpt4-turbo,gpt4-32k,gpt41,gpt5,o3"
ADMIN_ONLY = {"List", "Recheck"}
# Every status a KeyService call may end with, by design.
DOCUMENTED = {
    grpc.StatusCode.OK,
    grpc.StatusCode.INVALID_ARGUMENT,
    grpc.StatusCode.NOT_FOUND,
    grpc.StatusCode.FAILED_PRECONDITION,
    grpc.StatusCode.PERMISSION_DENIED,
    grpc.StatusCode.UNAUTHENTICATED,
    # Only for a message over Limits.MESSAGE_BYTES, refused by gRPC before decoding.
    grpc.StatusCode.RESOURCE_EXHAUSTED,
}
BATCHES = int(os.environ.get("KEYSVC_FUZZ_BATCHES", "225"))
MIN_BATCH = 45

_models = st.one_of(
    st.sampled_from(
        [
            "gpt-4o",
            "gpt-4o-mini",
            "gpt-4",
            "gpt-4-32k",
            "gpt-3.5-turbo",
            "text-embedding-3-small",
            "dall-e-3",
            "o1-preview",
            "o3",
            "",
            "gpt-5",
        ]
    ),
    st.text(max_size=40),
    st.builds(lambda n: "m" * n, st.integers(Limits.MODEL_LENGTH - 2, Limits.MODEL_LENGTH + 2)),
)
_hashes = st.one_of(
    st.sampled_from(HASHES),
    st.sampled_from(HASHES),
    st.from_regex(r"\A[a-z]{1,3}-[0-9a-f]{8}\Z"),
    st.text(max_size=24),
    st.sampled_from(SECRETS),  # a secret sent by mistake must never be echoed
)
_header_names = st.one_of(
    st.sampled_from(
        ["x-ratelimit-reset-requests", "x-ratelimit-reset-tokens", "X-RateLimit-Reset-Tokens"]
    ),
    st.text(max_size=12),
    st.builds(lambda n: "h" * n, st.integers(250, 260)),
)
_header_values = st.one_of(
    st.sampled_from(["1s", "20ms", "6m0s", "1h2m3s", "21.0032s", "1s500ms", "-1s", "", "1e309s"]),
    st.text(max_size=12),
    st.builds(lambda n: "v" * n, st.integers(4090, 4100)),
)
_headers = st.one_of(
    st.dictionaries(_header_names, _header_values, max_size=4),
    st.builds(
        lambda n: {f"h{i}": "1s" for i in range(n)},
        st.integers(Limits.HEADER_COUNT - 2, Limits.HEADER_COUNT + 2),
    ),
)
_tokens = st.one_of(
    st.integers(0, 5000),
    st.integers(-(2**63), 2**63 - 1),
    st.sampled_from([-1, 0, Limits.TOKENS, Limits.TOKENS + 1]),
)
_reasons = st.one_of(st.sampled_from([0, 1, 2, 3]), st.integers(-(2**31), 2**31 - 1))
_credentials = st.sampled_from(["admin"] * 9 + ["proxy"] * 9 + ["none", "bad"])


def _waiting_get(model: str, max_wait: float) -> pb.GetRequest:
    request = pb.GetRequest(model=model)
    request.max_wait.FromNanoseconds(int(max_wait * 1e9))
    return request


_requests = st.one_of(
    st.tuples(st.just("Get"), st.builds(pb.GetRequest, model=_models)),
    st.tuples(st.just("Get"), st.builds(pb.GetRequest, model=_models)),
    st.tuples(
        st.just("Get"),
        st.builds(
            _waiting_get, model=_models, max_wait=st.sampled_from([-1.0, 0.0, 0.05, 0.2, 61.0])
        ),
    ),
    st.tuples(st.just("Disable"), st.builds(pb.DisableRequest, hash=_hashes, reason=_reasons)),
    st.tuples(
        st.just("MarkRateLimited"),
        st.builds(pb.MarkRateLimitedRequest, hash=_hashes, model=_models),
    ),
    st.tuples(
        st.just("UpdateRateLimits"),
        st.builds(pb.UpdateRateLimitsRequest, hash=_hashes, headers=_headers),
    ),
    st.tuples(st.just("GetLockoutPeriod"), st.builds(pb.GetLockoutPeriodRequest, model=_models)),
    st.tuples(
        st.just("IncrementUsage"),
        st.builds(pb.IncrementUsageRequest, hash=_hashes, model=_models, tokens=_tokens),
    ),
    st.tuples(
        st.just("UpdateRateLimits"),
        st.builds(pb.UpdateRateLimitsRequest, hash=_hashes, headers=_headers, model=_models),
    ),
    st.tuples(
        st.just("ReportOutcome"),
        st.builds(
            pb.ReportOutcomeRequest,
            hash=_hashes,
            model=_models,
            status=st.one_of(
                st.sampled_from([200, 400, 401, 404, 429, 500, 503]),
                st.integers(-(2**31), 2**31 - 1),
            ),
            headers=_headers,
            error_type=st.one_of(st.sampled_from(["requests", "tokens", ""]), st.text(max_size=8)),
            error_code=st.one_of(
                st.sampled_from(["insufficient_quota", "access_terminated", ""]),
                st.builds(lambda n: "c" * n, st.integers(250, 260)),
            ),
            error_message=st.one_of(
                st.sampled_from(["", "Rate limit reached on requests per day"]),
                st.text(max_size=20),
                st.builds(lambda n: "m" * n, st.integers(8190, 8194)),
            ),
            prompt_tokens=_tokens,
            completion_tokens=_tokens,
        ),
    ),
    st.tuples(st.just("List"), st.just(pb.ListRequest())),
    st.tuples(st.just("Available"), st.just(pb.AvailableRequest())),
    st.tuples(st.just("Recheck"), st.just(pb.RecheckRequest())),
)
# Now and then one request over the message size limit (they are a megabyte each).
_oversize = st.tuples(
    st.tuples(st.just("Get"), st.just(pb.GetRequest(model="z" * (Limits.MESSAGE_BYTES + 10)))),
    _credentials,
)
_batches = st.builds(
    lambda batch, big: batch + big,
    st.lists(st.tuples(_requests, _credentials), min_size=MIN_BATCH, max_size=55),
    st.one_of(st.lists(_oversize, max_size=1), *[st.just([])] * 6),
)


def _metadata(who: str) -> tuple[tuple[str, str], ...]:
    return {
        "admin": (("authorization", f"Bearer {ADMIN}"),),
        "proxy": (("authorization", f"Bearer {PROXY}"),),
        "bad": (("authorization", "Bearer not-a-token"),),
        "none": (),
    }[who]


def _reason(error: grpc.RpcError) -> str | None:
    status = rpc_status.from_call(error)  # type: ignore[arg-type]
    if status is None:
        return None
    for detail in status.details:
        info = error_details_pb2.ErrorInfo()
        if detail.Unpack(info):
            return info.reason
    return None


@dataclass
class Tally:
    sent: int = 0
    codes: dict[str, int] = field(default_factory=dict)
    rpcs: set[str] = field(default_factory=set)


def _list(stub: keysvc_pb2_grpc.KeyServiceStub) -> list[pb.Key]:
    return list(stub.List(pb.ListRequest(), metadata=_metadata("admin"), timeout=10).keys)


def _check_answer(
    rpc: str, who: str, request: Any, future: grpc.Future, disabled_before: set[str]
) -> tuple[grpc.StatusCode, str | None]:
    try:
        reply = future.result()
        code = grpc.StatusCode.OK
    except grpc.RpcError as error:
        code = error.code()  # type: ignore[attr-defined]
        reply = None
        details = error.details() or ""  # type: ignore[attr-defined]
        for secret in SECRETS:
            assert secret not in details, f"{rpc} echoed a secret in {details!r}"
        if code != grpc.StatusCode.RESOURCE_EXHAUSTED:
            assert _reason(error), f"{rpc} failed with {code} and no ErrorInfo: {details!r}"
    assert code in DOCUMENTED, f"{rpc}({request!r}) as {who} → {code}"
    oversize = request.ByteSize() > Limits.MESSAGE_BYTES
    if oversize:
        assert code == grpc.StatusCode.RESOURCE_EXHAUSTED, (rpc, code)
    elif who in ("none", "bad"):
        assert code == grpc.StatusCode.UNAUTHENTICATED, (rpc, who, code)
    elif who == "proxy" and rpc in ADMIN_ONLY:
        assert code == grpc.StatusCode.PERMISSION_DENIED, (rpc, who, code)
    if rpc == "Get" and reply is not None:
        assert hash_key(reply.secret) == reply.key.hash
        assert not reply.key.is_disabled
        assert reply.key.hash not in disabled_before, "a disabled key was handed out"
    return code, reply.key.hash if rpc == "Get" and reply is not None else None


def test_hostile_requests_get_documented_answers_and_leave_a_sound_pool() -> None:
    server = ServerProcess(
        {
            "OPENAI_KEY": ",".join(SECRETS),
            "KEYSVC_PROXY_TOKENS": PROXY,
            "KEYSVC_ADMIN_TOKENS": ADMIN,
            "ALLOWED_MODEL_FAMILIES": ALLOWED,
            "KEYSVC_LOG_LEVEL": "info",  # the port is in an info line
        }
    )
    tally = Tally()
    try:
        port = server.wait_serving()
        channel = grpc.insecure_channel(
            f"127.0.0.1:{port}",
            options=[("grpc.max_send_message_length", 4 * Limits.MESSAGE_BYTES)],
        )
        stub = keysvc_pb2_grpc.KeyServiceStub(channel)

        @settings(
            max_examples=BATCHES,
            deadline=None,
            database=None,
            suppress_health_check=list(HealthCheck),
        )
        @given(batch=_batches)
        def run_batch(batch: list[tuple[tuple[str, Any], str]]) -> None:
            before = _list(stub)
            has_recheck = any(rpc == "Recheck" for (rpc, _), _ in batch)
            disabled_before = set() if has_recheck else {k.hash for k in before if k.is_disabled}
            futures = [
                (
                    rpc,
                    who,
                    request,
                    getattr(stub, rpc).future(request, metadata=_metadata(who), timeout=30),
                )
                for (rpc, request), who in batch
            ]
            for rpc, who, request, future in futures:
                code, _ = _check_answer(rpc, who, request, future, disabled_before)
                tally.codes[code.name] = tally.codes.get(code.name, 0) + 1
                tally.rpcs.add(rpc)
            tally.sent += len(batch)

        run_batch()
        assert server.proc.poll() is None, f"server died:\n{server.log}"

        # Still serving.
        health = health_pb2_grpc.HealthStub(channel)
        reply = health.Check(health_pb2.HealthCheckRequest(service=SERVICE_NAME), timeout=10)
        assert reply.status == health_pb2.HealthCheckResponse.SERVING

        # Pool invariants: every configured key listed exactly once, counters sane.
        keys = _list(stub)
        assert sorted(k.hash for k in keys) == sorted(HASHES)
        for key in keys:
            assert key.prompt_count >= 0
            assert all(v >= 0 for v in key.token_usage.values())
            assert key.is_disabled or not (key.is_revoked or key.is_over_quota)
        live = {k.hash for k in keys if not k.is_disabled}
        available = stub.Available(pb.AvailableRequest(), metadata=_metadata("admin"), timeout=10)
        assert available.count == len(live)
        # No disabled key is handed out, whatever the model.
        for model in ("gpt-4o", "gpt-4", "gpt-3.5-turbo", "o3"):
            for _ in range(len(SECRETS) + 2):
                try:
                    got = stub.Get(pb.GetRequest(model=model), metadata=_metadata("proxy"))
                except grpc.RpcError as error:
                    assert error.code() == grpc.StatusCode.FAILED_PRECONDITION  # type: ignore[attr-defined]
                    assert not live
                    break
                assert got.key.hash in live
        channel.close()
    finally:
        server.stop()
    assert tally.sent >= 10_000 or BATCHES < 225, tally
    assert tally.rpcs == set(pb.DESCRIPTOR.services_by_name["KeyService"].methods_by_name)
    assert "INTERNAL" not in tally.codes and "UNKNOWN" not in tally.codes
    for code in ("OK", "INVALID_ARGUMENT", "NOT_FOUND", "UNAUTHENTICATED", "PERMISSION_DENIED"):
        assert tally.codes.get(code, 0) > 0, tally.codes
    print(f"hostile input: {tally.sent} requests, codes {tally.codes}")
