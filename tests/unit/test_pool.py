"""The pool's semantics, with a manual clock: nothing here sleeps."""

from __future__ import annotations

import pytest

from keysvc.errors import FamilyDisallowed, InvalidArgument, KeyNotFound, NoKeysForFamily
from keysvc.keys import DisableReason, KeyProfile, hash_key
from keysvc.pool import KEY_REUSE_DELAY, MAX_RESET, RATE_LIMIT_FALLBACK
from tests.helpers import PAID, PAID_32K, TRIAL, TURBO_ONLY, make_pool, pool_of

# -- loading -----------------------------------------------------------------


def test_keys_are_deduplicated_and_hashed() -> None:
    pool, _ = make_pool(["sk-a", "sk-b", "sk-a"])
    assert [k.hash for k in pool.keys()] == [hash_key("sk-a"), hash_key("sk-b")]


def test_unchecked_keys_have_every_family_but_32k() -> None:
    pool, _ = make_pool(["sk-a"])
    (key,) = pool.keys()
    assert "gpt4-32k" not in key.model_families
    assert {"turbo", "gpt4", "gpt4o"} <= key.model_families
    with pytest.raises(NoKeysForFamily) as caught:
        pool.get("gpt-4-32k")
    assert caught.value.family == "gpt4-32k"
    assert "gpt4-32k" in str(caught.value)


def test_empty_pool_fails_with_the_family_named() -> None:
    pool, _ = make_pool([])
    with pytest.raises(NoKeysForFamily, match="gpt4o"):
        pool.get("gpt-4o")
    assert pool.available() == 0
    assert pool.lockout_period("gpt-4o") == 0


# -- selection order -----------------------------------------------------------


def test_unlocked_keys_come_before_locked_keys() -> None:
    pool, _, (a, b) = pool_of([PAID, PAID])
    assert pool.get("gpt-4") is a  # a is now throttled
    assert pool.get("gpt-4") is b


def test_among_locked_keys_the_one_unlocking_first_wins() -> None:
    pool, clock, (a, b) = pool_of([PAID, PAID])
    pool.mark_rate_limited(a.hash)  # 10 s fallback lock from t=0
    clock.advance(2)
    pool.mark_rate_limited(b.hash)  # until t=12
    assert pool.get("gpt-4") is a
    # a, just handed out, is locked for the reuse delay only; b is locked for 10 s.
    assert pool.get("gpt-4") is a


def test_trial_keys_come_first() -> None:
    pool, _, (paid, trial) = pool_of([PAID, TRIAL])
    assert pool.get("gpt-4") is trial
    assert pool.get("gpt-4") is paid


def test_keys_without_32k_come_first() -> None:
    pool, _, (with_32k, without) = pool_of([PAID_32K, PAID])
    assert pool.get("gpt-4") is without
    assert pool.get("gpt-4") is with_32k
    assert pool.get("gpt-4-32k") is with_32k  # the only eligible key, though locked


def test_least_recently_used_last() -> None:
    pool, clock, keys = pool_of([PAID, PAID, PAID])
    order = [pool.get("gpt-4") for _ in keys]
    assert order == keys
    clock.advance(KEY_REUSE_DELAY)
    assert [pool.get("gpt-4") for _ in keys] == order


def test_families_limit_eligibility() -> None:
    pool, _, (turbo_only, paid) = pool_of([TURBO_ONLY, PAID])
    assert pool.get("gpt-4o") is paid
    assert pool.get("gpt-4o") is paid  # locked, but the only key with gpt4o


def test_embeddings_never_go_to_trial_keys() -> None:
    pool, _, (trial,) = pool_of([TRIAL])
    with pytest.raises(NoKeysForFamily):
        pool.get("text-embedding-ada-002")
    assert pool.get("gpt-3.5-turbo") is trial


# -- throttle and locks ------------------------------------------------------------


def test_handed_out_key_is_throttled_for_the_reuse_delay() -> None:
    pool, clock, (a, b) = pool_of([PAID, PAID])
    assert pool.get("gpt-4") is a
    assert a.last_used == clock.now() == a.rate_limited_at
    assert a.rate_limited_until == clock.now() + KEY_REUSE_DELAY
    assert pool.get("gpt-4") is b
    clock.advance(KEY_REUSE_DELAY / 2)
    assert pool.lockout_period("gpt-4") == pytest.approx(KEY_REUSE_DELAY / 2)
    clock.advance(KEY_REUSE_DELAY / 2)
    assert pool.lockout_period("gpt-4") == 0
    assert pool.get("gpt-4") is a


