"""The rate-limit state and token usage of every (key, model family), column by column.

A pool of 100k keys in use in three families holds 300k of these states. As
objects (an object with its fields, each float and int an object of its own,
and the pool's queue entry) they took ~565 B each; here each field is one
column, an ``array`` with one 8-byte row per key, indexed by the key's
``seq``, so a state costs its numbers and nothing more (~110 B with the
pool's placement marks).

A family whose provider keeps input and output tokens apart (Anthropic) has a
table with two more budgets, input and output tokens (``RateTable.split``);
the columns of those exist only in such tables, so a pool of OpenAI keys pays
nothing for them.

The pool alone writes the columns; ``Key`` reads them through the book it
belongs to: as ``RateState`` snapshots (``Key.state_in`` and the like, for
tests and inspection) and, for the Key message of every Get, as one
``RateSummary`` (``RateBook.summary``). Times are epoch seconds, 0 meaning
never; an optional number is NaN when unknown.
"""

from __future__ import annotations

import math
from array import array
from collections import deque
from collections.abc import Container, Mapping
from typing import Final, NamedTuple

__all__ = ["NOT_SET", "Budget", "FamilyRates", "RateBook", "RateState", "RateSummary", "RateTable"]

#: An optional number that is not known (``None`` in a ``RateState``).
NOT_SET: Final = math.nan
#: ``RateTable.placed``: the key is in no queue of its family index ...
NOT_PLACED: Final = 0
#: ... in its queue of keys free or held only by the reuse throttle ...
READY: Final = 1
#: ... or in its queue of keys locked for longer.
LOCKED: Final = 2

# ``RateTable.flags`` bits.
#: The key has a state in the family (it was indexed or reported for it).
HAS_STATE: Final = 1
#: A 429 was reported since the hand-out ...
SAW_RATE_LIMIT: Final = 2
#: ... and its type was "requests" or "tokens".
KIND_REQUESTS: Final = 4
KIND_TOKENS: Final = 8
#: A 429 came for the dimension although its budget counted on a refill, once in
#: this refill (until the limit is whole again) ...
PROBATION_REQUESTS: Final = 16
PROBATION_TOKENS: Final = 32
#: ... and twice: its limit is a fixed window, whose quota comes back only at its
#: end; from then on no refill is counted on before then. Kept across hand-outs.
WINDOW_REQUESTS: Final = 64
WINDOW_TOKENS: Final = 128
#: A split table's (``RateTable.split``) input and output token budgets: the 429's
#: type, probation and fixed window as above. ``flags`` holds 16 bits a row.
KIND_INPUT_TOKENS: Final = 256
KIND_OUTPUT_TOKENS: Final = 512
PROBATION_INPUT_TOKENS: Final = 1024
PROBATION_OUTPUT_TOKENS: Final = 2048
WINDOW_INPUT_TOKENS: Final = 4096
WINDOW_OUTPUT_TOKENS: Final = 8192
#: Every probation bit.
PROBATIONS: Final = (
    PROBATION_REQUESTS | PROBATION_TOKENS | PROBATION_INPUT_TOKENS | PROBATION_OUTPUT_TOKENS
)
#: Every 429 type bit.
KINDS: Final = KIND_REQUESTS | KIND_TOKENS | KIND_INPUT_TOKENS | KIND_OUTPUT_TOKENS
#: The bits a hand-out keeps (the others describe the answers since the last one).
BUDGET_SHAPE: Final = (
    PROBATION_REQUESTS
    | PROBATION_TOKENS
    | WINDOW_REQUESTS
    | WINDOW_TOKENS
    | PROBATION_INPUT_TOKENS
    | PROBATION_OUTPUT_TOKENS
    | WINDOW_INPUT_TOKENS
    | WINDOW_OUTPUT_TOKENS
)
#: The 429 types ``mark`` knows, by name, and the bit of each.
KIND_BITS: Final = {
    "requests": KIND_REQUESTS,
    "tokens": KIND_TOKENS,
    "input_tokens": KIND_INPUT_TOKENS,
    "output_tokens": KIND_OUTPUT_TOKENS,
}

