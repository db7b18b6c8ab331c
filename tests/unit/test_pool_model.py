"""The indexed pool against a brute-force model of the selection rules.

Hypothesis drives random sequences of every pool operation over keys of mixed
profiles; after each step, Get and GetLockoutPeriod must agree with a plain
sort-based reference of the documented order. The reference keeps its own copy
of each key's rate-limit inputs (per family and key-wide) and derives the locks
itself, so the pool's bookkeeping, its lock rule and its indexes are all checked.

Locks are derived when a state changes (a hand-out, a report), so the reference
notes, per state, when it was last derived and the token reservation in force
then; the budget it computes from those is its own arithmetic.

The pool is mixed: OpenAI keys answered with x-ratelimit-* headers (Go-duration
resets), Anthropic keys with anthropic-ratelimit-{requests,tokens,input-tokens,
output-tokens}-* (RFC 3339 reset times) and retry-after, 429s that do not say
which limit they hit, 529 overloaded (the key untouched), and spend-limit 429s
that bench the key until the time they name. Claude families keep input and
output tokens as budgets of their own.
"""

from __future__ import annotations

import math
from array import array
from dataclasses import dataclass, field
from datetime import UTC, datetime

from hypothesis import event, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from keysvc.errors import NoKeysForFamily
from keysvc.keys import DisableReason, Key
from keysvc.models import GPT4_32K, ModelTable
from keysvc.outcomes import UpstreamError
from keysvc.pool import (
    ATTRIBUTION_WINDOW,
    BUDGET_LAPSE,
    KEY_REUSE_DELAY,
    MAX_BUDGET_WAIT,
    MAX_RESET,
    RATE_LIMIT_FALLBACK,
    REPORT_PAIR_WINDOW,
    RESERVATION_TTL,
    RESET_GRAIN,
    TOKEN_ESTIMATE_SPREAD,
    TOKEN_ESTIMATE_WEIGHT,
)
from tests.helpers import (
    ANTHROPIC_FAMILIES,
    CLAUDE_ALL,
    HAIKU_ONLY,
    PAID,
    PAID_32K,
    TRIAL,
    TURBO_ONLY,
    pool_of,
)

MODELS = ["gpt-4", "gpt-3.5-turbo", "gpt-4o", "text-embedding-ada-002", "gpt-4-32k"]
MODELS += ["claude-sonnet-4-5", "claude-3-5-haiku-20241022"]
#: A mixed pool: OpenAI keys and Anthropic keys (the last two profiles).
PROFILES = [PAID, TRIAL, PAID_32K, TURBO_ONLY, CLAUDE_ALL, HAIKU_ONLY]
TABLE = ModelTable()
#: Reset headers and the seconds they say (stored clamped to MAX_RESET).
RESETS = {"0": 0.0, "0s": 0.0, "20ms": 0.02, "300ms": 0.3, "1s": 1.0, "2.5s": 2.5, "4s": 4.0}
RESETS |= {"1m30s": 90.0, "6m0s": 360.0}
#: An Anthropic reset: seconds from the answer to the RFC 3339 time it names
#: (a time already past reads as 0).
RESET_OFFSETS = [-5.0, 0.0, 0.3, 1.0, 2.5, 6.0, 30.0, 90.0]
#: The input and output token budgets of a Claude family's table.
SPLIT_DIMS = ("input_tokens", "output_tokens")
#: (limit, remaining, reset seconds) as one answer gave a dimension; None: not sent.
Dim = tuple[int | None, int | None, float | None]
NO_DIM: Dim = (None, None, None)


@dataclass(frozen=True)
class Parsed:
    """The reference's reading of an answer's rate-limit headers, as the key's provider
    reads them (``tokens``: the overall dimension, else the tighter of input and output)."""

    requests: Dim = NO_DIM
    tokens: Dim = NO_DIM
    input_tokens: Dim = NO_DIM
    output_tokens: Dim = NO_DIM
    retry_after: float | None = None

    def dim(self, name: str) -> Dim:
        value: Dim = getattr(self, name)
        return value


