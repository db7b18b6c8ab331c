"""Anthropic's input and output tokens as budgets of their own, on a manual clock.

Anthropic limits a key's input and output tokens per minute apart (the output
limit is the smaller, often a fifth of the input one). A family of a provider
that does so keeps a budget for each (``RateTable.split``): a hand-out needs room
in both, each refills from its own reset, and the ``tokens`` dimension (the more
restrictive of the two) is not a budget of its own there.
"""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from keysvc.clock import ManualClock
from keysvc.keys import Key
from keysvc.models import ModelTable
from keysvc.outcomes import UpstreamError
from keysvc.pool import KeyPool
from keysvc.rates import WINDOW_OUTPUT_TOKENS

ANT_A, ANT_B, OAI = "sk-ant-split-a", "sk-ant-split-b", "sk-split-openai"
SONNET = "claude-sonnet-4-5"
OK = UpstreamError()
START = datetime(2026, 5, 17, 12, 0, 0, tzinfo=UTC).timestamp()
Dimension = tuple[int, int, float]  # limit, remaining, seconds to the reset


def pool_of(*secrets: str) -> tuple[KeyPool, ManualClock, list[Key]]:
    clock = ManualClock(START)
    pool = KeyPool.from_secrets(secrets, models=ModelTable(), clock=clock)
    return pool, clock, pool.keys()


def answer(
    clock: ManualClock,
    *,
    requests: Dimension = (1_000, 999, 60),
    input_tokens: Dimension | None = None,
    output_tokens: Dimension | None = None,
    tokens: Dimension | None = None,
) -> dict[str, str]:
    """anthropic-ratelimit-* headers, each reset an RFC 3339 time ``seconds`` from now."""
    out: dict[str, str] = {}
    for name, values in (
        ("requests", requests),
        ("input-tokens", input_tokens),
        ("output-tokens", output_tokens),
        ("tokens", tokens),
    ):
        if values is not None:
            limit, remaining, seconds = values
            reset = datetime.fromtimestamp(clock.now() + seconds, UTC)
            out[f"anthropic-ratelimit-{name}-limit"] = str(limit)
            out[f"anthropic-ratelimit-{name}-remaining"] = str(remaining)
            out[f"anthropic-ratelimit-{name}-reset"] = reset.strftime("%Y-%m-%dT%H:%M:%SZ")
    return out


def report(
    pool: KeyPool, key: Key, headers: dict[str, str], prompt: int = 1_000, completion: int = 200
) -> None:
    """Reports a 200 for a request of ``prompt`` input and ``completion`` output tokens.

    The first one of a family also teaches the pool the size of its requests (a
    hand-out reserves it), so it is answered once with room to spare first.
    """
    if not pool._token_stats:
        roomy = answer(
            ManualClock(pool._clock.now()),
            input_tokens=(1_000_000, 999_000, 60),
            output_tokens=(1_000_000, 999_000, 60),
        )
        _report(pool, key, roomy, prompt, completion)
        pool.get(SONNET)
    _report(pool, key, headers, prompt, completion)


def _report(pool: KeyPool, key: Key, headers: dict[str, str], prompt: int, completion: int) -> None:
    pool.report_outcome(
        key.hash,
        SONNET,
        status=200,
        headers=headers,
        error=OK,
        prompt_tokens=prompt,
        completion_tokens=completion,
    )


@pytest.mark.parametrize(
    ("inputs", "outputs", "wait"),
    [
        # Output spent, input left: 200 output tokens (the request learned) back at
        # 10,000 a minute.
        ((50_000, 40_000, 60), (10_000, 0, 60), 200 / (10_000 / 60)),
        # And the reverse: 1,000 input tokens back at 50,000 a minute.
        ((50_000, 0, 60), (10_000, 9_000, 60), 1_000 / (50_000 / 60)),
    ],
    ids=["output spent", "input spent"],
)
def test_a_key_with_one_token_budget_spent_is_not_handed_out_while_the_other_has_room(
    inputs: Dimension, outputs: Dimension, wait: float
) -> None:
    pool, clock, (a, b) = pool_of(ANT_A, ANT_B)
    assert pool.get(SONNET) is a
    report(pool, a, answer(clock, input_tokens=inputs, output_tokens=outputs))
    state = a.state_in("claude-sonnet")
    assert state is not None
    assert (state.budget_input, state.budget_output) == (inputs[1], outputs[1])
    # b goes first although a has room in the other budget.
    assert pool.get(SONNET) is b
    # On its own, a waits for the spent budget to have a request's worth again.
    pool, clock, (a,) = pool_of(ANT_A)
    pool.get(SONNET)
    report(pool, a, answer(clock, input_tokens=inputs, output_tokens=outputs))
    assert pool.lockout_period(SONNET) == pytest.approx(wait, rel=1e-3)


