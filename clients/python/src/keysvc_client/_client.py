"""``KeysvcClient`` (blocking) and ``AsyncKeysvcClient`` (asyncio) for keysvc.v1.KeyService.

Both have the same methods, arguments and results; every method takes an optional
``timeout`` (seconds) that overrides the client's default deadline for that call, and
every failed call raises ``KeysvcRpcError``.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator, Mapping, Sequence
from datetime import timedelta
from types import TracebackType
from typing import Any, Self, TypeVar

import grpc
from grpc import aio

from keysvc.v1 import keysvc_pb2 as pb
from keysvc.v1 import keysvc_pb2_grpc as pb_grpc

from ._errors import from_rpc_error
from ._options import (
    DEFAULT_TARGET,
    DEFAULT_TIMEOUT,
    TLSConfig,
    call_metadata,
    rate_limit_headers,
)

__all__ = ["AsyncKeysvcClient", "KeysvcClient"]

_Req = TypeVar("_Req")
_Resp = TypeVar("_Resp")


def _outcome_request(
    key_hash: str,
    model: str,
    status: int,
    headers: Mapping[str, str] | None,
    error: Mapping[str, Any] | None,
    prompt_tokens: int,
    completion_tokens: int,
) -> pb.ReportOutcomeRequest:
    error = error or {}
    return pb.ReportOutcomeRequest(
        hash=key_hash,
        model=model,
        status=status,
        headers=rate_limit_headers(headers or {}),
        error_type=str(error.get("type") or ""),
        error_code=str(error.get("code") or ""),
        error_message=str(error.get("message") or ""),
        prompt_tokens=prompt_tokens,
        completion_tokens=completion_tokens,
    )


class _Base:
    def __init__(
        self,
        target: str,
        *,
        timeout: float | None,
        tls: TLSConfig | None,
        token: str | None,
        options: Sequence[tuple[str, Any]],
    ) -> None:
        self.target = target
        self.timeout = timeout
        self._tls = tls
        self._metadata = call_metadata(token)
        self._options = [*options, *(tls.channel_options() if tls else [])]

    def _deadline(self, timeout: float | None, max_wait: float | None = None) -> float | None:
        if timeout is not None:
            return timeout
        if self.timeout is not None and max_wait:
            return self.timeout + max_wait  # the call may wait that long on the server
        return self.timeout


def _get_request(model: str, max_wait: float | timedelta | None) -> pb.GetRequest:
    request = pb.GetRequest(model=model)
    if max_wait is not None:
        if isinstance(max_wait, timedelta):
            request.max_wait.FromTimedelta(max_wait)
        else:
            request.max_wait.FromNanoseconds(round(max_wait * 1e9))
    return request


def _seconds(max_wait: float | timedelta | None) -> float | None:
    return max_wait.total_seconds() if isinstance(max_wait, timedelta) else max_wait

    def __repr__(self) -> str:
        # Never the token.
        return f"{type(self).__name__}({self.target!r}, tls={self._tls is not None})"


class KeysvcClient(_Base):
    """A blocking client; use it as a context manager or call ``close()``.

    Args:
        target: ``host:port`` of keysvc.
        timeout: default deadline of each call in seconds; ``None`` for no deadline.
        tls: TLS settings; ``None`` for a plaintext channel.
        token: bearer token sent as ``authorization: Bearer <token>`` on every call.
        options: extra gRPC channel options.
    """

    def __init__(
        self,
        target: str = DEFAULT_TARGET,
        *,
        timeout: float | None = DEFAULT_TIMEOUT,
        tls: TLSConfig | None = None,
        token: str | None = None,
        options: Sequence[tuple[str, Any]] = (),
    ) -> None:
        super().__init__(target, timeout=timeout, tls=tls, token=token, options=options)
        self._channel = (
            grpc.secure_channel(target, tls.credentials(), options=self._options)
            if tls
            else grpc.insecure_channel(target, options=self._options)
        )
        self._stub = pb_grpc.KeyServiceStub(self._channel)

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def _call(
        self,
        method: grpc.UnaryUnaryMultiCallable[_Req, _Resp],
        request: _Req,
        timeout: float | None,
        max_wait: float | None = None,
    ) -> _Resp:
        deadline = self._deadline(timeout, max_wait)
        try:
            return method(request, timeout=deadline, metadata=self._metadata)
        except grpc.RpcError as error:
            raise from_rpc_error(error) from None

    def get(
        self,
        model: str,
        *,
        max_wait: float | timedelta | None = None,
        timeout: float | None = None,
    ) -> pb.GetResponse:
        """A key for ``model``: ``.secret`` to send upstream, ``.key.hash`` to report back.

        With ``max_wait`` (seconds, at most 60), when every key is locked the server
        waits that long for one to unlock; the default deadline grows by as much. If
        none unlocks in time, ``KeysvcRpcError`` with reason ``KEYS_BUSY`` (its metadata's
        ``retry_after`` says when the first is expected to unlock).
        """
        request = _get_request(model, max_wait)
        return self._call(self._stub.Get, request, timeout, _seconds(max_wait))

    def disable(
        self,
        key_hash: str,
        reason: pb.DisableReason.ValueType = pb.DISABLE_REASON_UNSPECIFIED,
        *,
        timeout: float | None = None,
    ) -> pb.Key:
        """Takes the key out of service; returns it as it now stands."""
        request = pb.DisableRequest(hash=key_hash, reason=reason)
        return self._call(self._stub.Disable, request, timeout).key

    def mark_rate_limited(
        self, key_hash: str, model: str = "", *, timeout: float | None = None
    ) -> None:
        """Reports that the upstream answered 429 for the key (for ``model``, if given)."""
        self._call(
            self._stub.MarkRateLimited,
            pb.MarkRateLimitedRequest(hash=key_hash, model=model),
            timeout,
        )

    def update_rate_limits(
        self,
        key_hash: str,
        headers: Mapping[str, str],
        *,
        model: str = "",
        timeout: float | None = None,
    ) -> None:
        """Passes on an upstream answer's ``x-ratelimit-*`` headers (the rest are dropped).

        With ``model`` they apply to the model's family only; without, to every family.
        """
        request = pb.UpdateRateLimitsRequest(
            hash=key_hash, headers=rate_limit_headers(headers), model=model
        )
        self._call(self._stub.UpdateRateLimits, request, timeout)

    def get_lockout_period(self, model: str = "", *, timeout: float | None = None) -> timedelta:
        """How long until a key for ``model`` is free; zero when one is free now."""
        response = self._call(
            self._stub.GetLockoutPeriod, pb.GetLockoutPeriodRequest(model=model), timeout
        )
        return response.lockout.ToTimedelta()

    def increment_usage(
        self, key_hash: str, model: str, tokens: int, *, timeout: float | None = None
    ) -> None:
        """Adds a finished request's tokens to the key's usage."""
        request = pb.IncrementUsageRequest(hash=key_hash, model=model, tokens=tokens)
        self._call(self._stub.IncrementUsage, request, timeout)

    def report_outcome(
        self,
        key_hash: str,
        model: str,
        status: int,
        *,
        headers: Mapping[str, str] | None = None,
        error: Mapping[str, Any] | None = None,
        prompt_tokens: int = 0,
        completion_tokens: int = 0,
        timeout: float | None = None,
    ) -> pb.ReportOutcomeResponse:
        """Reports one upstream answer; ``.action`` says what to do with the request.

        ``error`` is the ``error`` object of an OpenAI error body (its ``type``,
        ``code`` and ``message`` are sent); ``headers`` are the answer's headers
        (only ``x-ratelimit-*`` are sent).
        """
        request = _outcome_request(
            key_hash, model, status, headers, error, prompt_tokens, completion_tokens
        )
        return self._call(self._stub.ReportOutcome, request, timeout)

    def list_page(
        self,
        *,
        page_size: int = 0,
        page_token: str = "",
        state: pb.KeyState.ValueType = pb.KEY_STATE_UNSPECIFIED,
        timeout: float | None = None,
    ) -> pb.ListResponse:
        """One page of keys (no secrets) in load order; pass its ``next_page_token`` to get
        the next, until it is empty. ``page_size`` 0 is the server's maximum. A page
        filtered by ``state`` may hold fewer keys than asked for, even none."""
        request = pb.ListRequest(page_size=page_size, page_token=page_token, state=state)
        return self._call(self._stub.List, request, timeout)

    def iter_keys(
        self,
        *,
        state: pb.KeyState.ValueType = pb.KEY_STATE_UNSPECIFIED,
        page_size: int = 0,
        timeout: float | None = None,
    ) -> Iterator[pb.Key]:
        """Every key (of ``state``), fetched a page at a time; ``timeout`` is per page."""
        token = ""
        while True:
            page = self.list_page(
                page_size=page_size, page_token=token, state=state, timeout=timeout
            )
            yield from page.keys
            token = page.next_page_token
            if not token:
                return

    def list(
        self,
        *,
        state: pb.KeyState.ValueType = pb.KEY_STATE_UNSPECIFIED,
        timeout: float | None = None,
    ) -> list[pb.Key]:
        """The public view of every key (of ``state``; no secrets), all pages of it."""
        return list(self.iter_keys(state=state, timeout=timeout))

    def available(self, *, timeout: float | None = None) -> int:
        """How many keys are not disabled."""
        return self._call(self._stub.Available, pb.AvailableRequest(), timeout).count

    def recheck(self, *, timeout: float | None = None) -> None:
        """Clears every key's disabled flags and has the checker look at them again."""
        self._call(self._stub.Recheck, pb.RecheckRequest(), timeout)


