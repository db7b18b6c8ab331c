"""What a benchmark hands back, and the RESULTS.md it becomes."""

from __future__ import annotations

import datetime
import os
import platform
import statistics
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field

__all__ = ["Section", "Target", "machine", "median", "percentile", "render", "table"]


@dataclass(frozen=True, slots=True)
class Target:
    """One target from the issue and whether this run met it."""

    name: str
    figure: str
    goal: str
    met: bool
    #: Shown beside the targets for information; not a target of the issue.
    informational: bool = False

    @property
    def verdict(self) -> str:
        if self.informational:
            return "informational"
        return "met" if self.met else "missed"


@dataclass(slots=True)
class Section:
    """One benchmark's outcome: a markdown body and its targets."""

    title: str
    body: str
    targets: list[Target] = field(default_factory=list)
    #: Plain figures, for tests and for anyone reading the run programmatically.
    figures: dict[str, float] = field(default_factory=dict)


def median(values: Sequence[float]) -> float:
    return statistics.median(values)


def percentile(values: Sequence[float], q: float) -> float:
    """The ``q``-quantile (0..1) by the nearest-rank method."""
    if not values:
        raise ValueError("no values")
    ordered = sorted(values)
    rank = max(0, min(len(ordered) - 1, int(-(-q * len(ordered) // 1)) - 1))
    return ordered[rank]


def table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def machine() -> dict[str, str]:
    """What the figures were measured on."""
    model = platform.processor() or "unknown"
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return {
        "cpus (nproc)": str(os.cpu_count()),
        "cpu model": model,
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
    }


def render(command: str, sections: Sequence[Section]) -> str:
    """RESULTS.md: the command, the machine, a target summary, then each section."""
    out = ["# keysvc benchmarks", "", "Command:", "", "```sh", command, "```", ""]
    out += ["Machine:", ""]
    out += [f"- {name}: {value}" for name, value in machine().items()]
    out += ["", "## Targets", ""]
    rows = [
        (t.name, t.figure, t.goal, "**missed**" if t.verdict == "missed" else t.verdict)
        for s in sections
        for t in s.targets
    ]
    out += [table(("target", "this run", "goal", ""), rows), ""]
    for section in sections:
        out += [f"## {section.title}", "", section.body.strip(), ""]
    return "\n".join(out)
