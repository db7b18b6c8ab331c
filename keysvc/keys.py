"""One upstream API key and what the pool knows about it."""

from __future__ import annotations

import enum
import hashlib
import re
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass, field

__all__ = [
    "DisableReason",
    "Key",
    "KeyProfile",
    "RateState",
    "hash_key",
    "lists_model",
    "parse_key_list",
]

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


def lists_model(model_ids: frozenset[str], model: str) -> bool:
    """Whether ``model`` is in ``model_ids``, counting a dated snapshot of a listed model."""
    if model in model_ids:
        return True
    base = _SNAPSHOT_SUFFIX.sub("", model)
    return base != model and base in model_ids


@dataclass(slots=True, eq=False)
class RateState:
    """What the pool knows of a key's rate limits in one model family, or key-wide.

    Mutated only by the pool. ``until`` is derived by the pool from the other
    fields (``KeyPool`` docstring); times are epoch seconds, 0 meaning never.
    """

    key: Key = field(repr=False)
    #: The model family; "" for the key-wide state.
    family: str
    #: When the key was last handed out for this family (0 for the key-wide state).
    last_used: float = 0.0
    #: Start of the current rate-limit window: the hand-out, or the latest 429.
    rate_limited_at: float = 0.0
    #: The key is locked (not preferred) for the family until then.
    until: float = 0.0
    #: Since the hand-out: the last x-ratelimit-reset-* (seconds, clamped) ...
    requests_reset: float | None = None
    tokens_reset: float | None = None
    #: ... and x-ratelimit-remaining-* values; None when not reported.
    remaining_requests: int | None = None
    remaining_tokens: int | None = None
    #: A 429 was reported since the hand-out ...
    saw_rate_limit: bool = False
    #: ... and its type ("requests", "tokens"; "" when not told).
    rate_limit_kind: str = ""
    #: The family's budget, kept across hand-outs once an answer brought
    #: x-ratelimit-limit-* with its remaining and reset (``KeyPool`` docstring):
    #: what remained when the answer was reported (``budget_at``; the reported
    #: int, the same object as ``remaining_*``, or 0.0 after a typed 429) ...
    budget_at: float = 0.0
    budget_requests: float | None = None
    budget_tokens: float | None = None
    #: ... and how fast each refills, per second: (limit - remaining) / reset.
    requests_rate: float | None = None
    tokens_rate: float | None = None
    #: Hand-outs not answered yet, oldest first: (when, tokens reserved). None when empty.
    reserved: deque[tuple[float, float]] | None = field(default=None, repr=False)
    #: The pool's live index entry for (key, family); None when not indexed.
    entry: object = field(default=None, repr=False)

    @property
    def used(self) -> bool:
        """Whether anything happened in this family (a hand-out, a report)."""
        return bool(
            self.last_used
            or self.rate_limited_at
            or self.requests_reset is not None
            or self.tokens_reset is not None
            or self.remaining_requests is not None
            or self.remaining_tokens is not None
            or self.budget_at
        )


def _longest(values: Iterable[float | None]) -> float | None:
    known = [v for v in values if v is not None]
    return max(known) if known else None


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
    #: When the key was last handed out, for any family (kept in the state file).
    last_used: float = 0.0
    last_checked: float = 0.0
    prompt_count: int = 0
    token_usage: dict[str, int] = field(default_factory=dict)
    #: Disabled before a Recheck: stays out until its new check says it is alive.
    revive_if_alive: bool = False
    #: Hash of the key this organization clone was made from; empty for loaded keys.
    cloned_from: str = ""
    #: Rate-limit state from reports that named no model, since the key was last
    #: handed out; it applies to every family. None when there is none.
    wide: RateState | None = field(default=None, repr=False)
    #: Rate-limit state per family: one ``RateState`` (the common case), a tuple
    #: of them (a tuple is a third of a dict's size and a key has a handful), or
    #: None. Only families the pool has indexed or been told about have one; a
    #: missing family means "never used".
    states: RateState | tuple[RateState, ...] | None = field(default=None, repr=False)
    #: The key is in the pool's selection indexes (it is not disabled).
    indexed: bool = field(default=False, repr=False)

    def state_in(self, family: str) -> RateState | None:
        """The key's rate-limit state in ``family``, if it has one."""
        states = self.states
        if type(states) is RateState:
            return states if states.family == family else None
        if states is None:
            return None
        assert isinstance(states, tuple)
        for state in states:
            if state.family == family:
                return state
        return None

    def add_state(self, state: RateState) -> RateState:
        """Records ``state`` (for a family the key has no state in yet) and returns it."""
        states = self.states
        if states is None:
            self.states = state
        elif type(states) is RateState:
            self.states = (states, state)
        else:
            assert isinstance(states, tuple)
            self.states = (*states, state)
        return state

    def family_states(self) -> list[RateState]:
        """Every per-family state of the key."""
        states = self.states
        if states is None:
            return []
        if type(states) is RateState:
            return [states]
        assert isinstance(states, tuple)
        return list(states)

    def until_in(self, family: str) -> float:
        """When the key's lock for ``family`` ends: its own, or a key-wide one if later."""
        state = self.state_in(family)
        until = state.until if state is not None else 0.0
        if self.wide is not None and self.wide.until > until:
            return self.wide.until
        return until

    # Key-wide summaries over the key-wide state and every family (the Key message).

    @property
    def rate_limited_until(self) -> float:
        """When the key is free in every family: the latest lock end; 0 if never locked."""
        until = self.wide.until if self.wide is not None else 0.0
        states = self.states
        if type(states) is RateState:
            return states.until if states.until > until else until
        if states is not None:
            assert isinstance(states, tuple)
            for state in states:
                if state.until > until:
                    until = state.until
        return until

    @property
    def rate_limited_at(self) -> float:
        """The latest hand-out or 429 in any family; 0 if never."""
        return max(
            [s.rate_limited_at for s in self.family_states()]
            + [self.wide.rate_limited_at if self.wide is not None else 0.0]
        )

    @property
    def requests_reset(self) -> float | None:
        """The longest x-ratelimit-reset-requests known (key-wide or any family)."""
        return _longest(s.requests_reset for s in self._all_states())

    @property
    def tokens_reset(self) -> float | None:
        """The longest x-ratelimit-reset-tokens known (key-wide or any family)."""
        return _longest(s.tokens_reset for s in self._all_states())

    def _all_states(self) -> list[RateState]:
        states = self.family_states()
        if self.wide is not None:
            states.append(self.wide)
        return states

    @property
    def model_families(self) -> frozenset[str]:
        return self.profile.families

    @property
    def is_trial(self) -> bool:
        return self.profile.is_trial

    @property
    def model_ids(self) -> frozenset[str] | None:
        return self.profile.model_ids
