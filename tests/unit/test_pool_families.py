"""Rate-limit state per (key, model family) and the remaining-aware lock, on a manual clock."""

from __future__ import annotations

import pytest

from keysvc.keys import DisableReason
from keysvc.outcomes import UpstreamError
from keysvc.pool import KEY_REUSE_DELAY, RATE_LIMIT_FALLBACK
from keysvc.service import key_to_proto
from tests.helpers import PAID, TRIAL, make_pool, pool_of

REMAINING_REQUESTS = "x-ratelimit-remaining-requests"
REMAINING_TOKENS = "x-ratelimit-remaining-tokens"
RESET_REQUESTS = "x-ratelimit-reset-requests"
RESET_TOKENS = "x-ratelimit-reset-tokens"

# -- per family -------------------------------------------------------------------


def test_a_429_for_one_family_leaves_the_key_free_for_another() -> None:
    pool, clock, (a, b) = pool_of([PAID, PAID])
    pool.get("gpt-4")  # a
    pool.mark_rate_limited(a.hash, "gpt-4")
    clock.advance(KEY_REUSE_DELAY)
    assert pool.get("gpt-4") is b  # a is locked for gpt4 for the 10 s fallback
    assert pool.get("gpt-3.5-turbo") is a  # but never used for turbo
    assert a.until_in("gpt4") == pytest.approx(clock.now() - KEY_REUSE_DELAY + RATE_LIMIT_FALLBACK)
    assert a.until_in("turbo") == clock.now() + KEY_REUSE_DELAY


def test_a_429_without_a_model_locks_every_family_when_nothing_is_in_flight() -> None:
    pool, clock, (a, b) = pool_of([PAID, PAID])
    pool.mark_rate_limited(a.hash)  # a was never handed out: nothing to attribute it to
    for model in ("gpt-4", "gpt-3.5-turbo", "gpt-4o", "dall-e-3"):
        assert pool.get(model) is b, model
        clock.advance(KEY_REUSE_DELAY)
    assert pool.family_lockout("o1") == 0.0  # b is free for it


def test_a_429_without_a_model_goes_to_the_family_of_the_hand_out_in_flight() -> None:
    pool, clock, (a, b) = pool_of([PAID, PAID])
    pool.get("gpt-4")  # a
    pool.mark_rate_limited(a.hash)
    clock.advance(KEY_REUSE_DELAY)
    assert pool.get("gpt-4") is b  # a is locked for gpt4 (the 10 s fallback) ...
    assert pool.get("gpt-3.5-turbo") is a  # ... and for gpt4 only
    assert a.wide is None


def test_headers_with_a_model_touch_only_that_family() -> None:
    pool, clock, (a, b) = pool_of([PAID, PAID])
    pool.get("gpt-4o")  # a
    pool.get("gpt-3.5-turbo")  # a: free for turbo
    pool.update_rate_limits(a.hash, {RESET_REQUESTS: "8s"}, "gpt-4o")
    clock.advance(2)
    assert a.until_in("gpt4o") == clock.now() - 2 + 8
    assert a.until_in("turbo") == clock.now() - 2 + KEY_REUSE_DELAY
    assert pool.get("gpt-4o") is b
    pool.disable(b.hash, DisableReason.MANUAL)
    assert pool.get("gpt-3.5-turbo") is a  # free for turbo, though locked for gpt4o
    assert pool.lockout_period("gpt-4o") == pytest.approx(6)


def test_headers_without_a_model_and_nothing_in_flight_apply_to_every_family() -> None:
    pool, clock, (a,) = pool_of([PAID])
    pool.update_rate_limits(a.hash, {RESET_TOKENS: "3s"})  # a was never handed out
    assert a.until_in("gpt4o") == a.until_in("turbo") == 0.0  # windows start at a hand-out
    pool.mark_rate_limited(a.hash)
    assert a.until_in("gpt4o") == a.until_in("turbo") == clock.now() + 3
    assert pool.lockout_period("gpt-3.5-turbo") == pytest.approx(3)


