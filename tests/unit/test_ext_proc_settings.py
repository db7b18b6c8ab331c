"""KEYSVC_EXT_PROC_MAX_WAIT / --ext-proc-max-wait."""

from __future__ import annotations

import argparse

import pytest

from keysvc.auth import AuthTokens
from keysvc.config import ConfigError, Settings, add_serve_arguments, settings_from
from keysvc.ext_proc import ExtProcService
from tests.helpers import make_pool


def parse(argv: list[str], env: dict[str, str]) -> Settings:
    parser = argparse.ArgumentParser()
    add_serve_arguments(parser)
    return settings_from(parser.parse_args(argv), env)


def test_default_env_then_flag() -> None:
    assert parse([], {}).ext_proc_max_wait == 5.0
    env = {"KEYSVC_EXT_PROC_MAX_WAIT": "0"}
    assert parse([], env).ext_proc_max_wait == 0.0
    assert parse(["--ext-proc-max-wait", "2.5"], env).ext_proc_max_wait == 2.5


@pytest.mark.parametrize("value", ["-1", "61", "soon", "nan"])
def test_a_wait_outside_0_to_60_seconds_is_a_config_error(value: str) -> None:
    with pytest.raises(ConfigError, match="KEYSVC_EXT_PROC_MAX_WAIT"):
        parse([], {"KEYSVC_EXT_PROC_MAX_WAIT": value})
    with pytest.raises(SystemExit):
        parse(["--ext-proc-max-wait", value], {})


def test_the_servicer_refuses_a_wait_the_pool_cannot_honour() -> None:
    pool, _ = make_pool(["sk-settings-0001"])
    with pytest.raises(ValueError, match="max_wait"):
        ExtProcService(pool, tokens=AuthTokens(), max_wait=61.0)
