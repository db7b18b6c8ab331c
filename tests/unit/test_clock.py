"""The clocks: the system clock tells epoch time and never goes back."""

from __future__ import annotations

import time

import pytest

from keysvc.clock import ManualClock, SystemClock


def test_system_clock_tells_epoch_seconds() -> None:
    assert abs(SystemClock().now() - time.time()) < 5.0


def test_system_clock_does_not_follow_the_wall_clock_back(monkeypatch: pytest.MonkeyPatch) -> None:
    clock = SystemClock()
    before = clock.now()
    real_time = time.time
    # NTP or a resumed VM steps the wall clock back an hour.
    monkeypatch.setattr(time, "time", lambda: real_time() - 3600.0)
    after = clock.now()
    assert before <= after < before + 5.0


def test_system_clocks_agree() -> None:
    first, second = SystemClock(), SystemClock()
    a, b, c = first.now(), second.now(), first.now()
    assert a <= b <= c


def test_manual_clock_refuses_to_go_back() -> None:
    clock = ManualClock()
    with pytest.raises(ValueError):
        clock.advance(-1)
