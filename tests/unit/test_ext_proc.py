"""The ext_proc servicer driven directly with the messages Envoy sends (no Envoy, no network)."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Mapping, Sequence
from typing import Any

import pytest
from envoy.config.core.v3 import base_pb2
from envoy.extensions.filters.http.ext_proc.v3 import processing_mode_pb2
from envoy.service.ext_proc.v3 import external_processor_pb2 as ep
from prometheus_client import generate_latest

from keysvc.auth import AuthTokens
from keysvc.errors import StateWriteFailed
from keysvc.ext_proc import ACTION_HEADER, MAX_WAIT_HEADER, ExtProcService
from keysvc.keys import DisableReason, hash_key
from keysvc.metrics import Metrics
from keysvc.pool import KeyPool
from tests.helpers import make_pool

SECRETS = ["sk-extproc-0001", "sk-extproc-0002"]
CHAT = json.dumps({"model": "gpt-4o", "messages": []}).encode()


def _headers(pairs: Mapping[str, str], *, end_of_stream: bool = False) -> ep.HttpHeaders:
    # Envoy sends header values in raw_value.
    header_map = base_pb2.HeaderMap(
        headers=[base_pb2.HeaderValue(key=k, raw_value=v.encode()) for k, v in pairs.items()]
    )
    return ep.HttpHeaders(headers=header_map, end_of_stream=end_of_stream)


def request_headers(pairs: Mapping[str, str] | None = None, **kw: bool) -> ep.ProcessingRequest:
    base = {":method": "POST", ":path": "/v1/chat/completions"}
    return ep.ProcessingRequest(request_headers=_headers({**base, **(pairs or {})}, **kw))


def request_body(body: bytes = CHAT) -> ep.ProcessingRequest:
    return ep.ProcessingRequest(request_body=ep.HttpBody(body=body, end_of_stream=True))


def response_headers(status: int, content_type: str = "application/json") -> ep.ProcessingRequest:
    pairs = {
        ":status": str(status),
        "content-type": content_type,
        "x-ratelimit-remaining-requests": "99",
        "x-ratelimit-reset-requests": "2s",
        "x-unrelated": "yes",
    }
    return ep.ProcessingRequest(response_headers=_headers(pairs))


def response_body(document: object) -> ep.ProcessingRequest:
    body = json.dumps(document).encode()
    return ep.ProcessingRequest(response_body=ep.HttpBody(body=body, end_of_stream=True))


async def run(
    service: ExtProcService, requests: Sequence[ep.ProcessingRequest]
) -> list[ep.ProcessingResponse]:
    async def stream() -> AsyncIterator[ep.ProcessingRequest]:
        for request in requests:
            yield request

    context: Any = None  # the servicer never touches its context
    return [response async for response in service.Process(stream(), context)]


def service_for(pool: KeyPool, **options: Any) -> ExtProcService:
    options.setdefault("tokens", AuthTokens())
    options.setdefault("max_wait", 0.0)
    return ExtProcService(pool, **options)


def set_headers(response: ep.CommonResponse) -> dict[str, str]:
    return {
        option.header.key: option.header.raw_value.decode()
        for option in response.header_mutation.set_headers
    }


def immediate(response: ep.ProcessingResponse) -> tuple[int, dict[str, str], dict[str, Any]]:
    assert response.WhichOneof("response") == "immediate_response"
    answer = response.immediate_response
    headers = {o.header.key: o.header.raw_value.decode() for o in answer.headers.set_headers}
    return answer.status.code, headers, json.loads(answer.body)


async def test_the_request_gets_a_pool_key_and_the_answer_is_reported() -> None:
    pool, _ = make_pool(SECRETS)
    responses = await run(
        service_for(pool),
        [
            request_headers({"authorization": "Bearer sk-the-apps-own", MAX_WAIT_HEADER: "0"}),
            request_body(),
            response_headers(200),
            response_body({"usage": {"prompt_tokens": 30, "completion_tokens": 12}}),
        ],
    )
    kinds = [r.WhichOneof("response") for r in responses]
    assert kinds == ["request_headers", "request_body", "response_headers", "response_body"]
    mutation = responses[1].request_body.response
    secret = set_headers(mutation)["authorization"].removeprefix("Bearer ")
    assert secret in SECRETS
    assert list(mutation.header_mutation.remove_headers) == [MAX_WAIT_HEADER]
    option = mutation.header_mutation.set_headers[0]
    assert option.append_action == base_pb2.HeaderValueOption.OVERWRITE_IF_EXISTS_OR_ADD
    # A JSON answer: its body is asked for, to read the usage.
    override = responses[2].mode_override
    assert override.response_body_mode == processing_mode_pb2.ProcessingMode.BUFFERED
    key = pool.key(hash_key(secret))
    assert key.prompt_count == 1
    assert key.rate_summary().token_usage == {"gpt4o": 42}
    # ReportOutcome's action goes back to Envoy's retry policy in a response header.
    assert set_headers(responses[3].response_body.response) == {ACTION_HEADER: "done"}


async def test_an_event_stream_is_not_buffered_and_counts_without_usage() -> None:
    pool, _ = make_pool(SECRETS[:1])
    responses = await run(
        service_for(pool),
        [request_headers(), request_body(), response_headers(200, "text/event-stream")],
    )
    assert not responses[2].HasField("mode_override")
    assert set_headers(responses[2].response_headers.response) == {ACTION_HEADER: "done"}
    assert pool.key(hash_key(SECRETS[0])).prompt_count == 1


async def test_a_quota_429_read_from_the_body_disables_the_key() -> None:
    pool, _ = make_pool(SECRETS[:1])
    error = {"error": {"type": "insufficient_quota", "code": "insufficient_quota", "message": ""}}
    responses = await run(
        service_for(pool),
        [request_headers(), request_body(), response_headers(429), response_body(error)],
    )
    key = pool.key(hash_key(SECRETS[0]))
    assert key.is_disabled and key.disable_reason is DisableReason.QUOTA
    action = set_headers(responses[3].response_body.response)
    assert action == {ACTION_HEADER: "retry_with_another_key"}


async def test_a_long_upstream_error_message_still_rate_limits_the_key() -> None:
    pool, clock = make_pool(SECRETS[:1])
    error = {"error": {"type": "requests", "code": "rate_limit_exceeded", "message": "x" * 20000}}
    await run(
        service_for(pool),
        [request_headers(), request_body(), response_headers(429), response_body(error)],
    )
    assert pool.lockout_period("gpt-4o") > 1.0  # the 429's window, beyond the reuse delay


async def test_no_key_for_the_family_is_503_and_no_secret() -> None:
    pool, _ = make_pool(SECRETS)
    body = json.dumps({"model": "gpt-4-32k"}).encode()
    responses = await run(service_for(pool), [request_headers(), request_body(body)])
    status, headers, document = immediate(responses[-1])
    assert status == 503
    assert headers["content-type"] == "application/json"
    assert document["error"]["code"] == "no_keys_available"
    assert not any(secret.encode() in responses[-1].SerializeToString() for secret in SECRETS)


async def test_a_disallowed_family_is_403() -> None:
    pool, _ = make_pool(SECRETS, allowed_families=frozenset({"turbo"}))
    responses = await run(service_for(pool), [request_headers(), request_body()])
    assert immediate(responses[-1])[0] == 403


async def test_every_key_locked_beyond_the_wait_is_429_with_retry_after() -> None:
    pool, _ = make_pool(SECRETS[:1])
    service = service_for(pool, max_wait=0.5)
    await run(service, [request_headers(), request_body()])
    responses = await run(service, [request_headers(), request_body()])
    status, headers, document = immediate(responses[-1])
    assert status == 429
    assert headers["retry-after"] == "1"
    assert document["error"]["code"] == "keys_busy"


@pytest.mark.parametrize(
    "body",
    [
        b"",
        b"{",
        b"[]",
        b'{"model": 7}',
        b'{"model": ""}',
        json.dumps({"model": "m" * 300}).encode(),
    ],
)
async def test_a_body_without_a_usable_model_is_400(body: bytes) -> None:
    pool, _ = make_pool(SECRETS)
    responses = await run(service_for(pool), [request_headers(), request_body(body)])
    assert immediate(responses[-1])[0] == 400
    assert all(key.last_used == 0 for key in pool.keys())


async def test_an_unknown_model_is_400_naming_it_and_no_key_is_handed_out() -> None:
    pool, _ = make_pool(SECRETS)
    body = json.dumps({"model": "gtp-4o"}).encode()
    responses = await run(service_for(pool), [request_headers(), request_body(body)])
    status, headers, document = immediate(responses[-1])
    assert status == 400 and headers["content-type"] == "application/json"
    assert document["error"]["type"] == "invalid_request_error"
    assert document["error"]["code"] == "unknown_model"
    assert "unknown model 'gtp-4o'" in document["error"]["message"]
    assert all(key.last_used == 0 for key in pool.keys())


async def test_a_request_without_a_body_is_400() -> None:
    pool, _ = make_pool(SECRETS)
    responses = await run(service_for(pool), [request_headers(end_of_stream=True)])
    assert immediate(responses[-1])[0] == 400


@pytest.mark.parametrize("value", ["-1", "soon", "nan", ""])
async def test_a_bad_max_wait_header_is_400(value: str) -> None:
    pool, _ = make_pool(SECRETS)
    responses = await run(service_for(pool), [request_headers({MAX_WAIT_HEADER: value})])
    assert immediate(responses[-1])[0] == 400


@pytest.mark.parametrize(
    "credential", [None, "Bearer wrong", "proxy-token-1", "Basic proxy-token-1", "Bearer "]
)
async def test_with_auth_on_a_request_without_a_known_token_is_401(credential: str | None) -> None:
    pool, _ = make_pool(SECRETS)
    service = service_for(pool, tokens=AuthTokens(proxy=frozenset({"proxy-token-1"})))
    headers = {} if credential is None else {"authorization": credential}
    responses = await run(service, [request_headers(headers), request_body()])
    assert len(responses) == 1
    status, _, document = immediate(responses[0])
    assert status == 401
    assert "proxy-token-1" not in json.dumps(document)
    assert all(key.last_used == 0 for key in pool.keys())


async def test_with_auth_on_a_known_token_gets_a_key() -> None:
    pool, _ = make_pool(SECRETS)
    tokens = AuthTokens(proxy=frozenset({"proxy-token-1"}), admin=frozenset({"admin-token-1"}))
    for token in ("proxy-token-1", "admin-token-1"):
        responses = await run(
            service_for(pool, tokens=tokens),
            [request_headers({"authorization": f"bearer {token}"}), request_body()],
        )
        secret = set_headers(responses[-1].request_body.response)["authorization"]
        assert secret.removeprefix("Bearer ") in SECRETS


async def test_answers_are_counted_in_metrics() -> None:
    pool, _ = make_pool(SECRETS[:1])
    metrics = Metrics()
    service = service_for(pool, metrics=metrics)
    await run(service, [request_headers(), request_body()])
    await run(service, [request_headers(), request_body()])
    text = generate_latest(metrics.registry).decode()
    assert 'keysvc_ext_proc_requests_total{answer="key"} 1.0' in text
    assert 'keysvc_ext_proc_requests_total{answer="429"} 1.0' in text


async def test_an_answer_for_a_key_removed_meanwhile_is_ignored() -> None:
    pool, _ = make_pool(SECRETS[:1])
    service = service_for(pool)

    async def stream() -> AsyncIterator[ep.ProcessingRequest]:
        yield request_headers()
        yield request_body()
        pool.remove_key(hash_key(SECRETS[0]))
        yield response_headers(401, "text/plain")

    context: Any = None
    responses = [r async for r in service.Process(stream(), context)]
    assert responses[-1].WhichOneof("response") == "response_headers"
    # Not applied, so no action: Envoy does not retry on keysvc's say-so.
    assert set_headers(responses[-1].response_headers.response) == {}


async def test_an_unexpected_failure_picking_a_key_is_a_500_without_a_key(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    pool, _ = make_pool(SECRETS)

    def broken(model: str) -> None:
        raise RuntimeError("boom")

    monkeypatch.setattr(pool, "get", broken)  # max_wait 0: the memory backend calls get
    responses = await run(service_for(pool), [request_headers(), request_body()])
    status, _, document = immediate(responses[-1])
    assert status == 500 and document["error"]["code"] == "internal_error"


async def test_an_unexpected_failure_learning_from_an_answer_passes_the_answer_on(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    pool, _ = make_pool(SECRETS)

    def broken(*args: object, **kwargs: object) -> None:
        raise RuntimeError("boom")

    monkeypatch.setattr(pool, "report_outcome", broken)
    responses = await run(
        service_for(pool),
        [request_headers(), request_body(), response_headers(200), response_body({})],
    )
    kinds = [r.WhichOneof("response") for r in responses]
    assert kinds == ["request_headers", "request_body", "response_headers", "response_body"]


async def test_a_disable_whose_state_write_fails_still_answers_envoy() -> None:
    # The key is disabled in memory; the state file catches up when a write works.
    # Envoy still gets its answer (and the caller the upstream's), not a broken stream.
    pool, _ = make_pool(SECRETS[:1])

    async def failing_flush() -> None:
        raise StateWriteFailed("disk full")

    pool.flush = failing_flush  # type: ignore[method-assign]
    error = {"error": {"type": "insufficient_quota", "code": "insufficient_quota", "message": ""}}
    responses = await run(
        service_for(pool),
        [request_headers(), request_body(), response_headers(429), response_body(error)],
    )
    assert pool.key(hash_key(SECRETS[0])).is_disabled
    action = set_headers(responses[3].response_body.response)
    assert action == {ACTION_HEADER: "retry_with_another_key"}


async def test_an_anthropic_key_goes_in_x_api_key_and_its_answer_is_read_as_anthropics() -> None:
    pool, clock = make_pool(["sk-ant-extproc-0001"])
    body = json.dumps({"model": "claude-sonnet-4-5", "messages": []}).encode()
    reset = "2099-01-01T00:00:00Z"
    answer = {
        ":status": "200",
        "content-type": "application/json",
        "anthropic-ratelimit-requests-limit": "50",
        "anthropic-ratelimit-requests-remaining": "49",
        "anthropic-ratelimit-requests-reset": reset,
    }
    responses = await run(
        service_for(pool),
        [
            request_headers({"authorization": "Bearer keysvc-token-or-junk"}),
            request_body(body),
            ep.ProcessingRequest(response_headers=_headers(answer)),
            response_body({"usage": {"input_tokens": 30, "output_tokens": 12}}),
        ],
    )
    mutation = responses[1].request_body.response
    assert set_headers(mutation) == {
        "x-api-key": "sk-ant-extproc-0001",
        "anthropic-version": "2023-06-01",
    }
    # The caller's authorization (a keysvc token, say) does not go to Anthropic.
    assert set(mutation.header_mutation.remove_headers) == {MAX_WAIT_HEADER, "authorization"}
    key = pool.key(hash_key("sk-ant-extproc-0001"))
    assert key.rate_summary().token_usage == {"claude-sonnet": 42}
    (family,) = key.family_states()
    assert family.remaining_requests == 49
