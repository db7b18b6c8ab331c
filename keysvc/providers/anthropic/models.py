"""Anthropic's rows of the model table: ``claude-*`` model name → family.

Both naming schemes: ``claude-3-5-sonnet-20241022`` (version first) and
``claude-sonnet-4-5`` (line first). A Claude model of a line no rule names is
family ``claude``, so it is served by Anthropic keys rather than mistaken for
an OpenAI model.
"""

from __future__ import annotations

from typing import Final

from .. import ANTHROPIC
from ..base import ModelRule

__all__ = ["CLAUDE", "CLAUDE_HAIKU", "CLAUDE_OPUS", "CLAUDE_SONNET", "RULES"]

CLAUDE_OPUS: Final = "claude-opus"
CLAUDE_SONNET: Final = "claude-sonnet"
CLAUDE_HAIKU: Final = "claude-haiku"
#: Any other Claude model (claude-2.1, claude-instant-1.2, a new line).
CLAUDE: Final = "claude"

RULES: tuple[ModelRule, ...] = (
    ModelRule(r"^claude-(\d+(-\d+)?-)?opus", CLAUDE_OPUS, provider=ANTHROPIC),
    ModelRule(r"^claude-(\d+(-\d+)?-)?sonnet", CLAUDE_SONNET, provider=ANTHROPIC),
    ModelRule(r"^claude-(\d+(-\d+)?-)?haiku", CLAUDE_HAIKU, provider=ANTHROPIC),
    ModelRule(r"^claude-instant", CLAUDE_HAIKU, provider=ANTHROPIC),
    ModelRule(r"^claude", CLAUDE, provider=ANTHROPIC),
)
