"""The Redis backend: one pool shared by every replica with the same URL and prefix.

Each operation is one Lua script call (``scripts/*.lua``, by EVALSHA; redis-py
loads a script again when Redis answers NOSCRIPT), so it runs whole or not at
all and no replica reads and writes in separate steps. The scripts are
``rules.lua`` (the rules of ``keysvc.pool.rules``, ported), ``pool.lua`` (the
data layout: sorted sets per family of keys free by last use and locked by
unlock time, as the memory backend's indexes) and the operation's own body,
behind a block of constants written from ``rules.py``.

Time is Redis's (``TIME`` in the scripts), so replicas with skewed clocks agree
on every lock; a test may pass a clock of its own (``now``) instead. Secrets
never go to Redis: it holds hashes and state, and each replica hands out only
the keys whose secret it holds. Headers are parsed here, by the rules both
backends use; the scripts get numbers. All keys carry one hash tag
(``{prefix}``), so one pool lives on one Redis Cluster slot.

Each RPC has ``timeout`` of Redis time in all (its calls share it; a Get's
wait for a key is not Redis time); past it, or on any connection error, the
call fails with ``StoreUnavailable`` and nothing is answered from a local view.
Each replica hands out only keys of its own key list (a held set in Redis per
list), looking past at most ``SKIP_LIMIT`` keys it lacks per index.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import functools
import hashlib
import logging
import time
from collections import deque
from collections.abc import Awaitable, Callable, Coroutine, Iterable, Mapping, Sequence
from contextvars import ContextVar
from dataclasses import replace
from importlib import resources
from typing import Any, Concatenate, Final, ParamSpec, TypeVar

from redis import exceptions as redis_errors
from redis.asyncio import Redis
from redis.commands.core import AsyncScript

from ..errors import (
    FamilyDisallowed,
    InvalidArgument,
    KeyNotFound,
    KeysBusy,
    NoKeysForFamily,
    StoreUnavailable,
)
from ..events import KeyChange, NullObserver, PoolObserver
from ..keys import DisableReason, Key, KeyProfile, hash_key, snapshot_base
from ..listing import KeyFilter
from ..models import GPT4_32K, ModelTable
from ..outcomes import Decision, UpstreamError
from ..providers import IDENTITIES, OPENAI, backoff, identity_of_hash, provider, provider_names
from ..rates import HAS_STATE, KIND_INPUT_TOKENS, KIND_OUTPUT_TOKENS, MAX_COUNT, RateBook
from ..status import (
    COUNTED_STATES,
    LISTED_STATES,
    FamilySummary,
    KeyList,
    KeyState,
    PoolSnapshot,
    SnapshotSource,
    key_state,
)
from . import rules
from .backend import KeyPage, KeySync
from .pipelining import AutoPipeline
from .rules import (
    CHANGE_LOGS,
    DEFAULT_LOCKOUT_MODEL,
    HASH_PATTERN,
    KEY_REUSE_DELAY,
    MAX_WAIT,
    Limits,
    RateHeaders,
    check_headers,
    check_model,
    parse_rate_headers,
)

__all__ = ["DEFAULT_PREFIX", "DEFAULT_TIMEOUT", "RedisBackend"]

_log = logging.getLogger("keysvc.pool")

DEFAULT_PREFIX: Final = "keysvc"
#: The whole time one RPC may spend on Redis, retries included (KEYSVC_REDIS_TIMEOUT).
DEFAULT_TIMEOUT: Final = 0.25
#: Keys registered per script call at start-up.
_ADD_BATCH: Final = 1000
#: Keys a List page looks at, at most (as the memory backend's scan limit).
_LIST_SCAN: Final = 1000
#: Disabled keys the census reads per script call.
_CENSUS_BATCH: Final = 1000
#: Keys (from the first in load order) the status page's lists are picked from.
_CENSUS_LISTED: Final = 200
#: Keys one Recheck script call marks, at most (a few ms of Redis per call).
RECHECK_BATCH: Final = 500
#: Keys one sweep script call looks at, at most (``RedisBackend.sweep``).
SWEEP_BATCH: Final = 100
#: Keys a replica lacks that a Get looks past at the head of each index, at most
#: (docs/scale-out.md): selection stays bounded when replicas' key lists differ.
SKIP_LIMIT: Final = 256
#: How long a key list's held set stays in Redis when no replica renews it (ms): the
#: lists of replicas gone or reloaded go by themselves.
_HELD_TTL_MS: Final = 3_600_000
#: Distinct key profiles (family lists, trial) kept for building Keys; a handful in practice.
_PROFILES_KEPT: Final = 1024
#: Hashes a replica that lacks keys logs, at most (with the count of all).
_LACKING_LOGGED: Final = 100

#: The rules' constants, written into every script so Lua and Python cannot drift.
_CONSTANTS: Final = (
    "RATE_LIMIT_FALLBACK",
    "MAX_RESET",
    "MAX_BUDGET_WAIT",
    "RESET_GRAIN",
    "RESERVATION_TTL",
    "PROMISE_TTL",
    "BUDGET_LAPSE",
    "ATTRIBUTION_WINDOW",
    "REPORT_PAIR_WINDOW",
    "TOKEN_ESTIMATE_SPREAD",
    "TOKEN_ESTIMATE_WEIGHT",
)

_CHANGES: Final = {
    "disabled": KeyChange.DISABLED,
    "revoked": KeyChange.REVOKED,
    "over_quota": KeyChange.OVER_QUOTA,
}

#: The fields of a key's record a key view holds, in this order (pool.lua's key_view
#: reads them with HMGET): values by position, no field names to send and parse.
_RECORD_VIEW: Final = (
    "fams",
    "trial",
    "org",
    "clone",
    "dis",
    "rev",
    "oq",
    "reason",
    "dat",
    "oqu",
    "lu",
    "lc",
    "pc",
    "revive",
    "seq",
)
#: The same of each family state: the state's fields the Key message shows, and the
#: ``RateTable`` column each goes to; then its flags.
_STATE_VIEW: Final = {
    "lu": "last_used",
    "rla": "rate_limited_at",
    "until": "until",
    "rr": "requests_reset",
    "tr": "tokens_reset",
    "rmr": "remaining_requests",
    "rmt": "remaining_tokens",
    "bat": "budget_at",
}
_STATE_COLUMNS: Final = tuple(_STATE_VIEW.values())
#: Where a key view's record holds the key's load position (List pages resume there).
_SEQ_AT: Final = _RECORD_VIEW.index("seq")


class _Budget:
    """The Redis time an RPC has left (seconds): each call spends what it takes."""

    def __init__(self, left: float) -> None:
        self.left = left


#: The budget of the RPC in progress in this task; None outside one (then each call
#: may take the whole timeout).
_budget: ContextVar[_Budget | None] = ContextVar("keysvc_redis_budget", default=None)

_P = ParamSpec("_P")
_R = TypeVar("_R")


def _one_rpc(
    method: Callable[Concatenate[RedisBackend, _P], Coroutine[Any, Any, _R]],
) -> Callable[Concatenate[RedisBackend, _P], Coroutine[Any, Any, _R]]:
    """Bounds the whole time ``method`` spends on Redis, every call and retry of it,
    by the backend's timeout (KEYSVC_REDIS_TIMEOUT); time spent waiting for a key is
    not Redis time. A call made inside another's budget spends that one."""

    @functools.wraps(method)
    async def bounded(backend: RedisBackend, /, *args: _P.args, **kwargs: _P.kwargs) -> _R:
        if _budget.get() is not None:
            return await method(backend, *args, **kwargs)
        token = _budget.set(_Budget(backend.timeout))
        try:
            return await method(backend, *args, **kwargs)
        finally:
            _budget.reset(token)

    return bounded


