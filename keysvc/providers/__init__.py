"""The upstream providers behind keysvc: one folder each, chosen by key and by model.

A provider is everything keysvc knows about one upstream API: which secrets
are its keys (and how their public hashes read), its model table, what its
rate-limit headers say in provider-neutral numbers, what each of its answers
means for the key and the request, and how to check a key against it. The
pool, the server and the wire use the neutral types of ``keysvc.providers.base``
only, so a third provider is one more folder and one more ``IDENTITIES`` row.

This module stays light (identities only) because ``keysvc.keys`` asks it which
provider a secret belongs to; the provider objects load on first use
(``provider``).
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import TYPE_CHECKING, Final

if TYPE_CHECKING:
    from .base import Provider

__all__ = [
    "ANTHROPIC",
    "IDENTITIES",
    "OPENAI",
    "Identity",
    "identity_of_hash",
    "identity_of_secret",
    "provider",
    "provider_names",
]


@dataclass(frozen=True, slots=True)
class Identity:
    """How keysvc recognises a provider's keys.

    Attributes:
        name: the provider's name, as ``Key.service`` and the wire show it.
        hash_prefix: the public hash of its keys reads ``<hash_prefix>-`` + 8 hex digits.
        secret_prefix: its secrets start with this; "" matches any secret (the fallback).
        module: the package whose ``provider`` module holds the ``PROVIDER`` object.
    """

    name: str
    hash_prefix: str
    secret_prefix: str
    module: str


OPENAI: Final = "openai"
ANTHROPIC: Final = "anthropic"

#: Most specific prefix first; the last row, with no prefix, takes every other
#: secret (OpenAI keys have many shapes: sk-, sk-proj-, sk-svcacct-, ...).
IDENTITIES: Final[tuple[Identity, ...]] = (
    Identity(ANTHROPIC, "ant", "sk-ant-", "keysvc.providers.anthropic"),
    Identity(OPENAI, "oai", "", "keysvc.providers.openai"),
)
_BY_NAME: Final = {identity.name: identity for identity in IDENTITIES}
_loaded: dict[str, Provider] = {}


def identity_of_secret(secret: str) -> Identity:
    """The provider a secret belongs to, by its prefix."""
    for identity in IDENTITIES:
        if secret.startswith(identity.secret_prefix):
            return identity
    raise AssertionError("the last identity matches every secret")  # pragma: no cover


def identity_of_hash(key_hash: str) -> Identity:
    """The provider a key hash belongs to, by its prefix (``ant-...``); OpenAI's when
    no prefix matches (as for secrets)."""
    prefix = key_hash.partition("-")[0]
    for identity in IDENTITIES:
        if identity.hash_prefix == prefix:
            return identity
    return IDENTITIES[-1]


def provider_names() -> tuple[str, ...]:
    return tuple(identity.name for identity in IDENTITIES)


def provider(name: str) -> Provider:
    """The provider called ``name`` (``Key.service``).

    Raises:
        KeyError: no provider has that name.
    """
    loaded = _loaded.get(name)
    if loaded is None:
        module = importlib.import_module(_BY_NAME[name].module + ".provider")
        loaded = _loaded[name] = module.PROVIDER
    return loaded
