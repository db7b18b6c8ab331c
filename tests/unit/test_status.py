"""The summary rules shared by the metrics, the status page and ``keysvc status``."""

from __future__ import annotations

from keysvc.clock import ManualClock
from keysvc.keys import DisableReason, Key, KeyProfile, hash_key
from keysvc.models import DEFAULT_RULES, ModelTable
from keysvc.pool import KeyPool
from keysvc.status import (
    PROBE_MODELS,
    KeyList,
    KeyState,
    key_state,
    render_text,
    summarize,
    summarize_pool,
)
from keysvc.web import render_status_page


def state(
    name: str,
    families: set[str],
    *,
    trial: bool = False,
    disabled: bool = False,
    revoked: bool = False,
    over_quota: bool = False,
    locked: bool = False,
    usage: dict[str, int] | None = None,
) -> KeyState:
    return KeyState(
        hash=name,
        families=frozenset(families),
        is_trial=trial,
        is_disabled=disabled or revoked or over_quota,
        is_revoked=revoked,
        is_over_quota=over_quota,
        locked=locked,
        token_usage=usage or {},
    )


def test_every_key_is_in_one_of_active_locked_disabled() -> None:
    keys = [
        state("oai-00000001", {"turbo", "gpt4"}),
        state("oai-00000002", {"turbo"}, locked=True, trial=True),
        state("oai-00000003", {"turbo", "gpt4"}, revoked=True, usage={"gpt4": 5}),
        state("oai-00000004", {"gpt4"}, over_quota=True, trial=True),
        state("oai-00000005", {"turbo"}, disabled=True, usage={"turbo": 7, "dall-e": 2}),
    ]
    summaries = {s.family: s for s in summarize(keys, lambda f: 1.5 if f == "gpt4" else 0.0)}
    assert list(summaries) == ["dall-e", "gpt4", "turbo"]
    turbo, gpt4 = summaries["turbo"], summaries["gpt4"]
    assert turbo.counts == {
        "active": 1, "locked": 1, "trial": 1, "disabled": 2, "revoked": 1, "over_quota": 0,
    }  # fmt: skip
    assert gpt4.counts == {
        "active": 1, "locked": 0, "trial": 0, "disabled": 2, "revoked": 1, "over_quota": 1,
    }  # fmt: skip
    assert (turbo.total, gpt4.total) == (4, 3)
    assert (turbo.tokens, gpt4.tokens, summaries["dall-e"].tokens) == (7, 5, 2)
    assert (turbo.lockout, gpt4.lockout) == (0.0, 1.5)
    assert summaries["dall-e"].total == 0  # usage of a family no key has any more


def test_listed_families_appear_with_zero_counts() -> None:
    (summary,) = summarize([], lambda f: 0.0, families=["gpt4-32k"])
    assert summary.family == "gpt4-32k" and summary.total == 0


def test_probe_models_cover_every_built_in_family_and_map_back() -> None:
    table = ModelTable()
    assert set(PROBE_MODELS) == {rule.family for rule in DEFAULT_RULES}
    for family, model in PROBE_MODELS.items():
        info = table.lookup(model)
        assert (info.family, info.embeddings) == (family, False), model


def test_text_tables() -> None:
    keys = [
        state("oai-000000bb", {"turbo"}, revoked=True),
        state("oai-000000aa", {"turbo"}, locked=True, usage={"turbo": 42}),
    ]
    text = render_text(summarize(keys, {"turbo": 0.25}.get), keys)
    lines = text.splitlines()
    assert lines[0].split() == [
        "family", "active", "locked", "trial", "disabled", "revoked", "over_quota", "lockout",
        "tokens",
    ]  # fmt: skip
    assert lines[2].split() == ["turbo", "0", "1", "0", "1", "1", "0", "0.25s", "42"]
    assert lines[4].split() == ["key", "provider", "state", "trial", "prompts", "tokens"]
    assert lines[6].split() == ["oai-000000aa", "openai", "locked", "no", "0", "42"]
    assert lines[7].split() == ["oai-000000bb", "openai", "revoked", "no", "0", "0"]
    assert render_text([], []) == "no keys in the pool\n"


def test_pool_summary_agrees_with_the_key_state_summary() -> None:
    clock = ManualClock()
    pool = KeyPool.from_secrets(
        [f"sk-agree-{n:04d}" for n in range(40)], models=ModelTable(), clock=clock
    )
    keys = pool.keys()
    for n in range(15):
        key = pool.get("gpt-4o" if n % 2 else "gpt-3.5-turbo")
        pool.increment_usage(key.hash, "gpt-4o", n)
    pool.disable(keys[1].hash, DisableReason.REVOKED)
    pool.disable(keys[2].hash, DisableReason.QUOTA)
    pool.disable(keys[3].hash, DisableReason.MANUAL)
    clock.advance(0.5)
    pool.mark_rate_limited(keys[4].hash)
    now = clock.now()
    direct = summarize_pool(keys, now, pool.family_lockout, families=["gpt4-32k"])
    viewed = summarize(
        [key_state(k, now) for k in keys], pool.family_lockout, families=["gpt4-32k"]
    )
    assert direct == viewed
    assert next(s for s in direct if s.family == "gpt4o").tokens == sum(range(15))


def test_the_views_show_each_keys_provider() -> None:
    secret = "sk-ant-status-view"
    key = Key(secret=secret, hash=hash_key(secret), profile=KeyProfile(frozenset()), seq=1)
    ant = key_state(key, 0.0)
    oai = state("oai-000000aa", {"turbo"})
    assert ant.provider == "anthropic" and oai.provider == "openai"
    rows = render_text(summarize([ant, oai], {}.get), [ant, oai]).splitlines()
    assert [line.split()[:2] for line in rows[-2:]] == [
        [ant.hash, "anthropic"],
        ["oai-000000aa", "openai"],
    ]
    listed = KeyList("active", 2, (ant, oai))
    page = render_status_page([], [listed], now=0.0, ready=True, total_keys=2)
    assert f"<td><code>{ant.hash}</code></td><td>anthropic</td>" in page
    assert "<th>key</th><th>provider</th>" in page
    assert secret not in page
