"""A short run of each benchmark (``make bench`` runs them in full).

These check that each harness measures something real: figures in range and
consistent with each other, the fake upstream enforcing its limits. They do not
check the targets: a short run on a shared machine is too noisy for that.
"""

from __future__ import annotations

import asyncio
import math
import time
from pathlib import Path

import aiohttp
import grpc
import pytest
from google.rpc import error_details_pb2, status_pb2

from bench import (
    envoy_cost,
    list_pages,
    memory,
    pool_scale,
    redis_cost,
    rpc_cost,
    simulate,
    state_load,
    under_load,
    used_pool,
)
from bench.child import serving_module
from bench.proxy_loops import Answer, ReportOutcomeLoop, Request, SimTime
from bench.seed_pool import SeedPool, seed_reset_seconds
from bench.upstream import ModelLimits, RateLimitedUpstream, go_duration, limits_json
from keysvc.clock import ManualClock, SystemClock
from keysvc.durations import parse_go_duration
from keysvc.errors import UnknownModel
from keysvc.models import ModelTable
from keysvc.pool import KeyPool
from keysvc.v1 import keysvc_pb2 as pb


def test_pool_scale_smoke() -> None:
    section = pool_scale.run(smoke=True)
    for size in (10, 1_000, 10_000):
        ours = section.figures[f"keysvc_median_us_{size}"]
        seed = section.figures[f"seed_median_us_{size}"]
        assert 0 < ours < 1_000
        assert seed > 0
    # The seed sorts the pool per call: at 10k keys it is far slower than the heaps.
    assert section.figures["seed_median_us_10000"] > 20 * section.figures["keysvc_median_us_10000"]
    assert len(section.targets) == 2


def test_memory_smoke() -> None:
    section = memory.run(smoke=True)
    assert section.figures["rss_loaded"] > section.figures["rss_empty"] > 0
    assert 0 < section.figures["bytes_per_key"] < 100_000
    assert 0 < section.figures["start_seconds_empty"] < 30
    assert section.figures["start_seconds"] > 0
    # In use: each family's rate-limit state and index entries cost every key something.
    used = [section.figures[f"bytes_per_key_used_{n}"] for n in range(len(used_pool.MODELS) + 1)]
    assert 0 < used[0] < 100_000
    for fewer, more in zip(used, used[1:], strict=False):
        assert more > fewer + 50
    assert len(section.targets) == 3


def test_used_pool_hands_out_and_answers_every_key_in_each_family() -> None:
    # The server's clock, as in the benchmark: on a stopped clock every locked key
    # would unlock at once and the lowest load order would win every time.
    pool = KeyPool.from_secrets(pool_scale.secrets(300), models=ModelTable(), clock=SystemClock())
    models = ModelTable()
    for done, model in enumerate(used_pool.MODELS, start=1):
        assert used_pool.use_every_key(pool, model) == 2 * 300
        for key in pool.keys():
            assert key.prompt_count == 2 * done
            for used_model in used_pool.MODELS[:done]:
                state = key.state_in(models.family(used_model))
                # Handed out, answered with the six headers: a budget, nothing in flight.
                assert state is not None and state.last_used > 0
                assert state.remaining_requests is not None and state.tokens_rate is not None
                assert state.budget_at > 0 and state.reserved is None


def test_rpc_cost_smoke() -> None:
    section = rpc_cost.run(smoke=True)
    for name in ("Get", "Health/Check", "Available"):
        assert section.figures[f"{name}:cpu_us"] > 0
        assert section.figures[f"{name}:p99_us"] >= section.figures[f"{name}:p50_us"] > 0
    assert math.isclose(
        section.figures["ratio"],
        section.figures["Get:cpu_us"] / section.figures["Health/Check:cpu_us"],
    )


