"""The key checker: learns each key's real state from the upstream (OpenAI) API.

A task on the server's event loop. For every key that needs a check it makes
three calls at once, none of which costs a token:

1. ``GET /models`` — the key's model ids, hence its families (gpt4-32k only
   when listed);
2. ``POST /chat/completions`` with ``babbage-002`` and ``max_tokens: -1`` — a
   live key is refused with 400 before any model runs; 401 and 429 tell revoked
   and out-of-quota keys apart; ``x-ratelimit-limit-requests`` <= 250 means a
   trial key;
3. ``GET /organizations`` — the default organization, and one clone of the key
   per other organization (own hash, own check).

Keys are checked in batches of ``batch_size`` (12), one batch at a time, and a
batch never starts within ``check_interval`` (3 s) of the end of the previous
one. A check that gets no usable answer (network error, timeout, 403/404/5xx,
a body that is not OpenAI's) changes nothing and is retried for that key with
exponential backoff and ±25 % jitter (never under 1 s). Every
``recheck_interval`` (8 h), at an offset derived from the host name so replicas
do not check together, every live key is checked again.

The checker changes the pool only through the backend's ``apply_check``,
``apply_dead_check`` and ``clone_for_org`` (one call per result); it logs key
hashes, never secrets.
"""

from __future__ import annotations

import asyncio
import enum
import hashlib
import logging
import math
import random
import socket
from collections import deque
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Final

import httpx

from .clock import Clock
from .config import DEFAULT_OPENAI_BASE_URL
from .errors import KeyNotFound
from .keys import DisableReason, Key
from .outcomes import UpstreamError, dead_key_reason, upstream_error
from .pool import KeyPool, PoolBackend, as_backend

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

#: The liveness probe: refused with 400 (max_tokens below minimum) by a live key, so free.
LIVENESS_REQUEST: Final[Mapping[str, Any]] = {
    "model": "babbage-002",
    "max_tokens": -1,
    "messages": [{"role": "user", "content": ""}],
}
LIMIT_REQUESTS_HEADER: Final = "x-ratelimit-limit-requests"
#: Request limit assumed when the header is missing or unreadable.
DEFAULT_REQUEST_LIMIT: Final = 3500
#: Keys whose request limit is at most this are trial keys.
TRIAL_REQUEST_LIMIT: Final = 250
#: /organizations errors that only mean the key cannot list organizations.
IGNORED_ORGANIZATION_ERRORS: Final = frozenset({"invalid_api_key", "no_organization"})
ORGANIZATION_HEADER: Final = "OpenAI-Organization"


