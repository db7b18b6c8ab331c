"""Bearer-token authentication with two roles, as a grpc.aio server interceptor.

A caller sends ``authorization: Bearer <token>`` metadata. The *proxy* role may
call what a proxy needs on its hot path; the *admin* role may call everything
(List and Recheck included). Health and reflection are always open so probes
and tools work without a token.

The interceptor checks the token before the handler runs, so a caller without
the role learns PERMISSION_DENIED, never whether a hash exists (NOT_FOUND).
Failures are raised as keysvc errors inside the wrapped handler, so the one
error mapping in ``keysvc.server`` gives them their status and ErrorInfo.
"""

from __future__ import annotations

import enum
import hashlib
import hmac
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Final

import grpc

from .errors import RoleDenied, Unauthenticated
from .interceptors import Behavior, UnaryInterceptor

__all__ = [
    "METHOD_ROLES",
    "SERVICE_PREFIX",
    "AuthInterceptor",
    "AuthTokens",
    "Role",
    "parse_token_text",
]


class Role(enum.Enum):
    """What a token may do. Admin includes everything proxy may do."""

    PROXY = "proxy"
    ADMIN = "admin"


#: Full method names of KeyService start with this; anything else (health,
#: reflection) is open.
SERVICE_PREFIX: Final = "/keysvc.v1.KeyService/"

#: The role each KeyService method needs. A KeyService method not listed
#: needs admin: a new RPC is closed until someone decides otherwise.
METHOD_ROLES: Final[Mapping[str, Role]] = {
    SERVICE_PREFIX + name: Role.PROXY
    for name in (
        "Get",
        "Disable",
        "MarkRateLimited",
        "UpdateRateLimits",
        "GetLockoutPeriod",
        "IncrementUsage",
        "Available",
        "ReportOutcome",
    )
} | {SERVICE_PREFIX + name: Role.ADMIN for name in ("List", "Recheck")}

_BEARER: Final = "bearer "


def _digest(token: str) -> bytes:
    # Comparing fixed-length digests keeps the comparison time independent of
    # the token's length as well as its content.
    return hashlib.sha256(token.encode()).digest()


@dataclass(frozen=True, slots=True)
class AuthTokens:
    """The configured tokens. Never printed: repr shows only how many there are."""

    proxy: frozenset[str] = field(default=frozenset())
    admin: frozenset[str] = field(default=frozenset())

    def __repr__(self) -> str:
        return f"AuthTokens(proxy=<{len(self.proxy)} tokens>, admin=<{len(self.admin)} tokens>)"

    @property
    def enabled(self) -> bool:
        return bool(self.proxy or self.admin)

    def role_of(self, token: str) -> Role | None:
        """The role ``token`` grants, compared in constant time; None for an unknown token.

        Every configured token is compared, whatever matches, so timing says
        nothing about which token (or how much of one) was right.
        """
        presented = _digest(token)
        is_admin = False
        is_proxy = False
        for known in self.admin:
            is_admin |= hmac.compare_digest(presented, _digest(known))
        for known in self.proxy:
            is_proxy |= hmac.compare_digest(presented, _digest(known))
        if is_admin:
            return Role.ADMIN
        if is_proxy:
            return Role.PROXY
        return None


def parse_token_text(text: str) -> list[str]:
    """Tokens from a list: separated by commas or newlines; ``#`` starts a comment line.

    Raises:
        ValueError: a token holds a character that cannot travel in metadata
            (whitespace, control characters, non-ASCII). The message gives the
            position, never the token.
    """
    tokens: list[str] = []
    for line in text.splitlines():
        if line.strip().startswith("#"):
            continue
        for raw in line.split(","):
            token = raw.strip()
            if not token:
                continue
            if not all("!" <= ch <= "~" for ch in token):
                raise ValueError(
                    f"token {len(tokens) + 1} has a character that is not printable ASCII"
                )
            tokens.append(token)
    return list(dict.fromkeys(tokens))


def _token_from(metadata: Iterable[tuple[str, str | bytes]] | None) -> str | None:
    for name, value in metadata or ():
        if name == "authorization":
            return value.decode("latin-1") if isinstance(value, bytes) else value
    return None


class AuthInterceptor(UnaryInterceptor):
    """Lets a KeyService call through only with a token whose role allows the method."""

    def __init__(self, tokens: AuthTokens) -> None:
        super().__init__()
        self._tokens = tokens

    def applies_to(self, method: str) -> bool:
        return method.startswith(SERVICE_PREFIX)

    def wrap(self, method: str, behavior: Behavior) -> Behavior:
        return self._guard(method, METHOD_ROLES.get(method, Role.ADMIN), behavior)

    def _guard(self, method: str, required: Role, behavior: Behavior) -> Behavior:
        tokens = self._tokens
        name = method.rsplit("/", 1)[-1]

        async def checked(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
            header = _token_from(context.invocation_metadata())
            if header is None:
                raise Unauthenticated(missing=True)
            if not header[: len(_BEARER)].lower() == _BEARER:
                raise Unauthenticated(missing=False)
            role = tokens.role_of(header[len(_BEARER) :].strip())
            if role is None:
                raise Unauthenticated(missing=False)
            if required is Role.ADMIN and role is not Role.ADMIN:
                raise RoleDenied(name, role.value, required.value)
            return await behavior(request, context)

        return checked
