"""The KeyService servicer: request message → pool call → response message.

It holds no logic of its own; the pool validates and decides, and
``keysvc.server`` maps the pool's errors to gRPC statuses.
"""

from __future__ import annotations

from typing import Any, Protocol

import grpc
from google.protobuf import duration_pb2, timestamp_pb2

from .errors import InvalidArgument
from .keys import DisableReason, Key
from .listing import DEFAULT_MAX_PAGE_SIZE, KeyFilter
from .outcomes import OutcomeAction, UpstreamError
from .pool import KeyPool, PoolBackend, as_backend
from .rates import FamilyRates
from .v1 import keysvc_pb2 as pb
from .v1 import keysvc_pb2_grpc as pb_grpc

__all__ = ["KeyService", "Rechecker", "key_to_proto"]

_Context = grpc.aio.ServicerContext[Any, Any]

_REASON_FROM_PROTO = {
    pb.DISABLE_REASON_UNSPECIFIED: DisableReason.UNSPECIFIED,
    pb.DISABLE_REASON_REVOKED: DisableReason.REVOKED,
    pb.DISABLE_REASON_QUOTA: DisableReason.QUOTA,
    pb.DISABLE_REASON_MANUAL: DisableReason.MANUAL,
}
_REASON_TO_PROTO: dict[DisableReason | None, pb.DisableReason.ValueType] = {
    reason: number for number, reason in _REASON_FROM_PROTO.items()
}
_REASON_TO_PROTO[None] = pb.DISABLE_REASON_UNSPECIFIED
_FILTER_FROM_PROTO = {
    pb.KEY_STATE_UNSPECIFIED: KeyFilter.ALL,
    pb.KEY_STATE_AVAILABLE: KeyFilter.AVAILABLE,
    pb.KEY_STATE_ACTIVE: KeyFilter.ACTIVE,
    pb.KEY_STATE_LOCKED: KeyFilter.LOCKED,
    pb.KEY_STATE_DISABLED: KeyFilter.DISABLED,
}
_ACTION_TO_PROTO = {
    OutcomeAction.DONE: pb.OUTCOME_ACTION_DONE,
    OutcomeAction.RETRY_WITH_ANOTHER_KEY: pb.OUTCOME_ACTION_RETRY_WITH_ANOTHER_KEY,
    OutcomeAction.RETURN_ERROR: pb.OUTCOME_ACTION_RETURN_ERROR,
}


def _set_time(field: timestamp_pb2.Timestamp, seconds: float) -> None:
    """Fills ``field`` in place. Callers skip 0 ("never"): a field left alone stays
    unset, and not reading it saves building the sub-message."""
    whole = int(seconds)
    field.seconds = whole
    field.nanos = int((seconds - whole) * 1e9)


def _set_lock_times(
    message: pb.Key | pb.FamilyRateLimit, last_used: float, rate_limited_at: float, until: float
) -> None:
    """The three times a Key and a FamilyRateLimit both show, those not 0 ("never")."""
    if last_used:
        _set_time(message.last_used, last_used)
    if rate_limited_at:
        _set_time(message.rate_limited_at, rate_limited_at)
    if until:
        _set_time(message.rate_limited_until, until)


def _set_duration(field: duration_pb2.Duration, seconds: float) -> None:
    """Fills ``field`` in place. Callers skip None ("unknown"), which leaves it unset."""
    whole = int(seconds)
    field.seconds = whole
    field.nanos = int(round((seconds - whole) * 1e9))


def _duration(seconds: float) -> duration_pb2.Duration:
    duration = duration_pb2.Duration()
    _set_duration(duration, seconds)
    return duration


def key_to_proto(key: Key) -> pb.Key:
    """The public view of a key. There is no secret field to fill."""
    message = pb.Key()
    fill_key(message, key)
    return message


def fill_key(message: pb.Key, key: Key) -> None:
    """Fills an empty Key message with the public view of ``key``.

    Done on every Get, where it is most of the RPC's own work: in place (a
    Get's reply fills its own ``key`` rather than copying a built one in),
    only the fields that differ from their defaults (a field left alone is
    unset, and an unread sub-message is never built), and the sorted family
    list from the (shared) profile.
    """
    message.hash = key.hash
    message.service = key.service
    message.model_families.extend(key.profile.sorted_families)
    if key.organization_id:
        message.organization_id = key.organization_id
    if key.profile.is_trial:
        message.is_trial = True
    if key.is_disabled:
        message.is_disabled = True
    if key.is_revoked:
        message.is_revoked = True
    if key.is_over_quota:
        message.is_over_quota = True
        if key.over_quota_until:
            _set_time(message.over_quota_until, key.over_quota_until)
    if key.disable_reason is not None:
        message.disable_reason = _REASON_TO_PROTO[key.disable_reason]
    if key.disabled_at:
        _set_time(message.disabled_at, key.disabled_at)
    if key.prompt_count:
        message.prompt_count = key.prompt_count
    if key.last_checked:
        _set_time(message.last_checked, key.last_checked)
    rates = key.rate_summary()
    if rates.token_usage:
        message.token_usage.update(rates.token_usage)
    _set_lock_times(message, key.last_used, rates.rate_limited_at, rates.rate_limited_until)
    if rates.requests_reset is not None:
        _set_duration(message.rate_limit_requests_reset, rates.requests_reset)
    if rates.tokens_reset is not None:
        _set_duration(message.rate_limit_tokens_reset, rates.tokens_reset)
    for family in rates.families:
        _family_to_proto(family, message.family_rate_limits.add())


