"""List pages (AIP-158): the keys in load order, a page at a time, optionally by state.

A page token names the position after which the next page starts, not an
offset: keys added later get later positions and removed keys leave a gap, so
a token stays valid while the pool changes, and no key shows up twice. Finding
where a page starts is a bisect; a page then looks at no more than
``SCAN_LIMIT`` keys, so a filter that matches few keys answers with a short
(even empty) page and a token instead of walking 100k keys on the event loop.

Positions are this module's own (not ``Key.seq``, which is the key's row in
the rate book), and a random run id in every token makes one from an earlier
server process INVALID_ARGUMENT rather than a silently wrong page.
"""

from __future__ import annotations

import base64
import binascii
import enum
import secrets
from array import array
from bisect import bisect_right
from collections.abc import Callable
from typing import Final

from .errors import InvalidArgument
from .keys import Key

__all__ = ["DEFAULT_MAX_PAGE_SIZE", "SCAN_LIMIT", "KeyFilter", "LoadOrder", "Page"]

#: The server's largest page, and the size of a page when the caller asks for none
#: (KEYSVC_LIST_MAX_PAGE_SIZE): ~110 KB of reply and a few ms on the event loop.
DEFAULT_MAX_PAGE_SIZE: Final = 500
#: Most keys one page looks at; with a filter, fewer than page_size may match.
SCAN_LIMIT: Final = 5_000
_TOKEN_VERSION: Final = "1"


class KeyFilter(enum.Enum):
    """Which keys a List returns (the proto's KeyState)."""

    ALL = "all"
    #: Not disabled (what Available counts), locked or not.
    AVAILABLE = "available"
    #: Not disabled and not locked for any family.
    ACTIVE = "active"
    #: Not disabled, locked for at least one family.
    LOCKED = "locked"
    DISABLED = "disabled"

    def predicate(self, now: float) -> Callable[[Key], bool]:
        """Whether a key belongs in the listing, judged at time ``now``."""
        if self is KeyFilter.AVAILABLE:
            return lambda key: not key.is_disabled
        if self is KeyFilter.ACTIVE:
            return lambda key: not key.is_disabled and now >= key.rate_limited_until
        if self is KeyFilter.LOCKED:
            return lambda key: not key.is_disabled and now < key.rate_limited_until
        if self is KeyFilter.DISABLED:
            return lambda key: key.is_disabled
        return lambda key: True


class Page:
    """One page: its keys, and the position to continue after (None: the last page)."""

    __slots__ = ("keys", "resume_after")

    def __init__(self, keys: list[Key], resume_after: int | None) -> None:
        self.keys = keys
        self.resume_after = resume_after


class LoadOrder:
    """The pool's keys in load order, for paging: a seek is a bisect, not a scan.

    Two flat columns, ~16 B a key: the positions (ascending, never reused) and the
    keys at them. A removed key stays until the removed outnumber the rest, then
    both columns are compacted; a page skips the removed.
    """

    def __init__(self, run_id: str | None = None) -> None:
        self._positions = array("q")
        self._keys: list[Key] = []
        #: Keys removed but still in the columns (until the next compaction).
        self._removed: set[Key] = set()
        self._next = 0
        self.run_id = run_id if run_id is not None else secrets.token_hex(4)

    def __len__(self) -> int:
        return len(self._keys) - len(self._removed)

    def add(self, key: Key) -> None:
        self._next += 1
        self._positions.append(self._next)
        self._keys.append(key)

    def remove(self, key: Key) -> None:
        """Takes out ``key``, which must be in the order."""
        self._removed.add(key)
        if len(self._removed) > len(self) + 64:
            removed = self._removed
            kept = [i for i, k in enumerate(self._keys) if k not in removed]
            self._positions = array("q", (self._positions[i] for i in kept))
            self._keys = [self._keys[i] for i in kept]
            self._removed = set()

    def page(
        self, after: int, limit: int, want: Callable[[Key], bool], scan_limit: int = SCAN_LIMIT
    ) -> Page:
        """Up to ``limit`` keys ``want`` accepts, after position ``after``, in load order.

        Looks at no more than ``max(limit, scan_limit)`` keys; the page says where
        to go on when keys remain.
        """
        scan_limit = max(limit, scan_limit)
        positions = self._positions
        keys = self._keys
        removed = self._removed
        found: list[Key] = []
        looked = 0
        index = bisect_right(positions, after)
        end = len(positions)
        while index < end:
            if len(found) == limit or looked == scan_limit:
                return Page(found, positions[index - 1])
            key = keys[index]
            index += 1
            if key in removed:
                continue
            looked += 1
            if want(key):
                found.append(key)
        return Page(found, None)

    def token(self, key_filter: KeyFilter, after: int) -> str:
        """The opaque next_page_token for a page that continues after ``after``."""
        text = f"{_TOKEN_VERSION}.{self.run_id}.{key_filter.value}.{after}"
        return base64.urlsafe_b64encode(text.encode()).decode().rstrip("=")

    def resume_position(self, token: str, key_filter: KeyFilter) -> int:
        """Where the page a request's ``page_token`` asks for starts after; 0 for none.

        Raises:
            InvalidArgument: the token is not one of this server's, is from an earlier
                run of it, or was made for another state filter.
        """
        if not token:
            return 0
        try:
            padded = token + "=" * (-len(token) % 4)
            text = base64.urlsafe_b64decode(padded.encode("ascii")).decode("ascii")
            version, run_id, filter_value, after_text = text.split(".")
            after = int(after_text)
            made_for = KeyFilter(filter_value)
        except (ValueError, UnicodeError, binascii.Error):
            raise InvalidArgument(
                "page_token", "is not a page token of this server; start with an empty one"
            ) from None
        if version != _TOKEN_VERSION or after < 0:
            raise InvalidArgument(
                "page_token", "is not a page token of this server; start with an empty one"
            )
        if run_id != self.run_id:
            raise InvalidArgument(
                "page_token",
                "is from before the server restarted; start again with an empty one",
            )
        if made_for is not key_filter:
            raise InvalidArgument(
                "page_token",
                f"was made for state {made_for.value}, not {key_filter.value};"
                " keep the state while paging or start again",
            )
        return after
