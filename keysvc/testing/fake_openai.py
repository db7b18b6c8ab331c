"""A fake OpenAI API on loopback, answering per key from a scenario table.

A real HTTP/1.1 server (stdlib ``ThreadingHTTPServer`` on a thread of its own,
bound to 127.0.0.1) serving ``GET /v1/models``, ``POST /v1/chat/completions``
and ``GET /v1/organizations`` the way the upstream does: OpenAI-shaped error
bodies, ``x-ratelimit-*`` headers, the ``OpenAI-Organization`` header checked
against the key's organizations; a completion asked with ``"stream": true`` comes
as server-sent events (chunked, ``Scenario.stream_interval`` apart). It runs on its
own thread so that a test or demo whose event loop is busy (or stopping) does not
stall it.

In a test::

    with FakeOpenAI({"sk-1": SCENARIOS["valid"], "sk-2": SCENARIOS["revoked"]}) as fake:
        ...  # point OPENAI_BASE_URL at fake.base_url; fake.requests records every call

From a shell (prints one JSON line with ``base_url`` and the demo keys, then
serves until SIGINT/SIGTERM)::

    python -m keysvc.testing.fake_openai --demo
"""

from __future__ import annotations

import argparse
import json
import signal
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler
from types import MappingProxyType
from typing import Any

from .threaded import ThreadedUpstream, UpstreamServer

__all__ = [
    "DEFAULT_MODELS",
    "SCENARIOS",
    "FakeError",
    "FakeOpenAI",
    "Organization",
    "RecordedRequest",
    "Scenario",
    "demo_keys",
]

DEFAULT_MODELS: tuple[str, ...] = (
    "gpt-3.5-turbo",
    "gpt-3.5-turbo-0125",
    "gpt-4",
    "gpt-4-0613",
    "gpt-4-turbo",
    "gpt-4o",
    "gpt-4o-mini",
    "text-embedding-ada-002",
    "babbage-002",
    "whisper-1",
)


@dataclass(frozen=True, slots=True)
class FakeError:
    """An OpenAI error answer: ``{"error": {"message", "type", "param", "code"}}``."""

    status: int
    type: str
    code: str | None = None
    message: str = "fake upstream error"

    def body(self) -> dict[str, Any]:
        return {
            "error": {"message": self.message, "type": self.type, "param": None, "code": self.code}
        }


@dataclass(frozen=True, slots=True)
class Organization:
    id: str
    is_default: bool = False
    #: The models the key sees in this organization; None = the scenario's models.
    models: tuple[str, ...] | None = None


#: The ``x-ratelimit-reset-requests`` every answer carries unless its scenario says otherwise.
DEFAULT_RESET = "17ms"


@dataclass(frozen=True, slots=True, kw_only=True)
class Scenario:
    """How the fake answers for one key.

    Attributes:
        models: model ids ``/v1/models`` lists (per organization: ``Organization.models``).
        organizations: what ``/v1/organizations`` lists.
        error: answer to every endpoint (e.g. 401 for a revoked key).
        completion_error: answer to ``/v1/chat/completions`` only (quota, rate limits).
        request_limit: the ``x-ratelimit-limit-requests`` value (<= 250 is a trial key).
        delay: seconds to wait before answering.
        fail_first: the key's first N requests get a 503 (with an OpenAI error body).
        garbage: answer every request with 200 and a body that is not JSON.
        stream_interval: seconds between the events of a streamed (``"stream": true``)
            completion, so a test can see them arrive one by one.
        reset_requests: the ``x-ratelimit-reset-requests`` value (how long a 429 rests the key).
    """

    models: tuple[str, ...] = DEFAULT_MODELS
    organizations: tuple[Organization, ...] = (Organization("org-default", is_default=True),)
    error: FakeError | None = None
    completion_error: FakeError | None = None
    request_limit: int = 3500
    delay: float = 0.0
    fail_first: int = 0
    garbage: bool = False
    stream_interval: float = 0.0
    reset_requests: str = DEFAULT_RESET


_QUOTA = "You exceeded your current quota, please check your plan and billing details."

