"""A fake Anthropic API on loopback, answering per key from a scenario table.

The sibling of ``keysvc.testing.fake_openai``: a real HTTP/1.1 server on a
thread of its own, bound to 127.0.0.1, serving ``GET /v1/models``,
``POST /v1/messages`` and ``POST /v1/messages/count_tokens`` the way the
upstream does: the key in ``x-api-key``, Anthropic-shaped error bodies
(``{"type": "error", "error": {"type", "message"}}``), and
``anthropic-ratelimit-*`` headers with RFC 3339 reset times, ``retry-after`` on
a 429. Token counting is free, as upstream: its answers carry its own request
limit (``Scenario.count_limit``), not the Messages limits.

In a test::

    with FakeAnthropic({"sk-ant-1": SCENARIOS["valid"]}) as fake:
        ...  # point ANTHROPIC_BASE_URL at fake.base_url; fake.requests records every call

From a shell (prints one JSON line with ``base_url`` and the demo keys)::

    python -m keysvc.testing.fake_anthropic --demo
"""

from __future__ import annotations

import argparse
import json
import signal
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler
from types import MappingProxyType
from typing import Any

from .threaded import ThreadedUpstream, UpstreamServer

__all__ = [
    "DEFAULT_MODELS",
    "SCENARIOS",
    "FakeAnthropic",
    "FakeError",
    "RecordedRequest",
    "Scenario",
    "demo_keys",
]

DEFAULT_MODELS: tuple[str, ...] = (
    "claude-opus-4-1-20250805",
    "claude-sonnet-4-5-20250929",
    "claude-3-5-haiku-20241022",
    "claude-3-haiku-20240307",
)


@dataclass(frozen=True, slots=True)
class FakeError:
    """An Anthropic error answer. ``retry_after``: the 429's retry-after seconds."""

    status: int
    type: str
    message: str = "fake upstream error"
    retry_after: int | None = None

    def body(self) -> dict[str, Any]:
        return {"type": "error", "error": {"type": self.type, "message": self.message}}


@dataclass(frozen=True, slots=True, kw_only=True)
class Scenario:
    """How the fake answers for one key.

    Attributes:
        models: model ids ``/v1/models`` lists.
        error: answer to every endpoint (e.g. 401 for a revoked key).
        message_error: answer to ``/v1/messages`` only (rate limits, spend limit, 529).
        count_error: answer to ``/v1/messages/count_tokens`` only.
        forbidden: models whose requests get 403 ``permission_error``.
        request_limit: the Messages ``anthropic-ratelimit-requests-limit``.
        count_limit: count_tokens' own request limit (100 at tier 1 ... 8,000 at tier 4).
        reset_in: seconds from the answer to the resets its headers name.
        fail_first: the key's first N requests get a 529.
    """

    models: tuple[str, ...] = DEFAULT_MODELS
    error: FakeError | None = None
    message_error: FakeError | None = None
    count_error: FakeError | None = None
    forbidden: tuple[str, ...] = ()
    request_limit: int = 1000
    count_limit: int = 2000
    reset_in: float = 1.0
    fail_first: int = 0


_SPEND_UNTIL = "2099-01-01T00:00:00Z"

