"""The key pool: which key to hand out, and what each upstream answer teaches.

The pool imports nothing from grpc. Every method runs on the server's event loop
and none awaits (except ``get_waiting``, which waits between atomic steps), so
select-and-throttle is atomic without locks.

Rate-limit state is kept per (key, model family), because the upstream limits
each key per model: a 429 for gpt-4 says nothing about the same key on turbo.
A ``RateState`` per family holds the hand-out time, the last answer's reset
and remaining headers and whether a 429 came; reports that name no model go
to the key-wide state (``key.wide``), which locks every family (the seed's
behaviour). A key's lock in family f ends at the later of the two.

A family's lock (``RateState.until``) is the latest of

- the reuse throttle: ``last_used + reuse_delay`` (1 s) after a hand-out for
  that family, so a burst does not pile onto one key before its headers come
  back. Per family, like the upstream limits: a turbo hand-out does not hold
  the key back from gpt-4;
- the rate-limit window from ``rate_limited_at`` (the hand-out, or the latest
  429):

  - after a 429: the reset of the limit its type names (``requests``,
    ``tokens``), else the longer known reset, else 10 s (a 429 is
    authoritative even when the remaining-* headers say otherwise);
  - else, when remaining-* headers are known: the reset of each remaining
    that is 0 (10 s if that reset is unknown); when none is 0, no window: the
    key still has quota and only the throttle holds it back;
  - else (no remaining-* known): the longer known reset (the seed's rule);

  a dimension (requests or tokens) that has a budget is left to it;
- the budget (``_budget_until``), for a dimension whose limit, remaining and
  reset an answer reported: the remaining as of that report (``budget_at``)
  refills at (limit - remaining) / reset per second, and must cover the
  hand-outs in flight (each reserves 1 request and ``_token_reserve`` tokens;
  an answer releases the oldest; they lapse after ``RESERVATION_TTL``) plus one
  more. The wait is capped at ``MAX_RESET``. A typed 429 spends its budget.
  The budget outlives hand-outs; the headers of the window above do not.

The inputs are stored and the lock derived from them, so the order of
MarkRateLimited and UpdateRateLimits does not matter.

Selection order for ``get(model)`` of family f (the seed's, with the lock
instead of its 30 s window):

1. keys not locked for f;
2. among locked keys, the one whose lock for f ends first;
3. trial keys before paid keys (spend the small quotas first);
4. keys *without* gpt4-32k before keys with it (keep scarce 32k keys free);
5. the least recently used for f.

Keys are grouped by ``KeyProfile`` (families, trial flag and, once the checker
has listed them, the key's model ids): all keys of one profile share rules 3
and 4. Each group has one index per family, created when that family is first
asked for (then for every key of the profile at once), with two queues: keys
free or held only by the reuse throttle, by last use (the throttle ends in that
order, so a key just handed out joins the back and is not moved again when it
ends), and keys locked for longer, by unlock time, moved to the first queue
when it comes. A selection peeks one queue head per eligible profile: O(P) for
P distinct profiles (a handful) whatever the number of keys n (O(log n) only
for keys that arrive out of order, such as the end of a rate-limit lock),
instead of the seed's sort of the whole pool. A key gets a ``RateState`` for a
family only when that family is indexed or reported, so families nobody asks
for cost no memory.

Queue entries are never updated in place: when a key moves, a new entry is
pushed and its ``RateState.entry`` points at it; entries it no longer points at
are stale and are dropped when they reach a queue head or when the queues are
compacted. A family-state change re-places the key in that family's index only; a
key-wide change re-places it in every index it is in.
"""

from __future__ import annotations

import asyncio
import gc
import heapq
import logging
import math
import re
from collections import deque
from collections.abc import Callable, Iterable, Mapping
from typing import Final, Generic, NamedTuple, TypeVar

from .clock import Clock, Timer
from .durations import parse_go_duration
from .errors import FamilyDisallowed, InvalidArgument, KeyNotFound, NoKeysForFamily
from .events import KeyChange, NullObserver, PoolObserver
from .keys import DisableReason, Key, KeyProfile, RateState, hash_key
from .models import GPT4_32K, ModelInfo, ModelTable
from .outcomes import Decision, UpstreamError, decide
from .store import KeyStore, MemoryKeyStore

__all__ = ["MAX_WAIT", "KeyPool", "Limits"]

_log = logging.getLogger("keysvc.pool")

#: After handing out a key, wait this long before handing it out again, so a
#: burst does not pile onto one key before its rate-limit headers come back.
KEY_REUSE_DELAY: Final = 1.0
#: Reset headers are clamped to this: they give the time until the whole quota
#: is back, but the window rolls, so the key is usable well before then.
MAX_RESET: Final = 10.0
#: Lock length after a 429 that came without any reset header.
RATE_LIMIT_FALLBACK: Final = 10.0
#: A hand-out's reservation of a family's budget lapses after this long without
#: an answer. Proxies abandon leases (a client went away, a deadline passed), and
#: each one reserved would hold the key back until it lapses; one lapsing while
#: its request is still running only means that request is not counted, as
#: before budgets. So short: the upstream counts a request when it arrives, and
#: answers that come later report it in their remaining-* anyway.
RESERVATION_TTL: Final = 10.0
#: Tokens reserved per hand-out: mean + SPREAD standard deviations of the
#: family's recent requests (exponentially weighted, WEIGHT per new request),
#: so that most requests, not just half of them, fit what is reserved.
TOKEN_ESTIMATE_WEIGHT: Final = 0.05
TOKEN_ESTIMATE_SPREAD: Final = 2.0
#: Bound on the eligible-index cache, which is keyed by model name (names come from callers).
ELIGIBLE_CACHE_SIZE: Final = 4096
#: The longest a Get may wait for a key to unlock (``get_waiting``).
MAX_WAIT: Final = 60.0
#: The model GetLockoutPeriod assumes when none is given (as the seed).
DEFAULT_LOCKOUT_MODEL: Final = "gpt-4"

#: What a key hash looks like. Checked before lookup so that a secret sent by
#: mistake in a hash field is never echoed back in an error.
HASH_PATTERN: Final = re.compile(r"[a-z]{1,16}-[0-9a-f]{8}")

#: The log event and level of each key state change.
_CHANGE_LOGS: Final = {
    KeyChange.DISABLED: ("key disabled", logging.WARNING),
    KeyChange.REVOKED: ("key revoked", logging.WARNING),
    KeyChange.OVER_QUOTA: ("key over quota", logging.WARNING),
    KeyChange.RATE_LIMITED: ("key rate limited", logging.INFO),
    KeyChange.CLONED: ("key cloned", logging.INFO),
}

REQUESTS_RESET_HEADER: Final = "x-ratelimit-reset-requests"
TOKENS_RESET_HEADER: Final = "x-ratelimit-reset-tokens"
REMAINING_REQUESTS_HEADER: Final = "x-ratelimit-remaining-requests"
REMAINING_TOKENS_HEADER: Final = "x-ratelimit-remaining-tokens"
LIMIT_REQUESTS_HEADER: Final = "x-ratelimit-limit-requests"
LIMIT_TOKENS_HEADER: Final = "x-ratelimit-limit-tokens"


