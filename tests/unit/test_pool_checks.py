"""What the key checker teaches the pool: model ids, trial, organizations, recheck."""

from __future__ import annotations

import pytest

from keysvc.errors import NoKeysForFamily
from keysvc.keys import DisableReason, hash_key, lists_model
from keysvc.pool import ELIGIBLE_CACHE_SIZE
from tests.helpers import make_pool

CHAT_IDS = ["gpt-3.5-turbo", "gpt-4", "gpt-4o", "text-embedding-ada-002", "whisper-1"]


def test_checked_families_come_from_listed_ids_with_turbo_for_unknown_ids() -> None:
    pool, _ = make_pool(["sk-a"])
    key = pool.keys()[0]
    pool.apply_check(key.hash, model_ids=["whisper-1", "gpt-4o"], is_trial=False)
    assert key.model_families == frozenset({"turbo", "gpt4o"})
    assert key.model_ids == frozenset({"whisper-1", "gpt-4o"})
    assert key.last_checked > 0


def test_32k_only_where_the_checker_saw_it() -> None:
    pool, _ = make_pool(["sk-a", "sk-b"])
    a, b = pool.keys()
    with pytest.raises(NoKeysForFamily):
        pool.get("gpt-4-32k")  # unchecked keys never have 32k
    pool.apply_check(a.hash, model_ids=[*CHAT_IDS, "gpt-4-32k"], is_trial=False)
    pool.apply_check(b.hash, model_ids=CHAT_IDS, is_trial=False)
    assert pool.get("gpt-4-32k") is a
    assert "gpt4-32k" not in b.model_families


def test_get_is_limited_to_keys_listing_the_model_once_known() -> None:
    pool, clock = make_pool(["sk-a", "sk-b"])
    a, b = pool.keys()
    pool.apply_check(a.hash, model_ids=["gpt-4", "gpt-3.5-turbo"], is_trial=False)
    pool.apply_check(b.hash, model_ids=["gpt-4o", "gpt-3.5-turbo"], is_trial=False)
    for _ in range(3):
        assert pool.get("gpt-4o") is b
        assert pool.get("gpt-4") is a
        clock.advance(5)
    # gpt-4o-mini (family turbo) is listed by neither key: families alone do not suffice.
    with pytest.raises(NoKeysForFamily):
        pool.get("gpt-4o-mini")


def test_dated_snapshots_of_a_listed_model_count() -> None:
    assert lists_model(frozenset({"gpt-4o"}), "gpt-4o-2024-08-06")
    assert lists_model(frozenset({"gpt-4"}), "gpt-4-0613")
    assert lists_model(frozenset({"gpt-4-0613"}), "gpt-4-0613")
    assert not lists_model(frozenset({"gpt-4"}), "gpt-4o")
    assert not lists_model(frozenset({"gpt-4o-2024-08-06"}), "gpt-4o")
    pool, _ = make_pool(["sk-a"])
    key = pool.keys()[0]
    pool.apply_check(key.hash, model_ids=["gpt-4o"], is_trial=False)
    assert pool.get("gpt-4o-2024-08-06") is key


def test_unchecked_keys_stay_eligible_by_family() -> None:
    pool, clock = make_pool(["sk-a", "sk-b"])
    a, b = pool.keys()
    pool.apply_check(a.hash, model_ids=["gpt-4"], is_trial=False)
    assert pool.get("gpt-4o") is b  # b is unchecked: its default families include gpt4o
    clock.advance(5)
    pool.apply_check(b.hash, model_ids=["gpt-4"], is_trial=False)
    with pytest.raises(NoKeysForFamily):
        pool.get("gpt-4o")
    assert pool.lockout_period("gpt-4o") == 0.0  # same eligibility rule: none eligible


def test_embeddings_exclude_trial_keys_the_checker_found() -> None:
    pool, clock = make_pool(["sk-a", "sk-b"])
    a, b = pool.keys()
    pool.apply_check(a.hash, model_ids=CHAT_IDS, is_trial=True)
    pool.apply_check(b.hash, model_ids=CHAT_IDS, is_trial=False)
    assert a.is_trial and not b.is_trial
    assert pool.get("gpt-3.5-turbo") is a  # trial keys first
    for _ in range(3):
        clock.advance(5)
        assert pool.get("text-embedding-ada-002") is b


def test_keys_of_one_tier_share_one_profile_and_index() -> None:
    pool, _ = make_pool([f"sk-{i}" for i in range(10)])
    for key in pool.keys():
        pool.apply_check(key.hash, model_ids=list(CHAT_IDS), is_trial=False)
    profiles = {id(key.profile) for key in pool.keys()}
    assert len(profiles) == 1
    assert len(pool._groups) == 1  # the unchecked profile's group went away when it emptied
    assert pool.available() == 10


