"""The pool at a glance: key counts by family and state, lockouts, tokens used.

One summary serves three views: the Prometheus gauges, the HTML status page
(both read a ``PoolSnapshot``) and ``keysvc status`` (which reads ``List`` and
``GetLockoutPeriod`` over gRPC). Each view turns its keys into ``KeyState`` rows
first, so the counting rules live here only.

At 100k keys one walk over the pool takes ~150-250 ms of the event loop, which the
gRPC server shares, and walks every few seconds doubled Get's p99 while views came
in a loop. So the HTTP views read an immutable snapshot that ``PoolSnapshots``
takes without walking: a ``KeyCensus`` keeps the counts, recounting only the keys
the pool reported changed (through its store) or whose lock has ended since the
last snapshot; token sums come from the rate book's usage columns and each state's
list from List's first page. Every part runs in slices of a few milliseconds,
yielding to the loop between them; concurrent views share one snapshot.

States of a key:

- ``active``: not disabled and not locked (it would be handed out now);
- ``locked``: not disabled, but locked (``now < rate_limited_until``);
- ``disabled``: never handed out (revoked and over-quota keys are disabled too).

Every key of a family is in exactly one of those three. ``trial``, ``revoked``
and ``over_quota`` count keys with that flag and overlap with them: trial counts
the trial keys that are not disabled.
"""

from __future__ import annotations

import asyncio
import heapq
import time
from array import array
from collections import Counter
from collections.abc import Awaitable, Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Final, Protocol

from .keys import Key
from .listing import KeyFilter, LoadOrder
from .rates import NO_USAGE, RateBook
from .store import KeyStore

__all__ = [
    "COUNTED_STATES",
    "PROBE_MODELS",
    "FamilySummary",
    "LISTED_STATES",
    "KeyCensus",
    "KeyList",
    "KeyState",
    "Pace",
    "PoolSnapshot",
    "PoolSnapshots",
    "SnapshotFeed",
    "format_duration",
    "key_state",
    "provider_counts",
    "render_text",
    "summarize",
    "summarize_pool",
    "TakenSnapshots",
    "take_snapshot",
]

#: The states a family's keys are counted in, in display order.
COUNTED_STATES: Final = ("active", "locked", "trial", "disabled", "revoked", "over_quota")

#: One model name per built-in family, for asking GetLockoutPeriod about a
#: family over the wire (the RPC takes a model). A unit test checks each one
#: maps back to its family and that every built-in family has one.
PROBE_MODELS: Final[Mapping[str, str]] = {
    "turbo": "gpt-3.5-turbo",
    "gpt4": "gpt-4",
    "gpt4-32k": "gpt-4-32k",
    "gpt4-turbo": "gpt-4-turbo",
    "gpt4o": "gpt-4o",
    "gpt41": "gpt-4.1",
    "gpt41-mini": "gpt-4.1-mini",
    "gpt41-nano": "gpt-4.1-nano",
    "gpt45": "gpt-4.5-preview",
    "gpt5": "gpt-5",
    "gpt5-mini": "gpt-5-mini",
    "gpt5-nano": "gpt-5-nano",
    "dall-e": "dall-e-3",
    "o1": "o1",
    "o1-mini": "o1-mini",
    "o3": "o3",
    "o3-mini": "o3-mini",
    "o4-mini": "o4-mini",
    "claude-opus": "claude-opus-4-1",
    "claude-sonnet": "claude-sonnet-4-5",
    "claude-haiku": "claude-haiku-4-5",
    "claude": "claude-2.1",
}


@dataclass(frozen=True, slots=True)
class KeyState:
    """The public facts about one key that the views show. There is no secret here."""

    hash: str
    families: frozenset[str]
    is_trial: bool
    is_disabled: bool
    is_revoked: bool
    is_over_quota: bool
    locked: bool
    prompt_count: int = 0
    token_usage: Mapping[str, int] = field(default_factory=dict)
    #: The key's provider (``Key.service``).
    provider: str = "openai"

    @property
    def state(self) -> str:
        """One word: revoked, over_quota, disabled, locked or active."""
        if self.is_revoked:
            return "revoked"
        if self.is_over_quota:
            return "over_quota"
        if self.is_disabled:
            return "disabled"
        return "locked" if self.locked else "active"