class Limits:
    """Bounds on caller input; anything beyond is INVALID_ARGUMENT."""

    MODEL_LENGTH: Final = 256
    HEADER_COUNT: Final = 128
    HEADER_NAME_LENGTH: Final = 256
    HEADER_VALUE_LENGTH: Final = 4096
    TOKENS: Final = 1_000_000_000
    #: Longest error type or code in a ReportOutcome.
    ERROR_NAME_LENGTH: Final = 256
    #: Longest error message in a ReportOutcome.
    ERROR_MESSAGE_LENGTH: Final = 8192
    #: Largest request message the server accepts (bigger: RESOURCE_EXHAUSTED,
    #: before keysvc decodes it). Room for the largest valid UpdateRateLimits.
    MESSAGE_BYTES: Final = 1024 * 1024


# Queue entries. Ready: (last_used, seq, state). Locked: (until, last_used, seq, state).
# ``state`` is the key's RateState for the index's family; ``state.key`` the key.
_ReadyEntry = tuple[float, int, RateState]
_LockedEntry = tuple[float, float, int, RateState]
_Entry = TypeVar("_Entry", _ReadyEntry, _LockedEntry)
#: What ``_FamilyIndex.top`` finds: when the key unlocks (0.0: it is free) and its entry.
_Top = tuple[float, _ReadyEntry | _LockedEntry]


class _ProfileGroup:
    """The indexed (not disabled) keys of one profile, with one index per family asked for."""

    __slots__ = ("indexes", "live", "profile")

    def __init__(self, profile: KeyProfile) -> None:
        self.profile = profile
        self.indexes: dict[str, _FamilyIndex] = {}
        self.live = 0


def _lock_end(state: RateState) -> float:
    """When the key of ``state`` is free in its family: its own lock or a later key-wide one."""
    wide = state.key.wide
    return wide.until if wide is not None and wide.until > state.until else state.until


class _Ordered(Generic[_Entry]):
    """Entries, smallest first: an in-order run (a deque) beside a heap for the rest.

    Most entries arrive in order, so the run makes them O(1) where a heap of n
    entries costs O(log n) and a cache miss per level: keys are loaded in
    sequence order, and a key handed out was used more recently than any other
    and its throttle ends after theirs (the clock never goes back: ``Clock``).
    An entry smaller than the run's last goes to the heap; the smallest is the
    smaller of the two heads. Entries sort by their leading fields; the
    trailing ``RateState`` is never reached (its key's ``seq`` is unique within
    an index).
    """

    __slots__ = ("heap", "run")

    def __init__(self) -> None:
        self.run: deque[_Entry] = deque()
        self.heap: list[_Entry] = []

    def __len__(self) -> int:
        return len(self.run) + len(self.heap)

    def push(self, entry: _Entry) -> None:
        run = self.run
        if not run or run[-1] <= entry:
            run.append(entry)
        else:
            heapq.heappush(self.heap, entry)

    def append(self, entry: _Entry) -> None:
        """``push`` without keeping the heap ordered; call ``heapify`` after a batch."""
        run = self.run
        if not run or run[-1] <= entry:
            run.append(entry)
        else:
            self.heap.append(entry)

    def heapify(self) -> None:
        heapq.heapify(self.heap)

    def head(self) -> _Entry | None:
        run, heap = self.run, self.heap
        if run:
            return heap[0] if heap and heap[0] < run[0] else run[0]
        return heap[0] if heap else None

    def pop_head(self, entry: _Entry) -> None:
        """Removes ``entry``, which ``head`` just returned."""
        run = self.run
        if run and run[0] is entry:
            run.popleft()
        else:
            heapq.heappop(self.heap)

    def keep(self, live: Callable[[_Entry], bool]) -> None:
        """Drops the entries ``live`` rejects (the run stays in order)."""
        self.run = deque(e for e in self.run if live(e))
        self.heap = [e for e in self.heap if live(e)]
        heapq.heapify(self.heap)


class _FamilyIndex:
    """The keys of one profile, ordered by their state in one family.

    ``ready`` holds the keys whose only lock, if any, is the reuse throttle, by
    last use; ``locked`` the keys locked for longer (a rate-limit window, a
    budget, a key-wide lock), by unlock time, until that time comes. A key's
    throttle ends ``reuse_delay`` after its last use, so in ``ready`` the key
    used least recently is both the best free key and, when it is not free
    yet, the first to be: a key handed out stays in ``ready`` and needs no
    move when its throttle ends.
    """

    __slots__ = ("family", "group", "locked", "profile", "ready", "reuse_delay")

    def __init__(self, group: _ProfileGroup, family: str, reuse_delay: float) -> None:
        self.group = group
        self.profile = group.profile
        self.family = family
        self.reuse_delay = reuse_delay
        self.ready: _Ordered[_ReadyEntry] = _Ordered()
        self.locked: _Ordered[_LockedEntry] = _Ordered()

    def push(self, state: RateState, now: float) -> None:
        """(Re-)places the key of ``state`` by its lock for this family."""
        self.append(state, now, ordered=True)
        if len(self.ready) + len(self.locked) > 2 * self.group.live + 64:
            self._compact()

    def append(self, state: RateState, now: float, *, ordered: bool = False) -> None:
        """``push``; unless ``ordered``, without keeping the heaps ordered (call
        ``heapify`` after a batch)."""
        until = _lock_end(state)
        last_used = state.last_used
        # The key's live entry, if it is placed: (last_used, seq, state) or (until, ...).
        placed = state.entry if isinstance(state.entry, tuple) else ()
        if until <= now or (last_used and until <= last_used + self.reuse_delay):
            if len(placed) == 3 and placed[0] == last_used:
                return  # already in place: most answers leave a key where it was
            ready: _ReadyEntry = (last_used, state.key.seq, state)
            if ordered:
                self.ready.push(ready)
            else:
                self.ready.append(ready)
            state.entry = ready
        else:
            if len(placed) == 4 and placed[0] == until and placed[1] == last_used:
                return  # already in place
            locked: _LockedEntry = (until, last_used, state.key.seq, state)
            if ordered:
                self.locked.push(locked)
            else:
                self.locked.append(locked)
            state.entry = locked

    def heapify(self) -> None:
        self.ready.heapify()
        self.locked.heapify()

    def top(self, now: float) -> _Top | None:
        """The best live entry (free first, else first to unlock) and when it
        unlocks (0.0: free now); the entry is left in place."""
        locked, ready = self.locked, self.ready
        first = locked.head()
        while first is not None and first[0] <= now:
            locked.pop_head(first)
            state = first[3]
            if state.entry is first:
                promoted: _ReadyEntry = (first[1], first[2], state)
                ready.push(promoted)
                state.entry = promoted
            first = locked.head()
        while first is not None and first[3].entry is not first:
            locked.pop_head(first)
            first = locked.head()
        best = ready.head()
        while best is not None and best[2].entry is not best:
            ready.pop_head(best)
            best = ready.head()
        if best is not None:
            last_used = best[0]
            if not last_used or last_used + self.reuse_delay <= now:
                return (0.0, best)
            until = last_used + self.reuse_delay
            if first is None or (until, last_used, best[1]) <= first[:3]:
                return (until, best)
        return None if first is None else (first[0], first)

    def pop_top(self, entry: _ReadyEntry | _LockedEntry) -> None:
        """Removes ``entry``, which ``top`` just returned: its key is not placed until pushed."""
        if len(entry) == 3:
            self.ready.pop_head(entry)
        else:
            self.locked.pop_head(entry)
        entry[-1].entry = None

    def _compact(self) -> None:
        self.ready.keep(lambda e: e[2].entry is e)
        self.locked.keep(lambda e: e[3].entry is e)