def test_state_load_smoke() -> None:
    section = state_load.run(smoke=True)
    for label in ("state file", "in memory"):
        assert section.figures[f"{label}:get_p99_ms"] >= section.figures[f"{label}:get_p50_ms"] > 0
        assert section.figures[f"{label}:disable_p99_ms"] > 0
        assert section.figures[f"{label}:gets_per_s"] > 0
    # The state file is real: every key has its row, every acknowledged Disable is on disk
    # (the warm-up's too).
    assert section.figures["rows_on_disk"] == 2_000
    assert section.figures["disabled_on_disk"] >= section.figures["state file:disables"] > 0
    assert math.isclose(
        section.figures["get_p99_ratio"],
        section.figures["state file:get_p99_ms"] / section.figures["in memory:get_p99_ms"],
    )
    assert section.figures["fdatasync_p99_ms"] >= section.figures["fdatasync_p50_ms"] > 0
    assert [t.informational for t in section.targets] == [False, False, False, True]


def test_redis_cost_smoke() -> None:
    section = redis_cost.run(smoke=True)
    figures = section.figures
    assert figures["Get:cpu_us"] > 0 and figures["Health/Check:cpu_us"] > 0
    assert figures["ratio"] == figures["Get:cpu_us"] / figures["Health/Check:cpu_us"]
    # A Get is one script call. (The script time is wall time inside Redis, the process
    # CPU is CPU: on a loaded machine either may be the larger.)
    assert 0.9 <= figures["script_calls_per_get"] <= 1.1
    assert figures["script_us_per_get"] > 0 and figures["redis_cpu_us_per_get"] > 0
    assert figures["redis_core_gets_per_s"] == 1e6 / figures["script_us_per_get"]
    for workers in (1, 2):
        assert figures[f"workers{workers}:gets_per_s"] > 0
        for part in ("keysvc", "client", "redis"):
            assert 0 < figures[f"workers{workers}:{part}_share"] <= 1
    assert figures["speedup"] == figures["workers2:gets_per_s"] / figures["workers1:gets_per_s"]
    assert [t.informational for t in section.targets] == [False, True, True]
    assert "| 2 |" in section.body


def test_simulator_smoke() -> None:
    section = simulate.run(smoke=True)
    assert [scenario.proxies for scenario, _ in simulate.SMOKE_RUNS] == [1, 3, 3]
    for scenario, policies in simulate.SMOKE_RUNS:
        for name in policies:
            prefix = f"{scenario.label}:{name}"
            assert 0 < section.figures[f"{prefix}:share"] <= 1.2
            assert 0 <= section.figures[f"{prefix}:share_429"] <= 1
            assert section.figures[f"{prefix}:calls"] > 0
            assert section.figures[f"{prefix}:mean_wait"] > 0
            # Every proxy got its turn of the arrivals and served some of them.
            served = [section.figures[f"{prefix}:served:proxy{i}"] for i in range(scenario.proxies)]
            assert min(served) > 0
            assert f"{prefix}:served:proxy{scenario.proxies}" not in section.figures
        if simulate.REDIS in policies:
            # The shared pool: its replicas on one Redis, the proxies spread over them.
            assert section.figures[f"{scenario.label}:{simulate.REDIS}:servers"] == 3
            assert "3 keysvc replicas sharing one pool in one redis-server" in section.body
        else:
            # The seed's provider lives in each proxy: one server per proxy. keysvc: one.
            assert section.figures[f"{scenario.label}:seed:servers"] == scenario.proxies
            assert section.figures[f"{scenario.label}:keysvc:servers"] == 1
        assert f"### {scenario.label[0].upper()}{scenario.label[1:]}" in section.body
    assert section.body.count("| delivered share of capacity |") == len(simulate.SMOKE_RUNS)
    # Two targets for each loop on keysvc's pool in each scenario; the ratio to the seed is
    # a target on the fleet and shown for information on one proxy.
    names = [t.name for t in section.targets]
    loops = sum(
        name in (*simulate.KEYSVC_LOOPS, simulate.REDIS)
        for _, policies in simulate.SMOKE_RUNS
        for name in policies
    )
    assert sum("delivered share of capacity" in n for n in names) == loops
    assert sum("429 share of upstream calls" in n for n in names) == loops
    # The seed's queue on keysvc's pool says how many starts its polls offered.
    offer = section.figures[f"{simulate.SMOKE.label}:seed-rpcs:queue_offer"]
    assert offer > 0
    (single,) = [t for t in section.targets if t.name.startswith("429 share, seed ÷ keysvc")]
    (fleet,) = [t for t in section.targets if t.name.startswith("429 share, seed fleet ÷")]
    assert single.informational and single.verdict == "informational"
    assert not fleet.informational and fleet.verdict in ("met", "missed")
    assert "fleet of 3 proxies" in fleet.name
    assert any(n.startswith(f"delivered share of capacity, {simulate.REDIS} (") for n in names)


