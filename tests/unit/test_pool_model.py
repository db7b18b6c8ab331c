"""The indexed pool against a brute-force model of the selection rules.

Hypothesis drives random sequences of every pool operation over keys of mixed
profiles; after each step, Get and GetLockoutPeriod must agree with a plain
sort-based reference of the documented order. The reference keeps its own copy
of each key's rate-limit inputs (per family and key-wide) and derives the locks
itself, so the pool's bookkeeping, its lock rule and its indexes are all checked.

Locks are derived when a state changes (a hand-out, a report), so the reference
notes, per state, when it was last derived and the token reservation in force
then; the budget it computes from those is its own arithmetic.
"""

from __future__ import annotations

import math
from array import array
from dataclasses import dataclass, field

from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from keysvc.errors import NoKeysForFamily
from keysvc.keys import DisableReason, Key
from keysvc.models import GPT4_32K, ModelTable
from keysvc.outcomes import UpstreamError
from keysvc.pool import (
    ATTRIBUTION_WINDOW,
    BUDGET_LAPSE,
    KEY_REUSE_DELAY,
    MAX_BUDGET_WAIT,
    MAX_RESET,
    RATE_LIMIT_FALLBACK,
    REPORT_PAIR_WINDOW,
    RESERVATION_TTL,
    TOKEN_ESTIMATE_SPREAD,
    TOKEN_ESTIMATE_WEIGHT,
)
from tests.helpers import CLAUDE_ALL, HAIKU_ONLY, PAID, PAID_32K, TRIAL, TURBO_ONLY, pool_of

MODELS = ["gpt-4", "gpt-3.5-turbo", "gpt-4o", "text-embedding-ada-002", "gpt-4-32k"]
MODELS += ["claude-sonnet-4-5", "claude-3-5-haiku-20241022"]
#: A mixed pool: OpenAI keys and Anthropic keys (the last two profiles).
PROFILES = [PAID, TRIAL, PAID_32K, TURBO_ONLY, CLAUDE_ALL, HAIKU_ONLY]
TABLE = ModelTable()
#: Reset headers and the seconds they say (stored clamped to MAX_RESET).
RESETS = {"0": 0.0, "0s": 0.0, "20ms": 0.02, "300ms": 0.3, "1s": 1.0, "2.5s": 2.5, "4s": 4.0}
RESETS |= {"1m30s": 90.0, "6m0s": 360.0}