class _Waiter:
    """A ``get_waiting`` call waiting its turn."""

    __slots__ = ("deadline", "future", "timer")

    def __init__(self, deadline: float, future: asyncio.Future[None]) -> None:
        self.deadline = deadline
        self.future = future
        self.timer: Timer | None = None

    def wake(self) -> None:
        if not self.future.done():
            self.future.set_result(None)


class _WaitQueue:
    """The waiters for one eligibility class (a model), first come first served."""

    __slots__ = ("info", "model", "waiters")

    def __init__(self, model: str, info: ModelInfo) -> None:
        self.model = model
        self.info = info
        self.waiters: deque[_Waiter] = deque()


class KeyPool:
    """The keys of one upstream service and the rules for handing them out."""

    def __init__(
        self,
        *,
        store: KeyStore,
        models: ModelTable,
        clock: Clock,
        allowed_families: frozenset[str] | None = None,
        reuse_delay: float = KEY_REUSE_DELAY,
        observer: PoolObserver | None = None,
    ) -> None:
        """Builds a pool over the keys already in ``store``.

        Args:
            store: where the key records live.
            models: the model → family table.
            clock: the time source for every decision.
            allowed_families: families the operator allows; None allows all.
            reuse_delay: seconds a key is held back after being handed out.
            observer: told of hand-outs, token usage and key state changes.
        """
        self._store = store
        self._models = models
        self._clock = clock
        self._allowed = allowed_families
        self._reuse_delay = reuse_delay
        self._observer: PoolObserver = observer or NullObserver()
        self._groups: dict[KeyProfile, _ProfileGroup] = {}
        #: Families some caller has asked about: every group has an index for each
        #: of them that its profile has.
        self._indexed_families: set[str] = set()
        self._eligible_cache: dict[tuple[str | None, str, bool], list[_FamilyIndex]] = {}
        #: Keys with a key-wide state (``key.wide``); few, and only they can lock
        #: a family nobody has asked about yet (``family_lockout``).
        self._wide_keys: set[Key] = set()
        #: Per family: (mean, variance) of finished requests' tokens, exponentially weighted.
        self._token_stats: dict[str, tuple[float, float]] = {}
        # get_waiting: queues by (model, family, embeddings), the one timer set for
        # the earliest unlock any queue head waits for, and a pending dispatch.
        self._queues: dict[tuple[str, str, bool], _WaitQueue] = {}
        self._timer: Timer | None = None
        self._timer_at = math.inf
        self._dispatch_pending = False
        self._profiles: dict[KeyProfile, KeyProfile] = {}
        #: What a key starts as until the checker (or its saved state) says more.
        self._new_key_profile = self._intern(KeyProfile(models.default_key_families()))
        self._model_id_sets: dict[frozenset[str], frozenset[str]] = {}
        self._next_seq = 0
        now = clock.now()
        for key in store:
            key.profile = self._intern(key.profile)
            key.seq = self._take_seq()
            if not key.is_disabled:
                self._place(key, now)

    @classmethod
    def from_secrets(
        cls,
        secrets: Iterable[str],
        *,
        models: ModelTable,
        clock: Clock,
        allowed_families: frozenset[str] | None = None,
        reuse_delay: float = KEY_REUSE_DELAY,
        observer: PoolObserver | None = None,
    ) -> KeyPool:
        """A pool over an in-memory store holding ``secrets`` as unchecked keys."""
        pool = cls(
            store=MemoryKeyStore(),
            models=models,
            clock=clock,
            allowed_families=allowed_families,
            reuse_delay=reuse_delay,
            observer=observer,
        )
        for secret in secrets:
            pool.add_key(secret)
        return pool

    # -- loading -------------------------------------------------------------

    def add_key(self, secret: str, *, organization_id: str = "") -> Key | None:
        """Adds an unchecked key with the default families.

        Returns:
            The new key, or None when a key with the same hash is already in
            the pool (the same secret, or a rare 32-bit hash collision).
        """
        key_hash = hash_key(secret, organization_id)
        existing = self._store.get(key_hash)
        if existing is not None:
            if existing.secret != secret or existing.organization_id != organization_id:
                _log.error(
                    "two different keys share a hash; keeping the first",
                    extra={"key_hash": key_hash},
                )
            return None
        key = Key(
            secret=secret,
            hash=key_hash,
            profile=self._new_key_profile,
            seq=self._take_seq(),
            organization_id=organization_id,
        )
        # A persistent store may give the key its saved state (flags, families, usage).
        self._store.add(key)
        key.profile = self._intern(key.profile)
        if not key.is_disabled:
            self._place(key, self._clock.now())
        return key

    def remove_key(self, key_hash: str) -> Key | None:
        """Takes a key out of the pool (its secret left the configuration).

        Returns:
            The removed key, or None when no key has that hash.
        """
        key = self._store.get(key_hash)
        if key is None:
            return None
        self._unplace(key)
        self._wide_keys.discard(key)
        self._store.remove(key_hash)
        return key

    async def flush(self) -> None:
        """Returns once every change so far is durable in the store (a no-op in memory)."""
        await self._store.flush()

    # -- hand-out ------------------------------------------------------------

    def get(self, model: str) -> Key:
        """Chooses the key most likely to succeed for ``model`` and throttles it.

        Raises:
            InvalidArgument: ``model`` is empty or too long.
            FamilyDisallowed: the operator disallows the model's family.
            NoKeysForFamily: no key is eligible for the model.
        """
        _check_model(model)
        info = self._models.lookup(model)
        if self._allowed is not None and info.family not in self._allowed:
            raise FamilyDisallowed(info.family, model)
        now = self._clock.now()
        selected = self._select(self._eligible(model, info), now)
        if selected is None:
            raise NoKeysForFamily(info.family, model)
        index, (_, entry) = selected
        return self._hand_out(index, entry, now)

    async def get_waiting(self, model: str, max_wait: float) -> Key:
        """``get``, but when every eligible key is locked, waits up to ``max_wait``
        seconds for the first to unlock and hands that one out.

        Waiters for a model are served in arrival order; wake-ups are timers at
        the earliest unlock time (and pool changes that may free a key), never
        polling. A waiter that is cancelled (its caller went away) leaves no
        trace: keys are only taken by a waiter that is running. If every key is
        still locked at the deadline, the call ends as ``get`` would: with the
        key that unlocks first. Plain ``get`` calls do not queue.

        Raises:
            InvalidArgument: ``max_wait`` is negative or over ``MAX_WAIT``, or
                ``model`` is bad.
            FamilyDisallowed, NoKeysForFamily: as ``get``, at once or when the
                last eligible key is disabled while waiting.
        """
        _check_model(model)
        if not 0.0 <= max_wait <= MAX_WAIT:
            raise InvalidArgument("max_wait", f"must be between 0 and {MAX_WAIT:g} seconds")
        if max_wait == 0.0:
            return self.get(model)
        info = self._models.lookup(model)
        if self._allowed is not None and info.family not in self._allowed:
            raise FamilyDisallowed(info.family, model)
        now = self._clock.now()
        queue = self._queues.get((model, info.family, info.embeddings))
        if queue is None:  # nobody waits before us: a free key is ours
            key = self._hand_out_free(model, info, now)
            if key is not None:
                return key
            queue = self._queues[(model, info.family, info.embeddings)] = _WaitQueue(model, info)
        loop = asyncio.get_running_loop()
        waiter = _Waiter(now + max_wait, loop.create_future())
        waiter.timer = self._clock.call_at(waiter.deadline, waiter.wake)
        queue.waiters.append(waiter)
        self._schedule_dispatch()
        try:
            while True:
                await waiter.future
                now = self._clock.now()
                if now >= waiter.deadline:
                    break
                if queue.waiters[0] is waiter:
                    key = self._hand_out_free(model, info, now)
                    if key is not None:
                        return key
                # Woken, but a plain Get took the key, or not first in line: wait on.
                waiter.future = loop.create_future()
                self._schedule_dispatch()
        finally:
            waiter.timer.cancel()
            queue.waiters.remove(waiter)
            if not queue.waiters:
                del self._queues[(model, info.family, info.embeddings)]
            self._schedule_dispatch()
        return self.get(model)

    def _hand_out_free(self, model: str, info: ModelInfo, now: float) -> Key | None:
        """Hands out the best key for ``model`` if one is free now; None if all are locked.

        Raises:
            NoKeysForFamily: no key is eligible for the model.
        """
        selected = self._select(self._eligible(model, info), now)
        if selected is None:
            raise NoKeysForFamily(info.family, model)
        index, (until, entry) = selected
        return self._hand_out(index, entry, now) if until <= now else None

    def _schedule_dispatch(self) -> None:
        """Looks at the waiters soon (once per loop turn however often asked)."""
        if self._queues:
            if not self._dispatch_pending:
                self._dispatch_pending = True
                asyncio.get_running_loop().call_soon(self._dispatch)
        elif self._timer is not None:
            self._timer.cancel()
            self._timer, self._timer_at = None, math.inf

    def _dispatch(self) -> None:
        """Wakes each queue's head whose key is free; sets the timer for the next unlock."""
        self._dispatch_pending = False
        now = self._clock.now()
        first_unlock = math.inf
        for queue in self._queues.values():
            head = queue.waiters[0]
            if head.future.done():
                continue  # already woken; it acts when it runs
            selected = self._select(self._eligible(queue.model, queue.info), now)
            until = 0.0 if selected is None else selected[1][0]
            if until <= now:
                head.wake()  # a free key, or none at all (the head raises)
            elif until < first_unlock:
                first_unlock = until
        if first_unlock != self._timer_at or self._timer is None:
            if self._timer is not None:
                self._timer.cancel()
                self._timer = None
            self._timer_at = first_unlock
            if first_unlock < math.inf:
                self._timer = self._clock.call_at(first_unlock, self._on_timer)

    def _on_timer(self) -> None:
        self._timer, self._timer_at = None, math.inf
        self._dispatch()

    def _hand_out(self, index: _FamilyIndex, entry: _ReadyEntry | _LockedEntry, now: float) -> Key:
        """Throttles the key of ``entry`` (the top of ``index``) for its family and returns it."""
        index.pop_top(entry)
        state = entry[-1]
        assert isinstance(state, RateState)
        key = state.key
        state.last_used = state.rate_limited_at = key.last_used = now
        # The previous answer's headers are spent; the coming answer brings its own.
        state.requests_reset = state.tokens_reset = None
        state.remaining_requests = state.remaining_tokens = None
        state.saw_rate_limit = False
        state.rate_limit_kind = ""
        if state.budget_at:  # only a budget needs to know what is in flight
            if state.reserved is None:
                state.reserved = deque()
            state.reserved.append((now, self._token_reserve(index.family)))
        self._derive(state, now)
        wide = key.wide
        if wide is None:
            index.push(state, now)
        else:
            # Key-wide reports describe answers before this hand-out, as in the seed.
            key.wide = None
            self._wide_keys.discard(key)
            self._push_all(key, now)
        self._store.changed(key)
        self._observer.handed_out(index.family)
        return key

    def lockout_period(self, model: str) -> float:
        """Seconds until a key for ``model`` is free.

        Zero when one is free now, and zero when none is eligible at all (or the
        family is disallowed) so the caller goes ahead and gets Get's clear error
        instead of waiting forever. Uses exactly Get's eligibility rule.
        """
        model = model or DEFAULT_LOCKOUT_MODEL
        _check_model(model)
        return self._lockout(model, self._models.lookup(model))

    def family_lockout(self, family: str) -> float:
        """``lockout_period`` over every key of ``family``, whatever models it lists.

        For status pages and metrics: a family nobody has asked about is not
        indexed for it; only key-wide locks can hold its keys back then.
        """
        if family in self._indexed_families:
            return self._lockout(None, ModelInfo(family, embeddings=False))
        if self._allowed is not None and family not in self._allowed:
            return 0.0
        live = sum(g.live for g in self._groups.values() if family in g.profile.families)
        now = self._clock.now()
        locked, first_unlock = 0, math.inf
        for key in self._wide_keys:
            wide = key.wide
            if wide is None or wide.until <= now or not key.indexed:
                continue
            if family in key.profile.families:
                locked += 1
                first_unlock = min(first_unlock, wide.until)
        if live == 0 or locked < live:
            return 0.0
        return first_unlock - now

    def _lockout(self, model: str | None, info: ModelInfo) -> float:
        if self._allowed is not None and info.family not in self._allowed:
            return 0.0
        now = self._clock.now()
        selected = self._select(self._eligible(model, info), now)
        return 0.0 if selected is None else max(0.0, selected[1][0] - now)

    def _select(self, indexes: list[_FamilyIndex], now: float) -> tuple[_FamilyIndex, _Top] | None:
        """The best key over ``indexes`` (selection order in the module docstring)."""
        best: tuple[_FamilyIndex, _Top] | None = None
        best_rank: tuple[float, ...] | None = None
        for index in indexes:
            top = index.top(now)
            if top is None:
                continue
            if len(indexes) == 1:
                return index, top
            profile = index.profile
            trial_rank = 0 if profile.is_trial else 1
            has_32k_rank = 1 if GPT4_32K in profile.families else 0
            until, entry = top
            if len(entry) == 3:  # (last_used, seq, state)
                rank: tuple[float, ...] = (until, trial_rank, has_32k_rank, entry[0], entry[1])
            else:  # (until, last_used, seq, state)
                rank = (until, trial_rank, has_32k_rank, entry[1], entry[2])
            if best_rank is None or rank < best_rank:
                best, best_rank = (index, top), rank
        return best

    def _eligible(self, model: str | None, info: ModelInfo) -> list[_FamilyIndex]:
        """The family indexes whose keys may serve the model; shared by get, lockout, waiters.

        ``model`` None: every index serving the family, whatever its model ids.
        """
        cache_key = (model, info.family, info.embeddings)
        indexes = self._eligible_cache.get(cache_key)
        if indexes is None:
            self._index_family(info.family)
            indexes = [
                group.indexes[info.family]
                for group in self._groups.values()
                if group.profile.serves(model, info.family, embeddings=info.embeddings)
            ]
            if len(self._eligible_cache) >= ELIGIBLE_CACHE_SIZE:
                self._eligible_cache.clear()
            self._eligible_cache[cache_key] = indexes
        return indexes

    # -- learning from upstream answers --------------------------------------

    def mark_rate_limited(self, key_hash: str, model: str = "") -> None:
        """Records that the upstream answered 429 for the key just now.

        With ``model``, only the model's family is locked; without, every family.
        """
        key = self.key(key_hash)
        if model:
            _check_model(model)
        state = self._report_state(key, model)
        now = self._clock.now()
        first_report = self._mark(state, now)
        self._reposition(state, now)
        if first_report:  # once per hand-out: proxies may report the same 429 twice
            reason = f"upstream answered 429 for {model}" if model else "upstream answered 429"
            self._state_changed(key, KeyChange.RATE_LIMITED, reason)

    def update_rate_limits(
        self, key_hash: str, headers: Mapping[str, str], model: str = ""
    ) -> None:
        """Records an answer's rate-limit headers: resets (Go durations, clamped to
        10 s) and remaining requests and tokens.

        With ``model``, they apply to the model's family; without, key-wide. An
        unparseable value is ignored and logged; without any of the headers
        nothing changes. Together with ``mark_rate_limited`` the result does not
        depend on which of the two is reported first.
        """
        key = self.key(key_hash)
        _check_headers(headers)
        if model:
            _check_model(model)
        parsed = _parse_rate_headers(key, headers)
        if parsed is None:
            return
        state = self._report_state(key, model)
        now = self._clock.now()
        if model:  # an answer for the family: its hand-out is no longer in flight
            _release(state)
        _apply_rate_headers(state, parsed, now)
        self._reposition(state, now)

    def _report_state(self, key: Key, model: str) -> RateState:
        """The state a report about ``model`` changes: its family's, or key-wide without one."""
        if not model:
            wide = key.wide
            if wide is None:
                # The window of a key-wide report starts at the key's last hand-out.
                wide = key.wide = RateState(key, "", rate_limited_at=key.last_used)
                self._wide_keys.add(key)
            return wide
        family = self._models.family(model)
        # States exist only for indexed families (family_lockout relies on it).
        self._index_family(family)
        state = key.state_in(family)
        if state is None:  # the key's profile lacks the family, or it is disabled
            state = key.add_state(RateState(key, family))
        return state

    @staticmethod
    def _mark(state: RateState, now: float, kind: str = "") -> bool:
        """Records a 429 (of type ``kind``, "" if unknown) in ``state``; True when it
        is the first since the hand-out.

        A 429 is authoritative: a budgeted dimension it names is spent now, whatever
        the remaining header said.
        """
        first = not state.saw_rate_limit
        state.rate_limited_at = now
        state.saw_rate_limit = True
        state.rate_limit_kind = kind if kind in ("requests", "tokens") else ""
        if state.rate_limit_kind == "requests" and state.requests_rate is not None:
            state.budget_at, state.budget_requests = now, 0.0
        elif state.rate_limit_kind == "tokens" and state.tokens_rate is not None:
            state.budget_at, state.budget_tokens = now, 0.0
        return first

    def increment_usage(self, key_hash: str, model: str, tokens: int) -> None:
        """Adds a finished request's tokens to the model family's usage."""
        key = self.key(key_hash)
        _check_model(model)
        if not 0 <= tokens <= Limits.TOKENS:
            raise InvalidArgument("tokens", f"must be between 0 and {Limits.TOKENS}")
        family = self._models.family(model)
        key.token_usage[family] = key.token_usage.get(family, 0) + tokens
        if tokens:  # 0: the proxy did not read the usage, which says nothing of the size
            self._learn_tokens(family, tokens)
        key.prompt_count += 1
        self._store.changed(key)
        self._observer.tokens_used(family, tokens)

    def report_outcome(
        self,
        key_hash: str,
        model: str,
        *,
        status: int,
        headers: Mapping[str, str],
        error: UpstreamError,
        prompt_tokens: int = 0,
        completion_tokens: int = 0,
    ) -> tuple[Decision, Key]:
        """Applies one upstream answer: the whole table of ``keysvc.outcomes.decide``.

        Every input is checked before anything changes. The headers are stored
        as ``update_rate_limits`` does; then, as the answer says, the tokens are
        counted, the key is disabled, or it is marked rate limited for the
        model. A caller that disables must ``flush`` before acknowledging.

        Returns:
            The decision (action, what was done and why) and the key.
        """
        key = self.key(key_hash)
        _check_model(model)
        _check_headers(headers)
        if not 100 <= status <= 599:
            raise InvalidArgument("status", "must be an HTTP status code (100 to 599)")
        for name, value in (("error_type", error.type), ("error_code", error.code)):
            if len(value) > Limits.ERROR_NAME_LENGTH:
                raise InvalidArgument(name, f"is longer than {Limits.ERROR_NAME_LENGTH} characters")
        if len(error.message) > Limits.ERROR_MESSAGE_LENGTH:
            raise InvalidArgument(
                "error_message", f"is longer than {Limits.ERROR_MESSAGE_LENGTH} characters"
            )
        for name, tokens in (
            ("prompt_tokens", prompt_tokens),
            ("completion_tokens", completion_tokens),
        ):
            if not 0 <= tokens <= Limits.TOKENS:
                raise InvalidArgument(name, f"must be between 0 and {Limits.TOKENS}")
        decision = decide(status, error)
        parsed = _parse_rate_headers(key, headers)
        now = self._clock.now()
        answered = key.state_in(self._models.family(model))
        released = answered is not None and _release(answered)
        if parsed is not None or decision.rate_limited or released:
            state = self._report_state(key, model)
            if parsed is not None:
                _apply_rate_headers(state, parsed, now)
            first_report = decision.rate_limited and self._mark(state, now, error.type)
            self._reposition(state, now)
            if first_report:
                self._state_changed(key, KeyChange.RATE_LIMITED, decision.why)
        if decision.count_usage:
            tokens = min(prompt_tokens + completion_tokens, Limits.TOKENS)
            self.increment_usage(key.hash, model, tokens)
        if decision.disable is not None:
            self.disable(key.hash, decision.disable)
        self._observer.outcome_reported(decision.action.value)
        return decision, key

    # -- key state -------------------------------------------------------------

    def disable(self, key_hash: str, reason: DisableReason) -> Key:
        """Takes a key out of service for good (until a recheck); its families are kept."""
        key = self.key(key_hash)
        # Newer news than a Recheck in flight: the key's check must not revive it.
        key.revive_if_alive = False
        change: KeyChange | None = None
        if reason is DisableReason.REVOKED:
            change = None if key.is_revoked else KeyChange.REVOKED
            key.is_revoked = True
        elif reason is DisableReason.QUOTA:
            change = None if key.is_over_quota else KeyChange.OVER_QUOTA
            key.is_over_quota = True
        elif not key.is_disabled:
            change = KeyChange.DISABLED
        if key.is_disabled:
            # The first report is kept; a later one may only name a reason.
            if key.disable_reason is DisableReason.UNSPECIFIED:
                key.disable_reason = reason
        else:
            key.is_disabled = True
            key.disable_reason = reason
            key.disabled_at = self._clock.now()
            self._unplace(key)
        if change is not None:
            self._state_changed(key, change, reason.value)
        self._store.changed(key)
        return key

    def recheck(self, *, until_checked: bool = False) -> None:
        """Marks every key unchecked so it is checked again.

        Args:
            until_checked: a key checker is running. Keys disabled now stay
                disabled, and out of every Get, until their new check says they
                are alive (``apply_check``). Without a checker (False) every
                key's disabled, revoked and over-quota flags are cleared at
                once, as the seed does.
        """
        if until_checked:
            for key in self._store:
                key.last_checked = 0.0
                key.revive_if_alive = key.is_disabled
                self._store.changed(key)
            _log.info("all keys marked for recheck", extra={"keys": len(self._store)})
            return
        now = self._clock.now()
        for key in self._store:
            key.last_checked = 0.0
            if key.is_disabled:
                self._enable(key, now)
            self._store.changed(key)
        _log.info("all keys marked for recheck", extra={"keys": len(self._store)})

    # -- what the key checker learned -----------------------------------------

    def apply_check(
        self,
        key_hash: str,
        *,
        model_ids: Iterable[str] | None,
        is_trial: bool,
        organization_id: str | None = None,
    ) -> Key:
        """Records a check that found the key alive.

        Args:
            key_hash: the checked key.
            model_ids: the ids the upstream listed for the key; None when the
                list could not be read this time (the known ones are kept).
            is_trial: the key is trial-level.
            organization_id: the key's default organization, when learned.

        A key disabled before a Recheck (``revive_if_alive``) comes back into
        service; a key disabled since (by a proxy's report) stays disabled.
        """
        key = self.key(key_hash)
        profile = key.profile
        if model_ids is not None:
            ids = frozenset(model_ids)
            ids = self._model_id_sets.setdefault(ids, ids)
            profile = KeyProfile(self._models.listed_families(ids), is_trial, ids)
        else:
            profile = KeyProfile(profile.families, is_trial, profile.model_ids)
        self._set_profile(key, profile)
        if organization_id is not None:
            key.organization_id = organization_id
        key.last_checked = self._clock.now()
        if key.is_disabled and key.revive_if_alive:
            self._enable(key, key.last_checked)
            _log.info("key alive again after recheck", extra={"key_hash": key.hash})
        key.revive_if_alive = False
        self._store.changed(key)
        return key

    def apply_dead_check(self, key_hash: str, reason: DisableReason) -> Key:
        """Records a check that found the key revoked or out of quota."""
        key = self.key(key_hash)
        key.last_checked = self._clock.now()
        if key.is_disabled and key.revive_if_alive:
            # Still dead after a Recheck: the new verdict replaces the old one.
            key.revive_if_alive = False
            key.is_revoked = reason is DisableReason.REVOKED
            key.is_over_quota = reason is DisableReason.QUOTA
            key.disable_reason = reason
            self._store.changed(key)
            _log.info(
                "key still disabled after recheck",
                extra={"key_hash": key.hash, "reason": reason.value},
            )
            return key
        return self.disable(key_hash, reason)

    def clone_for_org(self, key_hash: str, organization_id: str) -> Key | None:
        """Adds an unchecked clone of a key for another of its organizations.

        Returns:
            The clone, or None when that clone is already in the pool.
        """
        parent = self.key(key_hash)
        if not organization_id:
            raise InvalidArgument("organization_id", "is required")
        clone = self.add_key(parent.secret, organization_id=organization_id)
        if clone is not None:
            clone.cloned_from = parent.hash
            self._store.changed(clone)
            self._state_changed(
                clone,
                KeyChange.CLONED,
                f"key belongs to organization {organization_id}",
                parent_hash=parent.hash,
            )
        return clone

    # -- queries -------------------------------------------------------------

    def key(self, key_hash: str) -> Key:
        """The key with ``key_hash``.

        Raises:
            InvalidArgument: the hash is empty or too long.
            KeyNotFound: no key has that hash.
        """
        if not key_hash:
            raise InvalidArgument("hash", "is required")
        if not HASH_PATTERN.fullmatch(key_hash):
            raise InvalidArgument("hash", "is not a key hash (they look like oai-0123abcd)")
        key = self._store.get(key_hash)
        if key is None:
            raise KeyNotFound(key_hash)
        return key

    def keys(self) -> list[Key]:
        """Every key, in load order."""
        return list(self._store)

    def families(self) -> tuple[str, ...]:
        """Every family the model table knows, in table order."""
        return self._models.families

    def now(self) -> float:
        """The pool's clock, for views that judge whether a key is locked."""
        return self._clock.now()

    @property
    def observer(self) -> PoolObserver:
        """Where the pool reports its events; the key checker reports check results here."""
        return self._observer

    def available(self) -> int:
        """How many keys are not disabled."""
        return sum(group.live for group in self._groups.values())

    def __len__(self) -> int:
        return len(self._store)

    # -- index upkeep ----------------------------------------------------------

    def _state_changed(self, key: Key, change: KeyChange, reason: str, **fields: str) -> None:
        """The one place a key state change is logged and reported, once per change."""
        event, level = _CHANGE_LOGS[change]
        _log.log(level, event, extra={"key_hash": key.hash, "reason": reason, **fields})
        self._observer.state_changed(key.hash, change, reason)

    def _derive(self, state: RateState, now: float) -> None:
        """``state.until``: the latest of the reuse throttle, the rate-limit window
        and the budget (module docstring). The key-wide state has neither throttle
        nor budget of its own. Reservations that have lapsed are dropped first."""
        reserved = state.reserved
        if reserved is not None:
            while reserved and reserved[0][0] + RESERVATION_TTL <= now:
                reserved.popleft()
            if not reserved:  # an empty deque costs ~760 B per (key, family)
                state.reserved = None
        if not state.last_used and not state.rate_limited_at and not state.budget_at:
            state.until = 0.0
            return
        until = state.rate_limited_at + _window(state) if state.rate_limited_at else 0.0
        if state.last_used and state.last_used + self._reuse_delay > until:
            until = state.last_used + self._reuse_delay
        if state.budget_at:
            budget = _budget_until(state, self._token_reserve(state.family))
            if budget > until:
                until = budget
        state.until = until

    def _token_reserve(self, family: str) -> float:
        """Tokens a hand-out in ``family`` reserves (``TOKEN_ESTIMATE_*``); 1 before any usage."""
        stats = self._token_stats.get(family)
        if stats is None:
            return 1.0
        mean, variance = stats
        return max(1.0, mean + TOKEN_ESTIMATE_SPREAD * math.sqrt(variance))

    def _learn_tokens(self, family: str, tokens: int) -> None:
        """Folds one finished request's tokens into the family's estimate."""
        stats = self._token_stats.get(family)
        if stats is None:
            self._token_stats[family] = (float(tokens), 0.0)
            return
        mean, variance = stats
        delta = tokens - mean
        mean += TOKEN_ESTIMATE_WEIGHT * delta
        # The exponentially weighted variance (West's incremental form).
        variance = (1 - TOKEN_ESTIMATE_WEIGHT) * (variance + TOKEN_ESTIMATE_WEIGHT * delta * delta)
        self._token_stats[family] = (mean, variance)

    def _reposition(self, state: RateState, now: float) -> None:
        """Re-derives ``state`` and re-places its key where the change matters."""
        self._derive(state, now)
        key = state.key
        if key.indexed:
            if state is key.wide:
                self._push_all(key, now)
            else:
                index = self._groups[key.profile].indexes.get(state.family)
                if index is not None:
                    index.push(state, now)
        self._store.changed(key)
        if self._queues:  # a lock may have got shorter
            self._schedule_dispatch()

    def _push_all(self, key: Key, now: float) -> None:
        """(Re-)places an indexed key in every family index of its profile."""
        for family, index in self._groups[key.profile].indexes.items():
            state = key.state_in(family)
            if state is None:
                state = key.add_state(RateState(key, family))
            index.push(state, now)

    def _enable(self, key: Key, now: float) -> None:
        """Undoes a disable: the flags, reason and time go, the key is indexed again."""
        key.is_disabled = key.is_revoked = key.is_over_quota = False
        key.disable_reason = None
        key.disabled_at = 0.0
        self._place(key, now)

    def _place(self, key: Key, now: float) -> None:
        group = self._group_for(key.profile)
        if not key.indexed:
            group.live += 1
            key.indexed = True
        self._push_all(key, now)
        if self._queues:  # a key came (back) into service
            self._schedule_dispatch()

    def _unplace(self, key: Key) -> None:
        if not key.indexed:
            return
        key.indexed = False
        for state in key.family_states():
            state.entry = None
        group = self._groups[key.profile]
        group.live -= 1
        if group.live == 0:
            # Checks move keys between profiles; do not keep empty ones to scan.
            del self._groups[key.profile]
            self._eligible_cache.clear()
        if self._queues:  # waiters whose last key this was must hear of it
            self._schedule_dispatch()

    def _set_profile(self, key: Key, profile: KeyProfile) -> None:
        """Moves a key to another profile: out of the old index before the profile changes."""
        profile = self._intern(profile)
        if profile is key.profile:
            return
        placed = key.indexed
        self._unplace(key)
        key.profile = profile
        if placed:
            self._place(key, self._clock.now())

    def _group_for(self, profile: KeyProfile) -> _ProfileGroup:
        group = self._groups.get(profile)
        if group is None:
            group = self._groups[profile] = _ProfileGroup(profile)
            for family in self._indexed_families & profile.families:
                group.indexes[family] = _FamilyIndex(group, family, self._reuse_delay)
            self._eligible_cache.clear()
        return group

    def _index_family(self, family: str) -> None:
        """Indexes every key for ``family`` the first time someone asks about it.

        One pass over the pool, once per family in the process's life.
        """
        if family in self._indexed_families:
            return
        self._indexed_families.add(family)
        for group in self._groups.values():
            if family in group.profile.families:
                group.indexes[family] = _FamilyIndex(group, family, self._reuse_delay)
        now = self._clock.now()
        # Two new objects per key: without the collector running over the whole
        # pool again and again meanwhile, the pass takes a third of the time.
        collecting = gc.isenabled()
        gc.disable()
        try:
            for key in self._store:
                if key.indexed and family in key.profile.families:
                    state = key.state_in(family)
                    if state is None:
                        state = key.add_state(RateState(key, family))
                    self._groups[key.profile].indexes[family].append(state, now)
        finally:
            if collecting:
                gc.enable()
        for group in self._groups.values():
            index = group.indexes.get(family)
            if index is not None:
                index.heapify()
        self._eligible_cache.clear()

    def _intern(self, profile: KeyProfile) -> KeyProfile:
        return self._profiles.setdefault(profile, profile)

    def _take_seq(self) -> int:
        self._next_seq += 1
        return self._next_seq


