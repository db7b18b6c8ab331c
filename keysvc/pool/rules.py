"""The rules every pool backend follows: what a header, a 429 or a budget means.

Pure functions over one family's ``RateTable`` row (``keysvc.rates``), the
constants they use, and the checks of caller input; no pool data structure and
no grpc. The in-memory backend (``keysvc.pool.memory``) calls them directly; a
shared backend implements the same rules where its state lives and parses the
headers here, so both agree on every lock.

Rate-limit state is kept per (key, model family), because the upstream limits
each key per model: a 429 for gpt-4 says nothing about the same key on turbo.
The state of a family (``keysvc.rates``: one ``RateTable`` per family, a row
per key) holds the hand-out time, the last answer's reset and remaining
headers, whether a 429 came, and the family's budget. A report that names no
model goes to the family of the key's oldest hand-out in flight, which it most
likely answers (``_report_family``); with none, to the key-wide table (family
""), which locks every family (the seed's behaviour). A key's lock in family f
ends at the later of the two.

A family's lock (its ``until``) is the latest of

- the rate-limit window from ``rate_limited_at`` (the hand-out, or the latest
  429):

  - after a 429: the reset of the limit its type names (``requests``,
    ``tokens``), else the longer known reset, else 10 s (a 429 is
    authoritative even when the remaining-* headers say otherwise);
  - else, when remaining-* headers are known: the reset of each remaining
    that is 0 (10 s if that reset is unknown); when none is 0, no window;
  - else (no remaining-* known): the longer known reset (the seed's rule);

  a dimension (requests or tokens) that has a budget is left to it;
- once an answer brought a dimension's limit, remaining and reset, the
  budget (``budget_until``), and nothing else: the remaining as of that
  report (``budget_at``), refilling until the time the reset names, when the
  whole limit is back, must cover the hand-outs in flight (each reserves 1
  request and ``_token_reserve`` tokens; an answer releases the oldest; they
  lapse after ``RESERVATION_TTL``) plus one more. The refill rate is the
  slowest (limit - remaining) / reset reported since the limit was last whole:
  a token bucket reports one steady rate, while a fixed window (nothing back
  before its end) reports ever faster ones as it ends. Until then, too, an
  answer can only lower what is left (one that overtook an older answer on
  the way back reports a remaining from before the older one was counted). A
  429 spends its dimension; a second one in the same refill, for a request
  sent after the first, marks it a fixed window, counted on to refill only at
  its ends (``mark``; the 429s of a burst already in flight do not), and so do
  answers since that find nothing left and name an end of the refill that
  stays put, as a window's does, where a bucket's moves on (``_tell_shape``). The wait
  is capped at ``MAX_BUDGET_WAIT``;
  the budget outlives hand-outs, and is forgotten ``BUDGET_LAPSE`` after its
  last report. A family whose provider limits input and output tokens apart
  (Anthropic) keeps a budget for each instead of one for tokens, and a
  hand-out needs room in both (``RateTable.split``, ``budget_until``);
- until then (nothing known of the key's quota for the family, or no longer),
  the reuse throttle: ``last_used + reuse_delay`` (1 s) after a hand-out for
  that family, so a burst does not pile onto one key before its headers come
  back. Per family, like the upstream limits: a turbo hand-out does not hold
  the key back from gpt-4.

The inputs are stored and the lock derived from them, so the order of
MarkRateLimited and UpdateRateLimits does not matter.

Selection order for ``get(model)`` of family f (the seed's, with the lock
instead of its 30 s window):

1. keys not locked for f;
2. among locked keys, the one whose lock for f ends first;
3. trial keys before paid keys (spend the small quotas first);
4. keys *without* gpt4-32k before keys with it (keep scarce 32k keys free);
5. the least recently used for f.
"""

from __future__ import annotations

import logging
import math
import re
from collections import deque
from collections.abc import Mapping
from typing import Final, NamedTuple

