"""The indexed pool against a brute-force model of the selection rules.

Hypothesis drives random sequences of every pool operation over keys of mixed
profiles; after each step, Get and GetLockoutPeriod must agree with a plain
sort-based reference of the documented order.
"""

from __future__ import annotations

from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from keysvc.errors import NoKeysForFamily
from keysvc.keys import DisableReason, Key
from keysvc.models import GPT4_32K, ModelTable
from tests.helpers import PAID, PAID_32K, TRIAL, TURBO_ONLY, pool_of

MODELS = ["gpt-4", "gpt-3.5-turbo", "gpt-4o", "text-embedding-ada-002", "gpt-4-32k"]
PROFILES = [PAID, TRIAL, PAID_32K, TURBO_ONLY]
TABLE = ModelTable()


def reference_rank(key: Key, now: float) -> tuple[float, ...]:
    locked = now < key.rate_limited_until
    return (
        1 if locked else 0,
        key.rate_limited_until if locked else 0.0,
        0 if key.is_trial else 1,
        1 if GPT4_32K in key.model_families else 0,
        key.last_used,
        key.seq,
    )


def reference_eligible(keys: list[Key], model: str) -> list[Key]:
    info = TABLE.lookup(model)
    return [
        k
        for k in keys
        if not k.is_disabled
        and info.family in k.model_families
        and not (info.embeddings and k.is_trial)
    ]


class PoolModel(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.pool, self.clock, self.keys = None, None, []  # type: ignore[assignment]

    @precondition(lambda self: self.pool is None)
    @rule(profiles=st.lists(st.sampled_from(PROFILES), min_size=1, max_size=8))
    def load(self, profiles):  # type: ignore[no-untyped-def]
        self.pool, self.clock, self.keys = pool_of(profiles)

    @precondition(lambda self: self.pool is not None)
    @rule(model=st.sampled_from(MODELS))
    def get(self, model: str) -> None:
        now = self.clock.now()
        eligible = reference_eligible(self.keys, model)
        expected = min(eligible, key=lambda k: reference_rank(k, now)) if eligible else None
        try:
            got = self.pool.get(model)
        except NoKeysForFamily:
            got = None
        assert got is expected

    @precondition(lambda self: self.pool is not None)
    @rule(model=st.sampled_from(MODELS))
    def lockout(self, model: str) -> None:
        now = self.clock.now()
        eligible = reference_eligible(self.keys, model)
        if not eligible or any(now >= k.rate_limited_until for k in eligible):
            expected = 0.0
        else:
            expected = min(k.rate_limited_until for k in eligible) - now
        assert abs(self.pool.lockout_period(model) - expected) < 1e-9

    @precondition(lambda self: self.pool is not None)
    @rule(i=st.integers(0, 7))
    def mark(self, i: int) -> None:
        self.pool.mark_rate_limited(self.keys[i % len(self.keys)].hash)

    @precondition(lambda self: self.pool is not None)
    @rule(
        i=st.integers(0, 7),
        requests=st.none() | st.sampled_from(["0s", "20ms", "1s", "2.5s", "1m30s"]),
        tokens=st.none() | st.sampled_from(["0", "300ms", "4s", "6m0s"]),
    )
    def update(self, i: int, requests: str | None, tokens: str | None) -> None:
        headers = {}
        if requests:
            headers["x-ratelimit-reset-requests"] = requests
        if tokens:
            headers["x-ratelimit-reset-tokens"] = tokens
        self.pool.update_rate_limits(self.keys[i % len(self.keys)].hash, headers)

    @precondition(lambda self: self.pool is not None)
    @rule(i=st.integers(0, 7), reason=st.sampled_from(list(DisableReason)))
    def disable(self, i: int, reason: DisableReason) -> None:
        self.pool.disable(self.keys[i % len(self.keys)].hash, reason)

    @precondition(lambda self: self.pool is not None)
    @rule()
    def recheck(self) -> None:
        self.pool.recheck()

    @precondition(lambda self: self.pool is not None)
    @rule(seconds=st.sampled_from([0.0, 0.01, 0.5, 1.0, 2.0, 9.99, 10.0, 30.0]))
    def wait(self, seconds: float) -> None:
        self.clock.advance(seconds)

    @invariant()
    def available_counts_enabled_keys(self) -> None:
        if self.pool is not None:
            assert self.pool.available() == sum(not k.is_disabled for k in self.keys)


TestPoolModel = PoolModel.TestCase
TestPoolModel.settings = settings(max_examples=150, stateful_step_count=60, deadline=None)
