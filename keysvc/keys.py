"""One upstream API key and what the pool knows about it."""

from __future__ import annotations

import enum
import hashlib
from dataclasses import dataclass, field

__all__ = ["DisableReason", "Key", "KeyProfile", "hash_key", "parse_key_list"]

SERVICE_OPENAI = "openai"


class DisableReason(enum.Enum):
    """Why a key was taken out of service."""

    UNSPECIFIED = "unspecified"
    REVOKED = "revoked"
    QUOTA = "quota"
    MANUAL = "manual"


@dataclass(frozen=True, slots=True)
class KeyProfile:
    """What decides which requests a key may serve. Keys with equal profiles share one.

    The pool indexes keys by profile, so selection costs grow with the number of
    distinct profiles (a handful in practice), not with the number of keys.
    """

    families: frozenset[str]
    is_trial: bool = False

    def serves(self, family: str, *, embeddings: bool) -> bool:
        return family in self.families and not (embeddings and self.is_trial)


def hash_key(secret: str, organization_id: str = "") -> str:
    """The public identifier of a key: ``"oai-"`` + 8 hex digits of sha256.

    An organization clone hashes ``secret + organization_id``, as the seed does.
    """
    return "oai-" + hashlib.sha256((secret + organization_id).encode()).hexdigest()[:8]


def parse_key_list(text: str) -> list[str]:
    """Splits a comma-separated key list: trimmed, no empties, no duplicates, order kept."""
    return list(dict.fromkeys(k.strip() for k in text.split(",") if k.strip()))


@dataclass(slots=True, eq=False)
class Key:
    """One key in the pool. Mutated only by the pool, on the event loop.

    Times are wall-clock seconds since the epoch; 0 means "never".
    """

    secret: str = field(repr=False)
    hash: str
    profile: KeyProfile
    #: Load order; breaks ties so selection is deterministic.
    seq: int
    service: str = SERVICE_OPENAI
    organization_id: str = ""
    is_disabled: bool = False
    is_revoked: bool = False
    is_over_quota: bool = False
    disable_reason: DisableReason | None = None
    disabled_at: float = 0.0
    last_used: float = 0.0
    last_checked: float = 0.0
    prompt_count: int = 0
    rate_limited_at: float = 0.0
    #: Derived by the pool from the fields above and below; see ``KeyPool``.
    rate_limited_until: float = 0.0
    #: Last x-ratelimit-reset-* values (seconds, clamped) since the key was last handed out.
    requests_reset: float | None = None
    tokens_reset: float | None = None
    #: A 429 was reported since the key was last handed out.
    saw_rate_limit: bool = False
    token_usage: dict[str, int] = field(default_factory=dict)
    #: The pool's live index entry for this key; None while the key is not indexed.
    index_entry: object = field(default=None, repr=False)

    @property
    def model_families(self) -> frozenset[str]:
        return self.profile.families

    @property
    def is_trial(self) -> bool:
        return self.profile.is_trial