@dataclass
class Shadow:
    """The reference's copy of one rate-limit state."""

    last_used: float = 0.0
    rate_limited_at: float = 0.0
    requests_reset: float | None = None
    tokens_reset: float | None = None
    remaining_requests: int | None = None
    remaining_tokens: int | None = None
    saw_429: bool = False
    kind: str = ""
    # The budget: left at budget_at, refill per second until full_at, then the whole
    # limit; per dimension. In flight: (when, tokens), oldest first.
    budget_at: float = 0.0
    left: dict[str, float] = field(default_factory=dict)
    rate: dict[str, float] = field(default_factory=dict)
    limit: dict[str, float] = field(default_factory=dict)
    full_at: dict[str, float] = field(default_factory=dict)
    reserved: list[tuple[float, float]] = field(default_factory=list)
    # Per dimension: a 429 in this refill (probation); a fixed window (two of them).
    probation: set[str] = field(default_factory=set)
    window: set[str] = field(default_factory=set)
    # When the pool last derived the lock, and the token reservation then.
    derived_at: float = 0.0
    reserve: float = 1.0

    def derive(self, now: float, reserve: float) -> None:
        self.reserved = [r for r in self.reserved if r[0] + RESERVATION_TTL > now]
        if self.budget_at and now >= self.budget_at + BUDGET_LAPSE:
            self.budget_at = 0.0
            self.left, self.rate, self.limit, self.full_at = {}, {}, {}, {}
            self.probation, self.window = set(), set()
        self.derived_at, self.reserve = now, reserve

    def reanchor(self, now: float) -> None:
        if self.budget_at and self.budget_at != now:
            for dim, limit in self.limit.items():
                if now >= self.full_at[dim]:
                    self.left[dim] = single(limit)
                else:
                    refill = self.rate[dim] * (now - self.budget_at)
                    self.left[dim] = single(min(limit, self.left[dim] + refill))
        self.budget_at = now

    def available(self, dim: str, x: float) -> float:
        """What the dimension has ``x`` seconds after ``budget_at``."""
        if self.budget_at + x >= self.full_at[dim]:
            return self.limit[dim]
        return min(self.limit[dim], self.left[dim] + self.rate[dim] * x)

    def needed(self, dim: str, x: float) -> float:
        """Room for the reservations not lapsed ``x`` seconds after ``budget_at``, and
        one more hand-out."""
        live = [r for r in self.reserved if r[0] + RESERVATION_TTL > self.budget_at + x]
        if dim == "requests":
            return len(live) + 1.0
        return sum(tokens for _, tokens in live) + self.reserve

    def budget_until(self) -> float:
        """Brute force: the earliest moment, among those where anything changes, at
        which every budgeted dimension has room (as offsets from ``budget_at``, which
        an epoch time would round)."""
        dims = list(self.limit)

        def fits(x: float) -> bool:
            return all(self.needed(d, x) <= self.available(d, x) + 1e-9 for d in dims)

        if not dims or fits(0.0):
            return 0.0
        at = self.budget_at
        moments = {0.0, *(t - at for t in self.full_at.values())}
        moments |= {h + RESERVATION_TTL - at for h, _ in self.reserved}
        for d in dims:
            if self.rate[d] > 0:
                for lapsed in range(len(self.reserved) + 1):
                    x = self.reserved[lapsed - 1][0] + RESERVATION_TTL - at if lapsed else 0.0
                    moments.add((self.needed(d, x) - self.left[d]) / self.rate[d])
        candidates = sorted(x for x in moments if x >= 0 and fits(x))
        until = at + candidates[0] if candidates else math.inf
        return min(until, at + MAX_BUDGET_WAIT)

    def until(self, *, throttle: bool) -> float:
        if not self.last_used and not self.rate_limited_at and not self.budget_at:
            return 0.0
        resets = {"requests": self.requests_reset, "tokens": self.tokens_reset}
        known = [r for r in resets.values() if r is not None]
        remaining = {"requests": self.remaining_requests, "tokens": self.remaining_tokens}
        if self.saw_429 and self.kind in self.rate:
            window = 0.0
        elif self.saw_429 and resets.get(self.kind) is not None:
            window = resets[self.kind] or 0.0
        elif self.saw_429:
            window = max(known) if known else RATE_LIMIT_FALLBACK
        elif remaining != {"requests": None, "tokens": None}:
            window = 0.0
            for dim, left in remaining.items():
                if left == 0 and dim not in self.rate:
                    reset = resets[dim]
                    window = max(window, RATE_LIMIT_FALLBACK if reset is None else reset)
        else:
            window = max(known) if known else 0.0
        until = self.rate_limited_at + window if self.rate_limited_at else 0.0
        if throttle and self.budget_at:
            until = max(until, self.budget_until())
        elif throttle and self.last_used:
            until = max(until, self.last_used + KEY_REUSE_DELAY)
        return until

    def mark(self, now: float, kind: str) -> None:
        """A 429 of type ``kind`` ("": not told, so inferred; "other": neither limit)."""
        if not kind and self.budget_at:
            if self.remaining_requests == 0 and "requests" in self.limit:
                kind = "requests"
            elif self.remaining_tokens == 0 and "tokens" in self.limit:
                kind = "tokens"
        kind = "" if kind == "other" else kind
        self.rate_limited_at = now
        self.saw_429 = True
        self.kind = kind
        if kind in self.limit:
            self.reanchor(now)
            self.left[kind] = 0.0
            if kind in self.probation:
                self.window.add(kind)
                self.rate[kind] = 0.0
            else:
                self.probation.add(kind)
            if self.full_at[kind] <= now:
                self.full_at[kind] = now + RATE_LIMIT_FALLBACK


