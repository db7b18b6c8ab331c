"""Get with max_wait (``KeyPool.get_waiting``) on a manual clock: timers fire only when
the test advances the clock, so nothing here sleeps."""

from __future__ import annotations

import asyncio

import pytest

from keysvc.errors import InvalidArgument, KeysBusy, NoKeysForFamily
from keysvc.keys import DisableReason, Key
from keysvc.pool import DEADLINE_MARGIN, KEY_REUSE_DELAY, MAX_WAIT, KeyPool
from tests.helpers import PAID, pool_of


async def settle() -> None:
    """Lets every ready task and callback run."""
    for _ in range(10):
        await asyncio.sleep(0)


def waiting(pool: KeyPool, model: str = "gpt-4", max_wait: float = 30.0) -> asyncio.Task[Key]:
    return asyncio.get_running_loop().create_task(pool.get_waiting(model, max_wait))


def snapshot(keys: list[Key]) -> list[tuple[float, float, float]]:
    return [(k.last_used, k.rate_limited_at, k.until_in("gpt4")) for k in keys]


async def test_a_free_key_is_handed_out_at_once() -> None:
    pool, clock, (a, b) = pool_of([PAID, PAID])
    assert await pool.get_waiting("gpt-4", 5) is a
    assert await pool.get_waiting("gpt-4", 5) is b
    assert clock.pending() == 0


async def test_waits_for_the_first_key_to_unlock_and_hands_it_out() -> None:
    pool, clock, (a, b) = pool_of([PAID, PAID])
    pool.get("gpt-4")  # a, until t+1
    clock.advance(0.5)
    pool.get("gpt-4")  # b, until t+1.5
    task = waiting(pool)
    await settle()
    assert not task.done()
    assert clock.pending() == 2  # the deadline and the one unlock timer: no polling
    clock.advance(0.4)
    await settle()
    assert not task.done()
    clock.advance(0.1)  # a unlocks
    await settle()
    assert task.result() is a
    assert a.last_used == clock.now()
    assert clock.pending() == 0  # its deadline timer is gone


async def test_no_busy_polling_while_waiting(monkeypatch: pytest.MonkeyPatch) -> None:
    pool, clock, (a,) = pool_of([PAID])
    pool.mark_rate_limited(a.hash, "gpt-4")  # 10 s
    selects = 0
    real_select = pool._select

    def counting(*args, **kwargs):  # type: ignore[no-untyped-def]
        nonlocal selects
        selects += 1
        return real_select(*args, **kwargs)

    monkeypatch.setattr(pool, "_select", counting)
    task = waiting(pool)
    await settle()
    after_start = selects
    for _ in range(50):
        await asyncio.sleep(0)
    assert selects == after_start  # nothing runs until the unlock timer fires
    clock.advance(10)
    await settle()
    assert task.result() is a


async def test_waiters_are_served_in_arrival_order() -> None:
    pool, clock, (a, b, c) = pool_of([PAID, PAID, PAID])
    for key in (a, b, c):
        assert pool.get("gpt-4") is key
        clock.advance(0.2)  # a until t+1, b until t+1.2, c until t+1.4
    tasks = [waiting(pool) for _ in range(4)]
    await settle()
    served: list[tuple[int, Key]] = []
    for task_number, task in enumerate(tasks):
        task.add_done_callback(lambda t, n=task_number: served.append((n, t.result())))
    clock.advance(0.5)  # t+1.1: a is free
    await settle()
    assert served == [(0, a)]
    clock.advance(0.3)  # t+1.4: b and c are free
    await settle()
    assert served == [(0, a), (1, b), (2, c)]
    clock.advance(1.0)  # a's second throttle (from t+1.1) ended at t+2.1
    await settle()
    assert served[3] == (3, a)


async def test_a_cancelled_waiter_leaves_no_trace() -> None:
    pool, clock, (a, b) = pool_of([PAID, PAID])
    pool.get("gpt-4")
    pool.get("gpt-4")
    before = snapshot([a, b])
    task = waiting(pool)
    await settle()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    await settle()
    assert pool._queues == {}
    assert clock.pending() == 0
    clock.advance(5)
    await settle()
    assert snapshot([a, b]) == before  # no key was throttled for the gone caller


async def test_a_waiter_cancelled_right_after_being_woken_takes_no_key() -> None:
    pool, clock, (a,) = pool_of([PAID])
    pool.get("gpt-4")
    first, second = waiting(pool), waiting(pool)
    await settle()
    clock.advance(KEY_REUSE_DELAY)  # a unlocks: the first waiter is woken...
    first.cancel()  # ...but its caller goes away before it runs
    await settle()
    assert first.cancelled()
    assert second.result() is a  # the key went to the next in line
    assert a.last_used == clock.now()


