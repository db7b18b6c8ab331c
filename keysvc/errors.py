"""The errors keysvc raises, each carrying the gRPC status it maps to.

The pool and everything below it raise these; ``keysvc.server`` maps them to a
gRPC status with a ``google.rpc.ErrorInfo`` detail in one place. Codes are
spelled as ``grpc.StatusCode`` member names so this module needs no grpc import.

Exception tree::

    KeysvcError                 INTERNAL            INTERNAL
    ├── InvalidArgument         INVALID_ARGUMENT    INVALID_ARGUMENT
    │   └── UnknownModel        INVALID_ARGUMENT    UNKNOWN_MODEL
    ├── KeyNotFound             NOT_FOUND           KEY_NOT_FOUND
    ├── NoKeysForFamily         FAILED_PRECONDITION NO_KEYS_FOR_FAMILY
    ├── FamilyDisallowed        PERMISSION_DENIED   FAMILY_DISALLOWED
    ├── Unauthenticated         UNAUTHENTICATED     MISSING_TOKEN or BAD_TOKEN
    ├── RoleDenied              PERMISSION_DENIED   ROLE_DENIED
    ├── ShuttingDown            UNAVAILABLE         SHUTTING_DOWN
    ├── StateWriteFailed        UNAVAILABLE         STATE_WRITE_FAILED
    ├── StoreUnavailable        UNAVAILABLE         STORE_UNAVAILABLE
    ├── Overloaded              RESOURCE_EXHAUSTED  OVERLOADED
    └── KeysBusy                RESOURCE_EXHAUSTED  KEYS_BUSY
"""

from __future__ import annotations

__all__ = [
    "ERROR_DOMAIN",
    "FamilyDisallowed",
    "InvalidArgument",
    "KeyNotFound",
    "KeysBusy",
    "KeysvcError",
    "NoKeysForFamily",
    "Overloaded",
    "RoleDenied",
    "ShuttingDown",
    "StateWriteFailed",
    "StoreUnavailable",
    "Unauthenticated",
    "UnknownModel",
]

#: The ``domain`` of every ErrorInfo keysvc sends.
ERROR_DOMAIN = "keysvc"