@dataclass
class RefKey:
    key: Key
    order: int
    disabled: bool = False
    last_used: float = 0.0
    wide: Shadow | None = None
    families: dict[str, Shadow] = field(default_factory=dict)
    #: The family the last report without a model went to, and when.
    answered: tuple[str, float] | None = None

    def until(self, family: str) -> float:
        own = self.families.get(family)
        until = own.until(throttle=True) if own else 0.0
        if self.wide is not None:
            until = max(until, self.wide.until(throttle=False))
        return until

    def state(self, family: str) -> Shadow:
        if not family:
            if self.wide is None:
                self.wide = Shadow(rate_limited_at=self.last_used)
            return self.wide
        return self.families.setdefault(family, Shadow())

    def attribute(
        self, model: str, now: float, *, answer: bool, headers: dict[str, str] | None = None
    ) -> tuple[str, bool]:
        """The family a report is for ("": key-wide), and whether it released a hand-out."""
        if model:
            own = self.families.get(TABLE.family(model))
            released = answer and own is not None and bool(own.reserved)
            if released:
                own.reserved.pop(0)  # type: ignore[union-attr]
            return TABLE.family(model), released
        if not answer and self.answered and now < self.answered[1] + REPORT_PAIR_WINDOW:
            return self.answered[0], False
        in_flight = [(s.reserved[0][0], f) for f, s in sorted(self.families.items()) if s.reserved]
        matching = [
            (at, f) for at, f in in_flight if headers and limits_match(self.families[f], headers)
        ]
        in_flight = matching or in_flight
        used = [(-s.last_used, f) for f, s in sorted(self.families.items()) if s.last_used]
        released = False
        if in_flight:
            family = min(in_flight, key=lambda pair: pair[0])[1]
            if answer:
                self.families[family].reserved.pop(0)
                released = True
        elif used and now < -min(used, key=lambda pair: pair[0])[0] + ATTRIBUTION_WINDOW:
            family = min(used, key=lambda pair: pair[0])[1]
        else:
            return "", False
        if answer:
            self.answered = (family, now)
        return family, released


def own_headers(ref: RefKey, headers: dict[str, str]) -> dict[str, str]:
    """The headers the key's provider reads: an Anthropic key ignores x-ratelimit-*."""
    return headers if ref.key.service == "openai" else {}


def single(value: float) -> float:
    """``value`` as the pool stores a budget's left and rate: a 4-byte float."""
    return float(array("f", [value])[0])


def limits_match(state: Shadow, headers: dict[str, str]) -> bool:
    compared = False
    for dim in ("requests", "tokens"):
        limit = headers.get(f"x-ratelimit-limit-{dim}")
        if limit is not None and dim in state.limit:
            if int(limit) != state.limit[dim]:
                return False
            compared = True
    return compared


def reference_rank(ref: RefKey, family: str, now: float) -> tuple[float, ...]:
    until = ref.until(family)
    locked = now < until
    own = ref.families.get(family)
    return (
        1 if locked else 0,
        until if locked else 0.0,
        0 if ref.key.is_trial else 1,
        1 if GPT4_32K in ref.key.model_families else 0,
        own.last_used if own else 0.0,
        ref.order,
    )


def reference_eligible(refs: list[RefKey], model: str) -> list[RefKey]:
    info = TABLE.lookup(model)
    return [
        r
        for r in refs
        if not r.disabled
        and info.family in r.key.model_families
        and not (info.embeddings and r.key.is_trial)
    ]


def header_set(
    requests: str | None,
    tokens: str | None,
    left_requests: int | None,
    left_tokens: int | None,
    limit_requests: int | None,
    limit_tokens: int | None,
) -> dict[str, str]:
    headers = {}
    for name, value in (
        ("x-ratelimit-reset-requests", requests),
        ("x-ratelimit-reset-tokens", tokens),
        ("x-ratelimit-remaining-requests", left_requests),
        ("x-ratelimit-remaining-tokens", left_tokens),
        ("x-ratelimit-limit-requests", limit_requests),
        ("x-ratelimit-limit-tokens", limit_tokens),
    ):
        if value is not None:
            headers[name] = str(value)
    return headers


def apply_headers(state: Shadow, headers: dict[str, str], now: float, *, budget: bool) -> None:
    """``budget``: the report went to a family (key-wide reports keep no budget)."""
    lefts: dict[str, int] = {}
    for dim in ("requests", "tokens"):
        reset = headers.get(f"x-ratelimit-reset-{dim}")
        left = headers.get(f"x-ratelimit-remaining-{dim}")
        if reset is not None:
            setattr(state, f"{dim}_reset", min(RESETS[reset], MAX_RESET))
        if left is not None:
            setattr(state, f"remaining_{dim}", int(left))
            lefts[dim] = int(left)
    if not budget or not lefts:
        return
    if state.budget_at:
        state.reanchor(now)
    for dim, left in lefts.items():
        reset = headers.get(f"x-ratelimit-reset-{dim}")
        limit = headers.get(f"x-ratelimit-limit-{dim}")
        # Within one refill (until the limit is whole again) an answer only lowers.
        fresh = dim not in state.limit or now >= state.full_at[dim]
        if limit is not None and reset is not None:
            seconds, whole = RESETS[reset], int(limit)
            fresh = fresh or state.limit[dim] != whole
            refill = (whole - left) / seconds if seconds > 0 and left < whole else None
            if fresh:
                state.probation.discard(dim)
                state.rate[dim] = 0.0 if refill is None or dim in state.window else single(refill)
            elif refill is not None:
                state.rate[dim] = min(state.rate[dim], single(refill))
            state.limit[dim] = whole
            full_at = now + min(seconds, MAX_BUDGET_WAIT)
            if fresh or full_at > state.full_at[dim]:
                state.full_at[dim] = full_at
        if dim in state.limit:
            state.left[dim] = single(left) if fresh else min(single(left), state.left[dim])
            state.budget_at = now


