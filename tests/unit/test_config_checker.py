"""The key checker's settings: env var, flag, default."""

from __future__ import annotations

import argparse

import pytest

from keysvc.config import ConfigError, Settings, add_serve_arguments, settings_from


def parse(argv: list[str], env: dict[str, str]) -> Settings:
    parser = argparse.ArgumentParser()
    add_serve_arguments(parser)
    return settings_from(parser.parse_args(argv), env)


def test_defaults() -> None:
    settings = parse([], {})
    assert settings.check_keys is True
    assert settings.openai_base_url == "https://api.openai.com/v1"
    assert settings.check_timeout == 10.0
    assert settings.check_interval == 3.0
    assert settings.recheck_interval == 8 * 3600.0


def test_env_vars_then_flags() -> None:
    env = {
        "KEYSVC_CHECK_TIMEOUT": "4",
        "KEYSVC_CHECK_INTERVAL": "5",
        "KEYSVC_RECHECK_INTERVAL": "2h",
        "OPENAI_BASE_URL": "http://127.0.0.1:1/v1",
        "CHECK_KEYS": "false",
    }
    settings = parse([], env)
    assert (settings.check_timeout, settings.check_interval) == (4.0, 5.0)
    assert settings.recheck_interval == 7200.0
    assert settings.openai_base_url == "http://127.0.0.1:1/v1"
    assert settings.check_keys is False
    settings = parse(
        [
            "--check-timeout",
            "2.5",
            "--check-interval",
            "0.5",
            "--recheck-interval",
            "90m",
            "--check-keys",
        ],
        env,
    )
    assert (settings.check_timeout, settings.check_interval) == (2.5, 0.5)
    assert settings.recheck_interval == 5400.0
    assert settings.check_keys is True
    assert parse(["--recheck-interval", "0"], {}).recheck_interval == 0.0
    assert parse(["--recheck-interval", "36000"], {}).recheck_interval == 36000.0


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("KEYSVC_CHECK_TIMEOUT", "0"),
        ("KEYSVC_CHECK_TIMEOUT", "soon"),
        ("KEYSVC_RECHECK_INTERVAL", "-1h"),
        ("KEYSVC_RECHECK_INTERVAL", "400d"),
        ("KEYSVC_CHECK_INTERVAL", "-3"),
    ],
)
def test_bad_values_name_the_setting(name: str, value: str) -> None:
    with pytest.raises(ConfigError, match=name):
        parse([], {name: value})