def _family_to_proto(family: FamilyRates, message: pb.FamilyRateLimit) -> None:
    message.family = family.family
    _set_lock_times(message, family.last_used, family.rate_limited_at, family.until)
    if family.requests_reset is not None:
        _set_duration(message.requests_reset, family.requests_reset)
    if family.tokens_reset is not None:
        _set_duration(message.tokens_reset, family.tokens_reset)
    if family.remaining_requests is not None:
        message.remaining_requests = family.remaining_requests
    if family.remaining_tokens is not None:
        message.remaining_tokens = family.remaining_tokens


class Rechecker(Protocol):
    """What Recheck calls when a key checker runs (``keysvc.checker.KeyChecker``)."""

    async def recheck(self) -> None: ...


class KeyService(pb_grpc.KeyServiceServicer):
    """keysvc.v1.KeyService over a pool backend, and its key checker if one runs."""

    def __init__(
        self,
        pool: PoolBackend | KeyPool,
        checker: Rechecker | None = None,
        *,
        max_page_size: int = DEFAULT_MAX_PAGE_SIZE,
    ) -> None:
        self._pool = as_backend(pool)
        self._checker = checker
        self._max_page_size = max_page_size

    async def Get(self, request: pb.GetRequest, context: _Context) -> pb.GetResponse:
        if request.HasField("max_wait"):
            wait = request.max_wait
            key = await self._pool.get(
                request.model,
                wait.seconds + wait.nanos / 1e9,
                time_left=context.time_remaining(),
                caller=context.peer(),
            )
        else:
            key = await self._pool.get(request.model, caller=context.peer())
        response = pb.GetResponse(secret=key.secret)
        fill_key(response.key, key)
        return response

    async def Disable(self, request: pb.DisableRequest, context: _Context) -> pb.DisableResponse:
        reason = _REASON_FROM_PROTO.get(request.reason)
        if reason is None:
            raise InvalidArgument("reason", f"unknown DisableReason {request.reason}")
        key = await self._pool.disable(request.hash, reason)
        # A Disable is durable before it is acknowledged: a restart must never revive the key.
        await self._pool.flush()
        return pb.DisableResponse(key=key_to_proto(key))

    async def MarkRateLimited(
        self, request: pb.MarkRateLimitedRequest, context: _Context
    ) -> pb.MarkRateLimitedResponse:
        await self._pool.mark_rate_limited(request.hash, request.model)
        return pb.MarkRateLimitedResponse()

    async def UpdateRateLimits(
        self, request: pb.UpdateRateLimitsRequest, context: _Context
    ) -> pb.UpdateRateLimitsResponse:
        await self._pool.update_rate_limits(request.hash, request.headers, request.model)
        return pb.UpdateRateLimitsResponse()

    async def GetLockoutPeriod(
        self, request: pb.GetLockoutPeriodRequest, context: _Context
    ) -> pb.GetLockoutPeriodResponse:
        lockout = await self._pool.lockout_period(request.model, caller=context.peer())
        return pb.GetLockoutPeriodResponse(lockout=_duration(lockout))

    async def IncrementUsage(
        self, request: pb.IncrementUsageRequest, context: _Context
    ) -> pb.IncrementUsageResponse:
        await self._pool.increment_usage(request.hash, request.model, request.tokens)
        return pb.IncrementUsageResponse()

    async def ReportOutcome(
        self, request: pb.ReportOutcomeRequest, context: _Context
    ) -> pb.ReportOutcomeResponse:
        decision, key = await self._pool.report_outcome(
            request.hash,
            request.model,
            status=request.status,
            headers=request.headers,
            error=UpstreamError(request.error_type, request.error_code, request.error_message),
            prompt_tokens=request.prompt_tokens,
            completion_tokens=request.completion_tokens,
        )
        if decision.disable is not None:
            # Durable before acknowledged, exactly as Disable.
            await self._pool.flush()
        response = pb.ReportOutcomeResponse(
            action=_ACTION_TO_PROTO[decision.action], key=key_to_proto(key), reason=decision.why
        )
        if decision.retry_after is not None:
            _set_duration(response.retry_after, decision.retry_after)
        return response

    async def List(self, request: pb.ListRequest, context: _Context) -> pb.ListResponse:
        if request.page_size < 0:
            raise InvalidArgument("page_size", "must not be negative")
        key_filter = _FILTER_FROM_PROTO.get(request.state)
        if key_filter is None:
            raise InvalidArgument("state", f"unknown KeyState {request.state}")
        size = min(request.page_size or self._max_page_size, self._max_page_size)
        page = await self._pool.list_keys(request.page_token, size, key_filter)
        response = pb.ListResponse()
        for key in page.keys:
            fill_key(response.keys.add(), key)
        if page.next_page_token:
            response.next_page_token = page.next_page_token
        return response

    async def Available(
        self, request: pb.AvailableRequest, context: _Context
    ) -> pb.AvailableResponse:
        return pb.AvailableResponse(count=await self._pool.available())

    async def Recheck(self, request: pb.RecheckRequest, context: _Context) -> pb.RecheckResponse:
        if self._checker is not None:
            await self._checker.recheck()  # dead keys stay out until their new check says alive
        else:
            await self._pool.recheck()
        return pb.RecheckResponse()
