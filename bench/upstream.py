"""A fake OpenAI upstream that enforces per-key, per-model RPM and TPM limits.

``POST /v1/chat/completions`` with ``Authorization: Bearer <key>`` and a body
``{"model": ..., "max_tokens": n, ...}``; the request costs one request and
``n`` tokens. Each (key, model) has two quotas, one for requests and one for
tokens, of one of two shapes:

- ``bucket`` (the default): a token bucket that refills continuously (a
  minute's limit per minute, so the quota used by a request comes back over
  the following minute). That is the behaviour OpenAI documents with its
  headers: with a limit of 60 RPM and 59 remaining, ``x-ratelimit-reset-requests``
  is ``1s`` — the time until the quota is *fully* back, while the next request
  may go at once.
- ``window``: fixed one-minute windows; the whole limit comes back at each
  window's end and nothing before, and the reset is the time until then. Each
  key's windows start at a phase of their own, spread evenly over a minute.

Every answer carries the six ``x-ratelimit-*`` headers (resets as Go durations).
A request over either limit gets 429 with an OpenAI-shaped body of type
``requests`` or ``tokens`` and uses no quota. A request within the limits is
answered 200 after a processing delay, with ``usage.total_tokens``.

Quotas start empty (as if each key had just been busy), so a run measures the
steady state rather than the draining of a minute's worth of unused quota.

Time can be scaled: with ``scale`` 20 a simulated minute lasts 3 real seconds;
limits, delays and the durations in the headers are all in simulated time.

``GET /v1/wasted?model=M&tokens=0|1`` answers ``{"wasted": n}``: the quota of ``M``
(requests, or tokens with ``tokens=1``) lost so far to full windows, over every key.

The simulator runs it in a process of its own (``python -m bench.upstream KEYS_FILE
SCALE SHAPE LIMITS_JSON`` prints its port and serves until SIGTERM), so answering
the proxies' calls does not take the event loop that drives them: at the high-limit
scenario's 180 requests a second, one process doing both fell behind. Its clock is
``time.monotonic``, the system's, the same in every process of the run.
"""

from __future__ import annotations

import asyncio
import json
import math
import random
import signal
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from aiohttp import web

__all__ = ["SHAPES", "ModelLimits", "RateLimitedUpstream", "go_duration", "limits_json"]

WINDOW = 60.0  # simulated seconds
#: The quota shapes ``RateLimitedUpstream`` can enforce.
SHAPES = ("bucket", "window")


@dataclass(frozen=True, slots=True)
class ModelLimits:
    """One model's per-key limits, and how long the upstream takes to answer (simulated s)."""

    rpm: int
    tpm: int
    latency: tuple[float, float] = (0.5, 2.0)
    #: How long a 429 takes to come back.
    refusal_latency: tuple[float, float] = (0.02, 0.1)


def go_duration(seconds: float) -> str:
    """Formats ``seconds`` as Go's ``time.Duration.String`` does (to the millisecond)."""
    if seconds <= 0:
        return "0s"
    if seconds < 1:
        return _trim(f"{seconds * 1000:.3f}") + "ms"
    millis = round(seconds * 1000)
    hours, millis = divmod(millis, 3_600_000)
    minutes, millis = divmod(millis, 60_000)
    text = _trim(f"{millis / 1000:.3f}") + "s"
    if hours:
        return f"{hours}h{minutes}m{text}"
    if minutes:
        return f"{minutes}m{text}"
    return text


def _trim(number: str) -> str:
    return number.rstrip("0").rstrip(".") if "." in number else number


class _Bucket:
    """A quota that refills continuously: ``limit`` per simulated minute."""

    __slots__ = ("last", "level", "limit", "rate", "wasted")

    def __init__(self, limit: int, now: float) -> None:
        self.limit = limit
        # Empty at first: as if the key had been busy just before, so the run measures the
        # steady state (a full quota would take minutes to drain at 120 % load).
        self.level = 0.0
        self.rate = limit / WINDOW
        self.last = now
        #: Quota that refilled into a full window and was lost: capacity nobody used.
        self.wasted = 0.0

    def refill(self, now: float) -> None:
        level = self.level + (now - self.last) * self.rate
        if level > self.limit:
            self.wasted += level - self.limit
            level = self.limit
        self.level = level
        self.last = now

    def reset(self) -> float:
        """Simulated seconds until the quota is fully back."""
        return (self.limit - self.level) / self.rate

    def next_unit(self, needed: float) -> float:
        """Simulated seconds until ``needed`` is there."""
        return (needed - self.level) / self.rate


