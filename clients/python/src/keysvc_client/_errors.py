"""The one exception the clients raise: a failed call, with its gRPC code and ErrorInfo reason."""

from __future__ import annotations

from typing import Any, Protocol, cast

import grpc
from google.rpc import error_details_pb2
from grpc_status import rpc_status

__all__ = ["KeysvcRpcError", "from_rpc_error"]


class KeysvcRpcError(Exception):
    """A keysvc call failed.

    Attributes:
        code: the gRPC status code (``DEADLINE_EXCEEDED`` and ``UNAVAILABLE`` come from
            the transport, the others mostly from keysvc).
        reason: the ``google.rpc.ErrorInfo`` reason keysvc attached (``KEY_NOT_FOUND``,
            ``NO_KEYS_FOR_FAMILY``, ``FAMILY_DISALLOWED``, ``INVALID_ARGUMENT``, ...), or
            ``None`` when the status carries none. Branch on this, not on the message.
        domain: the ErrorInfo domain ("keysvc"), or ``None``.
        metadata: the ErrorInfo metadata (for example ``{"family": "gpt4"}``).
        message: the status message, for people.
    """

    def __init__(
        self,
        code: grpc.StatusCode,
        message: str,
        *,
        reason: str | None = None,
        domain: str | None = None,
        metadata: dict[str, str] | None = None,
    ) -> None:
        super().__init__(f"{code.name}: {message}" + (f" [{reason}]" if reason else ""))
        self.code = code
        self.message = message
        self.reason = reason
        self.domain = domain
        self.metadata: dict[str, str] = dict(metadata or {})


def from_rpc_error(error: grpc.RpcError) -> KeysvcRpcError:
    """Wraps a failed call: a sync ``grpc.RpcError`` (which is also a ``grpc.Call``) or a
    ``grpc.aio.AioRpcError``; both have ``code()``, ``details()`` and ``trailing_metadata()``."""
    call = cast(_FailedCall, error)
    code = call.code()
    reason = domain = None
    metadata: dict[str, str] = {}
    status = rpc_status.from_call(call)
    for detail in status.details if status is not None else ():
        info = error_details_pb2.ErrorInfo()
        if detail.Unpack(info):
            reason, domain, metadata = info.reason, info.domain, dict(info.metadata)
            break
    return KeysvcRpcError(
        code, call.details() or "", reason=reason, domain=domain, metadata=metadata
    )


class _FailedCall(Protocol):
    def code(self) -> grpc.StatusCode: ...
    def details(self) -> str | None: ...
    def trailing_metadata(self) -> Any: ...
