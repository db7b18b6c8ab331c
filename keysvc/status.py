"""The pool at a glance: key counts by family and state, lockouts, tokens used.

One summary serves three views: the Prometheus gauges, the HTML status page
(both read the pool on the event loop) and ``keysvc status`` (which reads
``List`` and ``GetLockoutPeriod`` over gRPC). Each view turns its keys into
``KeyState`` rows first, so the counting rules live here only.

States of a key:

- ``active``: not disabled and not locked (it would be handed out now);
- ``locked``: not disabled, but locked (``now < rate_limited_until``);
- ``disabled``: never handed out (revoked and over-quota keys are disabled too).

Every key of a family is in exactly one of those three. ``trial``, ``revoked``
and ``over_quota`` count keys with that flag and overlap with them: trial counts
the trial keys that are not disabled.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Final

from .keys import Key

__all__ = [
    "COUNTED_STATES",
    "PROBE_MODELS",
    "FamilySummary",
    "KeyState",
    "format_duration",
    "key_state",
    "render_text",
    "summarize",
    "summarize_pool",
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

    This runs on the event loop on every scrape and page view, so it does the
    least per key: one tuple and one counter bump (plus the usage sums when
    ``with_tokens``).
    """
    keys = list(keys)
    groups: Counter[_Group] = Counter(
        (k.profile.families, k.profile.is_trial, k.is_disabled, k.is_revoked,
         k.is_over_quota, now < k.rate_limited_until)
        for k in keys
    )  # fmt: skip
    tokens = _token_sums(k.token_usage for k in keys) if with_tokens else {}
    return _summaries(groups, tokens, lockout, families)


def _token_sums(usages: Iterable[Mapping[str, int]]) -> dict[str, int]:
    # A plain loop: Counter.update costs ~1 µs per key even for an empty usage.
    sums: dict[str, int] = {}
    for usage in usages:
        for family, used in usage.items():
            sums[family] = sums.get(family, 0) + used
    return sums


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
