"""A pool in real use, for the memory benchmark, in a process of its own.

``python -m bench.used_pool KEYS_FILE [--tracemalloc N]`` builds the pool as
``keysvc serve --no-check-keys`` does (``settings_from`` with the keys file in
KEYSVC_KEYS_FILE, ``read_keys_file``, ``build_pool`` over a ``MemoryKeyStore``;
no state file, no metrics), prints its VmRSS, and then, for each model of
``MODELS`` in turn (one per family: gpt4o, turbo, gpt4), runs the proxy loop
through the pool API until every key has been handed out and answered ROUNDS
times for that model, and prints the VmRSS again: the pool in use in 1, 2, 3
families. The loop is what the Get and ReportOutcome RPCs call: ``get(model)``,
then ``report_outcome(hash, model, status=200, ...)`` with the six
x-ratelimit-* headers of a 200 and the request's tokens; IN_FLIGHT requests are
handed out before the oldest is answered. The clock is the server's
(``SystemClock``), so each hand-out and answer stores times of its own. Two
rounds, because the first answer in a family brings the limit headers that
give it a budget, and only later hand-outs reserve against it.
A full collection precedes each reading. Each reading is one JSON line.

With ``--tracemalloc N`` it also traces the allocations made from the pool's
construction on and prints the N biggest sources (file:line) of what is still
allocated at the end, for attribution (tracing makes the run much slower, and
its RSS is not comparable).
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
import time
import tracemalloc
from collections import deque
from pathlib import Path

from keysvc.clock import Clock, SystemClock
from keysvc.config import settings_from
from keysvc.keys import Key
from keysvc.outcomes import UpstreamError
from keysvc.pool import KeyPool
from keysvc.reload import read_keys_file
from keysvc.server import build_pool
from keysvc.store import MemoryKeyStore

from .upstream import go_duration

__all__ = ["MODELS", "answer_headers", "build_served_pool", "rss_bytes", "use_every_key"]

#: One model of each of three families (gpt4o, turbo, gpt4).
MODELS: tuple[str, ...] = ("gpt-4o", "gpt-3.5-turbo", "gpt-4")
IN_FLIGHT = 32
ROUNDS = 2
RPM = 5_000
TPM = 800_000
NO_ERROR = UpstreamError()


def rss_bytes() -> int:
    """This process's VmRSS."""
    with open("/proc/self/status", encoding="ascii") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS")


def build_served_pool(keys_file: Path, clock: Clock) -> KeyPool:
    """The pool ``keysvc serve --no-check-keys`` builds over ``keys_file``."""
    env = {"OPENAI_KEY": "", "KEYSVC_KEYS_FILE": str(keys_file), "CHECK_KEYS": "false"}
    settings = settings_from(argparse.Namespace(), env)
    assert settings.keys_file is not None
    file_keys = read_keys_file(settings.keys_file)
    return build_pool(settings, clock, store=MemoryKeyStore(), extra_keys=file_keys)


def answer_headers(n: int, prompt: int, completion: int) -> dict[str, str]:
    """The six x-ratelimit-* headers of a 200 for a key of 5,000 RPM and 800,000 TPM
    with a few requests' worth missing; each reset is the time the missing part
    takes to come back, as Go formats it (``"12ms"``, ``"131.25ms"``), as the
    upstream (and ``bench.upstream``) sends them."""
    missing_requests = 1 + n % 7
    missing_tokens = prompt + completion + n % 1000
    return {
        "x-ratelimit-limit-requests": str(RPM),
        "x-ratelimit-limit-tokens": str(TPM),
        "x-ratelimit-remaining-requests": str(RPM - missing_requests),
        "x-ratelimit-remaining-tokens": str(TPM - missing_tokens),
        "x-ratelimit-reset-requests": go_duration(missing_requests * 60 / RPM),
        "x-ratelimit-reset-tokens": go_duration(missing_tokens * 60 / TPM),
    }


def use_every_key(pool: KeyPool, model: str, rounds: int = 2) -> int:
    """Runs the proxy loop for ``model`` until every key was handed out and answered
    ``rounds`` times; returns the number of requests."""
    requests = len(pool) * rounds
    in_flight: deque[tuple[Key, int]] = deque()

    def answer() -> None:
        key, n = in_flight.popleft()
        prompt, completion = 300 + n % 700, 50 + n % 300
        pool.report_outcome(
            key.hash,
            model,
            status=200,
            headers=answer_headers(n, prompt, completion),
            error=NO_ERROR,
            prompt_tokens=prompt,
            completion_tokens=completion,
        )

    for n in range(requests):
        in_flight.append((pool.get(model), n))
        if len(in_flight) > IN_FLIGHT:
            answer()
    while in_flight:
        answer()
    return requests


def _reading(pool: KeyPool, families: int, requests: int, started: float) -> None:
    gc.collect()
    reading = {
        "families": families,
        "rss": rss_bytes(),
        "keys": len(pool),
        "requests": requests,
        "seconds": time.perf_counter() - started,
    }
    print(json.dumps(reading), flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.used_pool", description=__doc__)
    parser.add_argument("keys_file", type=Path)
    parser.add_argument("--rounds", type=int, default=ROUNDS)
    parser.add_argument("--tracemalloc", type=int, default=0, metavar="N")
    args = parser.parse_args(argv)
    if args.tracemalloc:
        tracemalloc.start(1)
    clock = SystemClock()
    started = time.perf_counter()
    pool = build_served_pool(args.keys_file, clock)
    _reading(pool, 0, 0, started)
    for families, model in enumerate(MODELS, start=1):
        started = time.perf_counter()
        requests = use_every_key(pool, model, args.rounds) if len(pool) else 0
        _reading(pool, families, requests, started)
    if args.tracemalloc:
        snapshot = tracemalloc.take_snapshot()
        for stat in snapshot.statistics("lineno")[: args.tracemalloc]:
            print(stat, file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
