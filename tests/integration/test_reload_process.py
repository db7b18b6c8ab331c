"""Hot reload of KEYSVC_KEYS_FILE in a server process: on file change and on SIGHUP."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import grpc

from keysvc.keys import hash_key
from keysvc.v1 import keysvc_pb2 as pb
from keysvc.v1 import keysvc_pb2_grpc
from tests.procs import ServerProcess

A, B, C, D = (f"sk-hot-{c * 24}" for c in "abcd")


def _hashes(stub: keysvc_pb2_grpc.KeyServiceStub) -> dict[str, pb.Key]:
    return {k.hash: k for k in stub.List(pb.ListRequest(), timeout=5).keys}


def _wait_for(stub: keysvc_pb2_grpc.KeyServiceStub, wanted: set[str]) -> dict[str, pb.Key]:
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        keys = _hashes(stub)
        if set(keys) == wanted:
            return keys
        time.sleep(0.1)
    raise AssertionError(f"pool is {sorted(_hashes(stub))}, wanted {sorted(wanted)}")


def _rewrite_keeping_stat(path: Path, text: str) -> None:
    """New content of the same size, mtime put back: only SIGHUP can notice."""
    before = path.stat()
    assert len(text.encode()) == before.st_size
    with path.open("r+") as f:
        f.write(text)
    os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))


def test_file_change_and_sighup_reload(tmp_path: Path) -> None:
    keys_file = tmp_path / "keys"
    keys_file.write_text(f"# fleet keys\n{B}\n{C}\n")
    server = ServerProcess(
        {"OPENAI_KEY": A, "KEYSVC_KEYS_FILE": str(keys_file), "KEYSVC_LOG_LEVEL": "debug"}
    )
    try:
        port = server.wait_serving()
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = keysvc_pb2_grpc.KeyServiceStub(channel)
            assert set(_hashes(stub)) == {hash_key(A), hash_key(B), hash_key(C)}
            stub.Disable(pb.DisableRequest(hash=hash_key(B), reason=pb.DISABLE_REASON_QUOTA))
            stub.IncrementUsage(pb.IncrementUsageRequest(hash=hash_key(C), model="o3", tokens=4))

            # File change: C leaves, D joins, B keeps its state.
            keys_file.write_text(f"# fleet keys\n{B}\n{D}\n")
            keys = _wait_for(stub, {hash_key(A), hash_key(B), hash_key(D)})
            assert keys[hash_key(B)].is_disabled and keys[hash_key(B)].is_over_quota
            assert not keys[hash_key(D)].last_checked.seconds
            server.wait_for_log("keys file reloaded.*why=file changed")

            # A malformed file keeps the old pool and the log says why.
            mark = len(server.lines)
            keys_file.write_text(f"{B}\n{C} {D}\n")
            server.wait_for_log("keys file not reloaded.*line 2", start=mark)
            assert set(_hashes(stub)) == {hash_key(A), hash_key(B), hash_key(D)}

            # SIGHUP: the content changes but size and mtime do not.
            mark = len(server.lines)
            keys_file.write_text(f"{B}\n{D}\n")
            server.wait_for_log("keys file reloaded.*why=file changed", start=mark)
            _rewrite_keeping_stat(keys_file, f"{B}\n{C}\n")
            time.sleep(1.5)
            assert set(_hashes(stub)) == {hash_key(A), hash_key(B), hash_key(D)}
            server.signal(signal.SIGHUP)
            keys = _wait_for(stub, {hash_key(A), hash_key(B), hash_key(C)})
            assert keys[hash_key(B)].is_disabled
            server.wait_for_log("keys file reloaded.*why=SIGHUP")
        assert all(s not in server.log for s in (A, B, C, D))
        server.signal(signal.SIGTERM)
        assert server.wait_exit() == 0
    finally:
        server.stop()