class _RateHeaders(NamedTuple):
    """Parsed rate-limit headers, each None when absent or unparseable."""

    #: x-ratelimit-reset-*, in seconds, as sent (not clamped).
    requests_reset: float | None
    tokens_reset: float | None
    remaining_requests: int | None
    remaining_tokens: int | None
    limit_requests: int | None
    limit_tokens: int | None


def _parse_rate_headers(key: Key, headers: Mapping[str, str]) -> _RateHeaders | None:
    """The x-ratelimit-reset-*, -remaining-* and -limit-* values; None when there are none."""
    if not headers:
        return None
    lowered = {name.lower(): value for name, value in headers.items()}
    parsed = _RateHeaders(
        _reset(key, REQUESTS_RESET_HEADER, lowered.get(REQUESTS_RESET_HEADER)),
        _reset(key, TOKENS_RESET_HEADER, lowered.get(TOKENS_RESET_HEADER)),
        _count(key, REMAINING_REQUESTS_HEADER, lowered.get(REMAINING_REQUESTS_HEADER)),
        _count(key, REMAINING_TOKENS_HEADER, lowered.get(REMAINING_TOKENS_HEADER)),
        _count(key, LIMIT_REQUESTS_HEADER, lowered.get(LIMIT_REQUESTS_HEADER)),
        _count(key, LIMIT_TOKENS_HEADER, lowered.get(LIMIT_TOKENS_HEADER)),
    )
    return None if all(value is None for value in parsed) else parsed


