"""``keysvc serve`` with KEYSVC_REDIS_URL: replicas that share one pool, and Redis gone."""

from __future__ import annotations

import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from keysvc.keys import hash_key
from keysvc.v1 import keysvc_pb2 as pb
from keysvc.v1 import keysvc_pb2_grpc
from tests.helpers import error_reason, keysvc_process
from tests.redis_server import RedisServer, free_port, replica_env

SECRETS = [f"sk-redis-{i:02d}" for i in range(8)]
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


def _stub(port: int) -> keysvc_pb2_grpc.KeyServiceStub:
    return keysvc_pb2_grpc.KeyServiceStub(grpc.insecure_channel(f"127.0.0.1:{port}"))


def _env(url: str, prefix: str, secrets: list[str] = SECRETS) -> dict[str, str]:
    return replica_env(url, prefix, secrets)


def test_two_replicas_share_one_pool(redis_server: RedisServer, redis_prefix: str) -> None:
    env = _env(redis_server.url, redis_prefix)
    with keysvc_process(env=env) as first, keysvc_process(env=env) as second:
        a, b = _stub(first.port), _stub(second.port)
        # Eight Gets spread over both replicas: eight distinct keys (each throttled for 1 s).
        handed = [(a if i % 2 else b).Get(pb.GetRequest(model="gpt-4")) for i in range(8)]
        assert sorted(r.key.hash for r in handed) == sorted(hash_key(s) for s in SECRETS)
        assert all(
            r.secret == SECRETS[[hash_key(s) for s in SECRETS].index(r.key.hash)] for r in handed
        )
        # A Disable on one is obeyed by the other.
        gone = hash_key(SECRETS[0])
        a.Disable(pb.DisableRequest(hash=gone, reason=pb.DISABLE_REASON_REVOKED))
        assert b.Available(pb.AvailableRequest()).count == 7
        listed = b.List(pb.ListRequest(state=pb.KEY_STATE_DISABLED)).keys
        assert [k.hash for k in listed] == [gone] and listed[0].is_revoked
        # Every key is throttled by the first round: the lockout is seen by both.
        assert b.GetLockoutPeriod(pb.GetLockoutPeriodRequest(model="gpt-4")).lockout.nanos > 0
        for child in (first, second):
            code, log = child.stop()
            assert code == 0
            assert all(s not in log for s in SECRETS)


def test_two_prefixes_are_two_pools(redis_server: RedisServer, redis_prefix: str) -> None:
    with (
        keysvc_process(env=_env(redis_server.url, redis_prefix + "a", SECRETS[:2])) as first,
        keysvc_process(env=_env(redis_server.url, redis_prefix + "b", SECRETS[2:5])) as second,
    ):
        assert _stub(first.port).Available(pb.AvailableRequest()).count == 2
        assert _stub(second.port).Available(pb.AvailableRequest()).count == 3


def test_secrets_never_reach_redis(redis_server: RedisServer, redis_prefix: str) -> None:
    import redis

    with keysvc_process(env=_env(redis_server.url, redis_prefix)) as child:
        stub = _stub(child.port)
        for _ in range(3):
            stub.Get(pb.GetRequest(model="gpt-4"))
        client = redis.Redis.from_url(redis_server.url)
        stored = b""
        for name in client.scan_iter(match=f"{{{redis_prefix}}}:*"):
            kind = client.type(name)
            if kind == b"hash":
                stored += b"".join(k + v for k, v in client.hgetall(name).items())
            elif kind == b"zset":
                stored += b"".join(m for m, _ in client.zrange(name, 0, -1, withscores=True))
            elif kind == b"set":
                stored += b"".join(client.smembers(name))
            elif kind == b"list":
                stored += b"".join(client.lrange(name, 0, -1))
            else:
                stored += client.get(name) or b""
            assert name.startswith(f"{{{redis_prefix}}}:".encode())
        client.close()
        assert stored and all(s.encode() not in stored for s in SECRETS)


def test_a_hung_redis_fails_calls_within_the_timeout(tmp_path: Path) -> None:
    server = RedisServer(tmp_path)
    server.start()
    try:
        env = {**_env(server.url, "hung"), "KEYSVC_REDIS_TIMEOUT": "500ms"}
        with keysvc_process(env=env) as child:
            stub = _stub(child.port)
            stub.Get(pb.GetRequest(model="gpt-4"))
            server.pause()
            took = []
            for call in (
                lambda: stub.Get(pb.GetRequest(model="gpt-4")),
                lambda: stub.Available(pb.AvailableRequest()),
                lambda: stub.Disable(pb.DisableRequest(hash=hash_key(SECRETS[1]))),
                lambda: stub.GetLockoutPeriod(pb.GetLockoutPeriodRequest(model="gpt-4")),
            ):
                started = time.monotonic()
                with pytest.raises(grpc.RpcError) as caught:
                    call()
                took.append(time.monotonic() - started)
                assert caught.value.code() == grpc.StatusCode.UNAVAILABLE  # type: ignore[attr-defined]
                assert error_reason(caught.value) == "STORE_UNAVAILABLE"  # type: ignore[arg-type]
            assert max(took) < 1.5  # 500 ms on Redis, the rest is the RPC itself
            _wait_health(child.port, NOT_SERVING, within=2.0)
            server.resume()
            _wait_health(child.port, SERVING, within=2.0)
            assert _stub(child.port).Available(pb.AvailableRequest()).count == len(SECRETS)
    finally:
        server.stop()


