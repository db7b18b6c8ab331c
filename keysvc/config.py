"""keysvc's settings: one frozen object, from environment variables overridden by flags.

Every setting has an environment variable and (except secrets) a flag; the
README lists them all with their defaults.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

from .keys import parse_key_list
from .logs import LOG_FORMATS, LOG_LEVELS

__all__ = ["ConfigError", "Settings", "add_serve_arguments", "settings_from"]

DEFAULT_OPENAI_BASE_URL = "https://api.openai.com/v1"

T = TypeVar("T")


class ConfigError(ValueError):
    """A setting has a value keysvc cannot use; the message names the setting."""


@dataclass(frozen=True, slots=True, kw_only=True)
class Settings:
    """Everything the server needs to know, read once at start-up."""

    #: The upstream API keys (OPENAI_KEY). Never printed: repr hides them.
    openai_keys: tuple[str, ...] = field(default=(), repr=False)
    check_keys: bool = True
    #: None allows every family.
    allowed_families: frozenset[str] | None = None
    openai_base_url: str = DEFAULT_OPENAI_BASE_URL
    host: str = "127.0.0.1"
    port: int = 50051
    log_level: str = "info"
    log_format: str = "text"
    #: Seconds in-flight calls get to finish after SIGTERM/SIGINT.
    shutdown_grace: float = 10.0
    #: Extra model → family rules, tried before the built-in ones.
    model_families_file: Path | None = None
    #: Port of the HTTP server for /metrics, the status page, /healthz and /readyz; None = off.
    metrics_port: int | None = None
    metrics_host: str = "127.0.0.1"


def _parse_bool(text: str) -> bool:
    lowered = text.strip().lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off"):
        return False
    raise ValueError(f"expected true or false, got {text!r}")


def _parse_port(text: str) -> int:
    port = int(text)
    if not 0 <= port <= 65535:
        raise ValueError(f"{port} is not a TCP port")
    return port


def _parse_seconds(text: str) -> float:
    seconds = float(text)
    if not 0 <= seconds < 86_400:
        raise ValueError(f"{text} is not between 0 and 86400 seconds")
    return seconds


def _parse_families(text: str) -> frozenset[str] | None:
    families = frozenset(f.strip() for f in text.split(",") if f.strip())
    return families or None


def _choice(options: Sequence[str]) -> Callable[[str], str]:
    def parse(text: str) -> str:
        lowered = text.strip().lower()
        if lowered not in options:
            raise ValueError(f"expected one of {', '.join(options)}, got {text!r}")
        return lowered

    return parse


def _from_env(env: Mapping[str, str], name: str, parse: Callable[[str], T], default: T) -> T:
    raw = env.get(name)
    if raw is None or raw.strip() == "":
        return default
    try:
        return parse(raw)
    except ValueError as exc:
        raise ConfigError(f"{name}: {exc}") from exc


def _flag_type(flag: str, parse: Callable[[str], T]) -> Callable[[str], T]:
    def convert(text: str) -> T:
        try:
            return parse(text)
        except ValueError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from exc

    convert.__name__ = flag
    return convert


def add_serve_arguments(parser: argparse.ArgumentParser) -> None:
    """Adds the server's flags; each defaults to None so the environment shows through."""
    parser.add_argument(
        "--check-keys",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="check keys against the upstream API (env CHECK_KEYS, default true)",
    )
    parser.add_argument(
        "--allowed-families",
        type=_flag_type("families", _parse_families),
        help="comma-separated model families to serve (env ALLOWED_MODEL_FAMILIES, default all)",
    )
    parser.add_argument(
        "--openai-base-url",
        help=f"upstream API base URL (env OPENAI_BASE_URL, default {DEFAULT_OPENAI_BASE_URL})",
    )
    parser.add_argument("--host", help="address to listen on (env KEYSVC_HOST, default 127.0.0.1)")
    parser.add_argument(
        "--port",
        type=_flag_type("port", _parse_port),
        help="port to listen on, 0 for any free port (env KEYSVC_PORT, default 50051)",
    )
    parser.add_argument(
        "--log-level",
        type=_flag_type("level", _choice(LOG_LEVELS)),
        help="debug, info, warning or error (env KEYSVC_LOG_LEVEL, default info)",
    )
    parser.add_argument(
        "--log-format",
        type=_flag_type("format", _choice(LOG_FORMATS)),
        help="text or json (env KEYSVC_LOG_FORMAT, default text)",
    )
    parser.add_argument(
        "--shutdown-grace",
        type=_flag_type("seconds", _parse_seconds),
        help="seconds in-flight calls get after SIGTERM (env KEYSVC_SHUTDOWN_GRACE, default 10)",
    )
    parser.add_argument(
        "--model-families-file",
        type=Path,
        help="JSON file of extra model → family rules (env KEYSVC_MODEL_FAMILIES_FILE)",
    )
    parser.add_argument(
        "--metrics-port",
        type=_flag_type("port", _parse_port),
        help="HTTP port for /metrics, the status page, /healthz and /readyz "
        "(env KEYSVC_METRICS_PORT, default off)",
    )
    parser.add_argument(
        "--metrics-host",
        help="address the HTTP port listens on (env KEYSVC_METRICS_HOST, default 127.0.0.1)",
    )


def settings_from(args: argparse.Namespace, env: Mapping[str, str] | None = None) -> Settings:
    """The settings: environment variables first, then any flag given on the command line.

    Raises:
        ConfigError: an environment variable holds an unusable value.
    """
    env = os.environ if env is None else env
    base = Settings(
        openai_keys=tuple(parse_key_list(env.get("OPENAI_KEY", ""))),
        check_keys=_from_env(env, "CHECK_KEYS", _parse_bool, True),
        allowed_families=_from_env(env, "ALLOWED_MODEL_FAMILIES", _parse_families, None),
        openai_base_url=_from_env(env, "OPENAI_BASE_URL", str.strip, DEFAULT_OPENAI_BASE_URL),
        host=_from_env(env, "KEYSVC_HOST", str.strip, "127.0.0.1"),
        port=_from_env(env, "KEYSVC_PORT", _parse_port, 50051),
        log_level=_from_env(env, "KEYSVC_LOG_LEVEL", _choice(LOG_LEVELS), "info"),
        log_format=_from_env(env, "KEYSVC_LOG_FORMAT", _choice(LOG_FORMATS), "text"),
        shutdown_grace=_from_env(env, "KEYSVC_SHUTDOWN_GRACE", _parse_seconds, 10.0),
        model_families_file=_from_env(env, "KEYSVC_MODEL_FAMILIES_FILE", Path, None),
        metrics_port=_from_env(env, "KEYSVC_METRICS_PORT", _parse_port, None),
        metrics_host=_from_env(env, "KEYSVC_METRICS_HOST", str.strip, "127.0.0.1"),
    )
    overrides = {
        name: value
        for name, value in vars(args).items()
        if value is not None and name in Settings.__dataclass_fields__
    }
    return dataclasses.replace(base, **overrides)
