"""``keysvc status`` against a live server: the summary table, bearer token, TLS."""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import grpc
import pytest

from keysvc.cli import main
from keysvc.clock import ManualClock
from keysvc.keys import DisableReason
from keysvc.service import KeyService
from keysvc.v1 import keysvc_pb2 as pb
from keysvc.v1 import keysvc_pb2_grpc
from tests.helpers import client, make_pool, serving

SECRETS = [f"sk-status-test-{n:02d}-dddddddddddddddd" for n in range(3)]


class MetadataRecorder(grpc.aio.ServerInterceptor):
    def __init__(self) -> None:
        self.seen: list[str] = []

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[Any]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> Any:
        metadata = dict(handler_call_details.invocation_metadata or ())
        if metadata.get("authorization") == "Bearer tok-123":
            self.seen.append(handler_call_details.method)
        return await continuation(handler_call_details)


async def run_cli(argv: list[str]) -> int:
    # The command runs its own event loop; the server runs on this one.
    return await asyncio.to_thread(main, argv)


def rows(output: str) -> dict[str, list[str]]:
    return {line.split()[0]: line.split()[1:] for line in output.splitlines() if line.strip()}


async def test_prints_the_summary(capsys: pytest.CaptureFixture[str]) -> None:
    # The command judges locks by this machine's clock: put the server's an hour ahead,
    # so keys it hands out stay locked while the command runs.
    pool, clock = make_pool(SECRETS, ManualClock(time.time() + 3600))
    recorder = MetadataRecorder()
    async with serving(pool, [recorder]) as server, client(server.port) as stub:
        first = await stub.Get(pb.GetRequest(model="gpt-4o"))
        second = await stub.Get(pb.GetRequest(model="gpt-4o"))
        clock.advance(0.5)
        await stub.IncrementUsage(
            pb.IncrementUsageRequest(hash=first.key.hash, model="gpt-4o", tokens=900)
        )
        listing = await stub.List(pb.ListRequest())
        (revoked,) = {k.hash for k in listing.keys} - {first.key.hash, second.key.hash}
        await stub.Disable(pb.DisableRequest(hash=revoked, reason=pb.DISABLE_REASON_REVOKED))
        code = await run_cli(
            ["status", "--target", f"127.0.0.1:{server.port}", "--token", "tok-123"]
        )
    out = capsys.readouterr().out
    assert code == 0
    for secret in SECRETS:
        assert secret not in out
    assert f"keysvc at 127.0.0.1:{server.port}: 3 keys" in out
    table = rows(out)
    # active locked trial disabled revoked over_quota lockout tokens
    assert table["gpt4o"] == ["0", "2", "0", "1", "1", "0", "0.50s", "900"]
    # "locked" counts keys locked for some family; the lockout is the family's own, and
    # keys handed out for gpt-4o are free for turbo (rate limits are per family).
    assert table["turbo"] == ["0", "2", "0", "1", "1", "0", "0s", "0"]
    assert "gpt4-32k" not in table  # no key has it
    assert table[first.key.hash] == ["openai", "locked", "no", "1", "900"]
    assert table[revoked] == ["openai", "revoked", "no", "0", "0"]
    # Every call the command made carried the token; it asked List and one lockout per family.
    assert recorder.seen.count("/keysvc.v1.KeyService/List") == 1
    families = {f for k in listing.keys for f in k.model_families}
    assert recorder.seen.count("/keysvc.v1.KeyService/GetLockoutPeriod") == len(families)


async def test_unreachable_server_is_a_clear_error(capsys: pytest.CaptureFixture[str]) -> None:
    pool, _ = make_pool(SECRETS)
    async with serving(pool) as server:
        port = server.port
    code = await run_cli(["status", "--target", f"127.0.0.1:{port}", "--timeout", "2"])
    assert code == 1
    assert "UNAVAILABLE" in capsys.readouterr().err


def make_certificate(directory: Path) -> tuple[bytes, bytes]:
    if shutil.which("openssl") is None:
        if os.environ.get("CI") == "true":
            pytest.fail("openssl is not installed; .ci/run installs it")
        pytest.skip("openssl is not installed (CI installs it)")
    key, cert = directory / "key.pem", directory / "cert.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
         "-subj", "/CN=localhost", "-addext", "subjectAltName=IP:127.0.0.1,DNS:localhost",
         "-keyout", str(key), "-out", str(cert)],
        check=True, capture_output=True,
    )  # fmt: skip
    return key.read_bytes(), cert.read_bytes()


async def test_tls_with_a_ca_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    private_key, certificate = make_certificate(tmp_path)
    pool, _ = make_pool(SECRETS)
    server = grpc.aio.server()
    keysvc_pb2_grpc.add_KeyServiceServicer_to_server(KeyService(pool), server)
    port = server.add_secure_port(
        "127.0.0.1:0", grpc.ssl_server_credentials([(private_key, certificate)])
    )
    await server.start()
    try:
        target = f"127.0.0.1:{port}"
        ok = await run_cli(["status", "--target", target, "--tls-ca", str(tmp_path / "cert.pem")])
        out = capsys.readouterr().out
        plain = await run_cli(["status", "--target", target, "--timeout", "2"])
    finally:
        await server.stop(0)
    assert ok == 0
    assert "3 keys" in out and "gpt4o" in out
    assert plain == 1  # without --tls-ca the handshake fails


async def test_pages_through_a_pool_larger_than_the_receive_limit(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """30k keys are ~6 MB of List: one message failed gRPC's 4 MiB receive limit."""
    pool, _ = make_pool([f"sk-status-big-{n:06d}" for n in range(30_000)])
    async with serving(pool) as server:
        code = await run_cli(["status", "--target", f"127.0.0.1:{server.port}"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert f"keysvc at 127.0.0.1:{server.port}: {len(pool)} keys" in captured.out
    assert rows(captured.out)["gpt4o"][0] == str(len(pool))  # every key active


async def test_pages_with_a_small_server_page_size(capsys: pytest.CaptureFixture[str]) -> None:
    secrets = [f"sk-status-page-{n:02d}" for n in range(23)]
    pool, _ = make_pool(secrets)
    pool.disable(pool.keys()[-1].hash, DisableReason.MANUAL)
    async with serving(pool, list_max_page_size=4) as server:
        code = await run_cli(["status", "--target", f"127.0.0.1:{server.port}"])
    out = capsys.readouterr().out
    assert code == 0
    assert f"keysvc at 127.0.0.1:{server.port}: 23 keys" in out
    assert rows(out)["gpt4o"][:4] == ["22", "0", "0", "1"]