SCENARIOS: Mapping[str, Scenario] = MappingProxyType(
    {
        "valid": Scenario(),
        "gpt4-32k": Scenario(models=(*DEFAULT_MODELS, "gpt-4-32k", "gpt-4-32k-0613")),
        "revoked": Scenario(
            error=FakeError(
                401, "invalid_request_error", "invalid_api_key", "Incorrect API key provided."
            )
        ),
        "over-quota": Scenario(
            completion_error=FakeError(429, "insufficient_quota", "insufficient_quota", _QUOTA)
        ),
        "billing-inactive": Scenario(
            completion_error=FakeError(429, "billing_not_active", "billing_not_active")
        ),
        "terminated": Scenario(
            completion_error=FakeError(429, "access_terminated", "access_terminated")
        ),
        "hard-limit": Scenario(
            completion_error=FakeError(400, "invalid_request_error", "billing_hard_limit_reached")
        ),
        "trial": Scenario(models=("gpt-3.5-turbo", "text-embedding-ada-002"), request_limit=200),
        "trial-rate-limited": Scenario(
            request_limit=3,
            completion_error=FakeError(429, "requests", "rate_limit_exceeded"),
        ),
        "busy": Scenario(completion_error=FakeError(429, "requests", "rate_limit_exceeded")),
        # Answers that say the key's quota is spent: 1 request per 20 s, none left.
        "spent": Scenario(request_limit=1, reset_requests="20s"),
        "spent-for-a-second": Scenario(request_limit=1, reset_requests="1s"),
        "tokens-busy": Scenario(completion_error=FakeError(429, "tokens", "rate_limit_exceeded")),
        "multi-org": Scenario(
            organizations=(
                Organization("org-main", is_default=True),
                Organization("org-team", models=("gpt-3.5-turbo", "gpt-4o")),
                Organization("org-lab", models=(*DEFAULT_MODELS, "gpt-4-32k")),
            )
        ),
        "slow": Scenario(delay=3.0),
        "flaky": Scenario(fail_first=3),
        "garbage": Scenario(garbage=True),
        "forbidden": Scenario(
            error=FakeError(403, "invalid_request_error", "unsupported_country_region_territory")
        ),
    }
)

_UNKNOWN_KEY = FakeError(
    401, "invalid_request_error", "invalid_api_key", "Incorrect API key provided."
)
_NO_KEY = FakeError(401, "invalid_request_error", None, "You didn't provide an API key.")
_WRONG_ORG = FakeError(
    401,
    "invalid_request_error",
    "mismatched_organization",
    "OpenAI-Organization header should match organization for API key",
)
_SERVER_ERROR = FakeError(503, "server_error", None, "The server is overloaded.")


def demo_keys() -> dict[str, Scenario]:
    """A handful of fake keys, one per interesting scenario, for ``make demo``."""
    names = ("valid", "gpt4-32k", "trial", "revoked", "over-quota", "multi-org", "flaky", "busy")
    return {f"sk-demo-{name}-{i:04d}": SCENARIOS[name] for i, name in enumerate(names)}


@dataclass(frozen=True, slots=True)
class RecordedRequest:
    """One request the fake answered. ``key`` is the bearer token (fake keys only);
    ``authorizations`` counts the request's Authorization headers (a proxy that
    appends instead of replacing sends two)."""

    time: float  # time.monotonic()
    method: str
    path: str
    key: str
    organization: str | None
    status: int
    authorizations: int = 1


@dataclass(slots=True)
class _State:
    scenarios: dict[str, Scenario]
    requests: list[RecordedRequest] = field(default_factory=list)
    counts: dict[str, int] = field(default_factory=dict)
    received: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)