from ..errors import InvalidArgument
from ..events import KeyChange
from ..keys import Key
from ..providers import provider
from ..providers.base import Dimension
from ..providers.base import RateHeaders as ProviderRates
from ..rates import (
    BUDGET_SHAPE,
    HAS_STATE,
    KIND_BITS,
    KIND_INPUT_TOKENS,
    KIND_OUTPUT_TOKENS,
    KIND_REQUESTS,
    KIND_TOKENS,
    MAX_COUNT,
    NOT_SET,
    PROBATIONS,
    SAW_RATE_LIMIT,
    Budget,
    RateTable,
)

_log = logging.getLogger("keysvc.pool")

#: After handing out a key, wait this long before handing it out again, so a
#: burst does not pile onto one key before its rate-limit headers come back.
KEY_REUSE_DELAY: Final = 1.0
#: Reset headers are clamped to this: they give the time until the whole quota
#: is back, but the window rolls, so the key is usable well before then.
MAX_RESET: Final = 10.0
#: Lock length after a 429 that came without any reset header.
RATE_LIMIT_FALLBACK: Final = 10.0
#: A hand-out's reservation of a family's budget lapses after this long without
#: an answer. Proxies abandon leases (a client went away, a deadline passed), and
#: each one reserved would hold the key back until it lapses; one lapsing while
#: its request is still running only means that request is not counted, as
#: before budgets. So short: the upstream counts a request when it arrives, and
#: answers that come later report it in their remaining-* anyway.
RESERVATION_TTL: Final = 10.0
#: A GetLockoutPeriod answer of 0 holds one request's room on the key a Get would
#: get for the caller that asked, this long or until that caller's next Get (a
#: ``Promise``). The seed's queue lets a request go when the answer is 0, and its
#: Get follows within milliseconds; without the hold, every proxy that asked in
#: between was told 0 for the same room, and all but one got a 429. A second, not
#: less: a busy proxy's event loop can take a good part of one between the answer
#: and the Get (in the simulator, 250 ms left a fleet of racing loops 25 % 429s,
#: 1 s 1.9 %), and an unused hold costs one room for that long, once per idle spell.
PROMISE_TTL: Final = 1.0
#: Callers (connections) with a hold at once before the lapsed ones are swept out.
MAX_PROMISES: Final = 4096
#: A family's budget is forgotten this long after its last report (the key was
#: idle, or every answer went elsewhere): what it said may no longer hold, so
#: the reuse throttle applies again until the next answer.
BUDGET_LAPSE: Final = 60.0
#: The longest a budget holds a key back: a per-minute window's reset.
MAX_BUDGET_WAIT: Final = 60.0
#: How far a reset header may be from the exact time (rounding): Go prints
#: durations exactly, OpenAI to the millisecond; a margin for upstreams that round more.
RESET_GRAIN: Final = 0.05
#: A report that names no model goes to the family of the key's oldest hand-out
#: in flight; with none in flight, to the family of its latest hand-out when that
#: was at most this long ago (a request that outlived its reservation) ...
ATTRIBUTION_WINDOW: Final = 600.0
#: ... and a MarkRateLimited without a model this soon after an UpdateRateLimits
#: without one goes where that went: the seed reports a 429's headers, then the 429.
REPORT_PAIR_WINDOW: Final = 1.0
#: Tokens reserved per hand-out: mean + SPREAD standard deviations of the
#: family's recent requests (exponentially weighted, WEIGHT per new request),
#: so that most requests, not just half of them, fit what is reserved.
TOKEN_ESTIMATE_WEIGHT: Final = 0.05
TOKEN_ESTIMATE_SPREAD: Final = 2.0
#: The longest a Get may wait for a key to unlock (``get_waiting``).
MAX_WAIT: Final = 60.0
#: A wait ends this long before the caller's deadline, so the answer reaches it in time.
DEADLINE_MARGIN: Final = 0.1
#: The model GetLockoutPeriod assumes when none is given (as the seed).
DEFAULT_LOCKOUT_MODEL: Final = "gpt-4"

#: The log event and level of each key state change.
CHANGE_LOGS: Final = {
    KeyChange.DISABLED: ("key disabled", logging.WARNING),
    KeyChange.REVOKED: ("key revoked", logging.WARNING),
    KeyChange.OVER_QUOTA: ("key over quota", logging.WARNING),
    KeyChange.RATE_LIMITED: ("key rate limited", logging.INFO),
    KeyChange.CLONED: ("key cloned", logging.INFO),
}

