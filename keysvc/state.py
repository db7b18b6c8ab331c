"""Key state that survives restarts: a ``KeyStore`` backed by a JSON state file.

What is kept, per key hash (never a secret): disabled / revoked / over-quota
flags with the reason and time, model families and trial flag, organization id
(and, for an organization clone, its parent's hash), last use and last check,
and usage counters. Rate-limit locks are not kept: they last seconds.

Writes are atomic (temporary file, fsync, rename, fsync of the directory) and
run in a worker thread, so the event loop never blocks on the disk. Ordinary
changes are batched: at most one write per ``batch_seconds``. ``flush`` writes
now; the server awaits it before acknowledging a Disable, so a disabled key
stays disabled whatever happens to the process afterwards.

State for a key that is not configured is kept and written back, but inert:
it applies again if the key returns. A file keysvc cannot read or understand
stops start-up (``StateFileError``) rather than being silently replaced.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Final

from .config import ConfigError
from .keys import DisableReason, Key, KeyProfile, hash_key
from .pool import HASH_PATTERN
from .store import MemoryKeyStore

__all__ = ["STATE_VERSION", "FileStateStore", "StateFileError"]

_log = logging.getLogger("keysvc.state")

STATE_VERSION: Final = 1
#: Ordinary changes reach the disk within this many seconds.
BATCH_SECONDS: Final = 1.0

_Record = dict[str, Any]

# field → the JSON types it may hold; anything else means the file is not ours.
_FIELD_TYPES: Final[dict[str, tuple[type, ...]]] = {
    "organization_id": (str,),
    "parent": (str,),
    "families": (list,),
    "model_ids": (list, type(None)),
    "is_trial": (bool,),
    "revive_if_alive": (bool,),
    "is_disabled": (bool,),
    "is_revoked": (bool,),
    "is_over_quota": (bool,),
    "disable_reason": (str, type(None)),
    "disabled_at": (int, float),
    "last_used": (int, float),
    "last_checked": (int, float),
    "prompt_count": (int,),
    "token_usage": (dict,),
}


class StateFileError(ConfigError):
    """The state file cannot be read or is not a keysvc state file."""


def _record(key: Key) -> _Record:
    record: _Record = {
        "organization_id": key.organization_id,
        "families": sorted(key.model_families),
        "model_ids": None if key.model_ids is None else sorted(key.model_ids),
        "is_trial": key.is_trial,
        "revive_if_alive": key.revive_if_alive,
        "is_disabled": key.is_disabled,
        "is_revoked": key.is_revoked,
        "is_over_quota": key.is_over_quota,
        "disable_reason": key.disable_reason.value if key.disable_reason else None,
        "disabled_at": key.disabled_at,
        "last_used": key.last_used,
        "last_checked": key.last_checked,
        "prompt_count": key.prompt_count,
        "token_usage": dict(key.token_usage),
    }
    parent = hash_key(key.secret)
    if parent != key.hash:
        # An organization clone: its secret is the parent's, so only the
        # parent's hash is kept and the clone is rebuilt from the parent.
        record["parent"] = parent
    return record


def _apply(record: _Record, key: Key) -> None:
    key.organization_id = record.get("organization_id", key.organization_id)
    families = record.get("families")
    if families:
        model_ids = record.get("model_ids")
        key.profile = KeyProfile(
            frozenset(families),
            bool(record.get("is_trial", False)),
            None if model_ids is None else frozenset(model_ids),
        )
    key.revive_if_alive = record.get("revive_if_alive", False)
    key.is_disabled = record.get("is_disabled", False)
    key.is_revoked = record.get("is_revoked", False)
    key.is_over_quota = record.get("is_over_quota", False)
    reason = record.get("disable_reason")
    key.disable_reason = DisableReason(reason) if reason else None
    key.disabled_at = float(record.get("disabled_at", 0.0))
    key.last_used = float(record.get("last_used", 0.0))
    key.last_checked = float(record.get("last_checked", 0.0))
    key.prompt_count = record.get("prompt_count", 0)
    key.token_usage = dict(record.get("token_usage", {}))


def _check_record(key_hash: str, record: Any) -> None:
    if not isinstance(key_hash, str) or not HASH_PATTERN.fullmatch(key_hash):
        raise ValueError("a key entry is not named by a key hash")
    if not isinstance(record, dict):
        raise ValueError(f"key {key_hash}: entry is not an object")
    for name, value in record.items():
        types = _FIELD_TYPES.get(name)
        if types is None:
            continue  # a field a later version added; kept as it is
        if not isinstance(value, types) or (bool in types) != isinstance(value, bool):
            raise ValueError(f"key {key_hash}: field {name!r} has the wrong type")
    if not all(isinstance(f, str) for f in record.get("families", [])):
        raise ValueError(f"key {key_hash}: families must be strings")
    if not all(isinstance(m, str) for m in record.get("model_ids") or []):
        raise ValueError(f"key {key_hash}: model_ids must be strings")
    usage = record.get("token_usage", {})
    if not all(isinstance(k, str) and type(v) is int and v >= 0 for k, v in usage.items()):
        raise ValueError(f"key {key_hash}: token_usage must map families to counts >= 0")
    if record.get("prompt_count", 0) < 0:
        raise ValueError(f"key {key_hash}: prompt_count is negative")
    reason = record.get("disable_reason")
    if reason is not None:
        DisableReason(reason)  # ValueError for an unknown reason


def read_state_file(path: Path) -> dict[str, _Record]:
    """The records of a state file; empty when the file does not exist yet.

    Raises:
        StateFileError: the file exists but cannot be read or understood.
    """
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return {}
    except OSError as exc:
        raise StateFileError(
            f"KEYSVC_STATE_FILE: cannot read {path}: {exc.strerror or exc}"
        ) from exc
    try:
        doc = json.loads(data)
        if not isinstance(doc, dict) or doc.get("version") != STATE_VERSION:
            raise ValueError(f"not a version {STATE_VERSION} keysvc state file")
        keys = doc.get("keys")
        if not isinstance(keys, dict):
            raise ValueError("no 'keys' object")
        for key_hash, record in keys.items():
            _check_record(key_hash, record)
    except (ValueError, UnicodeDecodeError) as exc:
        raise StateFileError(
            f"KEYSVC_STATE_FILE: {path} is corrupt ({exc}). keysvc will not start over it:"
            " fix or restore the file, or start with --ignore-state to move it aside"
            " and begin with empty state (disabled keys would be handed out again"
            " until checked)"
        ) from exc
    return keys


def _atomic_write(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)
    # The rename itself is durable only once the directory is synced.
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


class FileStateStore:
    """Keys in memory, their state mirrored to a JSON file keyed by hash."""

    def __init__(
        self,
        path: Path,
        *,
        saved: dict[str, _Record] | None = None,
        batch_seconds: float = BATCH_SECONDS,
    ) -> None:
        """A store writing to ``path``, starting from ``saved`` records.

        Use ``open`` to read them from ``path`` first.
        """
        self._path = path
        self._batch_seconds = batch_seconds
        self._keys = MemoryKeyStore()
        self._records: dict[str, _Record] = dict(saved or {})
        self._dirty: set[str] = set()
        self._version = 0
        self._written = -1
        self._lock = asyncio.Lock()
        self._wakeup = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    @classmethod
    def open(cls, path: Path, *, ignore_corrupt: bool = False) -> FileStateStore:
        """Reads ``path`` (missing is fine: first start).

        Raises:
            StateFileError: the file is unreadable or corrupt and
                ``ignore_corrupt`` is false. With it, a corrupt file is renamed
                to ``<name>.corrupt-<time>`` and the store starts empty.
        """
        try:
            saved = read_state_file(path)
        except StateFileError as exc:
            if not ignore_corrupt or not path.exists():
                raise
            aside = path.with_name(f"{path.name}.corrupt-{int(time.time())}")
            try:
                path.rename(aside)
            except OSError as move_exc:
                raise StateFileError(
                    f"KEYSVC_STATE_FILE: {path} is unusable and cannot be moved aside:"
                    f" {move_exc.strerror or move_exc}"
                ) from move_exc
            _log.error(
                "IGNORING THE STATE FILE: starting with empty state; keys disabled before"
                " will be handed out again until checked",
                extra={"problem": str(exc), "moved_to": str(aside)},
            )
            saved = {}
        _log.info("state file read", extra={"path": str(path), "keys": len(saved)})
        return cls(path, saved=saved)

    # -- KeyStore ----------------------------------------------------------------

    def get(self, key_hash: str) -> Key | None:
        return self._keys.get(key_hash)

    def add(self, key: Key) -> None:
        """Stores ``key``, first giving it the saved state of its hash, if any."""
        record = self._records.get(key.hash)
        if record is not None:
            _apply(record, key)
        self._keys.add(key)
        if record is None:
            self.changed(key)

    def remove(self, key_hash: str) -> None:
        key = self._keys.get(key_hash)
        if key is not None:
            # Keep its state, inert, in case the key comes back.
            self._records[key_hash] = _record(key)
            self._dirty.discard(key_hash)
            self._bump()
        self._keys.remove(key_hash)

    def __iter__(self) -> Iterator[Key]:
        return iter(self._keys)

    def __len__(self) -> int:
        return len(self._keys)

    def changed(self, key: Key) -> None:
        self._dirty.add(key.hash)
        self._bump()

    async def flush(self) -> None:
        """Writes every change so far, unless a write that began after them has finished.

        Concurrent callers share writes: whoever waits on the lock behind a
        write that already covers their change returns without writing again.

        Raises:
            OSError: the file cannot be written.
        """
        target = self._version
        async with self._lock:
            if self._written >= target:
                return
            version = self._version
            for key_hash in self._dirty:
                key = self._keys.get(key_hash)
                if key is not None:
                    self._records[key_hash] = _record(key)
            self._dirty.clear()
            # Records are replaced, never mutated, so a shallow copy is a snapshot.
            snapshot = {"version": STATE_VERSION, "keys": dict(self._records)}
            data = await asyncio.to_thread(_encode, snapshot)
            await asyncio.to_thread(_atomic_write, self._path, data)
            self._written = version

    # -- lifecycle ----------------------------------------------------------------

    def saved_clones(self) -> list[tuple[str, str]]:
        """(parent hash, organization id) of every organization clone in the state."""
        return [
            (record["parent"], record.get("organization_id", ""))
            for record in self._records.values()
            if record.get("parent")
        ]

    def start(self) -> None:
        """Starts writing batched changes in the background (on the running loop)."""
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._batch_writes())

    async def close(self) -> None:
        """Stops the background writer and writes what is left."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        await self.flush()

    def _bump(self) -> None:
        self._version += 1
        self._wakeup.set()

    async def _batch_writes(self) -> None:
        while True:
            await self._wakeup.wait()
            await asyncio.sleep(self._batch_seconds)
            self._wakeup.clear()
            try:
                await self.flush()
            except OSError as exc:
                _log.error(
                    "cannot write the state file; will retry",
                    extra={"path": str(self._path), "problem": exc.strerror or str(exc)},
                )
                self._wakeup.set()


def _encode(doc: dict[str, Any]) -> bytes:
    return json.dumps(doc, separators=(",", ":"), sort_keys=True).encode()