def _script_text(name: str) -> str:
    return (resources.files(__package__) / "scripts" / name).read_text(encoding="utf-8")


def _lua_string(text: str) -> str:
    """``text`` as a Lua string literal (every byte but letters and digits escaped)."""
    return '"' + "".join(chr(b) if chr(b).isalnum() else f"\\{b:03d}" for b in text.encode()) + '"'


def _program(body: str, split: Iterable[str] = ()) -> str:
    """The text of one operation's script: constants, the rules, the layout, the body.

    ``split``: the families whose provider limits input and output tokens apart."""
    constants = [f"local {name} = {float(getattr(rules, name))!r}" for name in _CONSTANTS]
    constants.append(f"local MAX_COUNT = {float(MAX_COUNT)!r}")
    constants.append(f"local SKIP_LIMIT = {SKIP_LIMIT}")
    constants.append(f"local KIND_INPUT_TOKENS = {KIND_INPUT_TOKENS}")
    constants.append(f"local KIND_OUTPUT_TOKENS = {KIND_OUTPUT_TOKENS}")
    constants.append(f"local BACKOFF_BASE = {float(backoff.BASE)!r}")
    constants.append(f"local BACKOFF_MAX = {float(backoff.MAX)!r}")
    for name, fields in (("RECORD_VIEW", _RECORD_VIEW), ("STATE_VIEW", (*_STATE_VIEW, "fl"))):
        constants.append(f"local {name} = {{{', '.join(_lua_string(f) for f in fields)}}}")
    constants.append("local SPLIT = {}")
    constants += [f"SPLIT[{_lua_string(family)}] = true" for family in sorted(split)]
    parts = ["\n".join(constants), _script_text("rules.lua"), _script_text("pool.lua"), body]
    return "\n".join(parts)


def _num(value: float | None) -> str:
    return "" if value is None else repr(float(value))


def _ignore(problem: str) -> None:
    pass


def _provider_keys(by_prefix: Mapping[str, str], total: int) -> dict[str, int]:
    """Keys per provider from the pool's counter by hash prefix (census.lua). Keys added
    before the pool kept it are counted as OpenAI's: it held no other keys then."""
    names = {identity.hash_prefix: identity.name for identity in IDENTITIES}
    keys_of = dict.fromkeys(provider_names(), 0)
    for prefix, keys in by_prefix.items():
        keys_of[names.get(prefix, OPENAI)] += int(keys)
    keys_of[OPENAI] += max(0, total - sum(keys_of.values()))
    return keys_of


def _model_args(model: str) -> tuple[str, str]:
    """The get script's model arguments: the model, and its name without a dated
    snapshot's suffix ("" when it has none), so Lua applies ``keys.lists_model``."""
    base = snapshot_base(model)
    return model, "" if base == model else base


def _listing(model_ids: Iterable[str]) -> tuple[str, list[str]]:
    """The id of a key's listed model ids in Redis (a digest: keys listing the same
    ids share one index per family and class) and the ids, sorted."""
    ids = sorted(set(model_ids))
    return hashlib.sha256("\n".join(ids).encode()).hexdigest()[:16], ids


def _listed_state(key: KeyState) -> str:
    """The List state (active, locked, disabled) a key is listed under."""
    if key.is_disabled:
        return "disabled"
    return "locked" if key.locked else "active"


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _pairs(items: Sequence[Any]) -> dict[str, str]:
    """A flat name, value, ... reply as a dict (a hash's fields are all bulk strings)."""
    try:
        return {n.decode(): v.decode() for n, v in zip(items[::2], items[1::2], strict=True)}
    except AttributeError:  # an integer among them
        return {_text(items[i]): _text(items[i + 1]) for i in range(0, len(items), 2)}


