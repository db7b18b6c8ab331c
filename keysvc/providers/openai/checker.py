"""How the key checker asks OpenAI about a key: three calls at once, none costing a token.

1. ``GET /models`` — the key's model ids, hence its families (gpt4-32k only
   when listed);
2. ``POST /chat/completions`` with ``babbage-002`` and ``max_tokens: -1`` — a
   live key is refused with 400 before any model runs; 401 and 429 tell revoked
   and out-of-quota keys apart; ``x-ratelimit-limit-requests`` <= 250 means a
   trial key;
3. ``GET /organizations`` — the default organization, and one clone of the key
   per other organization (own hash, own check).

A call that gets no usable answer (network error, 403/404/5xx, a body that is
not OpenAI's) is a RETRY; the checker retries the key later.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Final

import httpx

from ...keys import DisableReason, Key
from ..base import CheckReport, Outcome, Prober, Verdict, request_json
from .headers import LIMIT_REQUESTS_HEADER
from .outcomes import dead_key_reason, upstream_error

__all__ = [
    "DEFAULT_REQUEST_LIMIT",
    "LIVENESS_REQUEST",
    "TRIAL_REQUEST_LIMIT",
    "OpenAIProber",
    "classify",
    "is_trial_limit",
]

_log = logging.getLogger("keysvc.checker")

#: The liveness probe: refused with 400 (max_tokens below minimum) by a live key, so free.
LIVENESS_REQUEST: Final[Mapping[str, Any]] = {
    "model": "babbage-002",
    "max_tokens": -1,
    "messages": [{"role": "user", "content": ""}],
}
#: Request limit assumed when the header is missing or unreadable.
DEFAULT_REQUEST_LIMIT: Final = 3500
#: Keys whose request limit is at most this are trial keys.
TRIAL_REQUEST_LIMIT: Final = 250
#: /organizations errors that only mean the key cannot list organizations.
IGNORED_ORGANIZATION_ERRORS: Final = frozenset({"invalid_api_key", "no_organization"})
ORGANIZATION_HEADER: Final = "OpenAI-Organization"


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


@dataclass(frozen=True, slots=True)
class _Answer:
    """One call's outcome and, when it succeeded, what it returned."""

    outcome: Outcome
    data: Any = None


class OpenAIProber(Prober):
    """The three calls of the module docstring against the API at ``base_url``."""

    def __init__(self, base_url: str) -> None:
        self.base_url = base_url.rstrip("/") + "/"

    async def check(self, client: httpx.AsyncClient, key: Key) -> CheckReport:
        models, liveness, organizations = await asyncio.gather(
            self._models(client, key),
            self._liveness(client, key),
            self._organizations(client, key),
        )
        dead = next(
            (a.outcome for a in (liveness, models) if a.outcome.verdict is Verdict.DEAD), None
        )
        if dead is not None:
            return CheckReport(dead)
        if liveness.outcome.verdict is Verdict.RETRY:
            return CheckReport(
                Outcome(Verdict.RETRY, problem=f"liveness: {liveness.outcome.problem}")
            )
        orgs: list[tuple[str, bool]] | None = organizations.data
        default_org: str | None = None
        other_orgs: list[str] = []
        if orgs:
            defaults = [org for org, is_default in orgs if is_default]
            if defaults:
                default_org = defaults[0]
                other_orgs = [org for org, is_default in orgs if not is_default]
        missing = [
            f"{name}: {answer.outcome.problem}"
            for name, answer in (("models", models), ("organizations", organizations))
            if answer.data is None and answer.outcome.verdict is not Verdict.ALIVE
        ]
        return CheckReport(
            liveness.outcome,
            model_ids=models.data,
            is_trial=bool(liveness.data),
            organization_id=default_org,
            other_organizations=other_orgs,
            missing=missing,
        )

    def _headers(self, key: Key) -> dict[str, str]:
        headers = {"Authorization": f"Bearer {key.secret}"}
        if key.cloned_from and key.organization_id and "svcacct" not in key.secret:
            headers[ORGANIZATION_HEADER] = key.organization_id
        return headers

    async def _call(
        self,
        client: httpx.AsyncClient,
        method: str,
        path: str,
        key: Key,
        json: Mapping[str, Any] | None = None,
    ) -> tuple[httpx.Response, object] | Outcome:
        """One request; the response and its JSON body (None if not JSON), or a RETRY."""
        return await request_json(
            client, method, self.base_url + path, path, self._headers(key), json
        )

    async def _liveness(self, client: httpx.AsyncClient, key: Key) -> _Answer:
        """data: whether the key is trial-level."""
        result = await self._call(client, "POST", "chat/completions", key, LIVENESS_REQUEST)
        if isinstance(result, Outcome):
            return _Answer(result)
        response, body = result
        trial = is_trial_limit(response.headers)
        if response.is_success:
            if not isinstance(body, dict):
                return _Answer(Outcome(Verdict.RETRY, problem=f"HTTP {response.status_code} body"))
            return _Answer(Outcome(Verdict.ALIVE), trial)
        return _Answer(classify(response.status_code, body, trial=trial), trial)

    async def _models(self, client: httpx.AsyncClient, key: Key) -> _Answer:
        """data: the listed model ids."""
        result = await self._call(client, "GET", "models", key)
        if isinstance(result, Outcome):
            return _Answer(result)
        response, body = result
        if response.status_code == 200:
            items = list_data(body)
            ids = [item["id"] for item in items or () if isinstance(item.get("id"), str)]
            if items is None or not ids:
                return _Answer(Outcome(Verdict.RETRY, problem="models: not a model list"))
            return _Answer(Outcome(Verdict.ALIVE), ids)
        outcome = classify(response.status_code, body, trial=is_trial_limit(response.headers))
        if outcome.verdict is Verdict.ALIVE:  # a 400 here says nothing about access
            outcome = Outcome(Verdict.RETRY, problem=outcome.problem)
        return _Answer(outcome)

    async def _organizations(self, client: httpx.AsyncClient, key: Key) -> _Answer:
        """data: (organization id, is default) pairs, or None when not learned."""
        if key.cloned_from:
            # A clone already is one organization of its parent, which lists them all.
            return _Answer(Outcome(Verdict.ALIVE))
        result = await self._call(client, "GET", "organizations", key)
        if isinstance(result, Outcome):
            return _Answer(result)
        response, body = result
        if response.status_code == 200:
            items = list_data(body)
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


def list_data(body: object) -> list[dict[str, Any]] | None:
    """The ``data`` objects of a list body (OpenAI's and Anthropic's), or None."""
    if not isinstance(body, dict) or not isinstance(body.get("data"), list):
        return None
    return [item for item in body["data"] if isinstance(item, dict)]
