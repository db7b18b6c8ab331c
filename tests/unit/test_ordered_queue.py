"""The pool's queue (an in-order run beside a heap, stale entries dropped lazily)
against a plain dict of where each key is."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from keysvc.keys import Key, KeyProfile
from keysvc.pool.memory import _Queue

KEYS = 6
PROFILE = KeyProfile(frozenset({"turbo"}))

times = st.sampled_from([0.0, 1.0, 1.5, 2.0, 5.0, 9.0])
operations = st.lists(
    st.one_of(
        st.tuples(st.just("push"), st.integers(0, KEYS - 1), times, times),
        st.tuples(st.just("pop"), st.just(0), st.just(0.0), st.just(0.0)),
        st.tuples(st.just("drop"), st.integers(0, KEYS - 1), st.just(0.0), st.just(0.0)),
        st.tuples(st.just("compact"), st.just(0), st.just(0.0), st.just(0.0)),
    ),
    max_size=120,
)


@pytest.mark.parametrize("keeps_last_use", [True, False])
@given(ops=operations)
def test_head_is_the_smallest_live_entry(
    keeps_last_use: bool, ops: list[tuple[str, int, float, float]]
) -> None:
    keys = [Key(secret=f"sk-{i}", hash=f"oai-{i:08x}", profile=PROFILE, seq=i) for i in range(KEYS)]
    #: Where each key is: the (time, last use) of its live entry (absent: in no queue).
    current: dict[int, tuple[float, float]] = {}
    queue = _Queue(
        lambda key, time, used: current.get(key.seq) == (time, used),
        keeps_last_use=keeps_last_use,
    )

    def expected() -> tuple[float, float, int] | None:
        live = [(time, used, seq) for seq, (time, used) in current.items()]
        return min(live) if live else None

    def found() -> tuple[float, float, int] | None:
        head = queue.head()
        return None if head is None else (head[0], current[head[1].seq][1], head[1].seq)

    for op, seq, time, used in ops:
        if op == "push":
            if not keeps_last_use:
                used = time  # the ready queue: a key is queued by its last use
            current[seq] = (time, used)
            queue.push(time, used, keys[seq])
        elif op == "pop" and current:
            head = queue.head()
            assert head is not None
            queue.pop_head()
            del current[head[1].seq]
        elif op == "drop":
            current.pop(seq, None)  # the key moved: its entries are stale
        elif op == "compact":
            queue.compact()
            assert len(queue) == len(current)
        assert found() == expected()