def key_state(key: Key, now: float) -> KeyState:
    """The view of a pool key at time ``now``."""
    return KeyState(
        hash=key.hash,
        families=key.model_families,
        is_trial=key.is_trial,
        is_disabled=key.is_disabled,
        is_revoked=key.is_revoked,
        is_over_quota=key.is_over_quota,
        locked=now < key.rate_limited_until,
        prompt_count=key.prompt_count,
        token_usage=key.token_usage,
        provider=key.service,
    )


@dataclass(slots=True)
class FamilySummary:
    """One model family: its keys by state, current lockout and tokens used.

    ``lockout`` is None when it is not known (``keysvc status`` has no model
    name to ask the server with for a family from an operator's model file).
    """

    family: str
    counts: dict[str, int] = field(default_factory=lambda: dict.fromkeys(COUNTED_STATES, 0))
    lockout: float | None = 0.0
    tokens: int = 0

    @property
    def total(self) -> int:
        return self.counts["active"] + self.counts["locked"] + self.counts["disabled"]


#: What decides where a key is counted: (families, trial, disabled, revoked,
#: over quota, locked, provider). Keys are grouped by it first: at 100k keys
#: there are a handful of groups, so the per-family expansion costs nothing.
_Group = tuple[frozenset[str], bool, bool, bool, bool, bool, str]


def summarize(
    keys: Iterable[KeyState],
    lockout: Callable[[str], float | None],
    *,
    families: Iterable[str] = (),
) -> list[FamilySummary]:
    """Per family, sorted by name: every family in ``families`` and every family a key has.

    Tokens are summed from each key's usage; ``lockout(family)`` gives the lockout.
    """
    keys = list(keys)
    groups: Counter[_Group] = Counter(
        (k.families, k.is_trial, k.is_disabled, k.is_revoked, k.is_over_quota, k.locked,
         k.provider)
        for k in keys
    )  # fmt: skip
    return _summaries(groups, _token_sums(k.token_usage for k in keys), lockout, families)


def summarize_pool(
    keys: Iterable[Key],
    now: float,
    lockout: Callable[[str], float | None],
    *,
    families: Iterable[str] = (),
    with_tokens: bool = True,
) -> list[FamilySummary]:
    """``summarize`` straight from pool keys, without a ``KeyState`` per key.

    It does the least per key: one tuple and one counter bump (plus the usage
    sums when ``with_tokens``). It walks every key at once; on the event loop,
    use ``PoolSnapshots``, which walks in slices.
    """
    keys = list(keys)
    groups: Counter[_Group] = Counter()
    _count_groups(groups, keys, now)
    tokens: dict[str, int] = {}
    if with_tokens:
        _add_token_sums(tokens, (k.token_usage for k in keys))
    return _summaries(groups, tokens, lockout, families)


def _count_groups(groups: Counter[_Group], keys: Iterable[Key], now: float) -> None:
    groups.update(
        (k.profile.families, k.profile.is_trial, k.is_disabled, k.is_revoked,
         k.is_over_quota, now < k.rate_limited_until, k.service)
        for k in keys
    )  # fmt: skip


def _token_sums(usages: Iterable[Mapping[str, int]]) -> dict[str, int]:
    sums: dict[str, int] = {}
    _add_token_sums(sums, usages)
    return sums


def _add_token_sums(sums: dict[str, int], usages: Iterable[Mapping[str, int]]) -> None:
    # A plain loop: Counter.update costs ~1 µs per key even for an empty usage.
    for usage in usages:
        for family, used in usage.items():
            sums[family] = sums.get(family, 0) + used


class SnapshotSource(Protocol):
    """What a snapshot reads: the pool's keys, clock, families, lockouts and List pages."""

    def keys(self) -> list[Key]: ...

    def now(self) -> float: ...

    def families(self) -> tuple[str, ...]: ...

    def family_lockout(self, family: str) -> float: ...

    @property
    def load_order(self) -> LoadOrder: ...

    def __len__(self) -> int: ...


#: The lists of keys the status page shows the top of: List's states that split
#: the pool (``available`` is active and locked together, ``all`` everything).
LISTED_STATES: Final = (KeyFilter.ACTIVE, KeyFilter.LOCKED, KeyFilter.DISABLED)


@dataclass(frozen=True, slots=True)
class KeyList:
    """The top of one of List's lists: its first keys as List returns them (load order).

    Attributes:
        state: the List state filter (``active``, ``locked``, ``disabled``).
        count: how many keys were in that state when the snapshot was taken.
        keys: the first of them, at most the ``listed`` the snapshot was made with.
    """

    state: str
    count: int
    keys: tuple[KeyState, ...]


