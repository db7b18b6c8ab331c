"""Prometheus metrics: pool events, RPCs, and pool gauges computed on scrape.

- ``Metrics`` owns a registry and the counters; it is the pool's
  ``PoolObserver`` (hand-outs, tokens, state changes, checker results), so the
  hot path only increments a cached counter child.
- ``PoolCollector`` gives the gauges that need the whole pool (keys by family
  and state, lockout per family) from a ``PoolSnapshot``: the HTTP port's
  snapshot, walked in slices before the scrape (``keysvc.status``), or without
  one a walk over the pool at scrape time; for a shared pool, its census read
  from Redis (``RedisBackend.census``).
- ``RpcInterceptor`` counts every RPC by method and status code, times it, and
  logs one debug line per call (logging works with metrics off too).

No metric carries a secret: labels are families, methods, codes, outcomes and
change kinds, all from fixed sets (the operator's model table for families).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator
from typing import Any, Final

import grpc
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from .events import KeyChange
from .interceptors import Behavior, UnaryInterceptor
from .outcomes import OutcomeAction
from .pool import HASH_PATTERN
from .status import (
    COUNTED_STATES,
    PoolSnapshot,
    PoolSnapshots,
    SnapshotFeed,
    SnapshotSource,
    take_snapshot,
)
from .v1 import keysvc_pb2

__all__ = ["Metrics", "PoolCollector", "RpcInterceptor"]

_rpc_log = logging.getLogger("keysvc.rpc")

#: Buckets for RPC latency: the pool answers in microseconds, the network in milliseconds.
LATENCY_BUCKETS: Final = (
    0.0001,
    0.00025,
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
)

_CODE_NAMES: Final = {code.value[0]: code.name for code in grpc.StatusCode}


class Metrics:
    """keysvc's counters in their own registry; also the pool's observer.

    A registry per server (not prometheus_client's global one) lets tests build
    many servers in one process.
    """

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        self._handouts = Counter(
            "keysvc_key_handouts",
            "Keys handed out by Get, by the requested model's family.",
            ["family"],
            registry=self.registry,
        )
        self._tokens = Counter(
            "keysvc_tokens_used",
            "Tokens reported through IncrementUsage, by model family.",
            ["family"],
            registry=self.registry,
        )
        self._changes = Counter(
            "keysvc_key_state_changes",
            "Key state changes (disabled, revoked, over_quota, rate_limited, cloned).",
            ["change"],
            registry=self.registry,
        )
        self._checks = Counter(
            "keysvc_checker_results",
            "Keys checked against the upstream API, by outcome.",
            ["outcome"],
            registry=self.registry,
        )
        self._outcomes = Counter(
            "keysvc_outcomes",
            "Upstream answers reported through ReportOutcome, by the action keysvc answered.",
            ["action"],
            registry=self.registry,
        )
        self._rpcs = Counter(
            "keysvc_rpcs",
            "RPCs handled, by full method name and gRPC status code.",
            ["method", "code"],
            registry=self.registry,
        )
        self._ext_proc = Counter(
            "keysvc_ext_proc_requests",
            "Requests Envoy's ext_proc filter asked keysvc about: answer 'key' (a key was"
            " set) or the HTTP status keysvc refused with (400, 401, 403, 429, 503).",
            ["answer"],
            registry=self.registry,
        )
        self._latency = Histogram(
            "keysvc_rpc_duration_seconds",
            "Time to handle an RPC on the server, by full method name.",
            ["method"],
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self._state_write_failures = Counter(
            "keysvc_state_write_failures",
            "Writes of the state file that failed (the changes stay in memory and are retried).",
            registry=self.registry,
        )
        self._overloaded = Counter(
            "keysvc_overloaded",
            "KeyService calls refused because the in-flight limit was reached"
            " (RESOURCE_EXHAUSTED, reason OVERLOADED), by full method name.",
            ["method"],
            registry=self.registry,
        )
        self._provider_overloaded = Counter(
            "keysvc_provider_overloaded",
            "Answers reported through ReportOutcome that said the provider itself is"
            " overloaded (Anthropic's 529): the key was left alone, the provider backed off.",
            ["provider"],
            registry=self.registry,
        )
        self._store_failures = Counter(
            "keysvc_redis_failures",
            "Calls of this replica to the shared pool's Redis that failed (the RPC"
            " answered UNAVAILABLE, reason STORE_UNAVAILABLE), by problem: timeout"
            " (no answer within KEYSVC_REDIS_TIMEOUT) or connection.",
            ["problem"],
            registry=self.registry,
        )
        for problem in ("timeout", "connection"):
            self._store_failures.labels(problem)
        self._in_flight = Gauge(
            "keysvc_in_flight",
            "KeyService calls in flight (waiting Gets and unread replies included).",
            registry=self.registry,
        )
        # labels() takes a lock and builds a tuple: look each child up once.
        self._handout_children: dict[str, Any] = {}
        self._token_children: dict[str, Any] = {}
        for change in KeyChange:
            self._changes.labels(change.value)
        self._outcome_children = {
            action.value: self._outcomes.labels(action.value) for action in OutcomeAction
        }

    def watch_pool(self, pool: SnapshotSource, snapshots: PoolSnapshots | None = None) -> None:
        """Adds the gauges of ``pool``: from ``snapshots.latest`` when given (the HTTP
        port makes it fresh before each scrape), else from a walk at scrape time."""
        self.registry.register(PoolCollector(pool, snapshots))

    def watch_snapshots(self, snapshots: SnapshotFeed) -> None:
        """Adds the pool gauges from ``snapshots.latest`` alone (a shared pool, whose
        census the HTTP port takes before each scrape); none before the first."""
        self.registry.register(PoolCollector(None, snapshots))

    def store_failed(self, problem: str) -> None:
        """A call to the shared pool's Redis failed: ``timeout`` or ``connection``."""
        self._store_failures.labels(problem).inc()

    def watch_in_flight(self, count: Callable[[], int]) -> None:
        """The in-flight gauge reads ``count()`` on each scrape."""
        self._in_flight.set_function(count)

    def overloaded(self, method: str) -> None:
        """A call to ``method`` was refused by the in-flight limit."""
        self._overloaded.labels(method).inc()

    # -- PoolObserver ------------------------------------------------------------

    def handed_out(self, family: str) -> None:
        child = self._handout_children.get(family)
        if child is None:
            child = self._handout_children[family] = self._handouts.labels(family)
        child.inc()

    def tokens_used(self, family: str, tokens: int) -> None:
        child = self._token_children.get(family)
        if child is None:
            child = self._token_children[family] = self._tokens.labels(family)
        child.inc(tokens)

    def state_changed(self, key_hash: str, change: KeyChange, reason: str) -> None:
        self._changes.labels(change.value).inc()

    def check_result(self, outcome: str) -> None:
        self._checks.labels(outcome).inc()

    def outcome_reported(self, action: str) -> None:
        self._outcome_children[action].inc()

    def provider_overloaded(self, provider: str) -> None:
        self._provider_overloaded.labels(provider).inc()

    # -- state file --------------------------------------------------------------

    def state_write_done(self, ok: bool) -> None:
        """A write of the state file ended (``keysvc.state.SqliteStateStore`` listener)."""
        if not ok:
            self._state_write_failures.inc()

    # -- RPCs --------------------------------------------------------------------

    def ext_proc_answered(self, answer: str) -> None:
        self._ext_proc.labels(answer).inc()

    def rpc_done(self, method: str, code: str, seconds: float) -> None:
        self._rpcs.labels(method, code).inc()
        self._latency.labels(method).observe(seconds)


class PoolCollector(Collector):
    """Gauges from a snapshot of the pool.

    With ``snapshots``, the latest one (immutable: any thread may read it);
    without, or before the first, a walk over the pool at scrape time, which
    must then happen on the loop that owns the pool (no gauges without a ``pool``).
    """

    def __init__(self, pool: SnapshotSource | None, snapshots: SnapshotFeed | None = None) -> None:
        self._pool = pool
        self._snapshots = snapshots

    def _snapshot(self) -> PoolSnapshot:
        latest = self._snapshots.latest if self._snapshots is not None else None
        if latest is not None:
            return latest
        if self._pool is None:  # a shared pool before its first census: no pool gauges yet
            return PoolSnapshot(0.0, 0, ())
        return take_snapshot(self._pool)

    def collect(self) -> Iterator[Metric]:
        snapshot = self._snapshot()
        summaries = snapshot.summaries
        keys = GaugeMetricFamily(
            "keysvc_keys",
            "Keys by model family and state. active + locked + disabled = all keys of the "
            "family; trial (not disabled), revoked and over_quota overlap with them.",
            labels=["family", "state"],
        )
        lockout = GaugeMetricFamily(
            "keysvc_lockout_seconds",
            "Seconds until a key for the family is free; 0 when one is free or none can serve.",
            labels=["family"],
        )
        for summary in summaries:
            for state in COUNTED_STATES:
                keys.add_metric([summary.family, state], summary.counts[state])
            lockout.add_metric([summary.family], summary.lockout or 0.0)
        yield keys
        yield lockout
        providers = GaugeMetricFamily(
            "keysvc_provider_keys",
            "Keys by provider (openai, anthropic) and state, each key once. active + locked"
            " + disabled = all the provider's keys; trial, revoked and over_quota overlap.",
            labels=["provider", "state"],
        )
        for provider, counts in snapshot.providers.items():
            for state in COUNTED_STATES:
                providers.add_metric([provider, state], counts[state])
        yield providers

    def describe(self) -> Iterator[Metric]:
        # Declared without samples so registering does not walk the pool.
        yield GaugeMetricFamily("keysvc_keys", "", labels=["family", "state"])
        yield GaugeMetricFamily("keysvc_lockout_seconds", "", labels=["family"])
        yield GaugeMetricFamily("keysvc_provider_keys", "", labels=["provider", "state"])


# -- RPC interceptor ---------------------------------------------------------------


def _code_name(context: grpc.aio.ServicerContext[Any, Any], default: str) -> str:
    code: object = context.code()
    if isinstance(code, grpc.StatusCode):
        return code.name
    if isinstance(code, int):
        return _CODE_NAMES.get(code, default)
    return default


def _key_hash(request: Any, response: Any) -> str | None:
    """The hash the call was about, if any: a request's ``hash`` or a response's ``key``.

    A request hash is logged only when it looks like a hash, so a secret sent by
    mistake in the hash field never reaches the log.
    """
    key = getattr(response, "key", None)
    if isinstance(key, keysvc_pb2.Key) and key.hash:
        return key.hash
    value = getattr(request, "hash", None)
    if isinstance(value, str) and HASH_PATTERN.fullmatch(value):
        return value
    return None


class RpcInterceptor(UnaryInterceptor):
    """Counts, times and logs (at debug) every unary call, whatever its outcome.

    Installed outermost, so it sees the status the caller sees, including the
    ones keysvc's error mapping and any auth interceptor produce.
    """

    def __init__(self, metrics: Metrics | None = None) -> None:
        super().__init__()
        self._metrics = metrics

    def wrap(self, method: str, behavior: Behavior) -> Behavior:
        return self._observe(method, behavior)

    def _observe(self, method: str, behavior: Behavior) -> Behavior:
        metrics = self._metrics

        async def observed(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
            start = time.perf_counter()
            response: Any = None
            code = "UNKNOWN"
            try:
                response = await behavior(request, context)
                code = _code_name(context, "OK")
                return response
            except grpc.aio.AbortError:
                code = _code_name(context, "UNKNOWN")
                raise
            finally:
                seconds = time.perf_counter() - start
                if metrics is not None:
                    metrics.rpc_done(method, code, seconds)
                if _rpc_log.isEnabledFor(logging.DEBUG):
                    extra: dict[str, object] = {
                        "method": method,
                        "status": code,
                        "duration_ms": round(seconds * 1000, 3),
                    }
                    key_hash = _key_hash(request, response)
                    if key_hash:
                        extra["key_hash"] = key_hash
                    _rpc_log.debug("rpc", extra=extra)

        return observed
