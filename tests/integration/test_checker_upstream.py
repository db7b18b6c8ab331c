"""The key checker against the fake OpenAI upstream over real loopback sockets."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Callable, Iterable
from typing import Any

import pytest

from keysvc.checker import CheckerConfig, KeyChecker
from keysvc.clock import SystemClock
from keysvc.keys import DisableReason, Key, hash_key
from keysvc.models import ModelTable
from keysvc.pool import KeyPool
from keysvc.testing.fake_openai import SCENARIOS, FakeOpenAI, RecordedRequest, Scenario
from keysvc.testing.process import start_keysvc
from keysvc.v1 import keysvc_pb2 as pb
from tests.helpers import client, serving


def system_pool(secrets: Iterable[str]) -> KeyPool:
    return KeyPool.from_secrets(secrets, models=ModelTable(), clock=SystemClock())


def fast_config(base_url: str, **overrides: Any) -> CheckerConfig:
    settings: dict[str, Any] = {
        "base_url": base_url,
        "timeout": 5.0,
        "check_interval": 0.05,
        "recheck_interval": 0,
        "retry_base": 0.2,
        "retry_floor": 0.05,
    }
    settings.update(overrides)
    return CheckerConfig(**settings)


@contextlib.asynccontextmanager
async def running(checker: KeyChecker) -> AsyncIterator[asyncio.Task[None]]:
    task = asyncio.create_task(checker.run())
    try:
        yield task
    finally:
        task.cancel()
        await asyncio.wait([task])


async def wait_for(predicate: Callable[[], bool], timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        await asyncio.sleep(0.02)


def by_key(requests: list[RecordedRequest], secret: str) -> list[RecordedRequest]:
    return [r for r in requests if r.key == secret]


# Every scenario but the slow one (own test) with one key each, plus a key the fake does not know.
TABLE = [name for name in SCENARIOS if name != "slow"]
NEVER_SETTLE = {"garbage", "forbidden"}


async def test_every_scenario_over_real_sockets() -> None:
    scenarios = {f"sk-{name}": SCENARIOS[name] for name in TABLE}
    with FakeOpenAI(scenarios) as fake:
        pool = system_pool([*scenarios, "sk-unknown"])
        keys = {k.secret: k for k in pool.keys()}
        checker = KeyChecker(pool, clock=SystemClock(), config=fast_config(fake.base_url))

        def settled() -> bool:
            return len(pool) == len(keys) + 2 and all(
                k.last_checked for k in pool.keys() if k.secret[3:] not in NEVER_SETTLE
            )

        async with running(checker):
            await wait_for(settled)
            # The never-settling keys are retried with backoff, not given up on.
            await wait_for(lambda: len(by_key(fake.requests, "sk-garbage")) >= 9)
        requests = fake.requests

    def k(name: str) -> Key:
        return keys[f"sk-{name}"]

    for name in ("valid", "gpt4-32k", "busy", "tokens-busy", "flaky", "multi-org"):
        assert not k(name).is_disabled, name
        assert not k(name).is_trial, name
    assert k("valid").model_ids == frozenset(SCENARIOS["valid"].models)
    assert "gpt4-32k" not in k("valid").model_families
    assert "gpt4-32k" in k("gpt4-32k").model_families
    assert k("valid").organization_id == "org-default"

    for name, reason in [
        ("revoked", DisableReason.REVOKED),
        ("unknown", DisableReason.REVOKED),
        ("terminated", DisableReason.REVOKED),
        ("over-quota", DisableReason.QUOTA),
        ("billing-inactive", DisableReason.QUOTA),
        ("hard-limit", DisableReason.QUOTA),
        ("trial-rate-limited", DisableReason.QUOTA),
    ]:
        assert k(name).is_disabled, name
        assert k(name).disable_reason is reason, name
        assert k(name).is_revoked is (reason is DisableReason.REVOKED), name
        assert k(name).is_over_quota is (reason is DisableReason.QUOTA), name

    trial = k("trial")
    assert trial.is_trial and not trial.is_disabled
    assert trial.model_families == frozenset({"turbo"})

    # 5xx then OK: one failed check (3 calls), one good one (3 calls), nothing more.
    assert [r.status for r in by_key(requests, "sk-flaky")].count(503) == 3
    assert len(by_key(requests, "sk-flaky")) == 6

    for name in NEVER_SETTLE:
        assert not k(name).is_disabled and not k(name).last_checked, name
        assert k(name).model_ids is None, name

    parent = k("multi-org")
    assert parent.organization_id == "org-main"
    clones = {c.organization_id: c for c in pool.keys() if c.cloned_from == parent.hash}
    assert set(clones) == {"org-team", "org-lab"}
    assert clones["org-team"].hash == hash_key("sk-multi-org", "org-team")
    assert clones["org-team"].model_ids == frozenset({"gpt-3.5-turbo", "gpt-4o"})
    assert "gpt4-32k" in clones["org-lab"].model_families
    assert "gpt4-32k" not in parent.model_families
    clone_calls = [r for r in requests if r.key == "sk-multi-org" and r.organization]
    assert {r.organization for r in clone_calls} == {"org-team", "org-lab"}
    assert all(r.path != "/v1/organizations" for r in clone_calls)

    # What the checker learned now decides Get: only the lab clone may serve gpt-4-32k.
    for _ in range(3):
        assert pool.get("gpt-4-32k") in (clones["org-lab"], k("gpt4-32k"))
    # A dated snapshot of a listed model counts; a model no checked key lists goes only
    # to the keys whose check never completed (their ids are unknown).
    assert pool.get("gpt-4-turbo-2099-01-01").model_ids is not None
    unchecked = {k("garbage").hash, k("forbidden").hash}
    assert {pool.get("gpt-4o-audio-preview").hash for _ in range(6)} == unchecked


async def test_slow_upstream_times_out_and_retries_without_change() -> None:
    with FakeOpenAI({"sk-slow": Scenario(delay=1.0)}) as fake:
        pool = system_pool(["sk-slow"])
        key = pool.keys()[0]
        checker = KeyChecker(
            pool, clock=SystemClock(), config=fast_config(fake.base_url, timeout=0.3)
        )
        async with running(checker):
            await wait_for(lambda: checker.retrying == 1)
            assert not key.is_disabled and not key.last_checked
            # The loop is not blocked while the slow calls are out.
            start = time.monotonic()
            await asyncio.sleep(0.01)
            assert time.monotonic() - start < 0.2


async def test_shutdown_during_a_check_is_prompt_and_changes_nothing() -> None:
    with FakeOpenAI({"sk-slow": Scenario(delay=5.0)}) as fake:
        pool = system_pool(["sk-slow"])
        key = pool.keys()[0]
        checker = KeyChecker(pool, clock=SystemClock(), config=fast_config(fake.base_url))
        task = asyncio.create_task(checker.run())
        await wait_for(lambda: fake.received >= 3)  # all three calls are in flight
        started = time.monotonic()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await asyncio.wait_for(task, 2.0)
        assert time.monotonic() - started < 1.0
        assert checker._client.is_closed
        assert not key.is_disabled and not key.last_checked and key.model_ids is None


async def test_500_keys_are_checked_within_the_batch_and_interval_rules() -> None:
    interval = 0.05
    secrets = [f"sk-bulk-{i:04d}" for i in range(500)]
    with FakeOpenAI(dict.fromkeys(secrets, SCENARIOS["valid"])) as fake:
        pool = system_pool(secrets)
        checker = KeyChecker(
            pool, clock=SystemClock(), config=fast_config(fake.base_url, check_interval=interval)
        )
        started = time.monotonic()
        async with running(checker):
            await wait_for(lambda: all(k.last_checked for k in pool.keys()), timeout=120)
        elapsed = time.monotonic() - started
        requests = sorted(fake.requests, key=lambda r: r.time)

    assert len(requests) == 1500  # three calls per key, no key twice
    assert {r.key for r in requests} == set(secrets)
    # Batches do not overlap and start >= interval after the previous ended, so no
    # window shorter than the interval sees more than one batch: 12 keys, 36 calls.
    window = interval * 0.9
    worst_calls, worst_keys = 0, 0
    for i, first in enumerate(requests):
        inside = [r for r in requests[i : i + 80] if r.time - first.time < window]
        worst_calls = max(worst_calls, len(inside))
        worst_keys = max(worst_keys, len({r.key for r in inside}))
    assert worst_keys <= 12 and worst_calls <= 36
    assert elapsed >= 41 * interval  # 42 batches, 41 gaps
    per_second = max(
        sum(1 for r in requests if first.time <= r.time < first.time + 1.0) for first in requests
    )
    print(f"\n500 keys checked in {elapsed:.2f} s; busiest second saw {per_second} calls")


# -- wired into the gRPC server ----------------------------------------------------------------


async def test_recheck_rpc_wakes_checker_and_keeps_dead_keys_out_until_alive() -> None:
    with FakeOpenAI({"sk-dead": SCENARIOS["revoked"], "sk-live": SCENARIOS["valid"]}) as fake:
        pool = system_pool(["sk-dead", "sk-live"])
        dead, live = pool.keys()
        checker = KeyChecker(pool, clock=SystemClock(), config=fast_config(fake.base_url))
        async with serving(pool, checker=checker) as server, running(checker):
            await wait_for(lambda: dead.is_disabled and live.last_checked > 0)
            await asyncio.sleep(0.2)  # the checker now sleeps: nothing is due
            fake.add("sk-dead", Scenario(delay=0.8))  # fixed upstream, answers slowly
            async with client(server.port) as stub:
                await stub.Recheck(pb.RecheckRequest())
                await wait_for(lambda: fake.received >= 9)  # the rechecks are in flight
                listed = {k.hash: k for k in (await stub.List(pb.ListRequest())).keys}
                assert listed[dead.hash].is_disabled
                for _ in range(5):
                    got = await stub.Get(pb.GetRequest(model="gpt-4"))
                    assert got.key.hash == live.hash
                    await asyncio.sleep(0.05)
                await wait_for(lambda: not dead.is_disabled)
                listed = {k.hash: k for k in (await stub.List(pb.ListRequest())).keys}
                assert not listed[dead.hash].is_disabled
                assert listed[dead.hash].last_checked.seconds > 0


async def test_checker_does_not_block_grpc_calls() -> None:
    secrets = [f"sk-slow-{i}" for i in range(12)]
    with FakeOpenAI(dict.fromkeys(secrets, Scenario(delay=2.0))) as fake:
        pool = system_pool(secrets)
        checker = KeyChecker(pool, clock=SystemClock(), config=fast_config(fake.base_url))
        async with serving(pool, checker=checker) as server, running(checker):
            await wait_for(lambda: fake.received >= 36)
            async with client(server.port) as stub:
                start = time.monotonic()
                for _ in range(10):
                    await stub.Available(pb.AvailableRequest())
                assert time.monotonic() - start < 1.0


async def test_keysvc_serve_checks_keys_and_stops_cleanly_mid_check() -> None:
    keys = {
        "sk-serve-valid": SCENARIOS["valid"],
        "sk-serve-revoked": SCENARIOS["revoked"],
        "sk-serve-slow": Scenario(delay=30.0),
    }
    with FakeOpenAI(keys) as fake:
        proc = await start_keysvc(
            keys=list(keys), base_url=fake.base_url, args=["--check-interval", "0.05"]
        )
        try:
            async with client(proc.port) as stub:

                async def listed() -> dict[str, pb.Key]:
                    return {k.hash: k for k in (await stub.List(pb.ListRequest())).keys}

                valid, revoked = hash_key("sk-serve-valid"), hash_key("sk-serve-revoked")
                deadline = time.monotonic() + 20
                while True:
                    now = await listed()
                    if now[valid].last_checked.seconds and now[revoked].is_disabled:
                        break
                    assert time.monotonic() < deadline, "keys not checked in time"
                    await asyncio.sleep(0.05)
                assert now[valid].organization_id == "org-default"
                assert now[revoked].is_revoked
                assert not now[hash_key("sk-serve-slow")].last_checked.seconds
                # The slow key's three calls have arrived and are waiting for their answers.
                await wait_for(lambda: fake.received == 9)
                assert len(fake.requests) == 6
        finally:
            started = time.monotonic()
            code = await proc.stop()
        assert code == 0
        assert time.monotonic() - started < 5.0
        events = [record["event"] for record in proc.logs]
        assert "key checker stopped" in events and events[-1] == "stopped"
        assert not any("sk-serve" in line for line in proc.raw_stderr)  # no secret logged
