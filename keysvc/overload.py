"""Bounds on what clients can make the server hold: calls, connections, descriptors.

- ``InFlightLimit`` refuses KeyService calls beyond a configured number in flight
  with ``Overloaded`` (RESOURCE_EXHAUSTED, reason OVERLOADED), counted and logged,
  instead of letting them queue without bound. Reports of upstream answers have
  as much room again of their own, so waiting Gets never crowd out what frees keys.
- ``connection_options`` are the gRPC server options that bound each connection:
  streams, idle time, age, handshake time, keepalive.
- ``raise_open_files_limit`` lifts the soft RLIMIT_NOFILE to the hard limit, so idle
  connections cannot use up the descriptors a good client needs.

A call is in flight from the moment the limit lets it in until gRPC reports the RPC
done: its reply delivered, or the call cancelled, timed out or its connection
closed. Not until the handler returns: a reply the client does not read stays in
the server's memory until then, so counting it is what bounds that memory. A Get
waiting server-side (``max_wait``) is in flight for its whole wait: it holds a call,
a task and a reply to come, like any other call.
"""

from __future__ import annotations

import logging
import resource
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Final

import grpc

from .auth import SERVICE_PREFIX
from .errors import Overloaded
from .interceptors import Behavior, UnaryInterceptor

__all__ = [
    "DEFAULT_MAX_IN_FLIGHT",
    "DEFAULT_MAX_AGE",
    "DEFAULT_MAX_IDLE",
    "DEFAULT_MAX_IN_FLIGHT_LISTS",
    "DEFAULT_MAX_STREAMS",
    "ConnectionLimits",
    "InFlightLimit",
    "connection_options",
    "raise_open_files_limit",
]

_log = logging.getLogger("keysvc.overload")

#: KeyService calls in flight at once. A Get costs the server ~0.1-0.2 ms of its one
#: event loop, so 2,000 calls queued behind each other are ~0.3 s of work: beyond
#: that a caller is better told to back off than left waiting. It leaves room for
#: the waiting Gets of a fleet (20 proxies × 100 concurrent upstream requests), and
#: 2,000 calls hold tens of MB, not GB.
DEFAULT_MAX_IN_FLIGHT: Final = 2_000
#: List calls in flight at once: List is the one RPC whose reply grows with the pool
#: (~180 bytes a key), so each unread reply can pin megabytes. It is an admin call.
DEFAULT_MAX_IN_FLIGHT_LISTS: Final = 8
#: Defaults of ConnectionLimits (see there). Streams: as many as the in-flight
#: limits, since a proxy often multiplexes all its calls (Gets waiting with
#: max_wait included) on one connection; at 100 the simulator's one-channel proxy
#: saw ~1,900 calls in a minute fail UNAVAILABLE instead of waiting their turn.
#: Twice the limit, since reports have as much room again beside it.
DEFAULT_MAX_STREAMS: Final = 2 * DEFAULT_MAX_IN_FLIGHT
DEFAULT_MAX_IDLE: Final = 300.0
DEFAULT_MAX_AGE: Final = 1800.0
LIST_METHOD: Final = f"{SERVICE_PREFIX}List"
#: The calls that report what an upstream answered (or that a key is dead). They
#: answer at once and are what frees keys for the Gets waiting on them, so they
#: have room of their own: counted against the same limit, they were refused while
#: the waiting Gets filled it, their keys' reservations stayed until they lapsed
#: (10 s), and every Get waited that long (the high-limit simulation stalled so).
REPORT_METHODS: Final = frozenset(
    f"{SERVICE_PREFIX}{name}"
    for name in (
        "ReportOutcome",
        "UpdateRateLimits",
        "MarkRateLimited",
        "Disable",
        "IncrementUsage",
    )
)
#: Seconds between two "overloaded" log lines; the counter has every refusal.
LOG_INTERVAL: Final = 10.0