def test_lock_ends_at_rate_limited_until_not_after_a_30s_window() -> None:
    pool, clock, (a, b) = pool_of([PAID, PAID])
    pool.get("gpt-4")  # a
    pool.update_rate_limits(a.hash, {"x-ratelimit-reset-requests": "2s"})
    pool.mark_rate_limited(a.hash)
    clock.advance(2.5)
    # b was never used; a's lock is over. The seed would still hold a back for 30 s.
    assert pool.get("gpt-4") is b
    assert pool.get("gpt-4") is a


def test_a_429_without_reset_headers_locks_for_the_fallback() -> None:
    pool, clock, (a,) = pool_of([PAID])
    pool.mark_rate_limited(a.hash)
    assert a.rate_limited_until == clock.now() + RATE_LIMIT_FALLBACK
    assert pool.lockout_period("gpt-4") == pytest.approx(RATE_LIMIT_FALLBACK)


def test_reset_headers_lock_from_hand_out_time_for_the_longer_reset() -> None:
    pool, clock, (a,) = pool_of([PAID])
    pool.get("gpt-4")
    handed_out = clock.now()
    clock.advance(0.2)
    pool.update_rate_limits(
        a.hash, {"x-ratelimit-reset-requests": "3s", "x-ratelimit-reset-tokens": "1s500ms"}
    )
    assert a.requests_reset == 3 and a.tokens_reset == 1.5
    assert a.rate_limited_until == handed_out + 3


@pytest.mark.parametrize(
    ("value", "seconds"),
    [("1m30s", MAX_RESET), ("6m0s", MAX_RESET), ("1h2m3s", MAX_RESET), ("20ms", 0.02)],
)
def test_resets_are_clamped_to_ten_seconds(value: str, seconds: float) -> None:
    pool, _, (a,) = pool_of([PAID])
    pool.update_rate_limits(a.hash, {"x-ratelimit-reset-tokens": value})
    assert a.tokens_reset == pytest.approx(seconds)


def test_unparseable_and_missing_headers_change_nothing(caplog: pytest.LogCaptureFixture) -> None:
    pool, _, (a,) = pool_of([PAID])
    pool.get("gpt-4")
    before = a.rate_limited_until
    pool.update_rate_limits(a.hash, {"x-ratelimit-reset-requests": "soon"})
    pool.update_rate_limits(a.hash, {"content-type": "application/json"})
    assert a.rate_limited_until == before
    assert a.requests_reset is None and a.tokens_reset is None
    assert "unparseable" in caplog.text


def test_header_names_are_case_insensitive() -> None:
    pool, _, (a,) = pool_of([PAID])
    pool.update_rate_limits(a.hash, {"X-RateLimit-Reset-Requests": "4s"})
    assert a.requests_reset == 4


def test_only_one_reset_header_is_enough() -> None:
    pool, clock, (a,) = pool_of([PAID])
    pool.mark_rate_limited(a.hash)
    pool.update_rate_limits(a.hash, {"x-ratelimit-reset-tokens": "4s"})
    assert a.rate_limited_until == clock.now() + 4


def test_order_of_mark_and_update_does_not_matter() -> None:
    headers = {"x-ratelimit-reset-requests": "6s", "x-ratelimit-reset-tokens": "20ms"}
    pool1, clock1, (a1,) = pool_of([PAID])
    pool2, clock2, (a2,) = pool_of([PAID])
    for pool, clock in ((pool1, clock1), (pool2, clock2)):
        pool.get("gpt-4")
        clock.advance(0.3)
    pool1.mark_rate_limited(a1.hash)
    pool1.update_rate_limits(a1.hash, headers)
    pool2.update_rate_limits(a2.hash, headers)
    pool2.mark_rate_limited(a2.hash)
    assert a1.rate_limited_until == a2.rate_limited_until == clock1.now() + 6


def test_handing_out_forgets_the_previous_answers_resets() -> None:
    pool, clock, (a,) = pool_of([PAID])
    pool.get("gpt-4")
    pool.update_rate_limits(a.hash, {"x-ratelimit-reset-tokens": "9s"})
    clock.advance(10)
    pool.get("gpt-4")
    # The seed kept the stale 9 s tokens reset here and locked the key again for 9 s.
    assert a.rate_limited_until == clock.now() + KEY_REUSE_DELAY


# -- lockout ------------------------------------------------------------------


def test_lockout_is_zero_when_any_eligible_key_is_free() -> None:
    pool, _, (a, b) = pool_of([PAID, PAID])
    pool.mark_rate_limited(a.hash)
    assert pool.lockout_period("gpt-4") == 0


