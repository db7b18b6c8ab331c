"""Allocation simulator: proxies at 120 % of the keys' capacity against a live keysvc.

A fake upstream (bench/upstream.py, in a process of its own) enforces per-key,
per-model RPM and TPM limits and sends the six ``x-ratelimit-*`` headers. Requests arrive (Poisson,
the same schedule for every policy) at ``load`` × the aggregate capacity of
each model; each is served by a proxy loop (bench/proxy_loops.py) against a
keysvc server in its own process (bench/sim_server.py) over the real gRPC API.
Time is scaled: ``scale`` simulated seconds pass per real second, in keysvc
(its clock), the upstream and the proxies alike; every figure below is in
simulated time. A request gives up ``deadline`` after it arrived.

Figures cover the measurement window, after a warm-up:

- delivered share of capacity: per model, the binding quota delivered (tokens
  for a TPM-bound model, requests for an RPM-bound one) over that quota's
  capacity in the window; overall, weighted by each model's capacity;
- 429 share: upstream answers 429 over all upstream calls in the window;
- wait: from a request's arrival to its 200 (or its give-up), for requests
  that arrived in the window.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import random
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
import grpc

from keysvc.testing.redis import RedisServer
from keysvc.v1 import keysvc_pb2_grpc as pb_grpc

from . import aio
from .child import serving_module
from .pool_scale import secrets
from .proxy_loops import (
    Answer,
    KeysvcLoop,
    ProxyLoop,
    ReportOutcomeLoop,
    Request,
    SeedQueueLoop,
    SimTime,
)
from .report import Section, Target, percentile, table
from .upstream import ModelLimits, limits_json

__all__ = ["FLEET", "POLICIES", "REDIS_FLEET", "RUNS", "Scenario", "run", "simulate"]

#: Policy name → (the pool the keysvc server runs, the proxy loop). The baseline first.
#: To compare a new loop (e.g. ReportOutcome + Get(max_wait)), add or replace an entry.
#: The loops that use only the seed's RPCs report answers without a model, as the seed did.
POLICIES: dict[str, tuple[str, type[ProxyLoop]]] = {
    "seed": ("seed", SeedQueueLoop),
    "keysvc": ("keysvc", ReportOutcomeLoop),
    "seed-rpcs": ("keysvc", SeedQueueLoop),
    "keysvc-old-rpcs": ("keysvc", KeysvcLoop),
    "keysvc-redis": ("redis", ReportOutcomeLoop),
}
BASELINE = "seed"
CANDIDATE = "keysvc"
#: keysvc's pool driven by the other loops, each with its targets (share, 429 share).
KEYSVC_LOOPS = ("keysvc", "seed-rpcs", "keysvc-old-rpcs")
#: keysvc's loop against ``Scenario.replicas`` replicas sharing one pool in Redis.
REDIS = "keysvc-redis"
#: The policies of one pool in one process (the shared pool runs in its own scenario).
LOCAL_POLICIES = tuple(name for name in POLICIES if name != REDIS)

#: Pools that live inside each proxy's process, as the seed's provider did: with several
#: proxies, each proxy gets a server of its own, which learns only from that proxy's upstream
#: answers. The other pools are one keysvc server that every proxy asks.
PER_PROXY_POOLS = frozenset({"seed"})

TARGET_SHARE = 0.95
TARGET_429 = 0.02
#: keysvc-old-rpcs races GetLockoutPeriod against Get: proxies that saw 0 all call Get.
TARGET_429_RACING = 0.05
TARGET_FEWER_429 = 1.3


@dataclass(frozen=True, slots=True)
class Scenario:
    #: What the scenario stands for, before the proxies in its label ("" for the standard one).
    name: str = ""
    #: The upstream's quota shape (bench/upstream.py): "bucket" or "window".
    shape: str = "bucket"
    keys: int = 6
    #: Proxies sharing the keys. Arrivals go to them in turn (round robin, as a load balancer
    #: would); each proxy has its own gRPC channel and its own proxy loop.
    proxies: int = 1
    #: keysvc replicas on one Redis, for a shared pool (``REDIS``); proxy i asks replica
    #: i mod replicas.
    replicas: int = 1
    #: Per-key limits. gpt-4o is TPM-bound (30k TPM at 1,000 tokens a request: 30/min),
    #: gpt-4o-mini RPM-bound (20/min): 50 requests a minute per key in all.
    models: dict[str, ModelLimits] = field(
        default_factory=lambda: {
            "gpt-4o": ModelLimits(rpm=500, tpm=30_000),
            "gpt-4o-mini": ModelLimits(rpm=20, tpm=200_000),
        }
    )
    #: Tokens per request, uniform in [low, high].
    tokens: dict[str, tuple[int, int]] = field(
        default_factory=lambda: {"gpt-4o": (200, 1_800), "gpt-4o-mini": (200, 1_800)}
    )
    load: float = 1.2
    scale: float = 15.0
    warmup: float = 120.0
    measure: float = 600.0
    deadline: float = 60.0
    seed: int = 7

    def per_key_capacity(self, model: str) -> tuple[float, bool]:
        """Requests per simulated second one key can take for ``model``; True when TPM binds."""
        limits = self.models[model]
        low, high = self.tokens[model]
        by_tokens = limits.tpm / ((low + high) / 2)
        return min(limits.rpm, by_tokens) / 60.0, by_tokens < limits.rpm

    def capacity(self, model: str) -> float:
        return self.keys * self.per_key_capacity(model)[0]

    @property
    def label(self) -> str:
        proxies = "single proxy" if self.proxies == 1 else f"fleet of {self.proxies} proxies"
        shape = ", fixed windows" if self.shape == "window" else ""
        return f"{self.name}, {proxies}{shape}" if self.name else f"{proxies}{shape}"


#: The seed's deployment: several proxies share the keys, each with the seed's provider in
#: its own process. The same keys, load and times as the single-proxy scenario.
FLEET = Scenario(proxies=4)
#: Keys at their real limits: 3 keys at 3,000 RPM and 1,000,000 TPM, small requests, so
#: requests bind at 50 a second per key (the reuse throttle would allow 1). Real time: the
#: harness and keysvc carry 180 requests a second.
HIGH_LIMIT = Scenario(
    name="high-limit",
    keys=3,
    models={"gpt-4o-mini": ModelLimits(rpm=3_000, tpm=1_000_000)},
    tokens={"gpt-4o-mini": (50, 150)},
    scale=1.0,
    warmup=20.0,
    measure=60.0,
    # Short, so the 20 % over capacity that waits does not pile up thousands of calls.
    deadline=10.0,
)

#: The fleet on a shared pool: the same keys, load and proxies, the proxies spread over
#: three keysvc replicas on one Redis.
REDIS_FLEET = dataclasses.replace(FLEET, name="3 replicas on one Redis", replicas=3)

SMOKE = Scenario(keys=2, scale=60.0, warmup=30.0, measure=90.0, deadline=30.0)
SMOKE_FLEET = dataclasses.replace(SMOKE, keys=3, proxies=3)


@dataclass(slots=True)
class Outcome:
    policy: str
    share: float
    share_by_model: dict[str, float]
    calls: int
    rate_limited: int
    waits: list[float]
    arrived: int
    gave_up: int
    #: Share of the window's capacity lost because a key's quota sat full (unused).
    wasted: float
    #: How late the harness dispatched arrivals (p99, real seconds): it kept up if small.
    lag_p99: float
    #: Seed queues only: per model, the starts a second (simulated) their polls offered
    #: in the window, over every proxy.
    queue_offer: dict[str, float] | None = None
    #: Requests in the window that ended on a failed keysvc call, by status code.
    rpc_errors: dict[str, int] = field(default_factory=dict)
    #: Pool servers the proxies talked to (one per proxy for a pool in PER_PROXY_POOLS).
    servers: int = 1
    #: Requests that arrived in the window and got a 200, by proxy.
    served_by_proxy: list[int] = field(default_factory=list)

    @property
    def share_429(self) -> float:
        return self.rate_limited / self.calls if self.calls else 0.0

    @property
    def mean_wait(self) -> float:
        return sum(self.waits) / len(self.waits) if self.waits else 0.0


def _arrivals(scenario: Scenario, until: float) -> list[tuple[float, str, int]]:
    """(simulated time, model, tokens), Poisson per model at load × capacity."""
    rng = random.Random(scenario.seed)
    out: list[tuple[float, str, int]] = []
    for model in scenario.models:
        rate = scenario.load * scenario.capacity(model)
        t = rng.expovariate(rate)
        while t < until:
            out.append((t, model, rng.randint(*scenario.tokens[model])))
            t += rng.expovariate(rate)
    out.sort()
    return out


async def _simulate(
    policy: str, scenario: Scenario, ports: Sequence[int], upstream_url: str
) -> Outcome:
    """Proxy ``i`` talks to the server on ``ports[i % len(ports)]``; the upstream
    (``bench.upstream``, in a process of its own) is at ``upstream_url``."""
    loop_class = POLICIES[policy][1]
    clock = SimTime(scenario.scale)
    calls: list[tuple[float, int]] = []
    async with contextlib.AsyncExitStack() as stack:
        session = await stack.enter_async_context(
            aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(limit=0), timeout=aiohttp.ClientTimeout(total=60)
            )
        )
        # One channel per proxy, each with connections of its own (no subchannel sharing),
        # as separate proxy processes would have.
        channels = [
            await stack.enter_async_context(
                grpc.aio.insecure_channel(
                    f"127.0.0.1:{ports[i % len(ports)]}",
                    options=[("grpc.use_local_subchannel_pool", 1)],
                )
            )
            for i in range(scenario.proxies)
        ]
        url = upstream_url + "/chat/completions"

        async def wasted_so_far(model: str) -> float:
            tokens = "1" if scenario.per_key_capacity(model)[1] else "0"
            async with session.get(
                upstream_url + "/wasted", params={"model": model, "tokens": tokens}
            ) as response:
                response.raise_for_status()
                return float((await response.json())["wasted"])

        async def call_upstream(secret: str, model: str, tokens: int) -> Answer:
            async with session.post(
                url,
                json={"model": model, "max_tokens": tokens, "messages": []},
                headers={"Authorization": f"Bearer {secret}"},
            ) as response:
                body = await response.json()
                answer = Answer(response.status, dict(response.headers), body)
            calls.append((clock.now(), answer.status))
            return answer

        # aiohttp gives headers in their sent case; keysvc expects lower-case names.
        async def lower_case(secret: str, model: str, tokens: int) -> Answer:
            answer = await call_upstream(secret, model, tokens)
            headers = {
                k.lower(): v for k, v in answer.headers.items() if k.lower().startswith("x-")
            }
            return Answer(answer.status, headers, answer.body)

        loops = [
            loop_class(pb_grpc.KeyServiceStub(channel), lower_case, clock) for channel in channels
        ]
        for loop in loops:
            await loop.start()
        start = clock.now()
        window = (
            start + scenario.warmup / scenario.scale,
            start + (scenario.warmup + scenario.measure) / scenario.scale,
        )
        horizon = scenario.warmup + scenario.measure + scenario.deadline
        requests: list[Request] = []
        proxy_of: list[int] = []
        tasks: list[asyncio.Task[None]] = []
        lags: list[float] = []
        wasted_at: list[dict[str, float]] = []

        async def snapshot_waste() -> None:
            for edge in window:
                await asyncio.sleep(max(0.0, edge - clock.now()))
                wasted_at.append({m: await wasted_so_far(m) for m in scenario.models})

        waste_task = asyncio.create_task(snapshot_waste())

        async def one(loop: ProxyLoop, request: Request) -> None:
            try:
                request.ok = await loop.serve(request)
            except grpc.aio.AioRpcError as error:
                # A failed keysvc call ends the request, as it would in a proxy; counted.
                request.ok = False
                request.extra["rpc_error"] = error.code().name
            if not request.ok:
                request.done = clock.now()

        for index, (at, model, tokens) in enumerate(_arrivals(scenario, horizon)):
            real_at = start + at / scenario.scale
            delay = real_at - clock.now()
            if delay > 0:
                await asyncio.sleep(delay)
            now = clock.now()
            lags.append(now - real_at)
            request = Request(
                model, tokens, arrived=now, deadline=now + scenario.deadline / scenario.scale
            )
            requests.append(request)
            proxy_of.append(index % len(loops))
            tasks.append(asyncio.create_task(one(loops[proxy_of[-1]], request)))
        in_window = [
            (r, t)
            for r, t in zip(requests, tasks, strict=True)
            if window[0] <= r.arrived < window[1]
        ]
        await asyncio.gather(*(t for _, t in in_window))
        await waste_task
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for loop in loops:
            await loop.aclose()
        queue_offer: dict[str, float] | None = None
        if all(isinstance(loop, SeedQueueLoop) for loop in loops):
            queue_offer = {
                model: sum(
                    sum(1 for at in loop.polls.get(model, []) if window[0] <= at < window[1])
                    for loop in loops
                    if isinstance(loop, SeedQueueLoop)
                )
                / ((window[1] - window[0]) * scenario.scale)
                for model in scenario.models
            }

    measured = window[1] - window[0]
    share_by_model: dict[str, float] = {}
    weighted = 0.0
    for model in scenario.models:
        done = [
            r for r in requests if r.ok and r.model == model and window[0] <= r.done < window[1]
        ]
        per_key, token_bound = scenario.per_key_capacity(model)
        sim_seconds = measured * scenario.scale
        if token_bound:
            quota = scenario.keys * scenario.models[model].tpm / 60.0 * sim_seconds
            share = sum(r.tokens for r in done) / quota
        else:
            share = len(done) / (scenario.capacity(model) * sim_seconds)
        share_by_model[model] = share
        weighted += share * scenario.capacity(model)
    share = weighted / sum(scenario.capacity(m) for m in scenario.models)
    wasted = 0.0
    for model in scenario.models:
        lost = wasted_at[1][model] - wasted_at[0][model]
        per_key, token_bound = scenario.per_key_capacity(model)
        quota_rate = scenario.models[model].tpm if token_bound else scenario.models[model].rpm
        quota = scenario.keys * quota_rate / 60.0 * measured * scenario.scale
        wasted += lost / quota * scenario.capacity(model)
    wasted /= sum(scenario.capacity(m) for m in scenario.models)
    window_calls = [status for at, status in calls if window[0] <= at < window[1]]
    arrived = [r for r, _ in in_window]
    rpc_errors: dict[str, int] = {}
    for request in arrived:
        code = request.extra.get("rpc_error")
        if code is not None:
            rpc_errors[code] = rpc_errors.get(code, 0) + 1
    served_by_proxy = [0] * scenario.proxies
    for request, proxy in zip(requests, proxy_of, strict=True):
        if request.ok and window[0] <= request.arrived < window[1]:
            served_by_proxy[proxy] += 1
    return Outcome(
        policy=policy,
        share=share,
        share_by_model=share_by_model,
        calls=len(window_calls),
        rate_limited=sum(1 for s in window_calls if s == 429),
        waits=[(r.done - r.arrived) * scenario.scale for r in arrived],
        arrived=len(arrived),
        gave_up=sum(1 for r in arrived if not r.ok),
        wasted=wasted,
        lag_p99=percentile(lags, 0.99),
        servers=len(ports),
        served_by_proxy=served_by_proxy,
        rpc_errors=rpc_errors,
        queue_offer=queue_offer,
    )


def simulate(policy: str, scenario: Scenario) -> Outcome:
    """Runs ``policy`` through ``scenario`` against fresh servers: one keysvc for every
    proxy, or, for a pool in ``PER_PROXY_POOLS``, one per proxy (each over the same keys)."""
    keys = secrets(scenario.keys)
    pool = POLICIES[policy][0]
    servers = scenario.proxies if pool in PER_PROXY_POOLS else 1
    with tempfile.TemporaryDirectory(prefix="keysvc-sim-") as tmp, contextlib.ExitStack() as stack:
        keys_file = Path(tmp, "keys")
        keys_file.write_text("\n".join(keys) + "\n", encoding="utf-8")
        server: tuple[str, ...] = ("bench.sim_server", pool, str(scenario.scale), str(keys_file))
        if pool == "redis":
            redis = RedisServer(Path(tmp))
            redis.start()
            stack.callback(redis.stop)
            servers = scenario.replicas
            # One origin for the replicas' scaled clocks: they tell the same time.
            server += (redis.url, "sim", repr(time.time()))
        ports = [stack.enter_context(serving_module(*server))[1] for _ in range(servers)]
        upstream = ("bench.upstream", str(keys_file), repr(scenario.scale), scenario.shape)
        upstream_port = stack.enter_context(
            serving_module(*upstream, limits_json(scenario.models))
        )[1]
        return aio.run(_simulate(policy, scenario, ports, f"http://127.0.0.1:{upstream_port}/v1"))


def _ratio_429(ours: Outcome, theirs: Outcome) -> tuple[float, str, bool]:
    """How many times fewer 429s ``ours`` had than ``theirs``: (ratio, as shown, target met)."""
    if ours.share_429:
        fewer = theirs.share_429 / ours.share_429
        return fewer, f"{fewer:.2f}×", fewer >= TARGET_FEWER_429
    if theirs.share_429:
        return float("inf"), "keysvc had none", True
    # 0 ÷ 0 is no ratio: neither policy saw a 429, so "fewer" cannot be shown.
    return float("nan"), "no ratio: neither had a 429", False


def _scenario_text(scenario: Scenario, outcomes: dict[str, Outcome], elapsed: float) -> str:
    names = list(outcomes)

    def row(label: str, fmt: str, attr: str) -> tuple[str, ...]:
        return (label, *(fmt.format(getattr(outcomes[n], attr)) for n in names))

    rows = [
        row("delivered share of capacity", "{:.1%}", "share"),
        *[
            (f"… {model}", *(f"{outcomes[n].share_by_model[model]:.1%}" for n in names))
            for model in scenario.models
        ],
        row("upstream calls", "{:,}", "calls"),
        row("429 share of upstream calls", "{:.2%}", "share_429"),
        row("mean wait (s)", "{:.2f}", "mean_wait"),
        ("p99 wait (s)", *(f"{percentile(outcomes[n].waits, 0.99):.2f}" for n in names)),
        row("requests arrived", "{:,}", "arrived"),
        row("requests given up", "{:,}", "gave_up"),
        (
            "… of which a keysvc call failed",
            *(
                ", ".join(f"{n:,} {code}" for code, n in sorted(outcomes[p].rpc_errors.items()))
                or "0"
                for p in names
            ),
        ),
        row("capacity left unused (quota full)", "{:.1%}", "wasted"),
        ("harness lag p99 (real ms)", *(f"{outcomes[n].lag_p99 * 1000:.1f}" for n in names)),
    ]
    limits = "; ".join(
        f"{m}: {lim.rpm} RPM, {lim.tpm:,} TPM, {scenario.tokens[m][0]}–{scenario.tokens[m][1]} "
        f"tokens a request, answer in {lim.latency[0]}–{lim.latency[1]} s "
        f"({'TPM' if scenario.per_key_capacity(m)[1] else 'RPM'}-bound, "
        f"{scenario.per_key_capacity(m)[0] * 60:.0f} requests/min per key)"
        for m, lim in scenario.models.items()
    )
    if scenario.proxies == 1:
        proxies = "one proxy"
    else:
        per_proxy = "; ".join(
            f"{n}: a {POLICIES[n][0]} pool server per proxy, each learning only from its "
            "proxy's answers"
            if POLICIES[n][0] in PER_PROXY_POOLS
            else f"{n}: {scenario.replicas} keysvc replicas sharing one pool in one "
            "redis-server, proxy i asking replica i mod "
            f"{scenario.replicas}"
            if POLICIES[n][0] == "redis"
            else f"{n}: one {POLICIES[n][0]} server for every proxy"
            for n in names
        )
        proxies = (
            f"{scenario.proxies} proxies sharing the keys, arrivals dealt to them in turn "
            f"({per_proxy})"
        )
    return "\n".join(
        [
            f"### {scenario.label[0].upper()}{scenario.label[1:]}",
            "",
            f"Scenario: {scenario.keys} keys; {proxies}; {limits}; load "
            f"{scenario.load:.0%} of capacity; warm-up {scenario.warmup:.0f} s, window "
            f"{scenario.measure:.0f} s, give-up after {scenario.deadline:.0f} s; time "
            f"×{scenario.scale:g} (this run: {elapsed:.0f} real seconds for {len(names)} "
            "policies).",
            "",
            table(("", *names), rows),
        ]
    )


def offered_share(scenario: Scenario, outcome: Outcome) -> tuple[float, bool]:
    """The delivered share of what the proxies could ask for: of capacity, or, where the
    seed's queues (one start per model per 50 ms poll per proxy, fewer when the harness
    polls late) offered less than the keys can take, of that; True in that case."""
    if outcome.queue_offer is None:
        return outcome.share, False
    delivered = offered = capacity = 0.0
    for model in scenario.models:
        delivered += outcome.share_by_model[model] * scenario.capacity(model)
        offered += min(scenario.capacity(model), outcome.queue_offer[model])
        capacity += scenario.capacity(model)
    if offered >= capacity:
        return outcome.share, False
    return delivered / offered, True


def _targets(scenario: Scenario, outcomes: dict[str, Outcome]) -> list[Target]:
    """The share and 429 targets of keysvc's pool under each proxy loop, in every
    scenario; the 429 ratio to the seed is a target on a fleet (the deployment keysvc
    replaces) and shown for information on one proxy."""
    targets: list[Target] = []
    where = f"simulator, {scenario.label}"
    for name in (*KEYSVC_LOOPS, REDIS):
        if name not in outcomes:
            continue
        outcome = outcomes[name]
        share, of_queue = offered_share(scenario, outcome)
        goal = f"≥ {TARGET_SHARE:.0%}"
        figure = f"{share:.1%}"
        if of_queue:
            goal += " of what its queue can start"
            offer = sum((outcome.queue_offer or {}).values())
            figure += (
                f" of the {offer:.1f} starts/s its queue offered ({outcome.share:.1%} of capacity)"
            )
        limit_429 = TARGET_429_RACING if name == "keysvc-old-rpcs" else TARGET_429
        targets += [
            Target(
                f"delivered share of capacity, {name} ({where})",
                figure,
                goal,
                share >= TARGET_SHARE,
            ),
            Target(
                f"429 share of upstream calls, {name} ({where})",
                f"{outcome.share_429:.2%}",
                f"≤ {limit_429:.0%}",
                outcome.share_429 <= limit_429,
            ),
        ]
    if CANDIDATE in outcomes and BASELINE in outcomes:
        ours, theirs = outcomes[CANDIDATE], outcomes[BASELINE]
        _, figure, met = _ratio_429(ours, theirs)
        # The verdict alone hides what the seed got for its 429s: show both sides.
        figure += (
            f" (seed: {theirs.share_429:.2%} of calls, {theirs.share:.1%} of capacity;"
            f" keysvc: {ours.share_429:.2%}, {ours.share:.1%})"
        )
        if scenario.proxies > 1:
            targets.append(
                Target(
                    f"429 share, seed fleet ÷ keysvc fleet ({where})",
                    figure,
                    f"≥ {TARGET_FEWER_429}×",
                    met,
                )
            )
        else:
            targets.append(
                Target(
                    f"429 share, seed ÷ keysvc ({where})",
                    figure,
                    f"≥ {TARGET_FEWER_429}× is judged on the fleet: 0 ÷ 0 here",
                    met,
                    informational=True,
                )
            )
    return targets


#: What ``make bench`` runs: each scenario with the policies it compares (the baseline first).
#: The fixed-window runs measure whole minutes (every key's windows start as often).
RUNS: tuple[tuple[Scenario, tuple[str, ...]], ...] = (
    (Scenario(), LOCAL_POLICIES),
    (FLEET, LOCAL_POLICIES),
    (REDIS_FLEET, (REDIS,)),
    (HIGH_LIMIT, KEYSVC_LOOPS),
    (Scenario(shape="window"), KEYSVC_LOOPS),
    (dataclasses.replace(FLEET, shape="window"), KEYSVC_LOOPS),
    (dataclasses.replace(HIGH_LIMIT, shape="window", measure=120.0), KEYSVC_LOOPS),
)
SMOKE_RUNS: tuple[tuple[Scenario, tuple[str, ...]], ...] = (
    (SMOKE, LOCAL_POLICIES),
    (SMOKE_FLEET, (BASELINE, CANDIDATE)),
    (dataclasses.replace(SMOKE_FLEET, name=REDIS_FLEET.name, replicas=3), (REDIS,)),
)


def run(
    *, smoke: bool = False, runs: Sequence[tuple[Scenario, Sequence[str]]] | None = None
) -> Section:
    """Each scenario with its policies; one section, a table per scenario."""
    runs = runs or (SMOKE_RUNS if smoke else RUNS)
    texts: list[str] = []
    targets: list[Target] = []
    figures: dict[str, float] = {}
    names: set[str] = set()
    for scenario, policies in runs:
        started = time.monotonic()
        outcomes = {name: simulate(name, scenario) for name in policies}
        texts.append(_scenario_text(scenario, outcomes, time.monotonic() - started))
        targets += _targets(scenario, outcomes)
        names.update(policies)
        for name, outcome in outcomes.items():
            prefix = f"{scenario.label}:{name}"
            figures[f"{prefix}:share"] = outcome.share
            figures[f"{prefix}:share_429"] = outcome.share_429
            figures[f"{prefix}:mean_wait"] = outcome.mean_wait
            figures[f"{prefix}:calls"] = float(outcome.calls)
            figures[f"{prefix}:gave_up"] = float(outcome.gave_up)
            figures[f"{prefix}:servers"] = float(outcome.servers)
            if outcome.queue_offer is not None:
                figures[f"{prefix}:queue_offer"] = sum(outcome.queue_offer.values())
            for proxy, served in enumerate(outcome.served_by_proxy):
                figures[f"{prefix}:served:proxy{proxy}"] = float(served)
        if CANDIDATE in outcomes and BASELINE in outcomes:
            fewer = _ratio_429(outcomes[CANDIDATE], outcomes[BASELINE])[0]
            figures[f"{scenario.label}:fewer_429"] = fewer
    policies_text = "Policies: " + "; ".join(
        f"**{n}** = {POLICIES[n][0]} pool + {POLICIES[n][1].__name__}"
        f" ({' '.join((POLICIES[n][1].__doc__ or '').split())})"
        for n in POLICIES
        if n in names
    )
    body = [
        __doc__.split("\n\n", 1)[1].strip() if __doc__ else "",
        "",
        policies_text,
        "",
        "\n\n".join(texts),
    ]
    return Section("Allocation simulator", "\n".join(body), targets, figures)
