"""Proxy loops: what a proxy does with keysvc around one upstream request.

The allocation simulator runs one ``ProxyLoop`` per policy; each request goes
through ``serve``, which returns True once the upstream answered 200 and False
when the request gives up (its deadline passed, or an answer it must not retry).
A new strategy is one more subclass (and one entry in ``simulate.POLICIES``).

Times given to and read from keysvc and the upstream are simulated seconds;
``SimTime`` turns them into real sleeps.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import grpc
from google.protobuf import duration_pb2

from keysvc.testing.status import error_reason
from keysvc.v1 import keysvc_pb2 as pb
from keysvc.v1 import keysvc_pb2_grpc as pb_grpc

__all__ = [
    "Answer",
    "KeysvcLoop",
    "ProxyLoop",
    "ReportOutcomeLoop",
    "Request",
    "SeedQueueLoop",
    "SimTime",
    "Upstream",
]


@dataclass(frozen=True, slots=True)
class SimTime:
    """Real monotonic time, and simulated seconds = real seconds × ``scale``."""

    scale: float

    def now(self) -> float:
        return time.monotonic()

    async def sleep(self, simulated: float) -> None:
        await asyncio.sleep(max(0.0, simulated) / self.scale)


@dataclass(frozen=True, slots=True)
class Answer:
    """An upstream answer, as far as a proxy loop needs it."""

    status: int
    headers: Mapping[str, str]
    body: Any

    @property
    def error_type(self) -> str:
        error = self.body.get("error") if isinstance(self.body, dict) else None
        return str(error.get("type", "")) if isinstance(error, dict) else ""

    @property
    def message(self) -> str:
        error = self.body.get("error") if isinstance(self.body, dict) else None
        return str(error.get("message", "")) if isinstance(error, dict) else ""

    @property
    def is_rate_limit(self) -> bool:
        return self.status == 429 and self.error_type in ("requests", "tokens")

    @property
    def per_day(self) -> bool:
        return "requests per day" in self.message


#: Sends one request upstream with a key: (secret, model, tokens) → answer.
Upstream = Callable[[str, str, int], Awaitable[Answer]]


@dataclass(slots=True)
class Request:
    """One request a proxy received. Times are real monotonic seconds."""

    model: str
    tokens: int
    arrived: float
    deadline: float
    done: float = 0.0
    ok: bool = False
    attempts: int = 0
    extra: dict[str, Any] = field(default_factory=dict)


def duration_seconds(duration: Any) -> float:
    return float(duration.seconds) + float(duration.nanos) / 1e9


class ProxyLoop:
    """The common part: keysvc stub, upstream, time; subclasses say how a request is served."""

    name = "abstract"

    def __init__(
        self, keys: pb_grpc.KeyServiceAsyncStub, upstream: Upstream, clock: SimTime
    ) -> None:
        self.keys = keys
        self.upstream = upstream
        self.clock = clock

    async def start(self) -> None:
        """Starts whatever background work the loop needs."""

    async def aclose(self) -> None:
        """Stops it."""

    async def serve(self, request: Request) -> bool:
        raise NotImplementedError

    async def attempt(self, request: Request, leased: asyncio.Future[None] | None = None) -> Answer:
        """Get → upstream → UpdateRateLimits (→ IncrementUsage, or MarkRateLimited on a 429),
        the reports without a model as the seed's provider made them. ``leased`` is set
        once Get has returned."""
        lease = await self.keys.Get(pb.GetRequest(model=request.model))
        if leased is not None and not leased.done():
            leased.set_result(None)
        key_hash = lease.key.hash
        request.attempts += 1
        answer = await self.upstream(lease.secret, request.model, request.tokens)
        if answer.status == 200:
            request.done = self.clock.now()  # the caller has its answer; bookkeeping follows
        await self.keys.UpdateRateLimits(
            pb.UpdateRateLimitsRequest(hash=key_hash, headers=dict(answer.headers))
        )
        if answer.status == 200:
            usage = answer.body.get("usage", {}) if isinstance(answer.body, dict) else {}
            await self.keys.IncrementUsage(
                pb.IncrementUsageRequest(
                    hash=key_hash, model=request.model, tokens=int(usage.get("total_tokens", 0))
                )
            )
        elif answer.is_rate_limit:
            await self.keys.MarkRateLimited(pb.MarkRateLimitedRequest(hash=key_hash))
        return answer


class KeysvcLoop(ProxyLoop):
    """The older RPCs on keysvc's pool: wait out GetLockoutPeriod, Get, call, report; retry 429s."""

    name = "keysvc-old-rpcs"

    async def serve(self, request: Request) -> bool:
        while self.clock.now() < request.deadline:
            lockout = duration_seconds(
                (
                    await self.keys.GetLockoutPeriod(
                        pb.GetLockoutPeriodRequest(model=request.model)
                    )
                ).lockout
            )
            if lockout > 0:
                left = (request.deadline - self.clock.now()) * self.clock.scale
                await self.clock.sleep(min(lockout, left))
                continue
            answer = await self.attempt(request)
            if answer.status == 200:
                return True
            if not answer.is_rate_limit or answer.per_day:
                return False
        return False


