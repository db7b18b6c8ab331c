"""The gRPC server: KeyService plus health and reflection on one grpc.aio server.

Building a server (``create_server``) is separate from running one until a
signal (``serve``), so tests build servers on port 0 and stop them themselves.
"""

from __future__ import annotations

import asyncio
import logging
import signal
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any, cast

import grpc
from google.protobuf import any_pb2
from google.rpc import error_details_pb2, status_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1.health import aio as health_aio
from grpc_reflection.v1alpha import reflection
from grpc_status import rpc_status

from .checker import CheckerConfig, KeyChecker
from .clock import Clock, SystemClock
from .config import Settings
from .errors import ERROR_DOMAIN, KeysvcError
from .models import ModelTable
from .pool import KeyPool
from .service import KeyService, Rechecker
from .v1 import keysvc_pb2, keysvc_pb2_grpc

__all__ = ["SERVICE_NAME", "ErrorMappingInterceptor", "KeysvcServer", "create_server", "serve"]

SERVICE_NAME: str = keysvc_pb2.DESCRIPTOR.services_by_name["KeyService"].full_name

_log = logging.getLogger("keysvc.server")

_Behavior = Callable[[Any, grpc.aio.ServicerContext[Any, Any]], Awaitable[Any]]


async def _abort(context: grpc.aio.ServicerContext[Any, Any], error: KeysvcError) -> None:
    """Ends the call with the error's status and a google.rpc.ErrorInfo detail."""
    code = grpc.StatusCode[error.code]
    detail = any_pb2.Any()
    detail.Pack(
        error_details_pb2.ErrorInfo(
            reason=error.reason, domain=ERROR_DOMAIN, metadata=error.metadata
        )
    )
    status = rpc_status.to_status(
        status_pb2.Status(code=code.value[0], message=error.message, details=[detail])
    )
    await context.abort(status.code, status.details, status.trailing_metadata)


