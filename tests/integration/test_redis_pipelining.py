"""Auto-pipelining (keysvc.pool.pipelining) against a real redis-server."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.commands.core import AsyncScript
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import ResponseError

from keysvc.models import ModelTable
from keysvc.pool.pipelining import AutoPipeline
from keysvc.pool.redis import RedisBackend
from tests.redis_server import RedisServer

# Counts its calls in the key ARGV[1], answers ARGV[2]; ARGV[2] "fail" is a script error.
_ECHO = """
redis.call('INCR', ARGV[1])
if ARGV[2] == 'fail' then return redis.error_reply('ERR asked to fail') end
return ARGV[2]
"""


Echo = tuple[AsyncScript, AutoPipeline, str]


@pytest.fixture
def echo(client: aioredis.Redis, redis_prefix: str) -> Echo:
    """The script, a pipeline and the key the script counts its calls in."""
    return client.register_script(_ECHO), AutoPipeline(client), f"{redis_prefix}:calls"


@pytest.fixture
async def client(redis_server: RedisServer) -> AsyncIterator[aioredis.Redis]:
    client = aioredis.Redis.from_url(redis_server.url)
    try:
        yield client
    finally:
        await client.aclose()


async def test_calls_made_together_go_as_one_batch_each_with_its_own_reply(
    client: aioredis.Redis, echo: Echo
) -> None:
    script, pipeline, counter = echo
    replies = await asyncio.gather(
        *(pipeline.run(script, [counter, f"reply-{n}"], 5.0) for n in range(20))
    )
    assert replies == [f"reply-{n}".encode() for n in range(20)]
    assert (pipeline.batches, pipeline.calls) == (1, 20)
    assert await client.get(counter) == b"20"  # each script ran once


async def test_calls_made_while_a_batch_is_out_go_in_the_next_one(
    client: aioredis.Redis, echo: Echo
) -> None:
    script, pipeline, counter = echo
    first = asyncio.ensure_future(pipeline.run(script, [counter, "first"], 5.0))
    await asyncio.sleep(0)  # the first batch is out (its write made, its reply not read)
    later = [pipeline.run(script, [counter, f"later-{n}"], 5.0) for n in range(10)]
    replies = await asyncio.gather(first, *later)
    assert replies[0] == b"first"
    assert replies[1:] == [f"later-{n}".encode() for n in range(10)]
    assert (pipeline.batches, pipeline.calls) == (2, 11)


async def test_a_script_error_goes_to_its_call_alone(client: aioredis.Redis, echo: Echo) -> None:
    script, pipeline, counter = echo
    replies = await asyncio.gather(
        pipeline.run(script, [counter, "a"], 5.0),
        pipeline.run(script, [counter, "fail"], 5.0),
        pipeline.run(script, [counter, "b"], 5.0),
        return_exceptions=True,
    )
    assert replies[0] == b"a"
    assert isinstance(replies[1], ResponseError)
    assert "asked to fail" in str(replies[1])
    assert replies[2] == b"b"
    assert pipeline.batches == 1


async def test_scripts_redis_lacks_are_loaded_and_their_calls_made_once(
    client: aioredis.Redis, redis_prefix: str
) -> None:
    script = client.register_script(_ECHO)
    other = client.register_script(_ECHO + "-- another script\n")
    pipeline = AutoPipeline(client)
    counter = f"{redis_prefix}:calls"
    assert await pipeline.run(script, [counter, "loaded"], 5.0) == b"loaded"
    await client.script_flush()  # a restarted or failed-over Redis has no scripts
    replies = await asyncio.gather(
        *(pipeline.run(s, [counter, f"r{n}"], 5.0) for n, s in enumerate([script, other] * 3))
    )
    assert replies == [f"r{n}".encode() for n in range(6)]
    assert await client.get(counter) == b"7"  # none ran twice
    assert await client.script_exists(script.sha, other.sha) == [True, True]


@contextlib.asynccontextmanager
async def own_redis(
    tmp_path: Path, **client_options: Any
) -> AsyncIterator[tuple[RedisServer, aioredis.Redis, AsyncScript, AutoPipeline]]:
    """A redis-server of the test's own (it is paused or stopped), a client, the script
    and a pipeline that has made one call (the script is loaded, the connection made)."""
    server = RedisServer(tmp_path)
    server.start()
    client = aioredis.Redis.from_url(server.url, **client_options)
    try:
        script = client.register_script(_ECHO)
        pipeline = AutoPipeline(client)
        assert await pipeline.run(script, ["calls", "up"], 5.0) == b"up"
        yield server, client, script, pipeline
    finally:
        server.stop()  # (a paused one too)
        await client.aclose()


async def test_a_connection_error_fails_every_call_of_the_batch(tmp_path: Path) -> None:
    async with own_redis(tmp_path) as (server, _, script, pipeline):
        server.stop()
        replies = await asyncio.gather(
            *(pipeline.run(script, ["calls", str(n)], 5.0) for n in range(3)),
            return_exceptions=True,
        )
        assert all(isinstance(reply, RedisConnectionError) for reply in replies), replies


async def test_a_hung_redis_holds_a_batch_no_longer_than_its_callers_wait(
    tmp_path: Path,
) -> None:
    async with own_redis(tmp_path) as (server, _, script, pipeline):  # no socket timeout
        server.pause()
        started = time.monotonic()
        with pytest.raises(TimeoutError):
            await pipeline.run(script, ["calls", "hung"], 0.3)
        assert time.monotonic() - started < 1.0
        server.resume()
        # The queue is not held by the batch that hung, and the new connection reads
        # the next call's reply (not the hung call's).
        assert await pipeline.run(script, ["calls", "back"], 5.0) == b"back"


async def test_a_slow_answer_is_waited_for_within_the_deadline_not_sent_twice(
    tmp_path: Path,
) -> None:
    # The client's socket timeout (the server sets it to KEYSVC_REDIS_TIMEOUT) is
    # shorter than Redis takes: a batch waits for its calls' deadline instead of
    # giving up on the read and sending the batch again (running its scripts twice).
    async with own_redis(tmp_path, socket_timeout=0.1) as (server, client, script, pipeline):
        server.pause()
        asyncio.get_running_loop().call_later(0.4, server.resume)
        assert await pipeline.run(script, ["slow", "slow"], 2.0) == b"slow"
        assert await client.get("slow") == b"1"


async def test_a_batch_whose_reply_is_lost_is_not_sent_again(
    redis_server: RedisServer, redis_prefix: str
) -> None:
    # A client that retries connection errors (a deployment's choice, or a future
    # default) must not retry a batch: Redis may have run its scripts already, and
    # a Get sent twice reserves twice. The caller gets the error; the script ran once.
    client = aioredis.Redis.from_url(redis_server.url, retry=Retry(NoBackoff(), 3))
    try:
        script, pipeline = client.register_script(_ECHO), AutoPipeline(client)
        counter = f"{redis_prefix}:calls"
        assert await pipeline.run(script, [counter, "first"], 5.0) == b"first"
        connection = pipeline._connection
        assert connection is not None
        read = connection.read_response
        lost = [True]

        async def read_then_lose(*args: Any, **kwargs: Any) -> Any:
            reply = await read(*args, **kwargs)  # Redis ran the script and answered ...
            if lost.pop() if lost else False:
                raise RedisConnectionError("connection lost")  # ... the answer was lost
            return reply

        connection.read_response = read_then_lose  # type: ignore[method-assign]
        with pytest.raises(RedisConnectionError):
            await pipeline.run(script, [counter, "lost"], 5.0)
        assert await client.get(counter) == b"2"  # "first" and "lost", once each
        # The next call goes on a new connection and reads its own reply.
        assert await pipeline.run(script, [counter, "after"], 5.0) == b"after"
        await pipeline.aclose()
    finally:
        await client.aclose()


async def test_a_call_whose_caller_stopped_waiting_is_not_sent(tmp_path: Path) -> None:
    async with own_redis(tmp_path) as (server, client, script, pipeline):
        server.pause()
        out = asyncio.ensure_future(pipeline.run(script, ["calls", "out"], 1.0))
        await asyncio.sleep(0.05)  # its batch is out, Redis does not answer
        with pytest.raises(TimeoutError):
            async with asyncio.timeout(0.1):  # the caller gives up while it is queued
                await pipeline.run(script, ["given-up", "queued"], 5.0)
        server.resume()
        assert await out == b"out"
        assert await pipeline.run(script, ["calls", "after"], 5.0) == b"after"
        assert await client.get("given-up") is None


async def test_closing_fails_the_calls_not_answered(tmp_path: Path) -> None:
    async with own_redis(tmp_path) as (server, _, script, pipeline):
        server.pause()
        out = asyncio.ensure_future(pipeline.run(script, ["calls", "out"], 5.0))
        await asyncio.sleep(0.05)
        queued = asyncio.ensure_future(pipeline.run(script, ["calls", "queued"], 5.0))
        await asyncio.sleep(0)
        await pipeline.aclose()
        for call in (out, queued):
            with pytest.raises(RedisConnectionError):
                await call


async def test_concurrent_gets_share_one_connection(redis_server: RedisServer) -> None:
    # Each Get's script call on a connection of its own was a checkout, a write and a
    # read per Get: most of the server's CPU per Get on Redis.
    client = aioredis.Redis.from_url(redis_server.url, client_name="pipelined")
    backend = RedisBackend(client, models=ModelTable(), prefix="pipelined", timeout=5.0)
    try:
        await backend.add_keys([f"sk-pipelined-{n}" for n in range(32)])
        keys = await asyncio.gather(*(backend.get("gpt-4o") for _ in range(32)))
        assert len({key.hash for key in keys}) == 32
        async with aioredis.Redis.from_url(redis_server.url) as observer:
            clients = await observer.client_list()
        # (Another connection loaded the scripts, which a new Redis lacks.)
        scripts = [c for c in clients if c["name"] == "pipelined" and c["cmd"] == "evalsha"]
        assert len(scripts) == 1, clients
    finally:
        await backend.aclose()
