"""The seam between the pool's callers and where its state lives.

The servicer, ext_proc, the key checker, the keys-file reload and the server
call a ``PoolBackend``. Every operation that reads or changes the shared pool
is one ``async`` call, so a backend whose state is across the network (Redis)
can do each in one atomic round trip: a Get is one call (select, throttle and
reserve), and so is each report, Disable, IncrementUsage, Recheck and each
checker result. Listing is paged. An operation either happens whole or raises
one of the package's errors (``keysvc.errors``), never half.

``MemoryBackend`` (``keysvc.pool.memory``) is ``KeyPool`` behind the seam: its
methods never await across a change, so each keeps the atomicity the event
loop gives it. Embedders and tests that build a ``KeyPool`` hand it to the
server as it is; ``keysvc.pool.as_backend`` puts it behind the seam.

The status page and metrics walk a local view of every key
(``keysvc.status.SnapshotSource``, from ``snapshot_source``), in slices on the
loop; the in-memory backend's view is the pool itself.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import NamedTuple, Protocol

from ..events import PoolObserver
from ..keys import DisableReason, Key
from ..listing import KeyFilter
from ..outcomes import Decision, UpstreamError
from ..status import SnapshotSource

__all__ = ["KeyPage", "KeySync", "PoolBackend"]


class KeyPage(NamedTuple):
    """One page of List: its keys, and the token of the next page ("" after the last)."""

    keys: Sequence[Key]
    next_page_token: str


class KeySync(NamedTuple):
    """What a reload of the configured keys did."""

    added: int
    removed: int
    #: Keys in the pool after it.
    keys: int


class PoolBackend(Protocol):
    """Where the pool's state lives, and the one call per operation on it."""

    @property
    def observer(self) -> PoolObserver:
        """Told of hand-outs, token usage, key state changes and check results."""
        ...

    def snapshot_source(self) -> SnapshotSource:
        """The view of every key the status page and metrics walk."""
        ...

    # -- KeyService and ext_proc ---------------------------------------------------

    async def get(
        self,
        model: str,
        max_wait: float = 0.0,
        *,
        time_left: float | None = None,
        caller: str = "",
    ) -> Key:
        """Selects the best key for ``model``, throttles and reserves it: ``KeyPool.get``,
        or with ``max_wait`` > 0 ``KeyPool.get_waiting``. ``caller``: who asks (its
        connection), whose held room (``lockout_period``) is its own again first."""
        ...

    async def lockout_period(self, model: str, *, caller: str = "") -> float:
        """Seconds until a key for ``model`` is free (``KeyPool.lockout_period``); a 0
        holds one request's room for ``caller``'s next Get."""
        ...

    async def mark_rate_limited(self, key_hash: str, model: str = "") -> None: ...

    async def update_rate_limits(
        self, key_hash: str, headers: Mapping[str, str], model: str = ""
    ) -> None: ...

    async def increment_usage(self, key_hash: str, model: str, tokens: int) -> None: ...

    async def report_outcome(
        self,
        key_hash: str,
        model: str,
        *,
        status: int,
        headers: Mapping[str, str],
        error: UpstreamError,
        prompt_tokens: int = 0,
        completion_tokens: int = 0,
    ) -> tuple[Decision, Key]:
        """Applies one upstream answer (``KeyPool.report_outcome``). A caller that
        acknowledges a disable it decides must ``flush`` first."""
        ...

    async def disable(self, key_hash: str, reason: DisableReason) -> Key:
        """Takes a key out of service; durable once ``flush`` returns."""
        ...

    async def recheck(self, *, until_checked: bool = False) -> None: ...

    async def available(self) -> int:
        """How many keys are not disabled."""
        ...

    async def list_keys(self, page_token: str, page_size: int, key_filter: KeyFilter) -> KeyPage:
        """Up to ``page_size`` keys matching ``key_filter``, after ``page_token``'s page.

        Raises:
            InvalidArgument: the token is not one this pool made for this filter.
        """
        ...

    # -- the key checker -------------------------------------------------------------

    async def keys(self) -> list[Key]:
        """Every key, in load order."""
        ...

    async def key(self, key_hash: str) -> Key:
        """The key with ``key_hash`` (``KeyPool.key``)."""
        ...

    async def apply_check(
        self,
        key_hash: str,
        *,
        model_ids: Iterable[str] | None,
        is_trial: bool,
        organization_id: str | None = None,
    ) -> Key: ...

    async def apply_dead_check(self, key_hash: str, reason: DisableReason) -> Key: ...

    async def clone_for_org(self, key_hash: str, organization_id: str) -> Key | None: ...

    # -- configuration and lifecycle ---------------------------------------------------

    async def sync_keys(self, secrets: Sequence[str]) -> KeySync:
        """Makes the configured keys exactly ``secrets``; kept keys are not touched."""
        ...

    async def flush(self) -> None:
        """Returns once every change so far is durable (a state file written; at
        once where every call is durable when it returns)."""
        ...