#: Token usage not counted yet in a family (``RateTable.usage``) ...
NO_USAGE: Final = -1
#: ... and where counting stops (the column holds 64-bit integers).
MAX_USAGE: Final = 2**63 - 1

#: Columns of floating-point numbers: name, the value a new row starts with, and
#: the array type: doubles ("d") for times and for what a Key message shows
#: exactly; singles ("f", 4 bytes, 7 digits) for the budget's estimates of what is
#: left and how fast it comes back, which are approximate anyway.
_FLOAT_COLUMNS: Final = (
    ("last_used", 0.0, "d"),
    ("rate_limited_at", 0.0, "d"),
    ("until", 0.0, "d"),
    ("requests_reset", NOT_SET, "d"),
    ("tokens_reset", NOT_SET, "d"),
    ("remaining_requests", NOT_SET, "d"),
    ("remaining_tokens", NOT_SET, "d"),
    ("budget_at", 0.0, "d"),
    ("budget_requests", NOT_SET, "f"),
    ("budget_tokens", NOT_SET, "f"),
    ("requests_rate", NOT_SET, "f"),
    ("tokens_rate", NOT_SET, "f"),
    ("requests_limit", NOT_SET, "d"),
    ("tokens_limit", NOT_SET, "d"),
    ("requests_full_at", 0.0, "d"),
    ("tokens_full_at", 0.0, "d"),
)
#: The columns only a split table has: its input and output token budgets.
_SPLIT_COLUMNS: Final = (
    ("budget_input", NOT_SET, "f"),
    ("budget_output", NOT_SET, "f"),
    ("input_rate", NOT_SET, "f"),
    ("output_rate", NOT_SET, "f"),
    ("input_limit", NOT_SET, "d"),
    ("output_limit", NOT_SET, "d"),
    ("input_full_at", 0.0, "d"),
    ("output_full_at", 0.0, "d"),
)

#: Each column's first row (a new row's values), to make tables of by repetition.
_FIRST_ROWS: Final = tuple((name, array(kind, [start])) for name, start, kind in _FLOAT_COLUMNS)
_SPLIT_FIRST_ROWS: Final = _FIRST_ROWS + tuple(
    (name, array(kind, [start])) for name, start, kind in _SPLIT_COLUMNS
)
_FLAGS_ROW: Final = array("H", [0])
_USAGE_ROW: Final = array("q", [NO_USAGE])

#: Remaining counts are kept as doubles, exact up to here; a larger header
#: value (the parser takes up to 18 digits) is stored as this.
MAX_COUNT: Final = 2**53


class RateState(NamedTuple):
    """A snapshot of a key's rate-limit state in one family ("" for key-wide).

    The fields are those of the ``KeyPool`` docstring; None where not known.
    The input and output token budgets are those of a split table (None elsewhere).
    """

    family: str
    #: When the key was last handed out for this family (0 for the key-wide state).
    last_used: float
    #: Start of the current rate-limit window: the hand-out, or the latest 429.
    rate_limited_at: float
    #: The key is locked (not preferred) for the family until then.
    until: float
    #: Since the hand-out: the last x-ratelimit-reset-* (seconds, clamped) ...
    requests_reset: float | None
    tokens_reset: float | None
    #: ... and x-ratelimit-remaining-* values.
    remaining_requests: int | None
    remaining_tokens: int | None
    #: A 429 was reported since the hand-out, and its type ("" when not told).
    saw_rate_limit: bool
    rate_limit_kind: str
    #: The family's budget: what remained when last reported, and its refill rates.
    budget_at: float
    budget_requests: float | None
    budget_tokens: float | None
    requests_rate: float | None
    tokens_rate: float | None
    #: Hand-outs not answered yet, oldest first: (when, tokens reserved); None when none.
    reserved: tuple[tuple[float, float], ...] | None
    #: The budget's limits, and when the last answer said each is whole again (0: unknown).
    requests_limit: float | None
    tokens_limit: float | None
    requests_full_at: float
    tokens_full_at: float
    budget_input: float | None = None
    budget_output: float | None = None
    input_rate: float | None = None
    output_rate: float | None = None
    input_limit: float | None = None
    output_limit: float | None = None
    input_full_at: float = 0.0
    output_full_at: float = 0.0


