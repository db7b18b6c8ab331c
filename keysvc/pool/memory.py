"""The in-memory pool backend: the keys of one process and their selection indexes.

The pool imports nothing from grpc. Every method runs on the server's event loop
and none awaits (except ``get_waiting``, which waits between atomic steps), so
select-and-throttle is atomic without locks. What a header, a 429 and a budget
mean, and the selection order, are the rules of ``keysvc.pool.rules``; this
module keeps the state they apply to. ``MemoryBackend`` puts a ``KeyPool``
behind the seam the servicer calls (``keysvc.pool.backend``).

Keys are grouped by ``KeyProfile`` (families, trial flag and, once the checker
has listed them, the key's model ids): all keys of one profile share rules 3
and 4. Each group has one index per family, created when that family is first
asked for (then for every key of the profile at once), with two queues: keys
free, by last use, and keys locked, by unlock time, moved to the first queue
when it comes. A selection peeks one queue head per eligible profile: O(P) for
P distinct profiles (a handful) whatever the number of keys n (O(log n) only
for keys that arrive out of order, such as the end of a rate-limit lock),
instead of the seed's sort of the whole pool. A family gets a table only
when it is indexed or reported (or its usage counted), so families nobody
asks for cost no memory.

Queue entries are never updated in place: when a key moves, a new entry is
pushed and the family's table marks which queue holds it; an entry is stale
once its key has moved on (``_FamilyIndex``), and is dropped when it reaches a
queue head or when the queues are compacted. A family-state change re-places
the key in that family's index only; a key-wide change re-places it in every
index it is in.
"""

from __future__ import annotations

import asyncio
import heapq
import logging
import math
from collections import deque
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import replace
from typing import Final

from ..clock import Clock, Timer
from ..errors import (
    FamilyDisallowed,
    InvalidArgument,
    KeyNotFound,
    KeysBusy,
    NoKeysForFamily,
)
from ..events import KeyChange, NullObserver, PoolObserver
from ..keys import DisableReason, Key, KeyProfile, hash_key, service_of
from ..listing import KeyFilter, LoadOrder, Page
from ..models import GPT4_32K, ModelInfo, ModelTable
from ..outcomes import Decision, UpstreamError
from ..providers import provider, provider_names
from ..providers.backoff import ProviderBackoff
from ..rates import (
    BUDGET_SHAPE,
    HAS_STATE,
    LOCKED,
    NOT_PLACED,
    NOT_SET,
    READY,
    RateBook,
    RateTable,
)
from ..status import SnapshotSource
from ..store import KeyStore, MemoryKeyStore
from .backend import KeyPage, KeySync, PoolBackend
from .rules import (
    ATTRIBUTION_WINDOW,
    BUDGET_LAPSE,
    CHANGE_LOGS,
    DEADLINE_MARGIN,
    DEFAULT_LOCKOUT_MODEL,
    HASH_PATTERN,
    KEY_REUSE_DELAY,
    MAX_PROMISES,
    MAX_WAIT,
    REPORT_PAIR_WINDOW,
    RESERVATION_TTL,
    TOKEN_ESTIMATE_SPREAD,
    TOKEN_ESTIMATE_WEIGHT,
    Limits,
    Promise,
    RateHeaders,
    apply_rate_headers,
    budget_until,
    check_headers,
    check_model,
    drop_promise,
    forget_budget,
    holds,
    limits_match,
    mark,
    oldest_hand_out,
    parse_rate_headers,
    promise,
    release,
    window,
)

__all__ = ["ELIGIBLE_CACHE_SIZE", "KeyPool", "MemoryBackend", "as_backend"]

_log = logging.getLogger("keysvc.pool")

#: Bound on the eligible-index cache, which is keyed by model name (names come from callers).
ELIGIBLE_CACHE_SIZE: Final = 4096


class _ProfileGroup:
    """The indexed (not disabled) keys of one profile, with one index per family asked for."""

    __slots__ = ("indexes", "live", "profile")

    def __init__(self, profile: KeyProfile) -> None:
        self.profile = profile
        self.indexes: dict[str, _FamilyIndex] = {}
        self.live = 0


#: A heap entry: (time, last_used, seq, key).
_HeapEntry = tuple[float, float, int, Key]


