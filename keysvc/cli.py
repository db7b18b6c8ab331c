"""Command line: ``keysvc serve`` (also ``python -m keysvc serve``) and ``keysvc status``."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence

from . import __version__
from .config import ConfigError, add_serve_arguments, settings_from
from .logs import configure_logging
from .status_command import add_status_arguments, run_status
from .workers import run

__all__ = ["main"]

_log = logging.getLogger("keysvc")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="keysvc", description="gRPC key allocation service for LLM proxies."
    )
    parser.add_argument("--version", action="version", version=f"keysvc {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)
    serve_parser = commands.add_parser(
        "serve",
        help="serve keysvc.v1.KeyService",
        description="Serve keysvc.v1.KeyService. Keys come from OPENAI_KEY (comma-separated).",
    )
    add_serve_arguments(serve_parser)
    status_parser = commands.add_parser(
        "status",
        help="print a running server's keys by family and state",
        description="Ask a running keysvc (List, GetLockoutPeriod) and print its keys by "
        "model family and state, lockouts and tokens used.",
    )
    add_status_arguments(status_parser)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Runs the command; returns the process exit code."""
    args = _parser().parse_args(argv)
    if args.command == "status":
        return run_status(args)
    try:
        settings = settings_from(args)
    except ConfigError as exc:
        print(f"keysvc: {exc}", file=sys.stderr)
        return 2
    configure_logging(settings.log_level, settings.log_format)
    return run(settings)