@dataclass(frozen=True, slots=True, eq=False)
class PoolSnapshot:
    """The pool at a glance at one moment. Never changed once made, so any thread may
    read it. Compared (and hashed) by identity: one per taking.

    Attributes:
        taken_at: the pool's clock when it was taken (locks are judged at it).
        total_keys: keys in the pool then.
        summaries: every family the pool knows, and every family a key has, by name.
        lists: the top of each of ``LISTED_STATES``' lists (empty when made with
            ``listed`` 0).
        walk_seconds: how long taking it took, slices and the waits between them.
        providers: per provider, its keys by state (``provider_counts``).
    """

    taken_at: float
    total_keys: int
    summaries: tuple[FamilySummary, ...]
    lists: tuple[KeyList, ...] = ()
    walk_seconds: float = 0.0
    providers: Mapping[str, Mapping[str, int]] = field(default_factory=dict)


def _state_counts(groups: Mapping[_Group, int]) -> dict[KeyFilter, int]:
    """Keys (not key-families) per listed state, from the group counts."""
    counts = dict.fromkeys(LISTED_STATES, 0)
    for (_, _, disabled, _, _, locked, _), n in groups.items():
        state = KeyFilter.DISABLED if disabled else KeyFilter.LOCKED if locked else KeyFilter.ACTIVE
        counts[state] += n
    return counts


def take_snapshot(pool: SnapshotSource, *, listed: int = 0) -> PoolSnapshot:
    """A snapshot from one walk over every key at once (tests, scripts; not the loop)."""
    started = time.perf_counter()
    now = pool.now()
    keys = pool.keys()
    groups: Counter[_Group] = Counter()
    _count_groups(groups, keys, now)
    tokens = _token_sums(k.token_usage for k in keys)
    lists: list[KeyList] = []
    if listed > 0:
        for state, count in _state_counts(groups).items():
            want = state.predicate(now)
            found: list[Key] = []
            after: int | None = 0
            while after is not None and len(found) < min(listed, count):
                page = pool.load_order.page(after, listed - len(found), want)
                found += page.keys
                after = page.resume_after
            lists.append(KeyList(state.value, count, tuple(key_state(k, now) for k in found)))
    summaries = _summaries(groups, tokens, pool.family_lockout, pool.families())
    return PoolSnapshot(
        now,
        len(keys),
        tuple(summaries),
        tuple(lists),
        time.perf_counter() - started,
        provider_counts(groups),
    )