SCENARIOS: Mapping[str, Scenario] = MappingProxyType(
    {
        "valid": Scenario(),
        "tier-1": Scenario(request_limit=50, count_limit=100),
        "trial": Scenario(request_limit=5, count_limit=5),
        "revoked": Scenario(
            error=FakeError(401, "authentication_error", "invalid x-api-key"),
        ),
        "rate-limited": Scenario(
            message_error=FakeError(
                429,
                "rate_limit_error",
                "This request would exceed your organization's rate limit of 50 requests per "
                "minute.",
                retry_after=20,
            ),
            reset_in=20.0,
        ),
        "spend-limit": Scenario(
            message_error=FakeError(
                429,
                "invalid_request_error",
                f"You have reached your specified API usage limits. Usage blocked until "
                f"{_SPEND_UNTIL}.",
            )
        ),
        "credit-low": Scenario(
            message_error=FakeError(
                400,
                "invalid_request_error",
                "Your credit balance is too low to access the Anthropic API. Please go to "
                "Plans & Billing to upgrade or purchase credits.",
            )
        ),
        "overloaded": Scenario(message_error=FakeError(529, "overloaded_error", "Overloaded")),
        "no-opus": Scenario(forbidden=("claude-opus-4-1-20250805",)),
        "haiku-only": Scenario(models=("claude-3-5-haiku-20241022",)),
        "flaky": Scenario(fail_first=2),
        "garbage": Scenario(models=()),
    }
)

_UNKNOWN_KEY = FakeError(401, "authentication_error", "invalid x-api-key")
_OVERLOADED = FakeError(529, "overloaded_error", "Overloaded")


def demo_keys() -> dict[str, Scenario]:
    """A handful of fake keys, one per interesting scenario, for ``make demo``."""
    names = ("valid", "tier-1", "revoked", "spend-limit", "no-opus", "overloaded")
    return {f"sk-ant-demo-{name}-{i:04d}": SCENARIOS[name] for i, name in enumerate(names)}


@dataclass(frozen=True, slots=True)
class RecordedRequest:
    """One request the fake answered; ``key`` is the x-api-key (fake keys only)."""

    time: float  # time.monotonic()
    method: str
    path: str
    key: str
    model: str | None
    status: int


@dataclass(slots=True)
class _State:
    scenarios: dict[str, Scenario]
    requests: list[RecordedRequest] = field(default_factory=list)
    counts: dict[str, int] = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock)


