"""The proxy table of ``keysvc.outcomes``: every row, and the rows shared with the checker."""

from __future__ import annotations

import pytest

from keysvc.checker import Verdict, classify
from keysvc.keys import DisableReason
from keysvc.outcomes import OutcomeAction, UpstreamError, dead_key_reason, decide

DONE = OutcomeAction.DONE
RETRY = OutcomeAction.RETRY_WITH_ANOTHER_KEY
RETURN = OutcomeAction.RETURN_ERROR
REVOKED = DisableReason.REVOKED
QUOTA = DisableReason.QUOTA

# status, (type, code, message), action, disable, rate_limited, count_usage
IRE = "invalid_request_error"
RLE = "rate_limit_exceeded"
ROWS = [
    (200, ("", "", ""), DONE, None, False, True),
    (201, ("", "", ""), DONE, None, False, True),
    (401, (IRE, "invalid_api_key", "Incorrect API key"), RETRY, REVOKED, False, False),
    (401, ("", "", ""), RETRY, REVOKED, False, False),
    (429, ("insufficient_quota", "insufficient_quota", "over"), RETRY, QUOTA, False, False),
    (429, ("billing_not_active", "", ""), RETRY, QUOTA, False, False),
    (429, ("", "billing_not_active", ""), RETRY, QUOTA, False, False),
    (400, (IRE, "billing_hard_limit_reached", ""), RETRY, QUOTA, False, False),
    (429, ("access_terminated", "", "banned"), RETRY, REVOKED, False, False),
    (429, ("", "access_terminated", ""), RETRY, REVOKED, False, False),
    (429, ("requests", RLE, "busy"), RETRY, None, True, False),
    (429, ("tokens", RLE, "busy"), RETRY, None, True, False),
    (429, ("", "", ""), RETRY, None, True, False),
    (429, ("requests", RLE, "Limit reached on requests per day"), RETURN, None, True, False),
    (400, (IRE, "content_policy_violation", "rejected"), RETURN, None, False, False),
    (400, (IRE, "context_length_exceeded", ""), RETURN, None, False, False),
    (404, (IRE, "model_not_found", "does not exist"), RETURN, None, False, False),
    (403, ("", "unsupported_country_region_territory", ""), RETURN, None, False, False),
    (500, ("server_error", "", ""), RETRY, None, False, False),
    (502, ("", "", ""), RETRY, None, False, False),
    (503, ("", "", "overloaded"), RETRY, None, False, False),
]  # fmt: skip


@pytest.mark.parametrize(("status", "error", "action", "disable", "limited", "usage"), ROWS)
def test_every_row_of_the_proxy_table(
    status: int,
    error: tuple[str, str, str],
    action: OutcomeAction,
    disable: DisableReason | None,
    limited: bool,
    usage: bool,
) -> None:
    decision = decide(status, UpstreamError(*error))
    assert decision.action is action
    assert decision.disable is disable
    assert decision.rate_limited is limited
    assert decision.count_usage is usage
    assert decision.why


@pytest.mark.parametrize(
    ("status", "error", "reason"),
    [
        (401, (IRE, "invalid_api_key", ""), REVOKED),
        (429, ("insufficient_quota", "", ""), QUOTA),
        (429, ("", "billing_not_active", ""), QUOTA),
        (429, ("access_terminated", "", ""), REVOKED),
        (400, ("", "billing_hard_limit_reached", ""), QUOTA),
        (429, ("tokens", "", ""), None),
        (400, (IRE, "", ""), None),
    ],
)
def test_checker_and_proxy_table_agree_on_dead_keys(
    status: int, error: tuple[str, str, str], reason: DisableReason | None
) -> None:
    assert dead_key_reason(status, UpstreamError(*error)) is reason
    body = {"error": dict(zip(("type", "code", "message"), error, strict=True))}
    outcome = classify(status, body, trial=False)
    assert outcome.reason is reason
    assert (outcome.verdict is Verdict.DEAD) == (reason is not None)
    assert decide(status, UpstreamError(*error)).disable is reason