HEADERS = st.builds(
    header_set,
    st.none() | st.sampled_from(list(RESETS)),
    st.none() | st.sampled_from(list(RESETS)),
    st.none() | st.sampled_from([0, 0, 1, 50]),
    st.none() | st.sampled_from([0, 0, 900]),
    st.none() | st.sampled_from([3, 60]),
    st.none() | st.sampled_from([1000, 100_000]),
)
MODEL_OR_NONE = st.sampled_from(["", *MODELS])


class PoolModel(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.pool, self.clock, self.refs = None, None, []  # type: ignore[assignment]
        #: Per family: the tokens of every finished request, oldest first.
        self.tokens: dict[str, list[int]] = {}

    def reserve(self, family: str) -> float:
        """mean + SPREAD·sd of the family's tokens, weighted by (1 - WEIGHT)^age."""
        seen = self.tokens.get(family)
        if not seen:
            return 1.0
        mean, variance = float(seen[0]), 0.0
        for tokens in seen[1:]:
            step = TOKEN_ESTIMATE_WEIGHT * (tokens - mean)
            variance = (1 - TOKEN_ESTIMATE_WEIGHT) * (variance + (tokens - mean) * step)
            mean += step
        return max(1.0, mean + TOKEN_ESTIMATE_SPREAD * math.sqrt(variance))

    @precondition(lambda self: self.pool is None)
    @rule(profiles=st.lists(st.sampled_from(PROFILES), min_size=1, max_size=8))
    def load(self, profiles):  # type: ignore[no-untyped-def]
        self.pool, self.clock, keys = pool_of(profiles)
        self.refs = [RefKey(key, i) for i, key in enumerate(keys)]

    def ref(self, i: int) -> RefKey:
        return self.refs[i % len(self.refs)]

    @precondition(lambda self: self.pool is not None)
    @rule(model=st.sampled_from(MODELS))
    def get(self, model: str) -> None:
        now = self.clock.now()
        family = TABLE.family(model)
        eligible = reference_eligible(self.refs, model)
        expected = min(eligible, key=lambda r: reference_rank(r, family, now)) if eligible else None
        try:
            got = self.pool.get(model)
        except NoKeysForFamily:
            got = None
        assert got is (expected.key if expected else None)
        if expected is not None:
            old = expected.families.get(family) or Shadow()
            # The hand-out spends the answer's headers but keeps the budget.
            new = Shadow(last_used=now, rate_limited_at=now)
            new.budget_at, new.left, new.rate = old.budget_at, old.left, old.rate
            new.limit, new.full_at = old.limit, old.full_at
            new.probation, new.window = old.probation, old.window
            new.reserved = [*old.reserved, (now, self.reserve(family))]
            new.derive(now, self.reserve(family))
            expected.families[family] = new
            expected.last_used = now
            expected.wide = None

    @precondition(lambda self: self.pool is not None)
    @rule(model=st.sampled_from(MODELS))
    def lockout(self, model: str) -> None:
        now = self.clock.now()
        family = TABLE.family(model)
        untils = [r.until(family) for r in reference_eligible(self.refs, model)]
        if not untils or any(now >= until for until in untils):
            expected = 0.0
        else:
            expected = min(untils) - now
        assert abs(self.pool.lockout_period(model) - expected) < 1e-9

    @precondition(lambda self: self.pool is not None)
    @rule(i=st.integers(0, 7), model=MODEL_OR_NONE)
    def mark(self, i: int, model: str) -> None:
        ref = self.ref(i)
        now = self.clock.now()
        self.pool.mark_rate_limited(ref.key.hash, model)
        family, _ = ref.attribute(model, now, answer=False)
        state = ref.state(family)
        state.mark(now, "")  # MarkRateLimited does not say which limit
        if family:
            state.derive(now, self.reserve(family))

    @precondition(lambda self: self.pool is not None)
    @rule(i=st.integers(0, 7), model=MODEL_OR_NONE, headers=HEADERS)
    def update(self, i: int, model: str, headers: dict[str, str]) -> None:
        ref = self.ref(i)
        now = self.clock.now()
        self.pool.update_rate_limits(ref.key.hash, headers, model)
        headers = own_headers(ref, headers)
        if headers:
            family, _ = ref.attribute(model, now, answer=True, headers=headers)
            state = ref.state(family)
            apply_headers(state, headers, now, budget=bool(family))
            if family:
                state.derive(now, self.reserve(family))

    @precondition(lambda self: self.pool is not None)
    @rule(
        i=st.integers(0, 7),
        model=MODEL_OR_NONE,
        status=st.sampled_from([200, 429, 500, 400]),
        headers=HEADERS,
        kind=st.sampled_from(["tokens", "requests", "other"]),
        tokens=st.sampled_from([0, 300, 1000]),
    )
    def report(  # noqa: PLR0913
        self, i: int, model: str, status: int, headers: dict[str, str], kind: str, tokens: int
    ) -> None:
        ref = self.ref(i)
        now = self.clock.now()
        self.pool.report_outcome(
            ref.key.hash,
            model,
            status=status,
            headers=headers,
            error=UpstreamError(kind),
            completion_tokens=tokens,
        )
        headers = own_headers(ref, headers)
        family, released = ref.attribute(model, now, answer=True, headers=headers)
        if headers or status == 429 or released:
            state = ref.state(family)
            apply_headers(state, headers, now, budget=bool(family))
            if status == 429:
                # Anthropic's 429 (rate_limit_error) does not say which limit it hit.
                state.mark(now, kind if ref.key.service == "openai" else "")
            if family:
                state.derive(now, self.reserve(family))
        if status == 200 and tokens and family:  # learned after the lock is derived
            self.tokens.setdefault(family, []).append(tokens)

    @precondition(lambda self: self.pool is not None)
    @rule(i=st.integers(0, 7), reason=st.sampled_from(list(DisableReason)))
    def disable(self, i: int, reason: DisableReason) -> None:
        self.pool.disable(self.ref(i).key.hash, reason)
        self.ref(i).disabled = True

    @precondition(lambda self: self.pool is not None)
    @rule(i=st.integers(0, 7), is_trial=st.booleans())
    def check(self, i: int, is_trial: bool) -> None:
        # The checker moves the key to another profile (its queues, its ranks) and
        # back; its rate-limit state goes with it. The reference reads the profile
        # from the key itself.
        self.pool.apply_check(self.ref(i).key.hash, model_ids=None, is_trial=is_trial)

    @precondition(lambda self: self.pool is not None)
    @rule()
    def recheck(self) -> None:
        self.pool.recheck()
        for ref in self.refs:
            ref.disabled = False

    @precondition(lambda self: self.pool is not None)
    @rule(seconds=st.sampled_from([0.0, 0.01, 0.5, 1.0, 2.0, 9.99, 10.0, 30.0]))
    def wait(self, seconds: float) -> None:
        self.clock.advance(seconds)

    @invariant()
    def available_counts_enabled_keys(self) -> None:
        if self.pool is not None:
            assert self.pool.available() == sum(not r.disabled for r in self.refs)

    @invariant()
    def family_lockout_matches_the_reference(self) -> None:
        # dall-e is never asked for here: its keys are not indexed for it, so
        # only key-wide locks can hold them back (family_lockout's other path).
        if self.pool is None:
            return
        now = self.clock.now()
        for family in ("gpt4", "turbo", "gpt4o", "dall-e", "claude-sonnet", "claude-haiku"):
            untils = [
                r.until(family)
                for r in self.refs
                if not r.disabled and family in r.key.model_families
            ]
            if not untils or any(now >= until for until in untils):
                expected = 0.0
            else:
                expected = min(untils) - now
            assert abs(self.pool.family_lockout(family) - expected) < 1e-9, family


TestPoolModel = PoolModel.TestCase
TestPoolModel.settings = settings(max_examples=200, stateful_step_count=60, deadline=None)
