"""The seed's key provider (seed/openai-key-provider.ts), re-implemented for the benchmarks.

Same methods as ``keysvc.pool.KeyPool`` as far as the servicer and the
benchmarks use them, so the seed's policy can be served through keysvc's own
servicer and measured in the same harness. Behaviour follows the seed line by
line, defects included:

- ``get`` filters the whole pool and sorts it on every call; a key counts as
  rate limited for 30 s after ``rateLimitedAt`` whatever its reset headers say;
  the chosen key gets ``rateLimitedAt = now`` and ``rateLimitRequestsReset = 1 s``.
- ``lockout_period`` uses ``rateLimitedAt + max(resets)`` (not Get's 30 s rule) and
  does not exclude trial keys for embeddings models (Get does).
- Reset headers are read with the seed's regex ``(\\d+(\\.\\d+)?)(s|ms)``, first match
  anywhere, so ``"6m0s"`` reads as 0 and ``"1m30s"`` as 30 s; clamped to 10 s.
- State is per key, not per model.
- A model no row of the table matches is served from ``gpt4`` (keysvc refuses it).

The sort uses a key function equivalent to the seed's comparator (rate-limited
keys last, ordered by ``rateLimitedAt``; else trial first, no-gpt4-32k first,
least recently used); Python's sort is stable like V8's, so the order is the same.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Final

from keysvc.clock import Clock
from keysvc.errors import FamilyDisallowed, InvalidArgument, KeyNotFound, NoKeysForFamily
from keysvc.events import NullObserver, PoolObserver
from keysvc.keys import DisableReason, Key, KeyProfile, hash_key
from keysvc.models import GPT4_32K, ModelTable

__all__ = ["SeedPool", "seed_reset_seconds"]

KEY_REUSE_DELAY: Final = 1.0
RATE_LIMIT_THRESHOLD: Final = 30.0
MAX_RESET: Final = 10.0
_SEED_RESET = re.compile(r"(\d+(\.\d+)?)(s|ms)")


def seed_reset_seconds(value: str) -> float:
    """The seed's ``getResetDurationMillis``, in seconds."""
    match = _SEED_RESET.search(value)
    if match is None:
        return 0.0
    number = float(match.group(1))
    seconds = number if match.group(3) == "s" else number / 1000
    return min(seconds, MAX_RESET)


@dataclass(slots=True)
class _SeedState:
    """The seed's per-key rate-limit fields (``rateLimitedAt`` and the two resets)."""

    rate_limited_at: float = 0.0
    requests_reset: float = 0.0
    tokens_reset: float = 0.0


#: The family the seed gives a model its table does not know.
SEED_DEFAULT_FAMILY: Final = "gpt4"


