"""The family budget: remaining-* less the hand-outs in flight, refilling; on a manual clock."""

from __future__ import annotations

import pytest

from keysvc.keys import DisableReason
from keysvc.outcomes import UpstreamError
from keysvc.pool import BUDGET_LAPSE, KEY_REUSE_DELAY, MAX_BUDGET_WAIT, RESERVATION_TTL
from tests.helpers import PAID, pool_of

OK = UpstreamError()


def headers(
    *,
    requests: tuple[int, int, str] | None = None,
    tokens: tuple[int, int, str] | None = None,
) -> dict[str, str]:
    """(limit, remaining, reset) per dimension, as the upstream sends them."""
    out: dict[str, str] = {}
    for dim, values in (("requests", requests), ("tokens", tokens)):
        if values is not None:
            limit, remaining, reset = values
            out[f"x-ratelimit-limit-{dim}"] = str(limit)
            out[f"x-ratelimit-remaining-{dim}"] = str(remaining)
            out[f"x-ratelimit-reset-{dim}"] = reset
    return out


def test_a_key_with_a_known_budget_is_not_held_by_the_throttle() -> None:
    # The loop on one key: every answer says 499 of 500 requests are left.
    pool, clock, (a,) = pool_of([PAID])
    answer = headers(requests=(500, 499, "120ms"), tokens=(30_000, 29_000, "2s"))
    for _ in range(5):
        assert pool.get("gpt-4o") is a
        pool.report_outcome(a.hash, "gpt-4o", status=200, headers=answer, error=OK)
        assert pool.lockout_period("gpt-4o") == 0.0  # not the 1 s reuse throttle
        clock.advance(0.01)


def test_many_hand_outs_in_flight_until_the_budget_is_spoken_for() -> None:
    pool, clock, (a,) = pool_of([PAID])
    pool.get("gpt-4o")
    # 10,000 RPM with 5 left, and requests back at 10,000 a minute.
    pool.report_outcome(
        a.hash, "gpt-4o", status=200, headers=headers(requests=(10_000, 5, "59.97s")), error=OK
    )
    for _ in range(5):  # at once, no answer in between
        assert pool.get("gpt-4o") is a
    # Five in flight, five left: the sixth waits for the refill (10,000 / 60 s).
    assert pool.lockout_period("gpt-4o") == pytest.approx(60 / 9_995, rel=1e-3)


def test_before_the_first_answer_the_throttle_holds() -> None:
    pool, clock, (a,) = pool_of([PAID])
    pool.get("gpt-4o")
    assert pool.lockout_period("gpt-4o") == KEY_REUSE_DELAY
    # An answer without limit headers says nothing of the quota: still throttled.
    pool.report_outcome(
        a.hash, "gpt-4o", status=200, headers={"x-ratelimit-remaining-requests": "7"}, error=OK
    )
    assert pool.lockout_period("gpt-4o") == KEY_REUSE_DELAY


def test_a_budget_not_reported_for_a_while_lapses_and_the_throttle_returns() -> None:
    pool, clock, (a,) = pool_of([PAID])
    pool.get("gpt-4o")
    pool.report_outcome(
        a.hash, "gpt-4o", status=200, headers=headers(requests=(500, 499, "120ms")), error=OK
    )
    pool.get("gpt-4o")
    assert pool.lockout_period("gpt-4o") == 0.0
    clock.advance(BUDGET_LAPSE)
    pool.get("gpt-4o")  # nothing heard for a minute: knowledge lapsed
    assert pool.lockout_period("gpt-4o") == KEY_REUSE_DELAY
    state = a.state_in("gpt4o")
    assert state is not None and state.budget_at == 0.0 and state.requests_limit is None


def test_more_in_flight_than_the_limit_is_never_covered() -> None:
    pool, clock, (a,) = pool_of([PAID])
    pool.get("gpt-4o")
    pool.report_outcome(
        a.hash, "gpt-4o", status=200, headers=headers(requests=(2, 2, "0s")), error=OK
    )
    pool.get("gpt-4o")
    pool.get("gpt-4o")
    # Two in flight of a limit of 2: however long the refill, a third does not fit;
    # the key waits for an answer, or for the oldest reservation to lapse.
    assert a.until_in("gpt4o") - clock.now() == pytest.approx(RESERVATION_TTL)