#: What a key hash looks like. Checked before lookup so that a secret sent by
#: mistake in a hash field is never echoed back in an error.
HASH_PATTERN: Final = re.compile(r"[a-z]{1,16}-[0-9a-f]{8}")


class Limits:
    """Bounds on caller input; anything beyond is INVALID_ARGUMENT."""

    MODEL_LENGTH: Final = 256
    HEADER_COUNT: Final = 128
    HEADER_NAME_LENGTH: Final = 256
    HEADER_VALUE_LENGTH: Final = 4096
    TOKENS: Final = 1_000_000_000
    #: Longest error type or code in a ReportOutcome.
    ERROR_NAME_LENGTH: Final = 256
    #: Longest error message in a ReportOutcome.
    ERROR_MESSAGE_LENGTH: Final = 8192
    #: Largest request message the server accepts (bigger: RESOURCE_EXHAUSTED,
    #: before keysvc decodes it). Room for the largest valid UpdateRateLimits.
    MESSAGE_BYTES: Final = 1024 * 1024


class RateHeaders(NamedTuple):
    """Parsed rate-limit headers, each None when absent or unparseable.

    The provider-neutral numbers of the key's provider (``keysvc.providers``):
    OpenAI's x-ratelimit-*, Anthropic's anthropic-ratelimit-* (whose ``tokens``
    dimension is the most restrictive token limit in force) and retry-after.
    """

    #: Seconds until the dimension is whole again, as sent (not clamped).
    requests_reset: float | None
    tokens_reset: float | None
    remaining_requests: int | None
    remaining_tokens: int | None
    limit_requests: int | None
    limit_tokens: int | None
    #: Seconds the upstream asked the caller to wait (retry-after).
    retry_after: float | None = None
    #: Input and output tokens, where the provider limits them apart (Anthropic):
    #: budgets of their own in a split table (``RateTable.split``).
    input_reset: float | None = None
    remaining_input: int | None = None
    limit_input: int | None = None
    output_reset: float | None = None
    remaining_output: int | None = None
    limit_output: int | None = None


def parse_rate_headers(
    key: Key, headers: Mapping[str, str], now: float = 0.0
) -> RateHeaders | None:
    """The rate-limit headers of an answer for ``key``, read by the key's provider at
    ``now`` (Anthropic's resets are times); None when there are none."""
    if not headers:
        return None
    lowered = {name.lower(): value for name, value in headers.items()}
    parsed = provider(key.service).parse_rate_headers(lowered, now)
    for header, raw in parsed.unreadable:
        _log_unparseable(key, header, raw)
    rates = parsed.rates
    if rates is None:
        return None
    tokens = rates.tokens if rates.tokens.known else _token_dimension(rates)
    requests, inputs, outputs = rates.requests, rates.input_tokens, rates.output_tokens
    return RateHeaders(
        requests.reset,
        tokens.reset,
        requests.remaining,
        tokens.remaining,
        requests.limit,
        tokens.limit,
        rates.retry_after,
        inputs.reset,
        inputs.remaining,
        inputs.limit,
        outputs.reset,
        outputs.remaining,
        outputs.limit,
    )


def _token_dimension(rates: ProviderRates) -> Dimension:
    """The token dimension of the window and the Key message: the provider's overall
    one, else the more restrictive of input and output (the smaller share left). In a
    split table input and output are budgets of their own (``apply_rate_headers``)."""
    if rates.tokens.known:
        return rates.tokens
    known = [d for d in (rates.input_tokens, rates.output_tokens) if d.known]
    if len(known) < 2:
        return known[0] if known else rates.tokens

    def share(d: Dimension) -> float:
        if d.remaining is None:
            return math.inf
        return d.remaining / d.limit if d.limit else 0.0

    return min(known, key=share)


def _log_unparseable(key: Key, header: str, raw: str) -> None:
    _log.warning(
        "ignoring unparseable rate-limit header",
        extra={"key_hash": key.hash, "header": header, "value": _loggable(raw)},
    )


