"""The key checker against httpx.MockTransport: the error table, trial, orgs, scheduling."""

from __future__ import annotations

import json
import random
from collections.abc import Callable
from typing import Any

import httpx
import pytest

from keysvc.checker import (
    CheckerConfig,
    KeyChecker,
    Verdict,
    classify,
    host_offset,
    is_trial_limit,
    next_slot,
    retry_delay,
)
from keysvc.clock import ManualClock
from keysvc.keys import DisableReason, Key, hash_key
from keysvc.models import ModelTable
from keysvc.pool import KeyPool
from tests.helpers import make_pool

MODELS = ["gpt-3.5-turbo", "gpt-4", "gpt-4o", "text-embedding-ada-002"]
ORGS = [{"id": "org-default", "is_default": True}]

Reply = tuple[int, Any, dict[str, str]]


def err(type_: str, code: str | None = None) -> dict[str, Any]:
    return {"error": {"message": "m", "type": type_, "param": None, "code": code}}


ALIVE_400: Reply = (400, err("invalid_request_error", "integer_below_min_value"), {})


def handler(
    *,
    models: Reply = (200, {"object": "list", "data": [{"id": m} for m in MODELS]}, {}),
    liveness: Reply = ALIVE_400,
    organizations: Reply = (200, {"object": "list", "data": ORGS}, {}),
    seen: list[httpx.Request] | None = None,
) -> Callable[[httpx.Request], httpx.Response]:
    def handle(request: httpx.Request) -> httpx.Response:
        if seen is not None:
            seen.append(request)
        path = request.url.path
        reply = {
            "/v1/models": models,
            "/v1/chat/completions": liveness,
            "/v1/organizations": organizations,
        }[path]
        status, body, headers = reply
        if isinstance(body, (dict, list)):
            return httpx.Response(status, json=body, headers=headers)
        return httpx.Response(status, content=str(body).encode(), headers=headers)

    return handle


def make_checker(
    pool: KeyPool,
    clock: ManualClock,
    handle: Callable[[httpx.Request], httpx.Response],
    **config: Any,
) -> KeyChecker:
    config.setdefault("base_url", "http://127.0.0.1:9/v1")
    config.setdefault("recheck_interval", 0)
    return KeyChecker(
        pool,
        clock=clock,
        config=CheckerConfig(**config),
        transport=httpx.MockTransport(handle),
        rng=random.Random(7),
    )


async def check_one(**replies: Reply) -> tuple[Key, Verdict, KeyChecker]:
    pool, clock = make_pool(["sk-test"])
    key = pool.keys()[0]
    checker = make_checker(pool, clock, handler(**replies))
    async with checker:
        verdict = await checker.check_key(key)
    return key, verdict, checker


# -- the error table, row by row ------------------------------------------------------


async def test_live_key_learns_models_families_and_default_org() -> None:
    key, verdict, checker = await check_one()
    assert verdict is Verdict.ALIVE
    assert not key.is_disabled and key.last_checked > 0
    assert key.model_ids == frozenset(MODELS)
    assert key.model_families == frozenset({"turbo", "gpt4", "gpt4o"})
    assert key.organization_id == "org-default"
    assert not key.is_trial
    assert checker.retrying == 0


async def test_liveness_probe_is_the_zero_cost_request() -> None:
    seen: list[httpx.Request] = []
    pool, clock = make_pool(["sk-test"])
    async with make_checker(pool, clock, handler(seen=seen)) as checker:
        await checker.check_key(pool.keys()[0])
    by_path = {r.url.path: r for r in seen}
    assert set(by_path) == {"/v1/models", "/v1/chat/completions", "/v1/organizations"}
    probe = by_path["/v1/chat/completions"]
    assert probe.method == "POST"
    assert json.loads(probe.content) == {
        "model": "babbage-002",
        "max_tokens": -1,
        "messages": [{"role": "user", "content": ""}],
    }
    assert all(r.headers["authorization"] == "Bearer sk-test" for r in seen)
    assert all("openai-organization" not in r.headers for r in seen)


async def test_401_revokes() -> None:
    key, verdict, _ = await check_one(
        liveness=(401, err("invalid_request_error", "invalid_api_key"), {}),
        models=(401, err("invalid_request_error", "invalid_api_key"), {}),
    )
    assert verdict is Verdict.DEAD
    assert key.is_disabled and key.is_revoked and key.disable_reason is DisableReason.REVOKED