def _reset(key: Key, header: str, raw: str | None) -> float | None:
    if raw is None:
        return None
    seconds = parse_go_duration(raw)
    if seconds is None:
        _log_unparseable(key, header, raw)
        return None
    return seconds


def _count(key: Key, header: str, raw: str | None) -> int | None:
    if raw is None:
        return None
    text = raw.strip()
    if not (text.isascii() and text.isdigit() and len(text) <= 18):
        _log_unparseable(key, header, raw)
        return None
    return int(text)


def _log_unparseable(key: Key, header: str, raw: str) -> None:
    _log.warning(
        "ignoring unparseable rate-limit header",
        extra={"key_hash": key.hash, "header": header, "value": _loggable(raw)},
    )


def _apply_rate_headers(state: RateState, parsed: _RateHeaders, now: float) -> None:
    """Stores what the headers told; a header that was not sent leaves its field alone.

    Resets are stored clamped to ``MAX_RESET``. A remaining sent with its limit
    and reset also sets the family's budget (``KeyPool`` docstring): what is
    left now and its refill rate, (limit - remaining) / reset, the reset being
    the time until the whole limit is back.
    """
    if parsed.requests_reset is not None:
        state.requests_reset = min(parsed.requests_reset, MAX_RESET)
    if parsed.tokens_reset is not None:
        state.tokens_reset = min(parsed.tokens_reset, MAX_RESET)
    if parsed.remaining_requests is not None:
        state.remaining_requests = parsed.remaining_requests
    if parsed.remaining_tokens is not None:
        state.remaining_tokens = parsed.remaining_tokens
    if not state.family:  # the key-wide state: reports for no model have no budget
        return
    requests_rate = _refill_rate(
        parsed.limit_requests, parsed.remaining_requests, parsed.requests_reset
    )
    tokens_rate = _refill_rate(parsed.limit_tokens, parsed.remaining_tokens, parsed.tokens_reset)
    if requests_rate is not None:
        state.requests_rate = requests_rate
    if tokens_rate is not None:
        state.tokens_rate = tokens_rate
    if state.requests_rate is not None and parsed.remaining_requests is not None:
        state.budget_at = now
        # The int itself, shared with remaining_requests: no float per key and family.
        state.budget_requests = parsed.remaining_requests
    if state.tokens_rate is not None and parsed.remaining_tokens is not None:
        state.budget_at = now
        state.budget_tokens = parsed.remaining_tokens


