"""A real Envoy (deploy/envoy/envoy.yaml) in front of the fake upstream, asking keysvc.

Each test starts the fake OpenAI upstream, ``keysvc serve`` (a child process, so
its log can be searched and it can be stopped) and Envoy, all on loopback ports
picked by the kernel. The HTTP client holds no OpenAI key: whatever reaches the
upstream with a key got it from keysvc through ext_proc.
"""

from __future__ import annotations

import collections
import json
import time
from collections.abc import Callable, Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import httpx
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from keysvc.ext_proc import ACTION_HEADER, EXT_PROC_SERVICE_NAME, MAX_WAIT_HEADER
from keysvc.keys import hash_key
from keysvc.testing.envoy import EnvoyProcess, KeysvcTls
from keysvc.testing.fake_openai import SCENARIOS, FakeError, FakeOpenAI, Scenario
from keysvc.v1 import keysvc_pb2 as pb
from keysvc.v1 import keysvc_pb2_grpc
from tests.certs import TestCA
from tests.helpers import make_pool, serving
from tests.procs import ServerProcess

CHAT = {"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}]}
PROXY_TOKEN = "proxy-token-envoy-0001"
ADMIN_TOKEN = "admin-token-envoy-0001"


@dataclass
class Gateway:
    """The fake upstream, keysvc and Envoy of one test, and what the client saw."""

    fake: FakeOpenAI
    keysvc: ServerProcess
    envoy: EnvoyProcess
    envoy_log: Path
    secrets: list[str]
    admin_token: str | None = None
    seen: list[str] = field(default_factory=list)

    def post(self, body: object = CHAT, headers: Mapping[str, str] | None = None) -> httpx.Response:
        """A chat completion through Envoy; the answer is kept for the secret check."""
        response = httpx.post(
            f"{self.envoy.base_url}/chat/completions",
            json=body,
            headers=dict(headers or {}),
            timeout=30,
        )
        self.seen.append(f"{response.status_code} {dict(response.headers)} {response.text}")
        return response

    def keys(self) -> dict[str, pb.Key]:
        """keysvc's List, by hash."""
        metadata = (("authorization", f"Bearer {self.admin_token}"),) if self.admin_token else ()
        with grpc.insecure_channel(f"127.0.0.1:{self.keysvc.port}") as channel:
            reply = keysvc_pb2_grpc.KeyServiceStub(channel).List(
                pb.ListRequest(), metadata=metadata, timeout=10
            )
        return {key.hash: key for key in reply.keys}

    def assert_no_secret_leaked(self) -> None:
        """No key's secret in any answer the client got, keysvc's log or Envoy's log."""
        places = {
            "responses": "\n".join(self.seen),
            "keysvc log": self.keysvc.log,
            "envoy log": self.envoy_log.read_text(errors="replace"),
        }
        for place, text in places.items():
            for secret in self.secrets:
                assert secret not in text, f"a key's secret is in the {place}"


StartGateway = Callable[..., Gateway]


@pytest.fixture
def start(tmp_path: Path) -> Iterator[StartGateway]:
    started: list[tuple[FakeOpenAI, ServerProcess, EnvoyProcess]] = []

    def start_gateway(
        scenarios: Mapping[str, Scenario],
        env: Mapping[str, str] | None = None,
        keysvc_tls: KeysvcTls | None = None,
    ) -> Gateway:
        fake = FakeOpenAI(scenarios)
        fake.start()
        keysvc = ServerProcess(
            {
                "OPENAI_KEY": ",".join(scenarios),
                "OPENAI_BASE_URL": fake.base_url,
                # Debug: every log line keysvc can write is searched for secrets.
                "KEYSVC_LOG_LEVEL": "debug",
                **(env or {}),
            }
        )
        try:
            port = keysvc.wait_serving()
            log = tmp_path / f"envoy-{len(started)}.log"
            envoy = EnvoyProcess(
                upstream_port=fake.port, keysvc_port=port, log=log, keysvc_tls=keysvc_tls
            )
            envoy.start()
        except BaseException:
            keysvc.stop()
            fake.stop()
            raise
        started.append((fake, keysvc, envoy))
        admin = (env or {}).get("KEYSVC_ADMIN_TOKENS")
        return Gateway(fake, keysvc, envoy, log, list(scenarios), admin_token=admin)

    yield start_gateway
    for fake, keysvc, envoy in started:
        envoy.stop()
        keysvc.stop()
        fake.stop()


def _keys(prefix: str, scenario: str, count: int) -> dict[str, Scenario]:
    return {f"sk-{prefix}-{i:04d}-{scenario}": SCENARIOS[scenario] for i in range(count)}


def test_a_client_without_a_key_gets_a_completion_made_with_a_pool_key(
    start: StartGateway,
) -> None:
    gateway = start(_keys("plain", "valid", 2))
    # Whatever authorization the app sends is replaced, never forwarded.
    response = gateway.post(headers={"authorization": "Bearer sk-the-apps-own-junk"})
    assert response.status_code == 200
    assert response.json()["choices"][0]["message"]["content"]
    [request] = gateway.fake.requests
    assert request.key in gateway.secrets
    assert response.headers["x-ratelimit-remaining-requests"] == "3499"
    assert ACTION_HEADER not in response.headers  # for Envoy's retry policy only
    # The answer went back to the pool as ReportOutcome would: usage counted.
    key = gateway.keys()[hash_key(request.key)]
    assert key.prompt_count == 1
    assert dict(key.token_usage) == {"gpt4o": 12}
    gateway.assert_no_secret_leaked()


def test_concurrent_requests_spread_over_the_keys(start: StartGateway) -> None:
    gateway = start(_keys("spread", "valid", 10))
    with ThreadPoolExecutor(20) as workers:
        statuses = list(workers.map(lambda _: gateway.post().status_code, range(20)))
    assert statuses == [200] * 20
    used = collections.Counter(request.key for request in gateway.fake.requests)
    # Before its first answer a key is held back for a second after a hand-out, so
    # the burst spreads over every key; then the keys' budgets decide.
    assert set(used) == set(gateway.secrets)
    gateway.assert_no_secret_leaked()


def test_concurrent_retries_all_end_in_success(start: StartGateway) -> None:
    # Half the keys answer 429: about half of 20 concurrent requests retry at once.
    # Envoy's default circuit breaker allows 3 retries in flight per cluster; the
    # bootstrap raises max_retries so none of them is dropped as a 429 to the client.
    # Each 429 rests its key for 10 s (its reset header, clamped), so every retry
    # waits for a valid key: one retry per request at most, whatever the order.
    busy = Scenario(completion_error=SCENARIOS["busy"].completion_error, reset_requests="20s")
    scenarios = {f"sk-retries-{i:04d}-busy": busy for i in range(10)}
    gateway = start({**scenarios, **_keys("retries", "valid", 10)})
    with ThreadPoolExecutor(20) as workers:
        statuses = list(workers.map(lambda _: gateway.post().status_code, range(20)))
    assert statuses == [200] * 20
    assert sum(r.status == 429 for r in gateway.fake.requests) == 10
    overflow = gateway.envoy.stats("cluster.openai.upstream_rq_retry_overflow")
    assert overflow == {"cluster.openai.upstream_rq_retry_overflow": 0}


def test_a_rate_limited_key_is_rested_and_the_request_succeeds_on_another(
    start: StartGateway,
) -> None:
    scenarios = {**_keys("rest", "busy", 1), **_keys("rest", "valid", 1)}
    gateway = start(scenarios)
    busy = next(secret for secret in scenarios if secret.endswith("busy"))
    # Two requests: the second at the latest meets the busy key (the first holds the other).
    statuses = [gateway.post().status_code for _ in range(2)]
    assert statuses == [200, 200]
    answers = [(r.key, r.status) for r in gateway.fake.requests]
    assert (busy, 429) in answers
    assert answers[-1][1] == 200 and answers[-1][0] != busy
    # The retried attempt carried the busy key's header; it was replaced, not added to.
    assert [r.authorizations for r in gateway.fake.requests] == [1] * len(answers)
    key = gateway.keys()[hash_key(busy)]
    assert not key.is_disabled
    assert key.rate_limited_until.ToSeconds() > time.time() - 1
    assert [f.family for f in key.family_rate_limits] == ["gpt4o"]
    gateway.assert_no_secret_leaked()


def test_a_revoked_key_is_disabled_and_the_request_succeeds_on_another(
    start: StartGateway,
) -> None:
    scenarios = {**_keys("revoke", "revoked", 1), **_keys("revoke", "valid", 1)}
    gateway = start(scenarios)
    revoked = next(secret for secret in scenarios if secret.endswith("revoked"))
    statuses = [gateway.post().status_code for _ in range(2)]
    assert statuses == [200, 200]
    assert (revoked, 401) in [(r.key, r.status) for r in gateway.fake.requests]
    assert all(r.authorizations == 1 for r in gateway.fake.requests)
    key = gateway.keys()[hash_key(revoked)]
    assert key.is_disabled and key.is_revoked
    assert key.disable_reason == pb.DISABLE_REASON_REVOKED
    # Disabled for good: later requests never reach the upstream with it again.
    count = len(gateway.fake.requests)
    assert gateway.post().status_code == 200
    assert revoked not in [r.key for r in gateway.fake.requests[count:]]
    gateway.assert_no_secret_leaked()


def test_a_quota_429_is_told_apart_by_its_body_and_disables_the_key(start: StartGateway) -> None:
    # Only the body says insufficient_quota (a plain 429 would only rest the key):
    # keysvc asks Envoy for the JSON body of the answer with mode_override.
    scenarios = {**_keys("quota", "over-quota", 1), **_keys("quota", "valid", 1)}
    gateway = start(scenarios)
    spent = next(secret for secret in scenarios if secret.endswith("over-quota"))
    statuses = [gateway.post().status_code for _ in range(2)]
    assert statuses == [200, 200]
    assert (spent, 429) in [(r.key, r.status) for r in gateway.fake.requests]
    key = gateway.keys()[hash_key(spent)]
    assert key.is_disabled and key.is_over_quota
    assert key.disable_reason == pb.DISABLE_REASON_QUOTA
    gateway.assert_no_secret_leaked()


def test_envoy_retries_exactly_when_report_outcome_says_retry(start: StartGateway) -> None:
    # A per-day limit: ReportOutcome says RETURN_ERROR (waiting cannot help), so Envoy
    # must not spend the other key on it; a 5xx says RETRY_WITH_ANOTHER_KEY.
    per_day = FakeError(
        429, "requests", "rate_limit_exceeded", "Limit reached on requests per day (RPD)."
    )
    gateway = start(
        {
            "sk-daily-0000-daily": Scenario(completion_error=per_day),
            "sk-daily-0001-valid": SCENARIOS["valid"],
        }
    )
    first = [gateway.post().status_code for _ in range(2)]
    answers = [(r.key, r.status) for r in gateway.fake.requests]
    # Whichever request met the daily-limited key got its 429 back, not retried.
    assert sorted(first) == [200, 429]
    assert sorted(status for _, status in answers) == [200, 429]
    gateway.assert_no_secret_leaked()


def test_a_5xx_is_retried_on_another_key(start: StartGateway) -> None:
    gateway = start({"sk-flaky-0000-flaky": SCENARIOS["flaky"], **_keys("flaky", "valid", 1)})
    statuses = [gateway.post().status_code for _ in range(2)]
    assert statuses == [200, 200]
    assert ("sk-flaky-0000-flaky", 503) in [(r.key, r.status) for r in gateway.fake.requests]


def test_every_key_busy_is_429_with_retry_after(start: StartGateway) -> None:
    gateway = start(_keys("busy", "spent", 1))
    assert gateway.post().status_code == 200  # its answer: none left, back in 20 s
    response = gateway.post(headers={MAX_WAIT_HEADER: "0"})
    assert response.status_code == 429
    assert int(response.headers["retry-after"]) >= 1
    assert response.headers["content-type"] == "application/json"
    assert response.json()["error"]["code"] == "keys_busy"
    # keysvc's answer is final: Envoy does not retry it, the upstream saw one request.
    assert len(gateway.fake.requests) == 1
    gateway.assert_no_secret_leaked()


def test_waiting_up_to_the_header_gets_the_key_when_it_unlocks(start: StartGateway) -> None:
    gateway = start(_keys("wait", "spent-for-a-second", 1))
    assert gateway.post().status_code == 200  # its answer: none left, back in 1 s
    started = time.monotonic()
    assert gateway.post(headers={MAX_WAIT_HEADER: "3"}).status_code == 200
    assert time.monotonic() - started > 0.5  # it waited for the key
    assert len(gateway.fake.requests) == 2
    # The header only shortens keysvc's wait, and is not sent upstream.
    assert gateway.post(headers={MAX_WAIT_HEADER: "soon"}).status_code == 400


def test_no_key_for_the_family_is_503(start: StartGateway) -> None:
    gateway = start(_keys("family", "valid", 1))
    # Keys not yet checked serve the default families; gpt-4-32k is not one of them.
    response = gateway.post({"model": "gpt-4-32k", "messages": []})
    assert response.status_code == 503
    error = response.json()["error"]
    assert error["code"] == "no_keys_available"
    assert "gpt4-32k" in error["message"]
    assert gateway.fake.received == 0
    gateway.assert_no_secret_leaked()


@pytest.mark.parametrize(
    "body", [{"messages": []}, {"model": ""}, {"model": 4}, "not an object", None]
)
def test_a_body_without_a_model_is_400(start: StartGateway, body: object) -> None:
    gateway = start(_keys("model", "valid", 1))
    response = (
        gateway.post(body)
        if body is not None
        else httpx.post(f"{gateway.envoy.base_url}/chat/completions", content=b"{", timeout=30)
    )
    assert response.status_code == 400
    assert response.json()["error"]["code"] == "missing_model"
    assert gateway.fake.received == 0


def test_an_unknown_model_is_400_naming_it_and_nothing_goes_out(start: StartGateway) -> None:
    gateway = start(_keys("unknown", "valid", 1))
    response = gateway.post({"model": "gtp-4o", "messages": []})
    assert response.status_code == 400
    assert response.headers["content-type"] == "application/json"
    error = response.json()["error"]
    assert (error["type"], error["code"]) == ("invalid_request_error", "unknown_model")
    assert "unknown model 'gtp-4o'" in error["message"]
    assert gateway.fake.received == 0
    gateway.assert_no_secret_leaked()


def test_keysvc_down_means_refused_and_nothing_goes_out_keyless(start: StartGateway) -> None:
    gateway = start(_keys("down", "valid", 1))
    gateway.keysvc.stop()
    responses = [gateway.post() for _ in range(3)]
    # failure_mode_allow: false, status_on_error 503.
    assert [r.status_code for r in responses] == [503] * 3
    assert gateway.fake.received == 0


def test_an_event_stream_arrives_chunk_by_chunk(start: StartGateway) -> None:
    scenarios = {"sk-stream-0000-valid": Scenario(stream_interval=0.3)}
    gateway = start(scenarios)
    arrivals: list[tuple[float, str]] = []
    with httpx.stream(
        "POST",
        f"{gateway.envoy.base_url}/chat/completions",
        json={**CHAT, "stream": True},
        timeout=30,
    ) as response:
        assert response.status_code == 200
        assert response.headers["content-type"] == "text/event-stream"
        for line in response.iter_lines():
            if line.startswith("data: "):
                arrivals.append((time.monotonic(), line.removeprefix("data: ")))
    assert arrivals[-1][1] == "[DONE]"
    words = [json.loads(data)["choices"][0]["delta"]["content"] for _, data in arrivals[:-1]]
    assert "".join(words) == "Hello from the fake upstream."
    # Five events 0.3 s apart: buffered, they would all arrive at once at the end.
    assert arrivals[-1][0] - arrivals[0][0] > 0.9
    # Usage of a stream is not read, but the answer still counts for the key.
    [key] = gateway.keys().values()
    assert key.prompt_count == 1
    gateway.assert_no_secret_leaked()


def test_with_auth_on_the_caller_needs_a_keysvc_token(start: StartGateway) -> None:
    gateway = start(
        _keys("auth", "valid", 1),
        {"KEYSVC_PROXY_TOKENS": PROXY_TOKEN, "KEYSVC_ADMIN_TOKENS": ADMIN_TOKEN},
    )
    for headers in ({}, {"authorization": "Bearer not-a-token"}, {"authorization": PROXY_TOKEN}):
        response = gateway.post(headers=headers)
        assert response.status_code == 401
        assert response.json()["error"]["code"] == "invalid_api_key"
    assert gateway.fake.received == 0
    response = gateway.post(headers={"authorization": f"Bearer {PROXY_TOKEN}"})
    assert response.status_code == 200
    [request] = gateway.fake.requests
    assert request.key in gateway.secrets  # the caller's token never goes upstream
    gateway.assert_no_secret_leaked()
    for log in (gateway.keysvc.log, gateway.envoy_log.read_text(errors="replace")):
        assert PROXY_TOKEN not in log and ADMIN_TOKEN not in log


async def test_grpc_health_reports_the_ext_proc_service() -> None:
    pool, _ = make_pool(["sk-health-0000-valid"])
    async with serving(pool) as server:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            request = health_pb2.HealthCheckRequest(service=EXT_PROC_SERVICE_NAME)
            reply = await stub.Check(request, timeout=10)
    assert reply.status == health_pb2.HealthCheckResponse.SERVING


@pytest.mark.parametrize("with_client_certificate", [True, False])
def test_envoy_reaches_keysvc_over_mutual_tls(
    start: StartGateway, tmp_path: Path, with_client_certificate: bool
) -> None:
    ca = TestCA("keysvc-test-ca")
    (tmp_path / "ca.crt").write_bytes(ca.cert_pem)
    server_cert, server_key = ca.issue("keysvc", server=True).write(tmp_path, "server")
    client_cert, client_key = ca.issue("envoy", server=False).write(tmp_path, "envoy")
    tls = (
        KeysvcTls(tmp_path / "ca.crt", client_cert, client_key)
        if with_client_certificate
        else KeysvcTls(tmp_path / "ca.crt")
    )
    env = {
        "KEYSVC_TLS_CERT": str(server_cert),
        "KEYSVC_TLS_KEY": str(server_key),
        "KEYSVC_TLS_CLIENT_CA": str(tmp_path / "ca.crt"),
    }
    gateway = start(_keys("tls", "valid", 1), env, tls)
    response = gateway.post()
    if with_client_certificate:
        assert response.status_code == 200
        assert [r.key for r in gateway.fake.requests] == gateway.secrets
    else:
        # keysvc refuses the handshake: the request fails closed, nothing goes out.
        assert response.status_code == 503
        assert gateway.fake.received == 0