def test_lockout_is_the_time_until_the_first_key_unlocks() -> None:
    pool, clock, (a, b) = pool_of([PAID, PAID])
    pool.mark_rate_limited(a.hash)
    clock.advance(3)
    pool.mark_rate_limited(b.hash)
    assert pool.lockout_period("gpt-4") == pytest.approx(RATE_LIMIT_FALLBACK - 3)


def test_lockout_is_zero_when_no_key_is_eligible() -> None:
    pool, _, (a,) = pool_of([PAID])
    pool.mark_rate_limited(a.hash)
    assert pool.lockout_period("gpt-4-32k") == 0
    pool.disable(a.hash, DisableReason.REVOKED)
    assert pool.lockout_period("gpt-4") == 0


def test_lockout_uses_gets_eligibility_rule_for_trial_keys() -> None:
    # The seed's lockout ignored the trial exclusion for embeddings models.
    pool, _, (trial, paid) = pool_of([TRIAL, PAID])
    pool.mark_rate_limited(paid.hash)
    assert pool.lockout_period("text-embedding-ada-002") == pytest.approx(RATE_LIMIT_FALLBACK)
    assert pool.lockout_period("gpt-3.5-turbo") == 0
    assert pool.get("text-embedding-ada-002") is paid


def test_lockout_defaults_to_gpt4() -> None:
    pool, _, (turbo,) = pool_of([TURBO_ONLY])
    pool.mark_rate_limited(turbo.hash)
    assert pool.lockout_period("") == 0  # no gpt4 key: let it through to Get's error
    assert pool.lockout_period("gpt-3.5-turbo") == pytest.approx(RATE_LIMIT_FALLBACK)


# -- disable, recheck ----------------------------------------------------------


def test_disabled_keys_are_never_handed_out_and_keep_their_families() -> None:
    pool, clock, (a, b) = pool_of([PAID, PAID])
    clock.advance(5)
    key = pool.disable(a.hash, DisableReason.QUOTA)
    assert key.is_disabled and key.is_over_quota and not key.is_revoked
    assert key.disable_reason is DisableReason.QUOTA
    assert key.disabled_at == clock.now()
    assert key.model_families == PAID.families
    assert pool.available() == 1
    for _ in range(5):
        assert pool.get("gpt-4") is b
        clock.advance(0.3)
    pool.disable(b.hash, DisableReason.REVOKED)
    assert b.is_revoked
    with pytest.raises(NoKeysForFamily):
        pool.get("gpt-4")


def test_disabling_twice_keeps_the_first_time() -> None:
    pool, clock, (a,) = pool_of([PAID])
    pool.disable(a.hash, DisableReason.UNSPECIFIED)
    first = a.disabled_at
    clock.advance(1)
    pool.disable(a.hash, DisableReason.REVOKED)
    assert a.disabled_at == first
    assert a.disable_reason is DisableReason.REVOKED and a.is_revoked
    assert pool.available() == 0


def test_recheck_clears_flags_and_marks_keys_unchecked() -> None:
    pool, _, (a, b) = pool_of([PAID, PAID])
    a.last_checked = 123.0
    pool.disable(a.hash, DisableReason.REVOKED)
    pool.disable(b.hash, DisableReason.QUOTA)
    pool.recheck()
    for key in (a, b):
        assert not (key.is_disabled or key.is_revoked or key.is_over_quota)
        assert key.disable_reason is None and key.disabled_at == 0
        assert key.last_checked == 0
    assert pool.available() == 2
    assert {pool.get("gpt-4"), pool.get("gpt-4")} == {a, b}


# -- usage ---------------------------------------------------------------------


def test_usage_is_counted_per_family_with_prompt_count() -> None:
    pool, _, (a,) = pool_of([PAID])
    pool.increment_usage(a.hash, "gpt-4o", 100)
    pool.increment_usage(a.hash, "gpt-4o-2024-08-06", 50)
    pool.increment_usage(a.hash, "gpt-3.5-turbo", 7)
    pool.increment_usage(a.hash, "gpt-4", 0)
    assert a.token_usage == {"gpt4o": 150, "turbo": 7, "gpt4": 0}
    assert a.prompt_count == 4


# -- operator policy and bad input ----------------------------------------------


def test_disallowed_family_is_refused_even_with_keys() -> None:
    pool, _, _ = pool_of([PAID], allowed_families=frozenset({"turbo"}))
    assert pool.get("gpt-3.5-turbo")
    with pytest.raises(FamilyDisallowed, match="gpt4o"):
        pool.get("gpt-4o")
    assert pool.lockout_period("gpt-4o") == 0