class FamilyRates(NamedTuple):
    """A key's rate-limit state in one family as the Key message shows it.

    The first fields of ``RateState``, but ``until`` counts a later key-wide
    lock; built per Get, so only what the message shows.
    """

    family: str
    last_used: float
    rate_limited_at: float
    #: When the key is free in the family: its own lock, or a later key-wide one.
    until: float
    requests_reset: float | None
    tokens_reset: float | None
    remaining_requests: int | None
    remaining_tokens: int | None


class RateSummary(NamedTuple):
    """A key's rate-limit state over every family and the key-wide state (``RateBook.summary``)."""

    #: The families where anything happened (a hand-out, a report), by name.
    families: list[FamilyRates]
    #: The latest hand-out or 429 in any family; 0 if never.
    rate_limited_at: float
    #: When the key is free in every family: the latest lock end; 0 if never locked.
    rate_limited_until: float
    #: The longest x-ratelimit-reset-* known (key-wide or any family).
    requests_reset: float | None
    tokens_reset: float | None
    #: Tokens counted per family (families never counted are left out).
    token_usage: dict[str, int]


class Budget(NamedTuple):
    """The columns of one dimension's budget (requests, tokens, and in a split table
    input and output tokens) in a ``RateTable``."""

    #: What was left at ``budget_at`` ...
    left: array[float]
    #: ... the refill per second until ``full_at`` ...
    rate: array[float]
    #: ... and the whole limit, back at ``full_at``. NaN: no budget in the dimension.
    limit: array[float]
    full_at: array[float]
    #: The dimension's ``PROBATION_*``, ``WINDOW_*`` and ``KIND_*`` flag bits.
    probation: int
    window: int
    kind: int
    #: On probation, the first answer since that said nothing was left: when it
    #: came, and the end of the refill it named (sparse: rows on probation only).
    empty_at: dict[int, tuple[float, float]]


