"""The status page in headless Chromium: the rendered tables match the gRPC API, and a
screenshot is saved under the test's temp dir.

Chromium is Debian's package, installed by .ci/run. Without it the test skips, except
in CI (CI=true), where a missing browser is a failure.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import struct
import tempfile
from pathlib import Path

import pytest

from keysvc.clock import ManualClock
from keysvc.metrics import Metrics
from keysvc.models import ModelTable
from keysvc.pool import KeyPool
from keysvc.v1 import keysvc_pb2 as pb
from tests.helpers import client

from .observed import check_page_against_api, observed_server

SECRETS = [f"sk-browser-test-{n:02d}-eeeeeeeeeeeeeeee" for n in range(8)]

CHROMIUM_FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--window-size=1280,1100",
)


def chromium() -> str:
    path = shutil.which("chromium") or shutil.which("chromium-browser")
    if path is None:
        if os.environ.get("CI") == "true":
            pytest.fail("chromium is not installed; .ci/run installs Debian's chromium package")
        pytest.skip("chromium is not installed (apt-get install chromium; CI installs it)")
    return path


async def run_chromium(browser: str, *args: str) -> bytes:
    """Runs one headless Chromium command without blocking the loop the server runs on."""
    with tempfile.TemporaryDirectory(prefix="keysvc-chromium-") as profile:
        process = await asyncio.create_subprocess_exec(
            browser, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", *args,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        )  # fmt: skip
        try:
            stdout, stderr = await asyncio.wait_for(process.communicate(), timeout=120)
        except TimeoutError:
            process.kill()
            await process.wait()
            raise
    assert process.returncode == 0, stderr.decode(errors="replace")[-2000:]
    return stdout


def png_size(data: bytes) -> tuple[int, int]:
    assert data[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG"
    width, height = struct.unpack(">II", data[16:24])
    return width, height


async def test_status_page_in_chromium(tmp_path: Path) -> None:
    browser = chromium()
    metrics = Metrics()
    clock = ManualClock()
    pool = KeyPool.from_secrets(SECRETS, models=ModelTable(), clock=clock, observer=metrics)
    async with observed_server(pool, metrics) as observed, client(observed.server.port) as stub:
        for model, tokens in [("gpt-4o", 1200), ("gpt-4o", 800), ("gpt-3.5-turbo", 350)]:
            got = await stub.Get(pb.GetRequest(model=model))
            await stub.IncrementUsage(
                pb.IncrementUsageRequest(hash=got.key.hash, model=model, tokens=tokens)
            )
        clock.advance(0.3)
        hashes = [k.hash for k in (await stub.List(pb.ListRequest())).keys]
        await stub.MarkRateLimited(pb.MarkRateLimitedRequest(hash=hashes[0]))
        await stub.Disable(pb.DisableRequest(hash=hashes[5], reason=pb.DISABLE_REASON_REVOKED))
        await stub.Disable(pb.DisableRequest(hash=hashes[6], reason=pb.DISABLE_REASON_QUOTA))
        await stub.Disable(pb.DisableRequest(hash=hashes[7], reason=pb.DISABLE_REASON_MANUAL))
        listing = await stub.List(pb.ListRequest())

        url = observed.base_url + "/"
        dom = (await run_chromium(browser, "--dump-dom", url)).decode()
        screenshot = tmp_path / "status-page.png"
        await run_chromium(browser, f"--screenshot={screenshot}", url)

    assert "keysvc status" in dom
    for secret in SECRETS:
        assert secret not in dom
    check_page_against_api(dom, listing, clock.now())
    width, height = png_size(screenshot.read_bytes())
    assert (width, height) == (1280, 1100)
    assert screenshot.stat().st_size > 10_000  # a rendered page, not a blank one