class InFlightLimit(UnaryInterceptor):
    """Lets at most ``limit`` KeyService calls (``list_limit`` of them List) be in
    flight, and beside them at most ``limit`` reports (``REPORT_METHODS``).

    Health and reflection are not limited: a load balancer's probe must get through
    an overload to see that the server is alive. Excess calls are refused before
    anything is done for them, so a client may retry them as they are.

    Args:
        limit: calls in flight at once.
        list_limit: List calls in flight at once (they count against ``limit`` too).
        on_refused: called with the full method name of each refused call (a metric).
        timer: seconds, monotonic; paces the log line.
    """

    def __init__(
        self,
        limit: int,
        *,
        list_limit: int = DEFAULT_MAX_IN_FLIGHT_LISTS,
        on_refused: Callable[[str], None] | None = None,
        timer: Callable[[], float] = time.monotonic,
    ) -> None:
        super().__init__()
        if limit < 1 or list_limit < 1:
            raise ValueError("in-flight limits must be at least 1")
        self.limit = limit
        self.list_limit = list_limit
        self._on_refused = on_refused
        self._timer = timer
        self._in_flight = 0
        self._lists = 0
        self._reports = 0
        self._refused_unlogged = 0
        self._logged_at: float | None = None

    @property
    def in_flight(self) -> int:
        """Calls in flight, reports included."""
        return self._in_flight

    def applies_to(self, method: str) -> bool:
        return method.startswith(SERVICE_PREFIX)

    def wrap(self, method: str, behavior: Behavior) -> Behavior:
        if method in REPORT_METHODS:
            return self._wrap_report(method, behavior)
        is_list = method == LIST_METHOD

        async def limited(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
            if self._in_flight - self._reports >= self.limit:
                self._refuse(method)
                raise Overloaded(self.limit)
            if is_list and self._lists >= self.list_limit:
                self._refuse(method)
                raise Overloaded(self.list_limit, "KEYSVC_MAX_IN_FLIGHT_LISTS")
            self._in_flight += 1
            if is_list:
                self._lists += 1
            # Released when the RPC ends, not when the handler returns: see the module doc.
            # (The stubs type the callback as a private class; any callable works.)
            release = self._release_list if is_list else self._release
            context.add_done_callback(release)  # type: ignore[arg-type]
            return await behavior(request, context)

        return limited

    def _wrap_report(self, method: str, behavior: Behavior) -> Behavior:
        async def limited(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
            if self._reports >= self.limit:
                self._refuse(method)
                raise Overloaded(self.limit)
            self._in_flight += 1
            self._reports += 1
            context.add_done_callback(self._release_report)  # type: ignore[arg-type]
            return await behavior(request, context)

        return limited

    def _release(self, context: object) -> None:
        self._in_flight -= 1

    def _release_list(self, context: object) -> None:
        self._in_flight -= 1
        self._lists -= 1

    def _release_report(self, context: object) -> None:
        self._in_flight -= 1
        self._reports -= 1

    def _refuse(self, method: str) -> None:
        if self._on_refused is not None:
            self._on_refused(method)
        self._refused_unlogged += 1
        now = self._timer()
        if self._logged_at is None or now - self._logged_at >= LOG_INTERVAL:
            _log.warning(
                "overloaded: refusing calls beyond the in-flight limit (KEYSVC_MAX_IN_FLIGHT)",
                extra={
                    "refused": self._refused_unlogged,
                    "in_flight": self._in_flight,
                    "limit": self.limit,
                    "method": method,
                },
            )
            self._logged_at = now
            self._refused_unlogged = 0


@dataclass(frozen=True, slots=True, kw_only=True)
class ConnectionLimits:
    """What one client connection may hold, and for how long (seconds)."""

    #: HTTP/2 streams (calls) one connection may have open at once.
    max_streams: int = DEFAULT_MAX_STREAMS
    #: A connection with no call for this long is closed (GOAWAY); clients reconnect.
    max_idle: float = DEFAULT_MAX_IDLE
    #: A connection is asked to go away after this long, and closed this much later
    #: again: a client that stopped reading cannot pin its replies forever.
    max_age: float = DEFAULT_MAX_AGE
    #: A connection that has not completed the HTTP/2 handshake in this time is
    #: closed (raw TCP connections that send nothing).
    handshake_timeout: float = 10.0
    #: The server pings a connection after this long without traffic and closes it
    #: when the ping is not answered within 20 s (peers that vanished).
    keepalive: float = 60.0


#: The longest a call may still run after its connection was asked to go away:
#: longer than the longest server-side wait (MAX_WAIT, 60 s).
AGE_GRACE: Final = 90.0
#: Seconds a keepalive ping may go unanswered before the connection is closed.
KEEPALIVE_TIMEOUT: Final = 20.0


def _ms(seconds: float) -> int:
    return max(1, int(seconds * 1000))


def connection_options(limits: ConnectionLimits, max_in_flight: int) -> list[tuple[str, int]]:
    """gRPC server options for ``limits``.

    gRPC's own pending-call queue (calls received but not yet taken by the server's
    loop) sheds calls at random above 1,000 and all of them above 3,000, and the
    caller sees CANCELLED, counted nowhere (3,000 concurrent Gets: ~500 of them).
    Its bounds are raised far above ``max_in_flight`` so that in a burst the loop
    takes every call and ``InFlightLimit`` answers the excess, counted; what bounds
    the queue instead is streams per connection times connections. A pending call
    is a few kB in gRPC's core.
    """
    pending = max(10_000, 5 * max_in_flight)
    return [
        ("grpc.max_concurrent_streams", limits.max_streams),
        ("grpc.max_connection_idle_ms", _ms(limits.max_idle)),
        ("grpc.max_connection_age_ms", _ms(limits.max_age)),
        ("grpc.max_connection_age_grace_ms", _ms(AGE_GRACE)),
        ("grpc.server_handshake_timeout_ms", _ms(limits.handshake_timeout)),
        ("grpc.keepalive_time_ms", _ms(limits.keepalive)),
        ("grpc.keepalive_timeout_ms", _ms(KEEPALIVE_TIMEOUT)),
        ("grpc.server.max_pending_requests", pending),
        ("grpc.server.max_pending_requests_hard_limit", 2 * pending),
    ]


def raise_open_files_limit() -> tuple[int, int]:
    """Raises the soft RLIMIT_NOFILE to the hard limit; returns (before, after).

    Every connection is a descriptor; with the common soft limit of 1,024, a
    thousand idle connections were enough to make a good client's calls fail.
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    # An unlimited hard limit cannot be a soft one for descriptors (the kernel's
    # nr_open caps it); 2^20 is the usual nr_open.
    target = hard if hard != resource.RLIM_INFINITY else 1 << 20
    if soft == resource.RLIM_INFINITY or soft >= target:
        _log.info("open files limit", extra={"soft": soft, "hard": hard})
        return soft, soft
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    except (ValueError, OSError) as exc:
        _log.warning(
            "cannot raise the open files limit",
            extra={"soft": soft, "hard": hard, "problem": str(exc)},
        )
        return soft, soft
    _log.info("raised the open files limit", extra={"soft_was": soft, "soft": target, "hard": hard})
    return soft, target