def test_each_budget_refills_from_its_own_reset() -> None:
    pool, clock, (a,) = pool_of(ANT_A)
    pool.get(SONNET)
    # Both spent: input whole again in 6 s, output only in 60 s. One token budget
    # following the tighter of the two saw input's quick refill only.
    report(pool, a, answer(clock, input_tokens=(50_000, 0, 6), output_tokens=(10_000, 0, 60)))
    output_wait = 200 / (10_000 / 60)  # 1.2 s; input's 1,000 come back in 0.12 s
    assert pool.lockout_period(SONNET) == pytest.approx(output_wait, rel=1e-3)
    clock.advance(output_wait)
    assert pool.lockout_period(SONNET) == 0.0
    assert pool.get(SONNET) is a
    # A whole limit back at the reset: 60 s on, both are full again whatever was spent.
    clock.advance(60)
    state = a.state_in("claude-sonnet")
    assert state is not None and state.output_full_at == pytest.approx(START + 60)
    assert state.input_full_at == pytest.approx(START + 6)


def test_room_in_both_budgets_is_enough_even_below_the_tighter_limits_whole_request() -> None:
    # 5,000 input + 100 output tokens a request; 4,000 output tokens left (the tighter
    # limit, which anthropic-ratelimit-tokens-* also names). One budget reserving the
    # whole request against it held the key back; 40 more such requests fit.
    pool, clock, (a,) = pool_of(ANT_A)
    pool.get(SONNET)
    headers = answer(
        clock,
        input_tokens=(100_000, 50_000, 60),
        output_tokens=(10_000, 4_000, 60),
        tokens=(10_000, 4_000, 60),
    )
    report(pool, a, headers, prompt=5_000, completion=100)
    assert pool.lockout_period(SONNET) == 0.0
    state = a.state_in("claude-sonnet")
    assert state is not None and state.tokens_limit is None  # no budget of its own
    assert state.remaining_tokens == 4_000  # still shown, and in the window


def test_a_429_without_a_type_after_output_ran_out_is_an_output_429() -> None:
    pool, clock, (a,) = pool_of(ANT_A)
    pool.get(SONNET)
    headers = answer(clock, input_tokens=(50_000, 40_000, 60), output_tokens=(10_000, 0, 60))
    report(pool, a, headers)
    pool.mark_rate_limited(a.hash, SONNET)
    state = a.state_in("claude-sonnet")
    assert state is not None and state.saw_rate_limit
    assert state.rate_limit_kind == "output_tokens"
    # A second one in the same refill, for a request sent after the first, says
    # output is a fixed window (a bit above the eighth, so the flags need 16 bits),
    # and it is kept across hand-outs.
    table = pool._book.tables["claude-sonnet"]
    assert not table.flags[a.seq] & WINDOW_OUTPUT_TOKENS
    clock.advance(2)
    pool.get(SONNET)
    pool.mark_rate_limited(a.hash, SONNET)
    assert table.flags[a.seq] & WINDOW_OUTPUT_TOKENS
    clock.advance(2)
    pool.get(SONNET)
    assert table.flags[a.seq] & WINDOW_OUTPUT_TOKENS


def test_a_429_naming_output_tokens_spends_the_output_budget() -> None:
    pool, clock, (a,) = pool_of(ANT_A)
    pool.get(SONNET)
    headers = answer(clock, input_tokens=(50_000, 40_000, 60), output_tokens=(8_000, 7_000, 60))
    report(pool, a, headers)
    pool.get(SONNET)
    message = "This request would exceed your rate limit of 8,000 output tokens per minute."
    pool.report_outcome(
        a.hash, SONNET, status=429, headers={}, error=UpstreamError("rate_limit_error", "", message)
    )
    state = a.state_in("claude-sonnet")
    assert state is not None and state.rate_limit_kind == "output_tokens"
    # The 429 is authoritative: nothing left of the output tokens, whatever was said.
    assert state.budget_output == 0 and state.budget_input == 40_000


def test_an_openai_familys_table_has_no_split_columns() -> None:
    pool, clock, (oai, ant) = pool_of(OAI, ANT_A)
    pool.get("gpt-4o")
    pool.get(SONNET)
    gpt4o, sonnet = pool._book.tables["gpt4o"], pool._book.tables["claude-sonnet"]
    assert not gpt4o.split and len(gpt4o.budgets) == 2
    assert not hasattr(gpt4o, "budget_input")  # the slot exists, the column does not
    assert sonnet.split and len(sonnet.budgets) == 4
    assert len(sonnet.budget_input) == len(sonnet.flags)
