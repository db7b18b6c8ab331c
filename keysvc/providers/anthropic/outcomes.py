"""What one Anthropic answer means for the key and for the request.

Pure functions, no I/O. Anthropic's error body is
``{"type": "error", "error": {"type": "rate_limit_error", "message": "..."}}``:
a type and a message, no code. The table (``decide``), first matching row wins:

==========================================================  ===============================  ======
answer                                                       pool action                      action
==========================================================  ===============================  ======
every answer                                                 rate-limit headers stored        —
2xx                                                          usage += input+output            DONE
401 (``authentication_error``)                               disable (revoked)                RETRY
403 (``permission_error``)                                   out of the model's family only   RETRY
400/429 whose message says a spend (usage) limit is reached  over quota until the named time  RETRY
  ("regain access on …", "usage blocked until …"), else
  until the start of the next month (UTC)
400 "credit balance is too low", 402 ``billing_error``       disable (quota)                  RETRY
429 (``rate_limit_error``)                                   rate limited (family); the       RETRY
  limit its message names ("… 50,000 input tokens per        limit it names is spent
  minute"), if any
529 (``overloaded_error``)                                   none: the provider backs off     RETRY
other 5xx (``api_error``)                                    none                             RETRY
any other status (400, 404, 413, …)                          none                             RETURN
==========================================================  ===============================  ======

A 529 says the provider is overloaded for everyone, not that the key is: the
key is neither locked nor disabled, and the proxy should try again after a
provider-wide back-off. A spend limit is the organisation's own monthly cap: the
key comes back on its own when the month (or the time Anthropic names) comes.
"""

from __future__ import annotations

import re
from datetime import UTC, datetime
from typing import Final

from ...keys import DisableReason
from ..base import Decision, OutcomeAction, UpstreamError
from .headers import parse_time

__all__ = [
    "CREDIT_PATTERN",
    "OVERLOADED_STATUS",
    "SPEND_LIMIT_PATTERN",
    "dead_key_reason",
    "decide",
    "next_month",
    "quota_until",
    "upstream_error",
]

OVERLOADED_STATUS: Final = 529
#: The error message of an organisation whose spend (usage) limit is reached.
SPEND_LIMIT_PATTERN: Final = re.compile(
    r"(spend|usage) limit|usage limits|regain access|usage blocked", re.IGNORECASE
)
#: The error message of an organisation without prepaid credit.
CREDIT_PATTERN: Final = re.compile(r"credit balance is too low", re.IGNORECASE)
#: "... regain access on 2025-01-01 at 00:00 UTC" (the console's wording).
_ON_DATE: Final = re.compile(r"\bon (\d{4}-\d{2}-\d{2}) at (\d{2}:\d{2}) UTC\b")
#: "... until 2025-01-01T00:00:00Z" (an RFC 3339 time anywhere after "until").
_UNTIL_TIME: Final = re.compile(
    r"\buntil (\d{4}-\d{2}-\d{2}[Tt]\d{2}:\d{2}(?::\d{2}(?:\.\d+)?)?(?:[Zz]|[+-]\d{2}:\d{2}))"
)


#: The limit a 429's message names: "... rate limit of 50,000 input tokens per minute".
_LIMIT_NAMED: Final = re.compile(r"\b(input tokens|output tokens|requests) per minute\b", re.I)
#: Its name in the message → the pool's limit kind (the budget the 429 spends).
_LIMIT_KINDS: Final = {
    "input tokens": "input_tokens",
    "output tokens": "output_tokens",
    "requests": "requests",
}


def upstream_error(body: object) -> UpstreamError | None:
    """The error of an Anthropic error body ``{"error": {"type", "message"}}``, else None."""
    if not isinstance(body, dict):
        return None
    error = body.get("error")
    if not isinstance(error, dict) or not isinstance(error.get("type"), str):
        return None
    message = error.get("message")
    return UpstreamError(error["type"], "", message if isinstance(message, str) else "")


def next_month(now: float) -> float:
    """The start of the month after the one ``now`` is in, UTC."""
    moment = datetime.fromtimestamp(now, UTC)
    year, month = (moment.year + 1, 1) if moment.month == 12 else (moment.year, moment.month + 1)
    return datetime(year, month, 1, tzinfo=UTC).timestamp()


def quota_until(message: str, now: float) -> float:
    """When a spend limit lifts: the time the message names, else the next month.

    A named time in the past (a clock skew, a stale message) counts as the next month.
    """
    named: float | None = None
    match = _ON_DATE.search(message)
    if match is not None:
        named = parse_time(f"{match.group(1)}T{match.group(2)}:00Z")
    else:
        match = _UNTIL_TIME.search(message)
        if match is not None:
            named = parse_time(match.group(1))
    return named if named is not None and named > now else next_month(now)


def dead_key_reason(status: int, error: UpstreamError) -> DisableReason | None:
    """Why an answer proves the key out of service, or None.

    The rows the key checker and the proxy table share: 401 → revoked; a spend
    limit, a too low credit balance, 402 → quota.
    """
    if status == 401:
        return DisableReason.REVOKED
    if status == 402 or (status in (400, 429) and _is_quota(error)):
        return DisableReason.QUOTA
    return None


def _is_quota(error: UpstreamError) -> bool:
    return bool(SPEND_LIMIT_PATTERN.search(error.message) or CREDIT_PATTERN.search(error.message))


def decide(status: int, error: UpstreamError, *, now: float) -> Decision:
    """The table (module docstring) for one answer with HTTP ``status`` at time ``now``."""
    if 200 <= status < 300:
        return Decision(OutcomeAction.DONE, count_usage=True, why="success")
    label = f"HTTP {status} {error.type}".rstrip()
    retry = OutcomeAction.RETRY_WITH_ANOTHER_KEY
    reason = dead_key_reason(status, error)
    if reason is DisableReason.QUOTA and SPEND_LIMIT_PATTERN.search(error.message):
        until = quota_until(error.message, now)
        return Decision(
            retry,
            disable=reason,
            quota_until=until,
            why=f"{label}: spend limit reached until "
            + datetime.fromtimestamp(until, UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        )
    if reason is not None:
        return Decision(retry, disable=reason, why=f"{label}: key disabled")
    if status == 403:
        return Decision(retry, family_denied=True, why=f"{label}: no access to the model family")
    if status == 429:
        named = _LIMIT_NAMED.search(error.message)
        kind = _LIMIT_KINDS[named.group(1).lower()] if named else ""
        return Decision(retry, rate_limited=True, why=f"{label}: rate limited", limit_kind=kind)
    if status == OVERLOADED_STATUS:
        return Decision(retry, overloaded=True, why=f"{label}: provider overloaded")
    if status >= 500:
        return Decision(retry, why=f"{label}: upstream error")
    return Decision(OutcomeAction.RETURN_ERROR, why=f"{label}: the request's own error")
