"""Reflection as third-party tools use it: method symbols, and v1 beside v1alpha.

grpcurl and ghz themselves are run against a live server in
clients/python/tests (test_grpcurl.py, test_ghz.py).
"""

from __future__ import annotations

from collections.abc import AsyncIterator

import grpc
import pytest
from google.protobuf import descriptor_pb2
from grpc_reflection.v1alpha import reflection_pb2

from keysvc.reflection import V1_SERVICE_NAME, V1ALPHA_SERVICE_NAME
from keysvc.server import SERVICE_NAME
from tests.helpers import make_pool, serving

Request = reflection_pb2.ServerReflectionRequest
Response = reflection_pb2.ServerReflectionResponse


@pytest.fixture
async def channel() -> AsyncIterator[grpc.aio.Channel]:
    pool, _ = make_pool(["sk-reflect-0001"])
    async with serving(pool) as server:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as open_channel:
            yield open_channel


async def ask(channel: grpc.aio.Channel, service: str, request: Request) -> Response:
    """One request on the reflection stream of ``service`` (v1 or v1alpha: the same messages)."""
    call = channel.stream_stream(
        f"/{service}/ServerReflectionInfo",
        request_serializer=Request.SerializeToString,
        response_deserializer=Response.FromString,
    )()
    await call.write(request)
    await call.done_writing()
    response = await call.read()
    assert isinstance(response, Response)
    return response


def file_names(response: Response) -> set[str]:
    names = set()
    for raw in response.file_descriptor_response.file_descriptor_proto:
        names.add(descriptor_pb2.FileDescriptorProto.FromString(raw).name)
    return names


@pytest.mark.parametrize("service", [V1_SERVICE_NAME, V1ALPHA_SERVICE_NAME])
async def test_both_versions_list_every_service(channel: grpc.aio.Channel, service: str) -> None:
    listed = await ask(channel, service, Request(list_services=""))
    names = {s.name for s in listed.list_services_response.service}
    assert names == {
        SERVICE_NAME,
        "envoy.service.ext_proc.v3.ExternalProcessor",
        "grpc.health.v1.Health",
        V1_SERVICE_NAME,
        V1ALPHA_SERVICE_NAME,
    }


@pytest.mark.parametrize("service", [V1_SERVICE_NAME, V1ALPHA_SERVICE_NAME])
@pytest.mark.parametrize(
    ("symbol", "file"),
    [
        ("keysvc.v1.KeyService.Get", "keysvc/v1/keysvc.proto"),
        ("keysvc.v1.KeyService.List", "keysvc/v1/keysvc.proto"),
        ("grpc.health.v1.Health.Check", "grpc_health/v1/health.proto"),
        ("grpc.reflection.v1.ServerReflection", "grpc/reflection/v1/reflection.proto"),
        (
            "grpc.reflection.v1.ServerReflection.ServerReflectionInfo",
            "grpc/reflection/v1/reflection.proto",
        ),
        ("keysvc.v1.KeyService", "keysvc/v1/keysvc.proto"),
        ("keysvc.v1.Key.hash", "keysvc/v1/keysvc.proto"),
    ],
)
async def test_symbols_resolve_to_their_file(
    channel: grpc.aio.Channel, service: str, symbol: str, file: str
) -> None:
    found = await ask(channel, service, Request(file_containing_symbol=symbol))
    assert not found.HasField("error_response"), found.error_response
    assert file in file_names(found)


@pytest.mark.parametrize(
    "symbol", ["keysvc.v1.KeyService.Nope", "keysvc.v1.Nope.Get", "Get", "", "keysvc.v1.Key.x.y"]
)
async def test_unknown_symbols_are_not_found(channel: grpc.aio.Channel, symbol: str) -> None:
    found = await ask(channel, V1_SERVICE_NAME, Request(file_containing_symbol=symbol))
    assert found.error_response.error_code == grpc.StatusCode.NOT_FOUND.value[0]


async def test_v1_descriptor_is_v1alpha_renamed(channel: grpc.aio.Channel) -> None:
    found = await ask(
        channel, V1_SERVICE_NAME, Request(file_by_filename="grpc/reflection/v1/reflection.proto")
    )
    (raw,) = found.file_descriptor_response.file_descriptor_proto
    v1 = descriptor_pb2.FileDescriptorProto.FromString(raw)
    assert v1.package == "grpc.reflection.v1"
    method = v1.service[0].method[0]
    assert (method.input_type, method.output_type) == (
        ".grpc.reflection.v1.ServerReflectionRequest",
        ".grpc.reflection.v1.ServerReflectionResponse",
    )
    alpha = descriptor_pb2.FileDescriptorProto()
    reflection_pb2.DESCRIPTOR.CopyToProto(alpha)
    # Same messages, field for field, so v1alpha's (de)serializers serve v1 correctly.
    for new, old in zip(v1.message_type, alpha.message_type, strict=True):
        assert new.name == old.name
        assert [(f.name, f.number, f.type) for f in new.field] == [
            (f.name, f.number, f.type) for f in old.field
        ]
        for f in new.field:
            assert not f.type_name or f.type_name.startswith(".grpc.reflection.v1.")
