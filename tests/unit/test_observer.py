"""The pool reports hand-outs, tokens and key state changes to its observer, and logs
each state change once with its reason."""

from __future__ import annotations

import logging

import pytest

from keysvc.clock import ManualClock
from keysvc.events import KeyChange
from keysvc.keys import DisableReason
from keysvc.models import ModelTable
from keysvc.pool import KeyPool

SECRETS = ["sk-observer-one-0000000000", "sk-observer-two-0000000000"]


class Recorder:
    def __init__(self) -> None:
        self.handouts: list[str] = []
        self.tokens: list[tuple[str, int]] = []
        self.changes: list[tuple[str, KeyChange, str]] = []
        self.checks: list[str] = []
        self.outcomes: list[str] = []

    def handed_out(self, family: str) -> None:
        self.handouts.append(family)

    def tokens_used(self, family: str, tokens: int) -> None:
        self.tokens.append((family, tokens))

    def state_changed(self, key_hash: str, change: KeyChange, reason: str) -> None:
        self.changes.append((key_hash, change, reason))

    def check_result(self, outcome: str) -> None:
        self.checks.append(outcome)

    def outcome_reported(self, action: str) -> None:
        self.outcomes.append(action)


def observed_pool() -> tuple[KeyPool, Recorder, ManualClock]:
    recorder = Recorder()
    clock = ManualClock()
    pool = KeyPool.from_secrets(SECRETS, models=ModelTable(), clock=clock, observer=recorder)
    return pool, recorder, clock


def change_logs(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.name == "keysvc.pool" and r.msg.startswith("key ")]


def test_handouts_and_tokens_are_reported_by_family() -> None:
    pool, recorder, _ = observed_pool()
    key = pool.get("gpt-4o")
    pool.get("gpt-3.5-turbo")
    pool.increment_usage(key.hash, "gpt-4o-mini", 120)
    assert recorder.handouts == ["gpt4o", "turbo"]
    assert recorder.tokens == [("turbo", 120)]


def test_failed_get_reports_no_handout() -> None:
    pool, recorder, _ = observed_pool()
    for key in pool.keys():
        pool.disable(key.hash, DisableReason.MANUAL)
    with pytest.raises(Exception, match="no active keys"):
        pool.get("gpt-4")
    assert recorder.handouts == []


def test_each_disable_is_logged_and_reported_once(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, logger="keysvc")
    pool, recorder, _ = observed_pool()
    first, second = pool.keys()
    pool.disable(first.hash, DisableReason.MANUAL)
    pool.disable(first.hash, DisableReason.MANUAL)  # already disabled: nothing new
    pool.disable(second.hash, DisableReason.REVOKED)
    pool.disable(second.hash, DisableReason.REVOKED)
    pool.disable(second.hash, DisableReason.QUOTA)  # a new fact about a disabled key
    assert recorder.changes == [
        (first.hash, KeyChange.DISABLED, "manual"),
        (second.hash, KeyChange.REVOKED, "revoked"),
        (second.hash, KeyChange.OVER_QUOTA, "quota"),
    ]
    logs = change_logs(caplog)
    assert [(r.msg, r.key_hash, r.reason) for r in logs] == [  # type: ignore[attr-defined]
        ("key disabled", first.hash, "manual"),
        ("key revoked", second.hash, "revoked"),
        ("key over quota", second.hash, "quota"),
    ]
    assert all(r.levelno == logging.WARNING for r in logs)


def test_rate_limit_is_logged_once_per_handout(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, logger="keysvc")
    pool, recorder, clock = observed_pool()
    key = pool.get("gpt-4")
    pool.mark_rate_limited(key.hash, "gpt-4")
    pool.mark_rate_limited(key.hash, "gpt-4")  # the same 429 reported twice
    assert [c[1] for c in recorder.changes] == [KeyChange.RATE_LIMITED]
    assert recorder.changes[0][2] == "upstream answered 429 for gpt-4"
    clock.advance(60)
    again = pool.get("gpt-4")
    while again is not key:
        again = pool.get("gpt-4")
    pool.mark_rate_limited(key.hash)
    assert [c[1] for c in recorder.changes] == [KeyChange.RATE_LIMITED] * 2
    logs = change_logs(caplog)
    assert [r.msg for r in logs] == ["key rate limited"] * 2


def test_clone_is_logged_with_its_parent(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="keysvc")
    pool, recorder, _ = observed_pool()
    clone = pool.clone_for_org(pool.keys()[0].hash, "org-123")
    assert clone is not None
    assert recorder.changes == [
        (clone.hash, KeyChange.CLONED, "key belongs to organization org-123")
    ]
    (record,) = change_logs(caplog)
    assert record.msg == "key cloned"
    assert record.parent_hash == pool.keys()[0].hash  # type: ignore[attr-defined]


def test_no_secret_in_any_pool_log(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, logger="keysvc")
    pool, _, _ = observed_pool()
    key = pool.get("gpt-4")
    pool.mark_rate_limited(key.hash)
    pool.update_rate_limits(key.hash, {"x-ratelimit-reset-requests": "bogus"})
    pool.add_key(SECRETS[1], organization_id="org-9")
    pool.disable(key.hash, DisableReason.REVOKED)
    pool.recheck()
    assert caplog.records
    for record in caplog.records:
        text = repr(vars(record))
        for secret in SECRETS:
            assert secret not in text


def test_family_lockout_matches_lockout_period_for_a_model_of_the_family() -> None:
    pool, _, clock = observed_pool()
    assert pool.family_lockout("gpt4") == 0.0
    pool.get("gpt-4")
    pool.get("gpt-4")
    clock.advance(0.25)
    assert pool.family_lockout("gpt4") == pytest.approx(0.75)
    assert pool.family_lockout("gpt4") == pool.lockout_period("gpt-4")
    assert pool.family_lockout("gpt4-32k") == 0.0  # no key has it
