"""Model name → model family, as data: the first matching rule wins.

An operator can put extra rules in front of the built-in ones (a JSON file, see
``ModelTable.from_file``) to give a new model line its own family without a
release.

The built-in rows are the providers' (``keysvc.providers.<name>.models``).
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from .providers.base import ModelRule, ModelTableError
from .providers.openai.models import DEFAULT_FAMILY, GPT4_32K, LISTED_DEFAULT_FAMILY
from .providers.openai.models import RULES as DEFAULT_RULES

__all__ = [
    "DEFAULT_FAMILY",
    "DEFAULT_RULES",
    "GPT4_32K",
    "LISTED_DEFAULT_FAMILY",
    "ModelInfo",
    "ModelRule",
    "ModelTable",
    "ModelTableError",
]


@dataclass(frozen=True, slots=True)
class ModelInfo:
    """What the table says about one model name."""

    family: str
    embeddings: bool


class ModelTable:
    """Maps model names to families; first match wins, unknown names → ``default_family``."""

    def __init__(
        self, rules: Sequence[ModelRule] = DEFAULT_RULES, *, default_family: str = DEFAULT_FAMILY
    ) -> None:
        self._rules = tuple(rules)
        self._compiled = tuple((re.compile(rule.pattern), rule) for rule in self._rules)
        self.default_family = default_family
        # Model names are few and repeat on every call: remember each answer.
        self._cache: dict[str, ModelInfo] = {}
        seen: dict[str, None] = {}
        for rule in self._rules:
            seen.setdefault(rule.family, None)
        seen.setdefault(default_family, None)
        self.families: tuple[str, ...] = tuple(seen)
        # Asked once per loaded key: computed once (100k keys load in a fraction of the time).
        self._default_key_families = frozenset(f for f in self.families if f != GPT4_32K)

    @property
    def rules(self) -> tuple[ModelRule, ...]:
        return self._rules

    def lookup(self, model: str) -> ModelInfo:
        """Returns the family of ``model`` and whether it is an embeddings model."""
        info = self._cache.get(model)
        if info is None:
            info = self._match(model) or ModelInfo(self.default_family, embeddings=False)
            if len(self._cache) < 10_000:  # bounded: model names come from callers
                self._cache[model] = info
        return info

    def _match(self, model: str) -> ModelInfo | None:
        for regex, rule in self._compiled:
            if regex.match(model):
                return ModelInfo(rule.family, rule.embeddings)
        return None

    def listed_families(self, model_ids: Iterable[str]) -> frozenset[str]:
        """The families of the model ids the upstream lists for a key.

        An id no rule matches counts as ``LISTED_DEFAULT_FAMILY`` (turbo), as the
        seed's checker does, not as the request default.
        """
        families = set()
        for model_id in model_ids:
            info = self._match(model_id)
            families.add(info.family if info is not None else LISTED_DEFAULT_FAMILY)
        return frozenset(families)

    def family(self, model: str) -> str:
        return self.lookup(model).family

    def default_key_families(self) -> frozenset[str]:
        """Families an unchecked key is assumed to have: all but gpt4-32k."""
        return self._default_key_families

    @classmethod
    def with_extra_rules(cls, extra: Iterable[ModelRule]) -> ModelTable:
        """The built-in table with ``extra`` rules tried first."""
        return cls((*extra, *DEFAULT_RULES))

    @classmethod
    def from_file(cls, path: Path) -> ModelTable:
        """The built-in table with the rules of a JSON file tried first.

        The file holds a list of objects ``{"pattern": "^gpt-4\\\\.2", "family":
        "gpt42", "embeddings": false}``; ``embeddings`` is optional.

        Raises:
            ModelTableError: the file cannot be read or is malformed.
        """
        try:
            rows = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise ModelTableError(f"cannot read model table {path}: {exc}") from exc
        if not isinstance(rows, list):
            raise ModelTableError(f"model table {path} must hold a JSON list of rules")
        rules = []
        for index, row in enumerate(rows):
            if not (
                isinstance(row, dict)
                and isinstance(row.get("pattern"), str)
                and isinstance(row.get("family"), str)
                and isinstance(row.get("embeddings", False), bool)
                and set(row) <= {"pattern", "family", "embeddings"}
            ):
                raise ModelTableError(
                    f"model table {path}, rule {index}: expected "
                    '{"pattern": str, "family": str, "embeddings": bool (optional)}'
                )
            rules.append(ModelRule(row["pattern"], row["family"], row.get("embeddings", False)))
        return cls.with_extra_rules(rules)