class _Queue:
    """Keys in order of (time, last use, seq): an in-order run beside a heap for the rest.

    Most keys arrive in order, so the run makes them O(1) where a heap of n
    entries costs O(log n) and a cache miss per level: keys are loaded in
    sequence order, and a key handed out was used more recently than any other
    and its throttle ends after theirs (the clock never goes back: ``Clock``).
    The run is deques side by side — the time each key was queued at, the key
    and, where the time is not the last use itself (``keeps_last_use``), the
    last use — with no object per entry. An entry that sorts before the run's
    last goes to the heap as a tuple; the smallest is the smaller of the two heads.

    Entries are not updated when a key moves: the owner pushes a new one, and
    ``live(key, time, last_used)`` tells whether an entry is still where its
    key is. The rest are dropped when they reach a head, or by ``compact``.
    """

    __slots__ = ("heap", "head_in_heap", "keys", "live", "tail", "times", "uses")

    def __init__(self, live: Callable[[Key, float, float], bool], *, keeps_last_use: bool) -> None:
        self.live = live
        self.times: deque[float] = deque()
        self.keys: deque[Key] = deque()
        #: The last use each key was queued with; None when it is the time itself.
        self.uses: deque[float] | None = deque() if keeps_last_use else None
        self.heap: list[_HeapEntry] = []
        #: The order of the run's last entry.
        self.tail: tuple[float, float, int] = (-math.inf, -math.inf, -1)
        #: Where the entry ``head`` returned last is, for ``pop_head``.
        self.head_in_heap = False

    def __len__(self) -> int:
        return len(self.keys) + len(self.heap)

    def push(self, time: float, last_used: float, key: Key, *, ordered: bool = True) -> None:
        """Queues ``key``; unless ``ordered``, without keeping the heap ordered (call
        ``heapify`` after a batch)."""
        order = (time, last_used, key.seq)
        if not self.keys or self.tail <= order:
            self.times.append(time)
            self.keys.append(key)
            if self.uses is not None:
                self.uses.append(last_used)
            self.tail = order
        elif ordered:
            heapq.heappush(self.heap, (time, last_used, key.seq, key))
        else:
            self.heap.append((time, last_used, key.seq, key))

    def heapify(self) -> None:
        heapq.heapify(self.heap)

    def head(self) -> tuple[float, Key] | None:
        """The smallest live entry, (time, key); stale entries before it are dropped."""
        times, keys, uses, heap, live = self.times, self.keys, self.uses, self.heap, self.live
        while keys and not live(keys[0], times[0], times[0] if uses is None else uses[0]):
            self._pop_run()
        while heap and not live(heap[0][3], heap[0][0], heap[0][1]):
            heapq.heappop(heap)
        self.head_in_heap = bool(heap) and (not keys or self._heap_first())
        if keys and not self.head_in_heap:
            return times[0], keys[0]
        return (heap[0][0], heap[0][3]) if heap else None

    def pop_head(self) -> None:
        """Removes the entry ``head`` just returned (nothing may be pushed in between)."""
        if self.head_in_heap:
            heapq.heappop(self.heap)
        else:
            self._pop_run()

    def _pop_run(self) -> None:
        self.keys.popleft()
        self.times.popleft()
        if self.uses is not None:
            self.uses.popleft()

    def _heap_first(self) -> bool:
        """Whether the heap's head sorts before the run's (neither empty)."""
        time = self.times[0]
        last_used = time if self.uses is None else self.uses[0]
        return self.heap[0][:3] < (time, last_used, self.keys[0].seq)

    def compact(self) -> None:
        """Drops every stale entry, and all but one of a key's equal live entries."""
        seen: set[int] = set()
        run: list[tuple[float, float, Key]] = []
        uses = self.times if self.uses is None else self.uses
        for time, last_used, key in zip(self.times, uses, self.keys, strict=True):
            if key.seq not in seen and self.live(key, time, last_used):
                seen.add(key.seq)
                run.append((time, last_used, key))
        heap = []
        for entry in self.heap:
            if entry[2] not in seen and self.live(entry[3], entry[0], entry[1]):
                seen.add(entry[2])
                heap.append(entry)
        heapq.heapify(heap)
        self.times = deque(time for time, _, _ in run)
        self.keys = deque(key for _, _, key in run)
        if self.uses is not None:
            self.uses = deque(last_used for _, last_used, _ in run)
        self.heap = heap
        if run:
            time, last_used, key = run[-1]
            self.tail = (time, last_used, key.seq)


class _FamilyIndex:
    """The keys of one profile, ordered by their state in one family.

    ``ready`` holds the keys free for the family, by last use (least recently
    used first); ``locked`` the keys locked (the reuse throttle, a rate-limit
    window, a budget, a key-wide lock), by unlock time, until that time comes
    and ``top`` moves them to ``ready``. A free key stays free until a change
    re-places it (time alone never locks a key), so ``ready`` needs no upkeep.

    Which queue holds a key's live entry is marked in the family's
    ``RateTable.placed``. An entry is live when its key is marked for its
    queue, still has this profile, and still has what it was queued by (its
    last use in ``ready``; its unlock time and last use in ``locked``).
    """

    __slots__ = ("book", "family", "group", "locked", "profile", "ready", "table")

    def __init__(self, group: _ProfileGroup, family: str, book: RateBook) -> None:
        self.group = group
        self.profile = group.profile
        self.family = family
        self.book = book
        self.table = book.table(family)
        # In ``ready`` the time a key is queued by is its last use.
        self.ready = _Queue(self._ready_live, keeps_last_use=False)
        self.locked = _Queue(self._locked_live, keeps_last_use=True)

    def _ready_live(self, key: Key, time: float, last_used: float) -> bool:
        row = key.seq
        table = self.table
        return (
            table.placed[row] == READY
            and key.indexed  # not a removed key whose row another key has now
            and key.profile is self.profile
            and table.last_used[row] == time
        )

    def _locked_live(self, key: Key, time: float, last_used: float) -> bool:
        # The last use too: a key handed out from ``locked`` can be locked again
        # until the very same time (a budget capped at budget_at + MAX_BUDGET_WAIT), and
        # an entry left from before would then put it ahead of its turn.
        row = key.seq
        table = self.table
        return (
            table.placed[row] == LOCKED
            and key.indexed
            and key.profile is self.profile
            and self.book.lock_end(table, row) == time
            and table.last_used[row] == last_used
        )

    def place(
        self, key: Key, now: float, *, ordered: bool = True, was_until: float = math.nan
    ) -> None:
        """(Re-)places ``key`` by its lock for this family.

        ``was_until``: its unlock time before the change that calls for this,
        when known; a locked key whose unlock time did not change stays put.
        Unless ``ordered``, the heaps are left unordered (call ``heapify``).
        """
        row = key.seq
        table = self.table
        until = self.book.lock_end(table, row)
        last_used = table.last_used[row]
        placed = table.placed[row]
        if until <= now:
            if placed == READY:
                return  # in place: a free key moves only when handed out or locked
            table.placed[row] = READY
            self.ready.push(last_used, last_used, key, ordered=ordered)
        else:
            if placed == LOCKED and until == was_until:
                return  # in place: most answers leave a key where it was
            table.placed[row] = LOCKED
            self.locked.push(until, last_used, key, ordered=ordered)
        if placed != NOT_PLACED and ordered:
            self._compact_if_mostly_stale()  # the key's entry until now is stale

    def _compact_if_mostly_stale(self) -> None:
        """Drops the stale entries once they outnumber the keys. Called where an
        entry goes stale; a key handed out was taken out first, so a Get's
        placement leaves none."""
        if len(self.ready) + len(self.locked) > 2 * self.group.live + 64:
            self.ready.compact()
            self.locked.compact()

    def heapify(self) -> None:
        self.ready.heapify()
        self.locked.heapify()

    def top(self, now: float) -> tuple[float, Key] | None:
        """The best key (free first, else first to unlock) and when it unlocks
        (0.0: it is free now); its entry is left in place."""
        locked, ready, table = self.locked, self.ready, self.table
        first = locked.head()
        while first is not None and first[0] <= now:
            locked.pop_head()
            key = first[1]
            last_used = table.last_used[key.seq]
            table.placed[key.seq] = READY
            ready.push(last_used, last_used, key)
            first = locked.head()
        best = ready.head()
        if best is not None:
            return (0.0, best[1])
        return first

    def pop_top(self, key: Key) -> None:
        """Takes out ``key``, which ``top`` just returned: it is not placed until placed again."""
        row = key.seq
        (self.ready if self.table.placed[row] == READY else self.locked).pop_head()
        self.table.placed[row] = NOT_PLACED

    def unplace(self, key: Key) -> None:
        """Marks ``key`` as in no queue: its entries are stale from now on."""
        if self.table.placed[key.seq] != NOT_PLACED:
            self.table.placed[key.seq] = NOT_PLACED
            self._compact_if_mostly_stale()


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