@pytest.mark.parametrize("code", ["insufficient_quota", "billing_not_active"])
async def test_429_quota_codes_mean_over_quota(code: str) -> None:
    key, verdict, _ = await check_one(liveness=(429, err(code, code), {}))
    assert verdict is Verdict.DEAD
    assert key.is_disabled and key.is_over_quota and not key.is_revoked
    assert key.disable_reason is DisableReason.QUOTA


async def test_429_access_terminated_revokes() -> None:
    key, _, _ = await check_one(liveness=(429, err("access_terminated", "access_terminated"), {}))
    assert key.is_disabled and key.is_revoked


async def test_trial_429_requests_means_over_quota() -> None:
    headers = {"x-ratelimit-limit-requests": "200"}
    key, _, _ = await check_one(liveness=(429, err("requests", "rate_limit_exceeded"), headers))
    assert key.is_disabled and key.is_over_quota


@pytest.mark.parametrize(
    "body",
    [err("requests", "rate_limit_exceeded"), err("tokens", "rate_limit_exceeded"), err("other")],
)
async def test_other_429s_leave_the_key_alive(body: dict[str, Any]) -> None:
    headers = {"x-ratelimit-limit-requests": "3500"}
    key, verdict, checker = await check_one(liveness=(429, body, headers))
    assert verdict is Verdict.ALIVE
    assert not key.is_disabled and key.last_checked > 0
    assert key.model_ids == frozenset(MODELS)
    assert checker.retrying == 0


async def test_400_billing_hard_limit_means_over_quota() -> None:
    key, _, _ = await check_one(
        liveness=(400, err("invalid_request_error", "billing_hard_limit_reached"), {})
    )
    assert key.is_disabled and key.is_over_quota


@pytest.mark.parametrize(
    "liveness",
    [
        (403, err("invalid_request_error", "unsupported_country_region_territory"), {}),
        (404, err("invalid_request_error", "model_not_found"), {}),
        (500, err("server_error"), {}),
        (502, "<html>Bad gateway</html>", {}),
        (400, "<html>400 from a proxy in between</html>", {}),
        (401, "not json at all", {}),
        (429, {"detail": "not an OpenAI error"}, {}),
    ],
)
async def test_other_statuses_and_foreign_bodies_change_nothing_and_retry(liveness: Reply) -> None:
    key, verdict, checker = await check_one(liveness=liveness)
    assert verdict is Verdict.RETRY
    assert not key.is_disabled and key.last_checked == 0
    assert key.model_ids is None  # nothing applied
    assert checker.retrying == 1


async def test_network_errors_change_nothing_and_retry() -> None:
    def refuse(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("connection refused", request=request)

    pool, clock = make_pool(["sk-test"])
    key = pool.keys()[0]
    async with make_checker(pool, clock, refuse) as checker:
        assert await checker.check_key(key) is Verdict.RETRY
    assert not key.is_disabled and key.last_checked == 0 and checker.retrying == 1


async def test_garbage_model_list_keeps_key_alive_but_retries() -> None:
    key, verdict, checker = await check_one(models=(200, "garbage{", {}))
    assert verdict is Verdict.ALIVE
    assert not key.is_disabled and key.model_ids is None
    assert checker.retrying == 1


# -- trial detection -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("header", "trial"),
    [
        ("3", True),
        ("200", True),
        ("250", True),
        ("251", False),
        ("3500", False),
        (None, False),
        ("lots", False),
    ],
)
def test_trial_detection_from_limit_header(header: str | None, trial: bool) -> None:
    headers = {} if header is None else {"x-ratelimit-limit-requests": header}
    assert is_trial_limit(headers) is trial


async def test_trial_key_is_marked_and_excluded_from_embeddings() -> None:
    key, _, _ = await check_one(liveness=(*ALIVE_400[:2], {"x-ratelimit-limit-requests": "200"}))
    assert key.is_trial and not key.is_disabled


# -- organizations ---------------------------------------------------------------------


async def test_multi_org_key_is_cloned_per_other_org() -> None:
    orgs = [
        {"id": "org-a", "is_default": False},
        {"id": "org-main", "is_default": True},
        {"id": "org-b", "is_default": False},
    ]
    seen: list[httpx.Request] = []
    pool, clock = make_pool(["sk-multi"])
    parent = pool.keys()[0]
    handle = handler(organizations=(200, {"data": orgs}, {}), seen=seen)
    async with make_checker(pool, clock, handle) as checker:
        await checker.step()
        assert parent.organization_id == "org-main"
        clones = {k.organization_id: k for k in pool.keys() if k is not parent}
        assert set(clones) == {"org-a", "org-b"}
        for org, clone in clones.items():
            assert clone.hash == hash_key("sk-multi", org)
            assert clone.last_checked == 0 and clone.cloned_from == parent.hash
        assert checker.pending == 2  # the clones wait for their own check
        seen.clear()
        await checker.check_key(clones["org-a"])
    assert clones["org-a"].last_checked > 0
    assert {r.url.path for r in seen} == {"/v1/models", "/v1/chat/completions"}
    assert all(r.headers["openai-organization"] == "org-a" for r in seen)
    assert len(pool) == 3  # checking a clone clones nothing


