"""How the key checker asks Anthropic about a key: free calls only, no token spent.

1. ``GET /models?limit=1000`` — the model ids the key's organisation may use,
   hence its families. Listing models is free and not counted against the
   Messages rate limits. A 401 here already says the key is revoked.
2. ``POST /messages/count_tokens``, at once for one listed model of each Claude
   family, with a one-character message. Anthropic documents token counting as
   free of charge, with a requests-per-minute limit of its own (per usage tier
   100, 2,000, 4,000, 8,000), separate from the Messages limits, so the probes
   spend neither tokens nor the key's message quota (at most one per family:
   four per check).

What the calls can tell:

- liveness: 200 from count_tokens is a live key; 401 (``authentication_error``)
  a revoked one;
- access: the listed models give the families; a 403 (``permission_error``) or
  404 on a family's probe takes that family out (the key stays alive);
- a rate tier: count_tokens' own ``anthropic-ratelimit-requests-limit`` maps
  onto the tier table above (``tier``); at most 5 requests a minute marks a
  trial-level key.

What they cannot tell, by Anthropic's documentation: whether the organisation's
monthly spend limit is reached or its prepaid credit is spent — those show on
a Messages request (400/429 naming the limit, or "credit balance is too low"),
which costs tokens. When count_tokens answers with one of those errors, the
key is put over quota as ReportOutcome would; otherwise a key whose quota is
gone is found by the first proxy report, and that report's time (or the next
month) brings it back. The Messages rate limits are likewise learned from
the proxies' reports, not from the check.
"""

from __future__ import annotations

import asyncio
import logging
import re
from collections.abc import Mapping
from typing import Any, Final

import httpx

from ...keys import Key
from ..base import CheckReport, Outcome, Prober, Verdict, parse_count, request_json
from ..openai.checker import list_data
from .models import CLAUDE_HAIKU, CLAUDE_OPUS, CLAUDE_SONNET, RULES
from .outcomes import dead_key_reason, upstream_error

__all__ = [
    "API_VERSION",
    "AnthropicProber",
    "TRIAL_REQUEST_LIMIT",
    "classify",
    "probe_model",
    "probe_models",
    "tier_of",
]

_log = logging.getLogger("keysvc.checker")

#: The API version every request names (``anthropic-version``).
API_VERSION: Final = "2023-06-01"
#: count_tokens' requests-per-minute limit at each usage tier, lowest first.
COUNT_TOKENS_TIERS: Final = ((100, "tier-1"), (2000, "tier-2"), (4000, "tier-3"), (8000, "tier-4"))
#: A key allowed at most this many count_tokens requests a minute is trial-level.
TRIAL_REQUEST_LIMIT: Final = 5
#: Cheapest family first: the family of the model count_tokens is asked about.
_PROBE_ORDER: Final = (CLAUDE_HAIKU, CLAUDE_SONNET, CLAUDE_OPUS)
_RULES: Final = tuple((re.compile(rule.pattern), rule.family) for rule in RULES)


def classify(status: int, body: object) -> Outcome:
    """What a non-2xx answer to a check says about the key."""
    error = upstream_error(body)
    if error is None:
        return Outcome(Verdict.RETRY, problem=f"HTTP {status} without an Anthropic error body")
    label = f"HTTP {status} {error.type}"
    reason = dead_key_reason(status, error)
    if reason is not None:
        return Outcome(Verdict.DEAD, reason, label)
    if status == 429:
        return Outcome(Verdict.BUSY, problem=label)
    if status in (400, 403, 404):
        # The request was authenticated and judged: the key is alive (a 403 or
        # 404 only says the probed model is not the key's).
        return Outcome(Verdict.ALIVE, problem=label)
    return Outcome(Verdict.RETRY, problem=label)


def tier_of(headers: Mapping[str, str]) -> tuple[str, bool]:
    """The usage tier count_tokens' request limit suggests ("" when unknown), and
    whether the key is trial-level."""
    raw = headers.get("anthropic-ratelimit-requests-limit")
    limit = parse_count(raw) if raw is not None else None
    if limit is None:
        return "", False
    for most, tier in COUNT_TOKENS_TIERS:
        if limit <= most:
            return tier, limit <= TRIAL_REQUEST_LIMIT
    return "custom", False


