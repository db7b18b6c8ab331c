"""The Redis backend against the memory backend on a mixed pool: Anthropic keys too.

The machine of ``test_redis_differential`` (the same operations on both backends,
one manual clock, every hand-out, lockout, error, decision and Key message
compared), with the mixed pool and the answers of the memory pool's model test
(``tests/unit/test_pool_model.py``): Claude profiles beside OpenAI ones, Claude
models, anthropic-ratelimit-{requests,tokens,input-tokens,output-tokens}-* with
RFC 3339 resets and retry-after, 429s naming input or output tokens or nothing,
529 overloads (the provider's back-off), spend-limit 400s and 429s that bench a key
until the time they name (and time passing it), 401s and 403s (the key leaves the
family), and answers whose input and output token counts the Claude families learn
their request sizes from. ``anthropic_budget_round`` plays the input/output budgets'
refills, the shape random inputs seldom line up.
"""

from __future__ import annotations

from typing import Any

from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import precondition, rule, run_state_machine_as_test

from keysvc.keys import DisableReason
from keysvc.outcomes import UpstreamError
from keysvc.service import key_to_proto
from tests.integration.test_redis_differential import CALLERS, Differential
from tests.redis_server import RedisServer
from tests.unit.test_pool_model import (
    ERRORS,
    HEADERS,
    MODEL_OR_NONE,
    MODELS,
    PROFILES,
    SPLIT_DIMS,
    headers_at,
    rfc3339,
    spend_limit_error,
)

CLAUDE_MODELS = ["claude-sonnet-4-5", "claude-3-5-haiku-20241022", "claude-opus-4-1"]
#: One token budget as an answer gives it: limit, remaining, seconds to its reset.
SPLIT_BUDGET = st.tuples(
    st.sampled_from([3000, 60_000]),
    st.sampled_from([0, 0, 1000, 2500, 59_000]),
    st.sampled_from([0.0, 1.0, 6.0, 30.0, 60.0]),
)