@dataclass
class Shadow:
    """The reference's copy of one rate-limit state."""

    last_used: float = 0.0
    rate_limited_at: float = 0.0
    requests_reset: float | None = None
    tokens_reset: float | None = None
    remaining_requests: int | None = None
    remaining_tokens: int | None = None
    saw_429: bool = False
    kind: str = ""
    # The budget: left at budget_at, refill per second until full_at, then the whole
    # limit; per dimension. In flight: (when, tokens), oldest first.
    budget_at: float = 0.0
    left: dict[str, float] = field(default_factory=dict)
    rate: dict[str, float] = field(default_factory=dict)
    limit: dict[str, float] = field(default_factory=dict)
    full_at: dict[str, float] = field(default_factory=dict)
    reserved: list[tuple[float, float]] = field(default_factory=list)
    # Per dimension: a 429 in this refill (probation); a fixed window (a second one,
    # for a request handed out after the latest 429 that put one on probation, then).
    probation: set[str] = field(default_factory=set)
    window: set[str] = field(default_factory=set)
    probation_at: float = 0.0
    # On probation: the first answer since that said nothing was left (when, and the
    # end of the refill it named), against which later ones tell window from bucket.
    empty_at: dict[str, tuple[float, float]] = field(default_factory=dict)
    # When the pool last derived the lock, and the token reservation then (of all
    # tokens, and of input and output tokens apart).
    derived_at: float = 0.0
    reserve: float = 1.0
    split_reserve: dict[str, float] = field(default_factory=dict)
    # A Claude family's state: input and output tokens are budgets of their own.
    split: bool = False

    def derive(self, now: float, reserve: float, split_reserve: dict[str, float]) -> None:
        self.reserved = [r for r in self.reserved if r[0] + RESERVATION_TTL > now]
        if self.budget_at and now >= self.budget_at + BUDGET_LAPSE:
            self.budget_at = 0.0
            self.left, self.rate, self.limit, self.full_at = {}, {}, {}, {}
            self.probation, self.window, self.empty_at = set(), set(), {}
        self.derived_at, self.reserve, self.split_reserve = now, reserve, split_reserve

    def forget(self, dim: str) -> None:
        for values in (self.left, self.rate, self.limit, self.full_at):
            values.pop(dim, None)
        self.probation.discard(dim)
        self.window.discard(dim)
        self.empty_at.pop(dim, None)

    def tell_shape(self, dim: str, now: float, full_at: float) -> None:
        # A fixed window's end stays put while it is empty; a bucket's moves on with
        # the time. Told apart once the answers are far enough apart to show it.
        if dim not in self.empty_at:
            self.empty_at[dim] = (now, full_at)
            return
        at, end = self.empty_at[dim]
        rate = self.rate[dim]
        if not rate > 0 or now - at <= 2.0 / rate + 4 * RESET_GRAIN:
            return
        if full_at - end < (now - at) / 2:
            self.window.add(dim)
            self.rate[dim] = 0.0
        else:
            self.probation.discard(dim)
            self.empty_at.pop(dim, None)

    def reanchor(self, now: float) -> None:
        if self.budget_at and self.budget_at != now:
            for dim, limit in self.limit.items():
                if now >= self.full_at[dim]:
                    self.left[dim] = single(limit)
                else:
                    refill = self.rate[dim] * (now - self.budget_at)
                    self.left[dim] = single(min(limit, self.left[dim] + refill))
        self.budget_at = now

    def available(self, dim: str, x: float) -> float:
        """What the dimension has ``x`` seconds after ``budget_at``."""
        if self.budget_at + x >= self.full_at[dim]:
            return self.limit[dim]
        return min(self.limit[dim], self.left[dim] + self.rate[dim] * x)

    def needed(self, dim: str, x: float) -> float:
        """Room for the reservations not lapsed ``x`` seconds after ``budget_at``, and
        one more hand-out."""
        live = [r for r in self.reserved if r[0] + RESERVATION_TTL > self.budget_at + x]
        if dim == "requests":
            return len(live) + 1.0
        if dim in SPLIT_DIMS:  # every hand-out needs the family's estimate
            return (len(live) + 1.0) * self.split_reserve[dim]
        return sum(tokens for _, tokens in live) + self.reserve

    def budget_until(self) -> float:
        """Brute force: the earliest moment, among those where anything changes, at
        which every budgeted dimension has room (as offsets from ``budget_at``, which
        an epoch time would round)."""
        dims = list(self.limit)

        def fits(x: float) -> bool:
            return all(self.needed(d, x) <= self.available(d, x) + 1e-9 for d in dims)

        if not dims or fits(0.0):
            return 0.0
        at = self.budget_at
        moments = {0.0, *(t - at for t in self.full_at.values())}
        moments |= {h + RESERVATION_TTL - at for h, _ in self.reserved}
        for d in dims:
            if self.rate[d] > 0:
                for lapsed in range(len(self.reserved) + 1):
                    x = self.reserved[lapsed - 1][0] + RESERVATION_TTL - at if lapsed else 0.0
                    moments.add((self.needed(d, x) - self.left[d]) / self.rate[d])
        candidates = sorted(x for x in moments if x >= 0 and fits(x))
        until = at + candidates[0] if candidates else math.inf
        return min(until, at + MAX_BUDGET_WAIT)

    def until(self, *, throttle: bool) -> float:
        if not self.last_used and not self.rate_limited_at and not self.budget_at:
            return 0.0
        resets = {"requests": self.requests_reset, "tokens": self.tokens_reset}
        known = [r for r in resets.values() if r is not None]
        remaining = {"requests": self.remaining_requests, "tokens": self.remaining_tokens}
        # In a Claude family, input and output budgets stand in for the tokens one.
        tokens_budgeted = "tokens" in self.rate or any(d in self.rate for d in SPLIT_DIMS)
        if self.saw_429 and self.kind in self.rate:
            window = 0.0
        elif self.saw_429 and self.kind in SPLIT_DIMS and self.tokens_reset is not None:
            window = self.tokens_reset
        elif self.saw_429 and resets.get(self.kind) is not None:
            window = resets[self.kind] or 0.0
        elif self.saw_429:
            window = max(known) if known else RATE_LIMIT_FALLBACK
        elif remaining != {"requests": None, "tokens": None}:
            window = 0.0
            for dim, left in remaining.items():
                budgeted = tokens_budgeted if dim == "tokens" else dim in self.rate
                if left == 0 and not budgeted:
                    reset = resets[dim]
                    window = max(window, RATE_LIMIT_FALLBACK if reset is None else reset)
        else:
            window = max(known) if known else 0.0
        until = self.rate_limited_at + window if self.rate_limited_at else 0.0
        if throttle and self.budget_at:
            until = max(until, self.budget_until())
        elif throttle and self.last_used:
            until = max(until, self.last_used + KEY_REUSE_DELAY)
        return until

    def mark(self, now: float, kind: str, answered: float | None) -> None:
        """A 429 of type ``kind`` ("": not told, so inferred; "other": neither limit)
        for a request handed out at ``answered`` (None: not known)."""
        if not kind and self.budget_at:
            if self.remaining_requests == 0 and "requests" in self.limit:
                kind = "requests"
            elif self.remaining_tokens == 0 and "tokens" in self.limit:
                kind = "tokens"
            elif self.split:
                kind = next((d for d in SPLIT_DIMS if d in self.limit and not self.left[d]), "")
        kind = "" if kind == "other" or (kind in SPLIT_DIMS and not self.split) else kind
        self.rate_limited_at = now
        self.saw_429 = True
        self.kind = kind
        if kind in self.limit:
            self.reanchor(now)
            self.left[kind] = 0.0
            if kind not in self.probation:
                self.probation.add(kind)
                self.probation_at = now
            elif answered is None or answered > self.probation_at:
                self.window.add(kind)
                self.rate[kind] = 0.0
            if self.full_at[kind] <= now:
                self.full_at[kind] = now + RATE_LIMIT_FALLBACK


