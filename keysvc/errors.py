"""The errors keysvc raises, each carrying the gRPC status it maps to.

The pool and everything below it raise these; ``keysvc.server`` maps them to a
gRPC status with a ``google.rpc.ErrorInfo`` detail in one place. Codes are
spelled as ``grpc.StatusCode`` member names so this module needs no grpc import.

Exception tree::

    KeysvcError                 INTERNAL            INTERNAL
    ├── InvalidArgument         INVALID_ARGUMENT    INVALID_ARGUMENT
    ├── KeyNotFound             NOT_FOUND           KEY_NOT_FOUND
    ├── NoKeysForFamily         FAILED_PRECONDITION NO_KEYS_FOR_FAMILY
    └── FamilyDisallowed        PERMISSION_DENIED   FAMILY_DISALLOWED
"""

from __future__ import annotations

__all__ = [
    "ERROR_DOMAIN",
    "FamilyDisallowed",
    "InvalidArgument",
    "KeyNotFound",
    "KeysvcError",
    "NoKeysForFamily",
]

#: The ``domain`` of every ErrorInfo keysvc sends.
ERROR_DOMAIN = "keysvc"


class KeysvcError(Exception):
    """Base of keysvc's own errors.

    Attributes:
        code: the ``grpc.StatusCode`` member name the error maps to.
        reason: the ErrorInfo reason, UPPER_SNAKE, stable for clients to branch on.
        metadata: extra ErrorInfo metadata (never a secret).
    """

    code = "INTERNAL"
    reason = "INTERNAL"

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
