"""``keysvc status``: a running server's keys by family and state, as terminal tables.

It asks the server over gRPC: ``List`` for the keys, page by page (a page is a
few hundred KB, far below gRPC's 4 MiB receive limit, which one message of a
large pool's keys outgrew), then ``GetLockoutPeriod`` once per family (with a
model name of that family from ``PROBE_MODELS``), and prints the same summary
as the status page. Whether a key is locked is judged
from its ``rate_limited_until`` against this machine's clock.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import time
from pathlib import Path

import grpc

from .status import PROBE_MODELS, FamilySummary, KeyState, render_text, summarize
from .v1 import keysvc_pb2 as pb
from .v1 import keysvc_pb2_grpc as pb_grpc

__all__ = ["DEFAULT_TARGET", "add_status_arguments", "fetch_status", "run_status"]

DEFAULT_TARGET = "127.0.0.1:50051"


def add_status_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--target",
        help=f"server address host:port (env KEYSVC_TARGET, default {DEFAULT_TARGET})",
    )
    parser.add_argument(
        "--tls-ca",
        type=Path,
        help="PEM file of the CA that signed the server's certificate; connects with TLS "
        "when given (env KEYSVC_TLS_CA)",
    )
    parser.add_argument(
        "--token",
        help="bearer token sent as 'authorization: Bearer <token>' (env KEYSVC_TOKEN; "
        "prefer the variable: flags show up in process listings)",
    )
    parser.add_argument(
        "--timeout", type=float, default=10.0, help="seconds to wait for each call (default 10)"
    )


def key_state_from_proto(key: pb.Key, now: float) -> KeyState:
    until = key.rate_limited_until.seconds + key.rate_limited_until.nanos / 1e9
    return KeyState(
        hash=key.hash,
        families=frozenset(key.model_families),
        is_trial=key.is_trial,
        is_disabled=key.is_disabled,
        is_revoked=key.is_revoked,
        is_over_quota=key.is_over_quota,
        locked=now < until,
        prompt_count=key.prompt_count,
        token_usage=dict(key.token_usage),
        provider=key.service,
    )


async def fetch_status(
    target: str,
    *,
    root_certificates: bytes | None = None,
    token: str | None = None,
    timeout: float = 10.0,
) -> tuple[list[FamilySummary], list[KeyState]]:
    """The server's summary and keys.

    Raises:
        grpc.aio.AioRpcError: a call failed (unreachable, unauthenticated, ...).
    """
    if root_certificates is not None:
        channel = grpc.aio.secure_channel(
            target, grpc.ssl_channel_credentials(root_certificates=root_certificates)
        )
    else:
        channel = grpc.aio.insecure_channel(target)
    metadata = (("authorization", f"Bearer {token}"),) if token else None
    async with channel:
        stub = pb_grpc.KeyServiceStub(channel)
        keys: list[KeyState] = []
        token = ""
        while True:
            page = await stub.List(
                pb.ListRequest(page_token=token), metadata=metadata, timeout=timeout
            )
            now = time.time()
            keys.extend(key_state_from_proto(key, now) for key in page.keys)
            token = page.next_page_token
            if not token:
                break
        families = sorted({f for k in keys for f in (*k.families, *k.token_usage)})
        probed = [f for f in families if f in PROBE_MODELS]
        answers = await asyncio.gather(
            *(
                stub.GetLockoutPeriod(
                    pb.GetLockoutPeriodRequest(model=PROBE_MODELS[f]),
                    metadata=metadata,
                    timeout=timeout,
                )
                for f in probed
            )
        )
    lockouts = {
        family: answer.lockout.seconds + answer.lockout.nanos / 1e9
        for family, answer in zip(probed, answers, strict=True)
    }
    return summarize(keys, lockouts.get), keys


def run_status(args: argparse.Namespace) -> int:
    """Prints the summary; returns the exit code (1 when the server cannot be asked)."""
    target = args.target or os.environ.get("KEYSVC_TARGET") or DEFAULT_TARGET
    token = args.token or os.environ.get("KEYSVC_TOKEN") or None
    ca_path = args.tls_ca or (
        Path(os.environ["KEYSVC_TLS_CA"]) if os.environ.get("KEYSVC_TLS_CA") else None
    )
    root_certificates = None
    if ca_path is not None:
        try:
            root_certificates = ca_path.read_bytes()
        except OSError as exc:
            print(f"keysvc status: cannot read {ca_path}: {exc.strerror}", file=sys.stderr)
            return 2
    try:
        summaries, keys = asyncio.run(
            fetch_status(
                target, root_certificates=root_certificates, token=token, timeout=args.timeout
            )
        )
    except grpc.aio.AioRpcError as error:
        print(f"keysvc status: {target}: {error.code().name}: {error.details()}", file=sys.stderr)
        return 1
    sys.stdout.write(f"keysvc at {target}: {len(keys)} keys\n\n")
    sys.stdout.write(render_text(summaries, keys))
    return 0