class RateTable:
    """One family's state for every key: one row per key ``seq``, one column per field.

    Rows start as a key that was never used; a row without a state
    (``HAS_STATE`` unset) keeps ``until`` at 0, so lock ends need not ask.
    ``placed`` is the pool's mark of which queue of the family index holds the
    key's live entry. ``reserved`` (hand-outs not answered, for the budget) is
    sparse: most keys have none. ``flags`` holds 16 bits a row (2 bytes).

    A ``split`` table (a family whose provider keeps input and output tokens
    apart) has the columns of two more budgets, and ``budgets`` lists four:
    requests, tokens, input tokens, output tokens; other tables have the first two.
    """

    __slots__ = (
        "budget_at",
        "budget_input",
        "budget_output",
        "budget_requests",
        "budget_tokens",
        "budgets",
        "family",
        "flags",
        "input_full_at",
        "input_limit",
        "input_rate",
        "last_used",
        "output_full_at",
        "output_limit",
        "output_rate",
        "placed",
        "probation_at",
        "rate_limited_at",
        "remaining_requests",
        "remaining_tokens",
        "requests_full_at",
        "requests_limit",
        "requests_rate",
        "requests_reset",
        "reserved",
        "split",
        "tokens_full_at",
        "tokens_limit",
        "tokens_rate",
        "tokens_reset",
        "until",
        "usage",
    )

    def __init__(self, family: str, rows: int, *, split: bool = False) -> None:
        self.family = family
        self.split = split
        # From one-row arrays made once: a Redis backend builds a one-row table for
        # each family of every key it hands out, and ``array(kind, [start])`` per
        # column took most of a Get's own work in Python.
        for name, first_row in _SPLIT_FIRST_ROWS if split else _FIRST_ROWS:
            setattr(self, name, first_row * rows)
        self.flags = _FLAGS_ROW * rows
        self.placed = bytearray(rows)
        self.usage = _USAGE_ROW * rows
        self.reserved: dict[int, deque[tuple[float, float]]] = {}
        #: When a 429 last put a budget of the row on probation (sparse, like
        #: ``reserved``: only rows with a ``PROBATION_*`` bit set).
        self.probation_at: dict[int, float] = {}
        #: Each budget's columns (the arrays grow in place).
        requests = (self.requests_rate, self.requests_limit, self.requests_full_at)
        tokens = (self.tokens_rate, self.tokens_limit, self.tokens_full_at)
        self.budgets: tuple[Budget, ...] = (
            Budget(
                self.budget_requests,
                *requests,
                PROBATION_REQUESTS,
                WINDOW_REQUESTS,
                KIND_REQUESTS,
                {},
            ),
            Budget(self.budget_tokens, *tokens, PROBATION_TOKENS, WINDOW_TOKENS, KIND_TOKENS, {}),
        )
        if split:
            inputs = (self.input_rate, self.input_limit, self.input_full_at)
            outputs = (self.output_rate, self.output_limit, self.output_full_at)
            self.budgets += (
                Budget(
                    self.budget_input,
                    *inputs,
                    PROBATION_INPUT_TOKENS,
                    WINDOW_INPUT_TOKENS,
                    KIND_INPUT_TOKENS,
                    {},
                ),
                Budget(
                    self.budget_output,
                    *outputs,
                    PROBATION_OUTPUT_TOKENS,
                    WINDOW_OUTPUT_TOKENS,
                    KIND_OUTPUT_TOKENS,
                    {},
                ),
            )

    def _columns(self) -> tuple[tuple[str, float, str], ...]:
        return (*_FLOAT_COLUMNS, *_SPLIT_COLUMNS) if self.split else _FLOAT_COLUMNS

    # The columns, typed for mypy (set in __init__ by name).
    last_used: array[float]
    rate_limited_at: array[float]
    until: array[float]
    requests_reset: array[float]
    tokens_reset: array[float]
    remaining_requests: array[float]
    remaining_tokens: array[float]
    budget_at: array[float]
    budget_requests: array[float]
    budget_tokens: array[float]
    requests_rate: array[float]
    tokens_rate: array[float]
    requests_limit: array[float]
    tokens_limit: array[float]
    requests_full_at: array[float]
    tokens_full_at: array[float]
    # A split table's only.
    budget_input: array[float]
    budget_output: array[float]
    input_rate: array[float]
    output_rate: array[float]
    input_limit: array[float]
    output_limit: array[float]
    input_full_at: array[float]
    output_full_at: array[float]

    def __len__(self) -> int:
        return len(self.flags)

    def grow(self, rows: int) -> None:
        """Adds rows up to ``rows`` in all (a never-used key in each)."""
        more = rows - len(self.flags)
        if more <= 0:
            return
        for name, start, kind in self._columns():
            column: array[float] = getattr(self, name)
            column.extend(array(kind, [start]) * more)
        self.flags.extend(array("H", [0]) * more)
        self.placed.extend(bytes(more))
        self.usage.extend(array("q", [NO_USAGE]) * more)

    def has_state(self, row: int) -> bool:
        return bool(self.flags[row] & HAS_STATE)

    def reset(self, row: int) -> None:
        """Forgets the row's rate-limit state (not its usage nor placement)."""
        for name, start, _ in self._columns():
            column: array[float] = getattr(self, name)
            column[row] = start
        self.flags[row] = 0
        self.reserved.pop(row, None)
        self.probation_at.pop(row, None)
        for budget in self.budgets:
            budget.empty_at.pop(row, None)

    def snapshot(self, row: int) -> RateState:
        flags = self.flags[row]
        kind = next((name for name, bit in KIND_BITS.items() if flags & bit), "")
        reserved = self.reserved.get(row)
        state = RateState(
            self.family,
            self.last_used[row],
            self.rate_limited_at[row],
            self.until[row],
            _optional(self.requests_reset[row]),
            _optional(self.tokens_reset[row]),
            _optional_count(self.remaining_requests[row]),
            _optional_count(self.remaining_tokens[row]),
            bool(flags & SAW_RATE_LIMIT),
            kind,
            self.budget_at[row],
            _optional(self.budget_requests[row]),
            _optional(self.budget_tokens[row]),
            _optional(self.requests_rate[row]),
            _optional(self.tokens_rate[row]),
            tuple(reserved) if reserved else None,
            _optional(self.requests_limit[row]),
            _optional(self.tokens_limit[row]),
            self.requests_full_at[row],
            self.tokens_full_at[row],
        )
        if not self.split:
            return state
        return state._replace(
            budget_input=_optional(self.budget_input[row]),
            budget_output=_optional(self.budget_output[row]),
            input_rate=_optional(self.input_rate[row]),
            output_rate=_optional(self.output_rate[row]),
            input_limit=_optional(self.input_limit[row]),
            output_limit=_optional(self.output_limit[row]),
            input_full_at=self.input_full_at[row],
            output_full_at=self.output_full_at[row],
        )


