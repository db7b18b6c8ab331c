"""The indexed pool against a brute-force model of the selection rules.

Hypothesis drives random sequences of every pool operation over keys of mixed
profiles; after each step, Get and GetLockoutPeriod must agree with a plain
sort-based reference of the documented order. The reference keeps its own copy
of each key's rate-limit inputs (per family and key-wide) and derives the locks
itself, so the pool's bookkeeping, its lock rule and its indexes are all checked.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from keysvc.errors import NoKeysForFamily
from keysvc.keys import DisableReason, Key
from keysvc.models import GPT4_32K, ModelTable
from keysvc.outcomes import UpstreamError
from keysvc.pool import KEY_REUSE_DELAY, MAX_RESET, RATE_LIMIT_FALLBACK
from tests.helpers import PAID, PAID_32K, TRIAL, TURBO_ONLY, pool_of

MODELS = ["gpt-4", "gpt-3.5-turbo", "gpt-4o", "text-embedding-ada-002", "gpt-4-32k"]
PROFILES = [PAID, TRIAL, PAID_32K, TURBO_ONLY]
TABLE = ModelTable()
RESETS = {"0": 0.0, "0s": 0.0, "20ms": 0.02, "300ms": 0.3, "1s": 1.0, "2.5s": 2.5, "4s": 4.0}
RESETS |= {"1m30s": MAX_RESET, "6m0s": MAX_RESET}


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

    def until(self, *, throttle: bool) -> float:
        if not self.last_used and not self.rate_limited_at:
            return 0.0
        resets = [r for r in (self.requests_reset, self.tokens_reset) if r is not None]
        remaining = (self.remaining_requests, self.remaining_tokens)
        if self.saw_429:
            window = max(resets) if resets else RATE_LIMIT_FALLBACK
        elif remaining != (None, None):
            window = 0.0
            for left, reset in zip(
                remaining, (self.requests_reset, self.tokens_reset), strict=True
            ):
                if left == 0:
                    window = max(window, RATE_LIMIT_FALLBACK if reset is None else reset)
        else:
            window = max(resets) if resets else 0.0
        until = self.rate_limited_at + window
        if throttle and self.last_used:
            until = max(until, self.last_used + KEY_REUSE_DELAY)
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
    requests: str | None, tokens: str | None, left_requests: int | None, left_tokens: int | None
) -> dict[str, str]:
    headers = {}
    for name, value in (
        ("x-ratelimit-reset-requests", requests),
        ("x-ratelimit-reset-tokens", tokens),
        ("x-ratelimit-remaining-requests", left_requests),
        ("x-ratelimit-remaining-tokens", left_tokens),
    ):
        if value is not None:
            headers[name] = str(value)
    return headers


def apply_headers(state: Shadow, headers: dict[str, str]) -> None:
    if "x-ratelimit-reset-requests" in headers:
        state.requests_reset = RESETS[headers["x-ratelimit-reset-requests"]]
    if "x-ratelimit-reset-tokens" in headers:
        state.tokens_reset = RESETS[headers["x-ratelimit-reset-tokens"]]
    if "x-ratelimit-remaining-requests" in headers:
        state.remaining_requests = int(headers["x-ratelimit-remaining-requests"])
    if "x-ratelimit-remaining-tokens" in headers:
        state.remaining_tokens = int(headers["x-ratelimit-remaining-tokens"])


HEADERS = st.builds(
    header_set,
    st.none() | st.sampled_from(list(RESETS)),
    st.none() | st.sampled_from(list(RESETS)),
    st.none() | st.sampled_from([0, 0, 1, 50]),
    st.none() | st.sampled_from([0, 0, 900]),
)
MODEL_OR_NONE = st.sampled_from(["", *MODELS])


class PoolModel(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.pool, self.clock, self.refs = None, None, []  # type: ignore[assignment]

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
            expected.families[family] = Shadow(last_used=now, rate_limited_at=now)
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

    @precondition(lambda self: self.pool is not None)
    @rule(i=st.integers(0, 7), model=MODEL_OR_NONE, headers=HEADERS)
    def update(self, i: int, model: str, headers: dict[str, str]) -> None:
        ref = self.ref(i)
        self.pool.update_rate_limits(ref.key.hash, headers, model)
        if headers:
            apply_headers(ref.state(model), headers)

    @precondition(lambda self: self.pool is not None)
    @rule(
        i=st.integers(0, 7),
        model=st.sampled_from(MODELS),
        status=st.sampled_from([200, 429, 500, 400]),
        headers=HEADERS,
    )
    def report(self, i: int, model: str, status: int, headers: dict[str, str]) -> None:
        ref = self.ref(i)
        self.pool.report_outcome(
            ref.key.hash, model, status=status, headers=headers, error=UpstreamError("tokens")
        )
        if headers or status == 429:
            state = ref.state(model)
            apply_headers(state, headers)
            if status == 429:
                state.rate_limited_at = self.clock.now()
                state.saw_429 = True

    @precondition(lambda self: self.pool is not None)
    @rule(i=st.integers(0, 7), reason=st.sampled_from(list(DisableReason)))
    def disable(self, i: int, reason: DisableReason) -> None:
        self.pool.disable(self.ref(i).key.hash, reason)
        self.ref(i).disabled = True

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