@dataclass
class RefKey:
    key: Key
    order: int
    disabled: bool = False
    #: Why (the first reason kept, as the pool keeps it), revoked, and the time a
    #: spend limit named for the key to come back by itself (0: none).
    reason: DisableReason | None = None
    revoked: bool = False
    quota_until: float = 0.0
    last_used: float = 0.0
    wide: Shadow | None = None
    families: dict[str, Shadow] = field(default_factory=dict)
    #: The family of the answer UpdateRateLimits last reported, when, and its hand-out's time.
    answered: tuple[str, float, float | None] | None = None

    def until(self, family: str) -> float:
        own = self.families.get(family)
        until = own.until(throttle=True) if own else 0.0
        if self.wide is not None:
            until = max(until, self.wide.until(throttle=False))
        return until

    def state(self, family: str) -> Shadow:
        if not family:
            if self.wide is None:
                self.wide = Shadow(rate_limited_at=self.last_used)
            return self.wide
        return self.families.setdefault(family, Shadow(split=family in ANTHROPIC_FAMILIES))

    def disable(self, reason: DisableReason, until: float | None = None) -> None:
        if reason is DisableReason.QUOTA and until is not None and until > self.quota_until:
            self.quota_until = until
        self.revoked = self.revoked or reason is DisableReason.REVOKED
        if not self.disabled:
            self.disabled, self.reason = True, reason
        elif self.reason is DisableReason.UNSPECIFIED:
            self.reason = reason

    def enable(self) -> None:
        self.disabled, self.reason, self.revoked, self.quota_until = False, None, False, 0.0

    def attribute(
        self, model: str, now: float, *, answer: bool, parsed: Parsed | None = None
    ) -> tuple[str, float | None]:
        """The family a report is for ("": key-wide), and when the hand-out it answers
        was made (None: not known); an answer releases that hand-out."""
        family = TABLE.family(model) if model else ""
        if (
            not answer
            and self.answered
            and now < self.answered[1] + REPORT_PAIR_WINDOW
            and (not model or self.answered[0] == family)
        ):
            return self.answered[0], self.answered[2]
        handed_out: float | None = None
        if model:
            own = self.families.get(family)
            if own is not None and own.reserved:
                handed_out = (own.reserved.pop(0) if answer else own.reserved[0])[0]
        else:
            in_flight = [
                (s.reserved[0][0], f) for f, s in sorted(self.families.items()) if s.reserved
            ]
            matching = [
                (at, f) for at, f in in_flight if parsed and limits_match(self.families[f], parsed)
            ]
            in_flight = matching or in_flight
            used = [(-s.last_used, f) for f, s in sorted(self.families.items()) if s.last_used]
            if in_flight:
                handed_out, family = min(in_flight, key=lambda pair: pair[0])
                if answer:
                    self.families[family].reserved.pop(0)
            elif used and now < -min(used, key=lambda pair: pair[0])[0] + ATTRIBUTION_WINDOW:
                family = min(used, key=lambda pair: pair[0])[1]
            else:
                return "", None
        return family, handed_out


