"""OpenAI's rows of the model table: model name → family, first match wins."""

from __future__ import annotations

from typing import Final

from ..base import ModelRule

__all__ = ["GPT4_32K", "LISTED_DEFAULT_FAMILY", "RULES"]

#: Family of a model id the upstream lists for a key that no rule matches.
LISTED_DEFAULT_FAMILY: Final = "turbo"
#: The family unchecked keys do not get: only the checker can grant it.
GPT4_32K: Final = "gpt4-32k"

RULES: tuple[ModelRule, ...] = (
    ModelRule(r"^gpt-4o-mini", "turbo"),
    ModelRule(r"^gpt-4o", "gpt4o"),
    ModelRule(r"^chatgpt-4o", "gpt4o"),
    ModelRule(r"^gpt-4-turbo", "gpt4-turbo"),
    ModelRule(r"^gpt-4-(0125|1106)(-preview)?$", "gpt4-turbo"),
    ModelRule(r"^gpt-4(-\d{4})?-vision", "gpt4-turbo"),
    ModelRule(r"^gpt-4-32k", GPT4_32K),
    ModelRule(r"^gpt-4(-\d{4})?$", "gpt4"),
    ModelRule(r"^gpt-4\.1-mini", "gpt41-mini"),
    ModelRule(r"^gpt-4\.1-nano", "gpt41-nano"),
    ModelRule(r"^gpt-4\.1", "gpt41"),
    ModelRule(r"^gpt-4\.5", "gpt45"),
    ModelRule(r"^gpt-5-mini", "gpt5-mini"),
    ModelRule(r"^gpt-5-nano", "gpt5-nano"),
    ModelRule(r"^gpt-5", "gpt5"),
    ModelRule(r"^gpt-3\.5-turbo", "turbo"),
    ModelRule(r"^text-embedding-ada-002$", "turbo", embeddings=True),
    ModelRule(r"^text-embedding-3-", "turbo", embeddings=True),
    ModelRule(r"^dall-e-\d", "dall-e"),
    ModelRule(r"^o1-mini", "o1-mini"),
    ModelRule(r"^o1", "o1"),
    ModelRule(r"^o3-mini", "o3-mini"),
    ModelRule(r"^o3", "o3"),
    ModelRule(r"^o4-mini", "o4-mini"),
)
