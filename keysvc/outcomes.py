"""What one upstream answer means: the neutral types, and OpenAI's table.

Kept so that ``keysvc.outcomes`` goes on naming what it always did; the rules
live with their provider (``keysvc.providers.openai.outcomes``), the types in
``keysvc.providers.base``.
"""

from __future__ import annotations

from .providers.base import Decision, OutcomeAction, UpstreamError
from .providers.openai.outcomes import dead_key_reason, decide, upstream_error

__all__ = [
    "Decision",
    "OutcomeAction",
    "UpstreamError",
    "dead_key_reason",
    "decide",
    "upstream_error",
]