def test_headers_without_a_model_feed_the_family_of_the_oldest_hand_out() -> None:
    pool, clock, (a,) = pool_of([PAID])
    pool.get("gpt-4o")
    clock.advance(0.1)
    pool.get("gpt-3.5-turbo")  # a again: free for turbo
    budget = {
        "x-ratelimit-limit-requests": "500",
        REMAINING_REQUESTS: "499",
        RESET_REQUESTS: "120ms",
    }
    pool.update_rate_limits(a.hash, budget)  # answers the gpt-4o hand-out, the oldest
    gpt4o, turbo = a.state_in("gpt4o"), a.state_in("turbo")
    assert gpt4o is not None and turbo is not None
    assert gpt4o.requests_limit == 500 and gpt4o.reserved is None  # budget fed, released
    assert turbo.requests_limit is None and turbo.reserved is not None  # still in flight
    assert a.wide is None
    assert pool.lockout_period("gpt-4o") == 0.0  # a budget: no throttle
    assert pool.lockout_period("gpt-3.5-turbo") == KEY_REUSE_DELAY  # nothing known yet
    pool.update_rate_limits(a.hash, budget)  # the next answer: the turbo hand-out
    turbo = a.state_in("turbo")
    assert turbo is not None and turbo.requests_limit == 500 and turbo.reserved is None
    assert pool.lockout_period("gpt-3.5-turbo") == 0.0


def test_a_429_without_a_model_follows_its_headers_in_either_order() -> None:
    # The seed reports an answer's headers, then its 429: both without a model.
    for headers_first in (True, False):
        pool, clock, (a,) = pool_of([PAID])
        pool.get("gpt-4o")
        clock.advance(0.1)
        pool.get("gpt-3.5-turbo")
        answer = {
            "x-ratelimit-limit-requests": "500",
            REMAINING_REQUESTS: "0",
            RESET_REQUESTS: "6s",
        }
        if headers_first:
            pool.update_rate_limits(a.hash, answer)
            pool.mark_rate_limited(a.hash)
        else:
            pool.mark_rate_limited(a.hash)
            pool.update_rate_limits(a.hash, answer)
        gpt4o = a.state_in("gpt4o")
        assert gpt4o is not None and gpt4o.saw_rate_limit, headers_first
        assert gpt4o.requests_limit == 500, headers_first
        turbo = a.state_in("turbo")
        assert turbo is not None and not turbo.saw_rate_limit, headers_first
        assert a.wide is None


def test_a_report_without_a_model_after_its_reservation_lapsed_goes_to_the_latest_family() -> None:
    pool, clock, (a,) = pool_of([PAID])
    pool.get("gpt-4o")
    clock.advance(45)  # a long completion: its reservation lapsed
    pool.update_rate_limits(
        a.hash, {"x-ratelimit-limit-requests": "500", REMAINING_REQUESTS: "9", RESET_REQUESTS: "1s"}
    )
    state = a.state_in("gpt4o")
    assert state is not None and state.requests_limit == 500
    assert a.wide is None


def test_the_reuse_throttle_is_per_family() -> None:
    pool, clock, (a,) = pool_of([PAID])
    assert pool.get("gpt-4") is a
    assert pool.lockout_period("gpt-4") == KEY_REUSE_DELAY
    assert pool.lockout_period("gpt-3.5-turbo") == 0
    assert pool.get("gpt-3.5-turbo") is a
    assert pool.lockout_period("gpt-3.5-turbo") == KEY_REUSE_DELAY


def test_least_recently_used_is_judged_per_family() -> None:
    pool, clock, (a, b) = pool_of([PAID, PAID])
    assert pool.get("gpt-4") is a
    clock.advance(5)
    assert pool.get("gpt-4") is b  # never used for gpt4
    clock.advance(5)
    assert pool.get("gpt-3.5-turbo") is a  # neither used for turbo: load order
    assert pool.get("gpt-4") is a  # used for gpt4 longer ago than b


def test_a_hand_out_clears_a_key_wide_lock_everywhere() -> None:
    pool, clock, (a, b) = pool_of([PAID, PAID])
    pool.mark_rate_limited(a.hash)  # 10 s, every family
    pool.mark_rate_limited(b.hash)
    clock.advance(1)
    pool.mark_rate_limited(b.hash)  # b: until t+11
    assert pool.get("gpt-4") is a  # the earliest to unlock
    # As in the seed, the hand-out starts a fresh window: a is only throttled for gpt4 now.
    assert pool.get("gpt-3.5-turbo") is a
    assert a.wide is None


