"""The key checker against the fake Anthropic upstream over real loopback sockets,
one key per scenario, beside OpenAI keys checked against the fake OpenAI upstream."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

from keysvc.checker import CheckerConfig, KeyChecker
from keysvc.clock import SystemClock
from keysvc.keys import DisableReason
from keysvc.models import DEFAULT_RULES, ModelTable
from keysvc.pool import KeyPool
from keysvc.providers.anthropic.models import RULES as ANTHROPIC_RULES
from keysvc.testing.fake_anthropic import SCENARIOS, FakeAnthropic, FakeError, Scenario
from keysvc.testing.fake_openai import SCENARIOS as OPENAI_SCENARIOS
from keysvc.testing.fake_openai import FakeOpenAI

OPUS, SONNET, HAIKU = "claude-opus", "claude-sonnet", "claude-haiku"


def mixed_pool(secrets: list[str]) -> KeyPool:
    models = ModelTable((*ANTHROPIC_RULES, *DEFAULT_RULES))
    return KeyPool.from_secrets(secrets, models=models, clock=SystemClock())


def config(openai_url: str, anthropic_url: str, **overrides: Any) -> CheckerConfig:
    settings: dict[str, Any] = {
        "base_url": openai_url,
        "anthropic_base_url": anthropic_url,
        "timeout": 5.0,
        "check_interval": 0.05,
        "recheck_interval": 0,
        "retry_base": 0.2,
        "retry_floor": 0.05,
    }
    settings.update(overrides)
    return CheckerConfig(**settings)


@contextlib.asynccontextmanager
async def running(checker: KeyChecker) -> AsyncIterator[None]:
    task = asyncio.create_task(checker.run())
    try:
        yield
    finally:
        task.cancel()
        await asyncio.wait([task])


async def wait_for(predicate: Callable[[], bool], timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        await asyncio.sleep(0.02)


CREDIT_ON_COUNT = Scenario(
    count_error=FakeError(
        400, "invalid_request_error", "Your credit balance is too low to access the Anthropic API."
    )
)


async def test_every_anthropic_scenario_beside_openai_keys() -> None:
    ant = {f"sk-ant-{name}": SCENARIOS[name] for name in SCENARIOS}
    ant["sk-ant-credit-on-count"] = CREDIT_ON_COUNT
    oai = {"sk-valid": OPENAI_SCENARIOS["valid"], "sk-revoked": OPENAI_SCENARIOS["revoked"]}
    with FakeAnthropic(ant) as fake_ant, FakeOpenAI(oai) as fake_oai:
        pool = mixed_pool([*ant, *oai, "sk-ant-unknown"])
        keys = {k.secret: k for k in pool.keys()}
        checker = KeyChecker(
            pool, clock=SystemClock(), config=config(fake_oai.base_url, fake_ant.base_url)
        )
        async with running(checker):
            await wait_for(
                lambda: all(k.last_checked for s, k in keys.items() if s != "sk-ant-garbage")
            )
        requests = fake_ant.requests
        assert checker._client.is_closed

    # Anthropic keys went to the Anthropic fake only, with x-api-key; OpenAI keys never did.
    assert {r.key for r in requests} <= set(ant) | {"sk-ant-unknown"}
    assert {r.key for r in fake_oai.requests} == set(oai)
    # The model list and one count_tokens per family; never a Messages request (it costs).
    assert {r.path for r in requests} == {"/v1/models", "/v1/messages/count_tokens"}
    probed = [r.model for r in requests if r.key == "sk-ant-valid" and r.path.endswith("tokens")]
    assert sorted(probed) == [  # the first listed model of each family
        "claude-3-5-haiku-20241022",
        "claude-opus-4-1-20250805",
        "claude-sonnet-4-5-20250929",
    ]

    valid = keys["sk-ant-valid"]
    assert valid.service == "anthropic" and valid.hash.startswith("ant-")
    assert not valid.is_disabled and valid.model_families == {OPUS, SONNET, HAIKU}
    assert keys["sk-ant-haiku-only"].model_families == {HAIKU}
    assert keys["sk-ant-trial"].is_trial and not keys["sk-ant-tier-1"].is_trial
    for secret in ("sk-ant-revoked", "sk-ant-unknown"):
        assert keys[secret].is_revoked and keys[secret].disable_reason is DisableReason.REVOKED
    credit = keys["sk-ant-credit-on-count"]
    assert credit.is_over_quota and credit.disable_reason is DisableReason.QUOTA
    # What the free probes cannot see: a spend limit, a spent credit, Messages rate
    # limits and overload all show on Messages requests only, so those keys check alive.
    for name in ("spend-limit", "credit-low", "rate-limited", "overloaded", "no-opus"):
        assert not keys[f"sk-ant-{name}"].is_disabled, name
    # A 403 on a family's probe: the key is alive, without that family.
    assert keys["sk-ant-no-opus"].model_families == {SONNET, HAIKU}
    # A 529 on the first calls is retried: the flaky key is checked alive in the end.
    flaky = [r.status for r in requests if r.key == "sk-ant-flaky"]
    assert flaky[:2] == [529, 529] and not keys["sk-ant-flaky"].is_disabled
    # The OpenAI keys were checked as before.
    assert keys["sk-revoked"].is_revoked and not keys["sk-valid"].is_disabled
    # No model list: never settled, retried, never disabled.
    assert not keys["sk-ant-garbage"].last_checked and not keys["sk-ant-garbage"].is_disabled