def parse(ref: RefKey, headers: dict[str, str], now: float) -> Parsed | None:
    """The headers the key's provider reads: x-ratelimit-* for an OpenAI key,
    anthropic-ratelimit-* and retry-after for an Anthropic one; None when none came."""
    if ref.key.service == "openai":
        dims = {}
        for dim in ("requests", "tokens"):
            limit = headers.get(f"x-ratelimit-limit-{dim}")
            left = headers.get(f"x-ratelimit-remaining-{dim}")
            reset = headers.get(f"x-ratelimit-reset-{dim}")
            dims[dim] = (
                None if limit is None else int(limit),
                None if left is None else int(left),
                None if reset is None else reset_seconds(reset),
            )
        parsed = Parsed(dims["requests"], dims["tokens"])
    else:
        dims = {}
        for dim in ("requests", "tokens", "input_tokens", "output_tokens"):
            name = f"anthropic-ratelimit-{dim.replace('_', '-')}"
            limit, left = headers.get(f"{name}-limit"), headers.get(f"{name}-remaining")
            reset = headers.get(f"{name}-reset")
            at = None if reset is None else datetime.fromisoformat(reset).timestamp()
            dims[dim] = (
                None if limit is None else int(limit),
                None if left is None else int(left),
                None if at is None else max(0.0, at - now),
            )
        retry_after = headers.get("retry-after")
        parsed = Parsed(
            dims["requests"],
            dims["tokens"],
            dims["input_tokens"],
            dims["output_tokens"],
            None if retry_after is None else float(retry_after),
        )
    if parsed.retry_after is None and all(
        d == NO_DIM
        for d in (parsed.requests, parsed.tokens, parsed.input_tokens, parsed.output_tokens)
    ):
        return None
    if parsed.tokens != NO_DIM:
        return parsed
    # Anthropic without the overall tokens dimension: the tighter of input and output.
    known = [d for d in (parsed.input_tokens, parsed.output_tokens) if d != NO_DIM]
    if len(known) == 2:
        shares = [math.inf if d[1] is None else d[1] / d[0] if d[0] else 0.0 for d in known]
        tokens = known[1] if shares[1] < shares[0] else known[0]
    else:
        tokens = known[0] if known else NO_DIM
    return Parsed(
        parsed.requests, tokens, parsed.input_tokens, parsed.output_tokens, parsed.retry_after
    )


def single(value: float) -> float:
    """``value`` as the pool stores a budget's left and rate: a 4-byte float."""
    return float(array("f", [value])[0])


def limits_match(state: Shadow, parsed: Parsed) -> bool:
    compared = False
    for dim in ("requests", "tokens", *SPLIT_DIMS):
        limit = parsed.dim(dim)[0]
        if limit is not None and dim in state.limit:
            if limit != state.limit[dim]:
                return False
            compared = True
    return compared


def reference_rank(ref: RefKey, family: str, now: float) -> tuple[float, ...]:
    until = ref.until(family)
    locked = now < until
    own = ref.families.get(family)
    return (
        1 if locked else 0,
        until if locked else 0.0,
        0 if ref.key.is_trial else 1,
        1 if GPT4_32K in ref.key.model_families else 0,
        own.last_used if own else 0.0,
        ref.order,
    )


def reference_eligible(refs: list[RefKey], model: str) -> list[RefKey]:
    info = TABLE.lookup(model)
    return [
        r
        for r in refs
        if not r.disabled
        and info.family in r.key.model_families
        and not (info.embeddings and r.key.is_trial)
    ]


def reset_seconds(text: str) -> float:
    """A reset header's seconds: one of RESETS, or plain seconds ("29.5s")."""
    return RESETS[text] if text in RESETS else float(text.removesuffix("s"))


