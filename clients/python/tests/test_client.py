"""KeysvcClient and AsyncKeysvcClient against a live keysvc process."""

from __future__ import annotations

import asyncio
import socket
import threading
import time
from collections.abc import Iterator
from datetime import timedelta

import grpc
import pytest
from keysvc_client import (
    DISABLE_REASON_MANUAL,
    OUTCOME_ACTION_DONE,
    OUTCOME_ACTION_RETRY_WITH_ANOTHER_KEY,
    OUTCOME_ACTION_RETURN_ERROR,
    AsyncKeysvcClient,
    KeysvcClient,
    KeysvcRpcError,
)

from .conftest import LiveServer, key_hash


@pytest.fixture
def client(server: LiveServer) -> Iterator[KeysvcClient]:
    with KeysvcClient(server.target) as client:
        yield client


def test_get_returns_a_known_secret_and_its_hash(client: KeysvcClient, server: LiveServer) -> None:
    lease = client.get("gpt-4o")
    assert lease.secret in server.secrets
    assert lease.key.hash == key_hash(lease.secret)
    assert "gpt4o" in lease.key.model_families


def test_gets_rotate_across_every_key(client: KeysvcClient, server: LiveServer) -> None:
    secrets = [client.get("gpt-4o").secret for _ in server.secrets]
    assert sorted(secrets) == sorted(server.secrets)


def test_a_disabled_key_is_never_handed_out(client: KeysvcClient, server: LiveServer) -> None:
    dead = key_hash(server.secrets[0])
    key = client.disable(dead, DISABLE_REASON_MANUAL)
    assert key.is_disabled and key.disable_reason == DISABLE_REASON_MANUAL
    handed = {client.get("gpt-4o").key.hash for _ in range(3 * len(server.secrets))}
    assert handed == {key_hash(s) for s in server.secrets[1:]}
    assert client.available() == len(server.secrets) - 1
    client.recheck()
    assert client.available() == len(server.secrets)


def test_unknown_hash_is_not_found_with_its_reason(client: KeysvcClient) -> None:
    with pytest.raises(KeysvcRpcError) as caught:
        client.disable("oai-00000000")
    assert caught.value.code == grpc.StatusCode.NOT_FOUND
    assert caught.value.reason == "KEY_NOT_FOUND"
    assert caught.value.domain == "keysvc"
    assert caught.value.metadata == {"hash": "oai-00000000"}


def test_no_key_for_the_family_is_failed_precondition(client: KeysvcClient) -> None:
    # Unchecked keys never get gpt4-32k: only the key checker can grant it.
    with pytest.raises(KeysvcRpcError) as caught:
        client.get("gpt-4-32k")
    assert caught.value.code == grpc.StatusCode.FAILED_PRECONDITION
    assert caught.value.reason == "NO_KEYS_FOR_FAMILY"
    assert caught.value.metadata["family"] == "gpt4-32k"


def test_empty_model_is_invalid_argument(client: KeysvcClient) -> None:
    with pytest.raises(KeysvcRpcError) as caught:
        client.get("")
    assert caught.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert caught.value.reason == "INVALID_ARGUMENT"


def test_reports_change_what_list_shows(client: KeysvcClient, server: LiveServer) -> None:
    lease = client.get("gpt-4o")
    client.update_rate_limits(
        lease.key.hash,
        {"X-RateLimit-Reset-Requests": "2s", "x-ratelimit-reset-tokens": "500ms", "Date": "x"},
    )
    client.increment_usage(lease.key.hash, "gpt-4o", 120)
    client.mark_rate_limited(lease.key.hash, "gpt-4o")
    keys = {k.hash: k for k in client.list()}
    assert set(keys) == {key_hash(s) for s in server.secrets}
    reported = keys[lease.key.hash]
    assert reported.rate_limit_requests_reset.ToTimedelta() == timedelta(seconds=2)
    assert reported.rate_limit_tokens_reset.ToTimedelta() == timedelta(milliseconds=500)
    assert reported.prompt_count == 1 and reported.token_usage["gpt4o"] == 120
    assert reported.rate_limited_until.ToDatetime() > reported.rate_limited_at.ToDatetime()


def test_lockout_period_once_every_key_is_busy(client: KeysvcClient, server: LiveServer) -> None:
    assert client.get_lockout_period("gpt-4o") == timedelta(0)
    for _ in server.secrets:
        client.get("gpt-4o")  # each Get locks its key for the 1 s reuse delay
    lockout = client.get_lockout_period("gpt-4o")
    assert timedelta(0) < lockout <= timedelta(seconds=1)


def test_a_per_call_deadline_is_honoured(client: KeysvcClient, server: LiveServer) -> None:
    for _ in server.secrets:
        client.get("gpt-4o")  # every key is throttled for 1 s ...
    started = time.monotonic()
    # ... so the server would wait for one, but the call's deadline comes first: the
    # deadline reaches the server, which ends the wait in time to answer (every key
    # still locked: KEYS_BUSY, as at the end of any wait).
    with pytest.raises(KeysvcRpcError) as caught:
        client.get("gpt-4o", max_wait=5, timeout=0.5)
    assert time.monotonic() - started < 0.5
    assert caught.value.reason == "KEYS_BUSY"
    assert caught.value.metadata["retry_after"].endswith("s")
    assert client.get("gpt-4o", timeout=5).secret  # the channel is still usable


@pytest.fixture
def silent_target() -> Iterator[str]:
    """A loopback listener that accepts connections and never answers."""
    listener = socket.create_server(("127.0.0.1", 0))
    held: list[socket.socket] = []
    stop = threading.Event()

    def accept() -> None:
        listener.settimeout(0.1)
        while not stop.is_set():
            try:
                held.append(listener.accept()[0])
            except TimeoutError:
                continue

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    try:
        yield f"127.0.0.1:{listener.getsockname()[1]}"
    finally:
        stop.set()
        thread.join()
        for conn in held:
            conn.close()
        listener.close()


