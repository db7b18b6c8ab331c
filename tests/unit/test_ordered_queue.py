"""The pool's queue (an in-order run beside a heap, stale entries dropped lazily)
against a plain dict of where each key is."""

from __future__ import annotations

from array import array

from hypothesis import given
from hypothesis import strategies as st

from keysvc.keys import Key, KeyProfile
from keysvc.pool import _Queue

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


@given(operations)
def test_head_is_the_smallest_live_entry(ops: list[tuple[str, int, float, float]]) -> None:
    keys = [Key(secret=f"sk-{i}", hash=f"oai-{i:08x}", profile=PROFILE, seq=i) for i in range(KEYS)]
    last_used = array("d", [0.0]) * KEYS
    #: Where each key is: the time of its live entry (absent: it is in no queue).
    current: dict[int, float] = {}
    queue = _Queue(last_used, lambda key, time: current.get(key.seq) == time)

    def expected() -> tuple[float, float, int] | None:
        live = [(time, last_used[seq], seq) for seq, time in current.items()]
        return min(live) if live else None

    def found() -> tuple[float, float, int] | None:
        head = queue.head()
        return None if head is None else (head[0], last_used[head[1].seq], head[1].seq)

    for op, seq, time, used in ops:
        if op == "push":
            last_used[seq] = used
            current[seq] = time
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
