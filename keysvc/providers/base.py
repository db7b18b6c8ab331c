"""What every provider gives keysvc, in provider-neutral terms.

The pool and the server see only these types: ``RateHeaders`` (what an answer's
rate-limit headers say, as numbers), ``UpstreamError`` and ``Decision`` (what an
answer means), and, for the key checker, ``Outcome``, ``CheckReport`` and the
``Prober`` a provider checks keys with.
"""

from __future__ import annotations

import enum
import re
from abc import ABC, abstractmethod
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, NamedTuple

import httpx

from ..keys import DisableReason

if TYPE_CHECKING:
    from ..keys import Key
    from . import Identity

__all__ = [
    "CheckReport",
    "request_json",
    "Decision",
    "Dimension",
    "ModelRule",
    "ModelTableError",
    "Outcome",
    "OutcomeAction",
    "ParsedHeaders",
    "Prober",
    "Provider",
    "RateHeaders",
    "UpstreamError",
    "Verdict",
    "parse_count",
]


# -- model table rows ---------------------------------------------------------------


class ModelTableError(ValueError):
    """The operator's model table is malformed."""


@dataclass(frozen=True, slots=True)
class ModelRule:
    """One row: models whose name matches ``pattern`` belong to ``family``.

    Attributes:
        pattern: a regular expression, matched at the start of the model name.
        family: the model family.
        embeddings: the model is an embeddings model (trial keys never serve it).
        provider: the provider whose keys serve the family (``Key.service``).
    """

    pattern: str
    family: str
    embeddings: bool = False
    provider: str = "openai"

    def __post_init__(self) -> None:
        if not self.family:
            raise ModelTableError(f"rule {self.pattern!r} has an empty family")
        try:
            re.compile(self.pattern)
        except re.error as exc:
            raise ModelTableError(
                f"rule {self.pattern!r} is not a regular expression: {exc}"
            ) from exc


# -- rate-limit headers ----------------------------------------------------------


class Dimension(NamedTuple):
    """One limited quantity (requests, tokens, ...) as one answer reported it.

    Attributes:
        limit: the whole quota of the window.
        remaining: what was left when the upstream answered.
        reset: seconds from the answer until the quota is whole again.
    """

    limit: int | None = None
    remaining: int | None = None
    reset: float | None = None

    @property
    def known(self) -> bool:
        return not (self.limit is None and self.remaining is None and self.reset is None)


NO_DIMENSION = Dimension()


class RateHeaders(NamedTuple):
    """An answer's rate-limit headers, read into provider-neutral numbers.

    ``tokens`` is the dimension a provider counts all tokens in (OpenAI's only
    one; Anthropic's most restrictive of input and output); ``input_tokens`` and
    ``output_tokens`` are separate budgets where the provider keeps them apart.
    ``retry_after``: seconds the upstream asked the caller to wait.
    """

    requests: Dimension = NO_DIMENSION
    tokens: Dimension = NO_DIMENSION
    input_tokens: Dimension = NO_DIMENSION
    output_tokens: Dimension = NO_DIMENSION
    retry_after: float | None = None

    @property
    def empty(self) -> bool:
        return self.retry_after is None and not any(
            d.known for d in (self.requests, self.tokens, self.input_tokens, self.output_tokens)
        )


class ParsedHeaders(NamedTuple):
    """``Provider.parse_rate_headers``' answer: the numbers (None when the answer
    had no rate-limit header), and the headers it could not read (name, raw value).
    A tuple, not a dataclass: one is made for every report."""

    rates: RateHeaders | None
    unreadable: tuple[tuple[str, str], ...] = ()


def parse_count(raw: str) -> int | None:
    """A non-negative decimal count, or None (no sign, no fraction, at most 18 digits)."""
    text = raw.strip()
    if not (text.isascii() and text.isdigit() and len(text) <= 18):
        return None
    return int(text)


# -- answers ------------------------------------------------------------------------


class OutcomeAction(enum.Enum):
    """What the proxy should do with the request after the upstream answered."""

    DONE = "done"
    RETRY_WITH_ANOTHER_KEY = "retry_with_another_key"
    RETURN_ERROR = "return_error"


@dataclass(frozen=True, slots=True)
class UpstreamError:
    """The ``error`` object of an error body; empty strings when absent."""

    type: str = ""
    code: str = ""
    message: str = ""

    def names(self, *names: str) -> bool:
        """Whether the error's type or code is one of ``names``."""
        return self.type in names or self.code in names


