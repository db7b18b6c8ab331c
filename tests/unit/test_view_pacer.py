"""The HTTP port's pacing of page views and scrapes: spaced in order, a flood refused."""

from __future__ import annotations

import pytest

from keysvc.web import ViewPacer


async def test_views_are_spaced_in_order_and_a_flood_is_answered_at_once() -> None:
    now = [100.0]
    slept: list[float] = []

    async def sleep(seconds: float) -> None:
        slept.append(seconds)

    pacer = ViewPacer(10, max_wait=0.25, timer=lambda: now[0], sleep=sleep)
    assert [await pacer.turn() for _ in range(4)] == [True, True, True, False]
    assert slept == pytest.approx([0.1, 0.2])  # the first goes at once, the 4th not at all
    now[0] += 0.5  # past every turn given: the next view goes at once
    assert await pacer.turn()
    assert slept == pytest.approx([0.1, 0.2])
