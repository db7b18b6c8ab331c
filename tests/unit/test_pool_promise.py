"""GetLockoutPeriod's 0 holds the room it found for the caller's next Get (the seed's
queue: poll GetLockoutPeriod, let a request go on 0, Get); on a manual clock."""

from __future__ import annotations

import pytest

from keysvc.clock import ManualClock
from keysvc.keys import Key
from keysvc.outcomes import UpstreamError
from keysvc.pool import KEY_REUSE_DELAY, PROMISE_TTL, RESERVATION_TTL, KeyPool
from tests.helpers import PAID, pool_of

OK = UpstreamError()
PROXY_A = "ipv4:127.0.0.1:40001"
PROXY_B = "ipv4:127.0.0.1:40002"


def with_budget(pool: KeyPool, key: Key, *, left: int, model: str = "gpt-4o") -> None:
    """One hand-out answered: ``left`` of 10 requests a minute left, a slow refill
    (so that the tests' fractions of a second bring no new room)."""
    pool.get(model)
    pool.update_rate_limits(
        key.hash,
        {
            "x-ratelimit-limit-requests": "10",
            "x-ratelimit-remaining-requests": str(left),
            "x-ratelimit-reset-requests": "59s",
        },
        model,
    )


def one_key(left: int) -> tuple[KeyPool, ManualClock, Key]:
    pool, clock, (a,) = pool_of([PAID])
    with_budget(pool, a, left=left)
    return pool, clock, a


def in_flight(key: Key, now: float | None = None, family: str = "gpt4o") -> int:
    """Hand-outs in flight and holds on the key's budget for ``family`` (those not
    lapsed by ``now``: lapsed ones go when the key's state is next derived)."""
    state = key.state_in(family)
    assert state is not None
    return sum(1 for at, _ in state.reserved or () if now is None or at + RESERVATION_TTL > now)


def test_a_zero_holds_the_room_for_the_caller_that_asked() -> None:
    pool, _, a = one_key(left=1)
    assert pool.lockout_period("gpt-4o", caller=PROXY_A) == 0.0
    # The one request's room is A's: B is told to wait, not sent to race A for it,
    # and so is A for a second request, until the first one's Get.
    assert pool.lockout_period("gpt-4o", caller=PROXY_B) > 0.0
    assert pool.lockout_period("gpt-4o", caller=PROXY_A) > 0.0
    assert pool.get("gpt-4o", caller=PROXY_A) is a
    assert in_flight(a) == 1  # the hand-out; the hold went back to be handed out
    assert pool.lockout_period("gpt-4o", caller=PROXY_B) > 0.0


def test_without_a_caller_nothing_is_held() -> None:
    # In-process use and the race as it was: both told 0 for the one room.
    pool, _, a = one_key(left=1)
    assert pool.lockout_period("gpt-4o") == 0.0
    assert pool.lockout_period("gpt-4o") == 0.0
    assert in_flight(a) == 0


def test_each_zero_holds_one_more_room() -> None:
    # A proxy that lets several requests go, each after its own GetLockoutPeriod.
    pool, _, a = one_key(left=3)
    assert [pool.lockout_period("gpt-4o", caller=PROXY_A) for _ in range(4)][:3] == [0.0] * 3
    assert pool.lockout_period("gpt-4o", caller=PROXY_A) > 0.0
    assert pool.lockout_period("gpt-4o", caller=PROXY_B) > 0.0
    for _ in range(3):
        assert pool.get("gpt-4o", caller=PROXY_A) is a
    assert in_flight(a) == 3


def test_a_hold_nobody_uses_lapses() -> None:
    pool, clock, a = one_key(left=1)
    assert pool.lockout_period("gpt-4o", caller=PROXY_A) == 0.0
    lockout = pool.lockout_period("gpt-4o", caller=PROXY_B)
    assert 0.0 < lockout <= PROMISE_TTL
    clock.advance(lockout)
    assert pool.lockout_period("gpt-4o", caller=PROXY_B) == 0.0  # A went quiet: B's now
    assert pool.get("gpt-4o", caller=PROXY_B) is a