def test_nothing_left_locks_until_one_more_request_fits_not_the_full_reset() -> None:
    pool, clock, (a,) = pool_of([PAID])
    pool.get("gpt-4o")
    clock.advance(0.4)
    # 20 RPM, none left, all 20 back in 60 s: one more fits in 3 s (the reset says 60).
    pool.report_outcome(
        a.hash, "gpt-4o", status=200, headers=headers(requests=(20, 0, "1m0s")), error=OK
    )
    assert a.until_in("gpt4o") - clock.now() == pytest.approx(3)
    assert pool.lockout_period("gpt-4o") == pytest.approx(3)


def test_a_slow_refill_is_waited_for_in_full_up_to_a_minute() -> None:
    pool, clock, (a,) = pool_of([PAID])
    pool.get("gpt-4o")
    # 3 RPM, none left, back in 60 s: one more in 20 s (not the 10 s clamp of resets,
    # which would spend a request on a certain 429).
    pool.report_outcome(
        a.hash, "gpt-4o", status=200, headers=headers(requests=(3, 0, "1m0s")), error=OK
    )
    assert a.until_in("gpt4o") - clock.now() == pytest.approx(20)
    # A reset of an hour: capped at a minute.
    pool.report_outcome(
        a.hash, "gpt-4o", status=200, headers=headers(requests=(3, 0, "1h0m0s")), error=OK
    )
    assert a.until_in("gpt4o") - clock.now() == pytest.approx(MAX_BUDGET_WAIT)


def test_a_fixed_window_is_not_taken_for_a_steady_refill() -> None:
    # A fixed one-minute window of 60 requests: early in it, 59 left and the reset is
    # the window's end, 50 s away (a refill of 1/50 a second); near its end, nothing
    # left and the end 10 s away (6 a second, if the quota came back steadily).
    pool, clock, (a,) = pool_of([PAID])
    pool.get("gpt-4o")
    pool.report_outcome(
        a.hash, "gpt-4o", status=200, headers=headers(requests=(60, 59, "50s")), error=OK
    )
    clock.advance(40)
    pool.report_outcome(
        a.hash, "gpt-4o", status=200, headers=headers(requests=(60, 0, "10s")), error=OK
    )
    # The slowest refill seen since the limit was whole: not before the window's end.
    assert pool.lockout_period("gpt-4o") == pytest.approx(10)
    clock.advance(10)
    assert pool.lockout_period("gpt-4o") == 0.0  # the whole limit is back
    pool.get("gpt-4o")
    # A new window: its first answer starts the refill afresh.
    pool.report_outcome(
        a.hash, "gpt-4o", status=200, headers=headers(requests=(60, 0, "30s")), error=OK
    )
    assert pool.lockout_period("gpt-4o") == pytest.approx(0.5)


def test_a_token_bucket_keeps_its_steady_refill() -> None:
    pool, clock, (a,) = pool_of([PAID])
    pool.get("gpt-4o")
    # 600 RPM, refilling 10 a second: every answer says so, whatever is left.
    for left, reset in ((300, "30s"), (100, "50s"), (0, "1m0s")):
        pool.report_outcome(
            a.hash, "gpt-4o", status=200, headers=headers(requests=(600, left, reset)), error=OK
        )
        clock.advance(0.05)
    assert pool.lockout_period("gpt-4o") == pytest.approx(0.05)  # 0.1 s after the last


def test_an_answer_releases_its_reservation() -> None:
    pool, clock, (a,) = pool_of([PAID])
    pool.get("gpt-4o")
    budget = headers(requests=(60, 1, "590s"))  # one request every 10 s
    pool.report_outcome(a.hash, "gpt-4o", status=200, headers=budget, error=OK)
    pool.get("gpt-4o")  # in flight: the 1 left is reserved
    assert a.until_in("gpt4o") > clock.now()
    # Its answer: 1 left again (the refill), and nothing in flight.
    pool.report_outcome(a.hash, "gpt-4o", status=200, headers=budget, error=OK)
    assert a.until_in("gpt4o") == 0.0 or a.until_in("gpt4o") <= clock.now()
    state = a.state_in("gpt4o")
    assert state is not None and state.reserved is None  # no empty deque kept per family


