"""100k keys with a state file: Get latency while Disables and batched state writes run.

Two servers in processes of their own (``bench/state_server.py``), built as
``keysvc serve`` builds them over the same 100,000 keys: one keeps its state in
a SQLite state file (every Get marks its key changed, so each second's batch
writes the rows of the keys handed out in that second; each Disable is
committed before its reply), the other in memory. The same load runs against
each in turn, alternating, several rounds: Gets kept ``IN_FLIGHT`` deep over
two channels, and one Disable of a fresh key every ``DISABLE_EVERY`` seconds
(a no-op write without the state file). Latency is measured by the client per
call. Get p50 and p99 are the median over rounds of each round's figure;
Disable p99 is over every Disable of the state-file rounds. The ratio divides
the state file's Get p99 by the in-memory one's.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import sqlite3
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import grpc

from keysvc.keys import hash_key
from keysvc.v1 import keysvc_pb2, keysvc_pb2_grpc

from . import aio
from .child import serving_module
from .pool_scale import secrets
from .report import Section, Target, median, percentile, table

__all__ = ["run"]

KEYS = 100_000
IN_FLIGHT = 8
CHANNELS = 2
DISABLE_EVERY = 0.05
ROUND_SECONDS = 10.0
ROUNDS = 3
GET_P99_TARGET_MS = 20.0
DISABLE_P99_TARGET_MS = 50.0
RATIO_TARGET = 2.0


@contextlib.contextmanager
def _servers(keys: int) -> Iterator[tuple[dict[str, int], Path]]:
    """Both servers, started one after the other; yields their ports by label and the
    state file's path."""
    with tempfile.TemporaryDirectory(prefix="keysvc-bench-state-") as directory:
        state = Path(directory) / "state.db"
        with (
            serving_module("bench.state_server", str(keys), str(state)) as (_, with_state),
            serving_module("bench.state_server", str(keys), "-") as (_, in_memory),
        ):
            yield {"state file": with_state, "in memory": in_memory}, state


