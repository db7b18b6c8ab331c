"""One key checker among replicas: a lease in Redis, taken over when its holder dies."""

from __future__ import annotations

import signal
import time
from contextlib import ExitStack

import grpc
import redis

from keysvc.testing.fake_openai import FakeOpenAI
from keysvc.v1 import keysvc_pb2 as pb
from keysvc.v1 import keysvc_pb2_grpc
from tests.helpers import keysvc_process
from tests.redis_server import RedisServer, replica_env

SECRETS = [f"sk-lease-{i:02d}" for i in range(36)]


def test_the_checker_lease_moves_when_its_holder_dies(
    redis_server: RedisServer, redis_prefix: str
) -> None:
    with FakeOpenAI() as fake, ExitStack() as stack:
        env = {
            **replica_env(redis_server.url, redis_prefix, SECRETS),
            "CHECK_KEYS": "true",
            "OPENAI_BASE_URL": fake.base_url,
            "KEYSVC_CHECK_INTERVAL": "1",  # 12 keys a batch, a batch a second: ~3 s in all
        }
        children = [stack.enter_context(keysvc_process(env=env)) for _ in range(2)]
        client = redis.Redis.from_url(redis_server.url)
        stack.callback(client.close)
        stub = keysvc_pb2_grpc.KeyServiceStub(
            stack.enter_context(grpc.insecure_channel(f"127.0.0.1:{children[1].port}"))
        )

        def checked() -> int:
            keys = stub.List(pb.ListRequest()).keys
            return sum(k.HasField("last_checked") for k in keys)

        # The first batch is checked by whoever holds the lease; that one is killed.
        deadline = time.monotonic() + 20
        while checked() == 0:
            assert time.monotonic() < deadline, "no key was checked"
            time.sleep(0.05)
        holder = client.get(f"{{{redis_prefix}}}:checker")
        assert holder is not None
        pid = int(holder.decode().split(":")[1])
        dead = next(c for c in children if c.process.pid == pid)
        survivor = next(c for c in children if c is not dead)
        dead.process.send_signal(signal.SIGKILL)
        dead.process.wait()
        assert checked() < len(SECRETS)
        stub = keysvc_pb2_grpc.KeyServiceStub(
            stack.enter_context(grpc.insecure_channel(f"127.0.0.1:{survivor.port}"))
        )
        # The lease lapses (10 s) and the survivor finishes the checks.
        deadline = time.monotonic() + 25
        while checked() < len(SECRETS):
            assert time.monotonic() < deadline, f"only {checked()} keys checked"
            time.sleep(0.2)
        taken = client.get(f"{{{redis_prefix}}}:checker")
        assert taken is not None and int(taken.decode().split(":")[1]) == survivor.process.pid