def test_a_reservation_nobody_answers_lapses() -> None:
    pool, clock, (a,) = pool_of([PAID])
    pool.get("gpt-4o")
    budget = headers(requests=(600, 1, "599s"))  # 1 request a second
    pool.report_outcome(a.hash, "gpt-4o", status=200, headers=budget, error=OK)
    pool.get("gpt-4o")  # never answered
    pool.report_outcome(
        a.hash, "gpt-4o", status=200, headers=headers(requests=(600, 0, "600s")), error=OK
    )  # an answer for another hand-out: it releases the oldest reservation
    clock.advance(KEY_REUSE_DELAY)
    pool.get("gpt-4o")
    clock.advance(KEY_REUSE_DELAY)
    pool.get("gpt-4o")
    state = a.state_in("gpt4o")
    assert state is not None and state.reserved is not None and len(state.reserved) == 2
    clock.advance(RESERVATION_TTL)
    pool.report_outcome(a.hash, "gpt-4o", status=500, headers={}, error=OK)
    state = a.state_in("gpt4o")  # a snapshot: read it again
    assert state is not None
    assert state.reserved is None  # one released by the 500, the other lapsed


def test_get_lockout_period_with_every_budget_spoken_for_is_above_zero() -> None:
    pool, clock, (a, b) = pool_of([PAID, PAID])
    for key in (a, b):
        assert pool.get("gpt-4o") is key
        # 60 RPM, one left each, refilling one a second.
        pool.report_outcome(
            key.hash, "gpt-4o", status=200, headers=headers(requests=(60, 1, "59s")), error=OK
        )
    assert pool.lockout_period("gpt-4o") == 0.0
    assert pool.get("gpt-4o") is a
    assert pool.get("gpt-4o") is b
    # Both budgets are spoken for: a plain Get still hands one out (the seed never
    # refuses a Get for rate limits), but the lockout says how long until one fits.
    assert pool.lockout_period("gpt-4o") == pytest.approx(1.0)
    clock.advance(1.0)
    assert pool.lockout_period("gpt-4o") == 0.0


def test_tokens_reserved_per_hand_out_follow_the_family_s_requests() -> None:
    pool, clock, (a,) = pool_of([PAID])
    for tokens in (1000, 3000) * 10:  # mean 2000, sd about 1000
        pool.increment_usage(a.hash, "gpt-4o", tokens)
    pool.get("gpt-4o")
    # 60,000 TPM, 3,000 left, back at 1,000 a second.
    budget = headers(tokens=(60_000, 3_000, "57s"))
    pool.report_outcome(a.hash, "gpt-4o", status=200, headers=budget, error=OK)
    clock.advance(KEY_REUSE_DELAY)
    pool.get("gpt-4o")
    state = a.state_in("gpt4o")
    assert state is not None and state.reserved is not None
    ((_, reserved),) = state.reserved
    assert 3_500 < reserved < 4_500  # mean + 2 sd, not the mean: most requests fit
    # 3,000 left + 1 s refill = 4,000 at the hand-out; a second one needs twice the reserve.
    assert a.until_in("gpt4o") - clock.now() == pytest.approx(-1 + (2 * reserved - 3_000) / 1_000)


def test_a_429_for_tokens_spends_the_token_budget_whatever_remaining_said() -> None:
    pool, clock, (a,) = pool_of([PAID])
    pool.increment_usage(a.hash, "gpt-4o", 500)
    pool.get("gpt-4o")
    budget = headers(requests=(500, 400, "12s"), tokens=(30_000, 400, "59.2s"))
    pool.report_outcome(a.hash, "gpt-4o", status=429, headers=budget, error=UpstreamError("tokens"))
    # 500 tokens a second come back; 500 are reserved per request: 1 s, not the 10 s clamp.
    assert a.until_in("gpt4o") - clock.now() == pytest.approx(1)


