"""Parsing of the Go-style durations OpenAI sends in x-ratelimit-reset-* headers."""

from __future__ import annotations

import re
from typing import Final

__all__ = ["parse_go_duration"]

_UNIT_SECONDS = {
    "ns": 1e-9,
    "us": 1e-6,
    "µs": 1e-6,  # U+00B5 MICRO SIGN, as Go prints it
    "μs": 1e-6,  # U+03BC GREEK SMALL LETTER MU, also accepted by Go
    "ms": 1e-3,
    "s": 1.0,
    "m": 60.0,
    "h": 3600.0,
}
# Longest units first so "ms" is not read as "m" followed by garbage.
_PART = re.compile(r"(\d+(?:\.\d*)?|\.\d+)(ns|us|µs|μs|ms|s|m|h)")
_WHOLE = re.compile(r"(?:(?:\d+(?:\.\d*)?|\.\d+)(?:ns|us|µs|μs|ms|s|m|h))+")

#: Durations up to _CACHED_LENGTH characters, at most _CACHE_SIZE of them
#: (emptied when full). The pool keeps each key's last reset per family, and the
#: upstream sends a small set of distinct texts ("12ms", "6m0s"): with the cache,
#: equal texts give the one float object instead of one per key and family.
_CACHE_SIZE: Final = 4096
_CACHED_LENGTH: Final = 32
_cache: dict[str, float | None] = {}


def parse_go_duration(text: str) -> float | None:
    """Parses a Go ``time.Duration`` string into seconds.

    Accepts the full grammar Go prints and parses: a sequence of decimal
    numbers each with a unit (``"1h2m3s"``, ``"1.5m"``, ``"1s500ms"``,
    ``"21.0032s"``), and the bare ``"0"``. Negative durations are not a
    meaningful reset time and are rejected.

    Returns:
        The duration in seconds, or None when ``text`` is not a duration.
    """
    try:
        return _cache[text]
    except KeyError:
        pass
    seconds = _parse(text)
    if seconds is not None and len(text) <= _CACHED_LENGTH:  # durations only, no caller junk
        if len(_cache) >= _CACHE_SIZE:
            _cache.clear()
        _cache[text] = seconds
    return seconds


def _parse(text: str) -> float | None:
    text = text.strip()
    if text == "0":
        return 0.0
    if not _WHOLE.fullmatch(text):
        return None
    return sum(float(number) * _UNIT_SECONDS[unit] for number, unit in _PART.findall(text))
