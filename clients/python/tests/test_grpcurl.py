"""grpcurl (on PATH; `make tools` puts it in .tools/bin) against a live keysvc: reflection works."""

from __future__ import annotations

import json
import shutil
import subprocess
from typing import Any

from .conftest import LiveServer, key_hash


def grpcurl(*args: str, expect_rc: int = 0) -> str:
    """grpcurl's output: stdout on success, stderr (where it writes errors) otherwise."""
    binary = shutil.which("grpcurl")
    assert binary, "grpcurl is not on PATH: run `make tools` (it lands in .tools/bin)"
    done = subprocess.run([binary, "-plaintext", *args], capture_output=True, text=True, timeout=30)
    assert done.returncode == expect_rc, done.stderr
    return done.stdout if expect_rc == 0 else done.stderr


def call(server: LiveServer, method: str, body: dict[str, Any], expect_rc: int = 0) -> Any:
    out = grpcurl(
        "-format-error",
        "-d",
        json.dumps(body),
        server.target,
        f"keysvc.v1.KeyService/{method}",
        expect_rc=expect_rc,
    )
    return json.loads(out)


def test_list_shows_keysvc_health_and_reflection(server: LiveServer) -> None:
    services = grpcurl(server.target, "list").split()
    assert "keysvc.v1.KeyService" in services
    assert "grpc.health.v1.Health" in services


def test_describe_shows_every_rpc(server: LiveServer) -> None:
    text = grpcurl(server.target, "describe", "keysvc.v1.KeyService")
    for rpc in (
        "Get",
        "Disable",
        "MarkRateLimited",
        "UpdateRateLimits",
        "GetLockoutPeriod",
        "IncrementUsage",
        "List",
        "Available",
        "Recheck",
    ):
        assert (
            f"rpc {rpc} ( .keysvc.v1.{rpc}Request ) returns ( .keysvc.v1.{rpc}Response );" in text
        )


def test_get_list_and_lockout_with_json(server: LiveServer) -> None:
    assert call(server, "GetLockoutPeriod", {"model": "gpt-4o"}) == {"lockout": "0s"}
    got = call(server, "Get", {"model": "gpt-4o"})
    assert got["secret"] in server.secrets
    assert got["key"]["hash"] == key_hash(got["secret"])
    listed = call(server, "List", {})
    assert [k["hash"] for k in listed["keys"]] == [key_hash(s) for s in server.secrets]
    assert all("secret" not in k for k in listed["keys"])
    for _ in server.secrets[1:]:
        call(server, "Get", {"model": "gpt-4o"})
    lockout = call(server, "GetLockoutPeriod", {"model": "gpt-4o"})["lockout"]
    assert lockout.endswith("s") and 0 < float(lockout[:-1]) <= 1


def test_an_error_shows_its_code_and_error_info(server: LiveServer) -> None:
    # grpcurl exits 64 + the status code; FAILED_PRECONDITION is 9.
    status = call(server, "Get", {"model": "gpt-4-32k"}, expect_rc=64 + 9)
    assert status["code"] == 9
    [info] = status["details"]
    assert info["@type"] == "type.googleapis.com/google.rpc.ErrorInfo"
    assert (info["domain"], info["reason"]) == ("keysvc", "NO_KEYS_FOR_FAMILY")


def test_describe_resolves_method_symbols(server: LiveServer) -> None:
    """grpcurl asks reflection v1 first; a Service.Method symbol names its service's file."""
    text = grpcurl(server.target, "describe", "keysvc.v1.KeyService.Get")
    assert "rpc Get ( .keysvc.v1.GetRequest ) returns ( .keysvc.v1.GetResponse );" in text
    text = grpcurl(server.target, "describe", "grpc.health.v1.Health.Check")
    assert "rpc Check ( .grpc.health.v1.HealthCheckRequest )" in text
    assert "grpc.reflection.v1.ServerReflection" in grpcurl(server.target, "list").split()
    missing = grpcurl(server.target, "describe", "keysvc.v1.KeyService.Nope", expect_rc=1)
    assert "Symbol not found" in missing
