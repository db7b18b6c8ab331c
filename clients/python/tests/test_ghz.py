"""ghz (on PATH; `make tools` puts it in .tools/bin) calls keysvc through reflection alone."""

from __future__ import annotations

import json
import shutil
import subprocess
from typing import Any

import pytest

from .conftest import LiveServer


def ghz(server: LiveServer, call: str, *args: str) -> Any:
    binary = shutil.which("ghz")
    assert binary, "ghz is not on PATH: run `make tools` (it lands in .tools/bin)"
    done = subprocess.run(
        [binary, "--insecure", "--format", "json", "--call", call, *args, server.target],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr + done.stdout
    return json.loads(done.stdout)


@pytest.mark.parametrize(
    ("call", "data"),
    [
        ("keysvc.v1.KeyService/Get", '{"model": "gpt-4o"}'),
        ("keysvc.v1.KeyService.Get", '{"model": "gpt-4o"}'),
        ("grpc.health.v1.Health/Check", "{}"),
        ("keysvc.v1.KeyService/List", '{"page_size": 2}'),
    ],
)
def test_ghz_calls_through_reflection(server: LiveServer, call: str, data: str) -> None:
    report = ghz(server, call, "-d", data, "-n", "20", "-c", "2")
    assert report["count"] == 20
    assert report["statusCodeDistribution"] == {"OK": 20}, report.get("errorDistribution")
