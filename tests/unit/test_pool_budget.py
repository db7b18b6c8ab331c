"""The family budget: remaining-* less the hand-outs in flight, refilling; on a manual clock."""

from __future__ import annotations

import pytest

from keysvc.keys import DisableReason
from keysvc.outcomes import UpstreamError
from keysvc.pool import KEY_REUSE_DELAY, MAX_RESET, RESERVATION_TTL
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


def test_hand_outs_in_flight_count_against_the_remaining_requests() -> None:
    pool, clock, (a,) = pool_of([PAID])
    pool.get("gpt-4o")
    # 60 RPM, 2 left, 58 missing come back in 58 s: one request a second.
    pool.report_outcome(
        a.hash, "gpt-4o", status=200, headers=headers(requests=(60, 2, "58s")), error=OK
    )
    answered = clock.now()
    clock.advance(KEY_REUSE_DELAY)
    assert pool.get("gpt-4o") is a  # 2 left, none in flight
    clock.advance(KEY_REUSE_DELAY)
    assert pool.get("gpt-4o") is a  # 2 left + 2 s of refill, one in flight
    # Two in flight; one more needs 3, and 2 + 1/s covers it 1 s after the answer.
    assert a.until_in("gpt4o") == pytest.approx(clock.now() + KEY_REUSE_DELAY)
    clock.advance(KEY_REUSE_DELAY)
    assert pool.get("gpt-4o") is a
    # Three in flight: 4 needed, 2 left: 2 s after the answer, but the throttle is later.
    assert a.until_in("gpt4o") == pytest.approx(max(answered + 2, clock.now() + 1))


def test_without_a_refill_rate_in_flight_hand_outs_are_not_counted() -> None:
    # No x-ratelimit-limit-*: no budget, the remaining-aware rule as before.
    pool, clock, (a,) = pool_of([PAID])
    pool.get("gpt-4o")
    pool.report_outcome(
        a.hash,
        "gpt-4o",
        status=200,
        headers={"x-ratelimit-remaining-requests": "1", "x-ratelimit-reset-requests": "58s"},
        error=OK,
    )
    for _ in range(3):
        clock.advance(KEY_REUSE_DELAY)
        assert pool.get("gpt-4o") is a
        assert a.until_in("gpt4o") == clock.now() + KEY_REUSE_DELAY


def test_nothing_left_locks_until_one_more_request_fits_not_the_full_reset() -> None:
    pool, clock, (a,) = pool_of([PAID])
    pool.get("gpt-4o")
    clock.advance(0.4)
    # 20 RPM, none left, all 20 back in 60 s: one more fits in 3 s (the reset says 60).
    pool.report_outcome(
        a.hash, "gpt-4o", status=200, headers=headers(requests=(20, 0, "1m0s")), error=OK
    )
    assert a.until_in("gpt4o") == pytest.approx(clock.now() + 3)
    assert pool.lockout_period("gpt-4o") == pytest.approx(3)


def test_the_wait_is_capped_like_a_reset() -> None:
    pool, clock, (a,) = pool_of([PAID])
    pool.get("gpt-4o")
    # 3 RPM, none left, back in 60 s: one more in 20 s, capped at MAX_RESET.
    pool.report_outcome(
        a.hash, "gpt-4o", status=200, headers=headers(requests=(3, 0, "1m0s")), error=OK
    )
    assert a.until_in("gpt4o") == pytest.approx(clock.now() + MAX_RESET)


def test_an_answer_releases_its_reservation() -> None:
    pool, clock, (a,) = pool_of([PAID])
    pool.get("gpt-4o")
    budget = headers(requests=(60, 1, "590s"))  # one request every 10 s
    pool.report_outcome(a.hash, "gpt-4o", status=200, headers=budget, error=OK)
    clock.advance(KEY_REUSE_DELAY)
    pool.get("gpt-4o")  # in flight: the 1 left is reserved
    assert a.until_in("gpt4o") > clock.now() + KEY_REUSE_DELAY
    # Its answer: 1 left again (the refill), and nothing in flight.
    pool.report_outcome(a.hash, "gpt-4o", status=200, headers=budget, error=OK)
    assert a.until_in("gpt4o") == clock.now() + KEY_REUSE_DELAY
    state = a.state_in("gpt4o")
    assert state is not None and state.reserved is None  # no empty deque kept per family


def test_a_reservation_nobody_answers_lapses() -> None:
    pool, clock, (a,) = pool_of([PAID])
    pool.get("gpt-4o")
    budget = headers(requests=(600, 1, "599s"))  # 1 request a second
    pool.report_outcome(a.hash, "gpt-4o", status=200, headers=budget, error=OK)
    clock.advance(KEY_REUSE_DELAY)
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
    assert a.until_in("gpt4o") == pytest.approx(clock.now() - 1 + (2 * reserved - 3_000) / 1_000)


def test_a_429_for_tokens_spends_the_token_budget_whatever_remaining_said() -> None:
    pool, clock, (a,) = pool_of([PAID])
    pool.increment_usage(a.hash, "gpt-4o", 500)
    pool.get("gpt-4o")
    budget = headers(requests=(500, 400, "12s"), tokens=(30_000, 400, "59.2s"))
    pool.report_outcome(a.hash, "gpt-4o", status=429, headers=budget, error=UpstreamError("tokens"))
    # 500 tokens a second come back; 500 are reserved per request: 1 s, not the 10 s clamp.
    assert a.until_in("gpt4o") == pytest.approx(clock.now() + 1)


def test_a_typed_429_without_a_budget_locks_for_the_matching_reset() -> None:
    pool, clock, (a,) = pool_of([PAID])
    pool.get("gpt-4")
    clock.advance(0.3)
    resets = {"x-ratelimit-reset-requests": "8s", "x-ratelimit-reset-tokens": "2s"}
    pool.report_outcome(a.hash, "gpt-4", status=429, headers=resets, error=UpstreamError("tokens"))
    assert a.until_in("gpt4") == pytest.approx(clock.now() + 2)
    # MarkRateLimited does not say which limit: the longer reset.
    pool.mark_rate_limited(a.hash, "gpt-4")
    assert a.until_in("gpt4") == pytest.approx(clock.now() + 8)


def test_keys_locked_until_the_same_time_go_least_recently_used_first() -> None:
    # Both keys' request budgets are spent and come back slowly, so both wait the
    # MAX_RESET cap from the answer: the same unlock time, whatever hand-outs follow.
    pool, clock, (a, b) = pool_of([PAID, PAID])
    budget = headers(requests=(2, 0, "20s"))
    pool.update_rate_limits(a.hash, budget, "gpt-4")
    pool.update_rate_limits(b.hash, budget, "gpt-4")
    # A leaves the queues and comes back at the same unlock time (a Recheck
    # without a checker re-enables it): what A was queued by before must not count.
    pool.disable(a.hash, DisableReason.MANUAL)
    pool.recheck()
    clock.advance(1.0)
    assert pool.get("gpt-4") is a  # a tie: the first loaded
    assert a.until_in("gpt4") == b.until_in("gpt4")  # still the same unlock time
    assert pool.get("gpt-4") is b  # b was used least recently
