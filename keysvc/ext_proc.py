"""Envoy's External Processing service: an Envoy in front of any app picks, injects
and learns keys through keysvc.

Envoy runs the ext_proc filter as an *upstream* filter (deploy/envoy/envoy.yaml,
docs/envoy.md), so every attempt of a request, retries included, is one
``Process`` stream here:

1. request headers: the caller's credential is checked when auth is on (its
   ``authorization: Bearer <keysvc token>``, proxy or admin role); without a
   known one the answer is 401 and no key is handed out.
2. request body (buffered by Envoy): ``model`` is read from the JSON, a key is
   picked as Get picks it (waiting up to ``max_wait`` for one to unlock), and
   the key's credential overwrites whatever the request carried (a retried
   attempt carries the previous attempt's key): ``authorization: Bearer
   <secret>`` for OpenAI; ``x-api-key`` and ``anthropic-version`` for
   Anthropic, whose requests also lose the caller's ``authorization``. A request keysvc
   cannot serve gets an immediate, OpenAI-shaped error instead: 400 (no
   model, or one the model table does not know), 401, 403 (family disallowed),
   429 with ``retry-after`` (every key locked beyond the wait), 503 (no key for
   the family).
3. response headers: the status and the rate-limit headers of any provider
   (``x-ratelimit-*``, ``anthropic-ratelimit-*``, ``retry-after``). A JSON answer's
   body is asked for (``mode_override``) so its usage or error code counts; any
   other answer, an SSE stream above all, streams through unbuffered and is
   applied at once without usage tokens.
4. response body (JSON answers only): error type/code and usage tokens.

The answer is applied by ``KeyPool.report_outcome``, the code path of the
ReportOutcome RPC, and its action goes back on the response as
``x-keysvc-action`` (``done``, ``retry_with_another_key``, ``return_error``):
Envoy's retry policy retries on that header, so a request is retried on another
key exactly when ReportOutcome would say so. A secret only ever leaves keysvc in the header mutation
that Envoy puts on the upstream request: never in an immediate response, a
log line or an error.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from typing import Any, Final

import grpc
from envoy.config.core.v3 import base_pb2
from envoy.extensions.filters.http.ext_proc.v3 import processing_mode_pb2
from envoy.service.ext_proc.v3 import external_processor_pb2 as ep
from envoy.service.ext_proc.v3 import external_processor_pb2_grpc as ep_grpc
from envoy.type.v3 import http_status_pb2

from .auth import AuthTokens
from .errors import (
    FamilyDisallowed,
    InvalidArgument,
    KeysBusy,
    KeysvcError,
    NoKeysForFamily,
    UnknownModel,
)
from .metrics import Metrics
from .outcomes import OutcomeAction, UpstreamError, upstream_error
from .pool import MAX_WAIT, KeyPool, Limits, PoolBackend, as_backend
from .providers import provider, provider_names

__all__ = ["EXT_PROC_SERVICE_NAME", "MAX_WAIT_HEADER", "ExtProcService", "add_ext_proc_service"]

EXT_PROC_SERVICE_NAME: Final = ep.DESCRIPTOR.services_by_name["ExternalProcessor"].full_name

#: A request may ask for a shorter wait than KEYSVC_EXT_PROC_MAX_WAIT (seconds); never longer.
MAX_WAIT_HEADER: Final = "x-keysvc-max-wait"

#: The response header that carries ReportOutcome's action (``done``,
#: ``retry_with_another_key``, ``return_error``) to Envoy's retry policy.
ACTION_HEADER: Final = "x-keysvc-action"

#: The response headers any provider's rate-limit parsing reads.
_RATE_LIMIT_PREFIXES: Final = tuple(
    dict.fromkeys(p for name in provider_names() for p in provider(name).rate_header_prefixes)
)
_BEARER: Final = "bearer "

_log = logging.getLogger("keysvc.ext_proc")

_BUFFER_RESPONSE_BODY = processing_mode_pb2.ProcessingMode(
    response_body_mode=processing_mode_pb2.ProcessingMode.BUFFERED
)


#: What to answer, unchanged, when handling a message about the upstream's answer fails.
_PASSED_ON_FAILURE: Final = {
    "response_headers": ep.ProcessingResponse(response_headers=ep.HeadersResponse()),
    "response_body": ep.ProcessingResponse(response_body=ep.BodyResponse()),
    "response_trailers": ep.ProcessingResponse(response_trailers=ep.TrailersResponse()),
}


@dataclass(slots=True)
class _Refusal(Exception):
    """A request keysvc will not serve, as the HTTP answer Envoy sends the caller."""

    status: int
    type: str
    code: str
    message: str
    retry_after: int = 0


@dataclass(slots=True)
class _Attempt:
    """What one stream (one attempt of one request) has learned so far."""

    authorized: bool = False
    max_wait: float = 0.0
    key_hash: str = ""
    model: str = ""
    status: int = 0
    headers: Mapping[str, str] | None = None


def _headers(message: ep.HttpHeaders) -> dict[str, str]:
    """The header map, names lower case. Envoy sends values in ``raw_value``."""
    found: dict[str, str] = {}
    for header in message.headers.headers:
        value = header.raw_value.decode("latin-1") if header.raw_value else header.value
        found[header.key.lower()] = value
    return found


def _error_body(refusal: _Refusal) -> bytes:
    error = {
        "message": refusal.message,
        "type": refusal.type,
        "param": None,
        "code": refusal.code,
    }
    return json.dumps({"error": error}).encode()


def _set_header(name: str, value: str) -> base_pb2.HeaderValueOption:
    return base_pb2.HeaderValueOption(
        header=base_pb2.HeaderValue(key=name, raw_value=value.encode("latin-1")),
        append_action=base_pb2.HeaderValueOption.OVERWRITE_IF_EXISTS_OR_ADD,
    )


def _immediate(refusal: _Refusal) -> ep.ProcessingResponse:
    mutation = ep.HeaderMutation(set_headers=[_set_header("content-type", "application/json")])
    if refusal.retry_after:
        mutation.set_headers.append(_set_header("retry-after", str(refusal.retry_after)))
    return ep.ProcessingResponse(
        immediate_response=ep.ImmediateResponse(
            status=http_status_pb2.HttpStatus(code=refusal.status),
            headers=mutation,
            body=_error_body(refusal),
            details=f"keysvc_{refusal.code}",
        )
    )


def _action(action: OutcomeAction | None) -> ep.CommonResponse:
    """ReportOutcome's action as the ``x-keysvc-action`` response header, for Envoy's
    retry policy (``retriable_headers``): retry exactly when ReportOutcome would."""
    if action is None:
        return ep.CommonResponse()
    mutation = ep.HeaderMutation(set_headers=[_set_header(ACTION_HEADER, action.value)])
    return ep.CommonResponse(header_mutation=mutation)


def _refusal_for(error: KeysvcError) -> _Refusal:
    """The HTTP answer for a pool error; messages name the model and family, never a key."""
    if isinstance(error, NoKeysForFamily):
        return _Refusal(503, "server_error", "no_keys_available", error.message)
    if isinstance(error, FamilyDisallowed):
        return _Refusal(403, "invalid_request_error", "model_not_allowed", error.message)
    if isinstance(error, UnknownModel):
        return _Refusal(400, "invalid_request_error", "unknown_model", error.message)
    if isinstance(error, InvalidArgument):
        return _Refusal(400, "invalid_request_error", "invalid_value", error.message)
    if isinstance(error, KeysBusy):
        return _busy(error.model, error.retry_delay)
    raise error


def _busy(model: str, lockout: float) -> _Refusal:
    return _Refusal(
        429,
        "requests",
        "keys_busy",
        f"every key for model {model!r} is busy; retry after {math.ceil(lockout)} s",
        retry_after=max(1, math.ceil(lockout)),
    )


def _usage(document: object) -> tuple[int, int]:
    """(prompt, completion) tokens of an answer's ``usage`` (OpenAI's prompt/completion
    tokens, Anthropic's input/output tokens); zeros when absent."""
    usage = document.get("usage") if isinstance(document, dict) else None
    if not isinstance(usage, dict):
        return 0, 0
    names = ("prompt_tokens", "completion_tokens")
    if "input_tokens" in usage or "output_tokens" in usage:
        names = ("input_tokens", "output_tokens")
    counts = [usage.get(name) for name in names]
    prompt, completion = (c if isinstance(c, int) and c >= 0 else 0 for c in counts)
    return prompt, completion