class KeyCensus:
    """Keys counted by ``_Group``, kept current from the pool's own change reports.

    ``watching(store)`` wraps the store a pool is built with: the pool reports
    every key it adds, removes or changes to its store (that is how a state file
    learns what to write), and the wrapper passes each report on and notes the key.
    ``settle`` then recounts only the keys noted since the last time, and those
    whose lock has ended since (a lock ends with time, not with a report): at 100k
    keys a snapshot costs the changes since the last one, not a walk over the pool.

    A census that watches no store (``watching`` never called) cannot know what
    changed, so ``settle`` recounts every key each time: the walk, in slices.

    Only the event loop's thread may use it, like the pool.
    """

    def __init__(self) -> None:
        self._watching = False
        #: Each counted key's group, by its row (``Key.seq``); 0 when not counted.
        #: Two bytes a key; group ids index ``_groups``, from 1.
        self._codes = array("H")
        self._group_ids: dict[_Group, int] = {}
        self._groups: list[_Group] = [_NO_GROUP]
        self._counts: list[int] = [0]
        #: Keys added or changed since the last ``settle``.
        self._noted: set[Key] = set()
        #: (lock end, key) of keys counted as locked: recounted once the lock ends.
        self._locks: list[tuple[float, Key]] = []
        self._book: RateBook | None = None

    def watching(self, store: KeyStore) -> KeyStore:
        """``store`` as a pool should be given it, reporting to this census."""
        self._watching = True
        for key in store:  # keys already stored are counted at the first settle
            self._noted.add(key)
        return _CensusStore(store, self)

    def noted(self, key: Key) -> None:
        """Counts ``key`` again at the next ``settle`` (it was added or changed)."""
        self._noted.add(key)

    def uncount(self, key: Key) -> None:
        """Takes ``key`` out of the counts (it is leaving the pool)."""
        self._noted.discard(key)
        code = self._codes[key.seq] if key.seq < len(self._codes) else 0
        if code:
            self._counts[code] -= 1
            self._codes[key.seq] = 0

    def groups(self) -> dict[_Group, int]:
        """Keys by group, as of the last ``settle``."""
        return {group: n for group, n in zip(self._groups, self._counts, strict=True) if n}

    async def settle(self, pool: SnapshotSource, now: float, pace: Pace) -> None:
        """Recounts the keys that changed, and those whose lock ended by ``now``."""
        if not self._watching:
            self._codes = array("H")
            self._counts = [0] * len(self._groups)
            keys: Iterable[Key] = pool.keys()
        else:
            locks = self._locks
            while locks and locks[0][0] <= now:
                _, key = heapq.heappop(locks)
                if key.book is not None:  # still in the pool
                    self._noted.add(key)
            keys = list(self._noted)
            self._noted.clear()
        for key in keys:
            if key.book is None:
                continue  # left the pool after it was noted
            self._book = key.book
            self._count(key, now)
            await pace.step()

    def _count(self, key: Key, now: float) -> None:
        until = key.rate_limited_until
        locked = now < until
        profile = key.profile
        group = (profile.families, profile.is_trial, key.is_disabled, key.is_revoked,
                 key.is_over_quota, locked, key.service)  # fmt: skip
        code = self._group_ids.get(group)
        if code is None:
            code = self._group_ids[group] = len(self._groups)
            self._groups.append(group)
            self._counts.append(0)
        row = key.seq
        codes = self._codes
        if row >= len(codes):
            codes.extend([0] * (row + 1 - len(codes) + len(codes) // 8))
        old = codes[row]
        if old != code:
            if old:
                self._counts[old] -= 1
            self._counts[code] += 1
            codes[row] = code
        if locked and self._watching:
            heapq.heappush(self._locks, (until, key))

    async def token_sums(self, pace: Pace) -> dict[str, int]:
        """Tokens used per family by the pool's keys, summed from the rate book's
        usage columns a few thousand rows at a time (every key's usage, without
        touching a key)."""
        sums: dict[str, int] = {}
        book = self._book
        if book is None:
            return sums
        for family, table in list(book.tables.items()):
            column = table.usage
            total = 0
            for start in range(0, len(column), _USAGE_ROWS):
                part = column[start : start + _USAGE_ROWS]
                # Rows never counted (and rows no key holds) hold NO_USAGE, -1.
                total += sum(part) + part.count(NO_USAGE)
                await pace.step(_USAGE_ROWS // 20)
            if total:
                sums[family] = total
        return sums


#: The group of a row no key is counted in.
_NO_GROUP: Final[_Group] = (frozenset(), False, False, False, False, False, "")
#: Rows of a usage column summed at once (~0.2 ms).
_USAGE_ROWS: Final = 16_384


class _CensusStore:
    """The pool's store, telling a ``KeyCensus`` of every key added, removed or changed."""

    def __init__(self, inner: KeyStore, census: KeyCensus) -> None:
        self._inner = inner
        self._census = census
        self._note = census.noted

    def get(self, key_hash: str) -> Key | None:
        return self._inner.get(key_hash)

    def add(self, key: Key) -> None:
        self._inner.add(key)
        self._census.noted(key)

    def remove(self, key_hash: str) -> None:
        key = self._inner.get(key_hash)
        if key is not None:
            self._census.uncount(key)
        self._inner.remove(key_hash)

    def __iter__(self) -> Iterator[Key]:
        return iter(self._inner)

    def __len__(self) -> int:
        return len(self._inner)

    def changed(self, key: Key) -> None:
        # On every hand-out: one set insertion more than the store's own work.
        self._inner.changed(key)
        self._note(key)

    async def flush(self) -> None:
        await self._inner.flush()


class Pace:
    """Yields to the event loop once ``slice_seconds`` have passed since the last
    yield, checked every ``batch`` steps: long work in slices of bounded time."""

    def __init__(self, slice_seconds: float, batch: int = 100) -> None:
        self._slice_seconds = slice_seconds
        self._batch = batch
        self._steps = 0
        self._clock = time.perf_counter
        self._slice_end = self._clock() + slice_seconds

    async def step(self, weight: int = 1) -> None:
        self._steps += weight
        if self._steps < self._batch:
            return
        self._steps = 0
        if self._clock() >= self._slice_end:
            await asyncio.sleep(0)
            self._slice_end = self._clock() + self._slice_seconds


class SnapshotFeed(Protocol):
    """What the HTTP port reads: a snapshot fresh enough for a view (``fresh``, on the
    loop), and the last one finished (``latest``, for a Prometheus collector)."""

    @property
    def latest(self) -> PoolSnapshot | None: ...

    async def fresh(self) -> PoolSnapshot: ...


class _SharedSnapshots:
    """``fresh()`` gives a snapshot started less than ``max_age`` seconds ago, taking
    one (``_take``) if there is none; callers that come while one is being taken wait
    for it. ``latest`` is the last finished one."""

    def __init__(self, *, max_age: float, timer: Callable[[], float]) -> None:
        self._max_age = max_age
        self._timer = timer
        self._latest: PoolSnapshot | None = None
        self._latest_started = 0.0
        self._walk: asyncio.Task[PoolSnapshot] | None = None

    @property
    def latest(self) -> PoolSnapshot | None:
        return self._latest

    async def fresh(self) -> PoolSnapshot:
        if self._latest is not None and self._timer() - self._latest_started < self._max_age:
            return self._latest
        if self._walk is None:
            self._walk = asyncio.get_running_loop().create_task(self._taken())
            self._walk.add_done_callback(self._walked)
        # Shielded: a client that goes away must not cancel the walk others wait for.
        return await asyncio.shield(self._walk)

    def _walked(self, walk: asyncio.Task[PoolSnapshot]) -> None:
        self._walk = None
        if not walk.cancelled():
            walk.exception()  # retrieved: a failed taking is the waiting views' to report

    async def _taken(self) -> PoolSnapshot:
        started = self._timer()
        snapshot = await self._take()
        self._latest, self._latest_started = snapshot, started
        return snapshot

    async def _take(self) -> PoolSnapshot:
        raise NotImplementedError


class TakenSnapshots(_SharedSnapshots):
    """Snapshots made by ``take`` (a shared pool's census, read from Redis), shared by
    the views within ``max_age`` seconds as ``PoolSnapshots`` shares its walks."""

    def __init__(
        self,
        take: Callable[[], Awaitable[PoolSnapshot]],
        *,
        max_age: float = 1.0,
        timer: Callable[[], float] = time.monotonic,
    ) -> None:
        super().__init__(max_age=max_age, timer=timer)
        self._take_one = take

    async def _take(self) -> PoolSnapshot:
        return await self._take_one()


class PoolSnapshots(_SharedSnapshots):
    """Snapshots of a pool, taken in slices on the event loop that owns the pool.

    ``fresh()`` gives a snapshot taken less than ``max_age`` seconds ago, taking
    one if there is none; callers that come while one is being taken wait for it.
    ``latest`` is the last finished one, for readers that cannot wait (a
    Prometheus collector). Counts come from ``census``: when it watches the pool's
    store, taking a snapshot costs the keys that changed since the last one; the
    token sums read the usage columns; each list's top is List's first page of
    it. Every part yields to the loop after ``slice_seconds``.

    Only the loop's thread may call ``fresh``; a snapshot itself is immutable.
    """

    def __init__(
        self,
        pool: SnapshotSource,
        census: KeyCensus | None = None,
        *,
        listed: int = 0,
        slice_seconds: float = 0.002,
        batch_keys: int = 100,
        max_age: float = 1.0,
        timer: Callable[[], float] = time.monotonic,
    ) -> None:
        super().__init__(max_age=max_age, timer=timer)
        self._pool = pool
        self._census = census if census is not None else KeyCensus()
        self._listed = listed
        self._slice_seconds = slice_seconds
        self._batch = batch_keys

    async def _take(self) -> PoolSnapshot:
        started = self._timer()
        pool = self._pool
        census = self._census
        pace = Pace(self._slice_seconds, self._batch)
        now = pool.now()
        total = len(pool)
        await census.settle(pool, now, pace)
        groups = census.groups()
        tokens = await census.token_sums(pace)
        lists = [
            await self._top(state, count, now, pace)
            for state, count in _state_counts(groups).items()
        ] if self._listed > 0 else []  # fmt: skip
        summaries = _summaries(groups, tokens, pool.family_lockout, pool.families())
        return PoolSnapshot(
            taken_at=now,
            total_keys=total,
            summaries=tuple(summaries),
            lists=tuple(lists),
            walk_seconds=self._timer() - started,
            providers=provider_counts(groups),
        )

    async def _top(self, state: KeyFilter, count: int, now: float, pace: Pace) -> KeyList:
        """The first ``listed`` keys of List's list of ``state`` (which had ``count``:
        no looking further once they are all found), ``batch_keys`` keys looked at
        a time (a key costs ~1 µs here: locks are judged key by key)."""
        want = state.predicate(now)
        order = self._pool.load_order
        found: list[Key] = []
        after: int | None = 0
        while after is not None and len(found) < min(self._listed, count):
            page = order.page(after, self._listed - len(found), want, scan_limit=self._batch)
            found += page.keys
            after = page.resume_after
            await pace.step(self._batch)
        return KeyList(state.value, count, tuple(key_state(k, now) for k in found))


def _summaries(
    groups: Mapping[_Group, int],
    tokens: Mapping[str, int],
    lockout: Callable[[str], float | None],
    families: Iterable[str],
) -> list[FamilySummary]:
    summaries: dict[str, FamilySummary] = {f: FamilySummary(f) for f in families}

    def summary(family: str) -> FamilySummary:
        found = summaries.get(family)
        if found is None:
            found = summaries[family] = FamilySummary(family)
        return found

    for (key_families, trial, disabled, revoked, over_quota, locked, _), n in groups.items():
        for family in key_families:
            counts = summary(family).counts
            if disabled:
                counts["disabled"] += n
            elif locked:
                counts["locked"] += n
            else:
                counts["active"] += n
            if trial and not disabled:
                counts["trial"] += n
            if revoked:
                counts["revoked"] += n
            if over_quota:
                counts["over_quota"] += n
    # Usage is recorded against the family of the model used, which the key may
    # no longer have (after a check); it still counts for that family.
    for family, used in tokens.items():
        summary(family).tokens += used
    result = sorted(summaries.values(), key=lambda s: s.family)
    for item in result:
        item.lockout = lockout(item.family)
    return result


def provider_counts(groups: Mapping[_Group, int]) -> dict[str, dict[str, int]]:
    """Per provider, by name: its keys by state, each key counted once (active, locked
    or disabled; trial, revoked and over_quota overlap with them, as per family)."""
    counts: dict[str, dict[str, int]] = {}
    for (_, trial, disabled, revoked, over_quota, locked, provider), n in sorted(
        groups.items(), key=lambda item: item[0][6]
    ):
        row = counts.setdefault(provider, dict.fromkeys(COUNTED_STATES, 0))
        row["disabled" if disabled else "locked" if locked else "active"] += n
        if trial and not disabled:
            row["trial"] += n
        if revoked:
            row["revoked"] += n
        if over_quota:
            row["over_quota"] += n
    return counts


def format_duration(seconds: float | None) -> str:
    """``"-"`` when unknown, ``"0s"`` when free, else e.g. ``"1.50s"``."""
    if seconds is None:
        return "-"
    if seconds <= 0:
        return "0s"
    return f"{seconds:.2f}s"


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    columns = range(len(header))
    widths = [max(len(r[i]) for r in [header, *rows]) for i in columns]
    # Numbers line up on the right, words on the left.
    numeric = [bool(rows) and all(r[i][:1].isdigit() or r[i] == "-" for r in rows) for i in columns]

    def line(cells: list[str]) -> str:
        return "  ".join(
            c.rjust(w) if right else c.ljust(w)
            for c, w, right in zip(cells, widths, numeric, strict=True)
        ).rstrip()

    return [line(header), line(["-" * w for w in widths]), *(line(r) for r in rows)]


def render_text(summaries: list[FamilySummary], keys: list[KeyState]) -> str:
    """The summary as terminal tables: families first, then keys by hash."""
    if not keys:
        return "no keys in the pool\n"
    family_rows = [
        [
            s.family,
            *(str(s.counts[state]) for state in COUNTED_STATES),
            format_duration(s.lockout),
            str(s.tokens),
        ]
        for s in summaries
    ]
    lines = _table(["family", *COUNTED_STATES, "lockout", "tokens"], family_rows)
    key_rows = [
        [
            k.hash,
            k.provider,
            k.state,
            "yes" if k.is_trial else "no",
            str(k.prompt_count),
            str(sum(k.token_usage.values())),
        ]
        for k in sorted(keys, key=lambda k: k.hash)
    ]
    lines += ["", *_table(["key", "provider", "state", "trial", "prompts", "tokens"], key_rows)]
    return "\n".join(lines) + "\n"
