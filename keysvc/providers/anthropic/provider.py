"""The Anthropic provider object (``keysvc.providers.provider("anthropic")``)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Final

from .. import ANTHROPIC, IDENTITIES
from ..base import Decision, ParsedHeaders, Prober, Provider, UpstreamError
from . import checker, headers, models, outcomes
from .checker import AnthropicProber

__all__ = ["PROVIDER", "AnthropicProvider"]


class AnthropicProvider(Provider):
    identity = next(i for i in IDENTITIES if i.name == ANTHROPIC)
    rules = models.RULES
    listed_default_family = models.CLAUDE
    rate_header_prefixes = (headers.PREFIX, headers.RETRY_AFTER_HEADER)
    split_token_budgets = True
    reset_times = True

    def parse_rate_headers(self, headers_: Mapping[str, str], now: float) -> ParsedHeaders:
        return headers.parse_rate_headers(headers_, now)

    def upstream_error(self, body: object) -> UpstreamError | None:
        return outcomes.upstream_error(body)

    def decide(self, status: int, error: UpstreamError, *, now: float) -> Decision:
        return outcomes.decide(status, error, now=now)

    def credential_headers(self, secret: str) -> tuple[tuple[str, str], ...]:
        return (("x-api-key", secret), ("anthropic-version", checker.API_VERSION))

    def prober(self, base_url: str) -> Prober:
        return AnthropicProber(base_url)


PROVIDER: Final = AnthropicProvider()
