"""A mixed pool (OpenAI and Anthropic keys) on a manual clock: Get picks the provider
from the model, and each provider's answers are read by its own tables."""

from __future__ import annotations

import logging
from datetime import UTC, datetime

import pytest

from keysvc.clock import ManualClock
from keysvc.errors import NoKeysForFamily
from keysvc.keys import DisableReason, Key
from keysvc.models import ModelTable
from keysvc.outcomes import OutcomeAction, UpstreamError
from keysvc.pool import KEY_REUSE_DELAY, KeyPool

OAI, ANT = "sk-mixed-openai-1", "sk-ant-mixed-1"
OK = UpstreamError()
CLAUDE = {"claude-opus", "claude-sonnet", "claude-haiku", "claude"}
SONNET, OPUS = "claude-sonnet-4-5", "claude-opus-4-1"
START = datetime(2026, 5, 17, 12, 0, 0, tzinfo=UTC).timestamp()


def mixed(*secrets: str) -> tuple[KeyPool, ManualClock, list[Key]]:
    clock = ManualClock(START)
    pool = KeyPool.from_secrets(secrets or (OAI, ANT), models=ModelTable(), clock=clock)
    return pool, clock, pool.keys()


def rfc3339(at: float) -> str:
    return datetime.fromtimestamp(at, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def test_get_picks_the_provider_from_the_model() -> None:
    pool, clock, (oai, ant) = mixed()
    assert ant.service == "anthropic" and ant.hash.startswith("ant-")
    assert ant.model_families == CLAUDE and not (oai.model_families & CLAUDE)
    for _ in range(5):
        assert pool.get("gpt-4o") is oai
        assert pool.get(SONNET) is ant
        assert pool.get("claude-3-haiku-20240307") is ant
        clock.advance(0.3)  # both locked by the reuse throttle: still never the other one


def test_no_key_of_the_provider_is_a_clear_error() -> None:
    pool, _, _ = mixed(OAI)
    with pytest.raises(NoKeysForFamily, match="claude-sonnet"):
        pool.get(SONNET)
    pool, _, _ = mixed(ANT)
    with pytest.raises(NoKeysForFamily, match="gpt4o"):
        pool.get("gpt-4o")


def test_the_checker_lists_each_providers_own_families() -> None:
    pool, _, (oai, ant) = mixed()
    pool.apply_check(ant.hash, model_ids=["claude-opus-4-1", "claude-3-haiku"], is_trial=False)
    pool.apply_check(oai.hash, model_ids=["gpt-4o", "claude-opus-4-1"], is_trial=False)
    assert ant.model_families == {"claude-opus", "claude-haiku"}
    assert oai.model_families == {"gpt4o"}


def test_anthropic_headers_lock_the_key_until_the_named_reset() -> None:
    pool, clock, (_, ant) = mixed()
    pool.get(SONNET)
    reset = rfc3339(clock.now() + 30)
    headers = {
        "anthropic-ratelimit-requests-limit": "50",
        "anthropic-ratelimit-requests-remaining": "0",
        "anthropic-ratelimit-requests-reset": reset,
    }
    pool.report_outcome(ant.hash, SONNET, status=200, headers=headers, error=OK)
    # None left, all 50 back in the 30 s to the named reset: the next one in 30/50 s
    # (the budget's steady refill), not the 1 s reuse throttle.
    assert pool.lockout_period(SONNET) == pytest.approx(30 / 50, abs=1e-3)
    # OpenAI's names mean nothing on an Anthropic key.
    pool2, clock2, (_, ant2) = mixed()
    pool2.get(SONNET)
    foreign = {"x-ratelimit-remaining-requests": "0", "x-ratelimit-reset-requests": "30s"}
    pool2.report_outcome(ant2.hash, SONNET, status=200, headers=foreign, error=OK)
    clock2.advance(KEY_REUSE_DELAY)
    assert pool2.lockout_period(SONNET) == 0.0


def test_a_429_rests_the_key_until_retry_after() -> None:
    pool, clock, (_, ant) = mixed()
    pool.get(SONNET)
    error = UpstreamError("rate_limit_error", "", "over your rate limit")
    decision, _ = pool.report_outcome(
        ant.hash, SONNET, status=429, headers={"retry-after": "20"}, error=error
    )
    assert decision.action is OutcomeAction.RETRY_WITH_ANOTHER_KEY and decision.rate_limited
    assert pool.lockout_period(SONNET) == pytest.approx(20.0)
    assert pool.get("claude-haiku-4-5") is ant  # the limit is the family's
    clock.advance(20.0)
    assert pool.lockout_period(SONNET) == 0.0


def test_a_529_leaves_the_key_usable_and_backs_off_the_provider() -> None:
    pool, clock, (oai, ant) = mixed()
    overloaded = UpstreamError("overloaded_error", "", "Overloaded")
    waits = []
    for _ in range(3):
        pool.get(SONNET)
        decision, key = pool.report_outcome(
            ant.hash, SONNET, status=529, headers={}, error=overloaded
        )
        assert decision.action is OutcomeAction.RETRY_WITH_ANOTHER_KEY and decision.overloaded
        assert not key.is_disabled and not decision.rate_limited
        assert decision.retry_after is not None
        waits.append(decision.retry_after)
        clock.advance(KEY_REUSE_DELAY)
        assert pool.lockout_period(SONNET) == 0.0  # the key itself is not locked
    assert waits[0] > 0 and waits[1] > waits[0] and waits[2] > waits[1]  # backing off
    pool.get(SONNET)
    done, _ = pool.report_outcome(ant.hash, SONNET, status=200, headers={}, error=OK)
    assert done.retry_after is None
    pool.get(SONNET)
    again, _ = pool.report_outcome(ant.hash, SONNET, status=529, headers={}, error=overloaded)
    assert again.retry_after == pytest.approx(waits[0])  # a success ended the back-off
    assert pool.get("gpt-4o") is oai  # OpenAI is not held back


def test_a_spend_limit_benches_the_key_until_the_named_time() -> None:
    pool, clock, (_, ant) = mixed()
    until = clock.now() + 3 * 3600
    message = (
        f"You have reached your specified API usage limits. Usage blocked until {rfc3339(until)}."
    )
    pool.get(SONNET)
    decision, key = pool.report_outcome(
        ant.hash,
        SONNET,
        status=429,
        headers={},
        error=UpstreamError("invalid_request_error", "", message),
    )
    assert decision.disable is DisableReason.QUOTA and decision.quota_until == until
    assert key.is_over_quota and key.over_quota_until == until
    with pytest.raises(NoKeysForFamily):
        pool.get(SONNET)
    clock.advance(3 * 3600 - 1)
    with pytest.raises(NoKeysForFamily):
        pool.get(SONNET)
    clock.advance(1)
    assert pool.get(SONNET) is ant  # back on its own
    assert not ant.is_over_quota and not ant.is_disabled and ant.over_quota_until == 0.0


def test_a_403_takes_the_key_out_of_that_family_only() -> None:
    pool, _, (_, ant) = mixed()
    pool.get(OPUS)
    denied = UpstreamError("permission_error", "", "no access to claude-opus")
    decision, key = pool.report_outcome(ant.hash, OPUS, status=403, headers={}, error=denied)
    assert decision.family_denied and not key.is_disabled
    assert "claude-opus" not in key.model_families
    with pytest.raises(NoKeysForFamily, match="claude-opus"):
        pool.get(OPUS)
    assert pool.get(SONNET) is ant


def test_a_401_revokes_an_anthropic_key_and_the_log_names_its_provider(
    caplog: pytest.LogCaptureFixture,
) -> None:
    pool, _, (_, ant) = mixed()
    error = UpstreamError("authentication_error", "", "invalid x-api-key")
    with caplog.at_level(logging.INFO, logger="keysvc.pool"):
        pool.report_outcome(ant.hash, SONNET, status=401, headers={}, error=error)
    assert ant.is_revoked and ant.is_disabled
    (record,) = [r for r in caplog.records if r.getMessage() == "key revoked"]
    assert record.key_hash == ant.hash and record.provider == "anthropic"
