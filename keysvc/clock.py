"""Clocks: the pool asks one for the time, and for timers, instead of reading its own.

``call_at`` schedules a callback at a time on the clock's own scale, so code
that waits (``KeyPool.get_waiting``) works unchanged on the real clock and on
a ``ManualClock``, whose ``advance`` fires the timers that come due.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
import time
from collections.abc import Callable
from typing import Protocol

__all__ = ["Clock", "ManualClock", "SystemClock", "Timer"]


class Timer(Protocol):
    """A scheduled callback."""

    def cancel(self) -> None:
        """Stops the callback from running; harmless after it ran."""
        ...


class Clock(Protocol):
    """Time in seconds since the Unix epoch that never goes back, and timers on it.

    The pool relies on it never going back: a key's reuse throttle ends one
    second after its last use, so if the time stepped back D seconds, every key
    used in the last D seconds would look throttled for D more, and the key
    handed out first after the step would be handed out again and again.
    """

    def now(self) -> float: ...

    def call_at(self, when: float, callback: Callable[[], None]) -> Timer:
        """Runs ``callback`` once ``now() >= when`` (on the event loop for the real clock;
        from ``advance`` for a manual one)."""
        ...


#: Seconds that never go back. Linux's boot-time clock also counts time the
#: machine spent suspended, which the monotonic clock skips.
_STEADY_CLOCK: int = getattr(time, "CLOCK_BOOTTIME", time.CLOCK_MONOTONIC)


def _steady() -> float:
    return time.clock_gettime(_STEADY_CLOCK)


#: The wall clock at start-up less the steady clock then: shared by every
#: ``SystemClock`` in the process, so they all tell the same time.
_EPOCH_OFFSET = time.time() - _steady()


class SystemClock:
    """The wall clock as read at start-up, advanced by a clock that never goes back.

    ``time.time()`` steps back when NTP corrects it or a VM resumes; this clock
    does not (``Clock``). The price: after a step, the times keysvc shows differ
    from the host's wall clock by the step until it restarts. Timers run on the
    running asyncio loop.
    """

    def now(self) -> float:
        # ``_steady()`` inlined: read on every Get.
        return _EPOCH_OFFSET + time.clock_gettime(_STEADY_CLOCK)

    def call_at(self, when: float, callback: Callable[[], None]) -> Timer:
        delay = max(0.0, when - self.now())
        return asyncio.get_running_loop().call_later(delay, callback)


class _ManualTimer:
    __slots__ = ("callback", "cancelled")

    def __init__(self, callback: Callable[[], None]) -> None:
        self.callback = callback
        self.cancelled = False

    def cancel(self) -> None:
        self.cancelled = True


class ManualClock:
    """A clock that only moves when told to; for tests and simulations.

    Timers fire, in time order, from ``advance`` (the clock reads each timer's
    time while its callback runs), never on their own.
    """

    def __init__(self, start: float = 1_700_000_000.0) -> None:
        self._now = start
        self._timers: list[tuple[float, int, _ManualTimer]] = []
        self._order = itertools.count()

    def now(self) -> float:
        return self._now

    def call_at(self, when: float, callback: Callable[[], None]) -> Timer:
        timer = _ManualTimer(callback)
        heapq.heappush(self._timers, (when, next(self._order), timer))
        return timer

    def pending(self) -> int:
        """How many timers are scheduled and not cancelled."""
        return sum(not timer.cancelled for _, _, timer in self._timers)

    def advance(self, seconds: float) -> None:
        if seconds < 0:
            raise ValueError("a clock does not go back")
        target = self._now + seconds
        timers = self._timers
        while timers and timers[0][0] <= target:
            when, _, timer = heapq.heappop(timers)
            if timer.cancelled:
                continue
            self._now = max(self._now, when)
            timer.callback()
        self._now = target
