"""The provider-wide back-off after overloads (Anthropic's 529)."""

from __future__ import annotations

import pytest

from keysvc.providers.backoff import BASE, MAX, ProviderBackoff


def test_overloads_in_a_row_double_the_wait_up_to_the_cap() -> None:
    backoff = ProviderBackoff()
    waits = [backoff.overloaded("anthropic", 100.0) for _ in range(10)]
    assert waits[:4] == [BASE, 2 * BASE, 4 * BASE, 8 * BASE]
    assert waits[-1] == MAX and all(w <= MAX for w in waits)
    assert backoff.wait("anthropic", 100.0) == MAX
    assert backoff.wait("openai", 100.0) == 0.0  # per provider


def test_a_success_ends_the_back_off() -> None:
    backoff = ProviderBackoff()
    backoff.overloaded("anthropic", 0.0)
    backoff.overloaded("anthropic", 0.5)
    backoff.succeeded("anthropic")
    assert backoff.wait("anthropic", 0.5) == 0.0
    assert backoff.overloaded("anthropic", 1.0) == BASE


def test_the_providers_own_retry_after_is_honoured_within_the_cap() -> None:
    backoff = ProviderBackoff()
    assert backoff.overloaded("anthropic", 0.0, asked=15.0) == 15.0
    assert backoff.overloaded("anthropic", 0.0, asked=0.1) == 15.0  # never shortened
    assert ProviderBackoff().overloaded("x", 0.0, asked=1e9) == MAX


def test_the_wait_runs_out() -> None:
    backoff = ProviderBackoff()
    backoff.overloaded("anthropic", 10.0)
    assert backoff.wait("anthropic", 10.5) == pytest.approx(0.5)
    assert backoff.wait("anthropic", 12.0) == 0.0