def test_a_second_429_in_one_refill_marks_a_fixed_window() -> None:
    # A token bucket refills after a 429 at its rate; a fixed window not before its end.
    # The first 429 of a refill is taken for a bucket's; a second one, after the budget
    # counted on the refill again, says the limit is a window.
    pool, clock, (a,) = pool_of([PAID])
    pool.get("gpt-4o")
    window = headers(requests=(20, 0, "40s"))  # spent early: a refill of 0.5/s, it seems
    error = UpstreamError("requests")
    pool.report_outcome(a.hash, "gpt-4o", status=429, headers=window, error=error)
    assert a.until_in("gpt4o") - clock.now() == pytest.approx(2)  # one more in 1/0.5 s
    clock.advance(2)
    pool.get("gpt-4o")
    pool.report_outcome(
        a.hash, "gpt-4o", status=429, headers=headers(requests=(20, 0, "38s")), error=error
    )
    assert a.until_in("gpt4o") - clock.now() == pytest.approx(38)  # the window's end
    clock.advance(38)
    assert pool.get("gpt-4o") is a
    # The next window's first answer: 19 of 20 left, its end 59 s away. A bucket would
    # be refilling 1/59 a second; a window gives nothing back before its end.
    pool.report_outcome(
        a.hash, "gpt-4o", status=200, headers=headers(requests=(20, 0, "59s")), error=OK
    )
    assert a.until_in("gpt4o") - clock.now() == pytest.approx(59)
    state = a.state_in("gpt4o")
    assert state is not None and state.requests_rate == 0.0


def test_429s_of_a_burst_sent_before_the_first_answer_keep_a_token_bucket() -> None:
    # 3,000 RPM, a bucket that came up empty (its reset: 60 s until full). Five
    # requests went out before any answer (a plain Get hands out a busy key); all
    # five come back 429 through the seed's RPCs: headers, then the 429, no model.
    # Only the first says something of the refill; the other four were sent before it.
    pool, clock, (a,) = pool_of([PAID])
    for _ in range(5):
        assert pool.get("gpt-4o") is a
    empty = headers(requests=(3_000, 0, "1m0s"), tokens=(1_000_000, 999_000, "60ms"))
    for _ in range(5):
        clock.advance(0.005)
        pool.update_rate_limits(a.hash, empty)
        pool.mark_rate_limited(a.hash)
    # Refilling 50 a second from the last 429: one more in 20 ms, not the 60 s reset.
    assert pool.lockout_period("gpt-4o") == pytest.approx(0.02)
    state = a.state_in("gpt4o")
    assert state is not None and state.requests_rate == pytest.approx(50)
    # A request sent after those 429s, refused too: that one says the refill did not
    # come, and the limit is a fixed window, waited out to its end.
    clock.advance(0.02)
    assert pool.get("gpt-4o") is a
    clock.advance(0.2)
    pool.update_rate_limits(a.hash, headers(requests=(3_000, 0, "59.7s")))
    pool.mark_rate_limited(a.hash)
    # The end of the refill is the latest any answer named: 60 s after the burst's.
    assert pool.lockout_period("gpt-4o") == pytest.approx(60.025 - 0.245)


def test_typed_429s_of_a_burst_sent_before_the_first_answer_keep_a_token_bucket() -> None:
    pool, clock, (a,) = pool_of([PAID])
    for _ in range(3):
        assert pool.get("gpt-4o") is a
    for _ in range(3):
        clock.advance(0.005)
        pool.report_outcome(
            a.hash,
            "gpt-4o",
            status=429,
            headers=headers(requests=(600, 0, "1m0s")),
            error=UpstreamError("requests"),
        )
    assert pool.lockout_period("gpt-4o") == pytest.approx(0.1)  # 10 a second


def _empty_answers_while_slow_requests_run(resets: list[str]) -> float:
    """3,000 RPM through the seed's RPCs (no model): 20 slow requests in flight, then
    the limit runs out and 429s come every 0.5 s, each for a request just sent, with
    ``resets``; returns the lockout after the last."""
    pool, clock, (a,) = pool_of([PAID])
    pool.get("gpt-4o")
    clock.advance(0.5)
    pool.update_rate_limits(a.hash, headers(requests=(3_000, 2_000, "40s")))  # 25 a second
    for _ in range(20):
        assert pool.get("gpt-4o") is a
    for reset in resets:
        clock.advance(0.5)
        assert pool.get("gpt-4o") is a
        pool.update_rate_limits(a.hash, headers(requests=(3_000, 0, reset)))
        pool.mark_rate_limited(a.hash)
    return pool.lockout_period("gpt-4o")