@dataclass(frozen=True, slots=True)
class Decision:
    """What a provider concluded about one answer.

    Attributes:
        action: what the proxy should do with the request.
        disable: disable the key for this reason; None leaves it in service.
        rate_limited: mark the key rate limited for the model's family.
        count_usage: add the answer's tokens to the key's usage.
        why: a short explanation for logs and the reply (never a secret).
        quota_until: with ``disable`` QUOTA: the time (epoch seconds) the
            provider named for the quota to come back; the key returns to
            service on its own then. None: until a recheck.
        overloaded: the provider, not the key, is overloaded: leave the key
            alone, count it, and back off from the whole provider.
        family_denied: the key may not use the model's family: take it out of
            that family only.
        retry_after: seconds the proxy should wait before retrying (the
            provider-wide back-off of an overload); set by the pool.
        limit_kind: with ``rate_limited``, the limit the 429 names ("requests",
            "tokens"; "" when it does not say, and the pool infers it).
    """

    action: OutcomeAction
    disable: DisableReason | None = None
    rate_limited: bool = False
    count_usage: bool = False
    why: str = ""
    quota_until: float | None = None
    overloaded: bool = False
    family_denied: bool = False
    retry_after: float | None = None
    limit_kind: str = ""


# -- the key checker ----------------------------------------------------------------


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


@dataclass(slots=True)
class CheckReport:
    """What one check of one key learned, for the checker to apply to the pool.

    Attributes:
        outcome: DEAD (with a reason), RETRY (nothing learned), or ALIVE/BUSY.
        model_ids: the model ids the key may use; None when not learned.
        is_trial: the key is trial-level (its limits say so).
        organization_id: the key's default organization, when learned.
        other_organizations: organizations to clone the key for.
        missing: parts that could not be read ("models: HTTP 503"): retried later.
        tier: the rate tier its limits suggest ("" when unknown); logged.
    """

    outcome: Outcome
    model_ids: list[str] | None = None
    is_trial: bool = False
    organization_id: str | None = None
    other_organizations: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    tier: str = ""


async def request_json(
    client: httpx.AsyncClient,
    method: str,
    url: str,
    path: str,
    headers: Mapping[str, str],
    json: Mapping[str, Any] | None = None,
) -> tuple[httpx.Response, object] | Outcome:
    """One checker request to ``url`` (``path`` names it in a problem): the response and
    its JSON body (None if not JSON), or a RETRY when no answer came."""
    try:
        response = await client.request(method, url, headers=headers, json=json)
    except httpx.HTTPError as exc:
        # The exception's text names the URL only, never the headers holding the key.
        return Outcome(Verdict.RETRY, problem=f"{path.split('?')[0]}: {type(exc).__name__}")
    try:
        body: object = response.json()
    except ValueError:
        body = None
    return response, body


class Prober(ABC):
    """Checks one key of its provider over the checker's HTTP client."""

    @abstractmethod
    async def check(self, client: httpx.AsyncClient, key: Key) -> CheckReport:
        """Asks the upstream about ``key``; never raises for an upstream's answer
        or a network error (those are a RETRY report)."""


# -- the provider ----------------------------------------------------------------------


class Provider(ABC):
    """One upstream API."""

    identity: Identity
    #: The provider's model table rows (``keysvc.models``), first match wins.
    rules: tuple[ModelRule, ...]
    #: Family of a model id the upstream lists that no rule matches.
    listed_default_family: str
    #: Families only the checker can grant (an unchecked key does not have them).
    checked_only_families: frozenset[str] = frozenset()
    #: Response headers the provider's rate-limit parsing reads: these prefixes
    #: (a proxy in front, such as Envoy's ext_proc, passes them on).
    rate_header_prefixes: tuple[str, ...] = ()
    #: The provider limits input and output tokens apart: its families keep a
    #: budget for each (``keysvc.rates.RateTable.split``).
    split_token_budgets: bool = False
    #: Its rate-limit resets are times (read as the seconds from the answer to
    #: then), not durations: a shared pool reads them again on its own clock.
    reset_times: bool = False

    @property
    def name(self) -> str:
        return self.identity.name

    @abstractmethod
    def parse_rate_headers(self, headers: Mapping[str, str], now: float) -> ParsedHeaders:
        """Reads an answer's rate-limit headers (names lower-case) at time ``now``."""

    @abstractmethod
    def upstream_error(self, body: object) -> UpstreamError | None:
        """The error of an error body in the provider's shape, else None."""

    @abstractmethod
    def decide(self, status: int, error: UpstreamError, *, now: float) -> Decision:
        """What an answer with HTTP ``status`` and ``error`` means (its error table)."""

    @abstractmethod
    def credential_headers(self, secret: str) -> tuple[tuple[str, str], ...]:
        """The request headers (lower-case names) that carry the key upstream."""

    @abstractmethod
    def prober(self, base_url: str) -> Prober:
        """The key checker's prober for the API at ``base_url``."""
