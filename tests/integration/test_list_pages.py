"""List pages through a real server: sizes, tokens, filters, bad input."""

from __future__ import annotations

from collections.abc import AsyncIterator

import grpc
import pytest

from keysvc.keys import DisableReason
from keysvc.pool import KeyPool
from keysvc.v1 import keysvc_pb2 as pb
from keysvc.v1 import keysvc_pb2_grpc
from tests.helpers import client, error_reason, make_pool, serving

SECRETS = [f"sk-page-{n:04d}" for n in range(25)]


@pytest.fixture
async def pool_and_stub() -> AsyncIterator[tuple[KeyPool, keysvc_pb2_grpc.KeyServiceStub]]:
    pool, _ = make_pool(SECRETS)
    async with serving(pool, list_max_page_size=10) as server:
        async with client(server.port) as stub:
            yield pool, stub


async def all_pages(stub: keysvc_pb2_grpc.KeyServiceStub, **request: int) -> list[list[str]]:
    pages = []
    token = ""
    while True:
        reply = await stub.List(pb.ListRequest(page_token=token, **request))
        pages.append([k.hash for k in reply.keys])
        token = reply.next_page_token
        if not token:
            return pages


async def test_no_page_size_is_the_server_maximum_and_pages_cover_the_pool(
    pool_and_stub: tuple[KeyPool, keysvc_pb2_grpc.KeyServiceStub],
) -> None:
    pool, stub = pool_and_stub
    first = await stub.List(pb.ListRequest())
    assert len(first.keys) == 10 and first.next_page_token
    pages = await all_pages(stub)
    assert [len(p) for p in pages] == [10, 10, 5]
    assert sum(pages, []) == [k.hash for k in pool.keys()]
    assert [len(p) for p in await all_pages(stub, page_size=4)] == [4, 4, 4, 4, 4, 4, 1]
    assert [len(p) for p in await all_pages(stub, page_size=500)] == [10, 10, 5]


async def test_a_small_pool_comes_back_whole_in_one_page() -> None:
    pool, _ = make_pool(SECRETS[:3])
    async with serving(pool) as server, client(server.port) as stub:
        reply = await stub.List(pb.ListRequest())
    assert len(reply.keys) == 3
    assert reply.next_page_token == ""


async def test_keys_added_and_removed_while_paging(
    pool_and_stub: tuple[KeyPool, keysvc_pb2_grpc.KeyServiceStub],
) -> None:
    pool, stub = pool_and_stub
    keys = pool.keys()
    first = await stub.List(pb.ListRequest(page_size=5))
    pool.remove_key(keys[0].hash)
    pool.remove_key(keys[7].hash)
    late = pool.add_key("sk-page-late")
    assert late is not None
    hashes = [k.hash for k in first.keys]
    token = first.next_page_token
    while token:
        reply = await stub.List(pb.ListRequest(page_size=5, page_token=token))
        hashes.extend(k.hash for k in reply.keys)
        token = reply.next_page_token
    expected = [k.hash for k in keys[:5]] + [k.hash for k in keys[5:] if k is not keys[7]]
    assert hashes == [*expected, late.hash]


async def test_state_filter(pool_and_stub: tuple[KeyPool, keysvc_pb2_grpc.KeyServiceStub]) -> None:
    pool, stub = pool_and_stub
    keys = pool.keys()
    for k in keys[3:6]:
        pool.disable(k.hash, DisableReason.REVOKED)
    handed = pool.get("gpt-4o")
    disabled = {k.hash for k in keys[3:6]}

    async def listed(state: pb.KeyState.ValueType) -> set[str]:
        return {h for page in await all_pages(stub, state=state, page_size=2) for h in page}

    everyone = {k.hash for k in keys}
    assert await listed(pb.KEY_STATE_DISABLED) == disabled
    assert await listed(pb.KEY_STATE_AVAILABLE) == everyone - disabled
    assert await listed(pb.KEY_STATE_LOCKED) == {handed.hash}
    assert await listed(pb.KEY_STATE_ACTIVE) == everyone - disabled - {handed.hash}
    assert await listed(pb.KEY_STATE_UNSPECIFIED) == everyone


@pytest.mark.parametrize(
    ("request_message", "field"),
    [
        (pb.ListRequest(page_size=-1), "page_size"),
        (pb.ListRequest(page_token="garbage"), "page_token"),
        (pb.ListRequest(state=99), "state"),  # type: ignore[arg-type]
    ],
)
async def test_bad_requests_are_invalid_argument(
    pool_and_stub: tuple[KeyPool, keysvc_pb2_grpc.KeyServiceStub],
    request_message: pb.ListRequest,
    field: str,
) -> None:
    _, stub = pool_and_stub
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stub.List(request_message)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert error_reason(caught.value) == "INVALID_ARGUMENT"
    assert (caught.value.details() or "").startswith(f"{field}:")


async def test_a_token_is_for_its_own_filter_and_server_run(
    pool_and_stub: tuple[KeyPool, keysvc_pb2_grpc.KeyServiceStub],
) -> None:
    _, stub = pool_and_stub
    token = (await stub.List(pb.ListRequest(page_size=2))).next_page_token
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stub.List(pb.ListRequest(page_token=token, state=pb.KEY_STATE_DISABLED))
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    other, _ = make_pool(SECRETS)  # another pool: as after a restart
    async with serving(other) as server, client(server.port) as other_stub:
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await other_stub.List(pb.ListRequest(page_token=token))
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "restarted" in (caught.value.details() or "")
