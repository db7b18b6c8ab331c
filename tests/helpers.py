"""Shared test helpers: a pool with a manual clock, a live server on a free port."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Sequence
from typing import Any

import grpc
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from keysvc.clock import ManualClock
from keysvc.models import ModelTable
from keysvc.pool import KeyPool
from keysvc.server import KeysvcServer, create_server
from keysvc.v1 import keysvc_pb2_grpc


def make_pool(
    secrets: Sequence[str],
    clock: ManualClock | None = None,
    *,
    allowed_families: frozenset[str] | None = None,
) -> tuple[KeyPool, ManualClock]:
    clock = clock or ManualClock()
    pool = KeyPool.from_secrets(
        secrets, models=ModelTable(), clock=clock, allowed_families=allowed_families
    )
    return pool, clock


@contextlib.asynccontextmanager
async def serving(
    pool: KeyPool,
    interceptors: Sequence[grpc.aio.ServerInterceptor] = (),
    **options: Any,
) -> AsyncIterator[KeysvcServer]:
    """A started keysvc server on a free loopback port; stopped on exit.

    ``options`` go to ``create_server`` (tokens, tls, ...).
    """
    server = create_server(pool, host="127.0.0.1", port=0, interceptors=interceptors, **options)
    await server.start()
    try:
        yield server
    finally:
        await server.shutdown(grace=0)


@contextlib.asynccontextmanager
async def client(port: int) -> AsyncIterator[keysvc_pb2_grpc.KeyServiceStub]:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        yield keysvc_pb2_grpc.KeyServiceStub(channel)


def error_reason(error: grpc.aio.AioRpcError) -> str | None:
    """The google.rpc.ErrorInfo reason carried by a failed call, if any."""
    status = rpc_status.from_call(error)  # type: ignore[arg-type]
    if status is None:
        return None
    for detail in status.details:
        info = error_details_pb2.ErrorInfo()
        if detail.Unpack(info):
            return info.reason
    return None
