"""Three ``keysvc serve`` replicas on one Redis, 64 keys: one pool among them."""

from __future__ import annotations

import signal
import time
from collections import defaultdict
from contextlib import ExitStack

import grpc

from keysvc.keys import hash_key
from keysvc.v1 import keysvc_pb2 as pb
from keysvc.v1 import keysvc_pb2_grpc
from tests.helpers import keysvc_process
from tests.redis_server import RedisServer

SECRETS = [f"sk-three-{i:02d}" for i in range(64)]


def test_three_replicas_share_one_pool(redis_server: RedisServer, redis_prefix: str) -> None:
    env = {
        "OPENAI_KEY": ",".join(SECRETS),
        "KEYSVC_REDIS_URL": redis_server.url,
        "KEYSVC_REDIS_PREFIX": redis_prefix,
        "KEYSVC_REDIS_TIMEOUT": "2s",  # a loaded CI machine can stall a process 250 ms
    }
    with ExitStack() as stack:
        children = [stack.enter_context(keysvc_process(env=env)) for _ in range(3)]
        channels = [
            stack.enter_context(grpc.insecure_channel(f"127.0.0.1:{c.port}")) for c in children
        ]
        stubs = [keysvc_pb2_grpc.KeyServiceStub(channel) for channel in channels]

        # 64 Gets in flight at once, spread over the replicas: 64 distinct keys.
        calls = [stubs[i % 3].Get.future(pb.GetRequest(model="gpt-4")) for i in range(64)]
        handed = [call.result(timeout=30) for call in calls]
        assert len({r.key.hash for r in handed}) == 64
        # Each is throttled for every replica: no key is free for gpt-4 anywhere.
        for stub in stubs:
            lockout = stub.GetLockoutPeriod(pb.GetLockoutPeriodRequest(model="gpt-4")).lockout
            assert lockout.seconds + lockout.nanos / 1e9 > 0

        # A Disable on one replica is obeyed by the others on their next Get.
        gone = hash_key(SECRETS[5])
        stubs[0].Disable(pb.DisableRequest(hash=gone, reason=pb.DISABLE_REASON_MANUAL))
        time.sleep(1.1)  # every throttle over
        seen = {stubs[1 + i % 2].Get(pb.GetRequest(model="gpt-4")).key.hash for i in range(63)}
        assert gone not in seen and len(seen) == 63

        # kill -9 one replica under load (32 Gets a second, half the 63 keys' 1 s
        # throttle allows): the others keep serving, and no key is handed out twice
        # within its throttle across them.
        uses: dict[str, list[float]] = defaultdict(list)
        for round_ in range(6):
            if round_ == 1:
                children[2].process.send_signal(signal.SIGKILL)
                children[2].process.wait()
            live = stubs if round_ == 0 else stubs[:2]
            batch = [
                live[i % len(live)].Get.future(pb.GetRequest(model="gpt-4o")) for i in range(16)
            ]
            for call in batch:
                key = call.result(timeout=10).key
                uses[key.hash].append(key.last_used.seconds + key.last_used.nanos / 1e9)
            time.sleep(0.5)
        assert sum(len(v) for v in uses.values()) == 96
        for times in uses.values():
            times.sort()
            assert all(b - a >= 1.0 - 1e-6 for a, b in zip(times, times[1:], strict=False))
        assert gone not in uses
