"""keysvc's settings: one frozen object, from environment variables overridden by flags.

Every setting has an environment variable and (except secrets) a flag; the
README lists them all with their defaults.
"""

from __future__ import annotations

import argparse
import dataclasses
import ipaddress
import os
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

from .auth import parse_token_text
from .durations import parse_go_duration
from .keys import parse_key_list, service_of
from .listing import DEFAULT_MAX_PAGE_SIZE
from .logs import LOG_FORMATS, LOG_LEVELS
from .overload import (
    DEFAULT_MAX_AGE,
    DEFAULT_MAX_IDLE,
    DEFAULT_MAX_IN_FLIGHT,
    DEFAULT_MAX_IN_FLIGHT_LISTS,
    DEFAULT_MAX_STREAMS,
    ConnectionLimits,
)
from .providers import ANTHROPIC, OPENAI

__all__ = [
    "ConfigError",
    "Settings",
    "add_serve_arguments",
    "check_settings",
    "is_loopback",
    "settings_from",
    "tls_problem",
]

DEFAULT_OPENAI_BASE_URL = "https://api.openai.com/v1"
DEFAULT_ANTHROPIC_BASE_URL = "https://api.anthropic.com/v1"
#: Most server processes ``--workers`` starts.
MAX_WORKERS = 64
#: KEYSVC_UNKNOWN_MODELS: refuse a model no rule of the model table matches.
UNKNOWN_MODELS_REJECT = "reject"

T = TypeVar("T")


class ConfigError(ValueError):
    """A setting has a value keysvc cannot use; the message names the setting."""


@dataclass(frozen=True, slots=True, kw_only=True)
class Settings:
    """Everything the server needs to know, read once at start-up."""

    #: The upstream API keys (OPENAI_KEY). Never printed: repr hides them.
    openai_keys: tuple[str, ...] = field(default=(), repr=False)
    #: Anthropic keys (ANTHROPIC_KEY), each ``sk-ant-...``. Never printed.
    anthropic_keys: tuple[str, ...] = field(default=(), repr=False)
    check_keys: bool = True
    #: None allows every family.
    allowed_families: frozenset[str] | None = None
    openai_base_url: str = DEFAULT_OPENAI_BASE_URL
    anthropic_base_url: str = DEFAULT_ANTHROPIC_BASE_URL
    host: str = "127.0.0.1"
    port: int = 50051
    log_level: str = "info"
    log_format: str = "text"
    #: Seconds in-flight calls get to finish after SIGTERM/SIGINT.
    shutdown_grace: float = 10.0
    #: Extra model → family rules, tried before the built-in ones.
    model_families_file: Path | None = None
    #: What a model no rule matches gets: ``reject`` (INVALID_ARGUMENT naming the
    #: model) or the name of the family it is served from.
    unknown_models: str = UNKNOWN_MODELS_REJECT
    #: Seconds one key's check (three upstream calls) may take.
    check_timeout: float = 10.0
    #: Seconds between the end of one batch of key checks and the start of the next.
    check_interval: float = 3.0
    #: Seconds between full rechecks of every live key; 0 turns them off.
    recheck_interval: float = 8 * 3600.0
    #: Bearer tokens of the proxy and admin roles; none at all turns auth off.
    proxy_tokens: frozenset[str] = field(default=frozenset(), repr=False)
    admin_tokens: frozenset[str] = field(default=frozenset(), repr=False)
    #: TLS: server certificate chain and key (PEM); a client CA turns on mutual TLS.
    tls_cert: Path | None = None
    tls_key: Path | None = None
    tls_client_ca: Path | None = None
    #: Allow a non-loopback address with neither tokens nor TLS.
    insecure: bool = False
    #: The SQLite database where key state survives restarts; None keeps it in memory only.
    state_file: Path | None = None
    #: Start with empty state when the state file is corrupt (moved aside, not overwritten).
    ignore_state: bool = False
    #: More keys, one per line; reloaded on SIGHUP and when the file changes.
    keys_file: Path | None = None
    #: Port of the HTTP server for /metrics, the status page, /healthz and /readyz; None = off.
    metrics_port: int | None = None
    metrics_host: str = "127.0.0.1"
    #: Most keys in one List page, and the page size when a request names none.
    list_max_page_size: int = DEFAULT_MAX_PAGE_SIZE
    #: Longest an Envoy ext_proc request waits for a key to unlock (seconds, <= 60).
    ext_proc_max_wait: float = 5.0
    #: KeyService calls in flight at once; beyond, RESOURCE_EXHAUSTED / OVERLOADED.
    max_in_flight: int = DEFAULT_MAX_IN_FLIGHT
    #: List calls in flight at once (their replies grow with the pool).
    max_in_flight_lists: int = DEFAULT_MAX_IN_FLIGHT_LISTS
    #: HTTP/2 streams (calls) one client connection may have open at once.
    max_streams_per_connection: int = DEFAULT_MAX_STREAMS
    #: Seconds a connection with no call stays open.
    max_connection_idle: float = DEFAULT_MAX_IDLE
    #: Seconds after which a connection is asked to go away (and closed 90 s later).
    max_connection_age: float = DEFAULT_MAX_AGE
    #: The shared pool's Redis (redis://, rediss://, unix://); None keeps the pool in
    #: this process. Not printed: the URL may hold a password.
    redis_url: str | None = field(default=None, repr=False)
    #: The pool's name on that Redis; replicas with the same URL and prefix share one pool.
    redis_prefix: str = "keysvc"
    #: Seconds one RPC may spend on Redis in all; past it, UNAVAILABLE / STORE_UNAVAILABLE.
    redis_timeout: float = 0.25
    #: Server processes on one port (SO_REUSEPORT); more than 1 needs ``redis_url``.
    workers: int = 1

    @property
    def connection_limits(self) -> ConnectionLimits:
        return ConnectionLimits(
            max_streams=self.max_streams_per_connection,
            max_idle=self.max_connection_idle,
            max_age=self.max_connection_age,
        )


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


