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
from dataclasses import dataclass, field

from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from keysvc.errors import NoKeysForFamily
from keysvc.keys import DisableReason, Key
from keysvc.models import GPT4_32K, ModelTable
from keysvc.outcomes import UpstreamError
from keysvc.pool import (
    KEY_REUSE_DELAY,
    MAX_RESET,
    RATE_LIMIT_FALLBACK,
    RESERVATION_TTL,
    TOKEN_ESTIMATE_SPREAD,
    TOKEN_ESTIMATE_WEIGHT,
)
from tests.helpers import PAID, PAID_32K, TRIAL, TURBO_ONLY, pool_of

MODELS = ["gpt-4", "gpt-3.5-turbo", "gpt-4o", "text-embedding-ada-002", "gpt-4-32k"]
PROFILES = [PAID, TRIAL, PAID_32K, TURBO_ONLY]
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
    # The budget: left at budget_at, refill per second, in-flight (when, tokens).
    budget_at: float = 0.0
    left: dict[str, float] = field(default_factory=dict)
    rate: dict[str, float] = field(default_factory=dict)
    reserved: list[tuple[float, float]] = field(default_factory=list)
    # When the pool last derived the lock, and the token reservation then.
    derived_at: float = 0.0
    reserve: float = 1.0

    def derive(self, now: float, reserve: float) -> None:
        self.reserved = [r for r in self.reserved if r[0] + RESERVATION_TTL > now]
        self.derived_at, self.reserve = now, reserve

    def budget_until(self) -> float:
        needs = {"requests": len(self.reserved) + 1.0}
        needs["tokens"] = sum(t for _, t in self.reserved) + self.reserve
        waits = [
            (needs[d] - self.left[d]) / self.rate[d]
            for d in ("requests", "tokens")
            if d in self.left and d in self.rate and needs[d] > self.left[d]
        ]
        if not waits:
            return 0.0
        until = self.budget_at + min(max(waits), MAX_RESET)
        if self.reserved:
            until = min(until, self.reserved[0][0] + RESERVATION_TTL)
        return until

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
        if throttle and self.last_used:
            until = max(until, self.last_used + KEY_REUSE_DELAY)
        if throttle and self.budget_at:
            until = max(until, self.budget_until())
        return until


@dataclass
class RefKey:
    key: Key
    order: int
    disabled: bool = False
    last_used: float = 0.0
    wide: Shadow | None = None
    families: dict[str, Shadow] = field(default_factory=dict)

    def until(self, family: str) -> float:
        own = self.families.get(family)
        until = own.until(throttle=True) if own else 0.0
        if self.wide is not None:
            until = max(until, self.wide.until(throttle=False))
        return until

    def state(self, model: str) -> Shadow:
        if not model:
            if self.wide is None:
                self.wide = Shadow(rate_limited_at=self.last_used)
            return self.wide
        return self.families.setdefault(TABLE.family(model), Shadow())


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
    """``budget``: the report named a model (key-wide reports keep no budget)."""
    for dim in ("requests", "tokens"):
        reset = headers.get(f"x-ratelimit-reset-{dim}")
        left = headers.get(f"x-ratelimit-remaining-{dim}")
        limit = headers.get(f"x-ratelimit-limit-{dim}")
        if reset is not None:
            setattr(state, f"{dim}_reset", min(RESETS[reset], MAX_RESET))
        if left is not None:
            setattr(state, f"remaining_{dim}", int(left))
        if not budget:
            continue
        if None not in (reset, left, limit) and RESETS[reset] > 0 and int(left) < int(limit):
            state.rate[dim] = (int(limit) - int(left)) / RESETS[reset]
        if left is not None and dim in state.rate:
            state.budget_at = now
            state.left[dim] = float(left)


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
            new = Shadow(last_used=now, rate_limited_at=now, reserved=old.reserved)
            new.budget_at, new.left, new.rate = old.budget_at, old.left, old.rate
            if new.budget_at:
                new.reserved = [*new.reserved, (now, self.reserve(family))]
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
        self.pool.mark_rate_limited(ref.key.hash, model)
        state = ref.state(model)
        state.rate_limited_at = self.clock.now()
        state.saw_429 = True
        state.kind = ""  # MarkRateLimited does not say which limit
        if model:
            state.derive(self.clock.now(), self.reserve(TABLE.family(model)))

    @precondition(lambda self: self.pool is not None)
    @rule(i=st.integers(0, 7), model=MODEL_OR_NONE, headers=HEADERS)
    def update(self, i: int, model: str, headers: dict[str, str]) -> None:
        ref = self.ref(i)
        self.pool.update_rate_limits(ref.key.hash, headers, model)
        if headers:
            state = ref.state(model)
            if model and state.reserved:
                state.reserved.pop(0)
            apply_headers(state, headers, self.clock.now(), budget=bool(model))
            if model:
                state.derive(self.clock.now(), self.reserve(TABLE.family(model)))

    @precondition(lambda self: self.pool is not None)
    @rule(
        i=st.integers(0, 7),
        model=st.sampled_from(MODELS),
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
        family = TABLE.family(model)
        own = ref.families.get(family)
        released = own is not None and bool(own.reserved)
        if released:
            own.reserved.pop(0)  # type: ignore[union-attr]
        if headers or status == 429 or released:
            state = ref.state(model)
            apply_headers(state, headers, now, budget=True)
            if status == 429:
                state.rate_limited_at = now
                state.saw_429 = True
                state.kind = kind if kind != "other" else ""
                if state.kind in state.rate:
                    state.budget_at, state.left[state.kind] = now, 0.0
            state.derive(now, self.reserve(family))
        if status == 200 and tokens:  # learned after the lock is derived, as the pool does
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
        for family in ("gpt4", "turbo", "gpt4o", "dall-e"):
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