def test_ratio_of_429_shares_is_honest_about_zeros() -> None:
    def outcome(rate_limited: int, calls: int = 100) -> simulate.Outcome:
        return simulate.Outcome(
            policy="",
            share=1.0,
            share_by_model={},
            calls=calls,
            rate_limited=rate_limited,
            waits=[],
            arrived=0,
            gave_up=0,
            wasted=0.0,
            lag_p99=0.0,
        )

    assert simulate._ratio_429(outcome(2), outcome(4))[1:] == ("2.00×", True)
    assert simulate._ratio_429(outcome(4), outcome(5))[1:] == ("1.25×", False)
    assert simulate._ratio_429(outcome(0), outcome(3))[1:] == ("keysvc had none", True)
    ratio, figure, met = simulate._ratio_429(outcome(0), outcome(0))
    assert math.isnan(ratio) and figure == "no ratio: neither had a 429" and not met


def test_go_durations_round_trip_through_keysvc() -> None:
    for seconds in (0.02, 0.5, 1.0, 21.003, 60.0, 90.0, 360.0, 3723.0):
        assert parse_go_duration(go_duration(seconds)) == pytest.approx(seconds)
    assert go_duration(360.0) == "6m0s"
    assert go_duration(0.02) == "20ms"


def test_seed_regex_reads_durations_as_the_seed_did() -> None:
    assert seed_reset_seconds("20ms") == pytest.approx(0.02)
    assert seed_reset_seconds("6m0s") == 0.0
    assert seed_reset_seconds("1m30s") == 10.0  # "30s", clamped
    assert seed_reset_seconds("21.0032s") == 10.0
    assert seed_reset_seconds("1.5s") == 1.5


def test_the_seed_port_serves_unknown_models_from_gpt4_as_the_seed_did() -> None:
    # keysvc refuses them now (UNKNOWN_MODEL); the seed's port, measured beside it,
    # keeps the seed's default, whatever table it is given.
    models = ModelTable()
    with pytest.raises(UnknownModel):
        KeyPool.from_secrets(["sk-a"], models=models, clock=ManualClock()).get("davinci")
    seed = SeedPool.from_secrets(["sk-a"], models=models, clock=ManualClock())
    assert seed.get("davinci").hash == seed.get("gpt-4").hash
    assert seed.lockout_period("davinci") == seed.lockout_period("gpt-4") > 0


async def test_upstream_enforces_rpm_and_tpm_per_key_and_model() -> None:
    limits = {"a": ModelLimits(rpm=2, tpm=1_000_000), "b": ModelLimits(rpm=600, tpm=1_000)}
    upstream = RateLimitedUpstream(limits, keys=["k1", "k2"])
    for window in upstream._windows_for("k1", "a", upstream.now()):
        window.level = window.limit  # a fresh minute's quota
    assert upstream.decide("k1", "a", 1)[0] == 200
    assert upstream.decide("k1", "a", 1)[0] == 200
    status, headers, body = upstream.decide("k1", "a", 1)
    assert status == 429 and body["error"]["type"] == "requests"
    assert headers["x-ratelimit-remaining-requests"] == "0"
    assert parse_go_duration(headers["x-ratelimit-reset-requests"]) == pytest.approx(60, abs=1)
    assert set(headers) == {
        f"x-ratelimit-{what}-{kind}"
        for what in ("limit", "remaining", "reset")
        for kind in ("requests", "tokens")
    }
    # Another key, another model: their own quotas (empty at first, like every quota).
    assert upstream.decide("k2", "a", 1)[0] == 429
    for window in upstream._windows_for("k1", "b", upstream.now()):
        window.level = window.limit
    assert upstream.decide("k1", "b", 600)[0] == 200
    status, _, body = upstream.decide("k1", "b", 600)
    assert status == 429 and body["error"]["type"] == "tokens"
    assert "tokens per min (TPM)" in body["error"]["message"]


