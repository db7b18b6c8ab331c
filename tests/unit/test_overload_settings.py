"""The overload settings (in-flight limits, connection bounds) and the gRPC options
they become."""

from __future__ import annotations

import argparse
import resource

import pytest

from keysvc.config import ConfigError, Settings, add_serve_arguments, settings_from
from keysvc.overload import (
    AGE_GRACE,
    ConnectionLimits,
    InFlightLimit,
    connection_options,
    raise_open_files_limit,
)
from keysvc.pool import MAX_WAIT


def parse(argv: list[str], env: dict[str, str]) -> Settings:
    parser = argparse.ArgumentParser()
    add_serve_arguments(parser)
    return settings_from(parser.parse_args(argv), env)


def test_defaults() -> None:
    settings = parse([], {})
    assert (settings.max_in_flight, settings.max_in_flight_lists) == (2_000, 8)
    assert settings.connection_limits == ConnectionLimits(
        max_streams=4_000, max_idle=300.0, max_age=1800.0
    )


def test_env_then_flag() -> None:
    env = {
        "KEYSVC_MAX_IN_FLIGHT": "500",
        "KEYSVC_MAX_IN_FLIGHT_LISTS": "2",
        "KEYSVC_MAX_STREAMS_PER_CONNECTION": "50",
        "KEYSVC_MAX_CONNECTION_IDLE": "2m",
        "KEYSVC_MAX_CONNECTION_AGE": "1h",
    }
    settings = parse([], env)
    assert (settings.max_in_flight, settings.max_in_flight_lists) == (500, 2)
    assert settings.connection_limits == ConnectionLimits(
        max_streams=50, max_idle=120.0, max_age=3600.0
    )
    flags = ["--max-in-flight", "700", "--max-connection-idle", "30", "--max-connection-age", "5m"]
    settings = parse(flags, env)
    assert settings.max_in_flight == 700
    assert (settings.max_connection_idle, settings.max_connection_age) == (30.0, 300.0)


@pytest.mark.parametrize(
    ("name", "bad"),
    [
        ("KEYSVC_MAX_IN_FLIGHT", "0"),
        ("KEYSVC_MAX_IN_FLIGHT", "lots"),
        ("KEYSVC_MAX_IN_FLIGHT_LISTS", "-1"),
        ("KEYSVC_MAX_STREAMS_PER_CONNECTION", "0"),
        ("KEYSVC_MAX_CONNECTION_IDLE", "0"),
        ("KEYSVC_MAX_CONNECTION_AGE", "-5m"),
    ],
)
def test_bad_values_are_config_errors_naming_the_setting(name: str, bad: str) -> None:
    with pytest.raises(ConfigError, match=name):
        parse([], {name: bad})


def test_grpc_options() -> None:
    options = dict(connection_options(ConnectionLimits(max_streams=7, max_idle=2.5), 3_000))
    assert options["grpc.max_concurrent_streams"] == 7
    assert options["grpc.max_connection_idle_ms"] == 2_500
    assert options["grpc.max_connection_age_ms"] == 1_800_000
    # A waiting Get is never cut short by a connection's age.
    assert options["grpc.max_connection_age_grace_ms"] > MAX_WAIT * 1000
    assert AGE_GRACE > MAX_WAIT
    assert options["grpc.server_handshake_timeout_ms"] == 10_000
    # gRPC's pending queue must not shed what the in-flight limit would let in.
    assert options["grpc.server.max_pending_requests"] >= 3_000
    assert options["grpc.server.max_pending_requests_hard_limit"] > 3_000


def test_limits_must_be_positive() -> None:
    with pytest.raises(ValueError):
        InFlightLimit(0)
    with pytest.raises(ValueError):
        InFlightLimit(10, list_limit=0)


def test_open_files_limit_is_raised_to_the_hard_limit() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    lower = 256 if hard == resource.RLIM_INFINITY else min(256, hard)
    resource.setrlimit(resource.RLIMIT_NOFILE, (lower, hard))
    try:
        before, after = raise_open_files_limit()
        assert before == lower
        assert after == resource.getrlimit(resource.RLIMIT_NOFILE)[0]
        assert after == (hard if hard != resource.RLIM_INFINITY else 1 << 20)
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
