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


#: What an answer without any of the headers reads as.
_NOTHING: Final = ParsedHeaders(None)


def parse_rate_headers(headers: Mapping[str, str]) -> ParsedHeaders:
    """The requests and tokens dimensions of an answer's headers (names lower-case).

    OpenAI sends no ``retry-after`` worth reading: its 429s carry the reset headers.
    On every report, so written for speed: plain calls, no per-header objects.
    """
    get = headers.get
    raw_lr, raw_rr, raw_sr = (
        get(LIMIT_REQUESTS_HEADER),
        get(REMAINING_REQUESTS_HEADER),
        get(REQUESTS_RESET_HEADER),
    )
    raw_lt, raw_rt, raw_st = (
        get(LIMIT_TOKENS_HEADER),
        get(REMAINING_TOKENS_HEADER),
        get(TOKENS_RESET_HEADER),
    )
    if (
        raw_lr is None
        and raw_rr is None
        and raw_sr is None
        and raw_lt is None
        and raw_rt is None
        and raw_st is None
    ):
        return _NOTHING
    unreadable: list[tuple[str, str]] = []
    requests = Dimension(
        _count(LIMIT_REQUESTS_HEADER, raw_lr, unreadable),
        _count(REMAINING_REQUESTS_HEADER, raw_rr, unreadable),
        _reset(REQUESTS_RESET_HEADER, raw_sr, unreadable),
    )
    tokens = Dimension(
        _count(LIMIT_TOKENS_HEADER, raw_lt, unreadable),
        _count(REMAINING_TOKENS_HEADER, raw_rt, unreadable),
        _reset(TOKENS_RESET_HEADER, raw_st, unreadable),
    )
    bad = tuple(unreadable) if unreadable else ()
    if len(bad) == 6 - (raw_lr, raw_rr, raw_sr, raw_lt, raw_rt, raw_st).count(None):
        return ParsedHeaders(None, bad)  # every header sent was unreadable
    return ParsedHeaders(RateHeaders(requests, tokens), bad)


def _count(name: str, raw: str | None, unreadable: list[tuple[str, str]]) -> int | None:
    if raw is None:
        return None
    value = parse_count(raw)
    if value is None:
        unreadable.append((name, raw))
    return value


def _reset(name: str, raw: str | None, unreadable: list[tuple[str, str]]) -> float | None:
    if raw is None:
        return None
    seconds = parse_go_duration(raw)
    if seconds is None:
        unreadable.append((name, raw))
    return seconds
