"""Snapshots of the pool for the HTTP port: walked in slices, shared, and the same
counts as one walk over the whole pool."""

from __future__ import annotations

import asyncio

from keysvc.clock import ManualClock
from keysvc.keys import DisableReason
from keysvc.models import ModelTable
from keysvc.pool import KeyPool
from keysvc.status import PoolSnapshots, key_state, summarize, take_snapshot


def used_pool(keys: int) -> tuple[KeyPool, ManualClock]:
    clock = ManualClock()
    pool = KeyPool.from_secrets(
        [f"sk-snap-{n:05d}" for n in range(keys)], models=ModelTable(), clock=clock
    )
    listed = pool.keys()
    for n in range(keys // 2):
        key = pool.get("gpt-4o" if n % 2 else "gpt-3.5-turbo")
        pool.increment_usage(key.hash, "gpt-4o", n)
    pool.disable(listed[1].hash, DisableReason.REVOKED)
    pool.disable(listed[2].hash, DisableReason.QUOTA)
    clock.advance(0.5)
    pool.mark_rate_limited(listed[4].hash)
    return pool, clock


async def test_a_sliced_walk_counts_what_one_walk_over_the_pool_counts() -> None:
    pool, clock = used_pool(1_000)
    snapshots = PoolSnapshots(pool, listed=25, batch_keys=64, slice_seconds=0, max_age=0)
    sliced = await snapshots.fresh()
    whole = take_snapshot(pool, listed=25)
    assert sliced.summaries == whole.summaries
    assert sliced.first_keys == whole.first_keys
    assert [k.hash for k in sliced.first_keys] == sorted(k.hash for k in pool.keys())[:25]
    assert sliced.total_keys == 1_000 and sliced.taken_at == clock.now()
    now = clock.now()
    by_state = summarize([key_state(k, now) for k in pool.keys()], pool.family_lockout)
    assert [s for s in sliced.summaries if s.total or s.tokens] == by_state
    assert snapshots.latest is sliced


async def test_the_loop_runs_between_slices() -> None:
    pool, _ = used_pool(1_000)
    snapshots = PoolSnapshots(pool, batch_keys=100, slice_seconds=0, max_age=0)
    turns = 0

    async def other_work() -> None:
        nonlocal turns
        while True:
            turns += 1
            await asyncio.sleep(0)

    worker = asyncio.ensure_future(other_work())
    await asyncio.sleep(0)
    started = turns
    await snapshots.fresh()
    worker.cancel()
    # Ten slices: the other task ran between them, not only after the walk.
    assert turns - started >= 9


async def test_views_during_a_walk_share_it_and_a_recent_one_is_reused() -> None:
    pool, clock = used_pool(500)
    now = [100.0]
    snapshots = PoolSnapshots(
        pool, batch_keys=50, slice_seconds=0, max_age=1.0, timer=lambda: now[0]
    )
    first, second = await asyncio.gather(snapshots.fresh(), snapshots.fresh())
    assert first is second
    now[0] += 0.5
    assert await snapshots.fresh() is first  # within max_age
    pool.disable(pool.keys()[0].hash, DisableReason.MANUAL)
    now[0] += 0.6
    newer = await snapshots.fresh()
    assert newer is not first
    disabled = sum(s.counts["disabled"] for s in newer.summaries)
    assert disabled == sum(s.counts["disabled"] for s in first.summaries) + len(
        pool.keys()[0].model_families
    )


async def test_a_caller_that_goes_away_does_not_cancel_the_walk() -> None:
    pool, _ = used_pool(500)
    snapshots = PoolSnapshots(pool, batch_keys=10, slice_seconds=0, max_age=0)
    leaving = asyncio.ensure_future(snapshots.fresh())
    staying = asyncio.ensure_future(snapshots.fresh())
    await asyncio.sleep(0)
    await asyncio.sleep(0)
    leaving.cancel()
    snapshot = await staying
    assert snapshot.total_keys == 500
