"""OpenAI's rate-limit headers: ``x-ratelimit-{limit,remaining,reset}-{requests,tokens}``.

Resets are Go durations (``"20ms"``, ``"6m0s"``, ``"1h2m3s"``): the time until
the quota is whole again, not until the next request is allowed.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Final

from ...durations import parse_go_duration
from ..base import Dimension, ParsedHeaders, RateHeaders, parse_count

__all__ = [
    "LIMIT_REQUESTS_HEADER",
    "LIMIT_TOKENS_HEADER",
    "PREFIX",
    "REMAINING_REQUESTS_HEADER",
    "REMAINING_TOKENS_HEADER",
    "REQUESTS_RESET_HEADER",
    "TOKENS_RESET_HEADER",
    "parse_rate_headers",
]

PREFIX: Final = "x-ratelimit-"
REQUESTS_RESET_HEADER: Final = "x-ratelimit-reset-requests"
TOKENS_RESET_HEADER: Final = "x-ratelimit-reset-tokens"
REMAINING_REQUESTS_HEADER: Final = "x-ratelimit-remaining-requests"
REMAINING_TOKENS_HEADER: Final = "x-ratelimit-remaining-tokens"
LIMIT_REQUESTS_HEADER: Final = "x-ratelimit-limit-requests"
LIMIT_TOKENS_HEADER: Final = "x-ratelimit-limit-tokens"


def parse_rate_headers(headers: Mapping[str, str]) -> ParsedHeaders:
    """The requests and tokens dimensions of an answer's headers (names lower-case).

    OpenAI sends no ``retry-after`` worth reading: its 429s carry the reset headers.
    """
    unreadable: list[tuple[str, str]] = []

    def count(name: str) -> int | None:
        raw = headers.get(name)
        if raw is None:
            return None
        value = parse_count(raw)
        if value is None:
            unreadable.append((name, raw))
        return value

    def reset(name: str) -> float | None:
        raw = headers.get(name)
        if raw is None:
            return None
        seconds = parse_go_duration(raw)
        if seconds is None:
            unreadable.append((name, raw))
        return seconds

    rates = RateHeaders(
        requests=Dimension(
            count(LIMIT_REQUESTS_HEADER),
            count(REMAINING_REQUESTS_HEADER),
            reset(REQUESTS_RESET_HEADER),
        ),
        tokens=Dimension(
            count(LIMIT_TOKENS_HEADER), count(REMAINING_TOKENS_HEADER), reset(TOKENS_RESET_HEADER)
        ),
    )
    return ParsedHeaders(None if rates.empty else rates, tuple(unreadable))
