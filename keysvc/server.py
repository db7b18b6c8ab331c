"""The gRPC server: KeyService plus health and reflection on one grpc.aio server.

Building a server (``create_server``) is separate from running one until a
signal (``serve``), so tests build servers on port 0 and stop them themselves.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import math
import os
import signal
import socket
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import grpc
from google.protobuf import any_pb2
from google.rpc import error_details_pb2, status_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1.health import aio as health_aio
from grpc_status import rpc_status
from redis.asyncio import Redis

from .auth import SERVICE_PREFIX, AuthInterceptor, AuthTokens
from .checker import CheckerConfig, KeyChecker
from .clock import Clock, SystemClock
from .config import UNKNOWN_MODELS_REJECT, Settings, is_loopback
from .errors import (
    ERROR_DOMAIN,
    KeysvcError,
    ShuttingDown,
    StateWriteFailed,
    StoreUnavailable,
)
from .events import PoolObserver
from .ext_proc import EXT_PROC_SERVICE_NAME, ExtProcService, add_ext_proc_service
from .interceptors import Behavior, UnaryInterceptor
from .listing import DEFAULT_MAX_PAGE_SIZE
from .metrics import Metrics, RpcInterceptor
from .models import ModelTable
from .overload import (
    DEFAULT_MAX_IN_FLIGHT,
    DEFAULT_MAX_IN_FLIGHT_LISTS,
    ConnectionLimits,
    InFlightLimit,
    connection_options,
    raise_open_files_limit,
)
from .pool import KeyPool, Limits, MemoryBackend, PoolBackend, as_backend
from .pool.redis import RedisBackend
from .reflection import enable_reflection
from .reload import KeysFileWatcher, read_keys_file
from .service import KeyService, Rechecker
from .state import SqliteStateStore, StateFileError
from .status import KeyCensus, SnapshotFeed, SnapshotSource, TakenSnapshots
from .store import KeyStore, MemoryKeyStore
from .tls import TlsConfig
from .v1 import keysvc_pb2, keysvc_pb2_grpc
from .web import (
    PAGE_KEYS,
    SNAPSHOT_MAX_AGE,
    HttpServer,
    ViewPacer,
    build_app,
    page_snapshots,
    start_http,
)

__all__ = [
    "SERVICE_NAME",
    "DrainInterceptor",
    "ErrorMappingInterceptor",
    "KeysvcServer",
    "create_server",
    "serve",
    "start_http_port",
]

SERVICE_NAME: str = keysvc_pb2.DESCRIPTOR.services_by_name["KeyService"].full_name

_log = logging.getLogger("keysvc.server")

#: Seconds between the checks that Redis answers (health follows within twice this).
REDIS_PING_INTERVAL = 0.5
#: The key checker's lease among replicas: a dead holder's checks resume elsewhere
#: within this many seconds.
CHECKER_LEASE = 10.0
#: How often the sweeper lease's holder removes the keys no replica holds any more from
#: a shared pool (RedisBackend.sweep): a walk over the pool in batches.
SWEEP_INTERVAL = 600.0


async def _abort(context: grpc.aio.ServicerContext[Any, Any], error: KeysvcError) -> None:
    """Ends the call with the error's status, a google.rpc.ErrorInfo detail and, when
    the error says when to retry, a google.rpc.RetryInfo detail."""
    code = grpc.StatusCode[error.code]
    detail = any_pb2.Any()
    detail.Pack(
        error_details_pb2.ErrorInfo(
            reason=error.reason, domain=ERROR_DOMAIN, metadata=error.metadata
        )
    )
    details = [detail]
    if error.retry_delay is not None:
        retry = error_details_pb2.RetryInfo()
        retry.retry_delay.FromNanoseconds(max(0, round(error.retry_delay * 1e9)))
        details.append(any_pb2.Any())
        details[-1].Pack(retry)
    status = rpc_status.to_status(
        status_pb2.Status(code=code.value[0], message=error.message, details=details)
    )
    await context.abort(status.code, status.details, status.trailing_metadata)


class ErrorMappingInterceptor(UnaryInterceptor):
    """The one place keysvc errors become gRPC statuses.

    ``KeysvcError`` → its code, message and ErrorInfo reason. Anything else →
    INTERNAL with a generic message and the traceback in the log, so a caller
    never sees UNKNOWN nor an internal detail.
    """

    def wrap(self, method: str, behavior: Behavior) -> Behavior:
        return _guard(method, behavior)


def _guard(method: str, behavior: Behavior) -> Behavior:
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


class DrainInterceptor(UnaryInterceptor):
    """Counts KeyService calls in flight and, once draining, refuses new ones.

    Health and reflection stay answerable while draining, so probes see
    NOT_SERVING instead of a closed port.
    """

    def __init__(self) -> None:
        super().__init__()
        self._in_flight = 0
        self._idle = asyncio.Event()
        self._idle.set()
        self.draining = False

    @property
    def in_flight(self) -> int:
        return self._in_flight

    def applies_to(self, method: str) -> bool:
        return method.startswith(SERVICE_PREFIX)

    def wrap(self, method: str, behavior: Behavior) -> Behavior:
        return self._count(behavior)

    def _count(self, behavior: Behavior) -> Behavior:
        async def counted(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
            if self.draining:
                raise ShuttingDown()
            self._in_flight += 1
            self._idle.clear()
            try:
                return await behavior(request, context)
            finally:
                self._in_flight -= 1
                if self._in_flight == 0:
                    self._idle.set()

        return counted

    async def wait_idle(self, timeout: float) -> bool:
        """Waits up to ``timeout`` seconds for the calls in flight; True when none is left."""
        if self._in_flight == 0:
            return True
        try:
            await asyncio.wait_for(self._idle.wait(), timeout)
        except TimeoutError:
            return False
        return True


@dataclass(slots=True)
class KeysvcServer:
    """A built, not yet started, keysvc server."""

    server: grpc.aio.Server
    port: int
    health: health_aio.HealthServicer
    pool: PoolBackend
    drain: DrainInterceptor
    limit: InFlightLimit

    async def start(self) -> None:
        await self.server.start()
        await self.health.set(SERVICE_NAME, health_pb2.HealthCheckResponse.SERVING)
        await self.health.set(EXT_PROC_SERVICE_NAME, health_pb2.HealthCheckResponse.SERVING)

    def serving(self, service: str = "") -> bool:
        """Whether gRPC health reports ``service`` ("" = the whole server) as SERVING.

        For /healthz and /readyz, which mirror gRPC health for HTTP-only load
        balancers. The aio HealthServicer keeps its statuses in a dict it does
        not expose; this reads it.
        """
        status = self.health._server_status.get(service)
        return bool(status == health_pb2.HealthCheckResponse.SERVING)

    async def shutdown(self, grace: float) -> None:
        """Drains: NOT_SERVING at once, new calls UNAVAILABLE, in-flight calls get ``grace``.

        Then writes the pool's state and stops the server.
        """
        await self.health.enter_graceful_shutdown()
        self.drain.draining = True
        if not await self.drain.wait_idle(grace):
            _log.warning(
                "grace period over; cancelling calls in flight",
                extra={"calls": self.drain.in_flight},
            )
        try:
            await self.pool.flush()
        except StateWriteFailed:
            pass  # logged by the store; the process stops with what it could write
        finally:
            await self.server.stop(0)


def _address(host: str, port: int) -> str:
    if ":" in host and not host.startswith("["):
        host = f"[{host}]"
    return f"{host}:{port}"


def create_server(
    pool: PoolBackend | KeyPool,
    *,
    host: str = "127.0.0.1",
    port: int = 0,
    interceptors: Sequence[grpc.aio.ServerInterceptor] = (),
    tokens: AuthTokens | None = None,
    tls: TlsConfig | None = None,
    max_message_bytes: int = Limits.MESSAGE_BYTES,
    checker: Rechecker | None = None,
    metrics: Metrics | None = None,
    list_max_page_size: int = DEFAULT_MAX_PAGE_SIZE,
    ext_proc_max_wait: float = 5.0,
    state: SqliteStateStore | None = None,
    max_in_flight: int = DEFAULT_MAX_IN_FLIGHT,
    max_in_flight_lists: int = DEFAULT_MAX_IN_FLIGHT_LISTS,
    connection_limits: ConnectionLimits | None = None,
    reuse_port: bool = False,
) -> KeysvcServer:
    """Builds a server for ``pool`` bound to ``host:port`` (0 picks a free port).

    ``interceptors`` run inside the error mapping, after keysvc's own (drain,
    then auth), so they see only calls that passed both. ``tokens`` with at
    least one token turns auth on; ``tls`` turns TLS (or mutual TLS) on. With a
    ``checker``, Recheck goes through it (and wakes it). The RPC observer (debug
    log line per call, and RPC metrics when ``metrics`` is given) runs outermost,
    so it records the status the caller gets, auth refusals included. With a
    ``state`` store, a failed state write turns KeyService NOT_SERVING (and
    /readyz 503) until a write succeeds, and is counted in ``metrics``.

    Envoy's ext_proc service (``keysvc.ext_proc``) is served beside KeyService:
    same port, TLS and pool; its streams check the HTTP caller's own token
    against ``tokens`` and wait at most ``ext_proc_max_wait`` seconds for a key.

    Calls beyond ``max_in_flight`` (``max_in_flight_lists`` for List) are refused
    with RESOURCE_EXHAUSTED / OVERLOADED, after the drain check and before auth;
    ``connection_limits`` bound each client connection (``keysvc.overload``).
    ``reuse_port`` lets other processes bind the same port (the workers of
    ``keysvc.workers``; the kernel spreads connections over them).

    Raises:
        OSError: the address cannot be bound.
    """
    backend = as_backend(pool)
    drain = DrainInterceptor()
    limit = InFlightLimit(
        max_in_flight,
        list_limit=max_in_flight_lists,
        on_refused=metrics.overloaded if metrics is not None else None,
    )
    if metrics is not None:
        metrics.watch_in_flight(lambda: limit.in_flight)
    own: list[grpc.aio.ServerInterceptor] = [
        RpcInterceptor(metrics),
        ErrorMappingInterceptor(),
        drain,
        limit,
    ]
    if tokens is not None and tokens.enabled:
        own.append(AuthInterceptor(tokens))
    server = grpc.aio.server(
        interceptors=[*own, *interceptors],
        options=[
            ("grpc.max_receive_message_length", max_message_bytes),
            # Without this, gRPC sets SO_REUSEPORT and a second keysvc on the same
            # port would silently share it instead of failing to start; only the
            # workers of one keysvc share a port, on purpose.
            ("grpc.so_reuseport", 1 if reuse_port else 0),
            *connection_options(connection_limits or ConnectionLimits(), max_in_flight),
        ],
    )
    keysvc_pb2_grpc.add_KeyServiceServicer_to_server(
        KeyService(backend, checker, max_page_size=list_max_page_size), server
    )
    add_ext_proc_service(
        server,
        ExtProcService(
            backend, tokens=tokens or AuthTokens(), max_wait=ext_proc_max_wait, metrics=metrics
        ),
    )
    health = health_aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health, server)
    enable_reflection(
        (
            SERVICE_NAME,
            EXT_PROC_SERVICE_NAME,
            health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
        ),
        server,
    )
    address = _address(host, port)
    try:
        if tls is None:
            bound = server.add_insecure_port(address)
        else:
            bound = server.add_secure_port(address, tls.server_credentials())
    except RuntimeError as exc:
        raise OSError(f"cannot listen on {address}: {exc}") from exc
    if bound == 0:
        raise OSError(f"cannot listen on {address}")
    if state is not None:
        state.add_listener(_follow_state_writes(health))
        if metrics is not None:
            state.add_listener(metrics.state_write_done)
    return KeysvcServer(
        server=server, port=bound, health=health, pool=backend, drain=drain, limit=limit
    )


def _follow_state_writes(health: health_aio.HealthServicer) -> Callable[[bool], None]:
    """KeyService health from the state writes: NOT_SERVING from a failed write until
    one succeeds. Changes are lost if this process stops meanwhile, so a load balancer
    should send traffic elsewhere, but a liveness probe (service "") should not restart it."""
    failing = False
    pending: set[asyncio.Task[None]] = set()

    def follow(ok: bool) -> None:
        nonlocal failing
        if failing == (not ok):
            return
        failing = not ok
        status = (
            health_pb2.HealthCheckResponse.SERVING
            if ok
            else health_pb2.HealthCheckResponse.NOT_SERVING
        )
        # Ignored by the servicer once shutdown has begun.
        task = asyncio.get_running_loop().create_task(health.set(SERVICE_NAME, status))
        pending.add(task)
        task.add_done_callback(pending.discard)

    return follow


async def start_http_port(
    running: KeysvcServer,
    pool: SnapshotSource | RedisBackend,
    metrics: Metrics,
    *,
    host: str,
    port: int,
    census: KeyCensus | None = None,
    pacer: ViewPacer | None = None,
) -> HttpServer:
    """Serves /metrics, the status page, /healthz and /readyz for ``running`` on ``host:port``.

    ``metrics`` must be ``pool``'s observer; this adds the gauges read from ``pool``.
    ``census`` should be the one ``pool`` was built with (``build_pool``): without it,
    every snapshot the views read recounts every key. A shared pool (``RedisBackend``)
    is read by its census in Redis instead, at most every ``SNAPSHOT_MAX_AGE``
    seconds. ``pacer`` spaces page views and scrapes (``keysvc.web.VIEWS_PER_SECOND``
    when not given).

    Raises:
        OSError: the address cannot be bound.
    """
    snapshots: SnapshotFeed
    local: SnapshotSource | None = None
    if isinstance(pool, RedisBackend):
        shared = pool
        snapshots = TakenSnapshots(
            lambda: shared.census(listed=PAGE_KEYS), max_age=SNAPSHOT_MAX_AGE
        )
        metrics.watch_snapshots(snapshots)
    else:
        local = pool
        snapshots = page_snapshots(pool, census)
        metrics.watch_pool(pool, snapshots)
    app = build_app(
        local,
        metrics.registry,
        live=running.serving,
        ready=lambda: running.serving(SERVICE_NAME),
        snapshots=snapshots,
        pacer=pacer,
    )
    return await start_http(app, host=host, port=port)


def build_pool(
    settings: Settings,
    clock: Clock,
    *,
    store: KeyStore | None = None,
    extra_keys: Sequence[str] = (),
    observer: PoolObserver | None = None,
    census: KeyCensus | None = None,
) -> KeyPool:
    """The pool the settings describe, with the keys of OPENAI_KEY and ANTHROPIC_KEY (then
    ``extra_keys``); ``census``, when given, watches its store (for the HTTP port's snapshots)."""
    models = _models(settings)
    if settings.allowed_families is not None:
        unknown = settings.allowed_families - set(models.families)
        if unknown:
            _log.warning(
                "ALLOWED_MODEL_FAMILIES names families no model maps to",
                extra={"families": ",".join(sorted(unknown))},
            )
    store = store if store is not None else MemoryKeyStore()
    pool = KeyPool(
        store=census.watching(store) if census is not None else store,
        models=models,
        clock=clock,
        allowed_families=settings.allowed_families,
        observer=observer,
    )
    # Loading makes a few GC-tracked objects per key and no garbage; the collector's
    # passes over them took a third of the load time at 100k keys, so it waits.
    collecting = gc.isenabled()
    gc.disable()
    try:
        for secret in dict.fromkeys([*settings.openai_keys, *settings.anthropic_keys, *extra_keys]):
            pool.add_key(secret)
    finally:
        if collecting:
            gc.enable()
    pool.restore_clones()
    # The keys live as long as the process: out of the collector's generations, a
    # full collection does not walk them (40-75 ms on the event loop at 100k keys).
    # Refcounting still frees a removed key; only cycles among them would stay.
    gc.freeze()
    return pool


def _models(settings: Settings) -> ModelTable:
    """The model table; raises ``ModelTableError`` when KEYSVC_UNKNOWN_MODELS names no family."""
    unknown = None if settings.unknown_models == UNKNOWN_MODELS_REJECT else settings.unknown_models
    if settings.model_families_file:
        return ModelTable.from_file(settings.model_families_file, unknown=unknown)
    return ModelTable(unknown=unknown)


def _log_loaded(count: int) -> None:
    if count == 0:
        _log.warning(
            "no keys configured (OPENAI_KEY, ANTHROPIC_KEY and KEYSVC_KEYS_FILE are empty);"
            " serving an empty pool, every Get will fail"
        )
    else:
        _log.info("loaded keys", extra={"keys": count})


async def build_redis_backend(
    settings: Settings,
    *,
    extra_keys: Sequence[str] = (),
    observer: PoolObserver | None = None,
    metrics: Metrics | None = None,
) -> RedisBackend:
    """The shared pool of ``settings.redis_url``, with this replica's keys registered,
    or to be registered once Redis answers (``RedisBackend.ping``); ``metrics`` count
    the calls that fail on Redis."""
    assert settings.redis_url is not None
    client = Redis.from_url(
        settings.redis_url,
        socket_connect_timeout=settings.redis_timeout,
        socket_timeout=settings.redis_timeout,
    )
    backend = RedisBackend(
        client,
        models=_models(settings),
        prefix=settings.redis_prefix,
        timeout=settings.redis_timeout,
        allowed_families=settings.allowed_families,
        observer=observer,
        on_failure=metrics.store_failed if metrics is not None else None,
    )
    secrets = list(dict.fromkeys([*settings.openai_keys, *settings.anthropic_keys, *extra_keys]))
    _log_loaded(len(secrets))
    try:
        added = await backend.add_keys(secrets)
    except StoreUnavailable as exc:
        # Served NOT_SERVING until Redis answers (_follow_redis), then the keys join.
        _log.warning(
            "redis not answering; not serving until it does", extra={"problem": exc.problem}
        )
    else:
        _log.info(
            "shared pool on redis", extra={"prefix": settings.redis_prefix, "new_keys": added}
        )
    return backend


async def _follow_redis(
    backend: RedisBackend, health: health_aio.HealthServicer, interval: float = REDIS_PING_INTERVAL
) -> None:
    """KeyService and ext_proc health from Redis: NOT_SERVING while it does not answer
    within the timeout, SERVING again once it does (the process is not restarted)."""
    serving: bool | None = None
    while True:
        ok = await backend.ping()
        if ok != serving:
            if serving is not None or not ok:
                log = _log.info if ok else _log.warning
                log("redis answering again" if ok else "redis not answering: NOT_SERVING")
            serving = ok
            status = (
                health_pb2.HealthCheckResponse.SERVING
                if ok
                else health_pb2.HealthCheckResponse.NOT_SERVING
            )
            for name in (SERVICE_NAME, EXT_PROC_SERVICE_NAME):
                await health.set(name, status)
        await asyncio.sleep(interval)


class _SharedRecheck:
    """Recheck on a shared pool: keys are marked in Redis; the lease holder's checker
    picks them up (at once when it is this replica's)."""

    def __init__(self, backend: RedisBackend) -> None:
        self._backend = backend
        self.checker: KeyChecker | None = None

    async def recheck(self) -> None:
        await self._backend.recheck(until_checked=True)
        if self.checker is not None:
            await self.checker.pick_up_rechecks()


async def _check_under_lease(
    make_checker: Callable[[], KeyChecker],
    backend: RedisBackend,
    shared: _SharedRecheck,
    lease: float = CHECKER_LEASE,
) -> None:
    """Runs the key checker while this replica holds the lease; renews it every third
    of its length, stops checking when it is lost. A dead holder's lease lapses and
    another replica takes over the checks left (the keys still unchecked in Redis)."""
    holder = _lease_holder()
    loop = asyncio.get_running_loop()
    while True:
        if not await backend.hold_lease(holder, lease):
            await asyncio.sleep(lease / 3)
            continue
        _log.info("key checker lease taken", extra={"holder": holder})
        checker = shared.checker = make_checker()
        task = loop.create_task(checker.run())
        try:
            while not task.done():
                await asyncio.sleep(lease / 3)
                if not await backend.hold_lease(holder, lease):
                    _log.warning("key checker lease lost; checking stops here")
                    break
                await checker.pick_up_rechecks()
        finally:
            shared.checker = None
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
        if task.done() and not task.cancelled() and task.exception() is not None:
            _report_checker_end(task)


def _lease_holder() -> str:
    """This replica's id as a lease holder: unique among replicas and restarts."""
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"


async def _sweep_under_lease(
    backend: RedisBackend, lease: float = CHECKER_LEASE, every: float = SWEEP_INTERVAL
) -> None:
    """Removes the keys no replica holds any more from the shared pool every ``every``
    seconds while this replica holds the sweeper lease (one replica at a time walks the
    pool; a dead holder's lease lapses and another takes over). A lease of its own, not
    the checker's: keys leave the pool whether or not any replica checks keys."""
    holder = _lease_holder()
    loop = asyncio.get_running_loop()
    swept = -math.inf
    while True:
        if await backend.hold_lease(holder, lease, "sweeper") and loop.time() - swept >= every:
            swept = loop.time()
            try:
                await backend.sweep()
            except StoreUnavailable as exc:
                _log.warning(
                    "sweep of keys no replica holds failed; tried again later",
                    extra={"problem": exc.problem},
                )
        await asyncio.sleep(lease / 3)


def _log_protection(settings: Settings, tokens: AuthTokens, tls: TlsConfig | None) -> None:
    if tokens.enabled:
        _log.info(
            "auth on",
            extra={"proxy_tokens": len(tokens.proxy), "admin_tokens": len(tokens.admin)},
        )
    else:
        _log.warning("auth off: no KEYSVC_PROXY_TOKENS or KEYSVC_ADMIN_TOKENS configured")
    if tls is not None:
        _log.info("tls on", extra={"client_certificates": "required" if tls.mutual else "no"})
    if not is_loopback(settings.host):
        if not tokens.enabled and (tls is None or not tls.mutual):
            _log.warning(
                "listening beyond loopback without tokens or client certificates:"
                " anyone who can reach the port can take keys",
                extra={"host": settings.host, "insecure": settings.insecure},
            )


async def serve(
    settings: Settings, *, clock: Clock | None = None, worker: int | None = None
) -> None:
    """Runs keysvc until SIGTERM or SIGINT, then drains and returns.

    ``worker``: this process is that worker of ``keysvc serve --workers``; it shares
    its port with the others (SO_REUSEPORT).

    Raises:
        ConfigError: a TLS, state or keys file is unusable (start-up refused).
        OSError: the address cannot be bound.
    """
    clock = clock or SystemClock()
    raise_open_files_limit()
    tls = TlsConfig.from_files(
        cert=settings.tls_cert, key=settings.tls_key, client_ca=settings.tls_client_ca
    )
    tokens = AuthTokens(proxy=settings.proxy_tokens, admin=settings.admin_tokens)
    file_keys = read_keys_file(settings.keys_file) if settings.keys_file else []
    store: KeyStore
    state: SqliteStateStore | None = None
    if settings.state_file is not None:
        store = state = SqliteStateStore.open(
            settings.state_file, ignore_corrupt=settings.ignore_state
        )
    else:
        store = MemoryKeyStore()
        if settings.redis_url is None:
            _log.info("no state file: disabled flags and usage are lost on restart")
    metrics = Metrics() if settings.metrics_port is not None else None
    census = KeyCensus() if metrics is not None else None
    backend: PoolBackend
    if settings.redis_url is not None:
        backend = await build_redis_backend(
            settings, extra_keys=file_keys, observer=metrics, metrics=metrics
        )
    else:
        pool = build_pool(
            settings, clock, store=store, extra_keys=file_keys, observer=metrics, census=census
        )
        _log_loaded(len(pool))
        backend = MemoryBackend(pool)
    if state is not None:
        try:
            await state.flush()  # proves the file is writable before serving
        except StateWriteFailed as exc:
            raise StateFileError(
                f"KEYSVC_STATE_FILE: cannot write {settings.state_file}: {exc.problem}"
            ) from exc
        state.start()
    _log_protection(settings, tokens, tls)
    checker = build_checker(settings, backend, clock) if settings.check_keys else None
    rechecker: Rechecker | None = checker
    if isinstance(backend, RedisBackend) and checker is not None:
        # One checker among the replicas, the lease holder's (_check_under_lease).
        await checker.aclose()
        checker, rechecker = None, _SharedRecheck(backend)
    try:
        running = create_server(
            backend,
            host=settings.host,
            port=settings.port,
            tokens=tokens,
            tls=tls,
            checker=rechecker,
            metrics=metrics,
            list_max_page_size=settings.list_max_page_size,
            ext_proc_max_wait=settings.ext_proc_max_wait,
            state=state,
            max_in_flight=settings.max_in_flight,
            max_in_flight_lists=settings.max_in_flight_lists,
            connection_limits=settings.connection_limits,
            reuse_port=worker is not None,
        )
    except BaseException:
        if checker is not None:
            await checker.aclose()
        if isinstance(backend, RedisBackend):
            await backend.aclose()
        raise

    loop = asyncio.get_running_loop()
    background: list[asyncio.Task[None]] = []
    watcher: KeysFileWatcher | None = None
    if settings.keys_file is not None:
        watcher = KeysFileWatcher(
            settings.keys_file,
            pool=backend,
            base_keys=(*settings.openai_keys, *settings.anthropic_keys),
        )
        background.append(loop.create_task(watcher.run()))
        loop.add_signal_handler(signal.SIGHUP, watcher.request_reload)

    http: HttpServer | None = None
    if metrics is not None and settings.metrics_port is not None:
        http = await start_http_port(
            running,
            backend if isinstance(backend, RedisBackend) else backend.snapshot_source(),
            metrics,
            host=settings.metrics_host,
            port=settings.metrics_port,
            census=census,
        )
        _log.info(
            "serving metrics and status page",
            extra={"address": _address(settings.metrics_host, http.port)},
        )

    # Handlers go in before "serving" is logged: a supervisor may signal right after.
    stop = asyncio.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    try:
        await running.start()
        if isinstance(backend, RedisBackend):
            background.append(loop.create_task(_follow_redis(backend, running.health)))
            background.append(loop.create_task(_sweep_under_lease(backend), name="sweeper"))
            if isinstance(rechecker, _SharedRecheck):
                leased = _check_under_lease(
                    lambda: build_checker(settings, backend, clock), backend, rechecker
                )
                background.append(loop.create_task(leased, name="key-checker"))
        _log.info("serving", extra={"address": _address(settings.host, running.port)})
        if checker is not None:
            checking = loop.create_task(checker.run(), name="key-checker")
            checking.add_done_callback(_report_checker_end)
            background.append(checking)
        elif rechecker is None:
            _log.info("key checking is off (CHECK_KEYS=false); keys are used as loaded")
        await stop.wait()
        _log.info("shutting down", extra={"grace_seconds": settings.shutdown_grace})
    finally:
        for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            loop.remove_signal_handler(signum)
        # A check in flight is abandoned; it has changed nothing yet.
        for task in background:
            task.cancel()
        await asyncio.gather(*background, return_exceptions=True)
        await running.shutdown(settings.shutdown_grace)
        # Stopped after the drain, so /readyz answers 503 while in-flight calls finish.
        if http is not None:
            await http.stop()
        if state is not None:
            await state.close()
        if isinstance(backend, RedisBackend):
            await backend.aclose()
    _log.info("stopped")


def build_checker(settings: Settings, pool: PoolBackend, clock: Clock) -> KeyChecker:
    """The key checker the settings describe, over ``pool``."""
    return KeyChecker(
        pool,
        clock=clock,
        config=CheckerConfig(
            base_url=settings.openai_base_url,
            anthropic_base_url=settings.anthropic_base_url,
            timeout=settings.check_timeout,
            check_interval=settings.check_interval,
            recheck_interval=settings.recheck_interval,
        ),
    )


def _report_checker_end(task: asyncio.Task[None]) -> None:
    if not task.cancelled() and task.exception() is not None:
        _log.error("key checker stopped on an error", exc_info=task.exception())