class ErrorMappingInterceptor(grpc.aio.ServerInterceptor):
    """The one place keysvc errors become gRPC statuses.

    ``KeysvcError`` → its code, message and ErrorInfo reason. Anything else →
    INTERNAL with a generic message and the traceback in the log, so a caller
    never sees UNKNOWN nor an internal detail.
    """

    def __init__(self) -> None:
        self._wrapped: dict[str, grpc.RpcMethodHandler[Any, Any]] = {}

    async def intercept_service(
        self,
        continuation: Callable[
            [grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler[Any, Any] | None]
        ],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler[Any, Any] | None:
        handler = await continuation(handler_call_details)
        if handler is None or handler.unary_unary is None:
            return handler
        method: str = handler_call_details.method
        wrapped = self._wrapped.get(method)
        if wrapped is None:
            wrapped = self._wrapped[method] = grpc.unary_unary_rpc_method_handler(
                _guard(method, cast(_Behavior, handler.unary_unary)),
                request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer,
            )
        return wrapped


def _guard(method: str, behavior: _Behavior) -> _Behavior:
    async def guarded(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
        try:
            return await behavior(request, context)
        except grpc.aio.AbortError:
            raise
        except KeysvcError as error:
            await _abort(context, error)
        except Exception:
            _log.exception("unexpected error", extra={"method": method})
            await _abort(context, KeysvcError("internal error"))

    return guarded


@dataclass(slots=True)
class KeysvcServer:
    """A built, not yet started, keysvc server."""

    server: grpc.aio.Server
    port: int
    health: health_aio.HealthServicer

    async def start(self) -> None:
        await self.server.start()
        await self.health.set(SERVICE_NAME, health_pb2.HealthCheckResponse.SERVING)

    async def shutdown(self, grace: float) -> None:
        """Reports NOT_SERVING, refuses new calls, gives in-flight calls ``grace`` seconds."""
        await self.health.enter_graceful_shutdown()
        await self.server.stop(grace)


def _address(host: str, port: int) -> str:
    if ":" in host and not host.startswith("["):
        host = f"[{host}]"
    return f"{host}:{port}"


def create_server(
    pool: KeyPool,
    *,
    host: str = "127.0.0.1",
    port: int = 0,
    interceptors: Sequence[grpc.aio.ServerInterceptor] = (),
    checker: Rechecker | None = None,
) -> KeysvcServer:
    """Builds a server for ``pool`` bound to ``host:port`` (0 picks a free port).

    ``interceptors`` run inside the error mapping, after keysvc's own. With a
    ``checker``, Recheck goes through it (and wakes it).

    Raises:
        OSError: the address cannot be bound.
    """
    # Without this, gRPC sets SO_REUSEPORT and a second keysvc on the same port
    # would silently share it instead of failing to start.
    options = [("grpc.so_reuseport", 0)]
    server = grpc.aio.server(
        interceptors=[ErrorMappingInterceptor(), *interceptors], options=options
    )
    keysvc_pb2_grpc.add_KeyServiceServicer_to_server(KeyService(pool, checker), server)
    health = health_aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health, server)
    reflection.enable_server_reflection(
        (
            SERVICE_NAME,
            health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
            reflection.SERVICE_NAME,
        ),
        server,
    )
    address = _address(host, port)
    try:
        bound = server.add_insecure_port(address)
    except RuntimeError as exc:
        raise OSError(f"cannot listen on {address}: {exc}") from exc
    if bound == 0:
        raise OSError(f"cannot listen on {address}")
    return KeysvcServer(server=server, port=bound, health=health)


def build_pool(settings: Settings, clock: Clock) -> KeyPool:
    """The pool the settings describe, with the keys of OPENAI_KEY loaded unchecked."""
    models = (
        ModelTable.from_file(settings.model_families_file)
        if settings.model_families_file
        else ModelTable()
    )
    if settings.allowed_families is not None:
        unknown = settings.allowed_families - set(models.families)
        if unknown:
            _log.warning(
                "ALLOWED_MODEL_FAMILIES names families no model maps to",
                extra={"families": ",".join(sorted(unknown))},
            )
    return KeyPool.from_secrets(
        settings.openai_keys,
        models=models,
        clock=clock,
        allowed_families=settings.allowed_families,
    )


async def serve(settings: Settings, *, clock: Clock | None = None) -> None:
    """Runs keysvc until SIGTERM or SIGINT, then drains and returns."""
    clock = clock or SystemClock()
    pool = build_pool(settings, clock)
    if len(pool) == 0:
        _log.warning("OPENAI_KEY is not set; serving an empty pool, every Get will fail")
    else:
        _log.info("loaded keys", extra={"keys": len(pool)})
    checker = build_checker(settings, pool, clock) if settings.check_keys else None
    try:
        running = create_server(pool, host=settings.host, port=settings.port, checker=checker)
    except BaseException:
        if checker is not None:
            await checker.aclose()
        raise
    # Handlers go in before "serving" is logged: a supervisor may signal right after.
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    checking: asyncio.Task[None] | None = None
    try:
        await running.start()
        _log.info("serving", extra={"address": _address(settings.host, running.port)})
        if checker is not None:
            checking = asyncio.create_task(checker.run(), name="key-checker")
            checking.add_done_callback(_report_checker_end)
        else:
            _log.info("key checking is off (CHECK_KEYS=false); keys are used as loaded")
        await stop.wait()
        _log.info("shutting down", extra={"grace_seconds": settings.shutdown_grace})
    finally:
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(signum)
        if checking is not None:
            checking.cancel()  # a check in flight is abandoned; it changed nothing yet
            await asyncio.wait([checking])
        await running.shutdown(settings.shutdown_grace)
    _log.info("stopped")


def build_checker(settings: Settings, pool: KeyPool, clock: Clock) -> KeyChecker:
    """The key checker the settings describe, over ``pool``."""
    return KeyChecker(
        pool,
        clock=clock,
        config=CheckerConfig(
            base_url=settings.openai_base_url,
            timeout=settings.check_timeout,
            check_interval=settings.check_interval,
            recheck_interval=settings.recheck_interval,
        ),
    )


def _report_checker_end(task: asyncio.Task[None]) -> None:
    if not task.cancelled() and task.exception() is not None:
        _log.error("key checker stopped on an error", exc_info=task.exception())