_Server = UpstreamServer[_State]


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True
    server: _Server

    def log_message(self, format: str, *args: Any) -> None:
        """Quiet: the fake's requests are in ``FakeAnthropic.requests``."""

    def do_GET(self) -> None:
        self._handle()

    def do_POST(self) -> None:
        self._handle()

    def _handle(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        raw = self.rfile.read(length) if length else b""
        state = self.server.state
        key = (self.headers.get("x-api-key") or "").strip()
        path = self.path.split("?", 1)[0]
        try:
            request = json.loads(raw) if raw else None
        except ValueError:
            request = None
        model = request.get("model") if isinstance(request, dict) else None
        with state.lock:
            scenario = state.scenarios.get(key)
            state.counts[key] = count = state.counts.get(key, 0) + 1
        status, body, headers = self._answer(path, scenario, count, model, request)
        with state.lock:
            state.requests.append(
                RecordedRequest(
                    time.monotonic(),
                    self.command,
                    path,
                    key,
                    model if isinstance(model, str) else None,
                    status,
                )
            )
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        for name, value in headers.items():
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(body)

    def _answer(
        self,
        path: str,
        scenario: Scenario | None,
        count: int,
        model: object,
        request: object,
    ) -> tuple[int, bytes, dict[str, str]]:
        routes = {
            ("GET", "/v1/models"),
            ("POST", "/v1/messages"),
            ("POST", "/v1/messages/count_tokens"),
        }
        if (self.command, path) not in routes:
            return _error(FakeError(404, "not_found_error", f"Unknown URL {path}"))
        if scenario is None:
            return _error(_UNKNOWN_KEY)
        if count <= scenario.fail_first:
            return _error(_OVERLOADED)
        if scenario.error is not None:
            return _error(scenario.error)
        if path == "/v1/models":
            data = [
                {
                    "type": "model",
                    "id": m,
                    "display_name": m,
                    "created_at": "2025-01-01T00:00:00Z",
                }
                for m in scenario.models
            ]
            page = {
                "data": data,
                "has_more": False,
                "first_id": data[0]["id"] if data else None,
                "last_id": data[-1]["id"] if data else None,
            }
            return 200, _json(page), {}
        if not isinstance(model, str) or model not in scenario.models:
            return _error(FakeError(404, "not_found_error", f"model: {model}"))
        if model in scenario.forbidden:
            return _error(
                FakeError(403, "permission_error", f"Your API key does not have access to {model}")
            )
        if path == "/v1/messages/count_tokens":
            headers = _limits(scenario.count_limit, None, scenario.reset_in)
            if scenario.count_error is not None:
                return _error(scenario.count_error, headers)
            return 200, _json({"input_tokens": 9}), headers
        headers = _limits(scenario.request_limit, 80_000, scenario.reset_in)
        if scenario.message_error is not None:
            return _error(scenario.message_error, headers)
        max_tokens = request.get("max_tokens") if isinstance(request, dict) else None
        if not isinstance(max_tokens, int) or max_tokens < 1:
            return _error(
                FakeError(400, "invalid_request_error", "max_tokens: must be at least 1"), headers
            )
        message = {
            "id": "msg_fake",
            "type": "message",
            "role": "assistant",
            "model": model,
            "content": [{"type": "text", "text": "Hello from the fake upstream."}],
            "stop_reason": "end_turn",
            "usage": {"input_tokens": 9, "output_tokens": 7},
        }
        return 200, _json(message), headers


def _limits(requests: int, tokens: int | None, reset_in: float) -> dict[str, str]:
    """``anthropic-ratelimit-*`` headers: one request spent, resets ``reset_in`` from now."""
    reset = datetime.fromtimestamp(time.time() + reset_in, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    headers = {
        "anthropic-ratelimit-requests-limit": str(requests),
        "anthropic-ratelimit-requests-remaining": str(max(0, requests - 1)),
        "anthropic-ratelimit-requests-reset": reset,
    }
    if tokens is not None:
        for dimension, limit in (
            ("tokens", tokens),
            ("input-tokens", tokens * 4 // 5),
            ("output-tokens", tokens // 5),
        ):
            headers[f"anthropic-ratelimit-{dimension}-limit"] = str(limit)
            headers[f"anthropic-ratelimit-{dimension}-remaining"] = str(limit - 16)
            headers[f"anthropic-ratelimit-{dimension}-reset"] = reset
    return headers


def _error(
    error: FakeError, headers: Mapping[str, str] | None = None
) -> tuple[int, bytes, dict[str, str]]:
    out = dict(headers or {})
    if error.retry_after is not None:
        out["retry-after"] = str(error.retry_after)
    return error.status, _json(error.body()), out


def _json(doc: object) -> bytes:
    return json.dumps(doc).encode()


class FakeAnthropic(ThreadedUpstream[_State]):
    """The fake upstream: start it, point a checker at ``base_url``, stop it."""

    def __init__(self, scenarios: Mapping[str, Scenario] | None = None) -> None:
        super().__init__(_Handler, _State(dict(scenarios or {})), name="fake-anthropic")

    def add(self, key: str, scenario: Scenario) -> None:
        with self._state.lock:
            self._state.scenarios[key] = scenario

    @property
    def requests(self) -> list[RecordedRequest]:
        with self._state.lock:
            return list(self._state.requests)


def main(argv: Sequence[str] | None = None) -> int:
    """Serves the fake upstream until SIGINT/SIGTERM; prints its base URL and keys as JSON."""
    parser = argparse.ArgumentParser(description="Serve a fake Anthropic API on 127.0.0.1.")
    parser.add_argument(
        "--demo", action="store_true", help="serve the demo keys (one per scenario)"
    )
    args = parser.parse_args(argv)
    keys = demo_keys() if args.demo else {}
    stop = threading.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda *_: stop.set())
    with FakeAnthropic(keys) as fake:
        names = {key: name for name, s in SCENARIOS.items() for key, k in keys.items() if k is s}
        print(json.dumps({"base_url": fake.base_url, "keys": names}), flush=True)
        stop.wait()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