def apply_rate_headers(table: RateTable, row: int, parsed: RateHeaders, now: float) -> None:
    """Stores what the headers told in ``row``; a header that was not sent leaves its field alone.

    Resets are stored clamped to ``MAX_RESET`` for the rate-limit window. A
    dimension whose limit, remaining and reset came also sets the family's
    budget (``KeyPool`` docstring): what is left now, when the whole limit is
    back, and the refill rate until then, the slowest (limit - remaining) /
    reset reported since the limit was last whole, so that a fixed window (whose
    quota comes back only at its end) is not mistaken for a steady refill.

    In a split table (``RateTable.split``) an answer that brings input or output
    tokens sets their budgets, and the tokens dimension (the more restrictive of
    the two) is then no budget of its own: what it says is already in theirs,
    and reserving a request's whole size against it would hold the key back on
    the smaller limit for tokens that count against the other.
    """
    if parsed.requests_reset is not None:
        table.requests_reset[row] = min(parsed.requests_reset, MAX_RESET)
    if parsed.tokens_reset is not None:
        table.tokens_reset[row] = min(parsed.tokens_reset, MAX_RESET)
    retry_after = parsed.retry_after
    if retry_after is not None:
        # The upstream said how long to wait: the window is at least that, unclamped.
        for column in (table.requests_reset, table.tokens_reset):
            if not column[row] >= retry_after:  # also when unknown (NaN)
                column[row] = retry_after
    # Counts as the columns keep them: doubles, exact up to rates.MAX_COUNT.
    remaining_requests = parsed.remaining_requests
    if remaining_requests is not None:
        remaining_requests = min(remaining_requests, MAX_COUNT)
        table.remaining_requests[row] = remaining_requests
    remaining_tokens = parsed.remaining_tokens
    if remaining_tokens is not None:
        remaining_tokens = min(remaining_tokens, MAX_COUNT)
        table.remaining_tokens[row] = remaining_tokens
    if not table.family:  # the key-wide state: reports for no model have no budget
        return
    dimensions = [
        (table.budgets[0], remaining_requests, parsed.limit_requests, parsed.requests_reset),
        (table.budgets[1], remaining_tokens, parsed.limit_tokens, parsed.tokens_reset),
    ]
    split = table.split and not (parsed.remaining_input is None and parsed.remaining_output is None)
    if split:
        dimensions[1] = (table.budgets[1], None, None, None)
        for budget, left, limit, reset in (
            (table.budgets[2], parsed.remaining_input, parsed.limit_input, parsed.input_reset),
            (table.budgets[3], parsed.remaining_output, parsed.limit_output, parsed.output_reset),
        ):
            left = None if left is None else min(left, MAX_COUNT)
            dimensions.append((budget, left, limit, reset))
    elif remaining_requests is None and remaining_tokens is None:
        return
    if table.budget_at[row]:
        _reanchor(table, row, now)  # before one dimension changes without the other
    if split:
        _forget_dimension(table, row, table.budgets[1])
    for budget, left, limit, reset in dimensions:
        if left is None:
            continue
        # Within one refill (until the limit is whole again) the budget only learns
        # less: an answer that overtook an older one on the way back reports a
        # remaining from before the older one's request was counted.
        fresh = not _known(budget.limit[row]) or now >= budget.full_at[row]
        if limit is not None and reset is not None:
            limit = min(limit, MAX_COUNT)
            fresh = fresh or budget.limit[row] != limit
            refill = (limit - left) / reset if reset > 0 and left < limit else NOT_SET
            if fresh:
                _end_probation(table, row, budget)
                window = table.flags[row] & budget.window
                budget.rate[row] = refill if _known(refill) and not window else 0.0
            elif refill < budget.rate[row]:  # False for NaN
                budget.rate[row] = refill
            budget.limit[row] = limit
            full_at = now + min(reset, MAX_BUDGET_WAIT)
            if (
                not fresh
                and left == 0
                and reset <= MAX_BUDGET_WAIT  # not clamped
                and table.flags[row] & (budget.probation | budget.window) == budget.probation
            ):
                _tell_shape(table, row, budget, now, full_at)
            # Nor does an overtaken answer bring the end of the refill forward.
            if fresh or full_at > budget.full_at[row]:
                budget.full_at[row] = full_at
        if _known(budget.limit[row]):  # a budget is kept for the dimension
            # Never more than the limit, whatever the header said: what is left is
            # compared with what is needed before any refill is worked out.
            capped = min(left, budget.limit[row])
            # After _reanchor, ``left`` holds what the budget expected by now.
            budget.left[row] = capped if fresh else min(capped, budget.left[row])
            table.budget_at[row] = now


