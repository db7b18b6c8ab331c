"""The HTTP port of a live server: /metrics after a scenario, /healthz, /readyz and the
status page, checked against what the gRPC API says."""

from __future__ import annotations

import asyncio

import grpc
import pytest

from keysvc.clock import ManualClock
from keysvc.keys import DisableReason
from keysvc.metrics import Metrics
from keysvc.models import ModelTable
from keysvc.pool import KeyPool
from keysvc.v1 import keysvc_pb2 as pb
from keysvc.web import PAGE_KEYS, ViewPacer
from tests.exposition import parse, value
from tests.helpers import client

from .observed import check_page_against_api, fetch, observed_server, page_tables

SECRETS = [f"sk-http-test-{n:02d}-bbbbbbbbbbbbbbbb" for n in range(5)]


def make() -> tuple[KeyPool, Metrics, ManualClock]:
    metrics = Metrics()
    clock = ManualClock()
    pool = KeyPool.from_secrets(SECRETS, models=ModelTable(), clock=clock, observer=metrics)
    return pool, metrics, clock


GET = "/keysvc.v1.KeyService/Get"
DISABLE = "/keysvc.v1.KeyService/Disable"
USAGE = "/keysvc.v1.KeyService/IncrementUsage"


async def test_metrics_after_a_scenario() -> None:
    pool, metrics, _ = make()
    async with observed_server(pool, metrics) as observed, client(observed.server.port) as stub:
        got = [await stub.Get(pb.GetRequest(model="gpt-4o")) for _ in range(3)]
        await stub.Get(pb.GetRequest(model="gpt-3.5-turbo"))
        with pytest.raises(grpc.aio.AioRpcError) as invalid:
            await stub.Get(pb.GetRequest(model=""))
        assert invalid.value.code() is grpc.StatusCode.INVALID_ARGUMENT
        with pytest.raises(grpc.aio.AioRpcError) as missing:
            await stub.Disable(pb.DisableRequest(hash="oai-00000000"))
        assert missing.value.code() is grpc.StatusCode.NOT_FOUND
        await stub.IncrementUsage(
            pb.IncrementUsageRequest(hash=got[0].key.hash, model="gpt-4o", tokens=321)
        )
        await stub.Disable(pb.DisableRequest(hash=got[1].key.hash, reason=pb.DISABLE_REASON_QUOTA))
        status, content_type, text = await fetch(observed.base_url + "/metrics")

    assert status == 200
    assert content_type == "text/plain"
    samples = parse(text)
    assert value(samples, "keysvc_rpcs_total", method=GET, code="OK") == 4
    assert value(samples, "keysvc_rpcs_total", method=GET, code="INVALID_ARGUMENT") == 1
    assert value(samples, "keysvc_rpcs_total", method=DISABLE, code="NOT_FOUND") == 1
    assert value(samples, "keysvc_rpcs_total", method=DISABLE, code="OK") == 1
    assert value(samples, "keysvc_rpcs_total", method=USAGE, code="OK") == 1
    assert value(samples, "keysvc_rpc_duration_seconds_count", method=GET) == 5
    assert value(samples, "keysvc_rpc_duration_seconds_bucket", method=GET, le="+Inf") == 5
    assert value(samples, "keysvc_rpc_duration_seconds_sum", method=GET) > 0
    assert value(samples, "keysvc_key_handouts_total", family="gpt4o") == 3
    assert value(samples, "keysvc_key_handouts_total", family="turbo") == 1
    assert value(samples, "keysvc_tokens_used_total", family="gpt4o") == 321
    assert value(samples, "keysvc_key_state_changes_total", change="over_quota") == 1
    # 4 hand-outs on a manual clock to 3 keys (the turbo one went to the first key
    # again: the reuse throttle is per family): 3 locked, of which one is now over quota.
    assert value(samples, "keysvc_keys", family="gpt4o", state="locked") == 2
    assert value(samples, "keysvc_keys", family="gpt4o", state="active") == 2
    assert value(samples, "keysvc_keys", family="gpt4o", state="disabled") == 1
    assert value(samples, "keysvc_keys", family="gpt4o", state="over_quota") == 1
    assert value(samples, "keysvc_lockout_seconds", family="gpt4o") == 0  # one is free
    for secret in SECRETS:
        assert secret not in text