def _parse_page_size(text: str) -> int:
    size = int(text)
    if not 1 <= size <= 10_000:
        raise ValueError(f"{text} is not between 1 and 10000")
    return size


def _parse_timeout(text: str) -> float:
    seconds = float(text)
    if not 0 < seconds <= 600:
        raise ValueError(f"{text} is not between 0 (exclusive) and 600 seconds")
    return seconds


def _parse_redis_url(text: str) -> str:
    url = text.strip()
    if not url.startswith(("redis://", "rediss://", "unix://")):
        raise ValueError("is not a redis://, rediss:// or unix:// URL")
    return url


def _parse_redis_prefix(text: str) -> str:
    prefix = text.strip()
    if not re.fullmatch(r"[A-Za-z0-9_.:-]{1,64}", prefix):
        raise ValueError(f"{prefix!r} is not 1 to 64 of A-Z a-z 0-9 _ . : -")
    return prefix


def _parse_redis_timeout(text: str) -> float:
    """Seconds, or a Go-style duration such as "250ms"."""
    seconds = parse_go_duration(text)
    if seconds is None:
        seconds = float(text)
    if not 0 < seconds <= 60:
        raise ValueError(f"{text} is not between 0 (exclusive) and 60 seconds")
    return seconds


def _parse_interval(text: str) -> float:
    """Seconds, or a Go-style duration such as "8h" or "90m"."""
    seconds = parse_go_duration(text)
    if seconds is None:
        seconds = float(text)
    if not 0 <= seconds <= 30 * 86_400:
        raise ValueError(f"{text} is not between 0 and 30 days")
    return seconds


def _parse_max_wait(text: str) -> float:
    seconds = float(text)
    if not 0 <= seconds <= 60:
        raise ValueError(f"{text} is not between 0 and 60 seconds")
    return seconds


def _parse_count(text: str) -> int:
    count = int(text)
    if not 1 <= count <= 1_000_000:
        raise ValueError(f"{text} is not between 1 and 1000000")
    return count


def _parse_workers(text: str) -> int:
    count = int(text)
    if not 1 <= count <= MAX_WORKERS:
        raise ValueError(f"{text} is not between 1 and {MAX_WORKERS}")
    return count


