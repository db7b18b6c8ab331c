"""keysvc: a gRPC key allocation service for fleets of LLM proxies."""

from __future__ import annotations

from .clock import Clock, ManualClock, SystemClock
from .config import Settings
from .errors import (
    FamilyDisallowed,
    InvalidArgument,
    KeyNotFound,
    KeysvcError,
    NoKeysForFamily,
)
from .keys import DisableReason, Key, KeyProfile, hash_key
from .models import ModelRule, ModelTable
from .pool import KeyPool
from .store import KeyStore, MemoryKeyStore

__version__ = "0.1.0"

__all__ = [
    "Clock",
    "DisableReason",
    "FamilyDisallowed",
    "InvalidArgument",
    "Key",
    "KeyNotFound",
    "KeyPool",
    "KeyProfile",
    "KeyStore",
    "KeysvcError",
    "ManualClock",
    "MemoryKeyStore",
    "ModelRule",
    "ModelTable",
    "NoKeysForFamily",
    "Settings",
    "SystemClock",
    "__version__",
    "hash_key",
]