class SeedPool:
    """The seed's provider over keysvc ``Key`` records (so the servicer can show them).

    The seed's rate-limit fields live beside the records, in ``_SeedState``: a
    keysvc ``Key`` derives its own from per-family state the seed never had.
    """

    def __init__(
        self,
        *,
        models: ModelTable,
        clock: Clock,
        allowed_families: frozenset[str] | None = None,
    ) -> None:
        # The same rows, with the seed's default for a model none of them matches.
        self._models = ModelTable(models.rules, unknown=SEED_DEFAULT_FAMILY)
        self._clock = clock
        self._allowed = allowed_families
        self._keys: list[Key] = []
        self._by_hash: dict[str, Key] = {}
        self._seed: dict[str, _SeedState] = {}
        self._observer: PoolObserver = NullObserver()

    @classmethod
    def from_secrets(cls, secrets: Iterable[str], *, models: ModelTable, clock: Clock) -> SeedPool:
        pool = cls(models=models, clock=clock)
        profile = KeyProfile(models.default_key_families())
        for secret in dict.fromkeys(s.strip() for s in secrets if s.strip()):
            key = Key(secret=secret, hash=hash_key(secret), profile=profile, seq=len(pool._keys))
            pool._seed[key.hash] = _SeedState()
            pool._keys.append(key)
            pool._by_hash[key.hash] = key
        return pool

    # -- what the servicer calls ----------------------------------------------

    def get(self, model: str, *, caller: str = "") -> Key:  # the seed holds nothing for callers
        if not model:
            raise InvalidArgument("model", "is required")
        info = self._models.lookup(model)
        family = info.family
        exclude_trials = info.embeddings
        available = [
            k
            for k in self._keys
            if not k.is_disabled
            and family in k.profile.families
            and (not exclude_trials or not k.profile.is_trial)
        ]
        if not available:
            raise NoKeysForFamily(family, model)
        if self._allowed is not None and family not in self._allowed:
            raise FamilyDisallowed(family, model)
        now = self._clock.now()
        seed = self._seed

        def priority(k: Key) -> tuple[int, float, int, int, float]:
            rate_limited_at = seed[k.hash].rate_limited_at
            if now - rate_limited_at < RATE_LIMIT_THRESHOLD:
                return (1, rate_limited_at, 0, 0, 0.0)
            profile = k.profile
            return (
                0,
                0.0,
                0 if profile.is_trial else 1,
                1 if GPT4_32K in profile.families else 0,
                k.last_used,
            )

        available.sort(key=priority)
        selected = available[0]
        selected.last_used = now
        state = seed[selected.hash]
        state.rate_limited_at = now
        state.requests_reset = KEY_REUSE_DELAY
        return selected

    def lockout_period(self, model: str, *, caller: str = "") -> float:
        family = self._models.family(model or "gpt-4")
        active = [k for k in self._keys if not k.is_disabled and family in k.profile.families]
        if not active:
            return 0.0
        now = self._clock.now()
        ends = [self._seed[k.hash].rate_limited_at + self._reset(k) for k in active]
        if any(now >= end for end in ends):
            return 0.0
        return min(ends) - now

    def mark_rate_limited(self, key_hash: str, model: str = "") -> None:
        self._seed[self.key(key_hash).hash].rate_limited_at = self._clock.now()

    def update_rate_limits(
        self, key_hash: str, headers: Mapping[str, str], model: str = ""
    ) -> None:
        state = self._seed[self.key(key_hash).hash]
        requests_reset = headers.get("x-ratelimit-reset-requests")
        tokens_reset = headers.get("x-ratelimit-reset-tokens")
        if requests_reset:
            state.requests_reset = seed_reset_seconds(requests_reset)
        if tokens_reset:
            state.tokens_reset = seed_reset_seconds(tokens_reset)

    def increment_usage(self, key_hash: str, model: str, tokens: int) -> None:
        key = self.key(key_hash)
        family = self._models.family(model)
        usage = dict(key.token_usage)  # read-only: Key keeps it in its pool's book
        usage[family] = usage.get(family, 0) + tokens
        key.token_usage = usage
        key.prompt_count += 1

    def disable(self, key_hash: str, reason: DisableReason) -> Key:
        key = self.key(key_hash)
        key.is_disabled = True
        key.disable_reason = reason
        return key

    def recheck(self, *, until_checked: bool = False) -> None:
        for key in self._keys:
            key.is_disabled = key.is_revoked = key.is_over_quota = False
            key.last_checked = 0.0

    async def flush(self) -> None:
        return None

    def key(self, key_hash: str) -> Key:
        if not key_hash:
            raise InvalidArgument("hash", "is required")
        key = self._by_hash.get(key_hash)
        if key is None:
            raise KeyNotFound(key_hash)
        return key

    def keys(self) -> list[Key]:
        return list(self._keys)

    def available(self) -> int:
        return sum(1 for k in self._keys if not k.is_disabled)

    def families(self) -> tuple[str, ...]:
        return self._models.families

    def now(self) -> float:
        return self._clock.now()

    @property
    def observer(self) -> PoolObserver:
        return self._observer

    def __len__(self) -> int:
        return len(self._keys)

    # -- helpers ---------------------------------------------------------------

    def _reset(self, key: Key) -> float:
        state = self._seed[key.hash]
        return max(state.requests_reset, state.tokens_reset)