def test_a_fixed_window_is_told_by_its_resets_whichever_request_a_429_answers() -> None:
    # Each report is taken for the oldest hand-out in flight, a slow request sent
    # before the first 429, so no 429 reads as one for a request sent after it. The
    # resets tell: every answer since names the same end of the window.
    lockout = _empty_answers_while_slow_requests_run(["39.5s", "39s", "38.5s"])
    assert lockout == pytest.approx(38.5)  # its end, not 1 s of refill


def test_a_token_bucket_that_stays_empty_is_not_taken_for_a_window() -> None:
    # A bucket found empty is whole again a minute after each such answer: the end moves on.
    lockout = _empty_answers_while_slow_requests_run(["59.99s", "1m0s", "59.98s"])
    assert 0 < lockout < 1.5  # the in-flight requests and one more, refilled at 25 a second


def test_a_typed_429_without_a_budget_locks_for_the_matching_reset() -> None:
    pool, clock, (a,) = pool_of([PAID])
    pool.get("gpt-4")
    clock.advance(0.3)
    resets = {"x-ratelimit-reset-requests": "8s", "x-ratelimit-reset-tokens": "2s"}
    pool.report_outcome(a.hash, "gpt-4", status=429, headers=resets, error=UpstreamError("tokens"))
    assert a.until_in("gpt4") - clock.now() == pytest.approx(2)
    # MarkRateLimited does not say which limit: the longer reset.
    pool.mark_rate_limited(a.hash, "gpt-4")
    assert a.until_in("gpt4") - clock.now() == pytest.approx(8)


def test_keys_locked_until_the_same_time_go_least_recently_used_first() -> None:
    # Both keys' request budgets are spent and come back slowly, so both wait the
    # MAX_BUDGET_WAIT cap from the answer: the same unlock time, whatever hand-outs
    # follow near its end (their reservations lapse after it).
    pool, clock, (a, b) = pool_of([PAID, PAID])
    budget = headers(requests=(2, 0, "20m0s"))
    pool.update_rate_limits(a.hash, budget, "gpt-4")
    pool.update_rate_limits(b.hash, budget, "gpt-4")
    # A leaves the queues and comes back at the same unlock time (a Recheck
    # without a checker re-enables it): what A was queued by before must not count.
    pool.disable(a.hash, DisableReason.MANUAL)
    pool.recheck()
    clock.advance(MAX_BUDGET_WAIT - RESERVATION_TTL + 1)
    assert pool.get("gpt-4") is a  # a tie: the first loaded
    assert a.until_in("gpt4") == b.until_in("gpt4")  # still the same unlock time
    clock.advance(0.1)
    assert pool.get("gpt-4") is b  # b was used least recently
    clock.advance(0.1)
    assert pool.get("gpt-4") is a  # now a was
    clock.advance(MAX_BUDGET_WAIT)
    assert pool.get("gpt-3.5-turbo") is a  # neither used for turbo: load order


def test_a_remaining_above_the_limit_counts_as_the_limit() -> None:
    """Found by the model test: a header saying 50 left of a limit of 3 let every Get
    through, since what is left was compared before the refill capped it."""
    pool, clock, (a,) = pool_of([PAID])
    pool.update_rate_limits(
        a.hash,
        {
            "x-ratelimit-reset-requests": "0s",
            "x-ratelimit-remaining-requests": "50",
            "x-ratelimit-limit-requests": "3",
        },
        "gpt-3.5-turbo",
    )
    for _ in range(3):
        pool.get("gpt-3.5-turbo")
    # Three in flight fill a limit of 3: the fourth waits for the oldest to lapse.
    assert pool.family_lockout("turbo") == pytest.approx(RESERVATION_TTL)
