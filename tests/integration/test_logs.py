"""JSON logs of a live server: one line per RPC at debug, key state changes once each,
never a secret."""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Iterator

import grpc
import pytest

from keysvc.logs import JsonFormatter, TextFormatter
from keysvc.v1 import keysvc_pb2 as pb
from tests.helpers import client, make_pool, serving

SECRETS = [f"sk-log-test-{n:02d}-cccccccccccccccc" for n in range(3)]


@pytest.fixture
def json_log() -> Iterator[io.StringIO]:
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JsonFormatter())
    root = logging.getLogger()
    saved = root.level
    root.addHandler(handler)
    root.setLevel(logging.DEBUG)
    try:
        yield stream
    finally:
        root.removeHandler(handler)
        root.setLevel(saved)


async def test_json_lines_for_rpcs_and_state_changes(json_log: io.StringIO) -> None:
    pool, _ = make_pool(SECRETS)
    async with serving(pool) as server, client(server.port) as stub:
        got = await stub.Get(pb.GetRequest(model="gpt-4o"))
        await stub.MarkRateLimited(pb.MarkRateLimitedRequest(hash=got.key.hash))
        await stub.MarkRateLimited(pb.MarkRateLimitedRequest(hash=got.key.hash))
        await stub.Disable(pb.DisableRequest(hash=got.key.hash, reason=pb.DISABLE_REASON_REVOKED))
        await stub.Disable(pb.DisableRequest(hash=got.key.hash, reason=pb.DISABLE_REASON_REVOKED))
        with pytest.raises(grpc.aio.AioRpcError):  # a secret sent as a hash by mistake
            await stub.Disable(pb.DisableRequest(hash=SECRETS[1]))

    text = json_log.getvalue()
    for secret in SECRETS:
        assert secret not in text
    lines = [json.loads(line) for line in text.splitlines()]
    for line in lines:
        assert {"time", "level", "event"} <= set(line)

    rpcs = [line for line in lines if line["event"] == "rpc"]
    assert [(r["method"].rsplit("/", 1)[1], r["status"]) for r in rpcs] == [
        ("Get", "OK"),
        ("MarkRateLimited", "OK"),
        ("MarkRateLimited", "OK"),
        ("Disable", "OK"),
        ("Disable", "OK"),
        ("Disable", "INVALID_ARGUMENT"),
    ]
    assert all(r["level"] == "debug" and r["duration_ms"] >= 0 for r in rpcs)
    assert [r.get("key_hash") for r in rpcs] == [got.key.hash] * 5 + [None]

    changes = [line for line in lines if line["event"].startswith("key ")]
    assert [(c["event"], c["key_hash"], c["reason"]) for c in changes] == [
        ("key rate limited", got.key.hash, "upstream answered 429"),
        ("key revoked", got.key.hash, "revoked"),
    ]
    assert [c["level"] for c in changes] == ["info", "warning"]


def test_text_format_prints_the_same_fields() -> None:
    record = logging.LogRecord("keysvc.pool", logging.WARNING, "", 0, "key revoked", None, None)
    record.key_hash = "oai-0123abcd"
    record.reason = "revoked"
    line = TextFormatter().format(record)
    assert line.endswith("WARNING keysvc.pool: key revoked key_hash=oai-0123abcd reason=revoked")
