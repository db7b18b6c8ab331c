"""Start-up settings for auth, TLS, state and keys files; refusals with clear messages."""

from __future__ import annotations

from pathlib import Path

import pytest

from keysvc import cli
from keysvc.auth import parse_token_text
from keysvc.config import ConfigError, is_loopback, settings_from
from keysvc.tls import TlsConfig


def _settings(argv: list[str], env: dict[str, str]):  # type: ignore[no-untyped-def]
    args = cli._parser().parse_args(["serve", *argv])
    return settings_from(args, env)


def test_parse_token_text_commas_lines_comments() -> None:
    text = "# proxies\nalpha, beta\n\n  gamma  \n#delta\nalpha\n"
    assert parse_token_text(text) == ["alpha", "beta", "gamma"]


def test_parse_token_text_rejects_unsendable_without_echo() -> None:
    with pytest.raises(ValueError) as exc:
        parse_token_text("good,bad token-secret-part")
    assert "secret-part" not in str(exc.value)
    with pytest.raises(ValueError):
        parse_token_text("tökén")


def test_tokens_from_env_and_files(tmp_path: Path) -> None:
    admin_file = tmp_path / "admin"
    admin_file.write_text("# admins\nadm-1\nadm-2\n")
    proxy_file = tmp_path / "proxy"
    proxy_file.write_text("px-file\n")
    settings = _settings(
        ["--proxy-tokens-file", str(proxy_file)],
        {"KEYSVC_PROXY_TOKENS": "px-1, px-2", "KEYSVC_ADMIN_TOKENS_FILE": str(admin_file)},
    )
    assert settings.proxy_tokens == {"px-1", "px-2", "px-file"}
    assert settings.admin_tokens == {"adm-1", "adm-2"}
    assert "px-1" not in repr(settings) and "adm-1" not in repr(settings)


def test_unreadable_token_file_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="KEYSVC_ADMIN_TOKENS_FILE"):
        _settings([], {"KEYSVC_ADMIN_TOKENS_FILE": str(tmp_path / "missing")})


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"KEYSVC_TLS_CERT": "c.pem"}, "KEYSVC_TLS_CERT is set but KEYSVC_TLS_KEY is not"),
        ({"KEYSVC_TLS_KEY": "k.pem"}, "KEYSVC_TLS_KEY is set but KEYSVC_TLS_CERT is not"),
        ({"KEYSVC_TLS_CLIENT_CA": "ca.pem"}, "KEYSVC_TLS_CLIENT_CA is set but"),
        (
            {"KEYSVC_TLS_CLIENT_CA": "ca.pem", "KEYSVC_TLS_CERT": "c.pem"},
            "KEYSVC_TLS_CERT is set but KEYSVC_TLS_KEY is not",
        ),
    ],
)
def test_half_configured_tls_is_refused(env: dict[str, str], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        _settings([], env)


def test_tls_files_must_be_pem(tmp_path: Path) -> None:
    cert, key = tmp_path / "c.pem", tmp_path / "k.pem"
    cert.write_text("not a certificate")
    key.write_text("-----BEGIN PRIVATE KEY-----\n")
    with pytest.raises(ConfigError, match="KEYSVC_TLS_CERT.*no PEM certificate"):
        TlsConfig.from_files(cert=cert, key=key, client_ca=None)
    cert.write_text("-----BEGIN CERTIFICATE-----\n")
    with pytest.raises(ConfigError, match="KEYSVC_TLS_CLIENT_CA: cannot read"):
        TlsConfig.from_files(cert=cert, key=key, client_ca=tmp_path / "missing")


@pytest.mark.parametrize("host", ["127.0.0.1", "127.1.2.3", "::1", "[::1]", "localhost"])
def test_loopback_hosts(host: str) -> None:
    assert is_loopback(host)
    _settings(["--host", host], {})  # no refusal


@pytest.mark.parametrize("host", ["0.0.0.0", "::", "10.0.0.5", "keysvc.internal"])
def test_non_loopback_without_tokens_or_tls_is_refused(host: str) -> None:
    assert not is_loopback(host)
    with pytest.raises(ConfigError, match="refusing to listen.*--insecure"):
        _settings(["--host", host], {})
    # Any one of the protections, or --insecure, lets it start.
    _settings(["--host", host, "--insecure"], {})
    _settings(["--host", host], {"KEYSVC_INSECURE": "true"})
    _settings(["--host", host], {"KEYSVC_PROXY_TOKENS": "px"})
    _settings(["--host", host], {"KEYSVC_TLS_CERT": "c", "KEYSVC_TLS_KEY": "k"})


def test_cli_refusal_exits_2_with_the_message(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    for name in ("KEYSVC_PROXY_TOKENS", "KEYSVC_ADMIN_TOKENS", "KEYSVC_TLS_CERT", "KEYSVC_HOST"):
        monkeypatch.delenv(name, raising=False)
    assert cli.main(["serve", "--host", "0.0.0.0", "--port", "0"]) == 2
    err = capsys.readouterr().err
    assert "refusing to listen on '0.0.0.0' with neither tokens nor TLS" in err


def test_state_and_keys_file_settings(tmp_path: Path) -> None:
    settings = _settings(
        ["--state-file", str(tmp_path / "s.json"), "--ignore-state"],
        {"KEYSVC_KEYS_FILE": str(tmp_path / "keys")},
    )
    assert settings.state_file == tmp_path / "s.json"
    assert settings.ignore_state
    assert settings.keys_file == tmp_path / "keys"
