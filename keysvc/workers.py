"""``keysvc serve --workers N``: N server processes on one port, one pool in Redis.

The parent reserves the port: it binds it with SO_REUSEPORT and never listens, so
no connection ever waits on its socket, ``--port 0`` gives every worker the same
free port, and a program that does not set SO_REUSEPORT cannot take the port
meanwhile. Then it starts N workers (spawned, not forked: gRPC's threads do not
survive a fork); each runs ``serve`` on that port with SO_REUSEPORT, so the kernel
spreads new connections over them, and each is one replica of the shared pool.
Every log line of a worker carries ``worker`` (its index) and ``pid``.

Supervision: SIGTERM or SIGINT to the parent is passed to every worker, which
drains as a single process does; the parent exits 0 once all have stopped. SIGHUP
is passed on too when there is a keys file (each worker reloads it). A
worker that exits on its own (a crash, kill -9) is logged with its pid and exit
code, then the parent stops the others and exits 1: the service's supervisor
(systemd, Kubernetes) restarts it whole and sees the failure, rather than this
process hiding a crash loop by restarting workers itself. Workers run in their own
process group (a terminal's Ctrl-C reaches the parent, which passes it on once) and
stop by themselves when the parent is killed.

The HTTP port: worker i serves it on ``KEYSVC_METRICS_PORT + i`` (each worker a
free port of its own when it is 0). Each worker's RPC and Redis failure counters
are its own, so every worker is scraped; the pool's gauges, read from Redis, are
the same on each.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import multiprocessing
import os
import signal
import socket
import sys
import threading
import time
from multiprocessing.connection import wait
from types import FrameType

from .config import ConfigError, Settings
from .logs import configure_logging
from .models import ModelTableError
from .server import serve

__all__ = ["run", "run_workers"]

_log = logging.getLogger("keysvc.workers")

#: Seconds the parent gives the workers beyond their own grace before killing them.
STOP_MARGIN = 10.0
#: Seconds between a worker's checks that its parent is alive.
PARENT_CHECK = 1.0


def run(settings: Settings, *, worker: int | None = None) -> int:
    """Serves with ``settings`` until a signal; the process exit code.

    ``settings.workers`` > 1 starts the workers (``run_workers``); ``worker`` is
    given in a worker itself.
    """
    if settings.workers > 1 and worker is None:
        return run_workers(settings)
    try:
        asyncio.run(serve(settings, worker=worker))
    except (ConfigError, ModelTableError) as exc:
        _log.error("cannot start", extra={"problem": str(exc)})
        return 2
    except OSError as exc:
        _log.error("cannot start", extra={"problem": str(exc)})
        return 1
    return 0


def _worker_main(settings: Settings, index: int) -> None:
    # Out of the parent's process group: a Ctrl-C at the terminal reaches the parent
    # alone, which passes one SIGTERM on (a second signal would cut the drain short).
    os.setpgid(0, 0)
    configure_logging(
        settings.log_level, settings.log_format, fields={"worker": index, "pid": os.getpid()}
    )
    threading.Thread(target=_stop_with_parent, args=(os.getppid(),), daemon=True).start()
    sys.exit(run(settings, worker=index))


def _stop_with_parent(parent: int) -> None:
    """Stops this worker (SIGTERM to itself) once its parent is gone (kill -9)."""
    while os.getppid() == parent:
        time.sleep(PARENT_CHECK)
    _log.warning("parent gone; stopping", extra={"parent_pid": parent})
    os.kill(os.getpid(), signal.SIGTERM)


def _reserve_port(host: str, port: int) -> socket.socket:
    """A socket bound to ``host:port`` with SO_REUSEPORT, not listening.

    Raises:
        OSError: the address cannot be bound.
    """
    family, kind, proto, _, address = socket.getaddrinfo(
        host.strip("[]"), port, type=socket.SOCK_STREAM
    )[0]
    reserved = socket.socket(family, kind, proto)
    try:
        reserved.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        reserved.bind(address)
    except OSError:
        reserved.close()
        raise
    return reserved


def run_workers(settings: Settings) -> int:
    """Starts ``settings.workers`` workers on one port and supervises them.

    Returns:
        0 after a signal stopped them all; 1 when a worker exited on its own or the
        port cannot be bound.
    """
    try:
        reserved = _reserve_port(settings.host, settings.port)
    except OSError as exc:
        _log.error(
            "cannot start", extra={"problem": f"cannot listen on port {settings.port}: {exc}"}
        )
        return 1
    port = int(reserved.getsockname()[1])
    stopping = False

    def on_signal(signum: int, frame: FrameType | None) -> None:
        nonlocal stopping
        stopping = True

    context = multiprocessing.get_context("spawn")
    workers: list[multiprocessing.context.SpawnProcess] = []

    def pass_on(signum: int, frame: FrameType | None) -> None:
        for started in workers:
            if started.exitcode is None and started.pid is not None:
                os.kill(started.pid, signum)

    previous = {s: signal.signal(s, on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
    if settings.keys_file is not None:  # each worker reloads its keys file on SIGHUP
        previous[signal.SIGHUP] = signal.signal(signal.SIGHUP, pass_on)
    failed = False
    try:
        for index in range(settings.workers):
            metrics_port = settings.metrics_port
            if metrics_port:
                metrics_port += index
            one = dataclasses.replace(settings, port=port, workers=1, metrics_port=metrics_port)
            worker = context.Process(
                target=_worker_main, args=(one, index), name=f"keysvc-worker-{index}"
            )
            worker.start()
            workers.append(worker)
        _log.info(
            "workers started",
            extra={"workers": len(workers), "pids": ",".join(str(w.pid) for w in workers)},
        )
        while not stopping:
            ended = wait([w.sentinel for w in workers], timeout=0.2)
            if ended:
                for running in workers:
                    if running.sentinel in ended:
                        running.join(1.0)  # its pipe closes a moment before it can be reaped
                        _log.error(
                            "worker exited; stopping the others",
                            extra={"pid": running.pid, "exit_code": running.exitcode},
                        )
                failed = True
                break
    finally:
        for started in workers:
            if started.exitcode is None and started.pid is not None:
                os.kill(started.pid, signal.SIGTERM)
        for started in workers:
            started.join(settings.shutdown_grace + STOP_MARGIN)
            if started.exitcode is None:
                _log.warning("worker did not stop in time; killed", extra={"pid": started.pid})
                started.kill()
                started.join()
        reserved.close()
        for signum, handler in previous.items():
            signal.signal(signum, handler)
    if not failed and any(w.exitcode for w in workers):
        failed = True
    _log.info("workers stopped", extra={"exit_codes": ",".join(str(w.exitcode) for w in workers)})
    return 1 if failed else 0