def anthropic_budget(
    now: float, inputs: tuple[int, int, float], outputs: tuple[int, int, float]
) -> dict[str, str]:
    """anthropic-ratelimit-* of an answer at ``now``: plenty of requests, and the
    input and output token budgets given (output counted in fifths of input)."""
    out = {
        "anthropic-ratelimit-requests-limit": "50",
        "anthropic-ratelimit-requests-remaining": "49",
        "anthropic-ratelimit-requests-reset": rfc3339(now + 1.0),
    }
    for name, (limit, remaining, seconds), scale in (
        ("input-tokens", inputs, 1),
        ("output-tokens", outputs, 5),
    ):
        out[f"anthropic-ratelimit-{name}-limit"] = str(limit // scale)
        out[f"anthropic-ratelimit-{name}-remaining"] = str(min(remaining, limit) // scale)
        out[f"anthropic-ratelimit-{name}-reset"] = rfc3339(now + seconds)
    return out


def rate_limit_error(kind: str) -> UpstreamError:
    """An Anthropic 429's error; its message names the limit (input or output tokens)."""
    if kind in SPLIT_DIMS:
        named = kind.replace("_", " ")
        return UpstreamError("rate_limit_error", "", f"rate limit of 1,000 {named} per minute")
    return UpstreamError("rate_limit_error", "", "Number of requests has exceeded your limit")


class MixedDifferential(Differential):
    @precondition(lambda self: self.memory is None)
    @rule(profiles=st.lists(st.sampled_from(PROFILES), min_size=1, max_size=6))
    def load(self, profiles: list[Any]) -> None:
        super().load(profiles)

    @precondition(lambda self: self.memory is not None)
    @rule(model=st.sampled_from(MODELS), caller=CALLERS)
    def get(self, model: str, caller: str) -> None:
        self.get_both(model, caller)

    @precondition(lambda self: self.memory is not None)
    @rule(model=st.sampled_from(["", *MODELS]), caller=CALLERS)
    def lockout(self, model: str, caller: str = "") -> None:
        super().lockout(model, caller)

    @precondition(lambda self: self.memory is not None)
    @rule(i=st.integers(0, 7), model=MODEL_OR_NONE)
    def mark(self, i: int, model: str) -> None:
        self.mark_both(self.hash(i), model)

    @precondition(lambda self: self.memory is not None)
    @rule(i=st.integers(0, 7), model=MODEL_OR_NONE, spec=HEADERS)
    def update(self, i: int, model: str, spec: Any) -> None:
        self.update_both(self.hash(i), headers_at(self.clock.now(), spec), model)

    @precondition(lambda self: self.memory is not None)
    @rule(
        i=st.integers(0, 7),
        model=MODEL_OR_NONE,
        status=st.sampled_from([200, 200, 429, 429, 500, 400, 529, 529, 401, 403]),
        spec=HEADERS,
        kind=ERRORS,
        tokens=st.sampled_from([0, 300, 1000]),
        prompt=st.sampled_from([0, 0, 2000]),
    )
    def report(  # type: ignore[override]  # noqa: PLR0913
        self,
        i: int,
        model: str,
        status: int,
        spec: Any,
        kind: str | tuple[str, float | None],
        tokens: int,
        prompt: int,
    ) -> None:
        now = self.clock.now()
        key_hash = self.hash(i)
        anthropic = key_hash.startswith("ant-")
        if isinstance(kind, tuple):
            error = spend_limit_error(now, kind[1]) if anthropic else UpstreamError("other")
        elif anthropic and status == 429:
            error = rate_limit_error(kind)
        elif anthropic and status == 529:
            error = UpstreamError("overloaded_error", "", "Overloaded")
        else:
            error = UpstreamError(kind, kind)
        self.report_tokens(key_hash, model, status, headers_at(now, spec), error, prompt, tokens)

    def report_tokens(  # noqa: PLR0913
        self,
        key_hash: str,
        model: str,
        status: int,
        headers: dict[str, str],
        error: UpstreamError,
        prompt: int = 0,
        completion: int = 0,
    ) -> None:
        """One ReportOutcome on both backends: the same decision and Key message."""
        assert self.memory is not None and self.redis is not None
        memory, redis = self.memory, self.redis
        kwargs: dict[str, Any] = {
            "status": status,
            "headers": headers,
            "error": error,
            "prompt_tokens": prompt,
            "completion_tokens": completion,
        }

        def in_memory() -> tuple[Any, Any]:
            decision, key = memory.report_outcome(key_hash, model, **kwargs)
            return decision, key_to_proto(key)

        async def in_redis() -> tuple[Any, Any]:
            decision, key = await redis.report_outcome(key_hash, model, **kwargs)
            return decision, key_to_proto(key)

        self.both(in_memory, in_redis)

    @precondition(lambda self: self.memory is not None)
    @rule(
        i=st.integers(0, 7),
        model=st.sampled_from(CLAUDE_MODELS),
        named=st.booleans(),
        first=st.tuples(SPLIT_BUDGET, SPLIT_BUDGET),
        sizes=st.tuples(st.sampled_from([0, 500, 2000]), st.sampled_from([0, 100, 400])),
        limited=st.lists(
            st.tuples(st.sampled_from([*SPLIT_DIMS, "", "mark"]), st.booleans()), max_size=3
        ),
        gap=st.sampled_from([0.0, 0.01, 0.5, 2.0, 61.0]),
        then=st.tuples(SPLIT_BUDGET, SPLIT_BUDGET),
    )
    def anthropic_budget_round(  # noqa: PLR0913
        self,
        i: int,
        model: str,
        named: bool,
        first: tuple[tuple[int, int, float], tuple[int, int, float]],
        sizes: tuple[int, int],
        limited: list[tuple[str, bool]],
        gap: float,
        then: tuple[tuple[int, int, float], tuple[int, int, float]],
    ) -> None:
        """One refill of a Claude key's input and output budgets: an answer with both
        (and the request's input and output tokens, which size the next reservations),
        429s naming input or output tokens, or nothing, or MarkRateLimited (a second in
        one refill marks a fixed window), time, the next refill's answer, a lockout."""
        key_hash = self.get_both(model) or self.hash(i)
        report_model = model if named else ""
        ok = UpstreamError()
        self.report_tokens(
            key_hash, report_model, 200, anthropic_budget(self.clock.now(), *first), ok, *sizes
        )
        for kind, with_headers in limited:
            inputs, outputs = first
            if kind == "input_tokens":
                inputs = (inputs[0], 0, inputs[2])
            elif kind == "output_tokens":
                outputs = (outputs[0], 0, outputs[2])
            headers = anthropic_budget(self.clock.now(), inputs, outputs) if with_headers else {}
            if kind == "mark":
                self.mark_both(key_hash, report_model)
            else:
                self.report_tokens(key_hash, report_model, 429, headers, rate_limit_error(kind))
        self.clock.advance(gap)
        self.report_tokens(
            key_hash, report_model, 200, anthropic_budget(self.clock.now(), *then), ok, *sizes
        )
        self.lockout(model)
        self.get_both(model)

    @precondition(lambda self: self.memory is not None)
    @rule(i=st.integers(0, 7), model=st.sampled_from(MODELS), tokens=st.sampled_from([0, 5, 800]))
    def usage(self, i: int, model: str, tokens: int) -> None:
        super().usage(i, model, tokens)

    @precondition(lambda self: self.memory is not None)
    @rule(i=st.integers(0, 7), reason=st.sampled_from(list(DisableReason)))
    def disable(self, i: int, reason: DisableReason) -> None:
        super().disable(i, reason)

    @precondition(lambda self: self.memory is not None)
    @rule(seconds=st.sampled_from([0.0, 0.01, 0.5, 1.0, 2.0, 9.99, 10.0, 30.0, 46.0, 61.0]))
    def wait(self, seconds: float) -> None:
        self.clock.advance(seconds)


def test_redis_and_memory_backends_answer_alike_on_a_mixed_pool(
    redis_server: RedisServer,
) -> None:
    MixedDifferential.url = redis_server.url
    run_state_machine_as_test(
        MixedDifferential,
        settings=settings(max_examples=80, stateful_step_count=40, deadline=None),
    )