def test_families_nobody_asked_for_get_no_state() -> None:
    pool, _ = make_pool([f"sk-{i}" for i in range(5)])
    pool.get("gpt-4o")
    for key in pool.keys():
        assert [s.family for s in key.family_states()] == ["gpt4o"]
    pool.get("gpt-3.5-turbo")
    assert {s.family for s in pool.keys()[3].family_states()} == {"gpt4o", "turbo"}


def test_key_view_lists_used_families_and_key_wide_summaries() -> None:
    pool, clock, (a, _) = pool_of([PAID, PAID])
    pool.get("gpt-4")
    pool.update_rate_limits(a.hash, {RESET_REQUESTS: "4s", REMAINING_REQUESTS: "7"}, "gpt-4")
    clock.advance(1)
    pool.get("gpt-3.5-turbo")
    pool.mark_rate_limited(a.hash, "gpt-3.5-turbo")
    view = key_to_proto(a)
    assert [f.family for f in view.family_rate_limits] == ["gpt4", "turbo"]
    gpt4, turbo = view.family_rate_limits
    assert gpt4.remaining_requests == 7 and not gpt4.HasField("remaining_tokens")
    assert gpt4.requests_reset.ToMilliseconds() == 4000
    # gpt4: remaining 7 > 0, so only the throttle locked it (t0 + 1 s).
    assert gpt4.rate_limited_until.ToMilliseconds() == int((clock.now() - 1 + 1) * 1000)
    assert turbo.rate_limited_until.ToMilliseconds() == int((clock.now() + 10) * 1000)
    assert view.rate_limited_until == turbo.rate_limited_until  # the latest, key-wide
    assert view.rate_limit_requests_reset.ToMilliseconds() == 4000
    assert view.rate_limited_at == turbo.rate_limited_at


# -- remaining-aware ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("headers", "locked_for"),
    [
        # Quota left: the reset alone does not lock, only the throttle does.
        ({REMAINING_REQUESTS: "5", REMAINING_TOKENS: "900", RESET_REQUESTS: "8s"}, 1.0),
        ({REMAINING_REQUESTS: "5", RESET_REQUESTS: "8s", RESET_TOKENS: "9s"}, 1.0),
        # A remaining that is 0 locks until its own reset.
        ({REMAINING_REQUESTS: "0", RESET_REQUESTS: "6s", RESET_TOKENS: "9s"}, 6.0),
        ({REMAINING_TOKENS: "0", REMAINING_REQUESTS: "3", RESET_TOKENS: "4s"}, 4.0),
        (
            {REMAINING_REQUESTS: "0", REMAINING_TOKENS: "0"}
            | {RESET_REQUESTS: "2s", RESET_TOKENS: "5s"},
            5.0,
        ),
        # Exhausted without its reset: the 10 s fallback.
        ({REMAINING_TOKENS: "0", RESET_REQUESTS: "2s"}, RATE_LIMIT_FALLBACK),
        # No remaining-* at all: the seed's rule, the longer reset.
        ({RESET_REQUESTS: "2s", RESET_TOKENS: "3s"}, 3.0),
    ],
)  # fmt: skip
def test_remaining_headers_decide_the_lock(headers: dict[str, str], locked_for: float) -> None:
    pool, clock, (a,) = pool_of([PAID])
    pool.get("gpt-4o")
    handed_out = clock.now()
    clock.advance(0.2)
    pool.update_rate_limits(a.hash, headers, "gpt-4o")
    assert a.until_in("gpt4o") == pytest.approx(handed_out + locked_for)


def test_a_429_locks_even_when_remaining_says_there_is_quota() -> None:
    pool, clock, (a,) = pool_of([PAID])
    pool.get("gpt-4")
    clock.advance(0.3)
    headers = {REMAINING_TOKENS: "200", RESET_TOKENS: "3s"}
    pool.report_outcome(a.hash, "gpt-4", status=429, headers=headers, error=UpstreamError("tokens"))
    assert a.until_in("gpt4") == pytest.approx(clock.now() + 3)