class _FixedWindow:
    """A quota of ``limit`` per fixed window of ``WINDOW`` simulated seconds, the windows
    starting at ``phase`` (mod ``WINDOW``); nothing comes back before a window ends."""

    __slots__ = ("end", "last", "level", "limit", "wasted")

    def __init__(self, limit: int, now: float, phase: float) -> None:
        self.limit = limit
        # Empty until the first window ends, as the bucket starts empty.
        self.level = 0.0
        self.end = now + ((phase - now) % WINDOW or WINDOW)
        self.last = now
        #: Quota left unused when a window ended: capacity nobody used.
        self.wasted = 0.0

    def refill(self, now: float) -> None:
        self.last = now
        if now < self.end:
            return
        windows = math.floor((now - self.end) / WINDOW) + 1
        self.wasted += self.level + (windows - 1) * self.limit
        self.level = float(self.limit)
        self.end += windows * WINDOW

    def reset(self) -> float:
        """Simulated seconds until the quota is fully back: the window's end."""
        return 0.0 if self.level >= self.limit else self.end - self.last

    def next_unit(self, needed: float) -> float:
        return self.end - self.last


_Quota = _Bucket | _FixedWindow


class RateLimitedUpstream:
    """The fake upstream; ``async with`` starts it on 127.0.0.1 (``base_url``)."""

    def __init__(
        self,
        limits: dict[str, ModelLimits],
        *,
        keys: list[str],
        scale: float = 1.0,
        seed: int = 1,
        shape: str = "bucket",
    ) -> None:
        if shape not in SHAPES:
            raise ValueError(f"unknown quota shape {shape!r}")
        self._limits = limits
        self._keys = set(keys)
        #: Each key's window phase (``window`` shape), spread evenly over a minute.
        self._phases = {key: i * WINDOW / len(keys) for i, key in enumerate(keys)}
        self._scale = scale
        self._shape = shape
        self._random = random.Random(seed)
        self._windows: dict[tuple[str, str], tuple[_Quota, _Quota]] = {}
        self._runner: web.AppRunner | None = None
        self.base_url = ""
        #: Answers given, by status.
        self.answers: dict[int, int] = {}

    def now(self) -> float:
        """Simulated seconds (monotonic)."""
        return time.monotonic() * self._scale

    def wasted(self, model: str, *, tokens: bool) -> float:
        """Quota of ``model`` lost so far to full windows, over every key (requests or tokens)."""
        now = self.now()
        total = 0.0
        for key in self._keys:
            window = self._windows_for(key, model, now)[1 if tokens else 0]
            window.refill(now)
            total += window.wasted
        return total

    async def __aenter__(self) -> RateLimitedUpstream:
        app = web.Application()
        app.router.add_post("/v1/chat/completions", self._complete)
        app.router.add_get("/v1/wasted", self._wasted)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        server = site._server
        assert server is not None and server.sockets  # type: ignore[attr-defined]
        port = server.sockets[0].getsockname()[1]  # type: ignore[attr-defined]
        self.base_url = f"http://127.0.0.1:{port}/v1"
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._runner is not None:
            await self._runner.cleanup()

    def _windows_for(self, key: str, model: str, now: float) -> tuple[_Quota, _Quota]:
        windows = self._windows.get((key, model))
        if windows is None:
            limits = self._limits[model]
            if self._shape == "window":
                phase = self._phases[key]
                windows = (
                    _FixedWindow(limits.rpm, now, phase),
                    _FixedWindow(limits.tpm, now, phase),
                )
            else:
                windows = (_Bucket(limits.rpm, now), _Bucket(limits.tpm, now))
            self._windows[(key, model)] = windows
        return windows

    def decide(self, key: str, model: str, tokens: int) -> tuple[int, dict[str, str], Any]:
        """Status, headers and body for one request, taking its quota if it goes through."""
        now = self.now()
        requests, token_window = self._windows_for(key, model, now)
        requests.refill(now)
        token_window.refill(now)
        status = 200
        body: dict[str, Any]
        if requests.level < 1:
            status, kind = 429, "requests"
        elif token_window.level < tokens:
            status, kind = 429, "tokens"
        else:
            requests.level -= 1
            token_window.level -= tokens
        headers = {
            "x-ratelimit-limit-requests": str(requests.limit),
            "x-ratelimit-limit-tokens": str(token_window.limit),
            "x-ratelimit-remaining-requests": str(max(0, math.floor(requests.level))),
            "x-ratelimit-remaining-tokens": str(max(0, math.floor(token_window.level))),
            "x-ratelimit-reset-requests": go_duration(requests.reset()),
            "x-ratelimit-reset-tokens": go_duration(token_window.reset()),
        }
        if status == 200:
            body = {
                "object": "chat.completion",
                "model": model,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": "ok"}}],
                "usage": {"prompt_tokens": 0, "completion_tokens": tokens, "total_tokens": tokens},
            }
        elif kind == "requests":
            wait = requests.next_unit(1)
            body = _rate_limit_body(
                model, "requests", "requests per min (RPM)", requests.limit, requests.limit, 1, wait
            )
        else:
            wait = token_window.next_unit(tokens)
            used = token_window.limit - max(0, math.floor(token_window.level))
            body = _rate_limit_body(
                model, "tokens", "tokens per min (TPM)", token_window.limit, used, tokens, wait
            )
        return status, headers, body

    async def _complete(self, request: web.Request) -> web.Response:
        auth = request.headers.get("Authorization", "")
        key = auth.removeprefix("Bearer ")
        payload = await request.json()
        model = payload.get("model", "")
        if key not in self._keys:
            return web.json_response(
                {
                    "error": {
                        "message": "Incorrect API key provided",
                        "type": "invalid_request_error",
                        "param": None,
                        "code": "invalid_api_key",
                    }
                },
                status=401,
            )
        if model not in self._limits:
            return web.json_response(
                {
                    "error": {
                        "message": f"The model `{model}` does not exist",
                        "type": "invalid_request_error",
                        "param": None,
                        "code": "model_not_found",
                    }
                },
                status=404,
            )
        status, headers, body = self.decide(key, model, int(payload.get("max_tokens", 1)))
        self.answers[status] = self.answers.get(status, 0) + 1
        limits = self._limits[model]
        low, high = limits.latency if status == 200 else limits.refusal_latency
        await asyncio.sleep(self._random.uniform(low, high) / self._scale)
        return web.json_response(body, status=status, headers=headers)

    async def _wasted(self, request: web.Request) -> web.Response:
        model = request.query.get("model", "")
        if model not in self._limits:
            return web.json_response({"error": f"unknown model {model!r}"}, status=404)
        tokens = request.query.get("tokens") == "1"
        return web.json_response({"wasted": self.wasted(model, tokens=tokens)})


