"""Anthropic's tables, row by row: model families, rate-limit headers, the error
table of ReportOutcome and the checker, the tier of a key, its hash and service."""

from __future__ import annotations

import hashlib
from datetime import UTC, datetime

import pytest

from keysvc.keys import DisableReason, Key, KeyProfile, hash_key, service_of
from keysvc.models import ModelTable
from keysvc.providers import ANTHROPIC, OPENAI, identity_of_secret, provider
from keysvc.providers.anthropic import checker, headers, models, outcomes
from keysvc.providers.base import Dimension, OutcomeAction, UpstreamError, Verdict

ANT = provider(ANTHROPIC)
NOW = datetime(2026, 5, 17, 12, 0, 0, tzinfo=UTC).timestamp()
RETRY = OutcomeAction.RETRY_WITH_ANOTHER_KEY
RETURN = OutcomeAction.RETURN_ERROR
DONE = OutcomeAction.DONE
QUOTA = DisableReason.QUOTA
REVOKED = DisableReason.REVOKED


def at(text: str) -> float:
    return datetime.fromisoformat(text).timestamp()


# -- keys -------------------------------------------------------------------------------


def test_an_anthropic_secret_hashes_ant_and_is_served_by_anthropic() -> None:
    secret = "sk-ant-api03-abc"
    assert hash_key(secret).startswith("ant-") and len(hash_key(secret)) == 12
    assert hash_key("sk-proj-abc").startswith("oai-")
    assert service_of(secret) == ANTHROPIC and service_of("sk-abc") == OPENAI
    assert identity_of_secret("sk-ant-x").hash_prefix == "ant"
    key = Key(secret=secret, hash=hash_key(secret), profile=KeyProfile(frozenset()), seq=1)
    assert key.service == ANTHROPIC
    assert hash_key(secret) == "ant-" + hashlib.sha256(secret.encode()).hexdigest()[:8]


# -- models ------------------------------------------------------------------------------

FAMILIES = [
    ("claude-opus-4-1-20250805", models.CLAUDE_OPUS),
    ("claude-opus-4-6", models.CLAUDE_OPUS),
    ("claude-3-opus-20240229", models.CLAUDE_OPUS),
    ("claude-sonnet-4-5", models.CLAUDE_SONNET),
    ("claude-3-5-sonnet-20241022", models.CLAUDE_SONNET),
    ("claude-3-7-sonnet-latest", models.CLAUDE_SONNET),
    ("claude-haiku-4-5", models.CLAUDE_HAIKU),
    ("claude-3-5-haiku-20241022", models.CLAUDE_HAIKU),
    ("claude-3-haiku-20240307", models.CLAUDE_HAIKU),
    ("claude-instant-1.2", models.CLAUDE_HAIKU),
    ("claude-2.1", models.CLAUDE),
    ("claude-fable-5", models.CLAUDE),
]


@pytest.mark.parametrize(("model", "family"), FAMILIES)
def test_every_claude_model_line_has_its_family(model: str, family: str) -> None:
    table = ModelTable(models.RULES)
    assert table.family(model) == family
    assert all(rule.provider == ANTHROPIC for rule in models.RULES)


# -- rate-limit headers ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("dimension", "field"),
    [
        ("requests", "requests"),
        ("tokens", "tokens"),
        ("input-tokens", "input_tokens"),
        ("output-tokens", "output_tokens"),
    ],
)
def test_each_dimension_reads_limit_remaining_and_an_rfc3339_reset(
    dimension: str, field: str
) -> None:
    parsed = ANT.parse_rate_headers(
        {
            f"anthropic-ratelimit-{dimension}-limit": "80000",
            f"anthropic-ratelimit-{dimension}-remaining": "79000",
            f"anthropic-ratelimit-{dimension}-reset": "2026-05-17T12:00:42Z",
        },
        NOW,
    )
    assert parsed.unreadable == ()
    assert parsed.rates is not None
    assert getattr(parsed.rates, field) == Dimension(80000, 79000, 42.0)
    others = {"requests", "tokens", "input_tokens", "output_tokens"} - {field}
    assert all(not getattr(parsed.rates, other).known for other in others)


@pytest.mark.parametrize(
    ("raw", "seconds"),
    [
        ("2026-05-17T12:00:30Z", 30.0),
        ("2026-05-17T12:00:30.5Z", 30.5),
        ("2026-05-17T14:00:30+02:00", 30.0),
        ("2026-05-17t12:00:30z", 30.0),
        ("2026-05-17T11:59:00Z", 0.0),  # already past: whole again now
    ],
)
def test_resets_are_times_read_as_seconds_from_now(raw: str, seconds: float) -> None:
    parsed = ANT.parse_rate_headers({"anthropic-ratelimit-requests-reset": raw}, NOW)
    assert parsed.rates is not None and parsed.rates.requests.reset == pytest.approx(seconds)


