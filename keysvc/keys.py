"""One upstream API key and what the pool knows about it."""

from __future__ import annotations

import enum
import hashlib
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType

from .providers import OPENAI, identity_of_secret
from .rates import RateBook, RateState, RateSummary

__all__ = [
    "DisableReason",
    "Key",
    "KeyProfile",
    "RateState",
    "RateSummary",
    "hash_key",
    "lists_model",
    "parse_key_list",
    "service_of",
    "snapshot_base",
]

SERVICE_OPENAI = OPENAI


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
    # The pool looks keys' groups up by profile on every report: hash once, not per lookup.
    _hash: int = field(default=0, init=False, repr=False, compare=False)
    #: ``families`` in name order, for the Key message of every Get: sorted once.
    sorted_families: tuple[str, ...] = field(default=(), init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "_hash", hash((self.families, self.is_trial, self.model_ids)))
        object.__setattr__(self, "sorted_families", tuple(sorted(self.families)))

    def __hash__(self) -> int:
        return self._hash

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


def snapshot_base(model: str) -> str:
    """``model`` without a dated snapshot's suffix (gpt-4o-2024-08-06: gpt-4o); the
    name itself when it has none."""
    return _SNAPSHOT_SUFFIX.sub("", model)


def lists_model(model_ids: frozenset[str], model: str) -> bool:
    """Whether ``model`` is in ``model_ids``, counting a dated snapshot of a listed model."""
    if model in model_ids:
        return True
    base = snapshot_base(model)
    return base != model and base in model_ids


def hash_key(secret: str, organization_id: str = "") -> str:
    """The public identifier of a key: its provider's prefix (``"oai-"``, ``"ant-"``
    for ``sk-ant-`` secrets) + 8 hex digits of sha256.

    An organization clone hashes ``secret + organization_id``, as the seed does.
    """
    prefix = identity_of_secret(secret).hash_prefix
    return prefix + "-" + hashlib.sha256((secret + organization_id).encode()).hexdigest()[:8]


def service_of(secret: str) -> str:
    """The provider a secret is a key of (``Key.service``), by its prefix."""
    return identity_of_secret(secret).name


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
    #: The key's provider (``keysvc.providers``); "" (the default) infers it from the secret.
    service: str = ""
    organization_id: str = ""
    is_disabled: bool = False
    is_revoked: bool = False
    is_over_quota: bool = False
    disable_reason: DisableReason | None = None
    disabled_at: float = 0.0
    #: Over quota until this time, then back on its own (a spend limit's named
    #: time); 0: until a recheck.
    over_quota_until: float = 0.0
    #: When the key was last handed out, for any family (kept in the state file).
    last_used: float = 0.0
    last_checked: float = 0.0
    prompt_count: int = 0
    #: Disabled before a Recheck: stays out until its new check says it is alive.
    revive_if_alive: bool = False
    #: Hash of the key this organization clone was made from; empty for loaded keys.
    cloned_from: str = ""
    #: The key is in the pool's selection indexes (it is not disabled).
    indexed: bool = field(default=False, repr=False)
    #: Where the key's rate-limit state and token usage live: the pool's book,
    #: row ``seq`` (``keysvc.rates``). None until the key joins a pool.
    book: RateBook | None = field(default=None, repr=False)
    #: Token usage set before the key joined a pool (a state file's record).
    _usage: dict[str, int] | None = field(default=None, repr=False)

    @property
    def token_usage(self) -> Mapping[str, int]:
        """Tokens counted per model family, read-only (assign a mapping to change them)."""
        if self.book is not None:
            return MappingProxyType(self.book.usage(self.seq))
        return MappingProxyType(dict(self._usage) if self._usage else {})

    @token_usage.setter
    def token_usage(self, usage: Mapping[str, int]) -> None:
        if self.book is not None:
            self.book.set_usage(self.seq, usage)
        else:
            self._usage = dict(usage)

    def __post_init__(self) -> None:
        if not self.service:
            self.service = service_of(self.secret)

    def __lt__(self, other: Key) -> bool:
        """Keys order by load order (``seq``), the last tie-break of selection."""
        return self.seq < other.seq

    def join(self, book: RateBook, seq: int) -> None:
        """Makes the key row ``seq`` of ``book``, where its pool keeps its state, and
        moves its token usage there. Rate-limit state from an earlier book stays
        behind: a new pool learns it anew."""
        usage = dict(self.token_usage)  # from where it is now, before ``seq`` changes
        self.seq = seq
        book.add_row(seq)
        self.book, self._usage = book, None
        self.token_usage = usage

    def leave(self) -> None:
        """Leaves its pool's book (the key was removed; its row may go to another key),
        keeping its token usage; its rate-limit state stays behind."""
        usage = dict(self.token_usage)
        self.book, self._usage = None, usage

    def state_in(self, family: str) -> RateState | None:
        """The key's rate-limit state in ``family``, if it has one."""
        return None if self.book is None else self.book.state(self.seq, family)

    def family_states(self) -> list[RateState]:
        """Every per-family state of the key."""
        return [] if self.book is None else self.book.states(self.seq)

    @property
    def wide(self) -> RateState | None:
        """Rate-limit state from reports that named no model, since the key was last
        handed out; it applies to every family. None when there is none."""
        return None if self.book is None else self.book.state(self.seq, "")

    def until_in(self, family: str) -> float:
        """When the key's lock for ``family`` ends: its own, or a key-wide one if later."""
        if self.book is None:
            return 0.0
        return self.book.lock_end(self.book.tables.get(family), self.seq)

    # Key-wide summaries over the key-wide state and every family (the Key message).

    def rate_summary(self) -> RateSummary:
        """The key's rate-limit state as the Key message shows it, read once."""
        if self.book is None:
            return RateSummary([], 0.0, 0.0, None, None, dict(self._usage or {}))
        return self.book.summary(self.seq)

    @property
    def rate_limited_until(self) -> float:
        """When the key is free in every family: the latest lock end; 0 if never locked."""
        return 0.0 if self.book is None else self.book.latest_until(self.seq)

    @property
    def rate_limited_at(self) -> float:
        """The latest hand-out or 429 in any family; 0 if never."""
        return self.rate_summary().rate_limited_at

    @property
    def requests_reset(self) -> float | None:
        """The longest x-ratelimit-reset-requests known (key-wide or any family)."""
        return self.rate_summary().requests_reset

    @property
    def tokens_reset(self) -> float | None:
        """The longest x-ratelimit-reset-tokens known (key-wide or any family)."""
        return self.rate_summary().tokens_reset

    @property
    def model_families(self) -> frozenset[str]:
        return self.profile.families

    @property
    def is_trial(self) -> bool:
        return self.profile.is_trial

    @property
    def model_ids(self) -> frozenset[str] | None:
        return self.profile.model_ids
