"""Pool scale: select-and-throttle (``pool.get``) at 10 to 100k keys, keysvc vs the seed.

In process, with a ManualClock that advances 1 ms per call (1000 Gets per
second, so keys unlock while the run goes on). Each call is timed on its own;
the figure is the median. Models cycle through three families. The sizes are
timed in five interleaved rounds.
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
ROUNDS = 5
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
    # All sizes live at once and are timed in interleaved rounds, so a noisy moment on
    # the machine falls on every size alike instead of on one.
    pools: dict[int, tuple[KeyPool, ManualClock]] = {}
    seeds: dict[int, tuple[SeedPool, ManualClock]] = {}
    for size in sizes:
        keys = secrets(size)
        clock = ManualClock()
        pools[size] = (KeyPool.from_secrets(keys, models=models, clock=clock), clock)
        seed_clock = ManualClock()
        seeds[size] = (SeedPool.from_secrets(keys, models=models, clock=seed_clock), seed_clock)
    ours: dict[int, list[float]] = {size: [] for size in sizes}
    theirs: dict[int, list[float]] = {size: [] for size in sizes}
    for size in sizes:  # warm-up: every size reaches its steady state of used keys
        _time_calls(pools[size][0].get, pools[size][1], calls.keysvc // 4)
        _time_calls(seeds[size][0].get, seeds[size][1], max(1, calls.seed(size) // 4))
    gc.collect()
    for _ in range(ROUNDS):
        for size in sizes:
            pool, clock = pools[size]
            ours[size] += _time_calls(pool.get, clock, calls.keysvc // ROUNDS)
            seed, seed_clock = seeds[size]
            theirs[size] += _time_calls(seed.get, seed_clock, max(1, calls.seed(size) // ROUNDS))
    rows = []
    figures: dict[str, float] = {}
    for size in sizes:
        figures[f"keysvc_median_us_{size}"] = median(ours[size]) * 1e6
        figures[f"seed_median_us_{size}"] = median(theirs[size]) * 1e6
        rows.append(
            (
                f"{size:,}",
                f"{median(ours[size]) * 1e6:.2f}",
                f"{percentile(ours[size], 0.99) * 1e6:.2f}",
                f"{len(ours[size]):,}",
                f"{median(theirs[size]) * 1e6:,.1f}",
                f"{len(theirs[size]):,}",
                f"{median(theirs[size]) / median(ours[size]):,.0f}×",
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