def test_a_success_with_nothing_left_locks_without_waiting_for_a_429() -> None:
    pool, clock, (a, b) = pool_of([PAID, PAID])
    pool.get("gpt-4")
    headers = {REMAINING_REQUESTS: "0", RESET_REQUESTS: "7s", REMAINING_TOKENS: "5000"}
    decision, _ = pool.report_outcome(
        a.hash, "gpt-4", status=200, headers=headers, error=UpstreamError(), prompt_tokens=3
    )
    assert decision.action.value == "done"
    clock.advance(KEY_REUSE_DELAY)
    assert pool.get("gpt-4") is b
    assert pool.lockout_period("gpt-4") == pytest.approx(KEY_REUSE_DELAY)  # b's throttle
    clock.advance(KEY_REUSE_DELAY)
    assert pool.get("gpt-4") is b  # a stays locked until its 7 s reset
    clock.advance(5)
    assert pool.get("gpt-4") is a


def test_order_of_mark_and_update_does_not_matter_per_family() -> None:
    headers = {RESET_REQUESTS: "6s", REMAINING_REQUESTS: "0", REMAINING_TOKENS: "10"}
    pool1, clock1, (a1,) = pool_of([PAID])
    pool2, clock2, (a2,) = pool_of([PAID])
    for pool, clock in ((pool1, clock1), (pool2, clock2)):
        pool.get("gpt-4o")
        clock.advance(0.3)
    pool1.mark_rate_limited(a1.hash, "gpt-4o")
    pool1.update_rate_limits(a1.hash, headers, "gpt-4o")
    pool2.update_rate_limits(a2.hash, headers, "gpt-4o")
    pool2.mark_rate_limited(a2.hash, "gpt-4o")
    assert a1.until_in("gpt4o") == a2.until_in("gpt4o") == clock1.now() + 6


def test_unparseable_remaining_is_ignored_and_logged(caplog: pytest.LogCaptureFixture) -> None:
    pool, clock, (a,) = pool_of([PAID])
    pool.get("gpt-4")
    pool.update_rate_limits(a.hash, {REMAINING_REQUESTS: "-1", RESET_REQUESTS: "5s"}, "gpt-4")
    state = a.state_in("gpt4")
    assert state is not None and state.remaining_requests is None
    assert a.until_in("gpt4") == clock.now() + 5  # the seed's rule, as if it was not sent
    assert "unparseable" in caplog.text


def test_disabled_and_revived_keys_keep_their_family_state() -> None:
    pool, clock, (a, b) = pool_of([PAID, TRIAL])
    pool.get("gpt-4")  # b (trial first)
    pool.mark_rate_limited(b.hash, "gpt-4")
    pool.disable(b.hash, DisableReason.MANUAL)
    assert pool.get("gpt-4") is a
    pool.recheck()
    clock.advance(KEY_REUSE_DELAY)
    assert pool.get("gpt-4") is a  # b is back, but still locked for gpt4 by its 429
    assert pool.get("gpt-3.5-turbo") is b


def test_a_report_without_a_model_goes_to_the_family_whose_limits_it_names() -> None:
    # Answers come back in any order; the upstream limits each model apart, so the
    # limits in the headers tell which family's hand-out an answer is for.
    pool, clock, (a,) = pool_of([PAID])
    gpt4o = {"x-ratelimit-limit-requests": "500", REMAINING_REQUESTS: "400", RESET_REQUESTS: "12s"}
    turbo = {"x-ratelimit-limit-requests": "20", REMAINING_REQUESTS: "10", RESET_REQUESTS: "30s"}
    pool.get("gpt-4o")
    pool.update_rate_limits(a.hash, gpt4o, "gpt-4o")
    pool.get("gpt-3.5-turbo")
    pool.update_rate_limits(a.hash, turbo, "gpt-3.5-turbo")
    pool.get("gpt-4o")  # the oldest in flight
    clock.advance(0.1)
    pool.get("gpt-3.5-turbo")
    pool.update_rate_limits(a.hash, {**turbo, REMAINING_REQUESTS: "0"})  # turbo's answer first
    gpt4o_state, turbo_state = a.state_in("gpt4o"), a.state_in("turbo")
    assert turbo_state is not None and turbo_state.reserved is None
    assert turbo_state.remaining_requests == 0
    assert gpt4o_state is not None and gpt4o_state.reserved is not None  # still in flight
    assert gpt4o_state.remaining_requests is None
