"""What one OpenAI answer means for the key and for the request.

Pure functions, no I/O: the pool applies ``decide`` for ReportOutcome, and the
key checker's ``classify`` shares ``dead_key_reason`` with it, so the rules
that say a key is dead are written once.

The proxy table (``decide``), one row per kind of answer:

==========================================================  ==========================  ======
upstream answer                                              pool action                 action
==========================================================  ==========================  ======
every answer                                                 rate-limit headers stored   —
2xx                                                          usage += prompt+completion  DONE
401                                                          disable (revoked)           RETRY
429 ``insufficient_quota``, ``billing_not_active``           disable (quota)             RETRY
400 ``billing_hard_limit_reached``                           disable (quota)             RETRY
429 ``access_terminated``                                    disable (revoked)           RETRY
429 whose message says "on requests per day"                 rate limited (family)       RETURN
429 other (``requests``, ``tokens``, anything else)          rate limited (family)       RETRY
5xx                                                          none                        RETRY
any other status (400, 403, 404 ``model_not_found``, …)      none                        RETURN
==========================================================  ==========================  ======

RETRY means "retry with another key": the request itself was fine, the key
(or the upstream at that moment) was not. A dead key is retried rather than
returned (the seed proxy returned the error with "please try again"): the
request never reached a model, so trying it on a live key is what the user
wanted. A 5xx says nothing about the key, so it is not touched; another key
(another upstream connection) often succeeds, but the proxy should bound its
attempts (docs/allocation.md). A per-day limit will not lift within the
request's lifetime, so it is returned to the client; the key is still marked
rate limited for that family.
"""

from __future__ import annotations

import re
from typing import Final

from ...keys import DisableReason
from ..base import Decision, OutcomeAction, UpstreamError

__all__ = [
    "Decision",
    "OutcomeAction",
    "UpstreamError",
    "dead_key_reason",
    "decide",
    "upstream_error",
]

#: Error types/codes that mean the key's account has no usable quota.
QUOTA_ERRORS: Final = ("insufficient_quota", "billing_not_active")
#: The 400 code OpenAI sends when the account's hard billing limit is reached.
HARD_LIMIT_ERROR: Final = "billing_hard_limit_reached"
#: The error type/code of an account banned for policy violations.
TERMINATED_ERROR: Final = "access_terminated"
#: A 429 with this in its message is a per-day limit: retrying now cannot help.
PER_DAY_PATTERN: Final = re.compile(r"on requests per day", re.IGNORECASE)


def upstream_error(body: object) -> UpstreamError | None:
    """The error of an OpenAI-shaped body ``{"error": {"type", "code", "message"}}``, else None."""
    if not isinstance(body, dict):
        return None
    error = body.get("error")
    if not isinstance(error, dict):
        return None
    fields = [error.get(name) for name in ("type", "code", "message")]
    if not any(isinstance(f, str) for f in fields[:2]):
        return None
    type_, code, message = (f if isinstance(f, str) else "" for f in fields)
    return UpstreamError(type_, code, message)


def dead_key_reason(status: int, error: UpstreamError) -> DisableReason | None:
    """Why an answer proves the key dead, or None when it does not.

    The rows the key checker and the proxy table share: 401 → revoked;
    429 ``insufficient_quota``/``billing_not_active`` → quota; 429
    ``access_terminated`` → revoked; 400 ``billing_hard_limit_reached`` → quota.
    """
    if status == 401:
        return DisableReason.REVOKED
    if status == 429:
        if error.names(*QUOTA_ERRORS):
            return DisableReason.QUOTA
        if error.names(TERMINATED_ERROR):
            return DisableReason.REVOKED
    if status == 400 and error.names(HARD_LIMIT_ERROR):
        return DisableReason.QUOTA
    return None


def decide(status: int, error: UpstreamError) -> Decision:
    """The proxy table (module docstring) for one answer with HTTP ``status``.

    ``error`` is what the proxy read from the body; all empty when the body
    was not an OpenAI error.
    """
    if 200 <= status < 300:
        return Decision(OutcomeAction.DONE, count_usage=True, why="success")
    label = f"HTTP {status} {error.code or error.type}".rstrip()
    reason = dead_key_reason(status, error)
    if reason is not None:
        return Decision(
            OutcomeAction.RETRY_WITH_ANOTHER_KEY, disable=reason, why=f"{label}: key disabled"
        )
    if status == 429:
        if PER_DAY_PATTERN.search(error.message):
            return Decision(
                OutcomeAction.RETURN_ERROR,
                rate_limited=True,
                why=f"{label}: per-day limit",
                limit_kind=error.type,
            )
        return Decision(
            OutcomeAction.RETRY_WITH_ANOTHER_KEY,
            rate_limited=True,
            why=f"{label}: rate limited",
            limit_kind=error.type,
        )
    if status >= 500:
        return Decision(OutcomeAction.RETRY_WITH_ANOTHER_KEY, why=f"{label}: upstream error")
    return Decision(OutcomeAction.RETURN_ERROR, why=f"{label}: the request's own error")
