"""Prometheus metrics from a pool scenario, read back from the exposition format."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from prometheus_client import generate_latest

from keysvc.clock import ManualClock
from keysvc.keys import DisableReason, Key
from keysvc.metrics import Metrics
from keysvc.models import ModelTable
from keysvc.pool import KeyPool
from keysvc.store import MemoryKeyStore
from tests.exposition import Samples, parse, value

SECRETS = [f"sk-metrics-test-{n:02d}-aaaaaaaaaaaa" for n in range(4)]


def scrape(metrics: Metrics) -> tuple[str, Samples]:
    text = generate_latest(metrics.registry).decode()
    return text, parse(text)


def scenario() -> tuple[KeyPool, Metrics, ManualClock]:
    metrics = Metrics()
    clock = ManualClock()
    pool = KeyPool.from_secrets(SECRETS, models=ModelTable(), clock=clock, observer=metrics)
    metrics.watch_pool(pool)
    return pool, metrics, clock


def test_counters_and_gauges_after_a_scenario() -> None:
    pool, metrics, clock = scenario()
    a = pool.get("gpt-4o")
    b = pool.get("gpt-4o")
    pool.get("gpt-3.5-turbo")
    pool.increment_usage(a.hash, "gpt-4o", 1500)
    pool.increment_usage(b.hash, "gpt-4o-2024-08-06", 500)
    pool.increment_usage(b.hash, "gpt-3.5-turbo", 7)
    keys = pool.keys()
    pool.disable(keys[3].hash, DisableReason.REVOKED)
    pool.mark_rate_limited(a.hash)
    metrics.check_result("ok")
    metrics.check_result("ok")
    metrics.check_result("revoked")

    text, samples = scrape(metrics)
    assert value(samples, "keysvc_key_handouts_total", family="gpt4o") == 2
    assert value(samples, "keysvc_key_handouts_total", family="turbo") == 1
    assert value(samples, "keysvc_tokens_used_total", family="gpt4o") == 2000
    assert value(samples, "keysvc_tokens_used_total", family="turbo") == 7
    assert value(samples, "keysvc_checker_results_total", outcome="ok") == 2
    assert value(samples, "keysvc_checker_results_total", outcome="revoked") == 1
    assert value(samples, "keysvc_key_state_changes_total", change="revoked") == 1
    assert value(samples, "keysvc_key_state_changes_total", change="rate_limited") == 1
    assert value(samples, "keysvc_key_state_changes_total", change="disabled") == 0

    # Two keys were handed out within the reuse delay: locked (the turbo hand-out
    # went to a again: its gpt-4o throttle does not hold it back from turbo). One revoked.
    for family in ("gpt4o", "turbo", "gpt4"):
        assert value(samples, "keysvc_keys", family=family, state="locked") == 2
        assert value(samples, "keysvc_keys", family=family, state="active") == 1
        assert value(samples, "keysvc_keys", family=family, state="disabled") == 1
        assert value(samples, "keysvc_keys", family=family, state="revoked") == 1
        assert value(samples, "keysvc_keys", family=family, state="over_quota") == 0
        assert value(samples, "keysvc_keys", family=family, state="trial") == 0
    # gpt4-32k: no key has it (only the checker grants it), still exported as zeros.
    assert value(samples, "keysvc_keys", family="gpt4-32k", state="active") == 0
    assert value(samples, "keysvc_lockout_seconds", family="gpt4o") == 0  # c is free for it
    assert value(samples, "keysvc_lockout_seconds", family="gpt4-32k") == 0
    pool.get("gpt-4o")  # c: now every live key is locked for gpt4o
    _, samples = scrape(metrics)
    assert value(samples, "keysvc_lockout_seconds", family="gpt4o") == pytest.approx(1.0)
    assert value(samples, "keysvc_lockout_seconds", family="turbo") == 0  # b and c are free

    # Gauges are computed on scrape: time passes, locks end.
    clock.advance(1.5)
    _, later = scrape(metrics)
    assert value(later, "keysvc_keys", family="gpt4o", state="active") == 2  # b, c
    assert value(later, "keysvc_keys", family="gpt4o", state="locked") == 1  # a: 429, 10 s
    assert value(later, "keysvc_lockout_seconds", family="gpt4o") == 0

    for secret in SECRETS:
        assert secret not in text


def test_recheck_shows_in_the_gauges() -> None:
    pool, metrics, _ = scenario()
    for key in pool.keys():
        pool.disable(key.hash, DisableReason.QUOTA)
    _, samples = scrape(metrics)
    assert value(samples, "keysvc_keys", family="gpt4", state="over_quota") == 4
    pool.recheck()
    _, samples = scrape(metrics)
    assert value(samples, "keysvc_keys", family="gpt4", state="over_quota") == 0
    assert value(samples, "keysvc_keys", family="gpt4", state="active") == 4


class WalkCountingStore(MemoryKeyStore):
    def __init__(self) -> None:
        super().__init__()
        self.walks = 0

    def __iter__(self) -> Iterator[Key]:
        self.walks += 1
        return super().__iter__()


def test_handout_does_not_walk_the_pool() -> None:
    """The hot path only bumps a counter; only a scrape walks the keys."""
    metrics = Metrics()
    store = WalkCountingStore()
    pool = KeyPool(store=store, models=ModelTable(), clock=ManualClock(), observer=metrics)
    for secret in SECRETS:
        pool.add_key(secret)
    metrics.watch_pool(pool)
    pool.get("gpt-4")  # the first request for a family indexes it: one walk, once
    store.walks = 0
    for _ in range(10):
        key = pool.get("gpt-4")
        pool.increment_usage(key.hash, "gpt-4", 1)
        pool.mark_rate_limited(key.hash)
    assert store.walks == 0
    scrape(metrics)
    assert store.walks == 1


def test_keys_by_provider_and_overloads_by_provider() -> None:
    metrics = Metrics()
    secrets = ["sk-metrics-oai-1", "sk-metrics-oai-2", "sk-ant-metrics-1", "sk-ant-metrics-2"]
    pool = KeyPool.from_secrets(secrets, models=ModelTable(), clock=ManualClock(), observer=metrics)
    metrics.watch_pool(pool)
    pool.disable(pool.keys()[3].hash, DisableReason.QUOTA)
    metrics.provider_overloaded("anthropic")
    metrics.provider_overloaded("anthropic")

    _, samples = scrape(metrics)
    assert value(samples, "keysvc_provider_keys", provider="openai", state="active") == 2
    assert value(samples, "keysvc_provider_keys", provider="openai", state="disabled") == 0
    assert value(samples, "keysvc_provider_keys", provider="anthropic", state="active") == 1
    assert value(samples, "keysvc_provider_keys", provider="anthropic", state="disabled") == 1
    assert value(samples, "keysvc_provider_keys", provider="anthropic", state="over_quota") == 1
    assert value(samples, "keysvc_provider_overloaded_total", provider="anthropic") == 2