class ReportOutcomeLoop(ProxyLoop):
    """keysvc's proxy loop: Get(max_wait = time left) → upstream → ReportOutcome.

    keysvc waits server-side for the first key to unlock (no polling), applies
    the upstream's answer in one call, and says whether to retry with another key.
    """

    name = "keysvc"
    MAX_WAIT = 60.0  # simulated seconds; keysvc's own cap
    #: Real seconds the wait ends before the request gives up, so a key handed out at
    #: the end of the wait arrives in time to be used. keysvc does this itself from a
    #: call's deadline (DEADLINE_MARGIN); the simulation's clock is scaled and a gRPC
    #: deadline is not, so the loop leaves the margin itself. Without it, once the
    #: waiters' queue stood at the give-up time, most keys went to callers with a few
    #: ms left, who dropped them, and their reservations held the budgets (~10 s stalls).
    MARGIN = 0.1
    #: Real seconds to wait before asking again when keysvc refuses a call as OVERLOADED.
    OVERLOAD_BACKOFF = 0.05

    async def serve(self, request: Request) -> bool:
        while self.clock.now() < request.deadline:
            left = (request.deadline - self.clock.now() - self.MARGIN) * self.clock.scale
            if left <= 0:
                return False
            max_wait = duration_pb2.Duration()
            max_wait.FromNanoseconds(int(min(left, self.MAX_WAIT) * 1e9))
            try:
                lease = await self.keys.Get(pb.GetRequest(model=request.model, max_wait=max_wait))
            except grpc.aio.AioRpcError as refused:
                reason = error_reason(refused)
                if reason == "KEYS_BUSY":
                    continue  # no key unlocked within the wait; the time is up
                if reason == "OVERLOADED":
                    # Nothing was done; as the error asks, retry after a back-off (an
                    # immediate retry would add load to a server already at its limit).
                    await asyncio.sleep(self.OVERLOAD_BACKOFF)
                    continue
                raise
            if self.clock.now() >= request.deadline:
                # The wait used up the request's time: like the other loops (and a real
                # proxy), give up rather than call the upstream for a caller who is gone.
                return False
            request.attempts += 1
            answer = await self.upstream(lease.secret, request.model, request.tokens)
            if answer.status == 200:
                request.done = self.clock.now()  # the caller has its answer; bookkeeping follows
            usage = answer.body.get("usage", {}) if isinstance(answer.body, dict) else {}
            error = answer.body.get("error") if isinstance(answer.body, dict) else None
            error = error if isinstance(error, dict) else {}
            reply = await self.keys.ReportOutcome(
                pb.ReportOutcomeRequest(
                    hash=lease.key.hash,
                    model=request.model,
                    status=answer.status,
                    headers=dict(answer.headers),
                    error_type=str(error.get("type") or ""),
                    error_code=str(error.get("code") or ""),
                    error_message=str(error.get("message") or ""),
                    prompt_tokens=int(usage.get("prompt_tokens", 0)),
                    completion_tokens=int(usage.get("completion_tokens", 0)),
                )
            )
            if answer.status == 200:
                return True
            if reply.action != pb.OUTCOME_ACTION_RETRY_WITH_ANOTHER_KEY:
                return False
        return False


class SeedQueueLoop(ProxyLoop):
    """The seed proxy's queue: every 50 ms, per model, if GetLockoutPeriod is 0, the
    oldest waiting request goes; a 429 puts the request back in the queue (it keeps
    its place by arrival time). The queue polls the model again once the request it
    let go has its key: in the seed the two were one step, and a Get RPC takes ~1 ms
    of a real 50 ms poll, while in scaled time it would take a large part of one."""

    name = "seed"
    POLL = 0.05  # simulated seconds

    def __init__(
        self, keys: pb_grpc.KeyServiceAsyncStub, upstream: Upstream, clock: SimTime
    ) -> None:
        super().__init__(keys, upstream, clock)
        #: Per model, a heap of (arrival, seq, turn): the oldest waiting request first.
        #: A request's turn is set to a future it sets once its Get has returned.
        self._queues: dict[str, list[tuple[float, int, asyncio.Future[asyncio.Future[None]]]]] = {}
        self._seq = itertools.count()
        self._task: asyncio.Task[None] | None = None
        #: Per model, when a poll found a request waiting (real monotonic seconds): the
        #: starts the queue could have made, had keysvc said 0 each time.
        self.polls: dict[str, list[float]] = {}

    async def start(self) -> None:
        self._task = asyncio.create_task(self._process())

    async def aclose(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)

    async def _process(self) -> None:
        while True:
            for model, queue in list(self._queues.items()):
                while queue and queue[0][2].done():  # gave up while waiting
                    heapq.heappop(queue)
                if not queue:
                    continue
                self.polls.setdefault(model, []).append(self.clock.now())
                reply = await self.keys.GetLockoutPeriod(pb.GetLockoutPeriodRequest(model=model))
                if duration_seconds(reply.lockout) == 0:
                    while queue:
                        _, _, turn = heapq.heappop(queue)
                        if not turn.done():
                            leased: asyncio.Future[None] = (
                                asyncio.get_running_loop().create_future()
                            )
                            turn.set_result(leased)
                            await asyncio.wait([leased], timeout=1.0)
                            break
            await self.clock.sleep(self.POLL)

    async def serve(self, request: Request) -> bool:
        queue = self._queues.setdefault(request.model, [])
        while True:
            turn: asyncio.Future[asyncio.Future[None]] = asyncio.get_running_loop().create_future()
            heapq.heappush(queue, (request.arrived, next(self._seq), turn))
            try:
                leased = await asyncio.wait_for(turn, max(0.0, request.deadline - self.clock.now()))
            except TimeoutError:
                return False
            try:
                answer = await self.attempt(request, leased)
            finally:
                if not leased.done():
                    leased.set_result(None)
            if answer.status == 200:
                return True
            if not answer.is_rate_limit or answer.per_day or self.clock.now() >= request.deadline:
                return False
