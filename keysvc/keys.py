"""One upstream API key and what the pool knows about it."""

from __future__ import annotations

import enum
import hashlib
import re
from dataclasses import dataclass, field

__all__ = ["DisableReason", "Key", "KeyProfile", "hash_key", "parse_key_list", "lists_model"]

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
    #: The model ids the upstream listed for the key; None until the checker has seen them.
    model_ids: frozenset[str] | None = None

    def serves(self, model: str | None, family: str, *, embeddings: bool) -> bool:
        """Whether a key of this profile may serve ``model`` (of ``family``).

        Once the model ids are known, the model must be one of them (or a dated
        snapshot of one); before that the family decides alone. ``model`` None
        asks about the family as a whole.
        """
        if family not in self.families or (embeddings and self.is_trial):
            return False
        return self.model_ids is None or model is None or lists_model(self.model_ids, model)


# "-2024-08-06" (gpt-4o-2024-08-06) or "-0613" (gpt-4-0613) at the end of a model name.
_SNAPSHOT_SUFFIX = re.compile(r"-(?:\d{4}-\d{2}-\d{2}|\d{4})$")


def lists_model(model_ids: frozenset[str], model: str) -> bool:
    """Whether ``model`` is in ``model_ids``, counting a dated snapshot of a listed model."""
    if model in model_ids:
        return True
    base = _SNAPSHOT_SUFFIX.sub("", model)
    return base != model and base in model_ids


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
    #: Disabled before a Recheck: stays out until its new check says it is alive.
    revive_if_alive: bool = False
    #: Hash of the key this organization clone was made from; empty for loaded keys.
    cloned_from: str = ""
    #: The pool's live index entry for this key; None while the key is not indexed.
    index_entry: object = field(default=None, repr=False)

    @property
    def model_families(self) -> frozenset[str]:
        return self.profile.families

    @property
    def is_trial(self) -> bool:
        return self.profile.is_trial

    @property
    def model_ids(self) -> frozenset[str] | None:
        return self.profile.model_ids