class DiskProbe:
    """Times an fdatasync of a 4 kB append in a directory every 50 ms, in a thread of
    its own, while the rounds run: what the disk under the state file gives a commit
    (a Disable's waits for one) at the same moment, on a machine shared with others."""

    def __init__(self, directory: Path) -> None:
        self.latencies: list[float] = []
        self._path = directory / "sync-probe"
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="disk-probe", daemon=True)

    def __enter__(self) -> DiskProbe:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        fd = os.open(self._path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        try:
            while not self._stop.wait(0.05):
                os.write(fd, b"\0" * 4096)
                start = time.perf_counter()
                os.fdatasync(fd)
                self.latencies.append(time.perf_counter() - start)
        finally:
            os.close(fd)
            self._path.unlink()


def _rows_on_disk(state: Path) -> tuple[int, int]:
    """Rows and rows of disabled keys in the state file, read beside the server."""
    with contextlib.closing(sqlite3.connect(f"file:{state}?mode=ro", uri=True)) as reader:
        rows, disabled = reader.execute("SELECT count(*), sum(is_disabled) FROM keys").fetchone()
    return int(rows), int(disabled or 0)


async def _round(
    port: int, seconds: float, to_disable: Iterator[str]
) -> tuple[list[float], list[float]]:
    """Get and Disable latencies (s) of one round against the server on ``port``."""
    channels = [grpc.aio.insecure_channel(f"127.0.0.1:{port}") for _ in range(CHANNELS)]
    try:
        stubs = [keysvc_pb2_grpc.KeyServiceStub(c) for c in channels]
        get_request = keysvc_pb2.GetRequest(model="gpt-4o")
        gets: list[float] = []
        disables: list[float] = []
        end = time.perf_counter() + seconds

        async def getter(stub: keysvc_pb2_grpc.KeyServiceAsyncStub) -> None:
            timer = time.perf_counter
            while timer() < end:
                start = timer()
                await stub.Get(get_request)
                gets.append(timer() - start)

        async def disabler() -> None:
            timer = time.perf_counter
            while timer() < end:
                start = timer()
                await stubs[0].Disable(
                    keysvc_pb2.DisableRequest(
                        hash=next(to_disable), reason=keysvc_pb2.DISABLE_REASON_MANUAL
                    )
                )
                disables.append(timer() - start)
                await asyncio.sleep(max(0.0, DISABLE_EVERY - (timer() - start)))

        await asyncio.gather(*(getter(stubs[n % CHANNELS]) for n in range(IN_FLIGHT)), disabler())
        return gets, disables
    finally:
        for channel in channels:
            await channel.close()


async def measure(
    ports: dict[str, int], keys: list[str], rounds: int, seconds: float
) -> dict[str, dict[str, list[float]]]:
    """Per label: each round's Get p50 and p99 (s), every Disable latency, Gets per round."""
    results: dict[str, dict[str, list[float]]] = {
        label: {"get_p50": [], "get_p99": [], "disables": [], "gets": []} for label in ports
    }
    # Each server disables the same keys in the same order: the same work for both.
    hashes = {label: iter(hash_key(k) for k in keys) for label in ports}
    for label, port in ports.items():  # warm-up: connections, caches
        await _round(port, 1.0, hashes[label])
    for _ in range(rounds):
        for label, port in ports.items():
            gets, disables = await _round(port, seconds, hashes[label])
            result = results[label]
            result["get_p50"].append(percentile(gets, 0.5))
            result["get_p99"].append(percentile(gets, 0.99))
            result["disables"].extend(disables)
            result["gets"].append(len(gets))
    return results


def run(*, smoke: bool = False) -> Section:
    keys, rounds, seconds = (2_000, 1, 1.0) if smoke else (KEYS, ROUNDS, ROUND_SECONDS)
    secret_list = secrets(keys)
    with _servers(keys) as (ports, state):
        with DiskProbe(state.parent) as probe:
            results = aio.run(measure(ports, secret_list, rounds, seconds))
        syncs = probe.latencies
        rows_on_disk, disabled_on_disk = _rows_on_disk(state)
    figures: dict[str, float] = {"rows_on_disk": rows_on_disk, "disabled_on_disk": disabled_on_disk}
    rows = []
    for label, result in results.items():
        get_p50 = median(result["get_p50"]) * 1e3
        get_p99 = median(result["get_p99"]) * 1e3
        disable_p50 = percentile(result["disables"], 0.5) * 1e3
        disable_p99 = percentile(result["disables"], 0.99) * 1e3
        gets_per_s = median(result["gets"]) / seconds
        figures.update(
            {
                f"{label}:get_p50_ms": get_p50,
                f"{label}:get_p99_ms": get_p99,
                f"{label}:disable_p50_ms": disable_p50,
                f"{label}:disable_p99_ms": disable_p99,
                f"{label}:gets_per_s": gets_per_s,
                f"{label}:disables": float(len(result["disables"])),
            }
        )
        rows.append(
            (
                label,
                f"{get_p50:.2f}",
                f"{get_p99:.2f}",
                f"{disable_p50:.2f}",
                f"{disable_p99:.2f}",
                f"{gets_per_s:,.0f}",
                f"{len(result['disables'])}",
            )
        )
    ratio = figures["state file:get_p99_ms"] / figures["in memory:get_p99_ms"]
    figures["get_p99_ratio"] = ratio
    figures["fdatasync_p50_ms"] = percentile(syncs, 0.5) * 1e3
    figures["fdatasync_p99_ms"] = percentile(syncs, 0.99) * 1e3
    body = [
        __doc__.split("\n\n", 1)[1].strip() if __doc__ else "",
        "",
        table(
            (
                "state",
                "Get p50 ms",
                "Get p99 ms",
                "Disable p50 ms",
                "Disable p99 ms",
                "Gets/s",
                "Disables",
            ),
            rows,
        ),
        "",
        f"Get p99, state file ÷ in memory: {ratio:.2f}×. The disk under the state file,"
        f" during the rounds (``DiskProbe``): fdatasync of a 4 kB append p50"
        f" {figures['fdatasync_p50_ms']:.2f} ms, p99 {figures['fdatasync_p99_ms']:.1f} ms"
        f" ({len(syncs)} samples); every Disable's commit waits for one (synchronous=FULL).",
        "",
        f"{keys:,} keys; {rounds} rounds of {seconds:.0f} s per server; {IN_FLIGHT} Gets in"
        f" flight; a Disable every {DISABLE_EVERY * 1e3:.0f} ms.",
    ]
    get_p99 = figures["state file:get_p99_ms"]
    disable_p99 = figures["state file:disable_p99_ms"]
    targets = [
        Target(
            f"Get p99 at {keys:,} keys with a state file, Disables and batched writes",
            f"{get_p99:.1f} ms",
            f"≤ {GET_P99_TARGET_MS:.0f} ms",
            get_p99 <= GET_P99_TARGET_MS,
        ),
        Target(
            f"Disable p99 at {keys:,} keys with a state file",
            f"{disable_p99:.1f} ms",
            f"≤ {DISABLE_P99_TARGET_MS:.0f} ms",
            disable_p99 <= DISABLE_P99_TARGET_MS,
        ),
        Target(
            "Get p99 with a state file ÷ without (Disables and batched writes)",
            f"{ratio:.2f}×",
            f"≤ {RATIO_TARGET:.0f}×",
            ratio <= RATIO_TARGET,
        ),
        Target(
            "fdatasync p99 of the state file's disk (what a Disable's commit waits for)",
            f"{figures['fdatasync_p99_ms']:.1f} ms",
            "—",
            True,
            informational=True,
        ),
    ]
    return Section(
        "100k keys with a state file: Get and Disable latency", "\n".join(body), targets, figures
    )
