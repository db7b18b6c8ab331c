"""TLS and mutual TLS for the server."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import grpc

from .config import ConfigError, tls_problem

__all__ = ["TlsConfig"]


@dataclass(frozen=True, slots=True)
class TlsConfig:
    """What the server needs to speak TLS.

    Attributes:
        cert_chain: PEM server certificate, then any intermediates (KEYSVC_TLS_CERT).
        private_key: PEM private key of that certificate (KEYSVC_TLS_KEY).
        client_ca: PEM CA certificates that sign client certificates
            (KEYSVC_TLS_CLIENT_CA). When set, every client must present a
            certificate signed by one of them (mutual TLS).
    """

    cert_chain: bytes = field(repr=False)
    private_key: bytes = field(repr=False)
    client_ca: bytes | None = field(default=None, repr=False)

    @property
    def mutual(self) -> bool:
        return self.client_ca is not None

    @classmethod
    def from_files(
        cls, *, cert: Path | None, key: Path | None, client_ca: Path | None
    ) -> TlsConfig | None:
        """Reads the files; None when TLS is not configured at all.

        Raises:
            ConfigError: TLS is half-configured, or a file cannot be read or
                is not PEM.
        """
        problem = tls_problem(cert, key, client_ca)
        if problem:
            raise ConfigError(problem)
        if cert is None or key is None:
            return None
        return cls(
            cert_chain=_read_pem("KEYSVC_TLS_CERT", cert, b"CERTIFICATE"),
            private_key=_read_pem("KEYSVC_TLS_KEY", key, b"PRIVATE KEY"),
            client_ca=(
                _read_pem("KEYSVC_TLS_CLIENT_CA", client_ca, b"CERTIFICATE")
                if client_ca is not None
                else None
            ),
        )

    def server_credentials(self) -> grpc.ServerCredentials:
        return grpc.ssl_server_credentials(
            [(self.private_key, self.cert_chain)],
            root_certificates=self.client_ca,
            require_client_auth=self.mutual,
        )


def _read_pem(setting: str, path: Path, kind: bytes) -> bytes:
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise ConfigError(f"{setting}: cannot read {path}: {exc.strerror or exc}") from exc
    if b"-----BEGIN " not in data or kind not in data:
        raise ConfigError(f"{setting}: {path} holds no PEM {kind.decode().lower()}")
    return data