class KeysvcError(Exception):
    """Base of keysvc's own errors.

    Attributes:
        code: the ``grpc.StatusCode`` member name the error maps to.
        reason: the ErrorInfo reason, UPPER_SNAKE, stable for clients to branch on.
        metadata: extra ErrorInfo metadata (never a secret).
        retry_delay: seconds after which the call may succeed (a google.rpc.RetryInfo
            detail), or None.
    """

    code = "INTERNAL"
    reason = "INTERNAL"
    retry_delay: float | None = None

    def __init__(self, message: str, *, metadata: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.metadata: dict[str, str] = dict(metadata or {})


class InvalidArgument(KeysvcError):
    """A request field is empty, malformed or out of range."""

    code = "INVALID_ARGUMENT"
    reason = "INVALID_ARGUMENT"

    def __init__(self, field: str, problem: str) -> None:
        super().__init__(f"{field}: {problem}", metadata={"field": field})
        self.field = field


class UnknownModel(InvalidArgument):
    """No row of the model table matches the model, and the operator's rule for
    unknown models (KEYSVC_UNKNOWN_MODELS) is to refuse them."""

    reason = "UNKNOWN_MODEL"

    def __init__(self, model: str) -> None:
        super().__init__(
            "model",
            f"unknown model {model!r}: no row of the model table matches it (add one with"
            " KEYSVC_MODEL_FAMILIES_FILE, or give unknown models a family with"
            " KEYSVC_UNKNOWN_MODELS)",
        )
        self.metadata["model"] = model
        self.model = model


class KeyNotFound(KeysvcError):
    """No key in the pool has the given hash."""

    code = "NOT_FOUND"
    reason = "KEY_NOT_FOUND"

    def __init__(self, key_hash: str) -> None:
        super().__init__(f"no key with hash {key_hash!r}", metadata={"hash": key_hash})


class NoKeysForFamily(KeysvcError):
    """No key could serve the model's family: none loaded, all disabled, none with access."""

    code = "FAILED_PRECONDITION"
    reason = "NO_KEYS_FOR_FAMILY"

    def __init__(self, family: str, model: str) -> None:
        super().__init__(
            f"no active keys available for {family} models (model {model!r})",
            metadata={"family": family, "model": model},
        )
        self.family = family


class FamilyDisallowed(KeysvcError):
    """The operator has disallowed the model's family (ALLOWED_MODEL_FAMILIES)."""

    code = "PERMISSION_DENIED"
    reason = "FAMILY_DISALLOWED"

    def __init__(self, family: str, model: str) -> None:
        super().__init__(
            f"the operator has disabled access to {family} models (model {model!r})",
            metadata={"family": family, "model": model},
        )
        self.family = family


class Unauthenticated(KeysvcError):
    """The call carries no bearer token, or one keysvc does not know.

    The reason is ``MISSING_TOKEN`` or ``BAD_TOKEN``; the message never repeats
    what the caller sent.
    """

    code = "UNAUTHENTICATED"

    def __init__(self, *, missing: bool) -> None:
        if missing:
            message = "missing credentials: send metadata 'authorization: Bearer <token>'"
        else:
            message = "invalid credentials: the bearer token is not known"
        super().__init__(message)
        self.reason = "MISSING_TOKEN" if missing else "BAD_TOKEN"


class RoleDenied(KeysvcError):
    """The token is valid but its role may not call the method."""

    code = "PERMISSION_DENIED"
    reason = "ROLE_DENIED"

    def __init__(self, method: str, role: str, required: str) -> None:
        super().__init__(
            f"the {role} role may not call {method}; it needs the {required} role",
            metadata={"method": method, "role": role, "required_role": required},
        )


class ShuttingDown(KeysvcError):
    """The server is draining: it finishes the calls it has and takes no new ones."""

    code = "UNAVAILABLE"
    reason = "SHUTTING_DOWN"

    def __init__(self) -> None:
        super().__init__("keysvc is shutting down; retry on another instance")


class StateWriteFailed(KeysvcError):
    """The change was made in memory but the state file could not be written.

    The change holds for this process and is written by the next write that
    succeeds (keysvc retries every second); it is lost if the process stops
    before then, so the caller is told the change is not durable yet.
    """

    code = "UNAVAILABLE"
    reason = "STATE_WRITE_FAILED"

    def __init__(self, problem: str) -> None:
        super().__init__(
            "the change is made in memory but could not be written to the state file"
            f" ({problem}); keysvc keeps retrying, and the change is lost if it stops"
            " before a write succeeds"
        )
        self.problem = problem


class StoreUnavailable(KeysvcError):
    """The shared pool's store (Redis) did not answer in time, or not at all.

    The call may or may not have been applied there (a script runs whole or not
    at all); nothing was answered from a local view instead.
    """

    code = "UNAVAILABLE"
    reason = "STORE_UNAVAILABLE"

    def __init__(self, problem: str) -> None:
        super().__init__(f"the shared pool's store is unavailable ({problem}); retry later")
        self.problem = problem


class Overloaded(KeysvcError):
    """The server's in-flight limit is reached; this call was refused before it started.

    Nothing was done for it, so a client may retry it as it is, after a backoff.
    """

    code = "RESOURCE_EXHAUSTED"
    reason = "OVERLOADED"

    def __init__(self, limit: int, setting: str = "KEYSVC_MAX_IN_FLIGHT") -> None:
        super().__init__(
            f"keysvc is overloaded: its limit of {limit} calls in flight ({setting}) is"
            " reached; nothing was done, retry after a backoff",
            metadata={"limit": str(limit), "setting": setting},
        )


class KeysBusy(KeysvcError):
    """Get with max_wait: every key for the model stayed locked for the whole wait.

    Nothing was handed out. ``retry_delay`` is the time until the first key is
    expected to unlock (GetLockoutPeriod's answer at that moment).
    """

    code = "RESOURCE_EXHAUSTED"
    reason = "KEYS_BUSY"
    retry_delay: float

    def __init__(self, family: str, model: str, retry_delay: float) -> None:
        super().__init__(
            f"every key for {family} models (model {model!r}) stayed locked for the whole"
            f" max_wait; the first is expected to unlock in {retry_delay:.3f} s",
            metadata={"family": family, "model": model, "retry_after": f"{retry_delay:.3f}s"},
        )
        self.family = family
        self.model = model
        self.retry_delay = retry_delay