def _tell_shape(table: RateTable, row: int, budget: Budget, now: float, full_at: float) -> None:
    """Tells a fixed window from a token bucket by the end of the refill (``full_at``)
    that answers saying nothing is left name, once a 429 put the dimension on
    probation: a bucket that stays empty is whole again a full refill after each
    such answer, so that end moves on with the time; a window's stays where it was.

    The first such answer is the reference (``Budget.empty_at``); a later one at
    least ``2 / rate + 4 × RESET_GRAIN`` after it (a bucket's end can lag by the
    time one unit takes to refill, and each reset is rounded) decides: an end
    moved by less than half the time between marks a window, else the dimension
    is a bucket and its probation ends. Unlike the 429s themselves, this needs no
    guess at which hand-out an answer is for.
    """
    reference = budget.empty_at.get(row)
    if reference is None:
        budget.empty_at[row] = (now, full_at)
        return
    at, end = reference
    rate = budget.rate[row]
    elapsed = now - at
    if not rate > 0 or elapsed <= 2.0 / rate + 4 * RESET_GRAIN:  # NaN: no rate known
        return
    if full_at - end < elapsed / 2:
        table.flags[row] |= budget.window
        budget.rate[row] = 0.0
    else:
        _end_probation(table, row, budget)


def _end_probation(table: RateTable, row: int, budget: Budget) -> None:
    """Ends the dimension's probation (its refill came, or it is known anew)."""
    table.flags[row] &= ~budget.probation
    budget.empty_at.pop(row, None)
    if not table.flags[row] & PROBATIONS:
        table.probation_at.pop(row, None)


def limits_match(table: RateTable, row: int, parsed: RateHeaders) -> bool:
    """Whether the limits the headers name are those the family's budget knows (each
    known on both sides); False when none can be compared."""
    compared = False
    limits = (parsed.limit_requests, parsed.limit_tokens, parsed.limit_input, parsed.limit_output)
    for budget, limit in zip(table.budgets, limits[: len(table.budgets)], strict=True):
        known = budget.limit[row]
        if limit is not None and _known(known):
            if min(limit, MAX_COUNT) != known:
                return False
            compared = True
    return compared


def _reanchor(table: RateTable, row: int, now: float) -> None:
    """Moves the budget's reference time to ``now``: each dimension's left becomes
    what it has refilled to by then, so one dimension can be updated alone."""
    budget_at = table.budget_at[row]
    if budget_at and budget_at != now:
        for budget in table.budgets:
            if _known(budget.limit[row]):
                budget.left[row] = _refilled(budget, row, budget_at, now)
    table.budget_at[row] = now


def _refilled(budget: Budget, row: int, at: float, now: float) -> float:
    """What a budget that had ``left`` at ``at`` has at ``now``: the whole limit from
    ``full_at`` on, before then ``left`` plus the refill at ``rate``."""
    limit = budget.limit[row]
    if now >= budget.full_at[row]:
        return limit
    return min(limit, budget.left[row] + budget.rate[row] * (now - at))


def forget_budget(table: RateTable, row: int) -> None:
    """Forgets the family's budget (it lapsed): the throttle applies until the next answer."""
    table.budget_at[row] = 0.0
    table.flags[row] &= ~BUDGET_SHAPE
    for budget in table.budgets:
        _forget_dimension(table, row, budget)


def _forget_dimension(table: RateTable, row: int, budget: Budget) -> None:
    """Forgets one dimension's budget (the others are kept)."""
    budget.left[row] = budget.rate[row] = budget.limit[row] = NOT_SET
    budget.full_at[row] = 0.0
    table.flags[row] &= ~budget.window
    _end_probation(table, row, budget)


