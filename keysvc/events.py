"""What the pool tells an observer about its work, without knowing who listens.

The pool calls a ``PoolObserver`` on the hot path (one cheap call per event,
never a walk over the pool); ``keysvc.metrics.Metrics`` is the Prometheus
implementation. ``NullObserver`` is used when metrics are off.

The key checker reports each check's outcome through ``check_result``.
"""

from __future__ import annotations

import enum
from typing import Protocol

__all__ = ["KeyChange", "NullObserver", "PoolObserver"]


class KeyChange(enum.Enum):
    """A change in a key's state that is worth a log line and a counter."""

    DISABLED = "disabled"
    REVOKED = "revoked"
    OVER_QUOTA = "over_quota"
    RATE_LIMITED = "rate_limited"
    CLONED = "cloned"


class PoolObserver(Protocol):
    """Receives the pool's events. Every method runs on the event loop and must not block."""

    def handed_out(self, family: str) -> None:
        """Get handed out a key for a model of ``family``."""
        ...

    def tokens_used(self, family: str, tokens: int) -> None:
        """IncrementUsage reported ``tokens`` for ``family``."""
        ...

    def state_changed(self, key_hash: str, change: KeyChange, reason: str) -> None:
        """A key changed state; called once per change, with the reason."""
        ...

    def check_result(self, outcome: str) -> None:
        """The key checker finished checking one key with ``outcome`` (e.g. "ok", "revoked")."""
        ...

    def outcome_reported(self, action: str) -> None:
        """ReportOutcome applied an upstream answer and told the proxy ``action``."""
        ...

    def provider_overloaded(self, provider: str) -> None:
        """An answer said ``provider`` itself is overloaded (not the key)."""
        ...


class NullObserver:
    """Observes nothing."""

    def handed_out(self, family: str) -> None:
        pass

    def tokens_used(self, family: str, tokens: int) -> None:
        pass

    def state_changed(self, key_hash: str, change: KeyChange, reason: str) -> None:
        pass

    def check_result(self, outcome: str) -> None:
        pass

    def outcome_reported(self, action: str) -> None:
        pass

    def provider_overloaded(self, provider: str) -> None:
        pass