def test_unknown_hash_is_not_found() -> None:
    pool, _, _ = pool_of([PAID])
    with pytest.raises(KeyNotFound):
        pool.disable("oai-00000000", DisableReason.MANUAL)


@pytest.mark.parametrize("bad_hash", ["", "sk-live-secret-value", "oai-XYZ", "x" * 500])
def test_malformed_hash_is_invalid_and_not_echoed(bad_hash: str) -> None:
    pool, _, _ = pool_of([PAID])
    with pytest.raises(InvalidArgument) as caught:
        pool.mark_rate_limited(bad_hash)
    assert caught.value.field == "hash"
    if bad_hash:
        assert bad_hash not in str(caught.value)


@pytest.mark.parametrize(
    ("call", "field"),
    [
        (lambda pool, h: pool.get(""), "model"),
        (lambda pool, h: pool.get("m" * 257), "model"),
        (lambda pool, h: pool.increment_usage(h, "gpt-4", -1), "tokens"),
        (lambda pool, h: pool.increment_usage(h, "", 1), "model"),
        (lambda pool, h: pool.increment_usage(h, "gpt-4", 10**12), "tokens"),
        (lambda pool, h: pool.update_rate_limits(h, {f"h{i}": "v" for i in range(200)}), "headers"),
        (lambda pool, h: pool.update_rate_limits(h, {"x": "v" * 5000}), "headers"),
        (lambda pool, h: pool.update_rate_limits(h, {"": "v"}), "headers"),
    ],
)
def test_bad_input_is_invalid_argument_and_changes_nothing(call, field: str) -> None:  # type: ignore[no-untyped-def]
    pool, _, (a,) = pool_of([PAID])
    with pytest.raises(InvalidArgument) as caught:
        call(pool, a.hash)
    assert caught.value.field == field
    assert a.prompt_count == 0 and a.token_usage == {} and a.last_used == 0


def test_profiles_are_shared_between_keys() -> None:
    pool, _ = make_pool([f"sk-{i}" for i in range(50)])
    assert len({id(k.profile) for k in pool.keys()}) == 1


def test_a_distinct_profile_is_its_own_index() -> None:
    profile = KeyProfile(frozenset({"gpt4"}))
    pool, _, (a, b) = pool_of([profile, KeyProfile(frozenset({"gpt4"}))])
    assert a.profile is b.profile


def test_selection_queues_stay_bounded_however_keys_move() -> None:
    """Every move leaves a stale entry behind; they are dropped before they outnumber
    the keys, even when no Get comes to drop them at the head of a queue."""
    pool, clock, keys = pool_of([PAID] * 8)
    pool.get("gpt-4o")  # indexes the family
    # Compaction starts past 2 entries per key + 64; keys put back after it may add one each.
    bound = 3 * len(keys) + 64

    def entries() -> int:
        return sum(
            len(index.ready) + len(index.locked)
            for group in pool._groups.values()
            for index in group.indexes.values()
        )

    for step in range(1_000):  # locked again, until an earlier time each time
        pool.update_rate_limits(
            keys[step % len(keys)].hash,
            {
                "x-ratelimit-remaining-requests": "0",
                "x-ratelimit-reset-requests": f"{9_000 - step}ms",
            },
            "gpt-4o",
        )
        assert entries() <= bound, step
    for step in range(1_000):  # out of service and back
        pool.disable(keys[step % len(keys)].hash, DisableReason.MANUAL)
        pool.recheck()
        assert entries() <= bound, step


def test_rows_of_removed_keys_serve_the_keys_added_next() -> None:
    pool, _ = make_pool([f"sk-first-{i}" for i in range(50)])
    rows = pool._book.rows
    for round_ in range(10):  # a keys file that alternates between two sets of keys
        for key in pool.keys():
            pool.remove_key(key.hash)
        for i in range(50):
            pool.add_key(f"sk-{round_}-{i}")
        pool.get("gpt-4")
    assert pool._book.rows == rows
    assert len(pool) == 50


def test_a_removed_key_is_never_handed_out_once_its_row_serves_another() -> None:
    pool, _ = make_pool(["sk-removed", "sk-kept"])
    assert pool.lockout_period("gpt-4") == 0.0  # the family is indexed: both keys queued
    removed = pool.key(hash_key("sk-removed"))
    pool.remove_key(removed.hash)
    added = pool.add_key("sk-added")
    assert added is not None and added.seq == removed.seq
    assert removed.token_usage == {} and removed.book is None
    # The removed key's queue entry (never used, like the added key) must not count.
    handed = {pool.get("gpt-4").hash for _ in range(4)}
    assert removed.hash not in handed
    assert handed == {hash_key("sk-kept"), added.hash}
