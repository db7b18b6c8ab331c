"""ReportOutcome through a real server: the reply, the key it changed, durability, metrics."""

from __future__ import annotations

import contextlib
import sqlite3
from pathlib import Path

import grpc
import pytest
from prometheus_client import generate_latest

from keysvc.clock import ManualClock
from keysvc.keys import hash_key
from keysvc.metrics import Metrics
from keysvc.models import ModelTable
from keysvc.pool import KeyPool
from keysvc.state import SqliteStateStore
from keysvc.v1 import keysvc_pb2 as pb
from keysvc.v1.keysvc_pb2_grpc import KeyServiceStub
from tests.exposition import parse, value
from tests.helpers import client, error_reason, make_pool, serving

SECRETS = ["sk-outcome-0001", "sk-outcome-0002"]
A, B = (hash_key(s) for s in SECRETS)


async def test_success_counts_tokens_and_says_done() -> None:
    pool, _ = make_pool(SECRETS)
    async with serving(pool) as server, client(server.port) as stub:
        lease = await stub.Get(pb.GetRequest(model="gpt-4o"))
        reply = await stub.ReportOutcome(
            pb.ReportOutcomeRequest(
                hash=lease.key.hash,
                model="gpt-4o",
                status=200,
                headers={
                    "x-ratelimit-remaining-requests": "99",
                    "x-ratelimit-reset-requests": "2s",
                },
                prompt_tokens=30,
                completion_tokens=12,
            )
        )
    assert reply.action == pb.OUTCOME_ACTION_DONE
    assert reply.key.hash == lease.key.hash
    assert dict(reply.key.token_usage) == {"gpt4o": 42}
    assert reply.key.prompt_count == 1
    assert reply.reason


async def test_rate_limit_says_retry_and_locks_the_key() -> None:
    pool, clock = make_pool(SECRETS)
    async with serving(pool) as server, client(server.port) as stub:
        lease = await stub.Get(pb.GetRequest(model="gpt-4"))
        reply = await stub.ReportOutcome(
            pb.ReportOutcomeRequest(
                hash=lease.key.hash, model="gpt-4", status=429, error_type="requests"
            )
        )
        assert reply.action == pb.OUTCOME_ACTION_RETRY_WITH_ANOTHER_KEY
        assert not reply.key.is_disabled
        clock.advance(2)  # past the reuse delay, within the 429's lock
        again = await stub.Get(pb.GetRequest(model="gpt-4"))
    assert again.key.hash != lease.key.hash


async def test_dead_key_is_durable_before_the_reply(tmp_path: Path) -> None:
    path = tmp_path / "state.db"
    # No background writer and an hour-long batch: only a flush writes the file.
    store = SqliteStateStore.open(path, batch_seconds=3600)
    pool = KeyPool(store=store, models=ModelTable(), clock=ManualClock())
    for secret in SECRETS:
        pool.add_key(secret)
    async with serving(pool) as server, client(server.port) as stub:
        reply = await stub.ReportOutcome(
            pb.ReportOutcomeRequest(
                hash=A, model="gpt-4o", status=429, error_code="insufficient_quota"
            )
        )
        assert reply.action == pb.OUTCOME_ACTION_RETRY_WITH_ANOTHER_KEY
        assert reply.key.is_over_quota
        with contextlib.closing(sqlite3.connect(path)) as reader:
            saved = {
                row[0]: row[1:]
                for row in reader.execute("SELECT hash, is_disabled, is_over_quota FROM keys")
            }
        assert saved[A] == (1, 1)
        assert saved[B] == (0, 0)
        assert (await stub.Available(pb.AvailableRequest())).count == 1


def report(**fields: object) -> pb.ReportOutcomeRequest:
    """A valid 200 report for key A, with ``fields`` changed."""
    return pb.ReportOutcomeRequest(**{"hash": A, "model": "gpt-4o", "status": 200, **fields})


@pytest.mark.parametrize(
    ("field", "request_"),
    [
        ("status", report(status=0)),
        ("status", report(status=600)),
        ("model", report(model="x" * 300)),
        ("prompt_tokens", report(prompt_tokens=-1)),
        ("completion_tokens", report(completion_tokens=2_000_000_000)),
        ("error_message", report(status=429, error_message="x" * 9000)),
        ("error_code", report(status=429, error_code="x" * 300)),
        ("headers", report(headers={"x-ratelimit-reset-requests": "1" * 5000})),
        ("hash", report(hash="")),
    ],
)
async def test_bad_reports_are_invalid_and_change_nothing(
    field: str, request_: pb.ReportOutcomeRequest
) -> None:
    pool, _ = make_pool(SECRETS)
    async with serving(pool) as server, client(server.port) as stub:
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await stub.ReportOutcome(request_)
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert error_reason(caught.value) == "INVALID_ARGUMENT"
        assert field in (caught.value.details() or "")
    key = pool.key(A)
    assert not key.is_disabled and key.prompt_count == 0 and not key.token_usage


