"""keysvc as a process: start-up, configuration errors, signals."""

from __future__ import annotations

import json
import signal
import subprocess
import sys

import grpc
import pytest

from keysvc.keys import hash_key
from keysvc.v1 import keysvc_pb2 as pb
from keysvc.v1 import keysvc_pb2_grpc
from tests.helpers import keysvc_process


def _stub(port: int) -> keysvc_pb2_grpc.KeyServiceStub:
    return keysvc_pb2_grpc.KeyServiceStub(grpc.insecure_channel(f"127.0.0.1:{port}"))


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_serves_keys_from_env_and_exits_cleanly_on_signal(signum: signal.Signals) -> None:
    with keysvc_process(env={"OPENAI_KEY": "sk-one, sk-two ,sk-one"}) as child:
        stub = _stub(child.port)
        assert stub.Available(pb.AvailableRequest()).count == 2
        assert stub.Get(pb.GetRequest(model="gpt-4")).key.hash == hash_key("sk-one")
        code, log = child.stop(signum)
    assert code == 0
    assert "shutting down" in log and "stopped" in log
    assert "sk-one" not in log and "sk-two" not in log


def test_python_dash_m_serves_an_empty_pool_with_a_warning() -> None:
    with keysvc_process(module=True) as child:
        stub = _stub(child.port)
        assert stub.Available(pb.AvailableRequest()).count == 0
        with pytest.raises(grpc.RpcError) as caught:
            stub.Get(pb.GetRequest(model="gpt-4"))
        assert caught.value.code() == grpc.StatusCode.FAILED_PRECONDITION  # type: ignore[attr-defined]
        code, log = child.stop()
    assert code == 0
    assert "no keys configured (OPENAI_KEY" in log


def test_json_logs() -> None:
    with keysvc_process("--log-format", "json", env={"OPENAI_KEY": "sk-j"}) as child:
        code, log = child.stop()
    assert code == 0
    records = [json.loads(line) for line in log.splitlines()]
    assert {"time", "level", "logger", "event"} <= set(records[0])
    assert [r["event"] for r in records][-1] == "stopped"
    assert {"event": "loaded keys", "keys": 1} in [
        {k: r[k] for k in ("event", "keys") if k in r} for r in records
    ]


@pytest.mark.parametrize(
    ("env", "args", "message"),
    [
        ({"KEYSVC_PORT": "http"}, [], "KEYSVC_PORT"),
        ({"CHECK_KEYS": "maybe"}, [], "CHECK_KEYS"),
        ({"KEYSVC_LOG_LEVEL": "loud"}, [], "KEYSVC_LOG_LEVEL"),
        ({}, ["--port", "70000"], "--port"),
        ({"KEYSVC_MODEL_FAMILIES_FILE": "/nonexistent/models.json"}, [], "cannot read"),
    ],
)
def test_bad_configuration_is_refused_with_a_clear_message(
    env: dict[str, str], args: list[str], message: str
) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "keysvc", "serve", *args],
        env={"PATH": "/usr/bin:/bin", **env},
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 2
    assert message in result.stderr


def test_port_in_use_is_refused() -> None:
    with keysvc_process() as child:
        result = subprocess.run(
            [sys.executable, "-m", "keysvc", "serve", "--port", str(child.port)],
            env={"PATH": "/usr/bin:/bin", "CHECK_KEYS": "false"},
            capture_output=True,
            text=True,
            timeout=30,
        )
    assert result.returncode == 1
    assert "cannot listen" in result.stderr