def probe_models(model_ids: list[str]) -> dict[str, str]:
    """One listed model per Claude family (the first listed), cheapest family first."""
    families: dict[str, str] = {}
    for model_id in model_ids:
        family = next((f for regex, f in _RULES if regex.match(model_id)), None)
        if family is not None:
            families.setdefault(family, model_id)
    order = {family: rank for rank, family in enumerate(_PROBE_ORDER)}
    return dict(sorted(families.items(), key=lambda item: order.get(item[0], len(order))))


def probe_model(model_ids: list[str]) -> str | None:
    """The listed model of the cheapest family (a Haiku first), None when none is Claude."""
    return next(iter(probe_models(model_ids).values()), None)


class AnthropicProber(Prober):
    """The calls of the module docstring against the API at ``base_url``."""

    def __init__(self, base_url: str) -> None:
        self.base_url = base_url.rstrip("/") + "/"

    async def check(self, client: httpx.AsyncClient, key: Key) -> CheckReport:
        listed = await self._call(client, "GET", "models?limit=1000", key)
        if isinstance(listed, Outcome):
            return CheckReport(Outcome(Verdict.RETRY, problem=f"models: {listed.problem}"))
        response, body = listed
        if response.status_code != 200:
            outcome = classify(response.status_code, body)
            if outcome.verdict is Verdict.DEAD:
                return CheckReport(outcome)
            return CheckReport(Outcome(Verdict.RETRY, problem=f"models: {outcome.problem}"))
        items = list_data(body)
        model_ids = [item["id"] for item in items or () if isinstance(item.get("id"), str)]
        if not model_ids:
            return CheckReport(Outcome(Verdict.RETRY, problem="models: not a model list"))
        probes = probe_models(model_ids)
        if not probes:
            return CheckReport(Outcome(Verdict.RETRY, problem="models: no Claude model listed"))
        # One free count_tokens per family, at once: liveness, and which families the
        # key is refused (403/404), which the model list does not say.
        answers = await asyncio.gather(
            *(self._count(client, key, model) for model in probes.values())
        )
        dead = next((o for o, _, _ in answers if o.verdict is Verdict.DEAD), None)
        if dead is not None:
            return CheckReport(dead)
        heard = [(o, h) for o, h, _ in answers if o.verdict is not Verdict.RETRY]
        if not heard:
            return CheckReport(Outcome(Verdict.RETRY, problem=f"liveness: {answers[0][0].problem}"))
        tier, trial = next((tier_of(h) for _, h in heard if tier_of(h)[0]), ("", False))
        # 403: the key may not use the family; 404: the model is not there for it.
        denied = {
            family
            for family, (_, _, status) in zip(probes, answers, strict=True)
            if status in (403, 404)
        }
        missing = [
            f"{family}: {outcome.problem}"
            for family, (outcome, _, _) in zip(probes, answers, strict=True)
            if outcome.verdict is Verdict.RETRY
        ]
        if denied:
            _log.warning(
                "key check: no access to some model families",
                extra={"key_hash": key.hash, "families": ",".join(sorted(denied))},
            )
            model_ids = [
                m
                for m in model_ids
                if next((f for regex, f in _RULES if regex.match(m)), None) not in denied
            ]
        busy = any(o.verdict is Verdict.BUSY for o, _ in heard)
        outcome = Outcome(Verdict.BUSY if busy else Verdict.ALIVE)
        return CheckReport(outcome, model_ids=model_ids, is_trial=trial, tier=tier, missing=missing)

    async def _count(
        self, client: httpx.AsyncClient, key: Key, model: str
    ) -> tuple[Outcome, Mapping[str, str], int]:
        """count_tokens for ``model``: what it says about the key, its headers and
        status (0 when none came)."""
        probe: Mapping[str, Any] = {"model": model, "messages": [{"role": "user", "content": "."}]}
        counted = await self._call(client, "POST", "messages/count_tokens", key, probe)
        if isinstance(counted, Outcome):
            return counted, {}, 0
        response, body = counted
        status = response.status_code
        if response.is_success:
            if not isinstance(body, dict) or not isinstance(body.get("input_tokens"), int):
                return Outcome(Verdict.RETRY, problem=f"HTTP {status} body"), {}, status
            return Outcome(Verdict.ALIVE), response.headers, status
        return classify(status, body), response.headers, status

    def _headers(self, key: Key) -> dict[str, str]:
        return {"x-api-key": key.secret, "anthropic-version": API_VERSION}

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