def test_profile_change_keeps_counts_and_heaps_right() -> None:
    pool, _ = make_pool(["sk-a", "sk-b", "sk-c"])
    a, b, c = pool.keys()
    pool.get("gpt-4")  # a is now throttled in the unchecked index
    pool.apply_check(a.hash, model_ids=["gpt-4"], is_trial=False)
    pool.apply_check(a.hash, model_ids=["gpt-4", "gpt-4o"], is_trial=True)
    assert pool.available() == 3
    assert sum(group.live for group in pool._groups.values()) == 3
    seen = {pool.get("gpt-4").hash for _ in range(3)}
    assert seen == {a.hash, b.hash, c.hash}  # each key handed out exactly once, none twice
    pool.disable(b.hash, DisableReason.REVOKED)
    pool.apply_check(b.hash, model_ids=["gpt-4"], is_trial=False)  # disabled since: stays out
    assert b.is_disabled
    assert pool.available() == 2


def test_check_with_unreadable_model_list_keeps_known_ids() -> None:
    pool, _ = make_pool(["sk-a"])
    key = pool.keys()[0]
    pool.apply_check(key.hash, model_ids=["gpt-4"], is_trial=False)
    pool.apply_check(key.hash, model_ids=None, is_trial=True)
    assert key.model_ids == frozenset({"gpt-4"})
    assert key.is_trial


def test_dead_check_disables_with_reason() -> None:
    pool, _ = make_pool(["sk-a"])
    key = pool.keys()[0]
    pool.apply_dead_check(key.hash, DisableReason.QUOTA)
    assert key.is_disabled and key.is_over_quota and not key.is_revoked
    assert key.disable_reason is DisableReason.QUOTA
    assert key.last_checked > 0
    assert pool.available() == 0


def test_recheck_with_checker_keeps_dead_keys_out_until_alive() -> None:
    pool, clock = make_pool(["sk-dead", "sk-live"])
    dead, live = pool.keys()
    pool.apply_check(live.hash, model_ids=CHAT_IDS, is_trial=False)
    pool.apply_dead_check(dead.hash, DisableReason.REVOKED)
    pool.recheck(until_checked=True)
    assert dead.is_disabled and dead.revive_if_alive
    assert dead.last_checked == 0 and live.last_checked == 0
    assert pool.available() == 1
    for _ in range(5):
        assert pool.get("gpt-4") is live
        clock.advance(5)
    pool.apply_check(dead.hash, model_ids=CHAT_IDS, is_trial=False)
    assert not dead.is_disabled and not dead.is_revoked and dead.disable_reason is None
    assert pool.available() == 2
    assert pool.get("gpt-4") is dead  # least recently used


def test_recheck_with_checker_still_dead_takes_the_new_reason() -> None:
    pool, _ = make_pool(["sk-a"])
    key = pool.keys()[0]
    pool.apply_dead_check(key.hash, DisableReason.QUOTA)
    pool.recheck(until_checked=True)
    pool.apply_dead_check(key.hash, DisableReason.REVOKED)
    assert key.is_disabled and key.is_revoked and not key.is_over_quota
    assert key.disable_reason is DisableReason.REVOKED
    assert not key.revive_if_alive
    pool.apply_check(key.hash, model_ids=CHAT_IDS, is_trial=False)
    assert key.is_disabled  # a later alive check does not revive without a new Recheck


def test_disable_during_recheck_is_not_undone_by_the_check() -> None:
    pool, _ = make_pool(["sk-a"])
    key = pool.keys()[0]
    pool.disable(key.hash, DisableReason.MANUAL)
    pool.recheck(until_checked=True)
    pool.disable(key.hash, DisableReason.REVOKED)  # a proxy's newer report
    pool.apply_check(key.hash, model_ids=CHAT_IDS, is_trial=False)
    assert key.is_disabled


def test_recheck_without_checker_is_the_seed_behaviour() -> None:
    pool, _ = make_pool(["sk-a"])
    key = pool.keys()[0]
    pool.disable(key.hash, DisableReason.REVOKED)
    pool.recheck()
    assert not key.is_disabled and pool.available() == 1


def test_clone_for_org() -> None:
    pool, _ = make_pool(["sk-a"])
    parent = pool.keys()[0]
    pool.apply_check(parent.hash, model_ids=CHAT_IDS, is_trial=False, organization_id="org-1")
    clone = pool.clone_for_org(parent.hash, "org-2")
    assert clone is not None
    assert clone.hash == hash_key("sk-a", "org-2") != parent.hash
    assert clone.organization_id == "org-2" and parent.organization_id == "org-1"
    assert clone.cloned_from == parent.hash
    assert clone.last_checked == 0 and not clone.is_disabled
    assert pool.clone_for_org(parent.hash, "org-2") is None
    assert len(pool) == 2 and pool.available() == 2


def test_eligible_cache_is_bounded() -> None:
    pool, _ = make_pool(["sk-a"])
    for i in range(ELIGIBLE_CACHE_SIZE + 10):
        pool.lockout_period(f"gpt-4-{i:04d}")  # dated snapshots (some gpt4-turbo)
    assert len(pool._eligible_cache) <= ELIGIBLE_CACHE_SIZE