async def test_service_account_clone_sends_no_org_header() -> None:
    seen: list[httpx.Request] = []
    pool, clock = make_pool(["sk-svcacct-x"])
    parent = pool.keys()[0]
    clone = pool.clone_for_org(parent.hash, "org-b")
    assert clone is not None
    async with make_checker(pool, clock, handler(seen=seen)) as checker:
        await checker.check_key(clone)
    assert seen and all("openai-organization" not in r.headers for r in seen)


@pytest.mark.parametrize("code", ["invalid_api_key", "no_organization"])
async def test_expected_org_errors_are_ignored(code: str) -> None:
    key, verdict, checker = await check_one(
        organizations=(401, err("invalid_request_error", code), {})
    )
    assert verdict is Verdict.ALIVE and not key.is_disabled
    assert key.organization_id == ""
    assert checker.retrying == 0


async def test_org_listing_5xx_retries_but_key_is_alive() -> None:
    key, verdict, checker = await check_one(organizations=(503, "down", {}))
    assert verdict is Verdict.ALIVE and not key.is_disabled
    assert checker.retrying == 1


# -- pure pieces --------------------------------------------------------------------------


def test_classify_table() -> None:
    assert classify(401, err("x"), trial=False).reason is DisableReason.REVOKED
    assert classify(429, err("insufficient_quota"), trial=False).reason is DisableReason.QUOTA
    assert classify(429, err("x", "billing_not_active"), trial=False).reason is DisableReason.QUOTA
    assert classify(429, err("access_terminated"), trial=False).reason is DisableReason.REVOKED
    assert classify(429, err("requests"), trial=True).reason is DisableReason.QUOTA
    assert classify(429, err("requests"), trial=False).verdict is Verdict.BUSY
    assert classify(429, err("tokens"), trial=True).verdict is Verdict.BUSY
    assert classify(400, err("x", "billing_hard_limit_reached"), trial=False).reason is (
        DisableReason.QUOTA
    )
    assert classify(400, err("invalid_request_error"), trial=False).verdict is Verdict.ALIVE
    for status in (403, 404, 500, 503):
        assert classify(status, err("x"), trial=False).verdict is Verdict.RETRY
    assert classify(401, None, trial=False).verdict is Verdict.RETRY
    assert classify(401, {"error": "flat string"}, trial=False).verdict is Verdict.RETRY


def test_backoff_is_exponential_with_jitter_and_a_floor() -> None:
    config = CheckerConfig(retry_base=2.0, retry_max=60.0, retry_floor=1.0)
    rng = random.Random(1)
    for attempt in range(1, 12):
        nominal = min(60.0, 2.0 * 2 ** (attempt - 1))
        delays = [retry_delay(attempt, config, rng) for _ in range(200)]
        assert min(delays) >= nominal * 0.75 and max(delays) <= nominal * 1.25
        assert max(delays) - min(delays) > nominal * 0.3  # the jitter is really there
    tiny = CheckerConfig(retry_base=0.01, retry_floor=1.0)
    assert retry_delay(1, tiny, rng) == 1.0


def test_full_recheck_slots_are_offset_per_host() -> None:
    a, b = host_offset(28800, "host-a"), host_offset(28800, "host-b")
    assert 0 <= a < 28800 and 0 <= b < 28800 and a != b
    assert host_offset(28800, "host-a") == a
    assert next_slot(1000.0, 100.0, 30.0) == 1030.0
    assert next_slot(1030.0, 100.0, 30.0) == 1130.0


# -- scheduling on a manual clock -----------------------------------------------------------


async def test_batches_of_twelve_at_least_check_interval_apart() -> None:
    seen: list[httpx.Request] = []
    pool, clock = make_pool([f"sk-{i}" for i in range(30)])
    async with make_checker(pool, clock, handler(seen=seen), check_interval=3.0) as checker:
        assert await checker.step() == 3.0
        assert len({r.headers["authorization"] for r in seen}) == 12
        clock.advance(2.9)
        assert await checker.step() == pytest.approx(0.1)
        assert len(seen) == 36  # nothing new within 3 s
        clock.advance(0.1)
        await checker.step()
        assert len(seen) == 72
        clock.advance(3)
        assert await checker.step() == float("inf")  # all done, no full recheck configured
    assert len(seen) == 90
    assert all(key.last_checked for key in pool.keys())