def _refill_rate(limit: int | None, remaining: int | None, reset: float | None) -> float | None:
    """Per second: what is missing of ``limit`` over the time it takes to come back."""
    if limit is None or remaining is None or reset is None or reset <= 0 or remaining >= limit:
        return None
    return (limit - remaining) / reset


def _window(state: RateState) -> float:
    """How long after ``rate_limited_at`` the key stays locked (module docstring).

    A dimension (requests or tokens) with a known refill rate is left to the
    budget (``_budget_until``): here it neither locks on its remaining nor,
    after a 429 of its type, on its reset.
    """
    requests_reset, tokens_reset = state.requests_reset, state.tokens_reset
    by_budget = {
        "requests": state.requests_rate is not None,
        "tokens": state.tokens_rate is not None,
    }
    if state.saw_rate_limit:
        kind = state.rate_limit_kind
        if by_budget.get(kind, False):
            return 0.0
        matching = {"requests": requests_reset, "tokens": tokens_reset}.get(kind)
        if matching is not None:
            return matching
    elif state.remaining_requests is not None or state.remaining_tokens is not None:
        window = 0.0
        if state.remaining_requests == 0 and not by_budget["requests"]:
            window = RATE_LIMIT_FALLBACK if requests_reset is None else requests_reset
        if state.remaining_tokens == 0 and not by_budget["tokens"]:
            window = max(window, RATE_LIMIT_FALLBACK if tokens_reset is None else tokens_reset)
        return window
    if requests_reset is not None or tokens_reset is not None:
        return max(r for r in (requests_reset, tokens_reset) if r is not None)
    return RATE_LIMIT_FALLBACK if state.saw_rate_limit else 0.0


