"""The per-family columns behind every key's rate-limit state and usage (keysvc.rates)."""

from __future__ import annotations

import math

from keysvc.clock import ManualClock
from keysvc.keys import Key, KeyProfile, hash_key
from keysvc.models import ModelTable
from keysvc.outcomes import UpstreamError
from keysvc.pool import KeyPool
from keysvc.rates import HAS_STATE, MAX_COUNT, MAX_USAGE, RateBook
from tests.helpers import PAID, pool_of


def _key(seq: int) -> Key:
    secret = f"sk-rates-{seq}"
    return Key(secret=secret, hash=hash_key(secret), profile=KeyProfile(frozenset()), seq=seq)


def test_rows_added_later_start_as_never_used_and_keep_earlier_rows() -> None:
    book = RateBook()
    book.add_row(0)
    table = book.table("gpt4o")
    table.last_used[0] = 5.0
    table.requests_reset[0] = 0.5
    table.flags[0] = 1
    for row in range(1, 300):  # grows the table many times
        book.add_row(row)
    assert len(table) >= 300 and book.rows == 300
    assert table.last_used[0] == 5.0 and table.requests_reset[0] == 0.5
    assert table.last_used[299] == 0.0 and math.isnan(table.requests_reset[299])
    assert len(book.table("turbo")) == 300  # made now: exactly the rows there are
    state = book.state(0, "gpt4o")
    assert state is not None and state.requests_reset == 0.5 and state.remaining_requests is None
    assert book.state(299, "gpt4o") is None  # no state until the pool makes one


def test_usage_set_before_joining_a_pool_moves_into_the_book() -> None:
    key = _key(3)
    key.token_usage = {"gpt4o": 12, "o3": 0}  # as a state file's record sets it
    assert key.token_usage == {"gpt4o": 12, "o3": 0}
    book = RateBook()
    key.join(book, 5)
    assert key.token_usage == {"gpt4o": 12, "o3": 0}
    book.add_usage(key.seq, "gpt4o", 3)
    assert key.token_usage == {"gpt4o": 15, "o3": 0}
    key.token_usage = {}
    assert key.token_usage == {}


def test_usage_stops_at_the_column_s_limit_instead_of_overflowing() -> None:
    book = RateBook()
    book.add_row(0)
    book.set_usage(0, {"gpt4o": 2**70})
    book.add_usage(0, "gpt4o", 1_000_000_000)
    book.add_usage(0, "turbo", 7)
    assert book.usage(0) == {"gpt4o": MAX_USAGE, "turbo": 7}


def test_a_remaining_count_beyond_what_a_double_holds_exactly_is_kept_as_the_largest() -> None:
    pool, _, (a,) = pool_of([PAID])
    pool.get("gpt-4o")
    huge = {"x-ratelimit-remaining-tokens": "9" * 18, "x-ratelimit-remaining-requests": "7"}
    pool.report_outcome(a.hash, "gpt-4o", status=200, headers=huge, error=UpstreamError())
    state = a.state_in("gpt4o")
    assert state is not None
    assert state.remaining_tokens == MAX_COUNT and state.remaining_requests == 7


def test_a_pool_built_over_keys_of_another_pool_keeps_each_key_s_usage() -> None:
    first = KeyPool.from_secrets(["sk-a", "sk-b"], models=ModelTable(), clock=ManualClock())
    a, b = first.keys()
    first.increment_usage(a.hash, "gpt-4", 100)
    first.increment_usage(b.hash, "gpt-4", 7)
    first.remove_key(a.hash)
    second = KeyPool(store=first._store, models=ModelTable(), clock=ManualClock())
    (moved,) = second.keys()
    assert moved is b  # now row 1 of the new book, which was a's row in the old one
    assert moved.token_usage == {"gpt4": 7}


def test_summary_lists_used_families_by_name_with_key_wide_lock_and_longest_resets() -> None:
    book = RateBook()
    book.add_row(0)
    for family, until, requests_reset in (("turbo", 7.0, 2.0), ("gpt4o", 5.0, 3.0), ("o1", 0, 0)):
        table = book.table(family)  # made out of name order
        table.flags[0] = HAS_STATE
        if until:
            table.last_used[0] = table.rate_limited_at[0] = 4.0
            table.until[0] = until
            table.requests_reset[0] = requests_reset
    book.table("turbo").remaining_tokens[0] = 10.0
    wide = book.table("")
    wide.flags[0] = HAS_STATE
    wide.rate_limited_at[0] = 4.5
    wide.until[0] = 6.0
    wide.tokens_reset[0] = 9.0
    book.add_usage(0, "dall-e", 12)  # usage alone: no state to show

    summary = book.summary(0)

    # "o1" is indexed but nothing happened there; "dall-e" only counts usage.
    assert [(f.family, f.until) for f in summary.families] == [("gpt4o", 6.0), ("turbo", 7.0)]
    assert summary.families[1].remaining_tokens == 10 and summary.families[1].tokens_reset is None
    assert (summary.rate_limited_at, summary.rate_limited_until) == (4.5, 7.0)
    assert (summary.requests_reset, summary.tokens_reset) == (3.0, 9.0)
    assert summary.token_usage == {"dall-e": 12}
