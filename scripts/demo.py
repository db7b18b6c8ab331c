"""The whole loop in one command (``make demo``).

Starts the fake OpenAI and Anthropic upstreams on 127.0.0.1 with a handful of
demo keys each (one per scenario: valid, gpt-4-32k, trial, revoked, over quota,
multi-org, 5xx then OK, rate limited; Anthropic: valid, tier 1, revoked, spend
limit, no Opus, overloaded), starts ``keysvc serve`` pointed at both, waits for
the key checker, then shows through the real gRPC API what keysvc learned and a
few Gets. Exits by itself; non-zero if something did not work.
"""

from __future__ import annotations

import asyncio
import sys
import time
from typing import Any

import grpc

from keysvc.keys import hash_key
from keysvc.testing import fake_anthropic
from keysvc.testing.fake_openai import SCENARIOS, FakeOpenAI, demo_keys
from keysvc.testing.process import start_keysvc
from keysvc.v1 import keysvc_pb2 as pb
from keysvc.v1 import keysvc_pb2_grpc

REASONS = {pb.DISABLE_REASON_REVOKED: "revoked", pb.DISABLE_REASON_QUOTA: "over quota"}
GETS = [
    "gpt-3.5-turbo",
    "gpt-4o",
    "gpt-4-32k",
    "text-embedding-ada-002",
    "gpt-4o-2024-08-06",
    "claude-sonnet-4-5-20250929",
    "claude-3-5-haiku-20241022",
]
SHOWN_EVENTS = {
    "key checker started",
    "key check: alive",
    "key check: dead",
    "key check incomplete; will retry",
    "cloned key for organization",
}


def show_log(record: dict[str, Any]) -> None:
    if record.get("event") not in SHOWN_EVENTS:
        return
    fields = " ".join(
        f"{k}={v}" for k, v in record.items() if k not in ("time", "level", "logger", "event")
    )
    print(f"  keysvc log | {record['event']:<34} {fields}")


async def main() -> int:
    keys = demo_keys()
    ant_keys = fake_anthropic.demo_keys()
    names = {
        hash_key(secret): name
        for secret in keys
        for name, s in SCENARIOS.items()
        if keys[secret] is s
    }
    names.update(
        (hash_key(secret), f"anthropic {name}")
        for secret in ant_keys
        for name, s in fake_anthropic.SCENARIOS.items()
        if ant_keys[secret] is s
    )
    with FakeOpenAI(keys) as fake, fake_anthropic.FakeAnthropic(ant_keys) as ant:
        print(f"fake OpenAI upstream at {fake.base_url} with {len(keys)} demo keys")
        print(f"fake Anthropic upstream at {ant.base_url} with {len(ant_keys)} demo keys")
        proc = await start_keysvc(
            keys=list(keys),
            base_url=fake.base_url,
            args=["--check-interval", "1"],
            env={"ANTHROPIC_KEY": ",".join(ant_keys), "ANTHROPIC_BASE_URL": ant.base_url},
            on_log=show_log,
        )
        print(f"keysvc serving on 127.0.0.1:{proc.port}; waiting for the key checker...")
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{proc.port}") as channel:
                return await show(keysvc_pb2_grpc.KeyServiceStub(channel), names, fake, ant)
        finally:
            code = await proc.stop()
            print(f"keysvc stopped (exit code {code})")


async def show(
    stub: keysvc_pb2_grpc.KeyServiceStub,
    names: dict[str, str],
    fake: FakeOpenAI,
    ant: fake_anthropic.FakeAnthropic,
) -> int:
    deadline = time.monotonic() + 60
    while True:
        listed = list((await stub.List(pb.ListRequest())).keys)
        if len(listed) > len(names) and all(k.last_checked.seconds for k in listed):
            break
        if time.monotonic() > deadline:
            print("the checks did not finish within 60 s", file=sys.stderr)
            return 1
        await asyncio.sleep(0.25)

    calls = len(fake.requests) + len(ant.requests)
    print(f"\nall keys checked: {calls} upstream calls, zero tokens spent\n")
    print(f"{'hash':<13} {'scenario':<22} {'organization':<13} {'trial':<6} {'state':<11} families")
    for key in listed:
        name = names.get(key.hash, "")
        if not name:
            parent = next((h for h in names if names[h] == "multi-org"), "")
            name = f"clone of {parent}" if parent else "clone"
        state = REASONS.get(key.disable_reason, "disabled") if key.is_disabled else "alive"
        families = "-" if key.is_disabled else ",".join(key.model_families)
        print(
            f"{key.hash:<13} {name:<22} {key.organization_id or '-':<13} "
            f"{'yes' if key.is_trial else 'no':<6} {state:<11} {families}"
        )

    print(f"\navailable keys: {(await stub.Available(pb.AvailableRequest())).count}")
    for model in [*GETS, "dall-e-3"]:
        try:
            got = await stub.Get(pb.GetRequest(model=model))
        except grpc.aio.AioRpcError as error:
            print(f"{f'Get({model})':<36} -> {error.code().name}: {error.details()}")
            continue
        key = got.key
        scenario = names.get(key.hash, "org clone")
        org = f", OpenAI-Organization: {key.organization_id}" if key.organization_id else ""
        print(f"{f'Get({model})':<36} -> {key.hash} ({scenario}{org})")
    return 0


if __name__ == "__main__":
    raise SystemExit(asyncio.run(main()))