def _known(value: float) -> bool:
    """Whether a column value is set (not ``NOT_SET``, a NaN)."""
    return value == value


def mark(
    table: RateTable, row: int, now: float, kind: str = "", answered: float | None = None
) -> bool:
    """Records a 429 (of type ``kind``, "" if unknown) in ``row``; True when it is
    the first since the hand-out.

    A 429 is authoritative: a budgeted dimension it names is spent now, whatever
    the remaining header said, and refills from now at the rate it had. A 429 that
    does not say which limit it hit (MarkRateLimited), in a family with a budget,
    is taken for the limit the last answer left nothing of. The types
    ``input_tokens`` and ``output_tokens`` count in a split table only.

    ``answered`` is when the request the 429 answers was handed out (None: not
    known). Only a request sent after the 429 that emptied the budget tests the
    refill counted on since: its 429 says the refill did not come, and the
    dimension is then a fixed window. The 429s of requests already in flight
    before that one say nothing new: a burst sent to a key before its first
    answer (a plain Get hands out a busy key) comes back as a run of 429s, and a
    token bucket must not be taken for a window, which would wait out its whole
    reset.
    """
    flags = table.flags[row]
    first = not flags & SAW_RATE_LIMIT
    if not kind and table.budget_at[row]:
        if table.remaining_requests[row] == 0 and _known(table.requests_limit[row]):
            kind = "requests"
        elif table.remaining_tokens[row] == 0 and _known(table.tokens_limit[row]):
            kind = "tokens"
        elif table.split:
            names = ("input_tokens", "output_tokens")
            for name, split in zip(names, table.budgets[2:], strict=True):
                if split.left[row] == 0 and _known(split.limit[row]):
                    kind = name
                    break
    kind_bit = KIND_BITS.get(kind, 0)
    if kind_bit & (KIND_INPUT_TOKENS | KIND_OUTPUT_TOKENS) and not table.split:
        kind_bit = 0
    table.flags[row] = (flags & (HAS_STATE | BUDGET_SHAPE)) | SAW_RATE_LIMIT | kind_bit
    table.rate_limited_at[row] = now
    budget = next((b for b in table.budgets if b.kind == kind_bit), table.budgets[1])
    if kind_bit and _known(budget.limit[row]):
        # Nothing left now. A token bucket refills from here at the rate it had; a
        # fixed window only at its end: a 429 for a request sent after this one
        # tells them apart, and a window is then counted on to refill only at its ends.
        _reanchor(table, row, now)
        budget.left[row] = 0.0
        if not table.flags[row] & budget.probation:
            table.flags[row] |= budget.probation
            table.probation_at[row] = now
        elif answered is None or answered > table.probation_at.get(row, 0.0):
            table.flags[row] |= budget.window
            budget.rate[row] = 0.0
        if budget.full_at[row] <= now:
            budget.full_at[row] = now + RATE_LIMIT_FALLBACK
    return first


