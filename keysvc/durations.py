"""Parsing of the Go-style durations OpenAI sends in x-ratelimit-reset-* headers."""

from __future__ import annotations

import re

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


def parse_go_duration(text: str) -> float | None:
    """Parses a Go ``time.Duration`` string into seconds.

    Accepts the full grammar Go prints and parses: a sequence of decimal
    numbers each with a unit (``"1h2m3s"``, ``"1.5m"``, ``"1s500ms"``,
    ``"21.0032s"``), and the bare ``"0"``. Negative durations are not a
    meaningful reset time and are rejected.

    Returns:
        The duration in seconds, or None when ``text`` is not a duration.
    """
    text = text.strip()
    if text == "0":
        return 0.0
    if not _WHOLE.fullmatch(text):
        return None
    return sum(float(number) * _UNIT_SECONDS[unit] for number, unit in _PART.findall(text))