_Server = UpstreamServer[_State]


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    # Headers and body go out in two writes; with Nagle on, the second waits for a delayed ACK.
    disable_nagle_algorithm = True
    server: _Server

    def log_message(self, format: str, *args: Any) -> None:
        """Quiet: the fake's requests are in ``FakeOpenAI.requests``."""

    def do_GET(self) -> None:
        self._handle()

    def do_POST(self) -> None:
        self._handle()

    def _handle(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        raw = self.rfile.read(length) if length else b""
        state = self.server.state
        auth = self.headers.get("Authorization", "")
        key = auth.removeprefix("Bearer ").strip() if auth.startswith("Bearer ") else ""
        org = self.headers.get("OpenAI-Organization")
        path = self.path.split("?", 1)[0]
        with state.lock:
            scenario = state.scenarios.get(key)
            state.counts[key] = count = state.counts.get(key, 0) + 1
            state.received += 1
        if scenario is not None and scenario.delay:
            time.sleep(scenario.delay)
        status, body, limit = self._answer(path, key, org, scenario, count, raw)
        with state.lock:
            state.requests.append(
                RecordedRequest(
                    time.monotonic(),
                    self.command,
                    path,
                    key,
                    org,
                    status,
                    len(self.headers.get_all("Authorization") or ()),
                )
            )
        if status == 200 and scenario is not None and _wants_stream(raw):
            self._stream(json.loads(body), limit, scenario.stream_interval, scenario.reset_requests)
            return
        self._send(status, body, limit, scenario.reset_requests if scenario else DEFAULT_RESET)

    def _answer(
        self,
        path: str,
        key: str,
        org: str | None,
        scenario: Scenario | None,
        count: int,
        raw: bytes,
    ) -> tuple[int, bytes, int]:
        routes = {
            ("GET", "/v1/models"),
            ("POST", "/v1/chat/completions"),
            ("GET", "/v1/organizations"),
        }
        if (self.command, path) not in routes:
            error = FakeError(404, "invalid_request_error", "unknown_url", f"Unknown URL {path}")
            return error.status, _json(error.body()), 3500
        if not key:
            return _NO_KEY.status, _json(_NO_KEY.body()), 3500
        if scenario is None:
            return _UNKNOWN_KEY.status, _json(_UNKNOWN_KEY.body()), 3500
        limit = scenario.request_limit
        if scenario.garbage:
            return 200, b"<html><body>upstream says hi</body></html>", limit
        if count <= scenario.fail_first:
            return _SERVER_ERROR.status, _json(_SERVER_ERROR.body()), limit
        if scenario.error is not None:
            return scenario.error.status, _json(scenario.error.body()), limit
        models = scenario.models
        if org is not None:
            member = next((o for o in scenario.organizations if o.id == org), None)
            if member is None:
                return _WRONG_ORG.status, _json(_WRONG_ORG.body()), limit
            models = member.models if member.models is not None else scenario.models
        if path == "/v1/models":
            data = [
                {"id": model, "object": "model", "created": 1_700_000_000, "owned_by": "openai"}
                for model in models
            ]
            return 200, _json({"object": "list", "data": data}), limit
        if path == "/v1/organizations":
            orgs = [
                {"object": "organization", "id": o.id, "is_default": o.is_default, "name": o.id}
                for o in scenario.organizations
            ]
            return 200, _json({"object": "list", "data": orgs}), limit
        return self._completion(raw, scenario, models, limit)

    def _completion(
        self, raw: bytes, scenario: Scenario, models: Sequence[str], limit: int
    ) -> tuple[int, bytes, int]:
        if scenario.completion_error is not None:
            error = scenario.completion_error
            return error.status, _json(error.body()), limit
        try:
            request = json.loads(raw)
        except ValueError:
            error = FakeError(400, "invalid_request_error", None, "We could not parse the JSON.")
            return error.status, _json(error.body()), limit
        max_tokens = request.get("max_tokens") if isinstance(request, dict) else None
        if isinstance(max_tokens, int) and max_tokens < 1:
            error = FakeError(
                400,
                "invalid_request_error",
                "integer_below_min_value",
                f"Invalid 'max_tokens': integer below minimum value. Got {max_tokens}.",
            )
            return error.status, _json(error.body()), limit
        model = request.get("model") if isinstance(request, dict) else None
        if model not in models:
            error = FakeError(
                404, "invalid_request_error", "model_not_found", f"The model {model} is not here."
            )
            return error.status, _json(error.body()), limit
        completion = {
            "id": "chatcmpl-fake",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": model,
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": "Hello from the fake upstream."},
                    "finish_reason": "stop",
                }
            ],
            "usage": {"prompt_tokens": 5, "completion_tokens": 7, "total_tokens": 12},
        }
        return 200, _json(completion), limit

    def _stream(self, completion: dict[str, Any], limit: int, interval: float, reset: str) -> None:
        """The completion as server-sent events, one word per event, chunked encoding."""
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Transfer-Encoding", "chunked")
        self._rate_limit_headers(limit, reset)
        self.end_headers()
        words = completion["choices"][0]["message"]["content"].split(" ")
        for i, word in enumerate(words):
            delta = {"content": word if i == 0 else f" {word}"}
            chunk = {
                "id": completion["id"],
                "object": "chat.completion.chunk",
                "model": completion["model"],
                "choices": [{"index": 0, "delta": delta, "finish_reason": None}],
            }
            self._chunk(f"data: {json.dumps(chunk)}\n\n".encode())
            if interval:
                time.sleep(interval)
        self._chunk(b"data: [DONE]\n\n")
        self._chunk(b"")

    def _chunk(self, data: bytes) -> None:
        self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))
        self.wfile.flush()

    def _send(self, status: int, body: bytes, limit: int, reset: str = DEFAULT_RESET) -> None:
        self.send_response(status)
        is_json = body[:1] in (b"{", b"[")
        self.send_header("Content-Type", "application/json" if is_json else "text/html")
        self.send_header("Content-Length", str(len(body)))
        self._rate_limit_headers(limit, reset)
        self.end_headers()
        self.wfile.write(body)

    def _rate_limit_headers(self, limit: int, reset: str) -> None:
        self.send_header("x-ratelimit-limit-requests", str(limit))
        self.send_header("x-ratelimit-limit-tokens", "40000")
        self.send_header("x-ratelimit-remaining-requests", str(max(0, limit - 1)))
        self.send_header("x-ratelimit-remaining-tokens", "39990")
        self.send_header("x-ratelimit-reset-requests", reset)
        self.send_header("x-ratelimit-reset-tokens", "1m30s")


