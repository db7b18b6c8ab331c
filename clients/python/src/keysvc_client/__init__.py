"""Clients for keysvc.v1.KeyService: ``KeysvcClient`` (blocking) and ``AsyncKeysvcClient``.

::

    with KeysvcClient("127.0.0.1:50051") as keys:
        lease = keys.get("gpt-4o")          # lease.secret, lease.key.hash
        keys.update_rate_limits(lease.key.hash, upstream_response.headers)

Every failed call raises ``KeysvcRpcError`` with ``.code`` (grpc.StatusCode) and
``.reason`` (the ErrorInfo reason, e.g. ``"KEY_NOT_FOUND"``).
"""

from __future__ import annotations

from keysvc.v1.keysvc_pb2 import (
    DISABLE_REASON_MANUAL,
    DISABLE_REASON_QUOTA,
    DISABLE_REASON_REVOKED,
    DISABLE_REASON_UNSPECIFIED,
    KEY_STATE_ACTIVE,
    KEY_STATE_AVAILABLE,
    KEY_STATE_DISABLED,
    KEY_STATE_LOCKED,
    KEY_STATE_UNSPECIFIED,
    OUTCOME_ACTION_DONE,
    OUTCOME_ACTION_RETRY_WITH_ANOTHER_KEY,
    OUTCOME_ACTION_RETURN_ERROR,
    DisableReason,
    GetResponse,
    Key,
    KeyState,
    ListResponse,
    OutcomeAction,
    ReportOutcomeResponse,
)

from ._client import AsyncKeysvcClient, KeysvcClient
from ._errors import KeysvcRpcError
from ._options import DEFAULT_TARGET, DEFAULT_TIMEOUT, TLSConfig

__all__ = [
    "DEFAULT_TARGET",
    "DEFAULT_TIMEOUT",
    "DISABLE_REASON_MANUAL",
    "DISABLE_REASON_QUOTA",
    "DISABLE_REASON_REVOKED",
    "DISABLE_REASON_UNSPECIFIED",
    "KEY_STATE_ACTIVE",
    "KEY_STATE_AVAILABLE",
    "KEY_STATE_DISABLED",
    "KEY_STATE_LOCKED",
    "KEY_STATE_UNSPECIFIED",
    "OUTCOME_ACTION_DONE",
    "OUTCOME_ACTION_RETRY_WITH_ANOTHER_KEY",
    "OUTCOME_ACTION_RETURN_ERROR",
    "AsyncKeysvcClient",
    "DisableReason",
    "GetResponse",
    "Key",
    "KeysvcClient",
    "KeyState",
    "KeysvcRpcError",
    "ListResponse",
    "OutcomeAction",
    "ReportOutcomeResponse",
    "TLSConfig",
]
