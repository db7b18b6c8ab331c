"""The pool at a glance: key counts by family and state, lockouts, tokens used.

One summary serves three views: the Prometheus gauges, the HTML status page
(both read a ``PoolSnapshot``) and ``keysvc status`` (which reads ``List`` and
``GetLockoutPeriod`` over gRPC). Each view turns its keys into ``KeyState`` rows
first, so the counting rules live here only.

At 100k keys one walk over the pool takes ~150-250 ms of the event loop, which the
gRPC server shares. ``PoolSnapshots`` therefore walks it in slices of at most a
few milliseconds, yielding to the loop between them, and the HTTP views read the
finished, immutable snapshot; concurrent views share one walk.

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
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from operator import attrgetter
from typing import Final, Protocol

from .keys import Key

__all__ = [
    "COUNTED_STATES",
    "PROBE_MODELS",
    "FamilySummary",
    "KeyState",
    "PoolSnapshot",
    "PoolSnapshots",
    "format_duration",
    "key_state",
    "render_text",
    "summarize",
    "summarize_pool",
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
#: over quota, locked). Keys are grouped by it first: at 100k keys there are a
#: handful of groups, so the per-family expansion costs nothing.
_Group = tuple[frozenset[str], bool, bool, bool, bool, bool]


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
        (k.families, k.is_trial, k.is_disabled, k.is_revoked, k.is_over_quota, k.locked)
        for k in keys
    )
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
         k.is_over_quota, now < k.rate_limited_until)
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
    """What a snapshot reads: the pool's keys, clock, families and lockouts."""

    def keys(self) -> list[Key]: ...

    def now(self) -> float: ...

    def families(self) -> tuple[str, ...]: ...

    def family_lockout(self, family: str) -> float: ...


@dataclass(frozen=True, slots=True, eq=False)
class PoolSnapshot:
    """The pool at a glance, as one walk over it found it. Never changed once made,
    so any thread may read it. Compared (and hashed) by identity: one per walk.

    Attributes:
        taken_at: the pool's clock when the walk started (locks are judged at it).
        total_keys: keys in the pool then.
        summaries: every family the pool knows, and every family a key has, by name.
        first_keys: the first keys by hash (at most the ``listed`` it was made with).
        walk_seconds: how long the walk took, slices and the waits between them.
    """

    taken_at: float
    total_keys: int
    summaries: tuple[FamilySummary, ...]
    first_keys: tuple[KeyState, ...]
    walk_seconds: float = 0.0


def _first_by_hash(listed: int, first: list[Key], more: Sequence[Key]) -> list[Key]:
    if listed <= 0:
        return []
    return heapq.nsmallest(listed, [*first, *more], key=attrgetter("hash"))


def take_snapshot(pool: SnapshotSource, *, listed: int = 0) -> PoolSnapshot:
    """A snapshot from one walk over every key at once (tests, scripts; not the loop)."""
    started = time.perf_counter()
    now = pool.now()
    keys = pool.keys()
    groups: Counter[_Group] = Counter()
    _count_groups(groups, keys, now)
    tokens = _token_sums(k.token_usage for k in keys)
    first = _first_by_hash(listed, [], keys)
    return _snapshot(pool, now, len(keys), groups, tokens, first, time.perf_counter() - started)


def _snapshot(
    pool: SnapshotSource,
    now: float,
    total: int,
    groups: Counter[_Group],
    tokens: Mapping[str, int],
    first: list[Key],
    seconds: float,
) -> PoolSnapshot:
    summaries = _summaries(groups, tokens, pool.family_lockout, pool.families())
    return PoolSnapshot(
        taken_at=now,
        total_keys=total,
        summaries=tuple(summaries),
        first_keys=tuple(key_state(k, now) for k in first),
        walk_seconds=seconds,
    )


class PoolSnapshots:
    """Snapshots of a pool, walked in slices on the event loop that owns the pool.

    ``fresh()`` gives a snapshot whose walk started less than ``max_age`` seconds
    ago, walking again if there is none; callers that come during a walk wait for
    that walk. ``latest`` is the last finished one, for readers that cannot wait
    (a Prometheus collector). A slice ends after ``slice_seconds``, checked every
    ``batch_keys`` keys: the cost of a key varies tenfold (a used key has rate
    state to read), so slices are bounded by time, not by a count of keys.

    Only the loop's thread may call ``fresh``; a snapshot itself is immutable.
    """

    def __init__(
        self,
        pool: SnapshotSource,
        *,
        listed: int = 0,
        slice_seconds: float = 0.002,
        batch_keys: int = 100,
        max_age: float = 1.0,
        timer: Callable[[], float] = time.monotonic,
    ) -> None:
        self._pool = pool
        self._listed = listed
        self._slice_seconds = slice_seconds
        self._batch = batch_keys
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
            self._walk = asyncio.get_running_loop().create_task(self._take())
            self._walk.add_done_callback(self._walked)
        # Shielded: a client that goes away must not cancel the walk others wait for.
        return await asyncio.shield(self._walk)

    def _walked(self, walk: asyncio.Task[PoolSnapshot]) -> None:
        self._walk = None

    async def _take(self) -> PoolSnapshot:
        started = self._timer()
        pool = self._pool
        now = pool.now()
        # The list is taken at once (a copy of references, ~1 ms at 100k keys); keys
        # removed during the walk are still counted once, keys added are not yet.
        keys = pool.keys()
        groups: Counter[_Group] = Counter()
        tokens: dict[str, int] = {}
        first: list[Key] = []
        clock = time.perf_counter
        slice_end = clock() + self._slice_seconds
        for start in range(0, len(keys), self._batch):
            part = keys[start : start + self._batch]
            _count_groups(groups, part, now)
            _add_token_sums(tokens, (k.token_usage for k in part))
            first = _first_by_hash(self._listed, first, part)
            if clock() >= slice_end:
                await asyncio.sleep(0)
                slice_end = clock() + self._slice_seconds
        snapshot = _snapshot(pool, now, len(keys), groups, tokens, first, self._timer() - started)
        self._latest, self._latest_started = snapshot, started
        return snapshot


def _summaries(
    groups: Counter[_Group],
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

    for (key_families, trial, disabled, revoked, over_quota, locked), n in groups.items():
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
            k.state,
            "yes" if k.is_trial else "no",
            str(k.prompt_count),
            str(sum(k.token_usage.values())),
        ]
        for k in sorted(keys, key=lambda k: k.hash)
    ]
    lines += ["", *_table(["key", "state", "trial", "prompts", "tokens"], key_rows)]
    return "\n".join(lines) + "\n"