def window(table: RateTable, row: int) -> float:
    """How long after ``rate_limited_at`` the key stays locked (module docstring).

    A dimension (requests or tokens) with a known refill rate is left to the
    budget (``budget_until``): here it neither locks on its remaining nor,
    after a 429 of its type, on its reset. In a split table the tokens are left
    to the input and output budgets once either has a rate; a 429 of either
    type without a budget locks for the tokens' reset.
    """
    # On every hand-out and answer: ``x == x`` is ``_known(x)`` inlined.
    requests_reset, tokens_reset = table.requests_reset[row], table.tokens_reset[row]
    flags = table.flags[row]
    if flags & SAW_RATE_LIMIT:
        if flags & KIND_REQUESTS:
            rate = table.requests_rate[row]
            if rate == rate:
                return 0.0
            if requests_reset == requests_reset:
                return requests_reset
        elif flags & KIND_TOKENS:
            rate = table.tokens_rate[row]
            if rate == rate:
                return 0.0
            if tokens_reset == tokens_reset:
                return tokens_reset
        elif flags & (KIND_INPUT_TOKENS | KIND_OUTPUT_TOKENS):
            budget = table.budgets[2 if flags & KIND_INPUT_TOKENS else 3]
            if _known(budget.rate[row]):
                return 0.0
            if tokens_reset == tokens_reset:
                return tokens_reset
    else:
        remaining_requests = table.remaining_requests[row]
        remaining_tokens = table.remaining_tokens[row]
        if remaining_requests == remaining_requests or remaining_tokens == remaining_tokens:
            window = 0.0
            rate = table.requests_rate[row]
            if remaining_requests == 0 and rate != rate:
                window = requests_reset if requests_reset == requests_reset else RATE_LIMIT_FALLBACK
            rate = table.tokens_rate[row]
            if table.split and rate != rate:
                rate = _split_rate(table, row)
            if remaining_tokens == 0 and rate != rate:
                reset = tokens_reset if tokens_reset == tokens_reset else RATE_LIMIT_FALLBACK
                window = max(window, reset)
            return window
    if requests_reset == requests_reset:
        return max(requests_reset, tokens_reset) if tokens_reset == tokens_reset else requests_reset
    if tokens_reset == tokens_reset:
        return tokens_reset
    return RATE_LIMIT_FALLBACK if flags & SAW_RATE_LIMIT else 0.0


class Promise(NamedTuple):
    """A reservation held for a GetLockoutPeriod caller's next Get (``PROMISE_TTL``).

    It sits among the hand-outs' reservations, so the budget counts it like one,
    and ``at`` is set so that it lapses ``PROMISE_TTL`` after it was made (the
    reservations' own lapse rule). Not a hand-out: no answer releases it and no
    report is attributed to it.
    """

    at: float
    tokens: float


def promise(table: RateTable, row: int, now: float, tokens: float) -> Promise:
    """Holds one request's room of ``row``'s budget until ``now + PROMISE_TTL``."""
    held = Promise(now + PROMISE_TTL - RESERVATION_TTL, tokens)
    reserved = table.reserved.get(row)
    if reserved is None:
        reserved = table.reserved[row] = deque()
    # Oldest first, as the lapse rule needs: the promise lapses before most hand-outs.
    at = 0
    while at < len(reserved) and reserved[at][0] <= held.at:
        at += 1
    reserved.insert(at, held)
    return held


def holds(table: RateTable, row: int, held: Promise, now: float) -> bool:
    """Whether ``held`` still holds its room: not lapsed, not ended by a reset of the row."""
    return held.at + RESERVATION_TTL > now and any(
        entry is held for entry in table.reserved.get(row, ())
    )


def drop_promise(table: RateTable, row: int, held: Promise) -> bool:
    """Ends ``held`` (its caller's Get came); False when it had lapsed or gone already."""
    reserved = table.reserved.get(row)
    if not reserved:
        return False
    for at, entry in enumerate(reserved):
        if entry is held:
            del reserved[at]
            if not reserved:
                del table.reserved[row]
            return True
    return False


def oldest_hand_out(table: RateTable, row: int) -> float | None:
    """When ``row``'s oldest hand-out in flight was made (promises aside); None if none."""
    for entry in table.reserved.get(row, ()):
        if not isinstance(entry, Promise):
            return entry[0]
    return None


def _split_rate(table: RateTable, row: int) -> float:
    """A split table's input or output budget's refill rate; NaN when neither has one."""
    rate = table.input_rate[row]
    return rate if rate == rate else table.output_rate[row]


def release(table: RateTable, row: int) -> float | None:
    """Ends the oldest reservation of ``row`` (an answer came) and returns when its
    hand-out was made; None when there was none.

    Answers are not matched to hand-outs (a report names only the key and model);
    the oldest is the likeliest, and a mismatch only keeps a newer reservation a
    little longer than needed, which errs on the side of fewer 429s. Promises are
    not hand-outs and stay.
    """
    reserved = table.reserved.get(row)
    if not reserved:
        return None
    for at, entry in enumerate(reserved):
        if not isinstance(entry, Promise):
            del reserved[at]
            if not reserved:
                del table.reserved[row]
            return entry[0]
    return None


