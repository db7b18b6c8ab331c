"""State survives kill -9 and restarts; a bad state file stops start-up."""

from __future__ import annotations

import json
import signal
import time
from pathlib import Path

import grpc

from keysvc.keys import hash_key
from keysvc.v1 import keysvc_pb2 as pb
from keysvc.v1 import keysvc_pb2_grpc
from tests.procs import ServerProcess, kill9, run_keysvc

SECRETS = [f"sk-restart-{i:02d}-{'r' * 20}" for i in range(8)]
HASHES = [hash_key(s) for s in SECRETS]


def _env(state: Path) -> dict[str, str]:
    return {"OPENAI_KEY": ",".join(SECRETS), "KEYSVC_STATE_FILE": str(state)}


def _stub(port: int) -> tuple[grpc.Channel, keysvc_pb2_grpc.KeyServiceStub]:
    channel = grpc.insecure_channel(f"127.0.0.1:{port}")
    return channel, keysvc_pb2_grpc.KeyServiceStub(channel)


def _state_bytes(state: Path) -> bytes:
    """The database and SQLite's files beside it (the write-ahead log after a kill -9)."""
    return b"".join(p.read_bytes() for p in state.parent.glob(state.name + "*"))


def test_disables_survive_kill_9_and_usage_within_the_batch_window(tmp_path: Path) -> None:
    state = tmp_path / "state.db"
    server = ServerProcess(_env(state))
    try:
        channel, stub = _stub(server.wait_serving())
        # Usage reported well before the kill: must survive (batched, <= 1 s).
        for _ in range(10):
            stub.IncrementUsage(pb.IncrementUsageRequest(hash=HASHES[0], model="gpt-4o", tokens=7))
        time.sleep(1.6)
        # Disables, each acknowledged, then kill -9 at once: all must survive.
        dead = HASHES[1:5]
        for key_hash in dead:
            stub.Disable(pb.DisableRequest(hash=key_hash, reason=pb.DISABLE_REASON_REVOKED))
        # Usage just before the kill may be lost, but nothing older than the window.
        for _ in range(3):
            stub.IncrementUsage(pb.IncrementUsageRequest(hash=HASHES[0], model="gpt-4o", tokens=1))
        kill9(server)
        channel.close()
    finally:
        server.stop()
    assert SECRETS[0].encode() not in _state_bytes(state)

    again = ServerProcess(_env(state))
    try:
        channel, stub = _stub(again.wait_serving())
        keys = {k.hash: k for k in stub.List(pb.ListRequest()).keys}
        assert sorted(keys) == sorted(HASHES)
        for key_hash in dead:
            assert keys[key_hash].is_disabled and keys[key_hash].is_revoked
            assert keys[key_hash].disable_reason == pb.DISABLE_REASON_REVOKED
        assert 10 <= keys[HASHES[0]].prompt_count <= 13
        assert 70 <= keys[HASHES[0]].token_usage["gpt4o"] <= 73
        handed_out = set()
        for _ in range(3 * len(SECRETS)):
            handed_out.add(stub.Get(pb.GetRequest(model="gpt-4o")).key.hash)
        assert handed_out == set(HASHES) - set(dead)
        assert stub.Available(pb.AvailableRequest()).count == len(SECRETS) - len(dead)
        channel.close()
        # A clean stop writes everything: no loss at all.
        again.signal(signal.SIGTERM)
        assert again.wait_exit() == 0
    finally:
        again.stop()


def test_corrupt_state_file_refuses_to_start(tmp_path: Path) -> None:
    state = tmp_path / "state.json"
    state.write_text('{"version": 1, "keys": {"oai-0123abcd": {"is_disabled": 3}}}')
    done = run_keysvc(_env(state))
    assert done.returncode == 2
    assert "is corrupt" in done.stderr and "--ignore-state" in done.stderr
    assert "oai-0123abcd" in state.read_text()  # untouched


def test_ignore_state_starts_loudly(tmp_path: Path) -> None:
    state = tmp_path / "state.json"
    state.write_text("{garbage")
    server = ServerProcess(_env(state), ["--ignore-state"])
    try:
        channel, stub = _stub(server.wait_serving())
        assert len(stub.List(pb.ListRequest()).keys) == len(SECRETS)
        channel.close()
        assert "ERROR" in server.wait_for_log("IGNORING THE STATE FILE")
        assert list(tmp_path.glob("state.json.corrupt-*"))
    finally:
        server.stop()


def test_unwritable_state_directory_refuses_to_start(tmp_path: Path) -> None:
    state = tmp_path / "no-such-dir" / "state.json"
    done = run_keysvc(_env(state))
    assert done.returncode == 2
    assert "cannot write" in done.stderr


def test_a_json_state_file_of_an_earlier_keysvc_is_converted(tmp_path: Path) -> None:
    state = tmp_path / "state.json"
    old = json.dumps(
        {"version": 1, "keys": {h: {"is_disabled": True, "is_revoked": True} for h in HASHES[:3]}}
    )
    state.write_text(old)
    (tmp_path / ".state.json.31337.tmp").write_text(old[:40])  # left by a kill -9
    logs = []
    for _ in range(2):  # converted at the first start, read as a database at the second
        server = ServerProcess(_env(state))
        try:
            channel, stub = _stub(server.wait_serving())
            assert stub.Available(pb.AvailableRequest()).count == len(SECRETS) - 3
            channel.close()
            server.signal(signal.SIGTERM)
            assert server.wait_exit() == 0
        finally:
            server.stop()
        logs.append(server.log)
    assert state.read_bytes().startswith(b"SQLite format 3\x00")
    (backup,) = tmp_path.glob("state.json.migrated-*")
    assert backup.read_text() == old
    assert not list(tmp_path.glob(".*.tmp"))
    assert "converted the JSON state file to SQLite" in logs[0]
    assert "converted" not in logs[1]