@dataclass(frozen=True, slots=True, kw_only=True)
class CheckerConfig:
    """How the checker talks to the upstream and how often.

    Attributes:
        base_url: the upstream API base URL (OPENAI_BASE_URL).
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
    timeout: float = 10.0
    check_interval: float = 3.0
    recheck_interval: float = 8 * 3600.0
    recheck_offset: float | None = None
    batch_size: int = 12
    retry_base: float = 5.0
    retry_max: float = 1800.0
    retry_floor: float = 1.0


class Verdict(enum.Enum):
    """What one upstream answer says about a key."""

    ALIVE = "alive"
    #: Rate limited: alive, but the answer carried nothing else.
    BUSY = "busy"
    DEAD = "dead"
    #: No usable answer; try again later.
    RETRY = "retry"


@dataclass(frozen=True, slots=True)
class Outcome:
    verdict: Verdict
    reason: DisableReason | None = None
    #: Why, for the log (never holds a secret).
    problem: str = ""


def classify(status: int, body: object, *, trial: bool) -> Outcome:
    """The error table: what a non-2xx answer says about the key.

    A 400 other than ``billing_hard_limit_reached`` means the request reached
    validation, so the key is alive (the liveness probe relies on it).
    """
    error = upstream_error(body)
    if error is None:
        return Outcome(Verdict.RETRY, problem=f"HTTP {status} without an OpenAI error body")
    label = f"HTTP {status} {error.code or error.type}"
    reason = dead_key_reason(status, error)  # the rows shared with ReportOutcome
    if reason is not None:
        return Outcome(Verdict.DEAD, reason, label)
    if status == 429:
        if error.type == "requests" and trial:
            return Outcome(Verdict.DEAD, DisableReason.QUOTA, f"{label} on a trial key")
        return Outcome(Verdict.BUSY, problem=label)
    if status == 400:
        return Outcome(Verdict.ALIVE, problem=label)
    return Outcome(Verdict.RETRY, problem=label)


def is_trial_limit(headers: Mapping[str, str]) -> bool:
    """Whether ``x-ratelimit-limit-requests`` marks a trial key (<= 250; default 3500)."""
    raw = headers.get(LIMIT_REQUESTS_HEADER)
    try:
        limit = int(raw) if raw is not None else DEFAULT_REQUEST_LIMIT
    except ValueError:
        limit = DEFAULT_REQUEST_LIMIT
    return limit <= TRIAL_REQUEST_LIMIT


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


@dataclass(frozen=True, slots=True)
class _Answer:
    """One call's outcome and, when it succeeded, what it returned."""

    outcome: Outcome
    data: Any = None


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
        self._client = httpx.AsyncClient(
            base_url=config.base_url.rstrip("/") + "/",
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
                models, liveness, organizations = await asyncio.gather(
                    self._models(key), self._liveness(key), self._organizations(key)
                )
        except TimeoutError:
            self._retry_later(key, f"no answer within {self._config.timeout:g} s")
            return Verdict.RETRY

        answers = (liveness, models)
        dead = next((a.outcome for a in answers if a.outcome.verdict is Verdict.DEAD), None)
        if dead is not None:
            assert dead.reason is not None
            self._retries.pop(key.hash, None)
            await self._pool.apply_dead_check(key.hash, dead.reason)
            _log.warning(
                "key check: dead",
                extra={"key_hash": key.hash, "reason": dead.reason.value, "problem": dead.problem},
            )
            return Verdict.DEAD
        if liveness.outcome.verdict is Verdict.RETRY:
            self._retry_later(key, f"liveness: {liveness.outcome.problem}")
            return Verdict.RETRY

        trial: bool = liveness.data
        model_ids: list[str] | None = models.data
        orgs: list[tuple[str, bool]] | None = organizations.data
        default_org: str | None = None
        other_orgs: list[str] = []
        if orgs:
            defaults = [org for org, is_default in orgs if is_default]
            if defaults:
                default_org = defaults[0]
                other_orgs = [org for org, is_default in orgs if not is_default]
        was_disabled = key.is_disabled
        await self._pool.apply_check(
            key.hash, model_ids=model_ids, is_trial=trial, organization_id=default_org
        )
        _log.info(
            "key check: alive",
            extra={
                "key_hash": key.hash,
                "families": ",".join(sorted(key.model_families)),
                "trial": trial,
                "busy": liveness.outcome.verdict is Verdict.BUSY,
                "revived": was_disabled and not key.is_disabled,
            },
        )
        for org in other_orgs:
            clone = await self._pool.clone_for_org(key.hash, org)
            if clone is not None:
                self._enqueue([clone])

        missing = [
            f"{name}: {answer.outcome.problem}"
            for name, answer in (("models", models), ("organizations", organizations))
            if answer.data is None and answer.outcome.verdict is not Verdict.ALIVE
        ]
        if missing:
            self._retry_later(key, "; ".join(missing))
        else:
            self._retries.pop(key.hash, None)
        return Verdict.ALIVE

    def _headers(self, key: Key) -> dict[str, str]:
        headers = {"Authorization": f"Bearer {key.secret}"}
        if key.cloned_from and key.organization_id and "svcacct" not in key.secret:
            headers[ORGANIZATION_HEADER] = key.organization_id
        return headers

    async def _call(
        self, method: str, path: str, key: Key, json: Mapping[str, Any] | None = None
    ) -> tuple[httpx.Response, object] | Outcome:
        """One request; the response and its JSON body (None if not JSON), or a RETRY."""
        try:
            response = await self._client.request(
                method, path, headers=self._headers(key), json=json
            )
        except httpx.HTTPError as exc:
            # The exception's text names the URL only, never the Authorization header.
            return Outcome(Verdict.RETRY, problem=f"{path}: {type(exc).__name__}")
        try:
            body: object = response.json()
        except ValueError:
            body = None
        return response, body

    async def _liveness(self, key: Key) -> _Answer:
        """data: whether the key is trial-level."""
        result = await self._call("POST", "chat/completions", key, LIVENESS_REQUEST)
        if isinstance(result, Outcome):
            return _Answer(result)
        response, body = result
        trial = is_trial_limit(response.headers)
        if response.is_success:
            if not isinstance(body, dict):
                return _Answer(Outcome(Verdict.RETRY, problem=f"HTTP {response.status_code} body"))
            return _Answer(Outcome(Verdict.ALIVE), trial)
        return _Answer(classify(response.status_code, body, trial=trial), trial)

    async def _models(self, key: Key) -> _Answer:
        """data: the listed model ids."""
        result = await self._call("GET", "models", key)
        if isinstance(result, Outcome):
            return _Answer(result)
        response, body = result
        if response.status_code == 200:
            items = _list_data(body)
            ids = [item["id"] for item in items or () if isinstance(item.get("id"), str)]
            if items is None or not ids:
                return _Answer(Outcome(Verdict.RETRY, problem="models: not a model list"))
            return _Answer(Outcome(Verdict.ALIVE), ids)
        outcome = classify(response.status_code, body, trial=is_trial_limit(response.headers))
        if outcome.verdict is Verdict.ALIVE:  # a 400 here says nothing about access
            outcome = Outcome(Verdict.RETRY, problem=outcome.problem)
        return _Answer(outcome)

    async def _organizations(self, key: Key) -> _Answer:
        """data: (organization id, is default) pairs, or None when not learned."""
        if key.cloned_from:
            # A clone already is one organization of its parent, which lists them all.
            return _Answer(Outcome(Verdict.ALIVE))
        result = await self._call("GET", "organizations", key)
        if isinstance(result, Outcome):
            return _Answer(result)
        response, body = result
        if response.status_code == 200:
            items = _list_data(body)
            if items is None:
                return _Answer(Outcome(Verdict.RETRY, problem="organizations: not a list"))
            orgs = [
                (item["id"], item.get("is_default") is True)
                for item in items
                if isinstance(item.get("id"), str) and item["id"]
            ]
            return _Answer(Outcome(Verdict.ALIVE), orgs)
        error = upstream_error(body)
        if error is not None and error.names(*IGNORED_ORGANIZATION_ERRORS):
            return _Answer(Outcome(Verdict.ALIVE))  # the key lacks the scope to list them
        outcome = classify(response.status_code, body, trial=is_trial_limit(response.headers))
        if outcome.verdict in (Verdict.DEAD, Verdict.ALIVE):
            # Liveness decides whether a key is dead; this only means no organizations.
            _log.warning(
                "cannot list the key's organizations",
                extra={"key_hash": key.hash, "problem": outcome.problem},
            )
            return _Answer(Outcome(Verdict.ALIVE, problem=outcome.problem))
        return _Answer(outcome)


def _list_data(body: object) -> list[dict[str, Any]] | None:
    """The ``data`` objects of an OpenAI list body, or None when it is not one."""
    if not isinstance(body, dict) or not isinstance(body.get("data"), list):
        return None
    return [item for item in body["data"] if isinstance(item, dict)]


def check_outcome(verdict: Verdict, key: Key) -> str:
    """The label a finished check is counted under: alive, trial, revoked, over_quota or retry."""
    if verdict is Verdict.DEAD:
        return "revoked" if key.is_revoked else "over_quota"
    if verdict is Verdict.RETRY:
        return "retry"
    return "trial" if key.is_trial else "alive"
