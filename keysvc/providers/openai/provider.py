"""The OpenAI provider object (``keysvc.providers.provider("openai")``)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Final

from .. import IDENTITIES, OPENAI
from ..base import Decision, ParsedHeaders, Prober, Provider, UpstreamError
from . import headers, models, outcomes
from .checker import OpenAIProber

__all__ = ["PROVIDER", "OpenAIProvider"]


class OpenAIProvider(Provider):
    identity = next(i for i in IDENTITIES if i.name == OPENAI)
    rules = models.RULES
    listed_default_family = models.LISTED_DEFAULT_FAMILY
    checked_only_families = frozenset({models.GPT4_32K})
    rate_header_prefixes = (headers.PREFIX,)

    def parse_rate_headers(self, headers_: Mapping[str, str], now: float) -> ParsedHeaders:
        return headers.parse_rate_headers(headers_)

    def upstream_error(self, body: object) -> UpstreamError | None:
        return outcomes.upstream_error(body)

    def decide(self, status: int, error: UpstreamError, *, now: float) -> Decision:
        return outcomes.decide(status, error)

    def credential_headers(self, secret: str) -> tuple[tuple[str, str], ...]:
        return (("authorization", f"Bearer {secret}"),)

    def prober(self, base_url: str) -> Prober:
        return OpenAIProber(base_url)


PROVIDER: Final = OpenAIProvider()
