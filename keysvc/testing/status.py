"""What a failed call says about itself, for tests, benchmarks and example clients."""

from __future__ import annotations

import grpc
from google.rpc import error_details_pb2
from grpc_status import rpc_status

__all__ = ["error_reason"]


def error_reason(error: grpc.aio.AioRpcError | grpc.RpcError) -> str | None:
    """The google.rpc.ErrorInfo reason a failed call carries (``KEYS_BUSY``,
    ``OVERLOADED``, ...), or None without one."""
    status = rpc_status.from_call(error)
    if status is None:
        return None
    for detail in status.details:
        info = error_details_pb2.ErrorInfo()
        if detail.Unpack(info):
            return str(info.reason)
    return None