def test_replicas_serve_anthropic_keys_beside_openai_ones(
    redis_server: RedisServer, redis_prefix: str, tmp_path: Path
) -> None:
    """An Anthropic key in ANTHROPIC_KEY (one replica) or the keys file (the other),
    an OpenAI key beside it: Claude models get the Anthropic key only, and an answer
    that leaves its input tokens spent locks it for every replica until their reset."""
    anthropic, openai = "sk-ant-api03-redis-0001", SECRETS[0]
    keys_file = tmp_path / "keys.txt"
    keys_file.write_text(f"{anthropic}\n")
    first_env = {**_env(redis_server.url, redis_prefix, [openai]), "ANTHROPIC_KEY": anthropic}
    second_env = {**_env(redis_server.url, redis_prefix, [openai])}
    second_env["KEYSVC_KEYS_FILE"] = str(keys_file)
    with keysvc_process(env=first_env) as first, keysvc_process(env=second_env) as second:
        a, b = _stub(first.port), _stub(second.port)
        got = a.Get(pb.GetRequest(model="claude-sonnet-4-5"))
        assert got.key.hash == hash_key(anthropic) and got.secret == anthropic
        assert got.key.service == "anthropic"
        assert b.Get(pb.GetRequest(model="gpt-4o")).key.hash == hash_key(openai)
        reset = datetime.fromtimestamp(time.time() + 30, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
        headers = {
            "anthropic-ratelimit-requests-limit": "50",
            "anthropic-ratelimit-requests-remaining": "49",
            "anthropic-ratelimit-requests-reset": reset,
            "anthropic-ratelimit-input-tokens-limit": "40000",
            "anthropic-ratelimit-input-tokens-remaining": "40000",
            "anthropic-ratelimit-input-tokens-reset": reset,
            "anthropic-ratelimit-output-tokens-limit": "8000",
            "anthropic-ratelimit-output-tokens-remaining": "7000",
            "anthropic-ratelimit-output-tokens-reset": reset,
        }
        # A request of 36,000 input tokens (learned from its answer), then an answer
        # that leaves none: the next needs ~27 s of the input budget's refill.
        for left in ("40000", "0"):
            headers["anthropic-ratelimit-input-tokens-remaining"] = left
            a.ReportOutcome(
                pb.ReportOutcomeRequest(
                    hash=got.key.hash,
                    model="claude-sonnet-4-5",
                    status=200,
                    headers=headers,
                    prompt_tokens=36000,
                    completion_tokens=200,
                )
            )
        # Locked by the input budget (not the 1 s reuse throttle): until about the reset.
        lockout = b.GetLockoutPeriod(pb.GetLockoutPeriodRequest(model="claude-sonnet-4-5")).lockout
        assert 20 < lockout.seconds <= 30
        # The OpenAI key is held back by its own hand-out's throttle only.
        other = b.GetLockoutPeriod(pb.GetLockoutPeriodRequest(model="gpt-4o")).lockout
        assert other.seconds + other.nanos / 1e9 <= 1.0
        for child in (first, second):
            code, log = child.stop()
            assert code == 0
            assert anthropic not in log and openai not in log


@pytest.mark.parametrize(
    ("extra", "problem"),
    [
        ({"KEYSVC_STATE_FILE": "state.db"}, "KEYSVC_STATE_FILE"),
        ({"KEYSVC_REDIS_URL": "http://127.0.0.1:1"}, "redis://"),
        ({"KEYSVC_REDIS_PREFIX": "a{b}"}, "KEYSVC_REDIS_PREFIX"),
    ],
)
def test_settings_redis_cannot_go_with_are_refused(
    tmp_path: Path, extra: dict[str, str], problem: str
) -> None:
    env = {
        "PATH": "/usr/bin:/bin",
        "CHECK_KEYS": "false",
        "KEYSVC_REDIS_URL": "redis://:hunter2@127.0.0.1:1/0",
        **extra,
    }
    done = subprocess.run(
        [sys.executable, "-m", "keysvc", "serve", "--port", "0"],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert done.returncode == 2
    assert problem in done.stderr
    assert "hunter2" not in done.stderr


def _health(port: int, service: str = "keysvc.v1.KeyService") -> int:
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        status: int = stub.Check(health_pb2.HealthCheckRequest(service=service)).status
        return status


def _wait_health(port: int, want: int, within: float) -> float:
    started = time.monotonic()
    while _health(port) != want:
        assert time.monotonic() - started < within, f"health not {want} within {within} s"
        time.sleep(0.05)
    return time.monotonic() - started


def test_a_served_replica_sweeps_out_keys_no_replica_holds(
    redis_server: RedisServer, redis_prefix: str
) -> None:
    # serve() runs the sweeper: keys whose only list lapsed (their replica went for
    # good; the test deletes the list as its expiry would) leave the shared pool.
    import redis

    with keysvc_process(env=_env(redis_server.url, redis_prefix, SECRETS[:3])) as gone:
        assert _stub(gone.port).Available(pb.AvailableRequest()).count == 3
    client = redis.Redis.from_url(redis_server.url)
    try:
        for name in client.keys(f"{{{redis_prefix}}}:held:*"):
            client.delete(name)
        with keysvc_process(env=_env(redis_server.url, redis_prefix, SECRETS[:1])) as child:
            stub = _stub(child.port)
            deadline = time.monotonic() + 10
            while stub.Available(pb.AvailableRequest()).count != 1:
                assert time.monotonic() < deadline, "the lapsed keys stayed in the pool"
                time.sleep(0.1)
            assert [k.hash for k in stub.List(pb.ListRequest()).keys] == [hash_key(SECRETS[0])]
            assert client.get(f"{{{redis_prefix}}}:sweeper") is not None
    finally:
        client.close()


def test_a_replica_started_while_redis_is_down_joins_when_it_comes(tmp_path: Path) -> None:
    port = free_port()
    env = _env(f"redis://127.0.0.1:{port}/0", "late")
    server = RedisServer(tmp_path)
    with keysvc_process(env=env) as child:
        _wait_health(child.port, NOT_SERVING, within=2.0)
        with pytest.raises(grpc.RpcError) as caught:
            _stub(child.port).Get(pb.GetRequest(model="gpt-4"))
        assert error_reason(caught.value) == "STORE_UNAVAILABLE"  # type: ignore[arg-type]
        server.start(port)
        try:
            _wait_health(child.port, SERVING, within=2.0)
            assert _stub(child.port).Available(pb.AvailableRequest()).count == len(SECRETS)
            assert _stub(child.port).Get(pb.GetRequest(model="gpt-4")).secret in SECRETS
        finally:
            server.stop()
        _wait_health(child.port, NOT_SERVING, within=2.0)


def test_a_waiting_get_is_woken_by_another_replica(
    redis_server: RedisServer, redis_prefix: str
) -> None:
    """Replica B waits (max_wait 5 s) while its only live key is locked for 10 s; a
    Recheck on replica A brings a disabled key back, and B's Get gets it at once
    (woken through Redis pub/sub), not at its deadline with the locked key."""
    secrets = SECRETS[:2]
    env = _env(redis_server.url, redis_prefix, secrets)
    locked, disabled = hash_key(secrets[0]), hash_key(secrets[1])
    with keysvc_process(env=env) as a_child, keysvc_process(env=env) as b_child:
        a, b = _stub(a_child.port), _stub(b_child.port)
        a.Disable(pb.DisableRequest(hash=disabled))
        a.MarkRateLimited(pb.MarkRateLimitedRequest(hash=locked, model="gpt-4"))
        assert a.GetLockoutPeriod(pb.GetLockoutPeriodRequest(model="gpt-4")).lockout.seconds >= 9
        request = pb.GetRequest(model="gpt-4")
        request.max_wait.seconds = 5
        waiting = b.Get.future(request, timeout=10)
        time.sleep(0.5)
        assert not waiting.done()
        started = time.monotonic()
        a.Recheck(pb.RecheckRequest())
        got = waiting.result()
        assert got.key.hash == disabled
        assert time.monotonic() - started < 2.5  # its deadline was 4.5 s away


def test_a_waiting_get_whose_keys_stay_locked_is_told_keys_busy(
    redis_server: RedisServer, redis_prefix: str
) -> None:
    """As in memory: nothing is handed out at the wait's end; the status says when the
    first key is expected to unlock."""
    secrets = SECRETS[:1]
    with keysvc_process(env=_env(redis_server.url, redis_prefix, secrets)) as child:
        stub = _stub(child.port)
        stub.MarkRateLimited(pb.MarkRateLimitedRequest(hash=hash_key(secrets[0]), model="gpt-4"))
        request = pb.GetRequest(model="gpt-4")
        request.max_wait.FromMilliseconds(500)
        with pytest.raises(grpc.RpcError) as caught:
            stub.Get(request, timeout=5)
        assert caught.value.code() is grpc.StatusCode.RESOURCE_EXHAUSTED  # type: ignore[attr-defined]
        assert error_reason(caught.value) == "KEYS_BUSY"  # type: ignore[arg-type]
        listed = stub.List(pb.ListRequest()).keys
        assert not listed[0].HasField("last_used")  # nothing was handed out
        # A plain Get still hands out the locked key.
        assert stub.Get(pb.GetRequest(model="gpt-4")).key.hash == hash_key(secrets[0])