def test_the_client_default_deadline_bounds_a_call_to_a_silent_server(silent_target: str) -> None:
    with KeysvcClient(silent_target, timeout=0.5) as client:
        start = time.monotonic()
        with pytest.raises(KeysvcRpcError) as caught:
            client.get("gpt-4o")
        elapsed = time.monotonic() - start
    assert caught.value.code == grpc.StatusCode.DEADLINE_EXCEEDED
    assert 0.4 < elapsed < 3


def test_token_is_never_in_repr(server: LiveServer) -> None:
    with KeysvcClient(server.target, token="s3cret-token") as client:
        assert "s3cret" not in repr(client)
        assert client.get("gpt-4o").secret  # the server ignores a token it does not check


async def test_async_client_has_the_same_behaviour(server: LiveServer) -> None:
    async with AsyncKeysvcClient(server.target) as client:
        secrets = await asyncio.gather(*(client.get("gpt-4o") for _ in server.secrets))
        assert sorted(s.secret for s in secrets) == sorted(server.secrets)
        key = await client.disable(secrets[0].key.hash)
        assert key.is_disabled
        for _ in range(4):
            assert (await client.get("gpt-4o")).key.hash != key.hash
        await client.update_rate_limits(key.hash, {"x-ratelimit-reset-requests": "1s"})
        await client.mark_rate_limited(key.hash)
        await client.increment_usage(key.hash, "gpt-4o", 7)
        assert len(await client.list()) == len(server.secrets)
        assert await client.available() == len(server.secrets) - 1
        assert isinstance(await client.get_lockout_period("gpt-4o"), timedelta)
        await client.recheck()
        with pytest.raises(KeysvcRpcError) as caught:
            await client.mark_rate_limited("oai-ffffffff")
        assert (caught.value.code, caught.value.reason) == (
            grpc.StatusCode.NOT_FOUND,
            "KEY_NOT_FOUND",
        )
        with pytest.raises(KeysvcRpcError) as caught:
            await client.get("gpt-4-32k")
        assert (caught.value.code, caught.value.reason) == (
            grpc.StatusCode.FAILED_PRECONDITION,
            "NO_KEYS_FOR_FAMILY",
        )


async def test_async_default_deadline_bounds_a_call_to_a_silent_server(
    silent_target: str,
) -> None:
    async with AsyncKeysvcClient(silent_target, timeout=0.5) as client:
        start = time.monotonic()
        with pytest.raises(KeysvcRpcError) as caught:
            await client.available()
        elapsed = time.monotonic() - start
    assert caught.value.code == grpc.StatusCode.DEADLINE_EXCEEDED
    assert 0.4 < elapsed < 3


def test_report_outcome_tells_the_proxy_what_to_do(
    client: KeysvcClient, server: LiveServer
) -> None:
    lease = client.get("gpt-4o")
    done = client.report_outcome(
        lease.key.hash,
        "gpt-4o",
        200,
        headers={"X-RateLimit-Remaining-Requests": "10", "Date": "x"},
        prompt_tokens=100,
        completion_tokens=20,
    )
    assert done.action == OUTCOME_ACTION_DONE
    assert done.key.token_usage["gpt4o"] == 120 and done.key.prompt_count == 1
    busy = client.report_outcome(
        lease.key.hash, "gpt-4o", 429, error={"type": "tokens", "code": "rate_limit_exceeded"}
    )
    assert busy.action == OUTCOME_ACTION_RETRY_WITH_ANOTHER_KEY
    assert not busy.key.is_disabled
    dead = client.report_outcome(lease.key.hash, "gpt-4o", 401)
    assert dead.action == OUTCOME_ACTION_RETRY_WITH_ANOTHER_KEY and dead.key.is_revoked
    assert client.available() == len(server.secrets) - 1
    other = client.get("gpt-4o")
    policy = client.report_outcome(
        other.key.hash, "gpt-4o", 400, error={"code": "content_policy_violation"}
    )
    assert policy.action == OUTCOME_ACTION_RETURN_ERROR and not policy.key.is_disabled


def test_rate_limit_state_is_per_family(client: KeysvcClient, server: LiveServer) -> None:
    lease = client.get("gpt-4o")
    client.update_rate_limits(
        lease.key.hash,
        {"x-ratelimit-remaining-requests": "0", "x-ratelimit-reset-requests": "9s"},
        model="gpt-4o",
    )
    (key,) = [k for k in client.list() if k.hash == lease.key.hash]
    (gpt4o,) = key.family_rate_limits
    assert gpt4o.family == "gpt4o" and gpt4o.remaining_requests == 0
    assert gpt4o.requests_reset.ToTimedelta() == timedelta(seconds=9)
    # Locked for gpt4o, but free for turbo: the upstream limits each model apart.
    turbo = [client.get("gpt-3.5-turbo").key.hash for _ in server.secrets]
    assert lease.key.hash in turbo


def test_get_with_max_wait_waits_for_a_key_to_unlock(
    client: KeysvcClient, server: LiveServer
) -> None:
    first = [client.get("gpt-4o").key.hash for _ in server.secrets][0]  # all throttled 1 s
    started = time.monotonic()
    lease = client.get("gpt-4o", max_wait=timedelta(seconds=5))
    waited = time.monotonic() - started
    assert lease.key.hash == first  # the first to unlock
    assert 0.5 < waited < 3, waited
    with pytest.raises(KeysvcRpcError) as caught:
        client.get("gpt-4o", max_wait=61)
    assert caught.value.code == grpc.StatusCode.INVALID_ARGUMENT