class AsyncKeysvcClient(_Base):
    """An asyncio client; the same methods as ``KeysvcClient``, as coroutines.

    Create it inside a running event loop; use ``async with`` or await ``close()``.
    """

    def __init__(
        self,
        target: str = DEFAULT_TARGET,
        *,
        timeout: float | None = DEFAULT_TIMEOUT,
        tls: TLSConfig | None = None,
        token: str | None = None,
        options: Sequence[tuple[str, Any]] = (),
    ) -> None:
        super().__init__(target, timeout=timeout, tls=tls, token=token, options=options)
        self._channel = (
            aio.secure_channel(target, tls.credentials(), options=self._options)
            if tls
            else aio.insecure_channel(target, options=self._options)
        )
        self._stub = pb_grpc.KeyServiceStub(self._channel)

    async def close(self) -> None:
        await self._channel.close()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    async def _call(
        self,
        method: aio.UnaryUnaryMultiCallable[_Req, _Resp],
        request: _Req,
        timeout: float | None,
        max_wait: float | None = None,
    ) -> _Resp:
        deadline = self._deadline(timeout, max_wait)
        try:
            return await method(request, timeout=deadline, metadata=self._metadata)
        except grpc.RpcError as error:
            raise from_rpc_error(error) from None

    async def get(
        self,
        model: str,
        *,
        max_wait: float | timedelta | None = None,
        timeout: float | None = None,
    ) -> pb.GetResponse:
        """A key for ``model``; ``max_wait`` as for ``KeysvcClient.get``."""
        request = _get_request(model, max_wait)
        return await self._call(self._stub.Get, request, timeout, _seconds(max_wait))

    async def disable(
        self,
        key_hash: str,
        reason: pb.DisableReason.ValueType = pb.DISABLE_REASON_UNSPECIFIED,
        *,
        timeout: float | None = None,
    ) -> pb.Key:
        """Takes the key out of service; returns it as it now stands."""
        request = pb.DisableRequest(hash=key_hash, reason=reason)
        return (await self._call(self._stub.Disable, request, timeout)).key

    async def mark_rate_limited(
        self, key_hash: str, model: str = "", *, timeout: float | None = None
    ) -> None:
        """Reports that the upstream answered 429 for the key (for ``model``, if given)."""
        request = pb.MarkRateLimitedRequest(hash=key_hash, model=model)
        await self._call(self._stub.MarkRateLimited, request, timeout)

    async def update_rate_limits(
        self,
        key_hash: str,
        headers: Mapping[str, str],
        *,
        model: str = "",
        timeout: float | None = None,
    ) -> None:
        """Passes on an upstream answer's ``x-ratelimit-*`` headers (the rest are dropped)."""
        request = pb.UpdateRateLimitsRequest(
            hash=key_hash, headers=rate_limit_headers(headers), model=model
        )
        await self._call(self._stub.UpdateRateLimits, request, timeout)

    async def get_lockout_period(
        self, model: str = "", *, timeout: float | None = None
    ) -> timedelta:
        """How long until a key for ``model`` is free; zero when one is free now."""
        request = pb.GetLockoutPeriodRequest(model=model)
        return (
            await self._call(self._stub.GetLockoutPeriod, request, timeout)
        ).lockout.ToTimedelta()

    async def increment_usage(
        self, key_hash: str, model: str, tokens: int, *, timeout: float | None = None
    ) -> None:
        """Adds a finished request's tokens to the key's usage."""
        request = pb.IncrementUsageRequest(hash=key_hash, model=model, tokens=tokens)
        await self._call(self._stub.IncrementUsage, request, timeout)

    async def report_outcome(
        self,
        key_hash: str,
        model: str,
        status: int,
        *,
        headers: Mapping[str, str] | None = None,
        error: Mapping[str, Any] | None = None,
        prompt_tokens: int = 0,
        completion_tokens: int = 0,
        timeout: float | None = None,
    ) -> pb.ReportOutcomeResponse:
        """Reports one upstream answer; ``.action`` says what to do with the request."""
        request = _outcome_request(
            key_hash, model, status, headers, error, prompt_tokens, completion_tokens
        )
        return await self._call(self._stub.ReportOutcome, request, timeout)

    async def list_page(
        self,
        *,
        page_size: int = 0,
        page_token: str = "",
        state: pb.KeyState.ValueType = pb.KEY_STATE_UNSPECIFIED,
        timeout: float | None = None,
    ) -> pb.ListResponse:
        """One page of keys (no secrets) in load order; pass its ``next_page_token`` to get
        the next, until it is empty. ``page_size`` 0 is the server's maximum. A page
        filtered by ``state`` may hold fewer keys than asked for, even none."""
        request = pb.ListRequest(page_size=page_size, page_token=page_token, state=state)
        return await self._call(self._stub.List, request, timeout)

    async def iter_keys(
        self,
        *,
        state: pb.KeyState.ValueType = pb.KEY_STATE_UNSPECIFIED,
        page_size: int = 0,
        timeout: float | None = None,
    ) -> AsyncIterator[pb.Key]:
        """Every key (of ``state``), fetched a page at a time; ``timeout`` is per page."""
        token = ""
        while True:
            page = await self.list_page(
                page_size=page_size, page_token=token, state=state, timeout=timeout
            )
            for key in page.keys:
                yield key
            token = page.next_page_token
            if not token:
                return

    async def list(
        self,
        *,
        state: pb.KeyState.ValueType = pb.KEY_STATE_UNSPECIFIED,
        timeout: float | None = None,
    ) -> list[pb.Key]:
        """The public view of every key (of ``state``; no secrets), all pages of it."""
        return [key async for key in self.iter_keys(state=state, timeout=timeout)]

    async def available(self, *, timeout: float | None = None) -> int:
        """How many keys are not disabled."""
        return (await self._call(self._stub.Available, pb.AvailableRequest(), timeout)).count

    async def recheck(self, *, timeout: float | None = None) -> None:
        """Clears every key's disabled flags and has the checker look at them again."""
        await self._call(self._stub.Recheck, pb.RecheckRequest(), timeout)
