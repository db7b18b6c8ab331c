"""``python -m bench``: runs every benchmark and writes bench/RESULTS.md.

``python -m bench pool_scale memory`` runs only the named ones and prints them
(RESULTS.md is written only by a full run).
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from pathlib import Path

from . import (
    envoy_cost,
    list_pages,
    memory,
    pool_scale,
    redis_cost,
    rpc_cost,
    simulate,
    state_load,
    under_load,
)
from .report import Section, render

BENCHMARKS: dict[str, Callable[..., Section]] = {
    "pool_scale": pool_scale.run,
    "memory": memory.run,
    "rpc_cost": rpc_cost.run,
    "redis_cost": redis_cost.run,
    "simulate": simulate.run,
    "list_pages": list_pages.run,
    "envoy_cost": envoy_cost.run,
    "state_load": state_load.run,
    "under_load": under_load.run,
}

RESULTS = Path(__file__).with_name("RESULTS.md")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    parser.add_argument("names", nargs="*", metavar="name", help=", ".join(BENCHMARKS))
    parser.add_argument("--smoke", action="store_true", help="short runs, for tests")
    args = parser.parse_args(argv)
    unknown = [name for name in args.names if name not in BENCHMARKS]
    if unknown:
        parser.error(f"unknown benchmark {unknown[0]!r}; choose from {', '.join(BENCHMARKS)}")
    names = args.names or list(BENCHMARKS)
    sections: list[Section] = []
    for name in names:
        started = time.monotonic()
        print(f"== {name}", flush=True)
        section = BENCHMARKS[name](smoke=args.smoke)
        print(section.body, flush=True)
        for target in section.targets:
            verdict = target.verdict.upper() if target.verdict == "missed" else target.verdict
            print(f"target {target.name}: {target.figure} (goal {target.goal}) {verdict}")
        print(f"({time.monotonic() - started:.0f} s)\n", flush=True)
        sections.append(section)
    if not args.names and not args.smoke:
        RESULTS.write_text(render("make bench", sections), encoding="utf-8")
        print(f"wrote {RESULTS}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
