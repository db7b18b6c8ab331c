"""KEYSVC_METRICS_PORT / --metrics-port and KEYSVC_METRICS_HOST / --metrics-host."""

from __future__ import annotations

import argparse

import pytest

from keysvc.config import ConfigError, Settings, add_serve_arguments, settings_from


def parse(argv: list[str], env: dict[str, str]) -> Settings:
    parser = argparse.ArgumentParser()
    add_serve_arguments(parser)
    return settings_from(parser.parse_args(argv), env)


def test_metrics_are_off_by_default_on_loopback() -> None:
    settings = parse([], {})
    assert settings.metrics_port is None
    assert settings.metrics_host == "127.0.0.1"


def test_env_then_flag() -> None:
    env = {"KEYSVC_METRICS_PORT": "9100", "KEYSVC_METRICS_HOST": "0.0.0.0"}
    settings = parse([], env)
    assert (settings.metrics_port, settings.metrics_host) == (9100, "0.0.0.0")
    settings = parse(["--metrics-port", "9200", "--metrics-host", "::1"], env)
    assert (settings.metrics_port, settings.metrics_host) == (9200, "::1")


def test_bad_port_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="KEYSVC_METRICS_PORT"):
        parse([], {"KEYSVC_METRICS_PORT": "70000"})
