"""List pages through the Python clients, against a server whose page size is 2."""

from __future__ import annotations

import grpc
import pytest
from keysvc_client import (
    KEY_STATE_AVAILABLE,
    KEY_STATE_DISABLED,
    KEY_STATE_LOCKED,
    AsyncKeysvcClient,
    KeysvcClient,
    KeysvcRpcError,
)

from .conftest import LiveServer, key_hash


def test_one_page_then_the_next(paged_server: LiveServer) -> None:
    with KeysvcClient(paged_server.target) as client:
        first = client.list_page()
        assert len(first.keys) == 2 and first.next_page_token
        second = client.list_page(page_token=first.next_page_token, page_size=1)
        assert len(second.keys) == 1
        assert second.keys[0].hash not in {k.hash for k in first.keys}


def test_list_and_iter_keys_page_through_every_key(paged_server: LiveServer) -> None:
    expected = [key_hash(s) for s in paged_server.secrets]
    with KeysvcClient(paged_server.target) as client:
        assert [k.hash for k in client.list()] == expected
        assert [k.hash for k in client.iter_keys(page_size=3)] == expected
        lease = client.get("gpt-4o")
        client.disable(expected[4])
        assert [k.hash for k in client.list(state=KEY_STATE_DISABLED)] == [expected[4]]
        assert [k.hash for k in client.list(state=KEY_STATE_LOCKED)] == [lease.key.hash]
        assert len(client.list(state=KEY_STATE_AVAILABLE)) == len(expected) - 1


def test_a_bad_token_is_invalid_argument(paged_server: LiveServer) -> None:
    with KeysvcClient(paged_server.target) as client:
        with pytest.raises(KeysvcRpcError) as caught:
            client.list_page(page_token="not-a-token")
    assert caught.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert caught.value.reason == "INVALID_ARGUMENT"


async def test_async_client_pages_the_same(paged_server: LiveServer) -> None:
    expected = [key_hash(s) for s in paged_server.secrets]
    async with AsyncKeysvcClient(paged_server.target) as client:
        assert [k.hash for k in await client.list()] == expected
        assert [k.hash async for k in client.iter_keys(page_size=3)] == expected
        first = await client.list_page(page_size=5)
        assert len(first.keys) == 2  # the server's maximum
        with pytest.raises(KeysvcRpcError) as caught:
            await client.list_page(page_size=-1)
        assert caught.value.code == grpc.StatusCode.INVALID_ARGUMENT
