"""The pool's ordered queue (an in-order run beside a heap) against a sorted list."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from keysvc.pool import _Ordered

# (time, seq): seq is unique, as a key's is within one index.
_Item = tuple[float, int]

operations = st.lists(
    st.one_of(
        st.tuples(st.just("push"), st.floats(0, 100, allow_nan=False)),
        st.tuples(st.just("append"), st.floats(0, 100, allow_nan=False)),
        st.tuples(st.just("pop"), st.just(0.0)),
        st.tuples(st.just("keep"), st.just(0.0)),
    ),
    max_size=200,
)


@given(operations)
def test_head_is_always_the_smallest_entry(ops: list[tuple[str, float]]) -> None:
    queue: _Ordered[_Item] = _Ordered()  # type: ignore[type-var]
    reference: list[_Item] = []
    pending_heapify = False
    for seq, (op, when) in enumerate(ops):
        if op in ("push", "append"):
            item = (when, seq)
            if op == "push":
                if pending_heapify:
                    queue.heapify()
                    pending_heapify = False
                queue.push(item)
            else:
                queue.append(item)
                pending_heapify = True
            reference.append(item)
            continue
        if pending_heapify:
            queue.heapify()
            pending_heapify = False
        if op == "pop" and reference:
            head = queue.head()
            assert head == min(reference)
            assert head is not None
            queue.pop_head(head)
            reference.remove(head)
        elif op == "keep":
            queue.keep(lambda e: e[1] % 2 == 0)
            reference = [e for e in reference if e[1] % 2 == 0]
        assert len(queue) == len(reference)
        assert queue.head() == (min(reference) if reference else None)