def _release(state: RateState) -> bool:
    """Ends the oldest reservation of ``state`` (an answer came); False when there was none.

    Answers are not matched to hand-outs (a report names only the key and model);
    the oldest is the likeliest, and a mismatch only keeps a newer reservation a
    little longer than needed, which errs on the side of fewer 429s.
    """
    if not state.reserved:
        return False
    state.reserved.popleft()
    if not state.reserved:
        state.reserved = None
    return True


def _budget_until(state: RateState, tokens_needed: float) -> float:
    """When the family's budget covers the hand-outs in flight and one more; 0 if no budget.

    Each dimension with a known budget refills at its rate from ``budget_at``;
    the wait is capped at ``MAX_RESET`` (as resets are), and ends when the
    oldest reservation lapses, since the budget is over-counted from then.
    """
    reserved = state.reserved
    in_flight = len(reserved) if reserved else 0
    reserved_tokens = sum(tokens for _, tokens in reserved) if reserved else 0.0
    wait = 0.0
    for left, rate, needed in (
        (state.budget_requests, state.requests_rate, in_flight + 1.0),
        (state.budget_tokens, state.tokens_rate, reserved_tokens + tokens_needed),
    ):
        if left is not None and rate is not None and needed > left:
            wait = max(wait, (needed - left) / rate)
    if wait <= 0.0:
        return 0.0
    until = state.budget_at + min(wait, MAX_RESET)
    if reserved:
        until = min(until, reserved[0][0] + RESERVATION_TTL)
    return until