async def test_at_the_deadline_with_every_key_locked_nothing_is_handed_out() -> None:
    """Not the key that unlocks first (a plain Get's answer): the caller waited all it
    would, and that key's budget has no room; it is told when the first unlocks."""
    pool, clock, (a, b) = pool_of([PAID, PAID])
    pool.mark_rate_limited(a.hash, "gpt-4")  # until t+10
    clock.advance(1)
    pool.mark_rate_limited(b.hash, "gpt-4")  # until t+11
    before = snapshot([a, b])
    task = waiting(pool, max_wait=3)
    await settle()
    clock.advance(3)
    await settle()
    with pytest.raises(KeysBusy) as busy:
        task.result()
    assert busy.value.retry_delay == pytest.approx(6.0)  # a unlocks at t+10; now t+4
    assert busy.value.family == "gpt4"
    assert snapshot([a, b]) == before  # nothing handed out, nothing reserved
    assert pool._queues == {} and clock.pending() == 0
    # A plain Get still never refuses: it hands out the key that unlocks first.
    assert pool.get("gpt-4") is a


async def test_a_shorter_lock_wakes_the_waiter_without_the_clock_moving() -> None:
    pool, clock, (a,) = pool_of([PAID])
    pool.get("gpt-4")
    pool.update_rate_limits(
        a.hash, {"x-ratelimit-remaining-requests": "0", "x-ratelimit-reset-requests": "8s"}, "gpt-4"
    )
    clock.advance(2)
    task = waiting(pool)
    await settle()
    assert not task.done()
    # The next answer says there is quota left: the lock shrinks to the (spent) throttle.
    pool.update_rate_limits(a.hash, {"x-ratelimit-remaining-requests": "3"}, "gpt-4")
    await settle()
    assert task.result() is a


async def test_a_key_coming_back_is_handed_to_the_waiter() -> None:
    pool, clock, (a,) = pool_of([PAID])
    pool.mark_rate_limited(a.hash, "gpt-4")
    task = waiting(pool)
    await settle()
    pool.add_key("sk-new-key-0001")
    await settle()
    assert task.result().secret == "sk-new-key-0001"


async def test_disabling_the_last_key_ends_the_wait_with_no_keys() -> None:
    pool, clock, (a,) = pool_of([PAID])
    pool.mark_rate_limited(a.hash)
    tasks = [waiting(pool), waiting(pool)]
    await settle()
    pool.disable(a.hash, DisableReason.REVOKED)
    await settle()
    for task in tasks:
        with pytest.raises(NoKeysForFamily):
            task.result()
    assert pool._queues == {} and clock.pending() == 0


async def test_families_wait_apart() -> None:
    pool, clock, (a,) = pool_of([PAID])
    pool.mark_rate_limited(a.hash, "gpt-4")
    gpt4 = waiting(pool, "gpt-4")
    await settle()
    assert await pool.get_waiting("gpt-3.5-turbo", 5) is a  # free for turbo
    assert not gpt4.done()
    clock.advance(10)
    await settle()
    assert gpt4.result() is a


@pytest.mark.parametrize("max_wait", [-0.001, MAX_WAIT + 0.001, float("nan")])
async def test_max_wait_out_of_range_is_invalid(max_wait: float) -> None:
    pool, _, _ = pool_of([PAID])
    with pytest.raises(InvalidArgument, match="max_wait"):
        await pool.get_waiting("gpt-4", max_wait)


async def test_zero_max_wait_is_a_plain_get() -> None:
    pool, clock, (a,) = pool_of([PAID])
    pool.mark_rate_limited(a.hash)
    assert await pool.get_waiting("gpt-4", 0) is a
    assert clock.pending() == 0


async def test_waiters_for_many_model_names_of_one_family_share_one_queue() -> None:
    pool, clock, (a,) = pool_of([PAID])
    pool.mark_rate_limited(a.hash, "gpt-4")  # locked 10 s for gpt4, every name's family
    names = [f"gpt-4-{i}" for i in range(2000, 2200)]  # dated snapshots: family gpt4
    tasks = [waiting(pool, name) for name in names]
    await settle()
    assert len(pool._queues) == 1  # one eligibility class, not 200 queues
    selects = 0
    real_select = pool._select

    def counting(*args, **kwargs):  # type: ignore[no-untyped-def]
        nonlocal selects
        selects += 1
        return real_select(*args, **kwargs)

    pool._select = counting  # type: ignore[method-assign]
    pool._dispatch()
    assert selects == 1  # a dispatch costs one selection per class
    clock.advance(10)
    await settle()
    # First come, first served across the names: the first waiter got the key.
    assert tasks[0].done() and tasks[0].result() is a
    assert not any(task.done() for task in tasks[1:])
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    await settle()
    assert pool._queues == {}


async def test_the_wait_ends_a_margin_before_the_caller_s_deadline() -> None:
    pool, clock, (a,) = pool_of([PAID])
    pool.mark_rate_limited(a.hash, "gpt-4")  # locked 10 s
    task = asyncio.get_running_loop().create_task(pool.get_waiting("gpt-4", 30, time_left=2.0))
    await settle()
    clock.advance(2.0 - DEADLINE_MARGIN)
    await settle()
    with pytest.raises(KeysBusy):  # told in time for the caller
        task.result()
    # A caller with less time left than the margin does not wait at all ...
    with pytest.raises(KeysBusy):
        await pool.get_waiting("gpt-4", 30, time_left=DEADLINE_MARGIN / 2)
    assert clock.pending() == 0
    # ... and a free key is still handed out to it at once.
    clock.advance(10)
    assert await pool.get_waiting("gpt-4", 30, time_left=DEADLINE_MARGIN / 2) is a