def _optional(value: float) -> float | None:
    """A column's value, None for NaN (its "not set"); ``x != x`` only for NaN."""
    return None if value != value else value


def _optional_count(value: float) -> int | None:
    return None if value != value else int(value)


class RateBook:
    """Every family's ``RateTable`` (and the key-wide one, family ""), with a row per key.

    A table is made the first time a family has something to keep, with a row
    for every key so far; ``add_row`` gives every table a row for a new key.
    """

    __slots__ = ("rows", "split", "tables", "wide")

    def __init__(self, *, split: Container[str] = ()) -> None:
        """``split``: the families whose tables keep input and output token budgets."""
        self.split = split
        self.tables: dict[str, RateTable] = {}
        #: The key-wide table; None until a report names no model.
        self.wide: RateTable | None = None
        self.rows = 0

    def add_row(self, row: int) -> None:
        """Makes room for a key whose ``seq`` is ``row``."""
        if row < self.rows:
            return
        self.rows = row + 1
        # A table made from now on has exactly ``rows`` rows; one that must grow
        # grows by an eighth at least, so adding keys one by one stays linear.
        for table in (*self.tables.values(), self.wide):
            if table is not None and len(table) < self.rows:
                table.grow(max(self.rows, len(table) + len(table) // 8 + 16))

    def clear_row(self, row: int) -> None:
        """Makes ``row`` a never-used key's again in every table (its key left the pool,
        and the row will serve another)."""
        for table in (*self.tables.values(), self.wide):
            if table is not None:
                table.reset(row)
                table.usage[row] = NO_USAGE
                table.placed[row] = NOT_PLACED

    def table(self, family: str) -> RateTable:
        """The table of ``family`` ("" for key-wide), made if there is none yet."""
        if not family:
            if self.wide is None:
                self.wide = RateTable("", self.rows)
            return self.wide
        return self._family_table(family)

    def _family_table(self, family: str) -> RateTable:
        # Usage is by the family name callers give, "" included (never key-wide).
        table = self.tables.get(family)
        if table is None:
            table = self.tables[family] = RateTable(family, self.rows, split=family in self.split)
            # Kept in family order, the order the Key message lists them in.
            self.tables = dict(sorted(self.tables.items()))
        return table

    def get(self, family: str) -> RateTable | None:
        return self.tables.get(family) if family else self.wide

    # Reads for Key: copies, never the columns themselves.

    def state(self, row: int, family: str) -> RateState | None:
        table = self.get(family)
        return table.snapshot(row) if table is not None and table.has_state(row) else None

    def states(self, row: int) -> list[RateState]:
        return [t.snapshot(row) for t in self.tables.values() if t.flags[row] & HAS_STATE]

    def summary(self, row: int) -> RateSummary:
        """What the Key message shows of key ``row``, read in one pass over the columns
        (it is built for every Get's reply)."""
        rate_limited_at = latest_until = wide_until = 0.0
        max_requests_reset = max_tokens_reset = NOT_SET
        wide = self.wide
        if wide is not None and wide.flags[row] & HAS_STATE:
            rate_limited_at = wide.rate_limited_at[row]
            latest_until = wide_until = wide.until[row]
            max_requests_reset = wide.requests_reset[row]
            max_tokens_reset = wide.tokens_reset[row]
        families: list[FamilyRates] = []
        usage: dict[str, int] = {}
        for family, table in self.tables.items():
            tokens = table.usage[row]
            if tokens != NO_USAGE:
                usage[family] = tokens
            if not table.flags[row] & HAS_STATE:
                continue
            last_used = table.last_used[row]
            at = table.rate_limited_at[row]
            until = table.until[row]
            requests_reset = table.requests_reset[row]
            tokens_reset = table.tokens_reset[row]
            remaining_requests = table.remaining_requests[row]
            remaining_tokens = table.remaining_tokens[row]
            if at > rate_limited_at:
                rate_limited_at = at
            if until > latest_until:
                latest_until = until
            # x == x: known (not NaN); "not x <= best" also holds while best is NaN.
            if requests_reset == requests_reset and not requests_reset <= max_requests_reset:
                max_requests_reset = requests_reset
            if tokens_reset == tokens_reset and not tokens_reset <= max_tokens_reset:
                max_tokens_reset = tokens_reset
            if not (
                last_used
                or at
                or table.budget_at[row]
                or requests_reset == requests_reset
                or tokens_reset == tokens_reset
                or remaining_requests == remaining_requests
                or remaining_tokens == remaining_tokens
            ):
                continue  # indexed for the family, nothing happened there yet
            # On every Get: NaN tests inline (not ``_optional``), and tuple.__new__
            # without the argument handling of FamilyRates(...): ~0.4 µs less.
            rates: FamilyRates = tuple.__new__(
                FamilyRates,
                (
                    family,
                    last_used,
                    at,
                    wide_until if wide_until > until else until,
                    None if requests_reset != requests_reset else requests_reset,
                    None if tokens_reset != tokens_reset else tokens_reset,
                    None if remaining_requests != remaining_requests else int(remaining_requests),
                    None if remaining_tokens != remaining_tokens else int(remaining_tokens),
                ),
            )
            families.append(rates)
        summary: RateSummary = tuple.__new__(
            RateSummary,
            (
                families,
                rate_limited_at,
                latest_until,
                None if max_requests_reset != max_requests_reset else max_requests_reset,
                None if max_tokens_reset != max_tokens_reset else max_tokens_reset,
                usage,
            ),
        )
        return summary

    def lock_end(self, table: RateTable | None, row: int) -> float:
        """When key ``row`` is free in the family of ``table`` (None: a family with
        no table yet): its own lock, or a later key-wide one."""
        until = 0.0 if table is None else table.until[row]
        wide = self.wide
        if wide is not None and wide.until[row] > until:
            return wide.until[row]
        return until

    def latest_until(self, row: int) -> float:
        """The latest lock end over every family and the key-wide state; 0 if never locked."""
        until = 0.0
        for table in (*self.tables.values(), self.wide):
            if table is not None and table.until[row] > until:
                until = table.until[row]
        return until

    def usage(self, row: int) -> dict[str, int]:
        """Tokens counted per family (families never counted are left out)."""
        return {
            family: table.usage[row]
            for family, table in self.tables.items()
            if table.usage[row] != NO_USAGE
        }

    def set_usage(self, row: int, usage: Mapping[str, int]) -> None:
        for table in self.tables.values():
            table.usage[row] = NO_USAGE
        for family, tokens in usage.items():
            self._family_table(family).usage[row] = min(tokens, MAX_USAGE)

    def add_usage(self, row: int, family: str, tokens: int) -> None:
        usage = self._family_table(family).usage
        before = usage[row]
        after = tokens if before == NO_USAGE else before + tokens
        usage[row] = min(after, MAX_USAGE)
