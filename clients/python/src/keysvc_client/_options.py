"""What both clients share: channel options, TLS, the bearer token, request building."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import grpc

__all__ = ["DEFAULT_TARGET", "DEFAULT_TIMEOUT", "TLSConfig", "call_metadata", "rate_limit_headers"]

#: Where ``keysvc serve`` listens by default.
DEFAULT_TARGET = "127.0.0.1:50051"
#: Seconds a call may take unless the client or the call says otherwise.
DEFAULT_TIMEOUT = 5.0

_RATE_LIMIT_PREFIX = "x-ratelimit-"


def _pem(value: bytes | Path | None) -> bytes | None:
    if value is None or isinstance(value, bytes):
        return value
    return value.read_bytes()


@dataclass(frozen=True, slots=True, kw_only=True)
class TLSConfig:
    """TLS for the channel; each PEM field takes the bytes or a path to the file.

    Attributes:
        root_certificates: CA certificates to trust; ``None`` trusts the system's roots.
        client_certificate: the client's certificate chain, for mutual TLS (with client_key).
        client_key: the client's private key, for mutual TLS (with client_certificate).
        server_name: the name to check the server's certificate against, when it differs
            from the target's host (for example when dialling an IP address).
    """

    root_certificates: bytes | Path | None = None
    client_certificate: bytes | Path | None = None
    client_key: bytes | Path | None = None
    server_name: str | None = None

    def __post_init__(self) -> None:
        if (self.client_certificate is None) != (self.client_key is None):
            raise ValueError("client_certificate and client_key go together")

    def credentials(self) -> grpc.ChannelCredentials:
        return grpc.ssl_channel_credentials(
            root_certificates=_pem(self.root_certificates),
            private_key=_pem(self.client_key),
            certificate_chain=_pem(self.client_certificate),
        )

    def channel_options(self) -> list[tuple[str, str]]:
        if self.server_name is None:
            return []
        return [("grpc.ssl_target_name_override", self.server_name)]


def call_metadata(token: str | None) -> tuple[tuple[str, str], ...]:
    """The metadata sent with every call: the bearer token, if any."""
    if token is None:
        return ()
    if not token or any(c in token for c in "\r\n"):
        raise ValueError("token must be a non-empty single line")
    return (("authorization", f"Bearer {token}"),)


def rate_limit_headers(headers: Mapping[str, str]) -> dict[str, str]:
    """The ``x-ratelimit-*`` headers of an upstream answer, names lower-cased.

    keysvc reads only these, so the rest of a response's headers stay in the proxy.
    """
    return {
        name.lower(): value
        for name, value in headers.items()
        if name.lower().startswith(_RATE_LIMIT_PREFIX)
    }
