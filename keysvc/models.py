"""Model name → model family, as data: the first matching rule wins.

An operator can put extra rules in front of the built-in ones (a JSON file, see
``ModelTable.from_file``) to give a new model line its own family without a
release. A model no rule matches is refused (``UnknownModel``, INVALID_ARGUMENT
naming it), unless the operator names a family for unknown models
(KEYSVC_UNKNOWN_MODELS): the seed sent every unknown name to gpt4, so a typo, or
a model of a provider keysvc has no keys for, was served with a GPT-4 key.

The built-in rows are the providers' (``keysvc.providers.<name>.models``).
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from .errors import UnknownModel
from .providers import ANTHROPIC, OPENAI, provider_names
from .providers.anthropic.models import CLAUDE
from .providers.anthropic.models import RULES as ANTHROPIC_RULES
from .providers.base import ModelRule, ModelTableError
from .providers.openai.models import GPT4_32K, LISTED_DEFAULT_FAMILY
from .providers.openai.models import RULES as OPENAI_RULES

#: Every provider's rows. They do not overlap (``claude-*`` is Anthropic's only),
#: so the order between providers does not matter.
DEFAULT_RULES: tuple[ModelRule, ...] = (*OPENAI_RULES, *ANTHROPIC_RULES)
#: Per provider: the family of a listed model id no rule matches.
LISTED_DEFAULTS: dict[str, str] = {OPENAI: LISTED_DEFAULT_FAMILY, ANTHROPIC: CLAUDE}
#: Families an unchecked key does not get: only the checker can grant them.
CHECKED_ONLY: frozenset[str] = frozenset({GPT4_32K})

__all__ = [
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
    #: The provider whose keys serve the model (``Key.service``).
    provider: str = OPENAI


class ModelTable:
    """Maps model names to families; first match wins, unknown names → ``unknown``.

    Each family belongs to one provider (its rules'), and a key only ever has
    families of its own provider, so Get for a GPT model never returns an
    Anthropic key and the reverse.

    Args:
        rules: the rows, first match wins.
        unknown: the family of a model no row matches (one of the rows' families);
            None refuses such a model with ``UnknownModel``.

    Raises:
        ModelTableError: ``unknown`` is no family of the rows.
    """

    def __init__(
        self, rules: Sequence[ModelRule] = DEFAULT_RULES, *, unknown: str | None = None
    ) -> None:
        self._rules = tuple(rules)
        self._compiled = tuple((re.compile(rule.pattern), rule) for rule in self._rules)
        # Model names are few and repeat on every call: remember each answer.
        self._cache: dict[str, ModelInfo] = {}
        seen: dict[str, None] = {}
        for rule in self._rules:
            seen.setdefault(rule.family, None)
        self.families: tuple[str, ...] = tuple(seen)
        #: Family → provider: the first rule naming the family decides.
        self.providers: dict[str, str] = {}
        for rule in self._rules:
            self.providers.setdefault(rule.family, rule.provider)
        if unknown is not None and unknown not in self.providers:
            raise ModelTableError(
                f"KEYSVC_UNKNOWN_MODELS names family {unknown!r}, which no model maps to;"
                f" expected reject or one of {', '.join(sorted(self.providers))}"
            )
        #: The info of a model no row matches; None: such a model is refused.
        self._unknown = (
            None if unknown is None else ModelInfo(unknown, False, self.providers[unknown])
        )
        self.unknown = unknown
        # Asked once per loaded key: computed once (100k keys load in a fraction of the time).
        self._default_key_families: dict[str, frozenset[str]] = {}
        for family, provider in self.providers.items():
            if family not in CHECKED_ONLY:
                self._default_key_families.setdefault(provider, frozenset())
                self._default_key_families[provider] |= {family}

    @property
    def rules(self) -> tuple[ModelRule, ...]:
        return self._rules

    def lookup(self, model: str) -> ModelInfo:
        """Returns the family of ``model`` and whether it is an embeddings model.

        Raises:
            UnknownModel: no row matches ``model`` and unknown models are refused.
        """
        info = self._cache.get(model)
        if info is None:
            info = self._match(model) or self._unknown
            if info is None:
                raise UnknownModel(model)
            if len(self._cache) < 10_000:  # bounded: model names come from callers
                self._cache[model] = info
        return info

    def _match(self, model: str) -> ModelInfo | None:
        for regex, rule in self._compiled:
            if regex.match(model):
                return ModelInfo(rule.family, rule.embeddings, self.providers[rule.family])
        return None

    def listed_families(self, model_ids: Iterable[str], provider: str = OPENAI) -> frozenset[str]:
        """The families of the model ids ``provider``'s API lists for a key.

        An id no rule matches counts as the provider's listed default (OpenAI:
        ``LISTED_DEFAULT_FAMILY``, turbo, as the seed's checker does, not the
        request default); an id of another provider's family is left out.
        """
        default = LISTED_DEFAULTS.get(provider, LISTED_DEFAULT_FAMILY)
        families = set()
        for model_id in model_ids:
            info = self._match(model_id)
            if info is None:
                families.add(default)
            elif info.provider == provider:
                families.add(info.family)
        return frozenset(families)

    def family(self, model: str) -> str:
        return self.lookup(model).family

    def default_key_families(self, provider: str = OPENAI) -> frozenset[str]:
        """Families an unchecked key of ``provider`` is assumed to have: all of the
        provider's but gpt4-32k."""
        return self._default_key_families.get(provider, frozenset())

    def provider_of(self, family: str) -> str:
        """The provider whose keys serve ``family`` (OpenAI for a family no rule names)."""
        return self.providers.get(family, OPENAI)

    @classmethod
    def with_extra_rules(
        cls, extra: Iterable[ModelRule], *, unknown: str | None = None
    ) -> ModelTable:
        """The built-in table with ``extra`` rules tried first."""
        return cls((*extra, *DEFAULT_RULES), unknown=unknown)

    @classmethod
    def from_file(cls, path: Path, *, unknown: str | None = None) -> ModelTable:
        """The built-in table with the rules of a JSON file tried first.

        The file holds a list of objects ``{"pattern": "^gpt-4\\\\.2", "family":
        "gpt42", "embeddings": false, "provider": "openai"}``; ``embeddings`` is
        optional, and so is ``provider``: a family of the built-in table keeps its
        provider, any other is OpenAI's.

        Raises:
            ModelTableError: the file cannot be read or is malformed.
        """
        try:
            rows = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise ModelTableError(f"cannot read model table {path}: {exc}") from exc
        if not isinstance(rows, list):
            raise ModelTableError(f"model table {path} must hold a JSON list of rules")
        built_in = {rule.family: rule.provider for rule in reversed(DEFAULT_RULES)}
        rules = []
        for index, row in enumerate(rows):
            if not (
                isinstance(row, dict)
                and isinstance(row.get("pattern"), str)
                and isinstance(row.get("family"), str)
                and isinstance(row.get("embeddings", False), bool)
                and row.get("provider", OPENAI) in provider_names()
                and set(row) <= {"pattern", "family", "embeddings", "provider"}
            ):
                raise ModelTableError(
                    f"model table {path}, rule {index}: expected "
                    '{"pattern": str, "family": str, "embeddings": bool (optional), '
                    f'"provider": one of {", ".join(provider_names())} (optional)}}'
                )
            provider = row.get("provider") or built_in.get(row["family"], OPENAI)
            rules.append(
                ModelRule(row["pattern"], row["family"], row.get("embeddings", False), provider)
            )
        return cls.with_extra_rules(rules, unknown=unknown)