async def test_fixed_window_upstream_gives_the_whole_limit_back_only_at_the_window_s_end() -> None:
    limits = {"a": ModelLimits(rpm=2, tpm=1_000_000)}
    upstream = RateLimitedUpstream(limits, keys=["k1", "k2"], shape="window")
    now = upstream.now()
    requests, tokens = upstream._windows_for("k1", "a", now)
    assert upstream.decide("k1", "a", 1)[0] == 429  # empty until its first window ends
    requests.end = tokens.end = now  # that window ends now
    assert upstream.decide("k1", "a", 1)[0] == 200
    status, headers, _ = upstream.decide("k1", "a", 1)
    assert status == 200 and headers["x-ratelimit-remaining-requests"] == "0"
    # The reset is the time to the window's end, and nothing comes back before it.
    reset = parse_go_duration(headers["x-ratelimit-reset-requests"])
    assert reset == pytest.approx(upstream_window_end(requests) - upstream.now(), abs=0.01)
    assert 59 < reset <= 60
    status, _, body = upstream.decide("k1", "a", 1)
    assert status == 429 and body["error"]["type"] == "requests"
    # Keys' windows start at phases spread over the minute: k2's half a minute after k1's.
    other, _ = upstream._windows_for("k2", "a", now)
    assert upstream_window_end(other) % 60 == pytest.approx(30, abs=0.01)


def upstream_window_end(window: object) -> float:
    end = getattr(window, "end", None)
    assert isinstance(end, float)
    return end


def test_list_pages_smoke() -> None:
    section = list_pages.run(smoke=True)
    figures = section.figures
    assert figures["keys_all"] == 10_000
    assert figures["keys_disabled"] == 100
    assert 900 <= figures["keys_locked"] <= 1_000  # handed out, less those disabled since
    # Each key is active, locked or disabled: the filters partition the pool.
    assert figures["keys_active"] + figures["keys_locked"] + figures["keys_disabled"] == 10_000
    # A page is a small part of one reply of every key.
    assert 0 < figures["page_median_ms_all"] < figures["one_reply_ms"] / 5
    assert len(section.targets) == 2


def test_envoy_cost_smoke() -> None:
    section = envoy_cost.run(smoke=True)
    figures = section.figures
    for route in ("direct", "through Envoy"):
        assert section.figures[f"{route}:requests_per_s"] > 0
        assert section.figures[f"{route}:p99_ms"] >= section.figures[f"{route}:p50_ms"] > 0
        assert section.figures[f"{route}:upstream_cpu_us"] > 0
        assert section.figures[f"{route}:p50_ms_alone"] > 0
    # Through Envoy, keysvc and Envoy work for every request; direct, they idle.
    assert figures["through Envoy:keysvc_cpu_us"] > 5 * figures["direct:keysvc_cpu_us"]
    assert figures["through Envoy:envoy_cpu_us"] > 5 * figures["direct:envoy_cpu_us"]
    assert math.isclose(
        section.figures["added_cpu_us"],
        section.figures["through Envoy:servers_cpu_us"] - section.figures["direct:servers_cpu_us"],
    )
    assert [t.verdict for t in section.targets] == ["informational"] * 2


def test_under_load_smoke() -> None:
    section = under_load.run(smoke=True)
    assert len(section.targets) == len(under_load.DISTURBANCES) == 2
    for name in under_load.DISTURBANCES:
        for which in ("quiet", "disturbed"):
            assert section.figures[f"{name}:{which}:calls"] == 300
            p50 = section.figures[f"{name}:{which}:p50"]
            assert 0 < p50 <= section.figures[f"{name}:{which}:p99"] < 10
        assert math.isclose(
            section.figures[f"{name}:ratio"],
            section.figures[f"{name}:disturbed:p99"] / section.figures[f"{name}:quiet:p99"],
        )
    # The disturbances happened: pages and scrapes fetched, connections held open.
    views, idle = under_load.DISTURBANCES
    assert section.figures[f"{views}:extent:/"] > 0
    assert section.figures[f"{views}:extent:/metrics"] > 0
    assert section.figures[f"{idle}:extent:raw"] == 100
    assert section.figures[f"{idle}:extent:http2"] == 100


