"""The back-off from a provider that says it is overloaded (Anthropic's 529).

An overload is the provider's, not the key's: no key is locked or disabled for
it, and every proxy is told to wait before its next try with that provider.
Each overload reported while the provider is still backed off doubles the
wait (``BASE``, 2 × ``BASE``, ... up to ``MAX``), and a success from the
provider ends it, so a short blip costs one second and a long outage is not
hammered. The wait is at least what the provider asked for (``retry-after``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final

__all__ = ["BASE", "MAX", "ProviderBackoff"]

#: The first overload's wait, in seconds.
BASE: Final = 1.0
#: The longest wait.
MAX: Final = 60.0


@dataclass(slots=True)
class _State:
    overloads: int = 0
    until: float = 0.0


class ProviderBackoff:
    """Per provider: how many overloads in a row, and until when to back off."""

    __slots__ = ("_states",)

    def __init__(self) -> None:
        self._states: dict[str, _State] = {}

    def overloaded(self, provider: str, now: float, asked: float | None = None) -> float:
        """Counts an overload of ``provider`` at ``now``; the seconds to wait from now.

        ``asked``: the wait the provider itself named (retry-after), if any.
        """
        state = self._states.setdefault(provider, _State())
        state.overloads += 1
        wait = min(MAX, BASE * 2.0 ** min(state.overloads - 1, 32))
        if asked is not None and asked > wait:
            wait = min(asked, MAX)
        state.until = max(state.until, now + wait)
        return state.until - now

    def succeeded(self, provider: str) -> None:
        """An answer from ``provider`` that was not an overload: the back-off ends."""
        self._states.pop(provider, None)

    def wait(self, provider: str, now: float) -> float:
        """Seconds left of the provider's back-off at ``now`` (0 when none)."""
        state = self._states.get(provider)
        return 0.0 if state is None else max(0.0, state.until - now)
