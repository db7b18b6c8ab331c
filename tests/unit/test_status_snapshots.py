"""Snapshots of the pool for the HTTP port: counted from the pool's change reports
(or, without them, walked) in slices, shared, and the same as one walk over the
whole pool."""

from __future__ import annotations

import asyncio
import random

import pytest

from keysvc.clock import ManualClock
from keysvc.keys import DisableReason
from keysvc.listing import KeyFilter
from keysvc.models import ModelTable
from keysvc.pool import KeyPool
from keysvc.status import (
    KeyCensus,
    PoolSnapshot,
    PoolSnapshots,
    key_state,
    summarize,
    take_snapshot,
)
from keysvc.store import MemoryKeyStore


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


def same(taken: PoolSnapshot, walked: PoolSnapshot) -> None:
    assert taken.taken_at == walked.taken_at
    assert taken.total_keys == walked.total_keys
    assert taken.summaries == walked.summaries
    assert taken.lists == walked.lists


async def test_a_sliced_walk_counts_what_one_walk_over_the_pool_counts() -> None:
    pool, clock = used_pool(1_000)
    snapshots = PoolSnapshots(pool, listed=25, batch_keys=64, slice_seconds=0, max_age=0)
    sliced = await snapshots.fresh()
    same(sliced, take_snapshot(pool, listed=25))
    assert sliced.total_keys == 1_000 and sliced.taken_at == clock.now()
    lists = {listed.state: listed for listed in sliced.lists}
    assert set(lists) == {"active", "locked", "disabled"}
    for state, listed in lists.items():
        expected = pool.load_order.page(0, 25, KeyFilter(state).predicate(clock.now()), 1_000)
        assert [k.hash for k in listed.keys] == [k.hash for k in expected.keys], state
    assert lists["disabled"].count == 2 and len(lists["disabled"].keys) == 2
    assert lists["locked"].count + lists["active"].count == 998
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


def watched_pool(keys: int) -> tuple[KeyPool, ManualClock, KeyCensus]:
    clock = ManualClock()
    census = KeyCensus()
    pool = KeyPool(store=census.watching(MemoryKeyStore()), models=ModelTable(), clock=clock)
    for n in range(keys):
        pool.add_key(f"sk-census-{n:05d}")
    return pool, clock, census


async def test_a_census_keeps_what_a_walk_would_count_through_every_kind_of_change() -> None:
    pool, clock, census = watched_pool(300)
    snapshots = PoolSnapshots(pool, census, listed=10, batch_keys=7, slice_seconds=0, max_age=0)
    same(await snapshots.fresh(), take_snapshot(pool, listed=10))
    chance = random.Random(17)
    models = ("gpt-4o", "gpt-4", "gpt-3.5-turbo", "o3")
    added = 300
    for step in range(400):
        keys = pool.keys()
        key = chance.choice(keys)
        action = chance.randrange(9)
        if action <= 2:
            pool.get(chance.choice(models))  # a hand-out locks its key
        elif action == 3:
            pool.increment_usage(key.hash, chance.choice(models), chance.randrange(1, 500))
        elif action == 4:
            pool.mark_rate_limited(key.hash, chance.choice(models))
        elif action == 5:
            pool.disable(key.hash, chance.choice(list(DisableReason)))
        elif action == 6:  # a check: new families, perhaps trial, perhaps alive again
            ids = chance.sample(["gpt-4o", "gpt-4", "o3", "gpt-4.1"], 2)
            pool.apply_check(key.hash, model_ids=ids, is_trial=chance.random() < 0.3)
        elif action == 7:  # a reload: a key goes, perhaps another comes (in its row)
            pool.remove_key(key.hash)
            if chance.random() < 0.5:
                pool.add_key(f"sk-census-{added:05d}")
                added += 1
        else:
            clock.advance(chance.choice((0.2, 0.7, 1.5, 30.0)))  # locks end
        if step % 5 == 0:
            same(await snapshots.fresh(), take_snapshot(pool, listed=10))
    same(await snapshots.fresh(), take_snapshot(pool, listed=10))


async def test_a_census_that_watches_the_store_does_not_walk_the_pool() -> None:
    pool, clock, census = watched_pool(500)
    snapshots = PoolSnapshots(pool, census, listed=5, batch_keys=10, slice_seconds=0, max_age=0)
    await snapshots.fresh()
    walked = take_snapshot(pool, listed=5)  # before keys() is taken away

    def no_walks() -> list[object]:
        raise AssertionError("the snapshot walked the pool")

    handed = pool.get("gpt-4o")
    clock.advance(0.5)
    pool.disable(pool.keys()[7].hash, DisableReason.MANUAL)
    walked = take_snapshot(pool, listed=5)
    pool.keys = no_walks  # type: ignore[method-assign]
    same(await snapshots.fresh(), walked)
    clock.advance(5)  # the hand-out's lock ends with no report about the key
    unlocked = await snapshots.fresh()
    gpt4o = next(s for s in unlocked.summaries if s.family == "gpt4o")
    assert gpt4o.counts["locked"] == 0 and gpt4o.counts["disabled"] == 1
    assert unlocked.lists[0].state == "active" and unlocked.lists[0].count == 499
    assert handed.hash in {k.hash for k in unlocked.lists[0].keys}


@pytest.mark.parametrize("watched", [True, False])
async def test_token_sums_count_only_keys_in_the_pool(watched: bool) -> None:
    pool, _, census = watched_pool(50)
    snapshots = PoolSnapshots(pool, census if watched else None, max_age=0)
    keys = pool.keys()
    pool.increment_usage(keys[0].hash, "gpt-4o", 100)
    pool.increment_usage(keys[1].hash, "gpt-4o", 20)
    pool.increment_usage(keys[1].hash, "o3", 3)
    pool.remove_key(keys[1].hash)
    pool.add_key("sk-census-new")  # takes the removed key's row, with no usage
    tokens = {s.family: s.tokens for s in (await snapshots.fresh()).summaries if s.tokens}
    assert tokens == {"gpt4o": 100}
