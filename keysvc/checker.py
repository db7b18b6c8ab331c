"""The key checker: learns each key's real state from its provider's API.

A task on the server's event loop. For every key that needs a check it asks
the key's provider's ``Prober`` (``keysvc.providers.<name>.checker``: OpenAI
makes three calls that cost no token, Anthropic two), over one shared httpx
client, and applies the ``CheckReport`` to the pool.

Keys are checked in batches of ``batch_size`` (12), one batch at a time, and a
batch never starts within ``check_interval`` (3 s) of the end of the previous
one. A check that gets no usable answer (network error, timeout, 403/404/5xx,
a body that is not the provider's) changes nothing and is retried for that key with
exponential backoff and ±25 % jitter (never under 1 s). Every
``recheck_interval`` (8 h), at an offset derived from the host name so replicas
do not check together, every live key is checked again.

The checker changes the pool only through the backend's ``apply_check``,
``apply_dead_check`` and ``clone_for_org`` (one call per result); it logs key
hashes, never secrets.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import math
import random
import socket
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass

import httpx

from .clock import Clock
from .config import DEFAULT_ANTHROPIC_BASE_URL, DEFAULT_OPENAI_BASE_URL
from .errors import KeyNotFound
from .keys import Key
from .pool import KeyPool, PoolBackend, as_backend
from .providers import ANTHROPIC, OPENAI, provider
from .providers.base import CheckReport, Outcome, Prober, UpstreamError, Verdict
from .providers.openai.checker import classify, is_trial_limit

__all__ = [
    "CheckerConfig",
    "KeyChecker",
    "Outcome",
    "UpstreamError",
    "Verdict",
    "classify",
    "host_offset",
    "is_trial_limit",
    "retry_delay",
]

_log = logging.getLogger("keysvc.checker")


@dataclass(frozen=True, slots=True, kw_only=True)
class CheckerConfig:
    """How the checker talks to the upstream and how often.

    Attributes:
        base_url: the OpenAI API base URL (OPENAI_BASE_URL).
        anthropic_base_url: the Anthropic API base URL (ANTHROPIC_BASE_URL).
        timeout: seconds one key's check may take, all three calls together.
        check_interval: seconds between the end of a batch and the start of the next.
        recheck_interval: seconds between full rechecks of every live key; 0 turns them off.
        recheck_offset: phase of the full rechecks within ``recheck_interval``;
            None derives it from the host name.
        batch_size: keys checked at once.
        retry_base: backoff of a key's first retry, doubled for each further one.
        retry_max: the longest backoff.
        retry_floor: the shortest backoff, after jitter.
    """

    base_url: str = DEFAULT_OPENAI_BASE_URL
    anthropic_base_url: str = DEFAULT_ANTHROPIC_BASE_URL
    timeout: float = 10.0
    check_interval: float = 3.0
    recheck_interval: float = 8 * 3600.0
    recheck_offset: float | None = None
    batch_size: int = 12
    retry_base: float = 5.0
    retry_max: float = 1800.0
    retry_floor: float = 1.0


def retry_delay(attempt: int, config: CheckerConfig, rng: random.Random) -> float:
    """Backoff before retry number ``attempt`` (1, 2, ...): exponential, ±25 %, floored."""
    base = min(config.retry_max, config.retry_base * 2.0 ** min(attempt - 1, 60))
    return max(config.retry_floor, base * rng.uniform(0.75, 1.25))


def host_offset(interval: float, host: str | None = None) -> float:
    """A stable phase in [0, interval) for this host, so replicas recheck at different times."""
    name = host if host is not None else socket.gethostname()
    digest = hashlib.sha256(name.encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2.0**64 * interval


def next_slot(now: float, interval: float, offset: float) -> float:
    """The first time after ``now`` that is ``offset`` past a multiple of ``interval``."""
    return now - (now - offset) % interval + interval


class KeyChecker:
    """Checks the pool's keys against the upstream API; see the module docstring.

    Use ``run()`` as a task; ``step()`` runs one scheduling step for tests that
    drive time with a ManualClock. Close with ``aclose()`` (``run`` does it on
    exit).
    """

    def __init__(
        self,
        pool: PoolBackend | KeyPool,
        *,
        clock: Clock,
        config: CheckerConfig | None = None,
        transport: httpx.AsyncBaseTransport | None = None,
        rng: random.Random | None = None,
    ) -> None:
        self._pool = as_backend(pool)
        self._clock = clock
        self._config = config = config or CheckerConfig()
        self._rng = rng or random.Random()
        self._probers: dict[str, Prober] = {
            OPENAI: provider(OPENAI).prober(config.base_url),
            ANTHROPIC: provider(ANTHROPIC).prober(config.anthropic_base_url),
        }
        # One client (one connection pool, one transport) for every provider;
        # each prober names its own base URL.
        self._client = httpx.AsyncClient(
            transport=transport,
            timeout=config.timeout,
            follow_redirects=False,
        )
        # Keys waiting for a check, in order; a key is in the deque at most once.
        self._queue: deque[str] = deque()
        self._queued: set[str] = set()
        # Keys waiting for a retry: hash → (due time, attempts so far).
        self._retries: dict[str, tuple[float, int]] = {}
        self._last_batch_end = -math.inf
        self._wake = asyncio.Event()
        self._next_full_recheck = math.inf
        if config.recheck_interval > 0:
            offset = config.recheck_offset
            if offset is None:
                offset = host_offset(config.recheck_interval)
            self._offset = offset
            self._next_full_recheck = next_slot(clock.now(), config.recheck_interval, offset)
        # The keys never checked are queued by the first step (reading them is a pool call).
        self._loaded = False

    # -- control ---------------------------------------------------------------

    async def enqueue_unchecked(self) -> int:
        """Queues every key that has never been checked (or was marked for recheck)."""
        self._loaded = True
        return self._enqueue(k for k in await self._pool.keys() if not k.last_checked)

    async def recheck(self) -> None:
        """The Recheck RPC: every key is checked again; dead keys stay out until found alive."""
        await self._pool.recheck(until_checked=True)
        self._queue.clear()
        self._queued.clear()
        self._retries.clear()
        count = await self.enqueue_unchecked()
        _log.info("recheck requested", extra={"keys": count})
        self._wake.set()

    async def pick_up_rechecks(self) -> int:
        """Queues the keys marked unchecked since (a Recheck another replica took) and
        wakes the checker when there are any."""
        count = await self.enqueue_unchecked()
        if count:
            self._wake.set()
        return count

    @property
    def pending(self) -> int:
        """Keys waiting for a check or a retry."""
        return len(self._queued) + len(self._retries)

    @property
    def retrying(self) -> int:
        """Keys waiting for a retry after an incomplete check."""
        return len(self._retries)

    async def run(self) -> None:
        """Checks keys until cancelled; closes the HTTP client on the way out."""
        if not self._loaded:
            await self.enqueue_unchecked()
        _log.info(
            "key checker started",
            extra={"pending": self.pending, "base_url": self._config.base_url},
        )
        try:
            while True:
                delay = await self.step()
                if delay > 0:
                    await self._sleep(delay)
        finally:
            await self.aclose()
            _log.info("key checker stopped")

    async def aclose(self) -> None:
        await self._client.aclose()

    async def __aenter__(self) -> KeyChecker:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    # -- scheduling --------------------------------------------------------------

    async def step(self) -> float:
        """Runs the full recheck and the next batch if they are due.

        Returns:
            Seconds until something may be due (inf when nothing is waiting).
        """
        if not self._loaded:
            await self.enqueue_unchecked()
        now = self._clock.now()
        if now >= self._next_full_recheck:
            await self._full_recheck(now)
        if now >= self._last_batch_end + self._config.check_interval:
            batch = await self._take_batch(now)
            if batch:
                await asyncio.gather(*(self._check_and_log(key) for key in batch))
                self._last_batch_end = self._clock.now()
        return self._next_wakeup(self._clock.now())

    async def _full_recheck(self, now: float) -> None:
        interval = self._config.recheck_interval
        self._next_full_recheck = next_slot(now, interval, self._offset)
        # Keys checked in the last half interval (e.g. at start-up) can wait for the next one.
        fresh = now - interval / 2
        count = self._enqueue(
            k for k in await self._pool.keys() if not k.is_disabled and k.last_checked <= fresh
        )
        _log.info("periodic recheck", extra={"keys": count})

    def _enqueue(self, keys: Iterable[Key]) -> int:
        count = 0
        for key in keys:
            if key.hash not in self._queued and key.hash not in self._retries:
                self._queue.append(key.hash)
                self._queued.add(key.hash)
                count += 1
        return count

    async def _take_batch(self, now: float) -> list[Key]:
        batch: list[Key] = []
        size = self._config.batch_size
        for key_hash, (due, _) in sorted(self._retries.items(), key=lambda item: item[1][0]):
            if len(batch) >= size or due > now:
                break
            await self._add_if_needed(batch, key_hash)
        while self._queue and len(batch) < size:
            key_hash = self._queue.popleft()
            self._queued.discard(key_hash)
            await self._add_if_needed(batch, key_hash)
        return batch

    async def _add_if_needed(self, batch: list[Key], key_hash: str) -> None:
        try:
            key = await self._pool.key(key_hash)
        except KeyNotFound:
            self._retries.pop(key_hash, None)
            return
        if key.is_disabled and not key.revive_if_alive:
            self._retries.pop(key_hash, None)  # disabled since it was queued: nothing to learn
            return
        batch.append(key)

    def _next_wakeup(self, now: float) -> float:
        earliest_batch = self._last_batch_end + self._config.check_interval
        candidates = [self._next_full_recheck]
        if self._queue:
            candidates.append(earliest_batch)
        if self._retries:
            first_retry = min(due for due, _ in self._retries.values())
            candidates.append(max(first_retry, earliest_batch))
        return max(0.0, min(candidates) - now)

    async def _sleep(self, delay: float) -> None:
        """Sleeps ``delay`` seconds, or less when ``recheck`` wakes the checker."""
        try:
            async with asyncio.timeout(None if math.isinf(delay) else delay):
                await self._wake.wait()
        except TimeoutError:
            pass
        self._wake.clear()

    def _retry_later(self, key: Key, problem: str) -> None:
        _, attempts = self._retries.get(key.hash, (0.0, 0))
        attempts += 1
        delay = retry_delay(attempts, self._config, self._rng)
        self._retries[key.hash] = (self._clock.now() + delay, attempts)
        _log.warning(
            "key check incomplete; will retry",
            extra={
                "key_hash": key.hash,
                "problem": problem,
                "attempt": attempts,
                "retry_in": round(delay, 2),
            },
        )

    # -- one key ------------------------------------------------------------------

    async def _check_and_log(self, key: Key) -> None:
        try:
            verdict = await self.check_key(key)
        except Exception:
            # A defect must not stop the checker; the key is tried again later.
            _log.exception("key check failed unexpectedly", extra={"key_hash": key.hash})
            self._retry_later(key, "internal error")
            outcome = "error"
        else:
            outcome = check_outcome(verdict, key)
        self._pool.observer.check_result(outcome)

    async def check_key(self, key: Key) -> Verdict:
        """Checks one key now and applies what was learned to the pool.

        Returns:
            ALIVE or DEAD when the pool was updated (an ALIVE key may still be
            retried for a list it could not read), RETRY when nothing was learned.
        """
        try:
            async with asyncio.timeout(self._config.timeout):
                report = await self._probers[key.service].check(self._client, key)
        except TimeoutError:
            self._retry_later(key, f"no answer within {self._config.timeout:g} s")
            return Verdict.RETRY
        return await self._apply(key, report)

    async def _apply(self, key: Key, report: CheckReport) -> Verdict:
        outcome = report.outcome
        if outcome.verdict is Verdict.DEAD:
            assert outcome.reason is not None
            self._retries.pop(key.hash, None)
            await self._pool.apply_dead_check(key.hash, outcome.reason)
            _log.warning(
                "key check: dead",
                extra={
                    "key_hash": key.hash,
                    "provider": key.service,
                    "reason": outcome.reason.value,
                    "problem": outcome.problem,
                },
            )
            return Verdict.DEAD
        if outcome.verdict is Verdict.RETRY:
            self._retry_later(key, outcome.problem)
            return Verdict.RETRY
        was_disabled = key.is_disabled
        await self._pool.apply_check(
            key.hash,
            model_ids=report.model_ids,
            is_trial=report.is_trial,
            organization_id=report.organization_id,
        )
        extra: dict[str, object] = {
            "key_hash": key.hash,
            "provider": key.service,
            "families": ",".join(sorted(key.model_families)),
            "trial": report.is_trial,
            "busy": outcome.verdict is Verdict.BUSY,
            "revived": was_disabled and not key.is_disabled,
        }
        if report.tier:
            extra["tier"] = report.tier
        _log.info("key check: alive", extra=extra)
        for org in report.other_organizations:
            clone = await self._pool.clone_for_org(key.hash, org)
            if clone is not None:
                self._enqueue([clone])
        if report.missing:
            self._retry_later(key, "; ".join(report.missing))
        else:
            self._retries.pop(key.hash, None)
        return Verdict.ALIVE


def check_outcome(verdict: Verdict, key: Key) -> str:
    """The label a finished check is counted under: alive, trial, revoked, over_quota or retry."""
    if verdict is Verdict.DEAD:
        return "revoked" if key.is_revoked else "over_quota"
    if verdict is Verdict.RETRY:
        return "retry"
    return "trial" if key.is_trial else "alive"
