"""The OpenAI upstream of the Envoy benchmark, in a process of its own.

``python -m bench.envoy_upstream KEYS`` answers ``POST /v1/chat/completions`` at
once for any of ``KEYS`` keys (``bench.pool_scale.secrets``, the keys
``bench.rpc_server KEYS`` loads), as ``keysvc.testing.fake_openai`` answers a
valid key: the completion with its usage and the six ``x-ratelimit-*`` headers;
401 for any other key. aiohttp rather than the test fake (a thread per
connection): at 32 in flight the test fake, not the hop under measurement, would
set the pace. Prints the port and serves until SIGTERM.
"""

from __future__ import annotations

import asyncio
import json
import signal
import sys

from aiohttp import web

from .pool_scale import secrets

HEADERS = {
    "x-ratelimit-limit-requests": "3500",
    "x-ratelimit-limit-tokens": "40000",
    "x-ratelimit-remaining-requests": "3499",
    "x-ratelimit-remaining-tokens": "39990",
    "x-ratelimit-reset-requests": "17ms",
    "x-ratelimit-reset-tokens": "1m30s",
}
UNKNOWN_KEY = {"error": {"message": "Incorrect API key provided.", "type": "invalid_request_error"}}


def app(keys: frozenset[str]) -> web.Application:
    async def completion(request: web.Request) -> web.Response:
        body = await request.json()
        key = request.headers.get("authorization", "").removeprefix("Bearer ")
        if key not in keys:
            return web.json_response(UNKNOWN_KEY, status=401, headers=HEADERS)
        answer = {
            "id": "chatcmpl-bench",
            "object": "chat.completion",
            "model": body.get("model"),
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": "Hello from the bench upstream."},
                    "finish_reason": "stop",
                }
            ],
            "usage": {"prompt_tokens": 5, "completion_tokens": 7, "total_tokens": 12},
        }
        return web.Response(
            body=json.dumps(answer).encode(), content_type="application/json", headers=HEADERS
        )

    application = web.Application()
    application.router.add_post("/v1/chat/completions", completion)
    return application


async def main(count: int) -> None:
    runner = web.AppRunner(app(frozenset(secrets(count))), access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    server = site._server
    assert isinstance(server, asyncio.Server)
    print(server.sockets[0].getsockname()[1], flush=True)
    stopped = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stopped.set)
    await stopped.wait()
    await runner.cleanup()


if __name__ == "__main__":
    asyncio.run(main(int(sys.argv[1])))