async def test_a_report_without_a_model_answers_the_key_s_hand_out() -> None:
    # As the seed's proxies report: the key, not the model. The answer goes to the
    # family of the hand-out in flight, and its budget frees the key at once.
    pool, _ = make_pool(SECRETS[:1])
    budget = {
        "x-ratelimit-limit-requests": "500",
        "x-ratelimit-remaining-requests": "499",
        "x-ratelimit-reset-requests": "120ms",
    }
    async with serving(pool) as server, client(server.port) as stub:
        lease = await stub.Get(pb.GetRequest(model="gpt-4o"))
        reply = await stub.ReportOutcome(
            pb.ReportOutcomeRequest(
                hash=lease.key.hash, status=200, headers=budget, completion_tokens=7
            )
        )
        assert reply.action == pb.OUTCOME_ACTION_DONE
        lockout = await stub.GetLockoutPeriod(pb.GetLockoutPeriodRequest(model="gpt-4o"))
        assert lockout.lockout.ToNanoseconds() == 0
    assert pool.key(lease.key.hash).token_usage == {"gpt4o": 7}


async def test_unknown_key_is_not_found() -> None:
    pool, _ = make_pool(SECRETS)
    async with serving(pool) as server, client(server.port) as stub:
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await stub.ReportOutcome(
                pb.ReportOutcomeRequest(hash="oai-00000000", model="gpt-4o", status=200)
            )
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND


async def test_outcomes_are_counted_by_action_once() -> None:
    metrics = Metrics()
    pool = KeyPool.from_secrets(SECRETS, models=ModelTable(), clock=ManualClock(), observer=metrics)
    async with serving(pool, metrics=metrics) as server, client(server.port) as stub:
        lease = await stub.Get(pb.GetRequest(model="gpt-4o"))
        for status in (200, 200, 429, 404):
            await stub.ReportOutcome(
                pb.ReportOutcomeRequest(
                    hash=lease.key.hash, model="gpt-4o", status=status, prompt_tokens=5
                )
            )
    samples = parse(generate_latest(metrics.registry).decode())
    assert value(samples, "keysvc_outcomes_total", action="done") == 2
    assert value(samples, "keysvc_outcomes_total", action="retry_with_another_key") == 1
    assert value(samples, "keysvc_outcomes_total", action="return_error") == 1
    assert value(samples, "keysvc_tokens_used_total", family="gpt4o") == 10
    assert value(samples, "keysvc_key_handouts_total", family="gpt4o") == 1
    assert value(samples, "keysvc_key_state_changes_total", change="rate_limited") == 1


async def test_a_zero_lockout_holds_the_room_for_the_connection_that_asked() -> None:
    # The seed's queue on two proxies: each asks GetLockoutPeriod and lets a request
    # go on 0. With one request's room left, only the first is told 0 until its Get.
    pool, _ = make_pool(SECRETS[:1])
    one_left = {
        "x-ratelimit-limit-requests": "10",
        "x-ratelimit-remaining-requests": "1",
        "x-ratelimit-reset-requests": "59s",
    }
    own_connection = [("grpc.use_local_subchannel_pool", 1)]
    async with (
        serving(pool) as server,
        grpc.aio.insecure_channel(f"127.0.0.1:{server.port}", options=own_connection) as one,
        grpc.aio.insecure_channel(f"127.0.0.1:{server.port}", options=own_connection) as other,
    ):
        proxy_a, proxy_b = KeyServiceStub(one), KeyServiceStub(other)
        lease = await proxy_a.Get(pb.GetRequest(model="gpt-4o"))
        await proxy_a.UpdateRateLimits(
            pb.UpdateRateLimitsRequest(hash=lease.key.hash, headers=one_left)
        )
        ask = pb.GetLockoutPeriodRequest(model="gpt-4o")
        assert (await proxy_a.GetLockoutPeriod(ask)).lockout.ToNanoseconds() == 0
        assert (await proxy_b.GetLockoutPeriod(ask)).lockout.ToNanoseconds() > 0
        assert (await proxy_a.Get(pb.GetRequest(model="gpt-4o"))).key.hash == A
        assert (await proxy_a.GetLockoutPeriod(ask)).lockout.ToNanoseconds() > 0