def limits_json(limits: dict[str, ModelLimits]) -> str:
    """``limits`` as the command line of ``python -m bench.upstream`` takes them."""
    return json.dumps({model: asdict(one) for model, one in limits.items()})


def _limits_from_json(text: str) -> dict[str, ModelLimits]:
    return {
        model: ModelLimits(
            rpm=one["rpm"],
            tpm=one["tpm"],
            latency=tuple(one["latency"]),
            refusal_latency=tuple(one["refusal_latency"]),
        )
        for model, one in json.loads(text).items()
    }


async def _serve(keys_file: Path, scale: float, shape: str, limits: dict[str, ModelLimits]) -> None:
    keys = [line.strip() for line in keys_file.read_text(encoding="utf-8").splitlines()]
    upstream = RateLimitedUpstream(limits, keys=[k for k in keys if k], scale=scale, shape=shape)
    async with upstream:
        print(upstream.base_url.rsplit(":", 1)[1].split("/")[0], flush=True)
        stopped = asyncio.Event()
        asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stopped.set)
        await stopped.wait()


def _rate_limit_body(
    model: str, kind: str, what: str, limit: int, used: int, requested: int, wait: float
) -> dict[str, Any]:
    message = (
        f"Rate limit reached for {model} in organization org-sim on {what}: "
        f"Limit {limit}, Used {used}, Requested {requested}. "
        f"Please try again in {go_duration(wait)}."
    )
    return {
        "error": {"message": message, "type": kind, "param": None, "code": "rate_limit_exceeded"}
    }


if __name__ == "__main__":
    asyncio.run(
        _serve(Path(sys.argv[1]), float(sys.argv[2]), sys.argv[3], _limits_from_json(sys.argv[4]))
    )