@pytest.mark.parametrize(
    ("name", "raw"),
    [
        ("anthropic-ratelimit-requests-reset", "30s"),  # a Go duration is OpenAI's, not this
        ("anthropic-ratelimit-requests-reset", "2026-05-17T12:00:30"),  # no zone
        ("anthropic-ratelimit-requests-reset", "2026-05-17"),
        ("anthropic-ratelimit-tokens-limit", "-5"),
        ("anthropic-ratelimit-tokens-remaining", "1.5"),
        ("retry-after", "soon"),
        ("retry-after", "-3"),
        ("retry-after", "nan"),
    ],
)
def test_an_unreadable_header_is_ignored_and_named(name: str, raw: str) -> None:
    parsed = ANT.parse_rate_headers({name: raw}, NOW)
    assert parsed.rates is None
    assert parsed.unreadable == ((name, raw),)


@pytest.mark.parametrize(
    ("raw", "seconds"),
    [("20", 20.0), ("0", 0.0), ("1.5", 1.5), ("Sun, 17 May 2026 12:01:00 GMT", 60.0)],
)
def test_retry_after_is_seconds_or_an_http_date(raw: str, seconds: float) -> None:
    parsed = ANT.parse_rate_headers({"retry-after": raw}, NOW)
    assert parsed.rates is not None and parsed.rates.retry_after == pytest.approx(seconds)


def test_openai_headers_mean_nothing_to_anthropic_and_the_reverse() -> None:
    assert ANT.parse_rate_headers({"x-ratelimit-reset-requests": "6m0s"}, NOW).rates is None
    oai = provider(OPENAI).parse_rate_headers(
        {"anthropic-ratelimit-requests-reset": "2026-05-17T12:00:30Z"}, NOW
    )
    assert oai.rates is None


# -- the error table ---------------------------------------------------------------------

RLE = "rate_limit_error"
IRE = "invalid_request_error"
SPEND = "You have reached your specified API usage limits. You will regain access on 2026-06-01 at 00:00 UTC."  # noqa: E501
BLOCKED = "Usage blocked until 2026-05-20T08:00:00+00:00 due to your spend limit."
SPEND_NO_DATE = "You have reached your spend limit."
CREDIT = "Your credit balance is too low to access the Anthropic API."
NEXT_MONTH = at("2026-06-01T00:00:00+00:00")
BLOCKED_UNTIL = at("2026-05-20T08:00:00+00:00")

# status, (type, message), action, disable, quota_until, rate_limited, overloaded, denied, usage
ROWS = [
    (200, ("", ""), DONE, None, None, False, False, False, True),
    (401, ("authentication_error", "bad key"), RETRY, REVOKED, None, False, False, False, False),
    (403, ("permission_error", "no opus"), RETRY, None, None, False, False, True, False),
    (429, (RLE, "over your rate limit of 50 rpm"), RETRY, None, None, True, False, False, False),
    (429, (IRE, SPEND), RETRY, QUOTA, NEXT_MONTH, False, False, False, False),
    (429, (RLE, BLOCKED), RETRY, QUOTA, BLOCKED_UNTIL, False, False, False, False),
    (429, (IRE, SPEND_NO_DATE), RETRY, QUOTA, NEXT_MONTH, False, False, False, False),
    (400, (IRE, BLOCKED), RETRY, QUOTA, BLOCKED_UNTIL, False, False, False, False),
    (400, (IRE, SPEND), RETRY, QUOTA, NEXT_MONTH, False, False, False, False),
    (400, (IRE, CREDIT), RETRY, QUOTA, None, False, False, False, False),
    (402, ("billing_error", "payment failed"), RETRY, QUOTA, None, False, False, False, False),
    (529, ("overloaded_error", "Overloaded"), RETRY, None, None, False, True, False, False),
    (529, ("", ""), RETRY, None, None, False, True, False, False),
    (500, ("api_error", "internal"), RETRY, None, None, False, False, False, False),
    (400, (IRE, "max_tokens: Field required"), RETURN, None, None, False, False, False, False),
    (404, ("not_found_error", "model: claude-9"), RETURN, None, None, False, False, False, False),
    (413, ("request_too_large", "too big"), RETURN, None, None, False, False, False, False),
]  # fmt: skip


@pytest.mark.parametrize(
    ("message", "kind"),
    [
        ("This request would exceed the rate limit for your organization of 50,000 input"
         " tokens per minute.", "input_tokens"),
        ("... of 8,000 Output Tokens per minute. For details, refer to the docs", "output_tokens"),
        ("... of 50 requests per minute.", "requests"),
        ("over your rate limit of 50 rpm", ""),
        ("Number of request tokens has exceeded your per-minute rate limit", ""),
    ],
)  # fmt: skip
def test_a_429_names_the_limit_its_message_names(message: str, kind: str) -> None:
    decision = ANT.decide(429, UpstreamError(RLE, "", message), now=NOW)
    assert decision.rate_limited and decision.limit_kind == kind


