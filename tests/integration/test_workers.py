"""``keysvc serve --workers N``: N processes on one port sharing the pool through Redis."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import grpc

from keysvc.v1 import keysvc_pb2 as pb
from keysvc.v1 import keysvc_pb2_grpc
from tests.helpers import keysvc_process
from tests.redis_server import RedisServer

SECRETS = [f"sk-workers-{i:02d}" for i in range(40)]


def _env(url: str, prefix: str) -> dict[str, str]:
    return {
        "OPENAI_KEY": ",".join(SECRETS),
        "KEYSVC_REDIS_URL": url,
        "KEYSVC_REDIS_PREFIX": prefix,
        "KEYSVC_REDIS_TIMEOUT": "2s",
        "KEYSVC_LOG_LEVEL": "debug",
    }


def _wait_serving(child_log: list[str], process: subprocess.Popen[str], workers: int) -> None:
    """Reads the log until every worker said it serves."""
    assert process.stderr is not None
    deadline = time.monotonic() + 60
    while sum("keysvc.server: serving" in line for line in child_log) < workers:
        assert time.monotonic() < deadline, "".join(child_log)
        line = process.stderr.readline()
        assert line, "".join(child_log)
        child_log.append(line)


def test_two_workers_serve_gets_on_one_port_and_stop_together(
    redis_server: RedisServer, redis_prefix: str
) -> None:
    with keysvc_process("--workers", "2", env=_env(redis_server.url, redis_prefix)) as child:
        log = [child.startup_log]
        _wait_serving(log, child.process, 2)
        served = set()
        hashes = []
        # A connection each: the kernel spreads new connections over the workers.
        for _ in range(24):
            with grpc.insecure_channel(f"127.0.0.1:{child.port}") as channel:
                stub = keysvc_pb2_grpc.KeyServiceStub(channel)
                hashes.append(stub.Get(pb.GetRequest(model="gpt-4")).key.hash)
        # One pool: 24 Gets within the reuse delay got 24 distinct keys.
        assert len(set(hashes)) == 24
        code, rest = child.stop()
        assert code == 0
        for line in rest.splitlines():
            if "keysvc.rpc: rpc" in line and "KeyService/Get" in line:
                served.add(re.search(r"\bpid=(\d+)", line).group(1))  # type: ignore[union-attr]
        assert len(served) == 2, rest
        assert rest.count("keysvc.server: stopped") == 2
        assert "workers stopped exit_codes=0,0" in rest
        assert all(secret not in rest for secret in SECRETS)


def test_a_worker_that_dies_stops_the_others(redis_server: RedisServer, redis_prefix: str) -> None:
    env = {**_env(redis_server.url, redis_prefix), "KEYSVC_LOG_LEVEL": "info"}
    with keysvc_process("--workers", "2", env=env) as child:
        log = [child.startup_log]
        _wait_serving(log, child.process, 2)
        pids = [int(p) for p in re.findall(r"serving .*\bpid=(\d+)", "".join(log))]
        os.kill(pids[0], signal.SIGKILL)
        code = child.process.wait(timeout=30)
        assert child.process.stderr is not None
        rest = child.process.stderr.read()
        assert code == 1
        assert f"worker exited; stopping the others pid={pids[0]} exit_code=-9" in rest
        assert re.search(rf"keysvc.server: stopped worker=\d pid={pids[1]}", rest), rest


def test_workers_without_redis_are_refused() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "keysvc", "serve", "--port", "0", "--workers", "2"],
        env={"PATH": "/usr/bin:/bin", "CHECK_KEYS": "false", "OPENAI_KEY": "sk-a"},
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert done.returncode == 2
    assert "KEYSVC_WORKERS=2 needs KEYSVC_REDIS_URL" in done.stderr


def test_sighup_reaches_every_worker(
    redis_server: RedisServer, redis_prefix: str, tmp_path: Path
) -> None:
    keys_file = tmp_path / "keys"
    keys_file.write_text("sk-workers-file-a\nsk-workers-file-b\n")
    env = {
        **_env(redis_server.url, redis_prefix),
        "KEYSVC_LOG_LEVEL": "info",
        "KEYSVC_KEYS_FILE": str(keys_file),
    }
    with keysvc_process("--workers", "2", env=env) as child:
        log = [child.startup_log]
        _wait_serving(log, child.process, 2)
        child.process.send_signal(signal.SIGHUP)
        assert child.process.stderr is not None
        deadline = time.monotonic() + 30
        while sum("keys file reloaded why=SIGHUP" in line for line in log) < 2:
            assert time.monotonic() < deadline, "".join(log)
            log.append(child.process.stderr.readline())
        code, rest = child.stop()
        assert code == 0, rest
