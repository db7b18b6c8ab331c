"""The key pool: which key to hand out, and what each upstream answer teaches.

- ``rules``: what a header, a 429 and a budget mean, the constants and input
  checks; shared by every backend.
- ``memory``: the in-memory backend's state and indexes (``KeyPool``), the
  embedded default, and ``MemoryBackend``, the pool behind the seam.
- ``backend``: the seam (``PoolBackend``) the servicer, ext_proc, the key
  checker, the keys-file reload and the server call.
"""

from __future__ import annotations

from .backend import KeyPage, KeySync, PoolBackend
from .memory import ELIGIBLE_CACHE_SIZE, KeyPool, MemoryBackend, as_backend
from .rules import (
    ATTRIBUTION_WINDOW,
    BUDGET_LAPSE,
    DEADLINE_MARGIN,
    HASH_PATTERN,
    KEY_REUSE_DELAY,
    MAX_BUDGET_WAIT,
    MAX_RESET,
    MAX_WAIT,
    PROMISE_TTL,
    RATE_LIMIT_FALLBACK,
    REPORT_PAIR_WINDOW,
    RESERVATION_TTL,
    RESET_GRAIN,
    TOKEN_ESTIMATE_SPREAD,
    TOKEN_ESTIMATE_WEIGHT,
    Limits,
)

__all__ = [
    "ATTRIBUTION_WINDOW",
    "BUDGET_LAPSE",
    "DEADLINE_MARGIN",
    "ELIGIBLE_CACHE_SIZE",
    "HASH_PATTERN",
    "KEY_REUSE_DELAY",
    "MAX_BUDGET_WAIT",
    "MAX_RESET",
    "MAX_WAIT",
    "RATE_LIMIT_FALLBACK",
    "REPORT_PAIR_WINDOW",
    "RESET_GRAIN",
    "PROMISE_TTL",
    "RESERVATION_TTL",
    "TOKEN_ESTIMATE_SPREAD",
    "TOKEN_ESTIMATE_WEIGHT",
    "KeyPage",
    "KeyPool",
    "KeySync",
    "Limits",
    "MemoryBackend",
    "PoolBackend",
    "as_backend",
]
