"""Auto-pipelining: the script calls made while Redis answers others go to it together.

A script call through ``AutoPipeline.run`` joins a queue. One batch at a time is
out: the calls queued meanwhile (and those made in the same event-loop turn as
the first) go next, as one pipeline of EVALSHA (one write, the replies read in
order) on the pipeline's own connection, instead of a connection checkout, a
write and a read each. Commands are packed by hiredis (C), not by redis-py's
Python packer. It is the technique ioredis calls autopipelining; under load a
Get's Redis call then costs the server a share of one write and one read.

What each call keeps: every script still runs whole and alone (a pipeline is
not a transaction; the calls of a batch are concurrent calls, in no promised
order); its reply or its own error (a script error, NOSCRIPT after reloading
the script and trying once more) goes to it alone; a batch that fails (the
connection, its time) fails every call in it, and is never sent again, since
Redis may have run its scripts. A call whose caller has stopped
waiting (its timeout) before its batch goes is not sent. A batch is bounded by
the latest deadline among its calls, so a hung Redis holds the queue no longer
than the calls waiting in it would wait anyway.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import hiredis
from redis.asyncio import Redis
from redis.asyncio.connection import AbstractConnection
from redis.commands.core import AsyncScript
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import NoScriptError, ResponseError

__all__ = ["AutoPipeline"]


def _expire(reply: asyncio.Future[Any]) -> None:
    if not reply.done():
        reply.set_exception(TimeoutError())


@dataclass(slots=True)
class _Call:
    script: AsyncScript
    args: Sequence[str | float]
    #: Event-loop time after which the caller no longer waits.
    deadline: float
    reply: asyncio.Future[Any]


class AutoPipeline:
    """Script calls to one Redis, sent in batches (see the module's docstring)."""

    def __init__(self, client: Redis) -> None:
        self._client = client
        self._queued: list[_Call] = []
        self._sender: asyncio.Task[None] | None = None
        #: The connection batches go on (``_connect``), made on first use.
        self._connection: AbstractConnection | None = None
        #: Batches sent and calls in them, for tests and measurements.
        self.batches = 0
        self.calls = 0

    async def run(self, script: AsyncScript, args: Sequence[str | float], timeout: float) -> Any:
        """The reply of ``script`` (no keys, ``args``); its error raised, as EVALSHA's.

        ``timeout``: how long the caller waits; TimeoutError once it has waited that
        long (the call is then not sent, if it was not yet). It also bounds the batch
        the call goes in.
        """
        loop = asyncio.get_running_loop()
        call = _Call(script, args, loop.time() + timeout, loop.create_future())
        self._queued.append(call)
        if self._sender is None:
            self._sender = loop.create_task(self._send())
        # A timer that fails the call's reply, not asyncio.timeout: that would cancel
        # and resume the caller's task, on every call of every Get.
        expiry = loop.call_at(call.deadline, _expire, call.reply)
        try:
            return await call.reply
        finally:
            expiry.cancel()

    async def aclose(self) -> None:
        """Stops sending; calls not answered yet fail with a ConnectionError."""
        sender, self._sender = self._sender, None
        if sender is not None:
            sender.cancel()
            try:
                await sender
            except asyncio.CancelledError:
                pass
        self._fail(self._queued, RedisConnectionError("the Redis client is closed"))
        self._queued = []
        connection, self._connection = self._connection, None
        if connection is not None:
            await connection.disconnect()

    async def _send(self) -> None:
        """Sends the queue in batches until it is empty."""
        batch: list[_Call] = []
        try:
            while self._queued:
                batch = [call for call in self._queued if not call.reply.done()]
                self._queued = []
                if batch:
                    await self._send_batch(batch)
        except asyncio.CancelledError:
            self._fail(batch, RedisConnectionError("the Redis client is closed"))
            raise
        finally:
            if self._sender is asyncio.current_task():
                self._sender = None

    async def _send_batch(self, batch: list[_Call]) -> None:
        self.batches += 1
        self.calls += len(batch)
        try:
            async with asyncio.timeout_at(max(call.deadline for call in batch)):
                replies = await self._execute(batch)
        except Exception as exc:  # each caller maps it (StoreUnavailable)
            self._fail(batch, exc)
            return
        for call, reply in zip(batch, replies, strict=True):
            if call.reply.done():
                continue
            if isinstance(reply, Exception):
                call.reply.set_exception(reply)
            else:
                call.reply.set_result(reply)

    async def _execute(self, batch: Sequence[_Call]) -> list[Any]:
        """Every call's reply or error, in order; scripts Redis lacks are loaded and
        their calls made once more."""
        replies = await self._pipeline(batch)
        missing = [i for i, reply in enumerate(replies) if isinstance(reply, NoScriptError)]
        if missing:
            scripts = {batch[i].script.sha: batch[i].script for i in missing}
            for script in scripts.values():
                await self._client.script_load(script.script)
            again = await self._pipeline([batch[i] for i in missing])
            for i, reply in zip(missing, again, strict=True):
                replies[i] = reply
        return replies

    async def _pipeline(self, calls: Sequence[_Call]) -> list[Any]:
        """One write of every call, then their replies (an error reply in its place).

        On the pipeline's own connection. Sent at most once: connecting follows the
        client's retries, but a batch that fails once written is not sent again
        (Redis may have run its scripts; a Get run twice reserves twice). A batch
        that fails or is cancelled part way drops the connection, so no reply left
        unread is taken for the next batch's.
        """
        connection = self._connection
        if connection is None:
            connection = self._connection = self._connect()
        packed = b"".join(
            # (hiredis.pyi types the argument as a 1-tuple.)
            hiredis.pack_command(("EVALSHA", call.script.sha, 0, *call.args))  # type: ignore[arg-type]
            for call in calls
        )
        replies: list[Any] = []
        try:
            await connection.send_packed_command(packed)
            for _ in calls:
                try:
                    replies.append(await connection.read_response())
                except ResponseError as error:
                    replies.append(error)
        except BaseException:
            await connection.disconnect(nowait=True)
            raise
        return replies

    def _connect(self) -> AbstractConnection:
        """The pipeline's own connection: as the client's pool makes them (address,
        TLS, credentials, retries), but without a socket timeout. A batch is bounded
        by its calls' deadline; a socket timeout would also give up on a slow answer
        its callers still wait for (a batch is never sent again: ``_pipeline``), and
        costs a task and a timer per write."""
        pool = self._client.connection_pool
        connection: AbstractConnection = pool.connection_class(
            **{**pool.connection_kwargs, "socket_timeout": None}
        )
        return connection

    @staticmethod
    def _fail(calls: Sequence[_Call], error: BaseException) -> None:
        for call in calls:
            if not call.reply.done():
                call.reply.set_exception(error)
