"""A replica whose own clock runs 30 s ahead agrees with the others on every lock.

The skewed replica is a ``keysvc serve`` process whose Python wall clock
(``time.time``, ``time.time_ns``, and so the pool's ``SystemClock`` and its log
times) is shifted by a ``sitecustomize`` module; Redis's ``TIME`` is the only
clock the scripts use, so every lock, throttle and budget must come out alike.
"""

from __future__ import annotations

import re
import time
from datetime import datetime
from pathlib import Path

import grpc

from keysvc.keys import hash_key
from keysvc.v1 import keysvc_pb2 as pb
from keysvc.v1 import keysvc_pb2_grpc
from tests.helpers import keysvc_process
from tests.redis_server import RedisServer, replica_env

SECRETS = [f"sk-skew-{i}" for i in range(4)]
SKEW = 30.0

_SITECUSTOMIZE = """
import os
import time

_offset = float(os.environ["SKEWED_CLOCK_SECONDS"])
_time, _time_ns = time.time, time.time_ns
time.time = lambda: _time() + _offset
time.time_ns = lambda: _time_ns() + int(_offset * 1e9)
"""


def _seconds(duration: object) -> float:
    return duration.seconds + duration.nanos / 1e9  # type: ignore[attr-defined,no-any-return]


def _lockout(stub: keysvc_pb2_grpc.KeyServiceStub) -> float:
    return _seconds(stub.GetLockoutPeriod(pb.GetLockoutPeriodRequest(model="gpt-4")).lockout)


def _listed(stub: keysvc_pb2_grpc.KeyServiceStub, state: int) -> list[bytes]:
    keys = stub.List(pb.ListRequest(state=state)).keys  # type: ignore[arg-type]
    return [key.SerializeToString(deterministic=True) for key in keys]


def test_a_replica_30_s_ahead_agrees_on_every_lock(
    redis_server: RedisServer, redis_prefix: str, tmp_path: Path
) -> None:
    (tmp_path / "sitecustomize.py").write_text(_SITECUSTOMIZE)
    env = {**replica_env(redis_server.url, redis_prefix, SECRETS), "KEYSVC_LOG_FORMAT": "json"}
    skewed_env = {**env, "PYTHONPATH": str(tmp_path), "SKEWED_CLOCK_SECONDS": str(SKEW)}
    with keysvc_process(env=env) as right, keysvc_process(env=skewed_env) as ahead:
        # The offset took: the skewed replica's log times run 30 s ahead.
        stamp = re.search(r'"time": ?"([^"]+)"', ahead.startup_log)
        assert stamp is not None
        assert datetime.fromisoformat(stamp.group(1)).timestamp() - time.time() > SKEW - 5
        a = keysvc_pb2_grpc.KeyServiceStub(grpc.insecure_channel(f"127.0.0.1:{right.port}"))
        b = keysvc_pb2_grpc.KeyServiceStub(grpc.insecure_channel(f"127.0.0.1:{ahead.port}"))

        # Every key handed out by the right replica is throttled for the one ahead too
        # (its clock would have every 1 s throttle long over).
        handed = {a.Get(pb.GetRequest(model="gpt-4")).key.hash for _ in SECRETS}
        assert handed == {hash_key(s) for s in SECRETS}
        lockouts = (_lockout(b), _lockout(a))
        assert 0.0 < lockouts[0] <= 1.0 and 0.0 < lockouts[1] <= 1.0
        assert abs(lockouts[0] - lockouts[1]) < 0.5
        assert _listed(b, pb.KEY_STATE_LOCKED) == _listed(a, pb.KEY_STATE_LOCKED)
        assert len(_listed(a, pb.KEY_STATE_LOCKED)) == len(SECRETS)

        # A 429 reported to the replica ahead locks the key on Redis's clock: rate
        # limited now (not 30 s from now), for the 5 s its headers say, for both.
        limited = hash_key(SECRETS[0])
        b.MarkRateLimited(pb.MarkRateLimitedRequest(hash=limited))
        b.UpdateRateLimits(
            pb.UpdateRateLimitsRequest(hash=limited, headers={"x-ratelimit-reset-requests": "5s"})
        )
        time.sleep(1.1)  # the hand-out throttles are over; the 429's lock is not
        seen = []
        for stub in (a, b):
            [key] = stub.List(pb.ListRequest(state=pb.KEY_STATE_LOCKED)).keys
            seen.append(key.SerializeToString(deterministic=True))
            assert key.hash == limited
            at = key.rate_limited_at.seconds + key.rate_limited_at.nanos / 1e9
            until = key.rate_limited_until.seconds + key.rate_limited_until.nanos / 1e9
            assert abs(at - (time.time() - 1.1)) < 1.0
            assert abs(until - at - 5.0) < 1e-3
        assert seen[0] == seen[1]
        # Neither hands it out while the other three are free or sooner to unlock.
        for stub in (a, b, a, b, a, b):
            assert stub.Get(pb.GetRequest(model="gpt-4")).key.hash != limited
        assert 0.0 < _lockout(b) <= 1.0
        assert abs(_lockout(a) - _lockout(b)) < 0.5