async def test_lockout_gauge_when_every_key_is_busy() -> None:
    pool, metrics, clock = make()
    async with observed_server(pool, metrics) as observed, client(observed.server.port) as stub:
        for _ in SECRETS:
            await stub.Get(pb.GetRequest(model="gpt-4"))
        clock.advance(0.4)
        _, _, text = await fetch(observed.base_url + "/metrics")
        lockout = await stub.GetLockoutPeriod(pb.GetLockoutPeriodRequest(model="gpt-4"))
    gauge = value(parse(text), "keysvc_lockout_seconds", family="gpt4")
    assert gauge == pytest.approx(0.6)
    assert gauge == pytest.approx(lockout.lockout.ToNanoseconds() / 1e9)


async def test_healthz_and_readyz_follow_grpc_health() -> None:
    pool, metrics, _ = make()
    async with observed_server(pool, metrics, start=False) as observed:
        assert (await fetch(observed.base_url + "/readyz"))[0] == 503  # not started yet
        await observed.server.start()
        assert (await fetch(observed.base_url + "/healthz"))[:1] == (200,)
        assert (await fetch(observed.base_url + "/readyz"))[:1] == (200,)
        await observed.server.health.enter_graceful_shutdown()
        assert (await fetch(observed.base_url + "/readyz"))[0] == 503
        assert (await fetch(observed.base_url + "/healthz"))[0] == 503


async def test_status_page_matches_the_api() -> None:
    pool, metrics, clock = make()
    async with observed_server(pool, metrics) as observed, client(observed.server.port) as stub:
        first = await stub.Get(pb.GetRequest(model="gpt-4o"))
        await stub.IncrementUsage(
            pb.IncrementUsageRequest(hash=first.key.hash, model="gpt-4o", tokens=1000)
        )
        clock.advance(5)
        await stub.Get(pb.GetRequest(model="gpt-4"))
        listing = await stub.List(pb.ListRequest())
        hashes = [k.hash for k in listing.keys]
        await stub.Disable(pb.DisableRequest(hash=hashes[3], reason=pb.DISABLE_REASON_REVOKED))
        await stub.Disable(pb.DisableRequest(hash=hashes[4], reason=pb.DISABLE_REASON_MANUAL))
        listing = await stub.List(pb.ListRequest())
        status, content_type, html = await fetch(observed.base_url + "/")

    assert status == 200
    assert content_type == "text/html"
    assert '<meta http-equiv="refresh"' in html
    assert "<script" not in html
    for secret in SECRETS:
        assert secret not in html
    check_page_against_api(html, listing, clock.now())


async def test_a_large_pool_shows_counts_and_the_top_of_each_list() -> None:
    metrics = Metrics()
    clock = ManualClock()
    secrets = [f"sk-large-pool-{n:05d}" for n in range(3 * PAGE_KEYS)]
    pool = KeyPool.from_secrets(secrets, models=ModelTable(), clock=clock, observer=metrics)
    keys = pool.keys()
    for key in keys[PAGE_KEYS // 2 :: 2]:  # every other key after the first few: disabled
        pool.disable(key.hash, DisableReason.MANUAL)
    locked = [pool.get("gpt-4") for _ in range(PAGE_KEYS + 3)]
    async with observed_server(pool, metrics) as observed:
        _, _, html = await fetch(observed.base_url + "/")
    tables = page_tables(html)
    disabled = [k for k in keys if k.is_disabled]
    now = clock.now()
    active = [k for k in keys if not k.is_disabled and now >= k.rate_limited_until]
    load_order = {k.hash: n for n, k in enumerate(keys)}
    for state, members in (("active", active), ("locked", locked), ("disabled", disabled)):
        first = sorted((k.hash for k in members), key=load_order.__getitem__)[:PAGE_KEYS]
        assert [row["key"] for row in tables[f"keys-{state}"]] == first, state
        assert f"{state}: {len(members)}</h3>" in html
        if len(members) > PAGE_KEYS:
            assert f"The first {PAGE_KEYS} of {len(members)}," in html
    gpt4 = next(row for row in tables["families"] if row["family"] == "gpt4")
    assert gpt4["active"] == str(len(active))
    assert gpt4["locked"] == str(len(locked))
    assert gpt4["disabled"] == str(len(disabled))


async def test_views_beyond_the_pace_wait_or_are_refused_and_probes_are_never_held() -> None:
    pool, metrics, _ = make()
    pacer = ViewPacer(2, max_wait=0.6)  # a turn every 0.5 s, at most 0.6 s of waiting
    async with observed_server(pool, metrics, pacer=pacer) as observed:
        statuses = await asyncio.gather(
            *(fetch(observed.base_url + path) for path in ("/", "/metrics", "/", "/"))
        )
        probe = await fetch(observed.base_url + "/healthz")  # while views wait
    assert sorted(s for s, _, _ in statuses) == [200, 200, 429, 429]  # in arrival order
    assert probe[0] == 200
