"""A mixed pool (OpenAI and Anthropic keys) through the real server: Get never crosses
providers, a 529 leaves the key usable, a spend limit benches the key until the named time."""

from __future__ import annotations

from datetime import UTC, datetime

import grpc
import pytest

from keysvc.keys import hash_key
from keysvc.pool import KEY_REUSE_DELAY
from keysvc.v1 import keysvc_pb2 as pb
from tests.helpers import client, error_reason, make_pool, serving

OPENAI = [f"sk-mixed-oai-{n}" for n in range(3)]
ANTHROPIC = [f"sk-ant-mixed-{n}" for n in range(3)]
SONNET = "claude-sonnet-4-5-20250929"


async def test_get_never_crosses_providers() -> None:
    pool, clock = make_pool([*OPENAI, *ANTHROPIC])
    oai = {hash_key(s) for s in OPENAI}
    ant = {hash_key(s) for s in ANTHROPIC}
    async with serving(pool) as server, client(server.port) as stub:
        for round_ in range(12):
            gpt = await stub.Get(pb.GetRequest(model="gpt-4o"))
            claude = await stub.Get(pb.GetRequest(model=SONNET))
            haiku = await stub.Get(pb.GetRequest(model="claude-3-5-haiku-20241022"))
            assert gpt.key.hash in oai and gpt.key.service == "openai", round_
            assert claude.key.hash in ant and claude.key.service == "anthropic", round_
            assert haiku.key.hash in ant, round_
            assert claude.secret in ANTHROPIC and gpt.secret in OPENAI
            assert not any(f.startswith("claude") for f in gpt.key.model_families)
            assert all(f.startswith("claude") for f in claude.key.model_families)
            clock.advance(0.2)  # every key of a provider gets locked in turn: still none other
        listed = await stub.List(pb.ListRequest())
        assert {k.service for k in listed.keys if k.hash in ant} == {"anthropic"}
        assert {k.service for k in listed.keys if k.hash in oai} == {"openai"}


async def test_a_529_leaves_the_key_usable() -> None:
    pool, clock = make_pool(ANTHROPIC[:1])
    async with serving(pool) as server, client(server.port) as stub:
        lease = await stub.Get(pb.GetRequest(model=SONNET))
        reply = await stub.ReportOutcome(
            pb.ReportOutcomeRequest(
                hash=lease.key.hash,
                model=SONNET,
                status=529,
                error_type="overloaded_error",
                error_message="Overloaded",
            )
        )
        assert reply.action == pb.OUTCOME_ACTION_RETRY_WITH_ANOTHER_KEY
        assert reply.HasField("retry_after") and reply.retry_after.ToTimedelta().total_seconds() > 0
        assert not reply.key.is_disabled and not reply.key.is_over_quota
        clock.advance(KEY_REUSE_DELAY)
        again = await stub.Get(pb.GetRequest(model=SONNET))
        assert again.key.hash == lease.key.hash
        lockout = await stub.GetLockoutPeriod(pb.GetLockoutPeriodRequest(model=SONNET))
        assert lockout.lockout.ToTimedelta().total_seconds() == pytest.approx(KEY_REUSE_DELAY)


async def test_a_spend_limit_benches_the_key_until_the_named_time() -> None:
    pool, clock = make_pool(ANTHROPIC[:1])
    until = clock.now() + 2 * 3600
    stamp = datetime.fromtimestamp(until, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    async with serving(pool) as server, client(server.port) as stub:
        lease = await stub.Get(pb.GetRequest(model=SONNET))
        reply = await stub.ReportOutcome(
            pb.ReportOutcomeRequest(
                hash=lease.key.hash,
                model=SONNET,
                status=429,
                error_type="invalid_request_error",
                error_message=f"You have reached your specified API usage limits. "
                f"Usage blocked until {stamp}.",
            )
        )
        assert reply.action == pb.OUTCOME_ACTION_RETRY_WITH_ANOTHER_KEY
        assert reply.key.is_over_quota and reply.key.disable_reason == pb.DISABLE_REASON_QUOTA
        assert reply.key.over_quota_until.seconds == int(until)
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await stub.Get(pb.GetRequest(model=SONNET))
        assert caught.value.code() is grpc.StatusCode.FAILED_PRECONDITION
        assert error_reason(caught.value) == "NO_KEYS_FOR_FAMILY"
        clock.advance(2 * 3600)
        back = await stub.Get(pb.GetRequest(model=SONNET))
        assert back.key.hash == lease.key.hash and not back.key.is_over_quota
