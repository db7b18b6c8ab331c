"""The Redis backend against the memory backend: the same random operations on both.

A hypothesis state machine loads the same keys (same secrets, profiles and load
order) into a memory ``KeyPool`` and a ``RedisBackend`` on the test session's
redis-server, both on one manual clock (the scripts get its time instead of
``TIME``), and applies every operation to both: Get, GetLockoutPeriod,
MarkRateLimited, UpdateRateLimits, ReportOutcome, IncrementUsage, Disable,
the key checker's results (with listed model ids, which then decide the models
a key serves, or without), Recheck (with and without a checker), and time
passing. Gets ask for models that some keys' listings lack, and for dated
snapshots of listed models. Every hand-out, lockout, error and Key message must
be the same. (The memory pool's own model test, ``tests/unit/test_pool_model.py``,
checks the memory backend against a brute-force reference; this carries that
to Redis.)
"""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import Awaitable
from typing import Any, TypeVar

import redis.asyncio as aioredis
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)

from keysvc.errors import KeysvcError
from keysvc.keys import DisableReason, Key
from keysvc.models import ModelTable
from keysvc.outcomes import UpstreamError
from keysvc.pool import KeyPool
from keysvc.pool.redis import RedisBackend
from keysvc.service import key_to_proto
from tests.helpers import PAID, PAID_32K, TRIAL, TURBO_ONLY, pool_of
from tests.redis_server import RedisServer
from tests.unit.test_pool_model import MODEL_OR_NONE, MODELS, OPENAI_HEADERS, RESETS

#: Who asks: nobody (in-process use), or one of two connections (GetLockoutPeriod's holds).
CALLERS = st.sampled_from(["", "ipv4:127.0.0.1:40001", "ipv4:127.0.0.1:40002"])

T = TypeVar("T")
#: One dimension's limit, remaining and reset: a token bucket (some left, refilling
#: within the reset) or a fixed window (nothing left until a long reset).
BUDGET_HEADERS = st.tuples(
    st.sampled_from([3, 60]), st.sampled_from([0, 0, 1, 2, 59]), st.sampled_from(list(RESETS))
)

#: The models and dimensions of the budget rounds (OpenAI families, one per model).
BUDGET_MODELS = st.sampled_from(["gpt-4", "gpt-4o", "gpt-3.5-turbo"])
BUDGET_DIMENSIONS = st.sampled_from(["requests", "tokens"])


def budget_headers(dim: str, limit: int, remaining: int, reset: str) -> dict[str, str]:
    """The x-ratelimit headers of one dimension (tokens: the limit counted in 1000s)."""
    scale = 1 if dim == "requests" else 1000
    return {
        f"x-ratelimit-limit-{dim}": str(limit * scale),
        f"x-ratelimit-remaining-{dim}": str(min(remaining, limit) * scale),
        f"x-ratelimit-reset-{dim}": reset,
    }


PROFILES = [PAID, TRIAL, PAID_32K, TURBO_ONLY]
#: Model ids a key checker may list for a key: models some keys lack (gpt-4o-mini is
#: turbo's, gpt-4o gpt4o's), dated snapshots, an id no rule matches, none at all.
ID_LISTS: list[tuple[str, ...]] = [
    ("gpt-4o", "gpt-3.5-turbo"),
    ("gpt-4", "gpt-4o", "gpt-4o-mini", "gpt-3.5-turbo", "text-embedding-ada-002"),
    ("gpt-4-0613", "gpt-4o-mini"),
    ("gpt-4", "gpt-4-32k", "gpt-3.5-turbo"),
    ("ft:gpt-3.5-turbo:acme::x1", "gpt-4o-2024-08-06"),
    (),
]
#: Models Gets and lockouts ask for: the pool model's, and names only some listings have.
GET_MODELS = [*MODELS, "gpt-4o-mini", "gpt-4o-2024-08-06", "gpt-4-0613", "gpt-4-32k-0613"]
_pools = itertools.count()


def outcome(call: Any) -> tuple[str, Any]:
    """("ok", value) or ("error", its code and reason)."""
    try:
        return "ok", call()
    except KeysvcError as error:
        return "error", (error.code, error.reason)


