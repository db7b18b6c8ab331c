"""Pool scale: select-and-throttle (``pool.get``) at 10 to 100k keys, keysvc vs the seed.

In process, with a ManualClock that advances 1 ms per call (1000 Gets per
second, so keys unlock while the run goes on). Each call is timed on its own;
the figure is the median. Models cycle through three families.
"""

from __future__ import annotations

import gc
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from keysvc.clock import ManualClock
from keysvc.keys import hash_key
from keysvc.models import ModelTable
from keysvc.pool import KeyPool

from .report import Section, Target, median, percentile, table
from .seed_pool import SeedPool

__all__ = ["SIZES", "run"]

SIZES: tuple[int, ...] = (10, 1_000, 10_000, 100_000)
MODELS: tuple[str, ...] = ("gpt-4o", "gpt-3.5-turbo", "gpt-4")
STEP = 0.001  # clock advance per call (s)
TARGET_US = 20.0
TARGET_GROWTH = 1.5


def secrets(count: int) -> list[str]:
    """Key-shaped secrets (``sk-`` + 48 characters) with distinct hashes.

    At 100k keys a 32-bit hash collision is likely (the pool keeps the first
    key of a colliding pair); skipping those keeps every size exact.
    """
    out: list[str] = []
    seen: set[str] = set()
    n = 0
    while len(out) < count:
        secret = f"sk-bench{n:040d}xxxxx"
        n += 1
        key_hash = hash_key(secret)
        if key_hash not in seen:
            seen.add(key_hash)
            out.append(secret)
    return out


def _time_calls(get: Callable[[str], object], clock: ManualClock, calls: int) -> list[float]:
    """Seconds per call, each timed alone."""
    timer = time.perf_counter_ns
    out = []
    models = MODELS
    for n in range(calls):
        model = models[n % 3]
        start = timer()
        get(model)
        out.append((timer() - start) / 1e9)
        clock.advance(STEP)
    return out


@dataclass(frozen=True, slots=True)
class Calls:
    """How many calls are timed at each size (after as many warm-up calls)."""

    keysvc: int
    seed: Callable[[int], int]


FULL = Calls(keysvc=20_000, seed=lambda n: max(20, min(20_000, 2_000_000 // n)))
SMOKE = Calls(keysvc=2_000, seed=lambda n: max(5, min(2_000, 100_000 // n)))


def run(*, sizes: Sequence[int] | None = None, smoke: bool = False) -> Section:
    calls = SMOKE if smoke else FULL
    if sizes is None:
        sizes = SIZES[:3] if smoke else SIZES
    models = ModelTable()
    rows = []
    figures: dict[str, float] = {}
    for size in sizes:
        keys = secrets(size)
        clock = ManualClock()
        pool = KeyPool.from_secrets(keys, models=models, clock=clock)
        _time_calls(pool.get, clock, calls.keysvc // 4)  # warm-up: keys move to the locked heap
        gc.collect()
        ours = _time_calls(pool.get, clock, calls.keysvc)
        del pool
        seed_clock = ManualClock()
        seed = SeedPool.from_secrets(keys, models=models, clock=seed_clock)
        seed_calls = calls.seed(size)
        _time_calls(seed.get, seed_clock, max(1, seed_calls // 4))
        gc.collect()
        theirs = _time_calls(seed.get, seed_clock, seed_calls)
        del seed
        figures[f"keysvc_median_us_{size}"] = median(ours) * 1e6
        figures[f"seed_median_us_{size}"] = median(theirs) * 1e6
        rows.append(
            (
                f"{size:,}",
                f"{median(ours) * 1e6:.2f}",
                f"{percentile(ours, 0.99) * 1e6:.2f}",
                f"{len(ours):,}",
                f"{median(theirs) * 1e6:,.1f}",
                f"{len(theirs):,}",
                f"{median(theirs) / median(ours):,.0f}×",
            )
        )
    body = [
        __doc__.split("\n\n", 1)[1].strip() if __doc__ else "",
        "",
        table(
            (
                "keys",
                "keysvc median µs",
                "keysvc p99 µs",
                "calls",
                "seed median µs",
                "calls",
                "seed / keysvc",
            ),
            rows,
        ),
    ]
    targets = []
    largest, smallest = max(sizes), min(sizes)
    big = figures[f"keysvc_median_us_{largest}"]
    small = figures[f"keysvc_median_us_{smallest}"]
    growth = big / small
    figures["growth"] = growth
    targets.append(
        Target(
            f"pool.get median at {largest:,} keys",
            f"{big:.2f} µs",
            f"≤ {TARGET_US:.0f} µs",
            big <= TARGET_US,
        )
    )
    targets.append(
        Target(
            f"pool.get median {largest:,} keys / {smallest:,} keys",
            f"{growth:.2f}×",
            f"≤ {TARGET_GROWTH}×",
            growth <= TARGET_GROWTH,
        )
    )
    return Section("Pool scale: select-and-throttle", "\n".join(body), targets, figures)


if __name__ == "__main__":
    section = run()
    print(section.body)
    for target in section.targets:
        print(target)