async def test_upstream_in_its_own_process_answers_calls_and_its_wasted_quota(
    tmp_path: Path,
) -> None:
    keys_file = tmp_path / "keys"
    keys_file.write_text("k1\nk2\n", encoding="utf-8")
    limits = {"a": ModelLimits(rpm=60, tpm=1_000_000, latency=(0.0, 0.0))}
    command = ("bench.upstream", str(keys_file), "1000.0", "bucket", limits_json(limits))
    with serving_module(*command) as (_, port):
        base = f"http://127.0.0.1:{port}/v1"
        async with aiohttp.ClientSession() as session:
            payload = {"model": "a", "max_tokens": 5, "messages": []}
            auth = {"Authorization": "Bearer k1"}
            url = base + "/chat/completions"
            async with session.post(url, json=payload, headers=auth) as r:
                assert r.status == 429  # every quota starts empty
            # Scaled 1000×, a minute's quota is back in 60 ms, and overflows after.
            await asyncio.sleep(0.2)
            async with session.post(url, json=payload, headers=auth) as r:
                assert r.status == 200 and r.headers["x-ratelimit-limit-requests"] == "60"
            async with session.get(base + "/wasted", params={"model": "a", "tokens": "0"}) as r:
                assert r.status == 200 and (await r.json())["wasted"] > 0
            async with session.get(base + "/wasted", params={"model": "zz"}) as r:
                assert r.status == 404


class _OverloadedThenLease:
    """A KeyService stub whose Get is refused as OVERLOADED ``refusals`` times, then leases."""

    def __init__(self, refusals: int) -> None:
        self.refusals = refusals
        self.get_times: list[float] = []

    async def Get(self, request: pb.GetRequest) -> pb.GetResponse:  # noqa: N802 (gRPC's name)
        self.get_times.append(time.monotonic())
        if len(self.get_times) <= self.refusals:
            raise _refusal("OVERLOADED")
        return pb.GetResponse(secret="sk-x", key=pb.Key(hash="oai-x"))

    async def ReportOutcome(self, request: pb.ReportOutcomeRequest) -> pb.ReportOutcomeResponse:  # noqa: N802
        return pb.ReportOutcomeResponse()


def _refusal(reason: str) -> grpc.aio.AioRpcError:
    info = error_details_pb2.ErrorInfo(reason=reason, domain="keysvc")
    status = status_pb2.Status(code=grpc.StatusCode.RESOURCE_EXHAUSTED.value[0], message=reason)
    status.details.add().Pack(info)
    trailing = grpc.aio.Metadata(("grpc-status-details-bin", status.SerializeToString()))
    return grpc.aio.AioRpcError(
        grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.aio.Metadata(), trailing, details=reason
    )


async def test_keysvc_loop_backs_off_when_keysvc_is_overloaded() -> None:
    stub = _OverloadedThenLease(refusals=2)

    async def upstream(secret: str, model: str, tokens: int) -> Answer:
        return Answer(200, {}, {"usage": {}})

    clock = SimTime(1.0)
    loop = ReportOutcomeLoop(stub, upstream, clock)  # type: ignore[arg-type]
    request = Request("gpt-4o", 10, arrived=clock.now(), deadline=clock.now() + 5.0)
    assert await loop.serve(request)
    assert len(stub.get_times) == 3
    gaps = [b - a for a, b in zip(stub.get_times, stub.get_times[1:], strict=False)]
    # Not an immediate retry: each refusal is followed by the back-off.
    assert all(gap >= ReportOutcomeLoop.OVERLOAD_BACKOFF * 0.9 for gap in gaps)
