"""TLS and mutual TLS with certificates made at test time."""

from __future__ import annotations

from pathlib import Path

import grpc
import pytest

from keysvc.auth import AuthTokens
from keysvc.tls import TlsConfig
from keysvc.v1 import keysvc_pb2 as pb
from keysvc.v1 import keysvc_pb2_grpc
from tests.certs import Issued, TestCA
from tests.helpers import make_pool, serving
from tests.procs import ServerProcess, run_keysvc

SECRET = "sk-tls-test-0000000000000000000"


@pytest.fixture(scope="module")
def ca() -> TestCA:
    return TestCA("keysvc test CA")


@pytest.fixture(scope="module")
def server_cert(ca: TestCA) -> Issued:
    return ca.issue("keysvc", server=True)


def _tls(ca: TestCA, server_cert: Issued, tmp_path: Path, *, mutual: bool) -> TlsConfig:
    cert, key = server_cert.write(tmp_path, "server")
    client_ca = None
    if mutual:
        client_ca = tmp_path / "client-ca.crt"
        client_ca.write_bytes(ca.cert_pem)
    config = TlsConfig.from_files(cert=cert, key=key, client_ca=client_ca)
    assert config is not None
    return config


async def _available(port: int, credentials: grpc.ChannelCredentials, **kw: object) -> int:
    async with grpc.aio.secure_channel(f"localhost:{port}", credentials) as channel:
        stub = keysvc_pb2_grpc.KeyServiceStub(channel)
        reply = await stub.Available(pb.AvailableRequest(), timeout=5, **kw)  # type: ignore[arg-type]
        return reply.count


async def test_tls_works_and_plaintext_is_refused(
    ca: TestCA, server_cert: Issued, tmp_path: Path
) -> None:
    pool, _ = make_pool([SECRET])
    async with serving(pool, tls=_tls(ca, server_cert, tmp_path, mutual=False)) as server:
        creds = grpc.ssl_channel_credentials(root_certificates=ca.cert_pem)
        assert await _available(server.port, creds) == 1
        async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
            stub = keysvc_pb2_grpc.KeyServiceStub(channel)
            with pytest.raises(grpc.aio.AioRpcError) as exc:
                await stub.Available(pb.AvailableRequest(), timeout=5)
            assert exc.value.code() == grpc.StatusCode.UNAVAILABLE
        # A client that trusts another CA refuses the server.
        other = TestCA("other CA")
        with pytest.raises(grpc.aio.AioRpcError) as exc:
            await _available(server.port, grpc.ssl_channel_credentials(other.cert_pem))
        assert exc.value.code() == grpc.StatusCode.UNAVAILABLE


async def test_mtls_needs_a_client_cert_from_the_client_ca(
    ca: TestCA, server_cert: Issued, tmp_path: Path
) -> None:
    pool, _ = make_pool([SECRET])
    async with serving(pool, tls=_tls(ca, server_cert, tmp_path, mutual=True)) as server:
        good = ca.issue("proxy-1", server=False)
        creds = grpc.ssl_channel_credentials(ca.cert_pem, good.key_pem, good.cert_pem)
        assert await _available(server.port, creds) == 1

        # No client certificate: the handshake fails.
        with pytest.raises(grpc.aio.AioRpcError) as exc:
            await _available(server.port, grpc.ssl_channel_credentials(ca.cert_pem))
        assert exc.value.code() == grpc.StatusCode.UNAVAILABLE

        # A client certificate from another CA: refused as well.
        stranger = TestCA("stranger CA").issue("proxy-x", server=False)
        creds = grpc.ssl_channel_credentials(ca.cert_pem, stranger.key_pem, stranger.cert_pem)
        with pytest.raises(grpc.aio.AioRpcError) as exc:
            await _available(server.port, creds)
        assert exc.value.code() == grpc.StatusCode.UNAVAILABLE


async def test_mtls_and_tokens_together(ca: TestCA, server_cert: Issued, tmp_path: Path) -> None:
    pool, _ = make_pool([SECRET])
    tokens = AuthTokens(proxy=frozenset({"px-token"}))
    tls = _tls(ca, server_cert, tmp_path, mutual=True)
    async with serving(pool, tls=tls, tokens=tokens) as server:
        good = ca.issue("proxy-1", server=False)
        creds = grpc.ssl_channel_credentials(ca.cert_pem, good.key_pem, good.cert_pem)
        with pytest.raises(grpc.aio.AioRpcError) as exc:
            await _available(server.port, creds)
        assert exc.value.code() == grpc.StatusCode.UNAUTHENTICATED
        count = await _available(
            server.port, creds, metadata=(("authorization", "Bearer px-token"),)
        )
        assert count == 1


def test_server_process_with_mtls_from_env(ca: TestCA, server_cert: Issued, tmp_path: Path) -> None:
    cert, key = server_cert.write(tmp_path, "server")
    client_ca = tmp_path / "client-ca.crt"
    client_ca.write_bytes(ca.cert_pem)
    server = ServerProcess(
        {
            "OPENAI_KEY": SECRET,
            "KEYSVC_TLS_CERT": str(cert),
            "KEYSVC_TLS_KEY": str(key),
            "KEYSVC_TLS_CLIENT_CA": str(client_ca),
        }
    )
    try:
        port = server.wait_serving()
        server.wait_for_log("tls on.*client_certificates=required")
        good = ca.issue("proxy-1", server=False)
        creds = grpc.ssl_channel_credentials(ca.cert_pem, good.key_pem, good.cert_pem)
        with grpc.secure_channel(f"localhost:{port}", creds) as channel:
            stub = keysvc_pb2_grpc.KeyServiceStub(channel)
            assert stub.Available(pb.AvailableRequest(), timeout=5).count == 1
        with grpc.secure_channel(
            f"localhost:{port}", grpc.ssl_channel_credentials(ca.cert_pem)
        ) as channel:
            stub = keysvc_pb2_grpc.KeyServiceStub(channel)
            with pytest.raises(grpc.RpcError) as exc:
                stub.Available(pb.AvailableRequest(), timeout=5)
            assert exc.value.code() == grpc.StatusCode.UNAVAILABLE  # type: ignore[attr-defined]
    finally:
        server.stop()


def test_half_configured_tls_process_exits_2(tmp_path: Path) -> None:
    done = run_keysvc({"KEYSVC_TLS_CERT": str(tmp_path / "server.crt")})
    assert done.returncode == 2
    assert "KEYSVC_TLS_CERT is set but KEYSVC_TLS_KEY is not" in done.stderr