async def test_transient_failure_retries_with_backoff_then_succeeds() -> None:
    answers = iter([500, 500, 500, 400, 400])  # liveness per attempt
    seen: list[float] = []
    pool, clock = make_pool(["sk-flaky"])
    key = pool.keys()[0]

    def handle(request: httpx.Request) -> httpx.Response:
        if request.url.path == "/v1/chat/completions":
            seen.append(clock.now())
            status = next(answers)
            return httpx.Response(status, json=err("server_error" if status == 500 else "x"))
        return handler()(request)

    start = clock.now()
    async with make_checker(
        pool, clock, handle, check_interval=0.5, retry_base=4.0, retry_floor=1.0
    ) as checker:
        for _ in range(400):
            delay = await checker.step()
            if key.last_checked:
                break
            clock.advance(min(delay, 0.25))
    assert key.last_checked and not key.is_disabled
    gaps = [b - a for a, b in zip([start, *seen], seen, strict=False)][1:]
    # attempts 1, 2, 3 failed: backoffs ~4, ~8, ~16 s ±25 % (+ up to one 0.25 s step)
    for gap, nominal in zip(gaps, [4.0, 8.0, 16.0], strict=True):
        assert nominal * 0.75 <= gap <= nominal * 1.25 + 0.25


async def test_recheck_wakes_and_dead_keys_stay_out_until_alive() -> None:
    live_answer: dict[str, Reply] = {
        "sk-dead": (401, err("invalid_request_error", "invalid_api_key"), {}),
        "sk-live": ALIVE_400,
    }

    def handle(request: httpx.Request) -> httpx.Response:
        secret = request.headers["authorization"].removeprefix("Bearer ")
        if request.url.path == "/v1/chat/completions":
            return handler(liveness=live_answer[secret])(request)
        return handler()(request)

    pool, clock = make_pool(["sk-dead", "sk-live"])
    dead, live = pool.keys()
    async with make_checker(pool, clock, handle, check_interval=3.0) as checker:
        await checker.step()
        assert dead.is_revoked and not live.is_disabled
        live_answer["sk-dead"] = ALIVE_400  # the account was fixed upstream
        clock.advance(10)
        await checker.recheck()
        assert dead.is_disabled and checker.pending == 2
        for _ in range(5):
            assert pool.get("gpt-4") is live  # not the dead key while its check is pending
            clock.advance(1.5)
        await checker.step()
    assert not dead.is_disabled and dead.last_checked > 0


async def test_periodic_full_recheck_rechecks_live_keys_only() -> None:
    seen: list[httpx.Request] = []
    pool, clock = make_pool(["sk-a", "sk-b"])
    a, b = pool.keys()
    pool.disable(b.hash, DisableReason.MANUAL)
    async with make_checker(
        pool, clock, handler(seen=seen), recheck_interval=100.0, recheck_offset=0.0
    ) as checker:
        await checker.step()
        assert len(seen) == 3 and a.last_checked  # initial check; disabled key skipped
        first = a.last_checked
        seen.clear()
        wait = await checker.step()
        assert 0 < wait <= 100
        clock.advance(wait)
        await checker.step()
        assert len(seen) == 3 and a.last_checked > first
        assert b.is_disabled and not b.last_checked


async def test_each_finished_check_is_reported_to_the_pool_observer() -> None:
    outcomes: list[str] = []

    class Recorder:
        def handed_out(self, family: str) -> None: ...
        def tokens_used(self, family: str, tokens: int) -> None: ...
        def state_changed(self, key_hash: str, change: Any, reason: str) -> None: ...
        def check_result(self, outcome: str) -> None:
            outcomes.append(outcome)

        def outcome_reported(self, action: str) -> None: ...

    clock = ManualClock()
    pool = KeyPool.from_secrets(
        ["sk-alive", "sk-revoked"], models=ModelTable(), clock=clock, observer=Recorder()
    )

    def handle(request: httpx.Request) -> httpx.Response:
        if request.headers["authorization"] == "Bearer sk-revoked":
            return httpx.Response(401, json=err("invalid_request_error", "invalid_api_key"))
        return handler()(request)

    async with make_checker(pool, clock, handle) as checker:
        await checker.step()
    assert sorted(outcomes) == ["alive", "revoked"]