#: What decides which keys may serve a model: its family, whether it is an
#: embeddings model, and the profiles whose keys serve it.
_WaitClass = tuple[str, bool, frozenset[KeyProfile]]


class _WaitQueue:
    """The waiters for one eligibility class, first come first served.

    Keyed by what decides the answer, not by the model name: callers that ask for
    many names of one family share one queue, and a dispatch costs one selection
    per class however many names there are. ``model`` is the name the queue was
    made for, to select with; each waiter takes its key with its own model.
    """

    __slots__ = ("info", "key", "model", "waiters")

    def __init__(self, key: _WaitClass, model: str, info: ModelInfo) -> None:
        self.key = key
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
        #: Every key's rate-limit state and token usage, by key ``seq``.
        self._book = RateBook(
            split=frozenset(
                family
                for family in models.families
                if provider(models.provider_of(family)).split_token_budgets
            )
        )
        #: Families some caller has asked about: every group has an index for each
        #: of them that its profile has.
        self._indexed_families: set[str] = set()
        self._eligible_cache: dict[tuple[str | None, str, bool], list[_FamilyIndex]] = {}
        #: Keys with a key-wide state (``key.wide``); few, and only they can lock
        #: a family nobody has asked about yet (``family_lockout``).
        self._wide_keys: set[Key] = set()
        #: Per family: (mean, variance) of finished requests' tokens, exponentially weighted.
        self._token_stats: dict[str, tuple[float, float]] = {}
        #: The same of their input and of their output tokens, for families whose
        #: budgets keep them apart (``RateTable.split``), learned from ReportOutcome.
        self._input_stats: dict[str, tuple[float, float]] = {}
        self._output_stats: dict[str, tuple[float, float]] = {}
        #: Per key ``seq``: the family of the answer UpdateRateLimits last reported,
        #: when, and when the hand-out it answered was made; kept for
        #: ``REPORT_PAIR_WINDOW`` (``_pair``), in the order reported.
        self._answered: dict[int, tuple[str, float, float | None]] = {}
        self._answered_order: deque[tuple[float, int]] = deque()
        # get_waiting: queues by eligibility class, the one timer set for the
        # earliest unlock any queue head waits for, and a pending dispatch.
        self._queues: dict[_WaitClass, _WaitQueue] = {}
        #: (caller, family) → the rooms GetLockoutPeriod answers of 0 hold for the
        #: caller's next Gets, oldest first (``lockout_period``), and the callers whose
        #: last hold lapsed unused, who get no more until their next Get.
        self._holds: dict[tuple[str, str], deque[tuple[Key, RateTable, Promise]]] = {}
        self._idle_callers: set[str] = set()
        self._timer: Timer | None = None
        self._timer_at = math.inf
        self._dispatch_pending = False
        self._profiles: dict[KeyProfile, KeyProfile] = {}
        #: What a key of each provider starts as until the checker (or its saved
        #: state) says more: its provider's families only, so Get never crosses providers.
        self._new_key_profiles = {
            name: self._intern(KeyProfile(models.default_key_families(name)))
            for name in provider_names()
        }
        #: Per provider: the back-off its overloads (529) called for.
        self._backoff = ProviderBackoff()
        self._model_id_sets: dict[frozenset[str], frozenset[str]] = {}
        self._next_seq = 0
        #: Rows of removed keys, for the next keys added (``remove_key``).
        self._free_rows: list[int] = []
        #: Every key in load order, for List's pages.
        self._order = LoadOrder()
        now = clock.now()
        for key in store:
            key.profile = self._intern(key.profile)
            key.join(self._book, self._take_seq())
            self._order.add(key)
            if not key.is_disabled:
                self._place(key, now)
            self._arm_quota_back(key)

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
        seq = self._free_rows.pop() if self._free_rows else self._take_seq()
        key = Key(
            secret=secret,
            hash=key_hash,
            profile=self._new_key_profiles[service_of(secret)],
            seq=seq,
            organization_id=organization_id,
        )
        key.join(self._book, seq)
        # A persistent store may give the key its saved state (flags, families, usage).
        self._store.add(key)
        self._order.add(key)
        key.profile = self._intern(key.profile)
        if not key.is_disabled:
            self._place(key, self._clock.now())
        self._arm_quota_back(key)  # a saved spend limit still comes to its end
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
        self._answered.pop(key.seq, None)
        self._store.remove(key_hash)
        self._order.remove(key)
        # Its row serves the next key added: pools that reload changing key sets
        # would otherwise grow a row per key ever added.
        key.leave()
        self._book.clear_row(key.seq)
        self._free_rows.append(key.seq)
        return key

    async def flush(self) -> None:
        """Returns once every change so far is durable in the store (a no-op in memory)."""
        await self._store.flush()

    def restore_clones(self) -> int:
        """Rebuilds the organization clones the store remembers whose parent is in the pool."""
        store = self._store
        saved_clones = getattr(store, "saved_clones", None)
        if saved_clones is None:
            return 0
        restored = 0
        for parent_hash, organization_id in saved_clones():
            if store.get(parent_hash) is None or not organization_id:
                continue
            if self.clone_for_org(parent_hash, organization_id) is not None:
                restored += 1
        return restored

    def sync_keys(self, secrets: Sequence[str]) -> tuple[int, int]:
        """Makes the pool's configured keys exactly ``secrets``; kept keys are not touched.

        Returns:
            How many keys were added and removed (clones included).
        """
        wanted = dict.fromkeys(secrets)
        removed = 0
        for key in self.keys():
            if key.secret not in wanted:
                self.remove_key(key.hash)
                removed += 1
        added = 0
        for secret in wanted:
            if self._store.get(hash_key(secret)) is None and self.add_key(secret) is not None:
                added += 1
        added += self.restore_clones()
        return added, removed

    # -- hand-out ------------------------------------------------------------

    def get(self, model: str, *, caller: str = "") -> Key:
        """Chooses the key most likely to succeed for ``model`` and throttles it.

        ``caller``: who asks (the connection); the room a GetLockoutPeriod answer
        of 0 held for it (``lockout_period``) is its own again first.

        Raises:
            InvalidArgument: ``model`` is empty or too long, or unknown
                (``UnknownModel``) when the operator refuses unknown models.
            FamilyDisallowed: the operator disallows the model's family.
            NoKeysForFamily: no key is eligible for the model.
        """
        check_model(model)
        info = self._models.lookup(model)
        if self._allowed is not None and info.family not in self._allowed:
            raise FamilyDisallowed(info.family, model)
        now = self._clock.now()
        if caller:
            self._redeem_hold(caller, info.family, now)
        selected = self._select(self._eligible(model, info), now)
        if selected is None:
            raise NoKeysForFamily(info.family, model)
        index, (_, key) = selected
        return self._hand_out(index, key, now)

    async def get_waiting(
        self, model: str, max_wait: float, *, time_left: float | None = None, caller: str = ""
    ) -> Key:
        """``get``, but when every eligible key is locked, waits up to ``max_wait``
        seconds for the first to unlock and hands that one out.

        Waiters for a model are served in arrival order; wake-ups are timers at
        the earliest unlock time (and pool changes that may free a key), never
        polling. A waiter that is cancelled (its caller went away) leaves no
        trace: keys are only taken by a waiter that is running. If every key is
        still locked at the deadline, nothing is handed out (``KeysBusy``, with
        the time until the first unlocks). Plain ``get`` calls do not queue. ``time_left``:
        how long the caller will wait for the answer (its deadline); the wait
        ends ``DEADLINE_MARGIN`` before, so no key is taken for a caller that is gone.

        Raises:
            InvalidArgument: ``max_wait`` is negative or over ``MAX_WAIT``, or
                ``model`` is bad.
            FamilyDisallowed, NoKeysForFamily: as ``get``, at once or when the
                last eligible key is disabled while waiting.
            KeysBusy: every eligible key stayed locked for the whole wait. Not the
                key that unlocks first, as a plain ``get`` hands out: a caller that
                waited all it would is the likeliest to drop it unused, and every
                such hand-out held the key's budget until its reservation lapsed
                (10 s), so the waiters after it ran out too (the high-limit
                simulation stalled so); one that does use it gets a 429.
        """
        check_model(model)
        if not 0.0 <= max_wait <= MAX_WAIT:
            raise InvalidArgument("max_wait", f"must be between 0 and {MAX_WAIT:g} seconds")
        if max_wait == 0.0:
            return self.get(model, caller=caller)
        if time_left is not None:
            max_wait = max(0.0, min(max_wait, time_left - DEADLINE_MARGIN))
        info = self._models.lookup(model)
        if self._allowed is not None and info.family not in self._allowed:
            raise FamilyDisallowed(info.family, model)
        now = self._clock.now()
        if caller:
            self._redeem_hold(caller, info.family, now)
        indexes = self._eligible(model, info)
        wait_class = (info.family, info.embeddings, frozenset(ix.profile for ix in indexes))
        queue = self._queues.get(wait_class)
        if queue is None:  # nobody waits before us: a free key is ours
            key = self._hand_out_free(model, info, now)
            if key is not None:
                return key
            if max_wait == 0.0:  # the caller's deadline leaves no time to wait
                raise self._keys_busy(model, info)
            queue = self._queues[wait_class] = _WaitQueue(wait_class, model, info)
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
                del self._queues[queue.key]
            self._schedule_dispatch()
        key = self._hand_out_free(model, info, now)
        if key is None:
            raise self._keys_busy(model, info)
        return key

    def _keys_busy(self, model: str, info: ModelInfo) -> KeysBusy:
        return KeysBusy(info.family, model, self._lockout(model, info))

    def _hand_out_free(self, model: str, info: ModelInfo, now: float) -> Key | None:
        """Hands out the best key for ``model`` if one is free now; None if all are locked.

        Raises:
            NoKeysForFamily: no key is eligible for the model.
        """
        selected = self._select(self._eligible(model, info), now)
        if selected is None:
            raise NoKeysForFamily(info.family, model)
        index, (until, key) = selected
        return self._hand_out(index, key, now) if until <= now else None

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

    def _hand_out(self, index: _FamilyIndex, key: Key, now: float) -> Key:
        """Throttles ``key`` (the top of ``index``) for the index's family and returns it."""
        index.pop_top(key)
        table, row = index.table, key.seq
        table.last_used[row] = table.rate_limited_at[row] = key.last_used = now
        # The previous answer's headers are spent; the coming answer brings its own.
        table.requests_reset[row] = table.tokens_reset[row] = NOT_SET
        table.remaining_requests[row] = table.remaining_tokens[row] = NOT_SET
        table.flags[row] = HAS_STATE | (table.flags[row] & BUDGET_SHAPE)
        # In flight until answered: for the budget, and so that a report naming no
        # model can be matched to it.
        reserved = table.reserved.get(row)
        if reserved is None:
            reserved = table.reserved[row] = deque()
        reserved.append((now, self._token_reserve(index.family)))
        self._derive(table, row, now)
        wide = self._book.wide
        if wide is None or not wide.has_state(row):
            index.place(key, now)
        else:
            # Key-wide reports describe answers before this hand-out, as in the seed.
            wide.reset(row)
            self._wide_keys.discard(key)
            self._place_all(key, now)
        self._store.changed(key)
        self._observer.handed_out(index.family)
        return key

    def lockout_period(self, model: str, *, caller: str = "") -> float:
        """Seconds until a key for ``model`` is free.

        Zero when one is free now, and zero when none is eligible at all (or the
        family is disallowed) so the caller goes ahead and gets Get's clear error
        instead of waiting forever. Uses exactly Get's eligibility rule.

        A 0 for a key whose budget is known holds one request's room of it for
        ``caller`` (a ``Promise``) until the caller's next Get or ``PROMISE_TTL``,
        so that others asking meanwhile are told the truth: that room is spoken
        for. Each 0 holds one more room (a proxy may let several requests go), and
        the caller's own holds count as spoken for when it asks again. A caller
        whose hold lapsed unused (a queue that polls with nothing waiting) gets no
        more holds until its next Get.
        """
        model = model or DEFAULT_LOCKOUT_MODEL
        check_model(model)
        return self._lockout(model, self._models.lookup(model), caller)

    def _hold(self, caller: str, index: _FamilyIndex, key: Key, now: float) -> None:
        if len(self._holds) >= MAX_PROMISES:  # callers come and go: drop the ended
            self._holds = {
                who: held
                for who, held in self._holds.items()
                if any(holds(table, k.seq, entry, now) for k, table, entry in held)
            }
        table = index.table
        entry = promise(table, key.seq, now, self._token_reserve(index.family))
        self._holds.setdefault((caller, index.family), deque()).append((key, table, entry))
        self._reposition(key, table, now)

    def _drop_lapsed_holds(self, caller: str, family: str, now: float) -> bool:
        """Forgets ``caller``'s holds in ``family`` that ended unused; True if there were."""
        held = self._holds.get((caller, family))
        if held is None:
            return False
        lapsed = False
        while held and not holds(held[0][1], held[0][0].seq, held[0][2], now):
            held.popleft()  # all last PROMISE_TTL: the oldest ends first
            lapsed = True
        if not held:
            del self._holds[(caller, family)]
        return lapsed

    def _redeem_hold(self, caller: str, family: str, now: float) -> None:
        """Gives the room held longest for ``caller`` in ``family`` back, to be handed out."""
        self._idle_callers.discard(caller)
        self._drop_lapsed_holds(caller, family, now)
        held = self._holds.get((caller, family))
        if held is None:
            return
        key, table, entry = held.popleft()
        if not held:
            del self._holds[(caller, family)]
        if drop_promise(table, key.seq, entry):
            self._reposition(key, table, now)

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
        wide = self._book.wide
        if wide is not None:
            for key in self._wide_keys:
                until = wide.until[key.seq]
                if until > now and key.indexed and family in key.profile.families:
                    locked += 1
                    first_unlock = min(first_unlock, until)
        if live == 0 or locked < live:
            return 0.0
        return first_unlock - now

    def _lockout(self, model: str | None, info: ModelInfo, caller: str = "") -> float:
        """Seconds until a key is free; a 0 holds a room for ``caller`` (``lockout_period``)."""
        if self._allowed is not None and info.family not in self._allowed:
            return 0.0
        now = self._clock.now()
        if caller and self._drop_lapsed_holds(caller, info.family, now):
            if len(self._idle_callers) >= MAX_PROMISES:
                self._idle_callers.clear()  # forgetting costs each one more hold
            self._idle_callers.add(caller)
        selected = self._select(self._eligible(model, info), now)
        if selected is None:
            return 0.0
        index, (until, key) = selected
        if until > now:
            return until - now
        # Before a budget is known, the reuse throttle keeps callers apart already.
        if caller and index.table.budget_at[key.seq] and caller not in self._idle_callers:
            self._hold(caller, index, key, now)
        return 0.0

    def _select(
        self, indexes: list[_FamilyIndex], now: float
    ) -> tuple[_FamilyIndex, tuple[float, Key]] | None:
        """The best key over ``indexes`` (selection order in the module docstring) and
        when it unlocks (0.0: free now)."""
        best: tuple[_FamilyIndex, tuple[float, Key]] | None = None
        best_rank: tuple[float, ...] | None = None
        for index in indexes:
            top = index.top(now)
            if top is None:
                continue
            if len(indexes) == 1:
                return index, top
            profile = index.profile
            until, key = top
            rank = (
                until,
                0 if profile.is_trial else 1,
                1 if GPT4_32K in profile.families else 0,
                index.table.last_used[key.seq],
                key.seq,
            )
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

        With ``model``, the model's family is locked. Without, the report is
        attributed (``_report_family``): the family of the answer whose headers
        UpdateRateLimits just reported, else that of the key's oldest hand-out in
        flight; with nothing to attribute it to, every family is locked (the seed).
        """
        key = self.key(key_hash)
        if model:
            check_model(model)
        now = self._clock.now()
        family, answered = self._report_family(key, model, now, answer=False)
        table = self._state_table(key, family)
        first_report = mark(table, key.seq, now, answered=answered)
        self._reposition(key, table, now)
        if first_report:  # once per hand-out: proxies may report the same 429 twice
            reason = f"upstream answered 429 for {model}" if model else "upstream answered 429"
            self._state_changed(key, KeyChange.RATE_LIMITED, reason)

    def update_rate_limits(
        self, key_hash: str, headers: Mapping[str, str], model: str = ""
    ) -> None:
        """Records an answer's rate-limit headers: resets (Go durations), remaining
        and limits of requests and tokens.

        With ``model``, they apply to the model's family; without, to the family
        of the key's oldest hand-out in flight (``_report_family``), or key-wide
        when it has none. Either way the answered hand-out is no longer in
        flight. An unparseable value is ignored and logged; without any of the
        headers nothing changes. Together with ``mark_rate_limited`` the result
        does not depend on which of the two is reported first.
        """
        key = self.key(key_hash)
        check_headers(headers)
        if model:
            check_model(model)
        now = self._clock.now()
        parsed = parse_rate_headers(key, headers, now)
        if parsed is None:
            return
        family, answered = self._report_family(key, model, now, answer=True, limits=parsed)
        if family:
            self._pair(key.seq, family, now, answered)
        table = self._state_table(key, family)
        apply_rate_headers(table, key.seq, parsed, now)
        self._reposition(key, table, now)

    def _pair(self, row: int, family: str, now: float, answered: float | None) -> None:
        """Keeps what UpdateRateLimits reported for the MarkRateLimited that may follow
        (the seed reports an answer's headers, then its 429), for REPORT_PAIR_WINDOW:
        pairs older than that are dropped as new ones come, so at most the last
        window's answers are kept, whatever the pool's size."""
        self._answered[row] = (family, now, answered)
        order = self._answered_order
        order.append((now, row))
        while order[0][0] + REPORT_PAIR_WINDOW <= now:
            at, old = order.popleft()
            paired = self._answered.get(old)
            if paired is not None and paired[1] == at:
                del self._answered[old]

    def _report_family(
        self,
        key: Key,
        model: str,
        now: float,
        *,
        answer: bool,
        limits: RateHeaders | None = None,
    ) -> tuple[str, float | None]:
        """The family a report about ``model`` is for ("": key-wide), and when the
        hand-out it answers was made (None: not known). An ``answer`` (a report of
        the upstream's answer, not a 429 alone) ends that hand-out's reservation.

        A report that names no model most likely answers the key's oldest hand-out
        still in flight, so it goes to that hand-out's family; when hand-outs of
        several families are in flight, the oldest of those whose known limits are
        the ones the report's headers (``limits``) name, since answers come back in
        any order and the upstream limits each model apart. A 429 reported on its
        own (MarkRateLimited) answers what UpdateRateLimits just reported, when it
        did (``REPORT_PAIR_WINDOW``; for the model named, if any), since the seed
        reports an answer's headers first, then its 429. With nothing in flight,
        the family of the key's latest hand-out, if recent (``ATTRIBUTION_WINDOW``:
        the request outlived its reservation); else key-wide, as the seed did.
        """
        row = key.seq
        family = self._models.family(model) if model else ""
        if not answer:
            paired = self._answered.get(row)
            if (
                paired is not None
                and now < paired[1] + REPORT_PAIR_WINDOW
                and (not model or paired[0] == family)
            ):
                return paired[0], paired[2]
        handed_out: float | None = None
        if model:
            table = self._book.get(family)
            if table is not None:
                handed_out = release(table, row) if answer else oldest_hand_out(table, row)
        else:
            oldest: tuple[float, RateTable] | None = None
            matching: tuple[float, RateTable] | None = None
            latest: RateTable | None = None
            for table in self._book.tables.values():
                at = oldest_hand_out(table, row)
                if at is not None and (oldest is None or at < oldest[0]):
                    oldest = at, table
                if (
                    at is not None
                    and limits is not None
                    and limits_match(table, row, limits)
                    and (matching is None or at < matching[0])
                ):
                    matching = at, table
                if table.last_used[row] and (
                    latest is None or table.last_used[row] > latest.last_used[row]
                ):
                    latest = table
            answered = matching or oldest
            if answered is not None:
                family = answered[1].family
                handed_out = release(answered[1], row) if answer else answered[0]
            elif latest is not None and now < latest.last_used[row] + ATTRIBUTION_WINDOW:
                family = latest.family
            else:
                return "", None
        return family, handed_out

    def _state_table(self, key: Key, family: str) -> RateTable:
        """The table whose row for ``key`` a report about ``family`` changes ("":
        the key-wide one). The key has a state there from now on."""
        if not family:
            wide = self._book.table("")
            if not wide.has_state(key.seq):
                # The window of a key-wide report starts at the key's last hand-out.
                wide.flags[key.seq] = HAS_STATE
                wide.rate_limited_at[key.seq] = key.last_used
                self._wide_keys.add(key)
            return wide
        # States exist only for indexed families (family_lockout relies on it).
        self._index_family(family)
        table = self._book.table(family)
        # The key's profile may lack the family, or it is disabled: it had none yet.
        table.flags[key.seq] |= HAS_STATE
        return table

    def increment_usage(self, key_hash: str, model: str, tokens: int) -> None:
        """Adds a finished request's tokens to the model family's usage."""
        key = self.key(key_hash)
        check_model(model)
        if not 0 <= tokens <= Limits.TOKENS:
            raise InvalidArgument("tokens", f"must be between 0 and {Limits.TOKENS}")
        self._count_usage(key, self._models.family(model), tokens)

    def _count_usage(self, key: Key, family: str, tokens: int) -> None:
        """Counts a finished request: its tokens in ``family`` ("": no family known,
        the request alone is counted)."""
        if family:
            self._book.add_usage(key.seq, family, tokens)
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
        model. Without ``model`` the answer is attributed as ``update_rate_limits``
        attributes it. A caller that disables must ``flush`` before acknowledging.

        Returns:
            The decision (action, what was done and why) and the key.
        """
        key = self.key(key_hash)
        if model:
            check_model(model)
            self._models.lookup(model)  # an unknown model is refused here too
        check_headers(headers)
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
        now = self._clock.now()
        decision = provider(key.service).decide(status, error, now=now)
        parsed = parse_rate_headers(key, headers, now)
        family, answered = self._report_family(key, model, now, answer=True, limits=parsed)
        if parsed is not None or decision.rate_limited or answered is not None:
            table = self._state_table(key, family)
            if parsed is not None:
                apply_rate_headers(table, key.seq, parsed, now)
            first_report = decision.rate_limited and mark(
                table, key.seq, now, decision.limit_kind, answered
            )
            self._reposition(key, table, now)
            if first_report:
                self._state_changed(key, KeyChange.RATE_LIMITED, decision.why)
        if decision.count_usage:
            self._count_usage(key, family, min(prompt_tokens + completion_tokens, Limits.TOKENS))
            if family in self._book.split and prompt_tokens + completion_tokens:
                self._learn_tokens(family, prompt_tokens, self._input_stats)
                self._learn_tokens(family, completion_tokens, self._output_stats)
        if decision.overloaded:
            # The provider's trouble, not the key's: the key is left as it is.
            asked = parsed.retry_after if parsed is not None else None
            wait = self._backoff.overloaded(key.service, now, asked)
            decision = replace(decision, retry_after=wait)
            self._observer.provider_overloaded(key.service)
            _log.info(
                "provider overloaded; backing off",
                extra={"provider": key.service, "key_hash": key.hash, "wait": round(wait, 3)},
            )
        elif 200 <= status < 300:
            self._backoff.succeeded(key.service)
        if decision.family_denied and family:
            self._deny_family(key, family, decision.why)
        if decision.disable is not None:
            self.disable(key.hash, decision.disable, until=decision.quota_until)
        self._observer.outcome_reported(decision.action.value)
        return decision, key

    def _deny_family(self, key: Key, family: str, why: str) -> None:
        """Takes ``key`` out of ``family`` only (the provider refused it the family's
        models); a recheck that lists them gives the family back."""
        profile = key.profile
        if family not in profile.families:
            return
        self._set_profile(
            key, KeyProfile(profile.families - {family}, profile.is_trial, profile.model_ids)
        )
        self._store.changed(key)
        _log.warning(
            "key denied a model family",
            extra={"key_hash": key.hash, "family": family, "reason": why},
        )

    # -- key state -------------------------------------------------------------

    def disable(self, key_hash: str, reason: DisableReason, *, until: float | None = None) -> Key:
        """Takes a key out of service for good (until a recheck); its families are kept.

        ``until`` (with QUOTA): the time the provider named for the quota to come
        back; the key returns to service on its own then (``_quota_back``).
        """
        key = self.key(key_hash)
        if reason is DisableReason.QUOTA and until is not None and until > key.over_quota_until:
            key.over_quota_until = until
            self._arm_quota_back(key)
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

    def _arm_quota_back(self, key: Key) -> None:
        """Sets the timer that puts an over-quota key back at ``over_quota_until``."""
        until, key_hash = key.over_quota_until, key.hash
        if until:
            self._clock.call_at(until, lambda: self._quota_back(key_hash, until))

    def _quota_back(self, key_hash: str, until: float) -> None:
        """The time a spend limit named has come: the key is in service again, unless
        it left the pool, came back already, or was disabled for another reason since."""
        key = self._store.get(key_hash)
        if key is None or key.over_quota_until != until or not key.is_over_quota:
            return
        if key.is_revoked or key.disable_reason is not DisableReason.QUOTA:
            return
        self._enable(key, self._clock.now())
        self._store.changed(key)
        _log.info("key back from its spend limit", extra={"key_hash": key.hash})

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
            profile = KeyProfile(self._models.listed_families(ids, key.service), is_trial, ids)
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

    @property
    def load_order(self) -> LoadOrder:
        """The keys in load order, for List's pages and page tokens."""
        return self._order

    def page(self, after: int, limit: int, key_filter: KeyFilter) -> Page:
        """Up to ``limit`` keys matching ``key_filter`` now, after load position ``after``."""
        return self._order.page(after, limit, key_filter.predicate(self._clock.now()))

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
        event, level = CHANGE_LOGS[change]
        extra = {"key_hash": key.hash, "provider": key.service, "reason": reason, **fields}
        _log.log(level, event, extra=extra)
        self._observer.state_changed(key.hash, change, reason)

    def _derive(self, table: RateTable, row: int, now: float) -> None:
        """``until`` of ``row``: the latest of the rate-limit window and, once an
        answer brought the family's limits, the budget, else the reuse throttle
        (module docstring). The key-wide state has neither throttle nor budget of
        its own. Lapsed reservations, and a budget not refreshed for
        ``BUDGET_LAPSE``, are dropped first."""
        reserved = table.reserved.get(row)
        if reserved is not None:
            while reserved and reserved[0][0] + RESERVATION_TTL <= now:
                reserved.popleft()
            if not reserved:
                del table.reserved[row]
        last_used, rate_limited_at = table.last_used[row], table.rate_limited_at[row]
        budget_at = table.budget_at[row]
        if budget_at and now >= budget_at + BUDGET_LAPSE:
            forget_budget(table, row)
            budget_at = 0.0
        if not last_used and not rate_limited_at and not budget_at:
            table.until[row] = 0.0
            return
        until = rate_limited_at + window(table, row) if rate_limited_at else 0.0
        if budget_at:
            tokens = self._token_reserve(table.family)
            if table.split:
                family = table.family
                split = (
                    self._token_reserve(family, self._input_stats),
                    self._token_reserve(family, self._output_stats),
                )
                budget = budget_until(table, row, tokens, split)
            else:
                budget = budget_until(table, row, tokens)
            if budget > until:
                until = budget
        elif last_used and last_used + self._reuse_delay > until:
            # Nothing known of the key's quota yet: one hand-out at a time until
            # an answer says more.
            until = last_used + self._reuse_delay
        table.until[row] = until

    def _token_reserve(
        self, family: str, estimates: dict[str, tuple[float, float]] | None = None
    ) -> float:
        """Tokens a hand-out in ``family`` reserves (``TOKEN_ESTIMATE_*``); 1 before any usage.

        ``estimates``: of its input or output tokens (``_input_stats``,
        ``_output_stats``) instead of all of them.
        """
        stats = (self._token_stats if estimates is None else estimates).get(family)
        if stats is None:
            return 1.0
        mean, variance = stats
        return max(1.0, mean + TOKEN_ESTIMATE_SPREAD * math.sqrt(variance))

    def _learn_tokens(
        self, family: str, tokens: int, estimates: dict[str, tuple[float, float]] | None = None
    ) -> None:
        """Folds one finished request's tokens into the family's estimate (or ``estimates``)."""
        estimates = self._token_stats if estimates is None else estimates
        stats = estimates.get(family)
        if stats is None:
            estimates[family] = (float(tokens), 0.0)
            return
        mean, variance = stats
        delta = tokens - mean
        mean += TOKEN_ESTIMATE_WEIGHT * delta
        # The exponentially weighted variance (West's incremental form).
        variance = (1 - TOKEN_ESTIMATE_WEIGHT) * (variance + TOKEN_ESTIMATE_WEIGHT * delta * delta)
        estimates[family] = (mean, variance)

    def _reposition(self, key: Key, table: RateTable, now: float) -> None:
        """Re-derives the key's row of ``table`` and re-places the key where the
        change matters: in that family's index, or in every index for a key-wide change."""
        row = key.seq
        indexes: list[_FamilyIndex] = []
        if key.indexed:
            group = self._groups[key.profile]
            if table is self._book.wide:
                indexes = list(group.indexes.values())
            elif (index := group.indexes.get(table.family)) is not None:
                indexes = [index]
        # Unlock times before the change (only _derive changes them): a locked
        # key whose time stays the same stays where it is.
        was_until = [self._book.lock_end(index.table, row) for index in indexes]
        self._derive(table, row, now)
        for index, until in zip(indexes, was_until, strict=True):
            index.place(key, now, was_until=until)
        self._store.changed(key)
        if self._queues:  # a lock may have got shorter
            self._schedule_dispatch()

    def _place_all(self, key: Key, now: float) -> None:
        """(Re-)places an indexed key in every family index of its profile."""
        row = key.seq
        for index in self._groups[key.profile].indexes.values():
            index.table.flags[row] |= HAS_STATE
            index.place(key, now)

    def _enable(self, key: Key, now: float) -> None:
        """Undoes a disable: the flags, reason and time go, the key is indexed again."""
        key.is_disabled = key.is_revoked = key.is_over_quota = False
        key.disable_reason = None
        key.disabled_at = key.over_quota_until = 0.0
        self._place(key, now)

    def _place(self, key: Key, now: float) -> None:
        group = self._group_for(key.profile)
        if not key.indexed:
            group.live += 1
            key.indexed = True
        self._place_all(key, now)
        if self._queues:  # a key came (back) into service
            self._schedule_dispatch()

    def _unplace(self, key: Key) -> None:
        if not key.indexed:
            return
        key.indexed = False
        group = self._groups[key.profile]
        for index in group.indexes.values():
            index.unplace(key)
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
                group.indexes[family] = self._new_index(group, family)
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
                group.indexes[family] = self._new_index(group, family)
        now = self._clock.now()
        flags = self._book.table(family).flags
        for key in self._store:
            if key.indexed and family in key.profile.families:
                flags[key.seq] |= HAS_STATE
                self._groups[key.profile].indexes[family].place(key, now, ordered=False)
        for group in self._groups.values():
            index = group.indexes.get(family)
            if index is not None:
                index.heapify()
        self._eligible_cache.clear()

    def _new_index(self, group: _ProfileGroup, family: str) -> _FamilyIndex:
        return _FamilyIndex(group, family, self._book)

    def _intern(self, profile: KeyProfile) -> KeyProfile:
        return self._profiles.setdefault(profile, profile)

    def _take_seq(self) -> int:
        self._next_seq += 1
        return self._next_seq


class MemoryBackend:
    """``KeyPool`` behind the seam (``PoolBackend``): each method is one pool call,
    made without awaiting in between, so it is as atomic as the pool's own."""

    __slots__ = ("pool",)

    def __init__(self, pool: KeyPool) -> None:
        self.pool = pool

    @property
    def observer(self) -> PoolObserver:
        return self.pool.observer

    def snapshot_source(self) -> SnapshotSource:
        return self.pool

    async def get(
        self,
        model: str,
        max_wait: float = 0.0,
        *,
        time_left: float | None = None,
        caller: str = "",
    ) -> Key:
        if max_wait == 0.0:
            return self.pool.get(model, caller=caller)
        return await self.pool.get_waiting(model, max_wait, time_left=time_left, caller=caller)

    async def lockout_period(self, model: str, *, caller: str = "") -> float:
        return self.pool.lockout_period(model, caller=caller)

    async def mark_rate_limited(self, key_hash: str, model: str = "") -> None:
        self.pool.mark_rate_limited(key_hash, model)

    async def update_rate_limits(
        self, key_hash: str, headers: Mapping[str, str], model: str = ""
    ) -> None:
        self.pool.update_rate_limits(key_hash, headers, model)

    async def increment_usage(self, key_hash: str, model: str, tokens: int) -> None:
        self.pool.increment_usage(key_hash, model, tokens)

    async def report_outcome(
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
        decision, key = self.pool.report_outcome(
            key_hash,
            model,
            status=status,
            headers=headers,
            error=error,
            prompt_tokens=prompt_tokens,
            completion_tokens=completion_tokens,
        )
        return decision, key

    async def disable(self, key_hash: str, reason: DisableReason) -> Key:
        return self.pool.disable(key_hash, reason)

    async def recheck(self, *, until_checked: bool = False) -> None:
        self.pool.recheck(until_checked=until_checked)

    async def available(self) -> int:
        return self.pool.available()

    async def list_keys(self, page_token: str, page_size: int, key_filter: KeyFilter) -> KeyPage:
        order = self.pool.load_order
        after = order.resume_position(page_token, key_filter)
        page = self.pool.page(after, page_size, key_filter)
        token = "" if page.resume_after is None else order.token(key_filter, page.resume_after)
        return KeyPage(page.keys, token)

    async def keys(self) -> list[Key]:
        return self.pool.keys()

    async def key(self, key_hash: str) -> Key:
        return self.pool.key(key_hash)

    async def apply_check(
        self,
        key_hash: str,
        *,
        model_ids: Iterable[str] | None,
        is_trial: bool,
        organization_id: str | None = None,
    ) -> Key:
        return self.pool.apply_check(
            key_hash, model_ids=model_ids, is_trial=is_trial, organization_id=organization_id
        )

    async def apply_dead_check(self, key_hash: str, reason: DisableReason) -> Key:
        return self.pool.apply_dead_check(key_hash, reason)

    async def clone_for_org(self, key_hash: str, organization_id: str) -> Key | None:
        return self.pool.clone_for_org(key_hash, organization_id)

    async def sync_keys(self, secrets: Sequence[str]) -> KeySync:
        added, removed = self.pool.sync_keys(secrets)
        return KeySync(added, removed, len(self.pool))

    async def flush(self) -> None:
        await self.pool.flush()


def as_backend(pool: PoolBackend | KeyPool) -> PoolBackend:
    """``pool`` behind the seam: a ``KeyPool`` (embedders and tests build one) is
    served through ``MemoryBackend``."""
    return MemoryBackend(pool) if isinstance(pool, KeyPool) else pool