def _parse_lifetime(text: str) -> float:
    """Seconds or a Go-style duration, more than 0 and at most 30 days."""
    seconds = _parse_interval(text)
    if seconds <= 0:
        raise ValueError(f"{text} is not more than 0")
    return seconds


def _parse_families(text: str) -> frozenset[str] | None:
    families = frozenset(f.strip() for f in text.split(",") if f.strip())
    return families or None


def _parse_unknown_models(text: str) -> str:
    value = text.strip()
    if value.lower() == UNKNOWN_MODELS_REJECT:
        return UNKNOWN_MODELS_REJECT
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}", value):
        raise ValueError(f"expected reject or a model family name, got {text!r}")
    return value


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
    parser.add_argument(
        "--anthropic-base-url",
        help="Anthropic API base URL (env ANTHROPIC_BASE_URL, default"
        f" {DEFAULT_ANTHROPIC_BASE_URL})",
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
        "--unknown-models",
        type=_flag_type("rule", _parse_unknown_models),
        help="reject (INVALID_ARGUMENT) or the family to serve a model no rule matches"
        " from (env KEYSVC_UNKNOWN_MODELS, default reject)",
    )
    parser.add_argument(
        "--check-timeout",
        type=_flag_type("seconds", _parse_timeout),
        help="seconds one key check may take (env KEYSVC_CHECK_TIMEOUT, default 10)",
    )
    parser.add_argument(
        "--check-interval",
        type=_flag_type("seconds", _parse_interval),
        help="seconds between batches of key checks (env KEYSVC_CHECK_INTERVAL, default 3)",
    )
    parser.add_argument(
        "--recheck-interval",
        type=_flag_type("duration", _parse_interval),
        help="period of the full recheck of live keys, e.g. 8h; 0 = never "
        "(env KEYSVC_RECHECK_INTERVAL, default 8h)",
    )
    # Tokens are secrets: only their files have flags (a command line is visible to `ps`).
    parser.add_argument(
        "--proxy-tokens-file",
        type=Path,
        help="file of proxy-role bearer tokens (env KEYSVC_PROXY_TOKENS_FILE;"
        " or KEYSVC_PROXY_TOKENS, comma-separated)",
    )
    parser.add_argument(
        "--admin-tokens-file",
        type=Path,
        help="file of admin-role bearer tokens (env KEYSVC_ADMIN_TOKENS_FILE;"
        " or KEYSVC_ADMIN_TOKENS, comma-separated)",
    )
    parser.add_argument(
        "--tls-cert", type=Path, help="PEM server certificate chain (env KEYSVC_TLS_CERT)"
    )
    parser.add_argument("--tls-key", type=Path, help="PEM server private key (env KEYSVC_TLS_KEY)")
    parser.add_argument(
        "--tls-client-ca",
        type=Path,
        help="PEM CA for client certificates; turns on mutual TLS (env KEYSVC_TLS_CLIENT_CA)",
    )
    parser.add_argument(
        "--insecure",
        action="store_true",
        default=None,
        help="allow a non-loopback --host with neither tokens nor TLS (env KEYSVC_INSECURE)",
    )
    parser.add_argument(
        "--state-file",
        type=Path,
        help="SQLite database (e.g. state.db) where key state survives restarts; a JSON"
        " state file of an earlier keysvc is converted in place (env KEYSVC_STATE_FILE)",
    )
    parser.add_argument(
        "--ignore-state",
        action="store_true",
        default=None,
        help="start with empty state if the state file is corrupt; it is moved aside"
        " (env KEYSVC_IGNORE_STATE)",
    )
    parser.add_argument(
        "--keys-file",
        type=Path,
        help="file of more keys, one per line, reloaded on SIGHUP or change (env KEYSVC_KEYS_FILE)",
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
    parser.add_argument(
        "--list-max-page-size",
        type=_flag_type("keys", _parse_page_size),
        help="most keys in one List page, and the size of a page when a request names none"
        f" (env KEYSVC_LIST_MAX_PAGE_SIZE, default {DEFAULT_MAX_PAGE_SIZE})",
    )
    parser.add_argument(
        "--ext-proc-max-wait",
        type=_flag_type("seconds", _parse_max_wait),
        help="longest an Envoy ext_proc request waits for a key to unlock, 0 to 60 s"
        " (env KEYSVC_EXT_PROC_MAX_WAIT, default 5)",
    )
    parser.add_argument(
        "--max-in-flight",
        type=_flag_type("calls", _parse_count),
        help="KeyService calls in flight at once; more are refused with RESOURCE_EXHAUSTED"
        f" (env KEYSVC_MAX_IN_FLIGHT, default {DEFAULT_MAX_IN_FLIGHT})",
    )
    parser.add_argument(
        "--max-in-flight-lists",
        type=_flag_type("calls", _parse_count),
        help="List calls in flight at once"
        f" (env KEYSVC_MAX_IN_FLIGHT_LISTS, default {DEFAULT_MAX_IN_FLIGHT_LISTS})",
    )
    parser.add_argument(
        "--max-streams-per-connection",
        type=_flag_type("streams", _parse_count),
        help="calls one client connection may have open at once"
        f" (env KEYSVC_MAX_STREAMS_PER_CONNECTION, default {DEFAULT_MAX_STREAMS})",
    )
    parser.add_argument(
        "--max-connection-idle",
        type=_flag_type("duration", _parse_lifetime),
        help="close a connection with no call for this long, e.g. 5m"
        " (env KEYSVC_MAX_CONNECTION_IDLE, default 5m)",
    )
    parser.add_argument(
        "--max-connection-age",
        type=_flag_type("duration", _parse_lifetime),
        help="ask a connection to go away after this long, e.g. 30m; it is closed 90 s later"
        " (env KEYSVC_MAX_CONNECTION_AGE, default 30m)",
    )
    parser.add_argument(
        "--redis-url",
        type=_flag_type("URL", _parse_redis_url),
        help="share one pool among replicas through this Redis (redis://, rediss://,"
        " unix://); unset keeps the pool in this process (env KEYSVC_REDIS_URL)",
    )
    parser.add_argument(
        "--redis-prefix",
        type=_flag_type("prefix", _parse_redis_prefix),
        help="the pool's name on that Redis (env KEYSVC_REDIS_PREFIX, default keysvc)",
    )
    parser.add_argument(
        "--redis-timeout",
        type=_flag_type("duration", _parse_redis_timeout),
        help="longest one call may spend on Redis, e.g. 250ms; past it UNAVAILABLE"
        " (env KEYSVC_REDIS_TIMEOUT, default 250ms)",
    )
    parser.add_argument(
        "--workers",
        type=_flag_type("count", _parse_workers),
        help="server processes on the one port, sharing the pool through Redis (needs"
        " --redis-url when more than 1; env KEYSVC_WORKERS, default 1)",
    )


def tls_problem(cert: Path | None, key: Path | None, client_ca: Path | None) -> str | None:
    """What is wrong with a half-configured TLS set-up, or None when it is whole or absent."""
    if cert is None and key is None:
        if client_ca is not None:
            return (
                "KEYSVC_TLS_CLIENT_CA is set but KEYSVC_TLS_CERT and KEYSVC_TLS_KEY are not:"
                " client certificates need TLS; set both or unset the client CA"
            )
        return None
    if cert is None:
        return "KEYSVC_TLS_KEY is set but KEYSVC_TLS_CERT is not: TLS needs both"
    if key is None:
        return "KEYSVC_TLS_CERT is set but KEYSVC_TLS_KEY is not: TLS needs both"
    return None


def is_loopback(host: str) -> bool:
    """True for addresses only this machine can reach (127.0.0.0/8, ::1, localhost)."""
    host = host.strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _tokens(env: Mapping[str, str], name: str, file_flag: Path | None) -> frozenset[str]:
    """Tokens from ``name`` (a comma list) and from ``name``_FILE or its flag."""
    none: list[str] = []
    found = _from_env(env, name, parse_token_text, none)
    path = file_flag or _from_env(env, f"{name}_FILE", Path, None)
    if path is not None:
        try:
            text = path.read_text()
        except (OSError, UnicodeDecodeError) as exc:
            raise ConfigError(f"{name}_FILE: cannot read {path}: {exc}") from exc
        try:
            found += parse_token_text(text)
        except ValueError as exc:
            raise ConfigError(f"{name}_FILE: {path}: {exc}") from exc
    return frozenset(found)


def check_settings(settings: Settings) -> None:
    """The start-up checks that need several settings at once.

    Raises:
        ConfigError: TLS is half-configured, or the server would listen beyond
            this machine with neither tokens nor TLS and ``insecure`` is not set.
    """
    problem = tls_problem(settings.tls_cert, settings.tls_key, settings.tls_client_ca)
    if problem:
        raise ConfigError(problem)
    if settings.redis_url is not None:
        if settings.state_file is not None:
            raise ConfigError(
                "KEYSVC_REDIS_URL cannot be used with KEYSVC_STATE_FILE (Redis keeps the state)"
            )
    if settings.workers > 1 and settings.redis_url is None:
        raise ConfigError(
            f"KEYSVC_WORKERS={settings.workers} needs KEYSVC_REDIS_URL: workers share the"
            " pool through Redis (on the in-memory pool each worker would hold a pool of"
            " its own and hand out the same keys)"
        )
    has_tokens = bool(settings.proxy_tokens or settings.admin_tokens)
    if not is_loopback(settings.host) and not has_tokens and settings.tls_cert is None:
        if not settings.insecure:
            raise ConfigError(
                f"refusing to listen on {settings.host!r} with neither tokens nor TLS: anyone"
                " who can reach it could take the keys. Set KEYSVC_PROXY_TOKENS/"
                "KEYSVC_ADMIN_TOKENS and/or KEYSVC_TLS_CERT+KEYSVC_TLS_KEY, listen on"
                " 127.0.0.1, or pass --insecure (KEYSVC_INSECURE=true) if the network is"
                " protected by other means"
            )


def _provider_keys(env: Mapping[str, str], name: str, provider: str) -> tuple[str, ...]:
    """The keys of a comma-separated key variable, each of which must be ``provider``'s
    (a key's provider is told by its prefix: ``sk-ant-`` is Anthropic's).

    Raises:
        ConfigError: a key is another provider's (named by position, never by value).
    """
    keys = parse_key_list(env.get(name, ""))
    for position, secret in enumerate(keys, start=1):
        if service_of(secret) != provider:
            hint = "keys start with sk-ant-" if provider == ANTHROPIC else "it starts with sk-ant-"
            raise ConfigError(
                f"{name}: key {position} is not an {provider} key ({hint}); put OpenAI"
                " keys in OPENAI_KEY and Anthropic keys in ANTHROPIC_KEY"
            )
    return tuple(keys)


def settings_from(args: argparse.Namespace, env: Mapping[str, str] | None = None) -> Settings:
    """The settings: environment variables first, then any flag given on the command line.

    Raises:
        ConfigError: an environment variable holds an unusable value.
    """
    env = os.environ if env is None else env
    base = Settings(
        openai_keys=_provider_keys(env, "OPENAI_KEY", OPENAI),
        check_keys=_from_env(env, "CHECK_KEYS", _parse_bool, True),
        allowed_families=_from_env(env, "ALLOWED_MODEL_FAMILIES", _parse_families, None),
        anthropic_keys=_provider_keys(env, "ANTHROPIC_KEY", ANTHROPIC),
        openai_base_url=_from_env(env, "OPENAI_BASE_URL", str.strip, DEFAULT_OPENAI_BASE_URL),
        anthropic_base_url=_from_env(
            env, "ANTHROPIC_BASE_URL", str.strip, DEFAULT_ANTHROPIC_BASE_URL
        ),
        host=_from_env(env, "KEYSVC_HOST", str.strip, "127.0.0.1"),
        port=_from_env(env, "KEYSVC_PORT", _parse_port, 50051),
        log_level=_from_env(env, "KEYSVC_LOG_LEVEL", _choice(LOG_LEVELS), "info"),
        log_format=_from_env(env, "KEYSVC_LOG_FORMAT", _choice(LOG_FORMATS), "text"),
        shutdown_grace=_from_env(env, "KEYSVC_SHUTDOWN_GRACE", _parse_seconds, 10.0),
        model_families_file=_from_env(env, "KEYSVC_MODEL_FAMILIES_FILE", Path, None),
        unknown_models=_from_env(
            env, "KEYSVC_UNKNOWN_MODELS", _parse_unknown_models, UNKNOWN_MODELS_REJECT
        ),
        check_timeout=_from_env(env, "KEYSVC_CHECK_TIMEOUT", _parse_timeout, 10.0),
        check_interval=_from_env(env, "KEYSVC_CHECK_INTERVAL", _parse_interval, 3.0),
        recheck_interval=_from_env(env, "KEYSVC_RECHECK_INTERVAL", _parse_interval, 8 * 3600.0),
        proxy_tokens=_tokens(env, "KEYSVC_PROXY_TOKENS", getattr(args, "proxy_tokens_file", None)),
        admin_tokens=_tokens(env, "KEYSVC_ADMIN_TOKENS", getattr(args, "admin_tokens_file", None)),
        tls_cert=_from_env(env, "KEYSVC_TLS_CERT", Path, None),
        tls_key=_from_env(env, "KEYSVC_TLS_KEY", Path, None),
        tls_client_ca=_from_env(env, "KEYSVC_TLS_CLIENT_CA", Path, None),
        insecure=_from_env(env, "KEYSVC_INSECURE", _parse_bool, False),
        state_file=_from_env(env, "KEYSVC_STATE_FILE", Path, None),
        ignore_state=_from_env(env, "KEYSVC_IGNORE_STATE", _parse_bool, False),
        keys_file=_from_env(env, "KEYSVC_KEYS_FILE", Path, None),
        metrics_port=_from_env(env, "KEYSVC_METRICS_PORT", _parse_port, None),
        metrics_host=_from_env(env, "KEYSVC_METRICS_HOST", str.strip, "127.0.0.1"),
        list_max_page_size=_from_env(
            env, "KEYSVC_LIST_MAX_PAGE_SIZE", _parse_page_size, DEFAULT_MAX_PAGE_SIZE
        ),
        ext_proc_max_wait=_from_env(env, "KEYSVC_EXT_PROC_MAX_WAIT", _parse_max_wait, 5.0),
        max_in_flight=_from_env(env, "KEYSVC_MAX_IN_FLIGHT", _parse_count, DEFAULT_MAX_IN_FLIGHT),
        max_in_flight_lists=_from_env(
            env, "KEYSVC_MAX_IN_FLIGHT_LISTS", _parse_count, DEFAULT_MAX_IN_FLIGHT_LISTS
        ),
        max_streams_per_connection=_from_env(
            env, "KEYSVC_MAX_STREAMS_PER_CONNECTION", _parse_count, DEFAULT_MAX_STREAMS
        ),
        max_connection_idle=_from_env(
            env, "KEYSVC_MAX_CONNECTION_IDLE", _parse_lifetime, DEFAULT_MAX_IDLE
        ),
        max_connection_age=_from_env(
            env, "KEYSVC_MAX_CONNECTION_AGE", _parse_lifetime, DEFAULT_MAX_AGE
        ),
        redis_url=_from_env(env, "KEYSVC_REDIS_URL", _parse_redis_url, None),
        redis_prefix=_from_env(env, "KEYSVC_REDIS_PREFIX", _parse_redis_prefix, "keysvc"),
        redis_timeout=_from_env(env, "KEYSVC_REDIS_TIMEOUT", _parse_redis_timeout, 0.25),
        workers=_from_env(env, "KEYSVC_WORKERS", _parse_workers, 1),
    )
    overrides = {
        name: value
        for name, value in vars(args).items()
        if value is not None and name in Settings.__dataclass_fields__
    }
    settings = dataclasses.replace(base, **overrides)
    check_settings(settings)
    return settings
