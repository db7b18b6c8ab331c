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

from .clock import Clock, SystemClock
from .config import Settings
from .errors import ERROR_DOMAIN, KeysvcError
from .events import PoolObserver
from .metrics import Metrics, RpcInterceptor
from .models import ModelTable
from .pool import KeyPool
from .service import KeyService
from .v1 import keysvc_pb2, keysvc_pb2_grpc
from .web import HttpServer, build_app, start_http

__all__ = [
    "SERVICE_NAME",
    "ErrorMappingInterceptor",
    "KeysvcServer",
    "create_server",
    "serve",
    "start_http_port",
]

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

    def serving(self, service: str = "") -> bool:
        """Whether gRPC health reports ``service`` ("" = the whole server) as SERVING.

        For /healthz and /readyz, which mirror gRPC health for HTTP-only load
        balancers. The aio HealthServicer keeps its statuses in a dict it does
        not expose; this reads it.
        """
        status = self.health._server_status.get(service)
        return bool(status == health_pb2.HealthCheckResponse.SERVING)

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
    metrics: Metrics | None = None,
) -> KeysvcServer:
    """Builds a server for ``pool`` bound to ``host:port`` (0 picks a free port).

    ``interceptors`` run inside the error mapping, after keysvc's own. The RPC
    observer (debug log line per call, and RPC metrics when ``metrics`` is
    given) runs outermost, so it records the status the caller gets.

    Raises:
        OSError: the address cannot be bound.
    """
    server = grpc.aio.server(
        interceptors=[RpcInterceptor(metrics), ErrorMappingInterceptor(), *interceptors]
    )
    keysvc_pb2_grpc.add_KeyServiceServicer_to_server(KeyService(pool), server)
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


async def start_http_port(
    running: KeysvcServer, pool: KeyPool, metrics: Metrics, *, host: str, port: int
) -> HttpServer:
    """Serves /metrics, the status page, /healthz and /readyz for ``running`` on ``host:port``.

    ``metrics`` must be ``pool``'s observer; this adds the gauges read from ``pool``.

    Raises:
        OSError: the address cannot be bound.
    """
    metrics.watch_pool(pool)
    app = build_app(
        pool,
        metrics.registry,
        live=running.serving,
        ready=lambda: running.serving(SERVICE_NAME),
    )
    return await start_http(app, host=host, port=port)


def build_pool(
    settings: Settings, clock: Clock, *, observer: PoolObserver | None = None
) -> KeyPool:
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
        observer=observer,
    )


async def serve(settings: Settings, *, clock: Clock | None = None) -> None:
    """Runs keysvc until SIGTERM or SIGINT, then drains and returns."""
    metrics = Metrics() if settings.metrics_port is not None else None
    pool = build_pool(settings, clock or SystemClock(), observer=metrics)
    if len(pool) == 0:
        _log.warning("OPENAI_KEY is not set; serving an empty pool, every Get will fail")
    else:
        _log.info("loaded keys", extra={"keys": len(pool)})
    if settings.check_keys:
        _log.warning("key checking is not available yet; keys are used as loaded")
    running = create_server(pool, host=settings.host, port=settings.port, metrics=metrics)
    http: HttpServer | None = None
    if metrics is not None and settings.metrics_port is not None:
        http = await start_http_port(
            running, pool, metrics, host=settings.metrics_host, port=settings.metrics_port
        )
        _log.info(
            "serving metrics and status page",
            extra={"address": _address(settings.metrics_host, http.port)},
        )
    await running.start()
    _log.info("serving", extra={"address": _address(settings.host, running.port)})

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    try:
        await stop.wait()
        _log.info("shutting down", extra={"grace_seconds": settings.shutdown_grace})
    finally:
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(signum)
        # Stopped last, so /readyz answers 503 while in-flight calls drain.
        await running.shutdown(settings.shutdown_grace)
        if http is not None:
            await http.stop()
    _log.info("stopped")