def _check_model(model: str) -> None:
    if not model:
        raise InvalidArgument("model", "is required")
    if len(model) > Limits.MODEL_LENGTH:
        raise InvalidArgument("model", f"is longer than {Limits.MODEL_LENGTH} characters")


#: Characters a duration is written with; a value with any other character is
#: not logged verbatim, in case a caller put something secret in it.
_DURATION_CHARS: Final = re.compile(r"[0-9.hmnsuµ+-]{0,32}")


def _loggable(value: str) -> str:
    if _DURATION_CHARS.fullmatch(value):
        return value
    return f"<{len(value)} characters, not shown>"


def _check_headers(headers: Mapping[str, str]) -> None:
    if len(headers) > Limits.HEADER_COUNT:
        raise InvalidArgument("headers", f"more than {Limits.HEADER_COUNT} headers")
    for name, value in headers.items():
        if not name or len(name) > Limits.HEADER_NAME_LENGTH:
            raise InvalidArgument(
                "headers", f"header names must be 1 to {Limits.HEADER_NAME_LENGTH} characters"
            )
        if len(value) > Limits.HEADER_VALUE_LENGTH:
            raise InvalidArgument(
                "headers",
                f"header {name[:64]!r} is longer than {Limits.HEADER_VALUE_LENGTH} characters",
            )
