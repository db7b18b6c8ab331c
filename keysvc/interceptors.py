"""The shared shape of keysvc's server interceptors.

Each of them (error mapping, drain, auth, RPC metrics) wraps the unary-unary
behaviour of the methods it applies to. ``UnaryInterceptor`` does the gRPC side
once: it builds the wrapped handler once per method and reuses it for as long as
the inner behaviour is the same object.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any, cast

import grpc

__all__ = ["Behavior", "UnaryInterceptor", "wrap_unary"]

#: A unary-unary method's behaviour: (request, context) → response.
Behavior = Callable[[Any, grpc.aio.ServicerContext[Any, Any]], Awaitable[Any]]


def wrap_unary(
    handler: grpc.RpcMethodHandler[Any, Any], wrap: Callable[[Behavior], Behavior]
) -> grpc.RpcMethodHandler[Any, Any]:
    """A copy of a unary-unary ``handler`` whose behaviour is ``wrap(behaviour)``."""
    assert handler.unary_unary is not None
    return grpc.unary_unary_rpc_method_handler(
        wrap(cast(Behavior, handler.unary_unary)),
        request_deserializer=handler.request_deserializer,
        response_serializer=handler.response_serializer,
    )


class UnaryInterceptor(grpc.aio.ServerInterceptor):
    """Wraps the behaviour of every unary-unary method that ``applies_to`` accepts."""

    def __init__(self) -> None:
        # method → (inner behaviour, wrapped handler). Reused only for the very
        # same inner behaviour: an inner interceptor may hand out a new one per call.
        self._wrapped: dict[str, tuple[Behavior, grpc.RpcMethodHandler[Any, Any]]] = {}

    def applies_to(self, method: str) -> bool:
        """Whether to wrap ``method`` (a full name, ``/package.Service/Method``)."""
        return True

    def wrap(self, method: str, behavior: Behavior) -> Behavior:
        """The behaviour to run instead of ``behavior`` for ``method``."""
        raise NotImplementedError

    async def intercept_service(
        self,
        continuation: Callable[
            [grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler[Any, Any] | None]
        ],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler[Any, Any] | None:
        handler = await continuation(handler_call_details)
        method: str = handler_call_details.method
        if handler is None or handler.unary_unary is None or not self.applies_to(method):
            return handler
        behavior = cast(Behavior, handler.unary_unary)
        cached = self._wrapped.get(method)
        if cached is not None and cached[0] is behavior:
            return cached[1]
        wrapped = wrap_unary(handler, lambda inner: self.wrap(method, inner))
        self._wrapped[method] = (behavior, wrapped)
        return wrapped
