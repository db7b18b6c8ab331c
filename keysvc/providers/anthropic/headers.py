"""Anthropic's rate-limit headers, read into provider-neutral numbers.

Every answer may carry ``anthropic-ratelimit-<dimension>-<field>`` for the
dimensions ``requests``, ``tokens`` (the most restrictive token limit in force),
``input-tokens`` and ``output-tokens``, and the fields ``limit``, ``remaining``
and ``reset``. A reset is an RFC 3339 time (``2025-08-21T12:40:59Z``) at which
the dimension is whole again, not a duration as OpenAI's; it is read as the
seconds from ``now`` to then (0 when already past). A 429 carries
``retry-after``: seconds to wait (or, per HTTP, a date).
"""

from __future__ import annotations

import email.utils
import math
from collections.abc import Mapping
from datetime import datetime
from typing import Final

from ..base import Dimension, ParsedHeaders, RateHeaders, parse_count

__all__ = ["DIMENSIONS", "PREFIX", "RETRY_AFTER_HEADER", "parse_rate_headers", "parse_time"]

PREFIX: Final = "anthropic-ratelimit-"
RETRY_AFTER_HEADER: Final = "retry-after"
#: The header's dimension name → the ``RateHeaders`` field.
DIMENSIONS: Final = {
    "requests": "requests",
    "tokens": "tokens",
    "input-tokens": "input_tokens",
    "output-tokens": "output_tokens",
}
#: Longest text read as a time or number: longer is not one, whatever it holds.
_MAX_LENGTH: Final = 64


def parse_time(text: str) -> float | None:
    """An RFC 3339 date-time with a zone (``Z`` or ``±hh:mm``) as epoch seconds, else None."""
    text = text.strip()
    if len(text) > _MAX_LENGTH or len(text) < 20 or text[10] not in "Tt":
        return None
    try:
        moment = datetime.fromisoformat(text.replace("z", "Z"))
    except ValueError:
        return None
    if moment.tzinfo is None:  # RFC 3339 requires the offset: a local time is ambiguous
        return None
    return moment.timestamp()


def parse_retry_after(text: str, now: float) -> float | None:
    """``retry-after``: delay seconds (a decimal number), or an HTTP date; seconds from now."""
    text = text.strip()
    if not text or len(text) > _MAX_LENGTH:
        return None
    try:
        seconds = float(text)
    except ValueError:
        try:
            when = email.utils.parsedate_to_datetime(text)
        except (TypeError, ValueError):
            return None
        if when.tzinfo is None:
            return None
        return max(0.0, when.timestamp() - now)
    if not math.isfinite(seconds) or seconds < 0:
        return None
    return seconds


def parse_rate_headers(headers: Mapping[str, str], now: float) -> ParsedHeaders:
    """The four dimensions and retry-after of an answer's headers (names lower-case)."""
    unreadable: list[tuple[str, str]] = []
    dimensions: dict[str, Dimension] = {}
    for name, field in DIMENSIONS.items():
        limit = remaining = None
        reset: float | None = None
        raw = headers.get(f"{PREFIX}{name}-limit")
        if raw is not None:
            limit = parse_count(raw)
            if limit is None:
                unreadable.append((f"{PREFIX}{name}-limit", raw))
        raw = headers.get(f"{PREFIX}{name}-remaining")
        if raw is not None:
            remaining = parse_count(raw)
            if remaining is None:
                unreadable.append((f"{PREFIX}{name}-remaining", raw))
        raw = headers.get(f"{PREFIX}{name}-reset")
        if raw is not None:
            at = parse_time(raw)
            if at is None:
                unreadable.append((f"{PREFIX}{name}-reset", raw))
            else:
                reset = max(0.0, at - now)
        dimensions[field] = Dimension(limit, remaining, reset)
    retry_after = None
    raw = headers.get(RETRY_AFTER_HEADER)
    if raw is not None:
        retry_after = parse_retry_after(raw, now)
        if retry_after is None:
            unreadable.append((RETRY_AFTER_HEADER, raw))
    rates = RateHeaders(**dimensions, retry_after=retry_after)
    return ParsedHeaders(None if rates.empty else rates, tuple(unreadable))