@pytest.mark.parametrize(
    ("status", "error", "action", "disable", "until", "limited", "overloaded", "denied", "usage"),
    ROWS,
)
def test_every_row_of_the_error_table(
    status: int,
    error: tuple[str, str],
    action: OutcomeAction,
    disable: DisableReason | None,
    until: float | None,
    limited: bool,
    overloaded: bool,
    denied: bool,
    usage: bool,
) -> None:
    decision = ANT.decide(status, UpstreamError(error[0], "", error[1]), now=NOW)
    assert decision.action is action
    assert decision.disable is disable
    assert decision.quota_until == until
    assert decision.rate_limited is limited
    assert decision.overloaded is overloaded
    assert decision.family_denied is denied
    assert decision.count_usage is usage
    assert decision.why


def test_a_spend_limit_named_in_the_past_lasts_until_next_month() -> None:
    stale = "Usage blocked until 2026-05-01T00:00:00Z."
    assert outcomes.quota_until(stale, NOW) == NEXT_MONTH


def test_next_month_turns_the_year() -> None:
    december = at("2026-12-31T23:59:59+00:00")
    assert outcomes.next_month(december) == at("2027-01-01T00:00:00+00:00")


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        (
            {"type": "error", "error": {"type": "overloaded_error", "message": "Overloaded"}},
            UpstreamError("overloaded_error", "", "Overloaded"),
        ),
        ({"error": {"type": "api_error"}}, UpstreamError("api_error", "", "")),
        ({"error": {"message": "no type"}}, None),
        ({"error": "text"}, None),
        ("<html>", None),
        (None, None),
    ],
)
def test_the_error_body_shape(body: object, expected: UpstreamError | None) -> None:
    assert ANT.upstream_error(body) == expected


# -- the checker's table ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("status", "body", "verdict", "reason"),
    [
        (401, {"error": {"type": "authentication_error", "message": "x"}}, Verdict.DEAD, REVOKED),
        (400, {"error": {"type": IRE, "message": CREDIT}}, Verdict.DEAD, QUOTA),
        (429, {"error": {"type": IRE, "message": SPEND}}, Verdict.DEAD, QUOTA),
        (402, {"error": {"type": "billing_error", "message": "x"}}, Verdict.DEAD, QUOTA),
        (429, {"error": {"type": RLE, "message": "x"}}, Verdict.BUSY, None),
        (403, {"error": {"type": "permission_error", "message": "x"}}, Verdict.ALIVE, None),
        (404, {"error": {"type": "not_found_error", "message": "x"}}, Verdict.ALIVE, None),
        (529, {"error": {"type": "overloaded_error", "message": "x"}}, Verdict.RETRY, None),
        (500, {"error": {"type": "api_error", "message": "x"}}, Verdict.RETRY, None),
        (401, "<html>", Verdict.RETRY, None),
    ],
)
def test_every_row_of_the_checkers_table(
    status: int, body: object, verdict: Verdict, reason: DisableReason | None
) -> None:
    outcome = checker.classify(status, body)
    assert outcome.verdict is verdict and outcome.reason is reason


@pytest.mark.parametrize(
    ("limit", "tier", "trial"),
    [
        ("5", "tier-1", True),
        ("100", "tier-1", False),
        ("2000", "tier-2", False),
        ("4000", "tier-3", False),
        ("8000", "tier-4", False),
        ("20000", "custom", False),
        ("lots", "", False),
        (None, "", False),
    ],
)
def test_the_tier_from_count_tokens_request_limit(
    limit: str | None, tier: str, trial: bool
) -> None:
    given = {} if limit is None else {"anthropic-ratelimit-requests-limit": limit}
    assert checker.tier_of(given) == (tier, trial)


def test_the_probe_asks_about_the_cheapest_listed_model() -> None:
    listed = ["claude-opus-4-1", "claude-sonnet-4-5", "claude-3-5-haiku-20241022"]
    assert checker.probe_model(listed) == "claude-3-5-haiku-20241022"
    assert checker.probe_model(["claude-opus-4-1", "claude-sonnet-4-5"]) == "claude-sonnet-4-5"
    assert checker.probe_model(["claude-2.1", "gpt-4o"]) == "claude-2.1"
    assert checker.probe_model(["gpt-4o"]) is None
    # One probe per family, the first listed model of each, cheapest family first.
    listed = ["claude-opus-4-1", "claude-3-opus-2024", "claude-2.1", "claude-haiku-4-5"]
    assert checker.probe_models(listed) == {
        "claude-haiku": "claude-haiku-4-5",
        "claude-opus": "claude-opus-4-1",
        "claude": "claude-2.1",
    }


def test_header_names_are_the_documented_ones() -> None:
    assert headers.PREFIX == "anthropic-ratelimit-"
    assert set(headers.DIMENSIONS) == {"requests", "tokens", "input-tokens", "output-tokens"}