class Differential(RuleBasedStateMachine):
    url = ""

    def __init__(self) -> None:
        super().__init__()
        self.loop = asyncio.new_event_loop()
        self.client = aioredis.Redis.from_url(self.url)
        self.memory: KeyPool | None = None
        self.redis: RedisBackend | None = None
        self.keys: list[Key] = []

    def run(self, call: Awaitable[T]) -> T:
        return self.loop.run_until_complete(call)

    def both(self, memory: Any, redis: Any) -> None:
        """Applies one operation to both backends; they must answer alike."""
        expected = outcome(memory)
        assert outcome(lambda: self.run(redis())) == expected

    def teardown(self) -> None:
        self.run(self.client.aclose())
        self.loop.close()

    @precondition(lambda self: self.memory is None)
    @rule(profiles=st.lists(st.sampled_from(PROFILES), min_size=1, max_size=6))
    def load(self, profiles: list[Any]) -> None:
        self.memory, self.clock, self.keys = pool_of(profiles)
        self.redis = RedisBackend(
            self.client,
            models=ModelTable(),
            prefix=f"diff{next(_pools)}",
            timeout=5.0,
            now=self.clock.now,
        )
        for key, profile in zip(self.keys, profiles, strict=True):
            self.run(self.redis.add_keys([key.secret], profile=profile))

    def hash(self, i: int) -> str:
        return self.keys[i % len(self.keys)].hash

    @precondition(lambda self: self.memory is not None)
    @rule(model=st.sampled_from(GET_MODELS), caller=CALLERS)
    def get(self, model: str, caller: str) -> None:
        self.get_both(model, caller)

    def get_both(self, model: str, caller: str = "") -> str:
        """A Get on both: the same hand-out (its hash; "" on an error)."""
        assert self.memory is not None and self.redis is not None
        redis = self.redis
        expected = outcome(lambda: self.memory.get(model, caller=caller))  # type: ignore[union-attr]
        got = outcome(lambda: self.run(redis.get(model, caller=caller)))
        if expected[0] == "ok":
            assert got[0] == "ok", got
            assert got[1].hash == expected[1].hash
            assert got[1].secret == expected[1].secret
            assert key_to_proto(got[1]) == key_to_proto(expected[1])
            return str(got[1].hash)
        assert got == expected
        return ""

    @precondition(lambda self: self.memory is not None)
    @rule(model=st.sampled_from(["", *GET_MODELS]), caller=CALLERS)
    def lockout(self, model: str, caller: str = "") -> None:
        # With a caller, a 0 holds room for its next Get: both backends must hold alike.
        assert self.memory is not None and self.redis is not None
        redis = self.redis
        expected = self.memory.lockout_period(model, caller=caller)
        assert abs(self.run(redis.lockout_period(model, caller=caller)) - expected) < 1e-9

    @precondition(lambda self: self.memory is not None)
    @rule(i=st.integers(0, 7), model=MODEL_OR_NONE)
    def mark(self, i: int, model: str) -> None:
        self.mark_both(self.hash(i), model)

    def mark_both(self, key_hash: str, model: str) -> None:
        assert self.memory is not None and self.redis is not None
        redis = self.redis
        self.both(
            lambda: self.memory.mark_rate_limited(key_hash, model),  # type: ignore[union-attr]
            lambda: redis.mark_rate_limited(key_hash, model),
        )

    @precondition(lambda self: self.memory is not None)
    @rule(i=st.integers(0, 7), model=MODEL_OR_NONE, headers=OPENAI_HEADERS)
    def update(self, i: int, model: str, headers: dict[str, str]) -> None:
        self.update_both(self.hash(i), headers, model)

    def update_both(self, key_hash: str, headers: dict[str, str], model: str) -> None:
        assert self.memory is not None and self.redis is not None
        redis = self.redis
        self.both(
            lambda: self.memory.update_rate_limits(key_hash, headers, model),  # type: ignore[union-attr]
            lambda: redis.update_rate_limits(key_hash, headers, model),
        )

    @precondition(lambda self: self.memory is not None)
    @rule(
        i=st.integers(0, 7),
        model=MODEL_OR_NONE,
        status=st.sampled_from([200, 429, 500, 400, 401]),
        headers=OPENAI_HEADERS,
        kind=st.sampled_from(["tokens", "requests", "other", "insufficient_quota"]),
        tokens=st.sampled_from([0, 300, 1000]),
    )
    def report(  # noqa: PLR0913
        self, i: int, model: str, status: int, headers: dict[str, str], kind: str, tokens: int
    ) -> None:
        assert self.memory is not None and self.redis is not None
        redis, key_hash = self.redis, self.hash(i)
        error = UpstreamError(kind, kind)
        memory = self.memory

        def in_memory() -> tuple[Any, Any]:
            decision, key = memory.report_outcome(
                key_hash,
                model,
                status=status,
                headers=headers,
                error=error,
                completion_tokens=tokens,
            )
            return decision, key_to_proto(key)

        async def in_redis() -> tuple[Any, Any]:
            decision, key = await redis.report_outcome(
                key_hash,
                model,
                status=status,
                headers=headers,
                error=error,
                completion_tokens=tokens,
            )
            return decision, key_to_proto(key)

        self.both(in_memory, in_redis)

    def report_both(
        self, key_hash: str, model: str, status: int, headers: dict[str, str], kind: str = ""
    ) -> None:
        """One ReportOutcome on both backends: the same decision and Key message."""
        assert self.memory is not None and self.redis is not None
        memory, redis = self.memory, self.redis
        error = UpstreamError(kind, kind)

        def in_memory() -> tuple[Any, Any]:
            decision, key = memory.report_outcome(
                key_hash, model, status=status, headers=headers, error=error
            )
            return decision, key_to_proto(key)

        async def in_redis() -> tuple[Any, Any]:
            decision, key = await redis.report_outcome(
                key_hash, model, status=status, headers=headers, error=error
            )
            return decision, key_to_proto(key)

        self.both(in_memory, in_redis)

    @precondition(lambda self: self.memory is not None)
    @rule(
        i=st.integers(0, 7),
        model=BUDGET_MODELS,
        named=st.booleans(),
        dim=BUDGET_DIMENSIONS,
        burst=st.integers(0, 2),
        first=BUDGET_HEADERS,
        limited=st.lists(
            st.tuples(
                st.sampled_from(["requests", "tokens", "other", ""]), st.booleans(), st.booleans()
            ),
            max_size=3,
        ),
        gap=st.sampled_from([0.0, 0.01, 0.5, 2.0, 61.0]),
        then=BUDGET_HEADERS,
    )
    def budget_round(  # noqa: PLR0913
        self,
        i: int,
        model: str,
        named: bool,
        dim: str,
        burst: int,
        first: tuple[int, int, str],
        limited: list[tuple[str, bool, bool]],
        gap: float,
        then: tuple[int, int, str],
    ) -> None:
        """One refill of a key's budget, the shape random inputs seldom line up: an
        answer with a dimension's limit, remaining and reset (a token bucket refills
        steadily, a fixed window only at its end), 429s naming the dimension or not
        (a second one in one refill, for a request sent after the first, marks a
        fixed window; those of a burst sent before it do not), time, the next
        refill's answer; each report with the model or without (attributed to a
        hand-out), the seed's way (UpdateRateLimits, then MarkRateLimited) or
        ReportOutcome's; a 429 after a new hand-out or not."""
        # The key a Get hands out (the hand-out a report without a model is for),
        # and more of them sent before the first answer.
        key_hash = self.get_both(model) or self.hash(i)
        for _ in range(burst):
            self.get_both(model)
        report_model = model if named else ""
        self.clock.advance(0.005)
        self.report_both(key_hash, report_model, 200, budget_headers(dim, *first))
        for kind, with_headers, handed_out in limited:
            if handed_out:
                self.clock.advance(0.01)
                self.get_both(model)
            headers = budget_headers(dim, first[0], 0, first[2]) if with_headers else {}
            if kind:
                self.report_both(key_hash, report_model, 429, headers, kind)
            else:
                if with_headers:  # the seed reports a 429's headers, then the 429
                    self.update_both(key_hash, headers, report_model)
                self.mark_both(key_hash, report_model)
        self.clock.advance(gap)
        self.report_both(key_hash, report_model, 200, budget_headers(dim, *then))
        self.lockout(model)

    @precondition(lambda self: self.memory is not None)
    @rule(
        i=st.integers(0, 7),
        model=BUDGET_MODELS,
        named=st.booleans(),
        dim=BUDGET_DIMENSIONS,
        window=st.booleans(),
        seed_rpcs=st.booleans(),
        handed_out=st.booleans(),
        steps=st.lists(st.sampled_from([0.05, 0.5, 2.0]), min_size=1, max_size=4),
    )
    def shape_round(  # noqa: PLR0913
        self,
        i: int,
        model: str,
        named: bool,
        dim: str,
        window: bool,
        seed_rpcs: bool,
        handed_out: bool,
        steps: list[float],
    ) -> None:
        """A budget spent by a 429, then answers that say nothing is left, some soon
        and some well after: their resets name a fixed window's end (the same time,
        nearer each answer) or a token bucket's (a whole refill from each answer),
        which tells the two apart whichever hand-out each answers."""
        key_hash = self.get_both(model) or self.hash(i)
        report_model = model if named else ""
        self.clock.advance(0.005)
        self.report_both(key_hash, report_model, 200, budget_headers(dim, 60, 0, "30s"))
        since = 0.0
        for step in [0.0, *steps]:
            self.clock.advance(step)
            since += step
            if handed_out:
                self.get_both(model)
            reset = f"{30.0 - since:.3f}s" if window else "30s"
            headers = budget_headers(dim, 60, 0, reset)
            if seed_rpcs:
                self.update_both(key_hash, headers, report_model)
                self.mark_both(key_hash, report_model)
            else:
                self.report_both(key_hash, report_model, 429, headers, dim)
            self.lockout(model)

    @precondition(lambda self: self.memory is not None)
    @rule(i=st.integers(0, 7), model=st.sampled_from(MODELS), tokens=st.sampled_from([0, 5, 800]))
    def usage(self, i: int, model: str, tokens: int) -> None:
        assert self.memory is not None and self.redis is not None
        redis, key_hash = self.redis, self.hash(i)
        self.both(
            lambda: self.memory.increment_usage(key_hash, model, tokens),  # type: ignore[union-attr]
            lambda: redis.increment_usage(key_hash, model, tokens),
        )

    @precondition(lambda self: self.memory is not None)
    @rule(i=st.integers(0, 7), reason=st.sampled_from(list(DisableReason)))
    def disable(self, i: int, reason: DisableReason) -> None:
        assert self.memory is not None and self.redis is not None
        redis, key_hash = self.redis, self.hash(i)
        expected = key_to_proto(self.memory.disable(key_hash, reason))
        assert key_to_proto(self.run(redis.disable(key_hash, reason))) == expected

    @precondition(lambda self: self.memory is not None)
    @rule(
        i=st.integers(0, 7),
        is_trial=st.booleans(),
        dead=st.sampled_from([None, *DisableReason]),
        ids=st.sampled_from([None, *ID_LISTS]),
    )
    def check(
        self, i: int, is_trial: bool, dead: DisableReason | None, ids: tuple[str, ...] | None
    ) -> None:
        # A check result moves the key to another class (trial or paid) with its
        # state, gives it the models it lists (None: the list could not be read), or
        # finds it dead.
        assert self.memory is not None and self.redis is not None
        redis, key_hash = self.redis, self.hash(i)
        if dead is None:
            expected = self.memory.apply_check(key_hash, model_ids=ids, is_trial=is_trial)
            got = self.run(redis.apply_check(key_hash, model_ids=ids, is_trial=is_trial))
        else:
            expected = self.memory.apply_dead_check(key_hash, dead)
            got = self.run(redis.apply_dead_check(key_hash, dead))
        assert key_to_proto(got) == key_to_proto(expected)

    @precondition(lambda self: self.memory is not None)
    @rule(
        i=st.integers(0, 7),
        ids=st.sampled_from(ID_LISTS),
        models=st.lists(st.sampled_from(GET_MODELS), min_size=1, max_size=4),
    )
    def listing_round(self, i: int, ids: tuple[str, ...], models: list[str]) -> None:
        """A key's model ids listed, then Gets and lockouts for models: the shape
        random steps seldom line up (a listing, then a model it lacks while the
        key would be chosen first)."""
        assert self.memory is not None and self.redis is not None
        key_hash = self.hash(i)
        expected = self.memory.apply_check(key_hash, model_ids=ids, is_trial=False)
        got = self.run(self.redis.apply_check(key_hash, model_ids=ids, is_trial=False))
        assert key_to_proto(got) == key_to_proto(expected)
        for model in models:
            self.lockout(model)
            self.get_both(model)

    @precondition(lambda self: self.memory is not None)
    @rule(until_checked=st.booleans())
    def recheck(self, until_checked: bool) -> None:
        assert self.memory is not None and self.redis is not None
        self.memory.recheck(until_checked=until_checked)
        self.run(self.redis.recheck(until_checked=until_checked))

    @precondition(lambda self: self.memory is not None)
    @rule(seconds=st.sampled_from([0.0, 0.01, 0.5, 1.0, 2.0, 9.99, 10.0, 30.0, 61.0]))
    def wait(self, seconds: float) -> None:
        self.clock.advance(seconds)

    @invariant()
    def same_keys(self) -> None:
        if self.memory is None or self.redis is None:
            return
        assert self.run(self.redis.available()) == self.memory.available()
        listed = self.run(self.redis.keys())
        assert [key_to_proto(k) for k in listed] == [key_to_proto(k) for k in self.memory.keys()]


def test_redis_and_memory_backends_answer_alike(redis_server: RedisServer) -> None:
    Differential.url = redis_server.url
    run_state_machine_as_test(
        Differential,
        settings=settings(max_examples=60, stateful_step_count=40, deadline=None),
    )