def header_set(
    requests: str | None,
    tokens: str | None,
    left_requests: int | None,
    left_tokens: int | None,
    limit_requests: int | None,
    limit_tokens: int | None,
) -> dict[str, str]:
    headers = {}
    for name, value in (
        ("x-ratelimit-reset-requests", requests),
        ("x-ratelimit-reset-tokens", tokens),
        ("x-ratelimit-remaining-requests", left_requests),
        ("x-ratelimit-remaining-tokens", left_tokens),
        ("x-ratelimit-limit-requests", limit_requests),
        ("x-ratelimit-limit-tokens", limit_tokens),
    ):
        if value is not None:
            headers[name] = str(value)
    return headers


def apply_headers(state: Shadow, parsed: Parsed | None, now: float, *, budget: bool) -> None:
    """``budget``: the report went to a family (key-wide reports keep no budget)."""
    if parsed is None:
        return
    for dim in ("requests", "tokens"):
        _, left, reset = parsed.dim(dim)
        if reset is not None:
            setattr(state, f"{dim}_reset", min(reset, MAX_RESET))
        if parsed.retry_after is not None:
            # The wait the upstream asked for, unclamped, is the least the window is.
            known = getattr(state, f"{dim}_reset")
            if known is None or known < parsed.retry_after:
                setattr(state, f"{dim}_reset", parsed.retry_after)
        if left is not None:
            setattr(state, f"remaining_{dim}", left)
    if not budget:
        return
    dims = {"requests": parsed.requests, "tokens": parsed.tokens}
    split = state.split and (
        parsed.input_tokens[1] is not None or parsed.output_tokens[1] is not None
    )
    if split:  # input and output are the token budgets; tokens is none of its own
        dims = {"requests": parsed.requests, **{d: parsed.dim(d) for d in SPLIT_DIMS}}
    elif parsed.requests[1] is None and parsed.tokens[1] is None:
        return
    if state.budget_at:
        state.reanchor(now)
    if split:
        state.forget("tokens")
    for dim, (limit, left, seconds) in dims.items():
        if left is None:
            continue
        # Within one refill (until the limit is whole again) an answer only lowers.
        fresh = dim not in state.limit or now >= state.full_at[dim]
        if limit is not None and seconds is not None:
            fresh = fresh or state.limit[dim] != limit
            refill = (limit - left) / seconds if seconds > 0 and left < limit else None
            if fresh:
                state.probation.discard(dim)
                state.empty_at.pop(dim, None)
                state.rate[dim] = 0.0 if refill is None or dim in state.window else single(refill)
            elif refill is not None:
                state.rate[dim] = min(state.rate[dim], single(refill))
            state.limit[dim] = limit
            full_at = now + min(seconds, MAX_BUDGET_WAIT)
            told = dim in state.probation and dim not in state.window
            if not fresh and left == 0 and seconds <= MAX_BUDGET_WAIT and told:
                state.tell_shape(dim, now, full_at)
            if fresh or full_at > state.full_at[dim]:
                state.full_at[dim] = full_at
        if dim in state.limit:
            state.left[dim] = single(left) if fresh else min(single(left), state.left[dim])
            state.budget_at = now


OPENAI_HEADERS = st.builds(
    header_set,
    st.none() | st.sampled_from(list(RESETS)),
    st.none() | st.sampled_from(list(RESETS)),
    st.none() | st.sampled_from([0, 0, 1, 50]),
    st.none() | st.sampled_from([0, 0, 900]),
    st.none() | st.sampled_from([3, 60]),
    st.none() | st.sampled_from([1000, 100_000]),
)


def _dimension(limits: list[int], lefts: list[int]) -> st.SearchStrategy[Dim | None]:
    """An Anthropic dimension as one answer sends it: mostly whole, sometimes in part."""
    offsets = st.sampled_from(RESET_OFFSETS)
    whole = st.tuples(st.sampled_from(limits), st.sampled_from(lefts), offsets)
    part = st.tuples(
        st.none() | st.sampled_from(limits), st.none() | st.sampled_from(lefts), st.none() | offsets
    )
    return st.none() | whole | whole | part


#: anthropic-ratelimit-{requests,tokens,input-tokens,output-tokens}-* and retry-after.
ANTHROPIC_HEADERS = st.tuples(
    _dimension([3, 60], [0, 0, 1, 50]),
    _dimension([1000, 100_000], [0, 0, 900, 40_000]),
    _dimension([1000, 100_000], [0, 0, 900, 40_000]),
    _dimension([1000, 20_000], [0, 0, 100, 15_000]),
    st.none() | st.sampled_from(["0", "1", "2.5", "20"]),
)
#: Both providers' headers: each key's provider reads its own.
HEADERS = st.tuples(OPENAI_HEADERS, ANTHROPIC_HEADERS)
MODEL_OR_NONE = st.sampled_from(["", *MODELS])
#: A 429's error: its type (OpenAI's "requests"/"tokens" say which limit; an
#: Anthropic key's 429 names input or output tokens in its message, or nothing), or,
#: for an Anthropic key, a spend limit reached until a time so many seconds on
#: (None: the message names none, so until the next month).
ERRORS = st.sampled_from(["tokens", "requests", "other", *SPLIT_DIMS])
ERRORS |= st.sampled_from([("spend", 5.0), ("spend", 45.0), ("spend", None)])


