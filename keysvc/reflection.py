"""Server reflection that grpcurl, ghz and other third-party tools can use.

grpcio-reflection (1.85) serves only ``grpc.reflection.v1alpha`` and looks a
symbol up with ``DescriptorPool.FindFileContainingSymbol``, which in the upb
protobuf runtime does not know method names: ``grpcurl describe
keysvc.v1.KeyService.Get`` and ``ghz --call keysvc.v1.KeyService/Get`` both
ended in "Symbol not found". Two small additions on top of the library:

- a method symbol (``Service.Method``) resolves to its service's file;
- the same servicer answers ``grpc.reflection.v1.ServerReflection`` too, which
  newer tools ask first. v1 is v1alpha under a new package name with the same
  messages field for field, so the v1alpha (de)serializers serve it, and a
  copy of v1alpha's file descriptor renamed to v1 goes into the descriptor
  pool so reflection can describe v1 itself.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, Final

import grpc
from google.protobuf import descriptor_pb2, descriptor_pool
from grpc_reflection.v1alpha import reflection, reflection_pb2

__all__ = ["V1ALPHA_SERVICE_NAME", "V1_SERVICE_NAME", "enable_reflection"]

V1ALPHA_SERVICE_NAME: Final[str] = reflection.SERVICE_NAME
V1_SERVICE_NAME: Final = "grpc.reflection.v1.ServerReflection"
_V1ALPHA_PACKAGE: Final = "grpc.reflection.v1alpha"
_V1_PACKAGE: Final = "grpc.reflection.v1"
_V1_FILE: Final = "grpc/reflection/v1/reflection.proto"


class _ReflectionServicer(reflection.aio.ReflectionServicer):  # type: ignore[misc]
    """The library's servicer, resolving method names as well."""

    def _file_containing_symbol(self, request: Any, fully_qualified_name: str) -> Any:
        response = super()._file_containing_symbol(request, fully_qualified_name)
        if not response.HasField("error_response"):
            return response
        service_name, _, method = fully_qualified_name.rpartition(".")
        try:
            service = self._pool.FindServiceByName(service_name)
        except KeyError:
            return response
        if method not in service.methods_by_name:
            return response
        return super()._file_containing_symbol(request, service_name)


def _register_v1(pool: descriptor_pool.DescriptorPool) -> None:
    """Adds grpc/reflection/v1/reflection.proto to ``pool``, made from v1alpha's, once."""
    try:
        pool.FindFileByName(_V1_FILE)
        return
    except KeyError:
        pass
    proto = descriptor_pb2.FileDescriptorProto()
    reflection_pb2.DESCRIPTOR.CopyToProto(proto)
    proto.name = _V1_FILE
    proto.package = _V1_PACKAGE
    proto.ClearField("options")  # v1alpha's Java/Objective-C names; not part of the wire

    def renamed(type_name: str) -> str:
        prefix = f".{_V1ALPHA_PACKAGE}."
        return (
            f".{_V1_PACKAGE}.{type_name[len(prefix) :]}"
            if type_name.startswith(prefix)
            else type_name
        )

    # reflection.proto has no nested messages: its top-level messages are all there is.
    for message in proto.message_type:
        for message_field in message.field:
            if message_field.HasField("type_name"):  # set only where v1alpha has one
                message_field.type_name = renamed(message_field.type_name)
    for service in proto.service:
        for method in service.method:
            method.input_type = renamed(method.input_type)
            method.output_type = renamed(method.output_type)
    pool.Add(proto)


def enable_reflection(service_names: Iterable[str], server: grpc.aio.Server) -> None:
    """Serves reflection v1 and v1alpha on ``server``, listing ``service_names`` and both."""
    pool = descriptor_pool.Default()
    _register_v1(pool)
    names = (*service_names, V1_SERVICE_NAME, V1ALPHA_SERVICE_NAME)
    servicer = _ReflectionServicer(names, pool=pool)
    handler = grpc.stream_stream_rpc_method_handler(
        servicer.ServerReflectionInfo,
        request_deserializer=reflection_pb2.ServerReflectionRequest.FromString,
        response_serializer=reflection_pb2.ServerReflectionResponse.SerializeToString,
    )
    server.add_generic_rpc_handlers(
        [
            grpc.method_handlers_generic_handler(
                V1_SERVICE_NAME, {"ServerReflectionInfo": handler}
            ),
            grpc.method_handlers_generic_handler(
                V1ALPHA_SERVICE_NAME, {"ServerReflectionInfo": handler}
            ),
        ]
    )