def _wants_stream(raw: bytes) -> bool:
    try:
        request = json.loads(raw)
    except ValueError:
        return False
    return isinstance(request, dict) and request.get("stream") is True


def _json(doc: object) -> bytes:
    return json.dumps(doc).encode()


class FakeOpenAI(ThreadedUpstream[_State]):
    """The fake upstream: start it, point a checker at ``base_url``, stop it."""

    def __init__(self, scenarios: Mapping[str, Scenario] | None = None) -> None:
        super().__init__(_Handler, _State(dict(scenarios or {})), name="fake-openai")

    def add(self, key: str, scenario: Scenario) -> None:
        with self._state.lock:
            self._state.scenarios[key] = scenario

    @property
    def received(self) -> int:
        """Requests received so far, answered or not (a slow key's are still waiting)."""
        with self._state.lock:
            return self._state.received

    @property
    def requests(self) -> list[RecordedRequest]:
        """Every request answered so far, in the order the answers were sent."""
        with self._state.lock:
            return list(self._state.requests)


def main(argv: Sequence[str] | None = None) -> int:
    """Serves the fake upstream until SIGINT/SIGTERM; prints its base URL and keys as JSON."""
    parser = argparse.ArgumentParser(description="Serve a fake OpenAI API on 127.0.0.1.")
    parser.add_argument(
        "--demo", action="store_true", help="serve the demo keys (one per scenario)"
    )
    args = parser.parse_args(argv)
    keys = demo_keys() if args.demo else {}
    stop = threading.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda *_: stop.set())
    with FakeOpenAI(keys) as fake:
        names = {key: name for name, s in SCENARIOS.items() for key, k in keys.items() if k is s}
        print(json.dumps({"base_url": fake.base_url, "keys": names}), flush=True)
        stop.wait()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
