"""List pages: load-order positions, bounded scans, and page tokens."""

from __future__ import annotations

import base64

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from keysvc.errors import InvalidArgument
from keysvc.keys import DisableReason, Key, KeyProfile
from keysvc.listing import KeyFilter, LoadOrder
from tests.helpers import make_pool


def key(n: int) -> Key:
    return Key(secret=f"sk-{n}", hash=f"oai-{n:08x}", profile=KeyProfile(frozenset()), seq=n)


def everything(order: LoadOrder, limit: int, scan_limit: int = 5000) -> list[list[str]]:
    """The hashes of every page, paging from the start."""
    pages = []
    after = 0
    while True:
        page = order.page(after, limit, lambda k: True, scan_limit)
        pages.append([k.hash for k in page.keys])
        if page.resume_after is None:
            return pages
        after = page.resume_after


def test_pages_cover_every_key_once_in_load_order() -> None:
    order = LoadOrder()
    keys = [key(n) for n in range(10)]
    for k in keys:
        order.add(k)
    pages = everything(order, 3)
    assert [len(p) for p in pages] == [3, 3, 3, 1]
    assert sum(pages, []) == [k.hash for k in keys]
    # A last page that ends exactly at the end says so: no empty page after it.
    assert [len(p) for p in everything(order, 5)] == [5, 5]


def test_a_token_survives_adds_and_removes_before_and_after_it() -> None:
    order = LoadOrder()
    keys = [key(n) for n in range(10)]
    for k in keys:
        order.add(k)
    first = order.page(0, 4, lambda k: True)
    assert [k.hash for k in first.keys] == [k.hash for k in keys[:4]]
    assert first.resume_after is not None
    order.remove(keys[1])  # already listed
    order.remove(keys[5])  # not listed yet: never shown
    order.add(key(10))  # added while paging: comes at the end
    rest = order.page(first.resume_after, 100, lambda k: True)
    assert [k.hash for k in rest.keys] == [k.hash for k in (*keys[4:5], *keys[6:], key(10))]
    assert rest.resume_after is None


def test_a_filtered_page_looks_at_a_bounded_number_of_keys() -> None:
    order = LoadOrder()
    for n in range(100):
        order.add(key(n))
    looked: list[str] = []

    def rare(k: Key) -> bool:
        looked.append(k.hash)
        return k.hash == key(95).hash

    page = order.page(0, 10, rare, scan_limit=30)
    assert page.keys == [] and page.resume_after is not None
    assert len(looked) == 30
    pages = [page]
    while pages[-1].resume_after is not None:
        pages.append(order.page(pages[-1].resume_after or 0, 10, rare, scan_limit=30))
    assert [k.hash for p in pages for k in p.keys] == [key(95).hash]
    assert len(looked) == 100  # every key looked at exactly once over all pages


def test_removed_keys_are_compacted_away() -> None:
    order = LoadOrder()
    keys = [key(n) for n in range(1000)]
    for k in keys:
        order.add(k)
    for k in keys[:900]:
        order.remove(k)
    assert len(order) == 100
    assert len(order._positions) <= 2 * 100 + 64
    assert sum(everything(order, 7), []) == [k.hash for k in keys[900:]]


@settings(max_examples=60, deadline=None)
@given(
    st.lists(st.tuples(st.booleans(), st.integers(0, 40)), max_size=80),
    st.integers(1, 7),
)
def test_paging_through_changes_shows_each_key_at_most_once_and_every_stayer(
    changes: list[tuple[bool, int]], limit: int
) -> None:
    """Keys added and removed between pages: no key twice, and every key present
    from the first page to the last is listed (AIP-158's guarantee for a token)."""
    order = LoadOrder()
    live: dict[int, Key] = {}
    for n in range(20):
        live[n] = key(n)
        order.add(live[n])
    present_throughout = set(live)
    seen: list[str] = []
    after = 0
    next_new = 100
    changes_left = list(changes)
    while True:
        page = order.page(after, limit, lambda k: True, scan_limit=limit)
        seen.extend(k.hash for k in page.keys)
        if page.resume_after is None:
            break
        after = page.resume_after
        for _ in range(2):
            if not changes_left:
                break
            add, n = changes_left.pop()
            if add:
                live[next_new] = key(next_new)
                order.add(live[next_new])
                next_new += 1
            elif n in live:
                order.remove(live.pop(n))
                present_throughout.discard(n)
    assert len(seen) == len(set(seen))
    assert {key(n).hash for n in present_throughout} <= set(seen)


def test_tokens_round_trip_and_bad_ones_are_invalid_argument() -> None:
    order = LoadOrder(run_id="abcd1234")
    token = order.token(KeyFilter.LOCKED, 42)
    assert order.resume_position(token, KeyFilter.LOCKED) == 42
    assert order.resume_position("", KeyFilter.ALL) == 0
    with pytest.raises(InvalidArgument, match="state locked, not disabled") as caught:
        order.resume_position(token, KeyFilter.DISABLED)
    assert caught.value.field == "page_token"
    with pytest.raises(InvalidArgument, match="restarted"):
        LoadOrder(run_id="ffff0000").resume_position(token, KeyFilter.LOCKED)
    forged = [
        "not a token",
        "%%%",
        token[:-3],
        base64.urlsafe_b64encode(b"2.abcd1234.all.5").decode(),
        base64.urlsafe_b64encode(b"1.abcd1234.all.-5").decode(),
        base64.urlsafe_b64encode(b"1.abcd1234.nope.5").decode(),
        base64.urlsafe_b64encode(b"1.abcd1234.all.x").decode(),
        base64.urlsafe_b64encode("1.abcd1234.all.5\u00e9".encode()).decode(),
        "\u00e9\u00e9\u00e9\u00e9",
    ]
    for text in forged:
        with pytest.raises(InvalidArgument, match="page_token"):
            order.resume_position(text, KeyFilter.ALL)


def test_filters_judge_state_at_the_pool_clock() -> None:
    pool, clock = make_pool([f"sk-filter-{n:04d}" for n in range(6)])
    keys = pool.keys()
    pool.disable(keys[0].hash, DisableReason.MANUAL)
    handed = pool.get("gpt-4o")  # locked briefly (reuse delay) for its family
    assert handed is not keys[0]

    def listed(key_filter: KeyFilter) -> set[str]:
        return {k.hash for k in pool.page(0, 100, key_filter).keys}

    every = {k.hash for k in keys}
    assert listed(KeyFilter.ALL) == every
    assert listed(KeyFilter.DISABLED) == {keys[0].hash}
    assert listed(KeyFilter.AVAILABLE) == every - {keys[0].hash}
    assert listed(KeyFilter.LOCKED) == {handed.hash}
    assert listed(KeyFilter.ACTIVE) == every - {keys[0].hash, handed.hash}
    clock.advance(3600)
    assert listed(KeyFilter.LOCKED) == set()
    assert listed(KeyFilter.ACTIVE) == every - {keys[0].hash}


def test_the_pool_keeps_load_order_through_adds_and_removes() -> None:
    pool, _ = make_pool([f"sk-order-{n:04d}" for n in range(5)])
    first = pool.keys()
    pool.remove_key(first[2].hash)
    added = pool.add_key("sk-order-late")
    assert added is not None
    page = pool.page(0, 100, KeyFilter.ALL)
    assert [k.hash for k in page.keys] == [k.hash for k in (*first[:2], *first[3:], added)]
    assert [k.hash for k in page.keys] == [k.hash for k in pool.keys()]
