"""Memory and start-up of ``keysvc serve`` with 100k keys (key checking off).

Each run starts ``python -m keysvc serve --no-check-keys`` as a child with its
keys in a keys file (KEYSVC_KEYS_FILE) and polls gRPC health for
``keysvc.v1.KeyService`` every 5 ms. Start-up is the time from just before the
child is spawned to the first SERVING answer (interpreter start and imports
included). Resident memory is the child's VmRSS 0.5 s after SERVING.
Bytes per key = (RSS with N keys − RSS with an empty keys file) / N. Each size is
started three times, alternately; the figures are medians.

In use: ``bench.used_pool`` (its docstring has the details) builds the same pool
from the same keys file as ``keysvc serve`` does, in a child of its own, and
runs the proxy loop through the pool API — ``get(model)``, then
``report_outcome`` with status 200, the six x-ratelimit-* headers and the
tokens, what the Get and ReportOutcome RPCs call — until every key has been
handed out and answered twice for gpt-4o, then also for gpt-3.5-turbo, then
also for gpt-4 (families gpt4o, turbo, gpt4), reading its VmRSS after a full
collection at each stage. What it holds is what the server holds: the keys,
their per-family rate-limit state (a row in each family's ``keysvc.rates``
table: window, budget, reservations, usage) and the pool's selection indexes.
Bytes per key = (RSS at the stage − RSS of the same child over an empty keys
file) / N; three runs, alternately; medians.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from .child import stop
from .pool_scale import secrets
from .report import Section, Target, median, table
from .used_pool import MODELS

__all__ = ["run", "start_and_measure", "use_and_measure"]

SERVICE = "keysvc.v1.KeyService"
TARGET_BYTES_PER_KEY = 1024
TARGET_START_SECONDS = 2.0


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def rss_bytes(pid: int) -> int:
    with open(f"/proc/{pid}/status", encoding="ascii") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS")


@dataclass(frozen=True, slots=True)
class Start:
    seconds_to_serving: float
    rss: int


def start_and_measure(keys_file: Path, *, settle: float = 0.5, timeout: float = 60.0) -> Start:
    """Starts keysvc over ``keys_file``, times it to SERVING, reads its RSS, stops it."""
    port = free_port()
    env = {
        **os.environ,
        "OPENAI_KEY": "",
        "KEYSVC_KEYS_FILE": str(keys_file),
        "KEYSVC_LOG_LEVEL": "warning",
    }
    env.pop("KEYSVC_STATE_FILE", None)
    env.pop("KEYSVC_METRICS_PORT", None)
    started = time.perf_counter()
    child = subprocess.Popen(
        [sys.executable, "-m", "keysvc", "serve", "--no-check-keys", "--host", "127.0.0.1"]
        + ["--port", str(port)],
        env=env,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        # Without these, a refused connection puts the channel in ~1 s of reconnect
        # back-off, and start-up would be measured to the next retry, not to SERVING.
        options = [
            ("grpc.initial_reconnect_backoff_ms", 5),
            ("grpc.min_reconnect_backoff_ms", 5),
            ("grpc.max_reconnect_backoff_ms", 5),
        ]
        with grpc.insecure_channel(f"127.0.0.1:{port}", options=options) as channel:
            health = health_pb2_grpc.HealthStub(channel)
            request = health_pb2.HealthCheckRequest(service=SERVICE)
            while True:
                if child.poll() is not None:
                    raise RuntimeError(f"keysvc exited with {child.returncode} before serving")
                if time.perf_counter() - started > timeout:
                    raise RuntimeError("keysvc did not serve in time")
                try:
                    answer = health.Check(request, timeout=0.2)
                except grpc.RpcError:
                    time.sleep(0.005)
                    continue
                if answer.status == health_pb2.HealthCheckResponse.SERVING:
                    break
                time.sleep(0.005)
        elapsed = time.perf_counter() - started
        time.sleep(settle)
        rss = rss_bytes(child.pid)
    finally:
        stop(child)
    return Start(elapsed, rss)


def use_and_measure(keys_file: Path, *, timeout: float = 900.0) -> list[int]:
    """Runs ``bench.used_pool`` over ``keys_file``; its RSS with 0, 1, 2, 3 families in use."""
    done = subprocess.run(
        [sys.executable, "-m", "bench.used_pool", str(keys_file)],
        env={**os.environ, "KEYSVC_LOG_LEVEL": "warning"},
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=True,
    )
    readings = [json.loads(line) for line in done.stdout.splitlines()]
    assert [r["families"] for r in readings] == list(range(len(MODELS) + 1)), readings
    return [int(r["rss"]) for r in readings]


def run(*, keys: int | None = None, repeats: int | None = None, smoke: bool = False) -> Section:
    keys = keys if keys is not None else (10_000 if smoke else 100_000)
    repeats = repeats if repeats is not None else (1 if smoke else 3)
    with tempfile.TemporaryDirectory(prefix="keysvc-bench-") as tmp:
        empty = Path(tmp, "empty.keys")
        empty.write_text("", encoding="utf-8")
        full = Path(tmp, "full.keys")
        full.write_text("\n".join(secrets(keys)) + "\n", encoding="utf-8")
        bare: list[Start] = []
        loaded: list[Start] = []
        idle: list[list[int]] = []
        used: list[list[int]] = []
        for _ in range(repeats):
            bare.append(start_and_measure(empty))
            loaded.append(start_and_measure(full))
            idle.append(use_and_measure(empty))
            used.append(use_and_measure(full))
    rss_bare = median([s.rss for s in bare])
    rss_loaded = median([s.rss for s in loaded])
    per_key = (rss_loaded - rss_bare) / keys
    start_bare = median([s.seconds_to_serving for s in bare])
    start_loaded = median([s.seconds_to_serving for s in loaded])
    # Per stage (0..3 families in use): the median RSS of the runs, less the empty child's.
    rss_idle = median([r[0] for r in idle])
    rss_used = [median([r[stage] for r in used]) for stage in range(len(MODELS) + 1)]
    used_per_key = [(rss - rss_idle) / keys for rss in rss_used]
    used_rows = [
        (
            str(stage),
            ", ".join(MODELS[:stage]) or "(loaded, not used)",
            f"{rss_used[stage] / 2**20:.1f}",
            f"{used_per_key[stage]:.0f}",
        )
        for stage in range(len(MODELS) + 1)
    ]
    worst = used_per_key[-1]
    rows = [
        ("0", f"{rss_bare / 2**20:.1f}", f"{start_bare:.2f}"),
        (f"{keys:,}", f"{rss_loaded / 2**20:.1f}", f"{start_loaded:.2f}"),
    ]
    body = [
        __doc__.split("\n\n", 1)[1].strip() if __doc__ else "",
        "",
        table(("keys", "RSS MiB (median)", "start to SERVING s (median)"), rows),
        "",
        f"Resident bytes per key: **{per_key:.0f}**. "
        f"Start-up with {keys:,} keys: **{start_loaded:.2f} s** "
        f"({start_loaded - start_bare:.2f} s more than with no keys). Keys are "
        f"`sk-` + 48 characters; runs: {repeats} per size.",
        "",
        table(("families in use", "models", "RSS MiB (median)", "bytes per key"), used_rows),
        "",
        f"Empty pool in the same child: {rss_idle / 2**20:.1f} MiB. The 0 row is the pool "
        "just loaded, measured in process: it should match the figure above. "
        f"Runs: {repeats}; requests per run: {2 * keys * len(MODELS):,}.",
    ]
    targets = [
        Target(
            f"resident bytes per key at {keys:,} keys",
            f"{per_key:.0f} B",
            f"≤ {TARGET_BYTES_PER_KEY} B",
            per_key <= TARGET_BYTES_PER_KEY,
        ),
        Target(
            f"resident bytes per key at {keys:,} keys, {len(MODELS)} families in use",
            f"{worst:.0f} B",
            f"≤ {TARGET_BYTES_PER_KEY} B",
            worst <= TARGET_BYTES_PER_KEY,
        ),
        Target(
            f"start to SERVING with {keys:,} keys",
            f"{start_loaded:.2f} s",
            f"≤ {TARGET_START_SECONDS:.0f} s",
            start_loaded <= TARGET_START_SECONDS,
        ),
    ]
    figures = {
        "bytes_per_key": per_key,
        "start_seconds": start_loaded,
        "start_seconds_empty": start_bare,
        "rss_empty": float(rss_bare),
        "rss_loaded": float(rss_loaded),
        "rss_used_empty": float(rss_idle),
        **{f"bytes_per_key_used_{stage}": used_per_key[stage] for stage in range(len(MODELS) + 1)},
    }
    return Section("Memory and start-up", "\n".join(body), targets, figures)