def rfc3339(at: float) -> str:
    return datetime.fromtimestamp(at, UTC).isoformat().replace("+00:00", "Z")


def headers_at(
    now: float, headers: tuple[dict[str, str], tuple[Dim | None, ...]]
) -> dict[str, str]:
    """The headers an answer at ``now`` carries: Anthropic's resets are times."""
    openai, (*dims, retry_after) = headers
    out = dict(openai)
    names = ("requests", "tokens", "input-tokens", "output-tokens")
    for dim, spec in zip(names, dims, strict=True):
        if spec is None:
            continue
        for field_name, value in zip(("limit", "remaining", "reset"), spec, strict=True):
            if value is None:
                continue
            text = rfc3339(now + value) if field_name == "reset" else str(value)
            out[f"anthropic-ratelimit-{dim}-{field_name}"] = text
    if retry_after is not None:
        out["retry-after"] = str(retry_after)
    return out


def spend_limit_error(now: float, seconds: float | None) -> UpstreamError:
    message = "You have reached your specified workspace API usage limits."
    if seconds is not None:
        message += f" Usage blocked until {rfc3339(now + seconds)}."
    return UpstreamError("invalid_request_error", "", message)


class PoolModel(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.pool, self.clock, self.refs = None, None, []  # type: ignore[assignment]
        #: Per family: the tokens of every finished request, oldest first; and, in a
        #: Claude family, its input and its output tokens apart.
        self.tokens: dict[str, list[int]] = {}
        self.split_tokens: dict[str, dict[str, list[int]]] = {d: {} for d in SPLIT_DIMS}

    def reserve(self, family: str, dim: str = "tokens") -> float:
        """mean + SPREAD·sd of the family's tokens, weighted by (1 - WEIGHT)^age."""
        seen = (self.tokens if dim == "tokens" else self.split_tokens[dim]).get(family)
        if not seen:
            return 1.0
        mean, variance = float(seen[0]), 0.0
        for tokens in seen[1:]:
            step = TOKEN_ESTIMATE_WEIGHT * (tokens - mean)
            variance = (1 - TOKEN_ESTIMATE_WEIGHT) * (variance + (tokens - mean) * step)
            mean += step
        return max(1.0, mean + TOKEN_ESTIMATE_SPREAD * math.sqrt(variance))

    def derive(self, state: Shadow, family: str, now: float) -> None:
        split = {d: self.reserve(family, d) for d in SPLIT_DIMS} if state.split else {}
        state.derive(now, self.reserve(family), split)

    @precondition(lambda self: self.pool is None)
    @rule(profiles=st.lists(st.sampled_from(PROFILES), min_size=1, max_size=8))
    def load(self, profiles):  # type: ignore[no-untyped-def]
        self.pool, self.clock, keys = pool_of(profiles)
        self.refs = [RefKey(key, i) for i, key in enumerate(keys)]

    def ref(self, i: int) -> RefKey:
        return self.refs[i % len(self.refs)]

    @precondition(lambda self: self.pool is not None)
    @rule(model=st.sampled_from(MODELS))
    def get(self, model: str) -> None:
        now = self.clock.now()
        family = TABLE.family(model)
        eligible = reference_eligible(self.refs, model)
        expected = min(eligible, key=lambda r: reference_rank(r, family, now)) if eligible else None
        try:
            got = self.pool.get(model)
        except NoKeysForFamily:
            got = None
        assert got is (expected.key if expected else None)
        if expected is not None:
            old = expected.families.get(family) or Shadow()
            # The hand-out spends the answer's headers but keeps the budget.
            new = Shadow(last_used=now, rate_limited_at=now, split=family in ANTHROPIC_FAMILIES)
            new.budget_at, new.left, new.rate = old.budget_at, old.left, old.rate
            new.limit, new.full_at = old.limit, old.full_at
            new.probation, new.window = old.probation, old.window
            new.probation_at, new.empty_at = old.probation_at, old.empty_at
            new.reserved = [*old.reserved, (now, self.reserve(family))]
            self.derive(new, family, now)
            expected.families[family] = new
            expected.last_used = now
            expected.wide = None

    @precondition(lambda self: self.pool is not None)
    @rule(model=st.sampled_from(MODELS))
    def lockout(self, model: str) -> None:
        now = self.clock.now()
        family = TABLE.family(model)
        untils = [r.until(family) for r in reference_eligible(self.refs, model)]
        if not untils or any(now >= until for until in untils):
            expected = 0.0
        else:
            expected = min(untils) - now
        assert abs(self.pool.lockout_period(model) - expected) < 1e-9

    @precondition(lambda self: self.pool is not None)
    @rule(i=st.integers(0, 7), model=MODEL_OR_NONE)
    def mark(self, i: int, model: str) -> None:
        ref = self.ref(i)
        now = self.clock.now()
        self.pool.mark_rate_limited(ref.key.hash, model)
        family, answered = ref.attribute(model, now, answer=False)
        state = ref.state(family)
        state.mark(now, "", answered)  # MarkRateLimited does not say which limit
        if family:
            self.derive(state, family, now)

    @precondition(lambda self: self.pool is not None)
    @rule(i=st.integers(0, 7), model=MODEL_OR_NONE, spec=HEADERS)
    def update(self, i: int, model: str, spec: tuple) -> None:  # type: ignore[type-arg]
        ref = self.ref(i)
        now = self.clock.now()
        headers = headers_at(now, spec)
        self.pool.update_rate_limits(ref.key.hash, headers, model)
        parsed = parse(ref, headers, now)
        if parsed is not None:
            family, answered = ref.attribute(model, now, answer=True, parsed=parsed)
            if family:
                ref.answered = (family, now, answered)
            state = ref.state(family)
            apply_headers(state, parsed, now, budget=bool(family))
            if family:
                self.derive(state, family, now)

    @precondition(lambda self: self.pool is not None)
    @rule(
        model=st.sampled_from(["gpt-4", "gpt-4o"]),
        named=st.booleans(),
        window=st.booleans(),
        steps=st.lists(st.sampled_from([0.05, 0.5, 2.0]), min_size=2, max_size=3),
    )
    def empty_answers(self, model: str, named: bool, window: bool, steps: list[float]) -> None:
        """A budget spent by a 429 (the seed's way: headers, then the 429), then more
        such answers, some soon and some well after, their resets a fixed window's end
        (nearer each time) or a token bucket's (a whole refill from each): a sequence
        random headers seldom line up. About the key a Get just handed out, so that
        reports without a model are that hand-out's family's too."""
        self.get(model)
        now = self.clock.now()
        handed = [n for n, ref in enumerate(self.refs) if ref.last_used == now]
        i = handed[0] if handed else 0
        report_model = model if named else ""
        no_anthropic = (None, None, None, None, None)
        self.update(i, report_model, (header_set("30s", None, 0, None, 60, None), no_anthropic))
        since = 0.0
        for step in [0.0, *steps]:
            self.wait(step)
            since += step
            reset = f"{30.0 - since:.3f}s" if window else "30s"
            empty = header_set(reset, None, 0, None, 60, None)
            self.update(i, report_model, (empty, no_anthropic))
            self.mark(i, report_model)
            self.lockout(model)
            # The key's own lock, which the pool's lockouts (over every key) may hide.
            ref, family = self.ref(i), TABLE.family(model)
            if not ref.disabled and family in ref.key.model_families:
                assert abs(ref.key.until_in(family) - ref.until(family)) < 1e-9

    @precondition(lambda self: self.pool is not None)
    @rule(
        i=st.integers(0, 7),
        model=MODEL_OR_NONE,
        status=st.sampled_from([200, 429, 500, 400, 529]),
        spec=HEADERS,
        kind=ERRORS,
        tokens=st.sampled_from([0, 300, 1000]),
        prompt=st.sampled_from([0, 0, 2000]),
    )
    def report(  # noqa: PLR0913
        self,
        i: int,
        model: str,
        status: int,
        spec: tuple,  # type: ignore[type-arg]
        kind: str | tuple[str, float | None],
        tokens: int,
        prompt: int,
    ) -> None:
        ref = self.ref(i)
        now = self.clock.now()
        headers = headers_at(now, spec)
        anthropic = ref.key.service == "anthropic"
        if isinstance(kind, tuple):
            error = spend_limit_error(now, kind[1]) if anthropic else UpstreamError("other")
        elif anthropic and kind in SPLIT_DIMS:
            named = kind.replace("_", " ")
            error = UpstreamError("rate_limit_error", "", f"rate limit of 1,000 {named} per minute")
        else:
            error = UpstreamError(kind)
        was_disabled = ref.key.is_disabled
        decision, _ = self.pool.report_outcome(
            ref.key.hash,
            model,
            status=status,
            headers=headers,
            error=error,
            prompt_tokens=prompt,
            completion_tokens=tokens,
        )
        parsed = parse(ref, headers, now)
        family, answered = ref.attribute(model, now, answer=True, parsed=parsed)
        # Anthropic: a spend limit (in a 400 or a 429) benches the key; any other 429
        # is a rate limit that does not say which limit it hit; a 529 is the
        # provider's overload, not the key's.
        quota = anthropic and isinstance(kind, tuple) and status in (400, 429)
        rate_limited = status == 429 and not quota
        if parsed is not None or rate_limited or answered is not None:
            state = ref.state(family)
            apply_headers(state, parsed, now, budget=bool(family))
            if rate_limited:
                # OpenAI's 429 type is its limit_kind; Anthropic's is the limit its
                # message names, if any.
                if anthropic:
                    state.mark(now, kind if kind in SPLIT_DIMS else "", answered)
                else:
                    state.mark(now, "other" if isinstance(kind, tuple) else kind, answered)
            if family:
                self.derive(state, family, now)
        if status == 200 and tokens + prompt and family:  # learned after the lock is derived
            self.tokens.setdefault(family, []).append(tokens + prompt)
            if family in ANTHROPIC_FAMILIES:
                self.split_tokens["input_tokens"].setdefault(family, []).append(prompt)
                self.split_tokens["output_tokens"].setdefault(family, []).append(tokens)
        if quota:
            assert isinstance(kind, tuple)
            named = kind[1]
            # The time the message names, else the start of next month (never, here).
            until = math.inf
            if named is not None:
                until = datetime.fromisoformat(rfc3339(now + named)).timestamp()
            ref.disable(DisableReason.QUOTA, until)
            event("a spend limit benches an Anthropic key")
            assert decision.disable is DisableReason.QUOTA and decision.quota_until is not None
            assert decision.quota_until == until or (
                until == math.inf and decision.quota_until > now + 3600
            )
        own = ref.families.get(family)
        if own is not None and own.limit.keys() & set(SPLIT_DIMS):
            event("a Claude family with input or output budgets")
        if anthropic and status == 529:
            event("a 529 leaves an Anthropic key as it was")
            assert decision.overloaded and decision.retry_after is not None
            asked = parsed.retry_after if parsed is not None else None
            assert decision.retry_after >= max(1.0, asked or 0.0)
            assert ref.key.is_disabled == was_disabled  # the key is left as it was

    @precondition(lambda self: self.pool is not None)
    @rule(i=st.integers(0, 7), reason=st.sampled_from(list(DisableReason)))
    def disable(self, i: int, reason: DisableReason) -> None:
        self.pool.disable(self.ref(i).key.hash, reason)
        self.ref(i).disable(reason)

    @precondition(lambda self: self.pool is not None)
    @rule(i=st.integers(0, 7), is_trial=st.booleans())
    def check(self, i: int, is_trial: bool) -> None:
        # The checker moves the key to another profile (its queues, its ranks) and
        # back; its rate-limit state goes with it. The reference reads the profile
        # from the key itself.
        self.pool.apply_check(self.ref(i).key.hash, model_ids=None, is_trial=is_trial)

    @precondition(lambda self: self.pool is not None)
    @rule()
    def recheck(self) -> None:
        self.pool.recheck()
        for ref in self.refs:
            ref.enable()

    @precondition(lambda self: self.pool is not None)
    @rule(seconds=st.sampled_from([0.0, 0.01, 0.5, 1.0, 2.0, 9.99, 10.0, 30.0]))
    def wait(self, seconds: float) -> None:
        self.clock.advance(seconds)
        now = self.clock.now()
        for ref in self.refs:
            # A spend limit's time has come: back by itself, unless disabled since
            # for another reason (the first reason is kept) or revoked.
            back = ref.quota_until and now >= ref.quota_until
            if ref.disabled and back and ref.reason is DisableReason.QUOTA and not ref.revoked:
                ref.enable()
                event("a key back from its spend limit")

    @invariant()
    def available_counts_enabled_keys(self) -> None:
        if self.pool is not None:
            assert self.pool.available() == sum(not r.disabled for r in self.refs)

    @invariant()
    def family_lockout_matches_the_reference(self) -> None:
        # dall-e is never asked for here: its keys are not indexed for it, so
        # only key-wide locks can hold them back (family_lockout's other path).
        if self.pool is None:
            return
        now = self.clock.now()
        for family in ("gpt4", "turbo", "gpt4o", "dall-e", "claude-sonnet", "claude-haiku"):
            untils = [
                r.until(family)
                for r in self.refs
                if not r.disabled and family in r.key.model_families
            ]
            if not untils or any(now >= until for until in untils):
                expected = 0.0
            else:
                expected = min(untils) - now
            assert abs(self.pool.family_lockout(family) - expected) < 1e-9, family


TestPoolModel = PoolModel.TestCase
TestPoolModel.settings = settings(max_examples=200, stateful_step_count=60, deadline=None)
