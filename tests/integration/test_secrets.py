"""No key secret (nor auth token) in logs, errors, listings, state or metrics.

A full scenario runs against a server process at debug level, including
mistakes a caller might make with a secret (sending it as a hash or in a
rate-limit header), then everything the service said is searched.
"""

from __future__ import annotations

import signal
import socket
import urllib.request
from pathlib import Path

import grpc

from keysvc.keys import hash_key
from keysvc.v1 import keysvc_pb2 as pb
from keysvc.v1 import keysvc_pb2_grpc
from tests.procs import ServerProcess

SECRETS = [f"sk-proj-SECRET{i}{'q' * 40}" for i in range(4)]
FILE_SECRET = "sk-proj-FILESECRET" + "z" * 40
PROXY, ADMIN = "proxy-TOKEN-never-logged", "admin-TOKEN-never-logged"
EVERYTHING = [*SECRETS, FILE_SECRET, PROXY, ADMIN]


def _scenario(port: int) -> list[str]:
    """Exercises every RPC, successes and errors; returns all the text callers saw
    except GetResponse.secret (the one place a secret is meant to leave)."""
    seen: list[str] = []
    proxy = (("authorization", f"Bearer {PROXY}"),)
    admin = (("authorization", f"Bearer {ADMIN}"),)
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = keysvc_pb2_grpc.KeyServiceStub(channel)

        def attempt(rpc: str, request: object, metadata: object) -> None:
            try:
                reply = getattr(stub, rpc)(request, metadata=metadata, timeout=10)
            except grpc.RpcError as error:
                seen.append(error.details() or "")  # type: ignore[attr-defined]
                seen.append(repr(error.trailing_metadata()))  # type: ignore[attr-defined]
                return
            if isinstance(reply, pb.GetResponse):
                assert reply.secret in [*SECRETS, FILE_SECRET]
                seen.append(str(reply.key))
            else:
                seen.append(str(reply))

        for _ in range(3):
            attempt("Get", pb.GetRequest(model="gpt-4o"), proxy)
        h0, h1 = hash_key(SECRETS[0]), hash_key(SECRETS[1])
        attempt(
            "UpdateRateLimits",
            pb.UpdateRateLimitsRequest(
                hash=h0,
                headers={"x-ratelimit-reset-tokens": SECRETS[2], "authorization": SECRETS[3]},
            ),
            proxy,
        )
        attempt(
            "UpdateRateLimits",
            pb.UpdateRateLimitsRequest(hash=h0, headers={"x-ratelimit-reset-requests": "1s500ms"}),
            proxy,
        )
        attempt("MarkRateLimited", pb.MarkRateLimitedRequest(hash=h0, model="gpt-4o"), proxy)
        attempt("IncrementUsage", pb.IncrementUsageRequest(hash=h1, model="o3", tokens=50), proxy)
        attempt("Disable", pb.DisableRequest(hash=h1, reason=pb.DISABLE_REASON_REVOKED), proxy)
        attempt("GetLockoutPeriod", pb.GetLockoutPeriodRequest(model="gpt-4"), proxy)
        attempt("Available", pb.AvailableRequest(), proxy)
        # Caller mistakes: a secret where a hash goes, bad tokens, wrong role.
        for secret in SECRETS:
            attempt("Disable", pb.DisableRequest(hash=secret), admin)
            attempt("IncrementUsage", pb.IncrementUsageRequest(hash=secret, model="x"), admin)
            attempt("Get", pb.GetRequest(model="gpt-4o"), (("authorization", secret),))
            attempt("Get", pb.GetRequest(model="gpt-4o"), (("authorization", f"Bearer {secret}"),))
        attempt("List", pb.ListRequest(), proxy)
        attempt("Recheck", pb.RecheckRequest(), admin)
        attempt("Get", pb.GetRequest(model="dall-e-3"), proxy)
        attempt("List", pb.ListRequest(), admin)
    return seen


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _run(tmp_path: Path, args: list[str]) -> tuple[ServerProcess, Path]:
    keys_file = tmp_path / "keys"
    keys_file.write_text(f"# more\n{FILE_SECRET}\n")
    state = tmp_path / "state.db"
    server = ServerProcess(
        {
            "OPENAI_KEY": ",".join(SECRETS),
            "KEYSVC_KEYS_FILE": str(keys_file),
            "KEYSVC_STATE_FILE": str(state),
            "KEYSVC_PROXY_TOKENS": PROXY,
            "KEYSVC_ADMIN_TOKENS": ADMIN,
            "KEYSVC_LOG_LEVEL": "debug",
        },
        args,
    )
    return server, state


def _assert_clean(where: str, text: str) -> None:
    for secret in EVERYTHING:
        assert secret not in text, f"a secret or token appears in {where}"
        assert secret[8:30] not in text, f"part of a secret or token appears in {where}"


def test_no_secret_in_logs_errors_listing_or_state(tmp_path: Path) -> None:
    server, state = _run(tmp_path, [])
    try:
        seen = _scenario(server.wait_serving())
        # A reload with a malformed line, then SIGTERM: their logs count too.
        (tmp_path / "keys").write_text(f"{FILE_SECRET} {SECRETS[0]}\n")
        server.signal(signal.SIGHUP)
        server.wait_for_log("keys file not reloaded")
        server.signal(signal.SIGTERM)
        assert server.wait_exit() == 0
    finally:
        server.stop()
    assert any("ROLE_DENIED" in s or "List" in s for s in seen)
    assert any("oai-" in s for s in seen)  # listings were seen
    assert "DEBUG" in server.log  # the scenario really ran at debug level
    _assert_clean("a reply or error", "\n".join(seen))
    _assert_clean("the log", server.log)
    state_files = b"".join(p.read_bytes() for p in tmp_path.glob("state.db*"))
    _assert_clean("the state file", state_files.decode("latin-1"))


def test_no_secret_in_metrics(tmp_path: Path) -> None:
    metrics_port = _free_port()
    server, _ = _run(tmp_path, ["--metrics-port", str(metrics_port)])
    try:
        _scenario(server.wait_serving())
        with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10) as r:
            metrics = r.read().decode()
        assert metrics.strip()
    finally:
        server.stop()
    _assert_clean("the metrics", metrics)