def test_a_caller_whose_hold_lapsed_unused_holds_nothing_until_its_next_get() -> None:
    # The seed's queue polls every 50 ms with or without requests waiting.
    pool, clock, a = one_key(left=5)
    for _ in range(4):
        assert pool.lockout_period("gpt-4o", caller=PROXY_A) == 0.0
        clock.advance(0.05)
    assert in_flight(a) == 4
    clock.advance(PROMISE_TTL)
    for _ in range(10):  # its holds lapsed unused: it polls without holding
        assert pool.lockout_period("gpt-4o", caller=PROXY_A) == 0.0
        clock.advance(0.05)
    assert in_flight(a, clock.now()) == 0
    # A request came: its Get shows the caller follows a 0 with a Get again.
    pool.get("gpt-4o", caller=PROXY_A)
    assert pool.lockout_period("gpt-4o", caller=PROXY_A) == 0.0
    assert in_flight(a, clock.now()) == 2  # the hand-out and a new hold


def test_a_get_by_another_caller_counts_the_held_room_as_spoken_for() -> None:
    pool, clock, (a, b) = pool_of([PAID, PAID])
    with_budget(pool, a, left=1)
    clock.advance(KEY_REUSE_DELAY)
    with_budget(pool, b, left=1)
    clock.advance(KEY_REUSE_DELAY)
    # A's 0 holds the room of the key a Get would get now: a, the least recently used.
    assert pool.lockout_period("gpt-4o", caller=PROXY_A) == 0.0
    assert pool.get("gpt-4o", caller=PROXY_B) is b  # B did not ask: a's room is spoken for
    assert pool.get("gpt-4o", caller=PROXY_A) is a


def test_a_hold_is_for_its_family_only() -> None:
    pool, _, a = one_key(left=1)
    assert pool.lockout_period("gpt-4o", caller=PROXY_A) == 0.0
    # A's Get in another family does not give the gpt-4o room back.
    pool.get("gpt-3.5-turbo", caller=PROXY_A)
    assert pool.lockout_period("gpt-4o", caller=PROXY_B) > 0.0
    assert in_flight(a) == 1


def test_a_report_without_a_model_is_not_attributed_to_a_hold() -> None:
    pool, clock, a = one_key(left=5)
    # A hand-out of gpt-3.5 in flight, then a hold in gpt-4o's family.
    pool.get("gpt-3.5-turbo")
    clock.advance(0.01)
    assert pool.lockout_period("gpt-4o", caller=PROXY_A) == 0.0
    # The answer names no model: it answers the gpt-3.5 hand-out, not the hold.
    pool.update_rate_limits(
        a.hash,
        {
            "x-ratelimit-limit-requests": "3500",
            "x-ratelimit-remaining-requests": "3400",
            "x-ratelimit-reset-requests": "1s",
        },
    )
    turbo, gpt4o = a.state_in("turbo"), a.state_in("gpt4o")
    assert turbo is not None and turbo.requests_limit == 3500 and turbo.reserved is None
    assert gpt4o is not None and gpt4o.requests_limit == 10
    assert in_flight(a) == 1  # the hold stands


def test_an_answer_does_not_end_a_hold() -> None:
    pool, _, a = one_key(left=3)
    pool.get("gpt-4o")  # in flight
    assert pool.lockout_period("gpt-4o", caller=PROXY_A) == 0.0
    pool.report_outcome(a.hash, "gpt-4o", status=500, headers={}, error=OK)
    assert in_flight(a) == 1  # the answer ended the hand-out's reservation, not the hold


@pytest.mark.parametrize("left", [0, 1, 3])
def test_a_zero_is_true_for_each_caller_told_it(left: int) -> None:
    # Six proxies ask at once: exactly as many are told 0 as there is room, and
    # each one's Get then has its room.
    pool, _, a = one_key(left=left)
    callers = [f"ipv4:127.0.0.1:{port}" for port in range(40010, 40016)]
    told_zero = [c for c in callers if pool.lockout_period("gpt-4o", caller=c) == 0.0]
    assert len(told_zero) == left
    for caller in told_zero:
        assert pool.get("gpt-4o", caller=caller) is a
    assert in_flight(a) == left  # hand-outs, no hold left over
    assert pool.lockout_period("gpt-4o") > 0.0