def budget_until(
    table: RateTable,
    row: int,
    tokens_needed: float,
    split_needed: tuple[float, float] = (1.0, 1.0),
) -> float:
    """When the family's budget covers the hand-outs in flight and one more; 0 if it does now.

    A hand-out needs 1 request and ``tokens_needed`` tokens (each one in flight
    what it reserved); in a split table also, each, ``split_needed``: its input
    and output tokens. Each budgeted dimension has, ``t`` seconds after
    ``budget_at``, what was left plus ``rate × t`` until its limit is whole
    again (``full_at``), then the whole limit. A reservation stops counting
    when it lapses, so the wait ends at the first time every dimension fits
    what is then still in flight (more in flight than the limit never fits
    before some lapse). The wait is capped at ``MAX_BUDGET_WAIT``.
    """
    reserved = table.reserved.get(row)
    in_flight = len(reserved) if reserved else 0
    reserved_tokens = sum(tokens for _, tokens in reserved) if reserved else 0.0
    budget_at = table.budget_at[row]
    until = 0.0
    for dimension, budget in enumerate(table.budgets):
        limit, left = budget.limit[row], budget.left[row]
        # limit != limit: no budget in the dimension (NaN).
        if limit != limit:
            continue
        if dimension == 0:
            needed = in_flight + 1.0
        elif dimension == 1:
            needed = reserved_tokens + tokens_needed
        else:  # input or output tokens: each hand-out in flight needs as much as the next
            needed = (in_flight + 1.0) * split_needed[dimension - 2]
        if needed <= left:
            continue
        fits = _fits_at(budget, row, budget_at, needed)
        if reserved:
            # Past a reservation's lapse, it no longer needs room.
            lapsed = 0.0
            for handed_out, tokens in reserved:
                lapse = handed_out + RESERVATION_TTL
                if fits <= lapse:
                    break
                lapsed = lapse
                if dimension == 0:
                    needed -= 1.0
                elif dimension == 1:
                    needed -= tokens
                else:
                    needed -= split_needed[dimension - 2]
                fits = _fits_at(budget, row, budget_at, needed)
            fits = max(fits, lapsed)
        if fits > until:
            until = fits
    if until == 0.0:
        return 0.0
    return min(until, budget_at + MAX_BUDGET_WAIT)


def _fits_at(budget: Budget, row: int, budget_at: float, needed: float) -> float:
    """When the dimension has ``needed`` (``_refilled``); inf if never (more than its limit)."""
    left = budget.left[row]
    if needed <= left:
        return budget_at
    if needed > budget.limit[row]:
        return math.inf
    rate = budget.rate[row]
    if rate > 0.0:
        return min(budget.full_at[row], budget_at + (needed - left) / rate)
    return budget.full_at[row]


def check_model(model: str) -> None:
    if not model:
        raise InvalidArgument("model", "is required")
    if len(model) > Limits.MODEL_LENGTH:
        raise InvalidArgument("model", f"is longer than {Limits.MODEL_LENGTH} characters")


#: Characters a duration or an RFC 3339 time is written with; a value with any
#: other character is not logged verbatim, in case a caller put something secret in it.
_DURATION_CHARS: Final = re.compile(r"[0-9.hmnsuµ+\-:TZtz]{0,40}")


def _loggable(value: str) -> str:
    if _DURATION_CHARS.fullmatch(value):
        return value
    return f"<{len(value)} characters, not shown>"


def check_headers(headers: Mapping[str, str]) -> None:
    if len(headers) > Limits.HEADER_COUNT:
        raise InvalidArgument("headers", f"more than {Limits.HEADER_COUNT} headers")
    for name, value in headers.items():
        if not name or len(name) > Limits.HEADER_NAME_LENGTH:
            raise InvalidArgument(
                "headers", f"header names must be 1 to {Limits.HEADER_NAME_LENGTH} characters"
            )
        if len(value) > Limits.HEADER_VALUE_LENGTH:
            raise InvalidArgument(
                "headers",
                f"header {name[:64]!r} is longer than {Limits.HEADER_VALUE_LENGTH} characters",
            )