def _is_json(headers: Mapping[str, str]) -> bool:
    return headers.get("content-type", "").split(";", 1)[0].strip().lower() == "application/json"


class ExtProcService:
    """envoy.service.ext_proc.v3.ExternalProcessor over a pool backend.

    Args:
        pool: the pool keys come from and answers go to.
        tokens: with any token configured, a request must carry one (proxy or admin role).
        max_wait: the longest a request waits for a key to unlock, in seconds; a
            request's ``x-keysvc-max-wait`` header may ask for less.
        metrics: counts each request's answer (``keysvc_ext_proc_requests``).
    """

    def __init__(
        self,
        pool: PoolBackend | KeyPool,
        *,
        tokens: AuthTokens,
        max_wait: float,
        metrics: Metrics | None = None,
    ) -> None:
        if not 0.0 <= max_wait <= MAX_WAIT:
            raise ValueError(f"max_wait must be between 0 and {MAX_WAIT:g} seconds")
        self._pool = as_backend(pool)
        self._tokens = tokens
        self._max_wait = max_wait
        self._metrics = metrics

    async def Process(
        self,
        request_iterator: AsyncIterator[ep.ProcessingRequest],
        context: grpc.aio.ServicerContext[Any, Any],
    ) -> AsyncIterator[ep.ProcessingResponse]:
        attempt = _Attempt()
        async for request in request_iterator:
            kind = request.WhichOneof("request")
            try:
                response = await self._step(request, attempt)
            except _Refusal as refusal:
                self._refused(refusal, attempt)
                # Final: Envoy answers the caller and sends nothing more on this stream.
                yield _immediate(refusal)
                return
            except Exception:
                _log.exception("ext_proc message failed", extra={"part": kind})
                if kind in _PASSED_ON_FAILURE:
                    # The upstream has answered: the caller gets that answer, unlearned.
                    yield _PASSED_ON_FAILURE[kind]
                    continue
                failed = _Refusal(500, "server_error", "internal_error", "keysvc failed")
                self._refused(failed, attempt)
                yield _immediate(failed)
                return
            if kind == "request_body":
                if self._metrics is not None:
                    self._metrics.ext_proc_answered("key")
                _log.debug(
                    "ext_proc key set", extra={"hash": attempt.key_hash, "model": attempt.model}
                )
            yield response

    def _refused(self, refusal: _Refusal, attempt: _Attempt) -> None:
        if self._metrics is not None:
            self._metrics.ext_proc_answered(str(refusal.status))
        _log.debug(
            "ext_proc refused",
            extra={"status": refusal.status, "code": refusal.code, "model": attempt.model},
        )

    async def _step(
        self, request: ep.ProcessingRequest, attempt: _Attempt
    ) -> ep.ProcessingResponse:
        kind = request.WhichOneof("request")
        if kind == "request_headers":
            self._on_request_headers(_headers(request.request_headers), attempt)
            if request.request_headers.end_of_stream:
                raise _Refusal(
                    400,
                    "invalid_request_error",
                    "missing_model",
                    "keysvc picks a key by the request body's model; this request has no body",
                )
            return ep.ProcessingResponse(request_headers=ep.HeadersResponse())
        if kind == "request_body":
            return await self._on_request_body(request.request_body.body, attempt)
        if kind == "response_headers":
            return await self._on_response_headers(_headers(request.response_headers), attempt)
        if kind == "response_body":
            action = await self._on_response_body(request.response_body.body, attempt)
            return ep.ProcessingResponse(response_body=ep.BodyResponse(response=_action(action)))
        # Trailers are not asked for (processing_mode); answer whatever comes unchanged.
        if kind == "request_trailers":
            return ep.ProcessingResponse(request_trailers=ep.TrailersResponse())
        return ep.ProcessingResponse(response_trailers=ep.TrailersResponse())

    def _on_request_headers(self, headers: Mapping[str, str], attempt: _Attempt) -> None:
        if self._tokens.enabled:
            credential = headers.get("authorization", "")
            role = None
            if credential[: len(_BEARER)].lower() == _BEARER:
                role = self._tokens.role_of(credential[len(_BEARER) :].strip())
            if role is None:
                raise _Refusal(
                    401,
                    "invalid_request_error",
                    "invalid_api_key",
                    "send 'authorization: Bearer <keysvc token>'; the token is missing or"
                    " not known",
                )
        attempt.authorized = True
        attempt.max_wait = self._max_wait
        asked = headers.get(MAX_WAIT_HEADER)
        if asked is not None:
            try:
                seconds = float(asked)
            except ValueError:
                seconds = math.nan
            if not 0.0 <= seconds:  # also NaN
                raise _Refusal(
                    400,
                    "invalid_request_error",
                    "invalid_value",
                    f"{MAX_WAIT_HEADER} must be a number of seconds, 0 or more",
                )
            attempt.max_wait = min(seconds, self._max_wait)

    async def _on_request_body(self, body: bytes, attempt: _Attempt) -> ep.ProcessingResponse:
        if not attempt.authorized:
            # Request headers are always sent first (request_header_mode SEND); a
            # stream that skips them gets no key.
            raise _Refusal(500, "server_error", "misconfigured", "keysvc saw no request headers")
        try:
            document = json.loads(body)
        except ValueError:
            document = None
        model = document.get("model") if isinstance(document, dict) else None
        if not isinstance(model, str) or not model:
            raise _Refusal(
                400,
                "invalid_request_error",
                "missing_model",
                "you must provide a model parameter (a JSON body with a 'model' string)",
            )
        attempt.model = model
        try:
            lockout = await self._pool.lockout_period(model)
            if lockout > attempt.max_wait:
                # No key can unlock within the wait: say so now, not after the wait.
                raise _busy(model, lockout)
            key = await self._pool.get(model, attempt.max_wait)
        except KeysvcError as error:
            raise _refusal_for(error) from None
        attempt.key_hash = key.hash
        credentials = provider(key.service).credential_headers(key.secret)
        names = {name for name, _ in credentials}
        mutation = ep.HeaderMutation(
            # Overwrite, never append: a retried attempt carries the previous key.
            set_headers=[_set_header(name, value) for name, value in credentials],
            # A provider whose key goes elsewhere must not get the keysvc token.
            remove_headers=[
                MAX_WAIT_HEADER,
                *(() if "authorization" in names else ("authorization",)),
            ],
        )
        return ep.ProcessingResponse(
            request_body=ep.BodyResponse(response=ep.CommonResponse(header_mutation=mutation))
        )

    async def _on_response_headers(
        self, headers: Mapping[str, str], attempt: _Attempt
    ) -> ep.ProcessingResponse:
        response = ep.ProcessingResponse(response_headers=ep.HeadersResponse())
        try:
            status = int(headers.get(":status", ""))
        except ValueError:
            return response
        if not attempt.key_hash:
            return response
        attempt.status = status
        attempt.headers = {
            name: value for name, value in headers.items() if name.startswith(_RATE_LIMIT_PREFIXES)
        }
        if _is_json(headers):
            # The body holds the usage (2xx) or the error code (a 429's quota vs
            # rate limit): ask Envoy for it, for this answer only.
            response.mode_override.CopyFrom(_BUFFER_RESPONSE_BODY)
        else:
            # An event stream (or anything not JSON) passes unbuffered; its usage is
            # not read, so the answer is applied now without tokens.
            action = await self._report(attempt, UpstreamError(), 0, 0)
            response.response_headers.response.CopyFrom(_action(action))
        return response

    async def _on_response_body(self, body: bytes, attempt: _Attempt) -> OutcomeAction | None:
        if not attempt.key_hash or not attempt.status:
            return None
        try:
            document: object = json.loads(body)
        except ValueError:
            document = None
        error = upstream_error(document) or UpstreamError()
        prompt, completion = _usage(document)
        return await self._report(attempt, error, prompt, completion)

    async def _report(
        self, attempt: _Attempt, error: UpstreamError, prompt: int, completion: int
    ) -> OutcomeAction | None:
        """Applies the answer as ReportOutcome does: the pool's ``report_outcome``, then a
        flush before going on when it disabled the key. Returns ReportOutcome's action;
        None when the answer could not be applied."""
        key_hash, attempt.key_hash = attempt.key_hash, ""  # one report per hand-out
        try:
            decision, _ = await self._pool.report_outcome(
                key_hash,
                attempt.model,
                status=attempt.status,
                headers=attempt.headers or {},
                # Cut to what ReportOutcome accepts: a long upstream message must not
                # cost the key its lesson.
                error=UpstreamError(
                    error.type[: Limits.ERROR_NAME_LENGTH],
                    error.code[: Limits.ERROR_NAME_LENGTH],
                    error.message[: Limits.ERROR_MESSAGE_LENGTH],
                ),
                prompt_tokens=prompt,
                completion_tokens=completion,
            )
        except KeysvcError as problem:
            # The caller's answer is on its way whatever keysvc learns from it.
            _log.warning(
                "upstream answer not applied",
                extra={"hash": key_hash, "reason": problem.reason, "problem": problem.message},
            )
            return None
        if decision.disable is not None:
            try:
                await self._pool.flush()
            except KeysvcError as problem:
                # Disabled in memory; the state file catches up when a write succeeds
                # (its failure is counted and logged where it happened).
                _log.warning(
                    "disable not written yet",
                    extra={"hash": key_hash, "reason": problem.reason},
                )
        return decision.action


def add_ext_proc_service(server: grpc.aio.Server, service: ExtProcService) -> None:
    """Serves ``service`` as envoy.service.ext_proc.v3.ExternalProcessor on ``server``."""
    ep_grpc.add_ExternalProcessorServicer_to_server(service, server)