class RedisBackend:
    """A pool backend whose state is in Redis (``PoolBackend``)."""

    def __init__(
        self,
        client: Redis,
        *,
        models: ModelTable,
        prefix: str = DEFAULT_PREFIX,
        timeout: float = DEFAULT_TIMEOUT,
        allowed_families: frozenset[str] | None = None,
        reuse_delay: float = KEY_REUSE_DELAY,
        observer: PoolObserver | None = None,
        now: Callable[[], float] | None = None,
        on_failure: Callable[[str], None] | None = None,
        time_scale: float = 1.0,
    ) -> None:
        """Args:
        client: a ``redis.asyncio.Redis`` for the pool's server.
        models: the model → family table.
        prefix: the pool's name on that server; two prefixes are two pools.
        timeout: seconds a call may spend on Redis before ``StoreUnavailable``.
        allowed_families: families the operator allows; None allows all.
        reuse_delay: seconds a key is held back after being handed out.
        observer: told of hand-outs, token usage and key state changes.
        now: for tests only: the time the scripts use instead of Redis's ``TIME``.
        on_failure: told of every call that fails on Redis (``timeout`` or
            ``connection``), as it raises ``StoreUnavailable`` (a replica's metrics).
        time_scale: for the allocation simulator only, with ``now``: the pool's seconds
            (``max_wait``, unlock times) that pass per real second while a Get waits.
        """
        self._client = client
        self._models = models
        self._prefix = prefix
        self._timeout = timeout
        self._allowed = allowed_families
        self._reuse_delay = reuse_delay
        self._observer: PoolObserver = observer or NullObserver()
        self._now = now
        self._on_failure = on_failure or _ignore
        self._time_scale = time_scale
        #: KeyProfiles by a record's families and trial flag (``_profile``).
        self._profiles: dict[tuple[bytes, bool], KeyProfile] = {}
        #: The keys this replica holds a secret for, by hash.
        self._secrets: dict[str, tuple[str, str]] = {}
        #: This replica's configured keys (its key list; not the organization clones).
        self._configured: dict[str, str] = {}
        #: The id of the key list whose held set is complete in Redis ("" none yet): a
        #: Get chooses among its keys. ``_hold_pending``: the list changed since.
        self._held = ""
        self._hold_pending = True
        #: add script arguments of keys not registered in Redis yet (it did not answer).
        self._unregistered: list[str] = []
        #: Waiting Gets, per (family, embeddings, model), first come first served; the
        #: first of each asks Redis, woken by ``_woken`` (pub/sub) or its unlock time.
        #: Per model: keys whose listed ids lack a model must not hold up its waiters.
        self._waiting: dict[tuple[str, bool, str], deque[asyncio.Future[None]]] = {}
        self._woken: asyncio.Future[None] | None = None
        self._listener: asyncio.Task[None] | None = None
        split = [f for f in models.families if provider(models.provider_of(f)).split_token_budgets]
        #: Script calls go to Redis in batches (one write and one read for many calls).
        self._pipeline = AutoPipeline(client)
        self._scripts: dict[str, AsyncScript] = {
            name: client.register_script(_program(_script_text(f"{name}.lua"), split))
            for name in (
                "add",
                "get",
                "disable",
                "available",
                "list",
                "report",
                "recheck",
                "check",
                "view",
                "lease",
                "census",
                "hold",
                "lacking",
                "sweep",
            )
        }

    # -- plumbing --------------------------------------------------------------------

    async def _run(self, name: str, *args: str | float, timeout: float | None = None) -> Any:
        """One script call, bounded by the timeout; any failure is ``StoreUnavailable``."""
        if (self._unregistered or not self._held) and name not in ("add", "hold", "lacking"):
            raise StoreUnavailable("this replica's keys are not in the shared pool yet")
        now = "" if self._now is None else repr(self._now())
        argv = [self._prefix, now, repr(self._reuse_delay), *args]
        script = self._scripts[name]
        return await self._bounded(
            lambda left: self._pipeline.run(script, argv, left), timeout, bounds_itself=True
        )

    async def _bounded(
        self,
        call: Callable[[float], Awaitable[_R]],
        timeout: float | None,
        *,
        bounds_itself: bool = False,
    ) -> _R:
        """``call(timeout)`` within ``timeout``, by default what the RPC's budget has
        left (or the whole timeout outside one); any failure is ``StoreUnavailable``.
        ``bounds_itself``: the call raises TimeoutError at its timeout by itself."""
        budget = _budget.get()
        if timeout is None:
            timeout = self._timeout if budget is None else budget.left
        if timeout <= 0.0:
            raise StoreUnavailable(f"the call spent its {self._timeout:g} s on Redis")
        loop = asyncio.get_running_loop()
        started = loop.time()
        try:
            if bounds_itself:
                return await call(timeout)
            async with asyncio.timeout(timeout):
                return await call(timeout)
        except TimeoutError:
            self._on_failure("timeout")
            raise StoreUnavailable(f"no answer within {timeout:g} s") from None
        except redis_errors.TimeoutError:
            self._on_failure("timeout")
            raise StoreUnavailable("TimeoutError") from None
        except (redis_errors.ConnectionError, OSError) as exc:
            self._on_failure("connection")
            raise StoreUnavailable(type(exc).__name__) from None
        finally:
            if budget is not None:
                budget.left -= loop.time() - started

    def _key(self, view: Sequence[Any]) -> Key:
        """A Key from a script's view of one key (pool.lua's key_view: its hash, its
        record's ``_RECORD_VIEW`` fields, its family states' ``_STATE_VIEW`` fields,
        its usage). Its profile has no model ids (the scripts choose by them; no
        message shows them). Built for every Get's reply: values are read by
        position, and numbers straight from the bytes Redis sent."""
        key_hash = _text(view[0])
        fams, trial, org, clone, dis, rev, oq, reason, dat, oqu, lu, lc, pc, revive, _ = view[1]
        clone_of = _text(clone) if clone else ""
        local = self._secrets.get(key_hash) or self._secrets.get(clone_of)
        # An organization clone (made by whichever replica checks keys) has its parent's secret.
        secret, organization_id = local or ("", "")
        book = RateBook()
        book.add_row(0)
        key = Key(
            secret=secret,
            hash=key_hash,
            profile=self._profile(fams or b"", trial == b"1"),
            # Its row in its own book; the load position is in the record.
            seq=0,
            service=identity_of_hash(key_hash).name,
            organization_id=_text(org) if org is not None else organization_id,
            is_disabled=dis == b"1",
            is_revoked=rev == b"1",
            is_over_quota=oq == b"1",
            disable_reason=DisableReason(_text(reason)) if reason else None,
            disabled_at=float(dat) if dat else 0.0,
            over_quota_until=float(oqu) if oqu else 0.0,
            last_used=float(lu) if lu else 0.0,
            last_checked=float(lc) if lc else 0.0,
            prompt_count=int(pc) if pc else 0,
            revive_if_alive=revive == b"1",
            cloned_from=clone_of,
            book=book,
        )
        rows = view[2]
        for i in range(0, len(rows), 2):
            table = book.table(_text(rows[i]))
            *values, flags = rows[i + 1]
            for column, value in zip(_STATE_COLUMNS, values, strict=True):
                if value is not None:
                    getattr(table, column)[0] = float(value)
            table.flags[0] = int(float(flags or 0)) | HAS_STATE
        usage = view[3]
        for i in range(0, len(usage), 2):
            book.add_usage(0, _text(usage[i]), int(usage[i + 1]))
        return key

    def _profile(self, families: bytes, is_trial: bool) -> KeyProfile:
        """The profile of a record's ``fams`` and ``trial``, one per distinct pair (Keys
        with equal profiles share one, as in memory): a Get's reply builds no new one."""
        profile = self._profiles.get((families, is_trial))
        if profile is None:
            if len(self._profiles) >= _PROFILES_KEPT:
                self._profiles.clear()
            names = families.decode().split(",")
            profile = KeyProfile(frozenset(f for f in names if f), is_trial)
            self._profiles[(families, is_trial)] = profile
        return profile

    def _secret_for(self, key: Key) -> Key:
        """A key handed out must be one this replica holds the secret of."""
        if not key.secret:
            raise StoreUnavailable(
                f"the shared pool handed out {key.hash}, whose secret this replica does not hold"
            )
        return key

    def _info(self, model: str) -> tuple[str, bool]:
        check_model(model)
        info = self._models.lookup(model)
        if self._allowed is not None and info.family not in self._allowed:
            raise FamilyDisallowed(info.family, model)
        return info.family, info.embeddings

    @staticmethod
    def _check_hash(key_hash: str) -> None:
        if not key_hash:
            raise InvalidArgument("hash", "is required")
        if not HASH_PATTERN.fullmatch(key_hash):
            raise InvalidArgument("hash", "is not a key hash (they look like oai-0123abcd)")

    # -- keys ------------------------------------------------------------------------

    async def add_keys(self, secrets: Iterable[str], *, profile: KeyProfile | None = None) -> int:
        """Registers this replica's keys; keys already in the pool keep their state.

        ``profile``: what the new keys serve; by default the model table's default
        families of each key's provider, not trial (an unchecked key).

        Returns:
            How many keys were new to the pool.

        Raises:
            StoreUnavailable: Redis did not answer; ``ping`` registers them when it does.
        """
        hashes: list[str] = []
        for secret in secrets:
            key_hash = hash_key(secret)
            if key_hash in self._configured:
                continue
            self._configured[key_hash] = secret
            self._hold_pending = True
            if self._secrets.get(key_hash) != (secret, ""):
                self._secrets[key_hash] = (secret, "")
                hashes.append(key_hash)
        self._unregistered += self._add_args(hashes, profile)
        return await self._register()

    def _add_args(self, hashes: Iterable[str], profile: KeyProfile | None = None) -> list[str]:
        """The add script's arguments for new keys of ``profile`` (None: unchecked keys,
        with the model table's default families of each key's provider)."""
        trial = "1" if profile is not None and profile.is_trial else "0"
        new_key = {}  # per provider: families, has gpt4-32k
        for name in provider_names():
            families = self._models.default_key_families(name)
            if profile is not None:
                families = profile.families
            new_key[name] = (",".join(sorted(families)), "1" if GPT4_32K in families else "0")
        args: list[str] = []
        for key_hash in hashes:
            fams, c32 = new_key[identity_of_hash(key_hash).name]
            args += [key_hash, fams, trial, c32, "", ""]
        return args

    async def _register(self) -> int:
        """Holds this replica's key list, then adds its keys not in the pool yet (a Get
        chooses among its keys from then on) and logs the pool's keys it lacks. The
        list is held first so that a sweep (``sweep``) never finds a key just added
        in no list."""
        # At start-up and reload, not in an RPC: a batch may take longer than one.
        timeout = max(self._timeout, 10.0)
        held = ""
        if self._hold_pending:
            hashes = sorted(self._configured)
            held = hashlib.sha256("\n".join(hashes).encode()).hexdigest()[:16]
            for start in range(0, len(hashes), _ADD_BATCH):
                batch = hashes[start : start + _ADD_BATCH]
                await self._run("hold", held, _HELD_TTL_MS, *batch, timeout=timeout)
        added = 0
        while self._unregistered:
            batch = self._unregistered[: 6 * _ADD_BATCH]
            added += len(await self._run("add", *batch, timeout=timeout))
            del self._unregistered[: len(batch)]
        if held:
            self._held, self._hold_pending = held, False
            # Keys no longer configured (and their clones) are not handed out from now on.
            kept = set(self._configured.values())
            for key_hash in [h for h, (secret, _) in self._secrets.items() if secret not in kept]:
                del self._secrets[key_hash]
            await self._log_lacking(timeout)
        return added

    async def _log_lacking(self, timeout: float) -> None:
        """Logs the hashes of the pool's keys this replica cannot hand out (by hash only)."""
        lacking: list[str] = []
        after = "0"
        try:
            while True:
                answer = await self._run("lacking", self._held, after, _ADD_BATCH, timeout=timeout)
                lacking += [_text(h) for h in answer[1:]]
                if not _text(answer[0]):
                    break
                after = _text(answer[0])
        except StoreUnavailable as exc:
            _log.warning(
                "cannot tell which keys of the shared pool this replica lacks",
                extra={"problem": exc.problem},
            )
            return
        if lacking:
            _log.warning(
                "this replica lacks keys of the shared pool: it does not hand them out",
                extra={
                    "lacking": len(lacking),
                    "hashes": ",".join(lacking[:_LACKING_LOGGED]),
                },
            )

    async def ping(self) -> bool:
        """Whether Redis answers within the timeout; the first time it does after it did
        not, this replica's keys not registered yet are. Renews this replica's key list
        in Redis (held again if it lapsed while Redis did not hear from it)."""
        try:
            if self._unregistered or self._hold_pending:
                added = await self._register()
                _log.info("keys registered in the shared pool", extra={"new_keys": added})
            async with asyncio.timeout(self._timeout):
                await self._client.ping()
            if self._configured and not await self._run("hold", self._held, _HELD_TTL_MS):
                # Nobody renewed the list for an hour: a sweep may have removed its keys.
                # Held again, then added again (keys still in the pool keep their state).
                self._unregistered += self._add_args(self._configured)
                self._hold_pending = True
                await self._register()
        except (StoreUnavailable, TimeoutError, redis_errors.RedisError, OSError):
            return False
        return True

    # -- PoolBackend -------------------------------------------------------------------

    @property
    def timeout(self) -> float:
        """Seconds one RPC may spend on Redis, retries included."""
        return self._timeout

    @property
    def observer(self) -> PoolObserver:
        return self._observer

    def snapshot_source(self) -> SnapshotSource:
        raise NotImplementedError("a shared pool is read by census(), not walked")

    async def census(self, *, listed: int = 0) -> PoolSnapshot:
        """The shared pool at a glance, for the status page and /metrics, without a walk
        over its keys: per family, keys active, locked and trial from the selection
        indexes (a few ZCARD/ZCOUNT per family), tokens from the counter the reports
        keep, and disabled, revoked and over-quota keys from a walk over the disabled
        keys only (``_CENSUS_BATCH`` a call). With ``listed``, the first ``listed`` keys
        of each state among the first ``_CENSUS_LISTED`` in load order.

        A key locked in some of its families is locked there and active in the others;
        a key-wide count (the provider row, each list's count) of locked or trial keys
        is the most of any one family: at least that many keys are locked.

        Raises:
            StoreUnavailable: Redis did not answer one of the calls.
        """
        started = time.perf_counter()
        families = self._models.families
        answer = await self._run("census", "counts", *families)
        now = float(_text(answer[0]))
        total, disabled = int(answer[1]), int(answer[2])
        summaries = {f: FamilySummary(f) for f in families}

        def summary(family: str) -> FamilySummary:
            found = summaries.get(family)
            if found is None:
                found = summaries[family] = FamilySummary(family)
            return found

        for family, tokens in _pairs(answer[3]).items():
            summary(family).tokens = int(tokens)
        busiest = dict.fromkeys(COUNTED_STATES, 0)
        # Per provider, as pool-wide below (a key's families are all its provider's).
        keys_of = _provider_keys(_pairs(answer[-1]), total)
        rows = {name: dict.fromkeys(COUNTED_STATES, 0) for name in keys_of}
        for family, row in zip(families, answer[4:-1], strict=True):
            item = summaries[family]
            active, locked, trial = int(row[0]), int(row[1]), int(row[2])
            item.counts.update(active=active, locked=locked, trial=trial)
            until = float(_text(row[3]))
            item.lockout = max(0.0, until - now) if until else 0.0
            for counted in (busiest, rows[self._models.provider_of(family)]):
                counted["locked"] = max(counted["locked"], locked)
                counted["trial"] = max(counted["trial"], trial)
        cursor = "0"
        while True:
            batch = await self._run("census", "disabled", cursor, str(_CENSUS_BATCH))
            cursor = _text(batch[0])
            for fams, revoked, over_quota, key_hash in batch[1:]:
                rev, oq = int(_text(revoked) == "1"), int(_text(over_quota) == "1")
                for counted in (busiest, rows[identity_of_hash(_text(key_hash)).name]):
                    counted["disabled"] += 1
                    counted["revoked"] += rev
                    counted["over_quota"] += oq
                for family in filter(None, _text(fams).split(",")):
                    counts = summary(family).counts
                    counts["disabled"] += 1
                    counts["revoked"] += rev
                    counts["over_quota"] += oq
            if cursor == "0":
                break
        busiest["disabled"] = disabled
        busiest["active"] = max(0, total - disabled - busiest["locked"])
        for name, counted in rows.items():
            counted["active"] = max(0, keys_of[name] - counted["disabled"] - counted["locked"])
        lists: list[KeyList] = []
        if listed > 0:
            page = await self._run("list", "0", str(_CENSUS_LISTED))
            views = [key_state(self._key(view), now) for view in page[2:]]
            counts = {"active": busiest["active"], "locked": busiest["locked"]}
            counts["disabled"] = disabled
            for state in LISTED_STATES:
                found = [v for v in views if _listed_state(v) == state.value][:listed]
                lists.append(KeyList(state.value, counts[state.value], tuple(found)))
        return PoolSnapshot(
            taken_at=now,
            total_keys=total,
            summaries=tuple(sorted(summaries.values(), key=lambda item: item.family)),
            lists=tuple(lists),
            walk_seconds=time.perf_counter() - started,
            providers={name: rows[name] for name in rows if keys_of[name]},
        )

    @_one_rpc
    async def get(
        self,
        model: str,
        max_wait: float = 0.0,
        *,
        time_left: float | None = None,
        caller: str = "",
    ) -> Key:
        check_model(model)
        if not 0.0 <= max_wait <= MAX_WAIT:
            raise InvalidArgument("max_wait", f"must be between 0 and {MAX_WAIT:g} seconds")
        family, embeddings = self._info(model)
        kind = "1" if embeddings else "0"
        if max_wait == 0.0:  # a plain Get never refuses: the key that unlocks first
            answer = await self._run(
                "get", family, kind, "get", self._held, caller, *_model_args(model)
            )
            return self._handed_out(answer, family, model)
        if time_left is not None:
            max_wait = max(0.0, min(max_wait, time_left - rules.DEADLINE_MARGIN))
        if max_wait > 0.0:
            key, caller = await self._wait_for_key(family, embeddings, model, max_wait, caller)
            if key is not None:
                return key
        # The wait ran out (or the deadline left none): a free key, else KEYS_BUSY, as
        # in memory (KeyPool.get_waiting says why).
        answer = await self._run(
            "get", family, kind, "free", self._held, caller, *_model_args(model)
        )
        if _text(answer[0]) != "until":
            return self._handed_out(answer, family, model)
        raise KeysBusy(family, model, max(0.0, float(_text(answer[1])) - float(_text(answer[2]))))

    async def _wait_for_key(
        self, family: str, embeddings: bool, model: str, max_wait: float, caller: str
    ) -> tuple[Key | None, str]:
        """A free key as soon as there is one, within ``max_wait``; None at the deadline.
        The first script call takes back the room held for ``caller`` (the caller
        is returned as "" once it has).

        Waiters of one model in this replica take turns in arrival order; only the
        first asks Redis. It is woken at the earliest unlock time Redis
        reports, and when any replica publishes that a key may have come free (a
        report, a Recheck, new keys); nothing is polled. Across replicas no order
        holds: each replica's first waiter competes with the others' for the key.
        """
        loop = asyncio.get_running_loop()
        scale = self._time_scale
        deadline = loop.time() + max_wait / scale
        queue = self._waiting.setdefault((family, embeddings, model), deque())
        turn: asyncio.Future[None] = loop.create_future()
        queue.append(turn)
        if queue[0] is turn:
            turn.set_result(None)
        self._listen()
        try:
            while (left := deadline - loop.time()) > 0.0:
                if not turn.done():
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(asyncio.shield(turn), left)
                    continue
                woken = self._next_wake()
                kind = "1" if embeddings else "0"
                answer = await self._run(
                    "get", family, kind, "free", self._held, caller, *_model_args(model)
                )
                caller = ""
                if _text(answer[0]) != "until":
                    return self._handed_out(answer, family, model), caller
                wait = (float(_text(answer[1])) - float(_text(answer[2]))) / scale
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(asyncio.shield(woken), min(max(wait, 0.001), left))
            return None, caller
        finally:
            queue.remove(turn)
            if queue and not queue[0].done():
                queue[0].set_result(None)
            if not queue:
                del self._waiting[(family, embeddings, model)]

    def _listen(self) -> None:
        """Starts the subscription to the pool's wake-ups (once)."""
        if self._listener is None or self._listener.done():
            self._listener = asyncio.get_running_loop().create_task(self._subscribe())

    async def _subscribe(self) -> None:
        """Wakes the waiters on every wake-up published; resubscribes after Redis comes back."""
        channel = f"{{{self._prefix}}}:wake"
        while self._waiting:
            pubsub = self._client.pubsub()
            try:
                await pubsub.subscribe(channel)
                self._wake()  # a wake-up may have been missed while not subscribed
                while self._waiting:
                    message = await pubsub.get_message(ignore_subscribe_messages=True, timeout=1.0)
                    if message is not None:
                        self._wake()
            except (redis_errors.RedisError, OSError):
                await asyncio.sleep(0.5)
            finally:
                with contextlib.suppress(redis_errors.RedisError, OSError):
                    await pubsub.aclose()  # type: ignore[no-untyped-call]

    def _next_wake(self) -> asyncio.Future[None]:
        if self._woken is None:
            self._woken = asyncio.get_running_loop().create_future()
        return self._woken

    def _wake(self) -> None:
        woken, self._woken = self._woken, None
        if woken is not None:
            woken.set_result(None)

    def _handed_out(self, answer: Sequence[Any], family: str, model: str) -> Key:
        if _text(answer[0]) == "none":
            raise NoKeysForFamily(family, model)
        key = self._secret_for(self._key(answer[2]))
        self._observer.handed_out(family)
        return key

    @_one_rpc
    async def lockout_period(self, model: str, *, caller: str = "") -> float:
        model = model or DEFAULT_LOCKOUT_MODEL
        check_model(model)
        info = self._models.lookup(model)
        if self._allowed is not None and info.family not in self._allowed:
            return 0.0
        answer = await self._run(
            "get",
            info.family,
            "1" if info.embeddings else "0",
            "peek",
            self._held,
            caller,
            *_model_args(model),
        )
        if _text(answer[0]) == "none":
            return 0.0
        return max(0.0, float(_text(answer[1])) - float(_text(answer[2])))

    def _now_here(self) -> float:
        """This replica's time (the test clock's, if given): for reading an answer's
        reset times and a spend limit's month; every lock is on Redis's."""
        return self._now() if self._now is not None else time.time()

    def _parse(self, key_hash: str, headers: Mapping[str, str], now: float) -> RateHeaders | None:
        """The rate-limit headers of an answer for ``key_hash``, read by its provider."""
        service = identity_of_hash(key_hash).name
        return parse_rate_headers(
            Key("", key_hash, KeyProfile(frozenset()), 0, service), headers, now
        )

    async def _report(
        self,
        key_hash: str,
        model: str,
        mode: str,
        parsed: RateHeaders | None = None,
        *,
        read_at: float | None = None,
        rate_limited: bool = False,
        kind: str = "",
        why: str = "",
        count: bool = False,
        tokens: int = 0,
        split_tokens: tuple[int, int] = (0, 0),
        backoff: str = "",
        deny_family: bool = False,
        disable: DisableReason | None = None,
        quota_until: float | None = None,
    ) -> tuple[bool, str, str, Key, float | None, str]:
        """One report script call (its ARGV is described in report.lua). Returns whether
        it was the first 429 since the hand-out, the disable change, the family counted,
        the key, the provider's back-off (None: none) and the family the key left ("" none).
        """
        family = self._models.family(model) if model else ""
        service = identity_of_hash(key_hash).name
        headers: list[str] = ["0", "", "", "", "", "", ""]
        split_headers: list[str] = ["", "", "", "", "", "", ""]
        if parsed is not None:
            headers = [
                "1",
                _num(parsed.requests_reset),
                _num(parsed.tokens_reset),
                _num(parsed.remaining_requests),
                _num(parsed.remaining_tokens),
                _num(parsed.limit_requests),
                _num(parsed.limit_tokens),
            ]
            split_headers = [
                _num(parsed.input_reset),
                _num(parsed.remaining_input),
                _num(parsed.limit_input),
                _num(parsed.output_reset),
                _num(parsed.remaining_output),
                _num(parsed.limit_output),
                _num(parsed.retry_after),
            ]
        times = provider(service).reset_times and read_at is not None
        answer = await self._run(
            "report",
            key_hash,
            "1" if model else "0",
            family,
            mode,
            *headers,
            "1" if rate_limited else "0",
            kind,
            "1" if count else "0",
            str(tokens),
            disable.value if disable is not None else "",
            *split_headers,
            _num(read_at) if times else "",
            str(split_tokens[0]),
            str(split_tokens[1]),
            service,
            backoff,
            "1" if deny_family else "0",
            _num(quota_until),
        )
        if _text(answer[0]) == "missing":
            raise KeyNotFound(key_hash)
        key = self._key(answer[5])
        first, change, counted = _text(answer[1]) == "1", _text(answer[2]), _text(answer[4])
        wait = float(_text(answer[6])) if _text(answer[6]) else None
        denied = _text(answer[7])
        if first:
            reason = f"upstream answered 429 for {model}" if model else "upstream answered 429"
            self._state_changed(key, KeyChange.RATE_LIMITED, why or reason)
        if count:
            self._observer.tokens_used(counted, tokens)
        if change:
            assert disable is not None
            self._state_changed(key, _CHANGES[change], disable.value)
        return first, change, counted, key, wait, denied

    async def _exists(self, key_hash: str) -> bool:
        name = f"{{{self._prefix}}}:key:{key_hash}"
        return bool(await self._bounded(lambda _: self._client.exists(name), None))

    async def _checked(self, key_hash: str, check: Callable[[], None]) -> None:
        """Runs the input checks after the key's own: a missing key is reported first."""
        self._check_hash(key_hash)
        try:
            check()
        except InvalidArgument:
            if not await self._exists(key_hash):
                raise KeyNotFound(key_hash) from None
            raise

    @_one_rpc
    async def mark_rate_limited(self, key_hash: str, model: str = "") -> None:
        await self._checked(key_hash, lambda: check_model(model) if model else None)
        await self._report(key_hash, model, "mark")

    @_one_rpc
    async def update_rate_limits(
        self, key_hash: str, headers: Mapping[str, str], model: str = ""
    ) -> None:
        def check() -> None:
            check_headers(headers)
            if model:
                check_model(model)

        await self._checked(key_hash, check)
        now = self._now_here()
        parsed = self._parse(key_hash, headers, now)
        await self._report(key_hash, model, "update", parsed, read_at=now)

    @_one_rpc
    async def increment_usage(self, key_hash: str, model: str, tokens: int) -> None:
        def check() -> None:
            check_model(model)
            if not 0 <= tokens <= Limits.TOKENS:
                raise InvalidArgument("tokens", f"must be between 0 and {Limits.TOKENS}")

        await self._checked(key_hash, check)
        await self._report(key_hash, model, "usage", count=True, tokens=tokens)

    @_one_rpc
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
        def check() -> None:
            if model:
                check_model(model)
            check_headers(headers)
            if not 100 <= status <= 599:
                raise InvalidArgument("status", "must be an HTTP status code (100 to 599)")
            for name, value in (("error_type", error.type), ("error_code", error.code)):
                if len(value) > Limits.ERROR_NAME_LENGTH:
                    raise InvalidArgument(
                        name, f"is longer than {Limits.ERROR_NAME_LENGTH} characters"
                    )
            if len(error.message) > Limits.ERROR_MESSAGE_LENGTH:
                raise InvalidArgument(
                    "error_message", f"is longer than {Limits.ERROR_MESSAGE_LENGTH} characters"
                )
            for name, tokens in (
                ("prompt_tokens", prompt_tokens),
                ("completion_tokens", completion_tokens),
            ):
                if not 0 <= tokens <= Limits.TOKENS:
                    raise InvalidArgument(name, f"must be between 0 and {Limits.TOKENS}")

        await self._checked(key_hash, check)
        service = identity_of_hash(key_hash).name
        now = self._now_here()
        decision = provider(service).decide(status, error, now=now)
        parsed = self._parse(key_hash, headers, now)
        backoff = ""
        if decision.overloaded:
            backoff = "overloaded"
        elif 200 <= status < 300:
            backoff = "succeeded"
        _, _, _, key, wait, denied = await self._report(
            key_hash,
            model,
            "outcome",
            parsed,
            read_at=now,
            rate_limited=decision.rate_limited,
            kind=decision.limit_kind,
            why=decision.why,
            count=decision.count_usage,
            tokens=min(prompt_tokens + completion_tokens, Limits.TOKENS),
            split_tokens=(prompt_tokens, completion_tokens),
            backoff=backoff,
            deny_family=decision.family_denied,
            disable=decision.disable,
            quota_until=decision.quota_until,
        )
        if wait is not None:
            # The provider's trouble, not the key's: the key is left as it is.
            decision = replace(decision, retry_after=wait)
            self._observer.provider_overloaded(service)
            _log.info(
                "provider overloaded; backing off",
                extra={"provider": service, "key_hash": key_hash, "wait": round(wait, 3)},
            )
        if denied:
            _log.warning(
                "key denied a model family",
                extra={"key_hash": key_hash, "family": denied, "reason": decision.why},
            )
        self._observer.outcome_reported(decision.action.value)
        return decision, key

    @_one_rpc
    async def disable(self, key_hash: str, reason: DisableReason) -> Key:
        self._check_hash(key_hash)
        answer = await self._run("disable", key_hash, reason.value)
        if _text(answer[0]) == "missing":
            raise KeyNotFound(key_hash)
        key = self._key(answer[3])
        change = _text(answer[1])
        if change:
            self._state_changed(key, _CHANGES[change], reason.value)
        return key

    async def sweep(self) -> list[str]:
        """Removes the keys that no replica's key list holds any more (every replica that
        held them dropped them on a reload, or has not renewed its list for an hour) from
        the shared pool, with their state, as the memory backend removes a key a reload
        drops. ``SWEEP_BATCH`` keys per script call, each call with the whole timeout;
        nothing is removed while no list is held. Returns the hashes removed."""
        removed: list[str] = []
        after = "0"
        while after:
            answer = await self._run("sweep", after, SWEEP_BATCH)
            after = _text(answer[0])
            removed += [_text(h) for h in answer[1:]]
        if removed:
            _log.info(
                "keys no replica holds removed from the shared pool",
                extra={"removed": len(removed), "hashes": ",".join(removed[:_LACKING_LOGGED])},
            )
        return removed

    async def recheck(self, *, until_checked: bool = False) -> None:
        """Marks every key for recheck, ``RECHECK_BATCH`` keys per script call so no call
        holds Redis for the whole pool. Each call has the whole timeout (100k keys are
        200 calls). Not atomic as a whole: a Get meanwhile may see some keys done; a
        failure leaves the rest as they were, and calling again finishes it."""
        after = "0"
        while after:
            answer = await self._run("recheck", "1" if until_checked else "0", after, RECHECK_BATCH)
            after = _text(answer)
        _log.info("all keys marked for recheck")

    @_one_rpc
    async def available(self) -> int:
        return int(await self._run("available"))

    @_one_rpc
    async def list_keys(self, page_token: str, page_size: int, key_filter: KeyFilter) -> KeyPage:
        after = self._resume_position(page_token, key_filter)
        answer = await self._run("list", repr(after), max(page_size, _LIST_SCAN))
        now = float(_text(answer[0]))
        want = key_filter.predicate(now)
        keys: list[Key] = []
        last = after
        for view in answer[2:]:
            key = self._key(view)
            last = float(view[1][_SEQ_AT])
            if want(key):
                keys.append(key)
                if len(keys) == page_size:
                    break
        more = len(answer) - 2 == max(page_size, _LIST_SCAN) or len(keys) == page_size
        token = self._token(key_filter, last) if more and last != after else ""
        return KeyPage(keys, token)

    def _token(self, key_filter: KeyFilter, after: float) -> str:
        text = f"r1.{self._prefix}.{key_filter.value}.{int(after)}"
        return base64.urlsafe_b64encode(text.encode()).decode().rstrip("=")

    def _resume_position(self, token: str, key_filter: KeyFilter) -> float:
        if not token:
            return 0.0
        try:
            text = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4)).decode()
            version, prefix, state, after = text.split(".")
            position = int(after)
        except ValueError:
            raise InvalidArgument("page_token", "is not a page token of this pool") from None
        if version != "r1" or prefix != self._prefix or position < 0:
            raise InvalidArgument("page_token", "is not a page token of this pool")
        if state != key_filter.value:
            raise InvalidArgument("page_token", "was made for another state filter")
        return float(position)

    async def keys(self) -> list[Key]:
        keys: list[Key] = []
        token = ""
        while True:
            page = await self.list_keys(token, _LIST_SCAN, KeyFilter.ALL)
            keys.extend(page.keys)
            if not page.next_page_token:
                return keys
            token = page.next_page_token

    @_one_rpc
    async def key(self, key_hash: str) -> Key:
        self._check_hash(key_hash)
        answer = await self._run("view", key_hash)
        if _text(answer[0]) == "missing":
            raise KeyNotFound(key_hash)
        return self._key(answer[1])

    @_one_rpc
    async def apply_check(
        self,
        key_hash: str,
        *,
        model_ids: Iterable[str] | None,
        is_trial: bool,
        organization_id: str | None = None,
    ) -> Key:
        """Records a check that found the key alive. With ``model_ids``, the key serves
        their families, and only the models among them (or dated snapshots of them),
        as in memory; None (the list could not be read) keeps what the pool knows."""
        self._check_hash(key_hash)
        service = identity_of_hash(key_hash).name
        families, listing = "", ""
        ids: list[str] = []
        if model_ids is not None:
            listing, ids = _listing(model_ids)
            families = ",".join(sorted(self._models.listed_families(ids, service)))
        answer = await self._run(
            "check",
            key_hash,
            "alive",
            families,
            "1" if is_trial else "0",
            "0" if organization_id is None else "1",
            organization_id or "",
            listing,
            *ids,
        )
        if _text(answer[0]) == "missing":
            raise KeyNotFound(key_hash)
        key = self._key(answer[4])
        if _text(answer[2]) == "1":
            _log.info("key alive again after recheck", extra={"key_hash": key.hash})
        return key

    @_one_rpc
    async def apply_dead_check(self, key_hash: str, reason: DisableReason) -> Key:
        self._check_hash(key_hash)
        answer = await self._run("check", key_hash, "dead", reason.value)
        if _text(answer[0]) == "missing":
            raise KeyNotFound(key_hash)
        key = self._key(answer[4])
        change = _text(answer[1])
        if change:
            self._state_changed(key, _CHANGES[change], reason.value)
        return key

    @_one_rpc
    async def clone_for_org(self, key_hash: str, organization_id: str) -> Key | None:
        """Adds an unchecked clone of a key for another of its organizations (the
        replica must hold the parent's secret); None when the pool has it already."""
        parent = await self.key(key_hash)
        if not organization_id:
            raise InvalidArgument("organization_id", "is required")
        if not parent.secret:
            raise KeyNotFound(key_hash)
        clone_hash = hash_key(parent.secret, organization_id)
        self._secrets[clone_hash] = (parent.secret, organization_id)
        families = self._models.default_key_families()
        c32 = "1" if GPT4_32K in families else "0"
        added = await self._run(
            "add", clone_hash, ",".join(sorted(families)), "0", c32, organization_id, parent.hash
        )
        if not added:
            return None
        clone = await self.key(clone_hash)
        self._state_changed(
            clone, KeyChange.CLONED, f"key belongs to organization {organization_id}"
        )
        return clone

    async def hold_lease(self, holder: str, seconds: float, name: str = "checker") -> bool:
        """Takes or renews the lease ``name`` for ``holder``; whether it holds it now.

        One replica at a time does what a lease is for (``checker``: checks keys;
        ``sweeper``: ``sweep``); a holder that dies loses the lease ``seconds`` later
        and another takes it over."""
        try:
            return bool(await self._run("lease", holder, str(int(seconds * 1000)), name))
        except StoreUnavailable:
            return False

    async def sync_keys(self, secrets: Sequence[str]) -> KeySync:
        """Makes this replica's key list ``secrets``. Keys it no longer has stay in the
        shared pool (other replicas may hold them); this one stops handing them out."""
        wanted = {hash_key(secret): secret for secret in secrets}
        removed = [h for h in self._configured if h not in wanted]
        for key_hash in removed:
            del self._configured[key_hash]
            self._hold_pending = True
        added = await self.add_keys(wanted.values())
        return KeySync(added, len(removed), len(self._secrets))

    async def flush(self) -> None:
        """Nothing to do: every call is in Redis when it returns (durability is Redis's)."""

    async def aclose(self) -> None:
        """Closes the connection to Redis."""
        if self._listener is not None:
            self._listener.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._listener
        await self._pipeline.aclose()
        await self._client.aclose()

    def _state_changed(self, key: Key, change: KeyChange, reason: str) -> None:
        event, level = CHANGE_LOGS[change]
        _log.log(level, event, extra={"key_hash": key.hash, "reason": reason})
        self._observer.state_changed(key.hash, change, reason)
