"""Key state that survives restarts: a ``KeyStore`` backed by a SQLite database.

What is kept, one row per key hash (never a secret): disabled / revoked /
over-quota flags with the reason and time, model families and trial flag,
organization id (and, for an organization clone, its parent's hash), last use
and last check, and usage counters. Rate-limit locks are not kept: they last
seconds.

Only the rows of keys that changed are written, in one transaction, by a
worker thread of the store's own, so the event loop never waits on the disk
(the loop only copies the changed keys' fields, a few hundred at a time).
Ordinary changes are batched: at most one write per ``batch_seconds``.
``flush`` writes now; the server awaits it before acknowledging a Disable, so a
disabled key stays disabled whatever happens to the process afterwards. Every
transaction is committed with ``synchronous=FULL`` in WAL mode (the WAL is
fsynced at each commit): one fsync per batch or Disable, in the worker thread.
Checkpoints (the WAL copied into the database file, and that file fsynced) run
on a second thread and connection every few seconds, so a Disable's commit never
carries one.

A write that fails (disk full, read-only file system) leaves the change in
memory and the key marked to be written again; ``flush`` raises
``StateWriteFailed`` and listeners (metrics, health) hear of every attempt
until one succeeds.

State for a key that is not configured is kept and written back, but inert:
it applies again if the key returns. A file keysvc cannot read or understand
stops start-up (``StateFileError``) rather than being silently replaced. A
JSON state file from an earlier keysvc is read once and converted in place
(the JSON file is kept beside it as ``<name>.migrated-<time>``), and the
temporary files its writer could leave behind (``.<name>.<pid>.tmp``) are
removed at start.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import logging
import os
import re
import shutil
import sqlite3
import time
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Final

from .config import ConfigError
from .errors import StateWriteFailed
from .keys import DisableReason, Key, KeyProfile, hash_key
from .pool import HASH_PATTERN
from .store import MemoryKeyStore

__all__ = [
    "SCHEMA_VERSION",
    "CorruptStateFile",
    "STATE_VERSION",
    "SqliteStateStore",
    "StateFileError",
    "connect_database",
    "remove_stale_temporaries",
]

_log = logging.getLogger("keysvc.state")

#: The version of the JSON state files earlier keysvc versions wrote (read to migrate).
STATE_VERSION: Final = 1
#: ``PRAGMA user_version`` of the database this keysvc writes.
SCHEMA_VERSION: Final = 2
#: What each schema version adds to the one before (run in order on an older file).
_UPGRADES: Final = {
    # 2: when an over-quota key comes back on its own (a spend limit's named time).
    2: "ALTER TABLE keys ADD COLUMN over_quota_until REAL NOT NULL DEFAULT 0",
}
#: ``PRAGMA application_id`` marking a SQLite file as a keysvc state database ("ksvc").
APPLICATION_ID: Final = 0x6B737663
#: Ordinary changes reach the disk within this many seconds.
BATCH_SECONDS: Final = 1.0
#: Changed keys turned into rows per turn of the event loop; a row is ~10 µs.
SNAPSHOT_CHUNK: Final = 250
#: Seconds between checkpoints (the WAL's pages copied into the database file),
#: each started after a batch write on the checkpoint thread.
CHECKPOINT_SECONDS: Final = 5.0
#: WAL pages a PASSIVE checkpoint may leave behind (writes kept it from finishing)
#: before the next batch write truncates the WAL itself (~16 MB at 4 KiB a page).
WAL_PAGES_LIMIT: Final = 4_000

_SQLITE_MAGIC: Final = b"SQLite format 3\x00"

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
    "over_quota_until": (int, float),
}


class StateFileError(ConfigError):
    """The state file cannot be read or written, or is not a keysvc state file."""


class CorruptStateFile(StateFileError):
    """The state file is keysvc's (or claims to be) but its content is not valid."""


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
        "over_quota_until": key.over_quota_until,
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
    key.over_quota_until = float(record.get("over_quota_until", 0.0))


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


def _read_json_state(path: Path) -> dict[str, _Record]:
    """The records of a JSON state file (an earlier keysvc's); empty when it does not exist.

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
        raise _corrupt(path, str(exc)) from exc
    return keys


# -- the database ---------------------------------------------------------------

_COLUMNS: Final = (
    "hash",
    "organization_id",
    "parent",
    "families",
    "model_ids",
    "is_trial",
    "revive_if_alive",
    "is_disabled",
    "is_revoked",
    "is_over_quota",
    "disable_reason",
    "disabled_at",
    "last_used",
    "last_checked",
    "prompt_count",
    "token_usage",
    "over_quota_until",
)
_BOOLEANS: Final = ("is_trial", "revive_if_alive", "is_disabled", "is_revoked", "is_over_quota")
_JSON_COLUMNS: Final = ("families", "model_ids", "token_usage")

# Columns, not one JSON blob per row, so an operator can ask the file questions
# (``select hash from keys where is_disabled``). Lists and maps are JSON text.
_SCHEMA: Final = """
CREATE TABLE keys (
    hash            TEXT PRIMARY KEY NOT NULL,
    organization_id TEXT NOT NULL DEFAULT '',
    parent          TEXT,
    families        TEXT NOT NULL DEFAULT '[]',
    model_ids       TEXT,
    is_trial        INTEGER NOT NULL DEFAULT 0,
    revive_if_alive INTEGER NOT NULL DEFAULT 0,
    is_disabled     INTEGER NOT NULL DEFAULT 0,
    is_revoked      INTEGER NOT NULL DEFAULT 0,
    is_over_quota   INTEGER NOT NULL DEFAULT 0,
    disable_reason  TEXT,
    disabled_at     REAL NOT NULL DEFAULT 0,
    last_used       REAL NOT NULL DEFAULT 0,
    last_checked    REAL NOT NULL DEFAULT 0,
    prompt_count    INTEGER NOT NULL DEFAULT 0,
    token_usage     TEXT NOT NULL DEFAULT '{}',
    over_quota_until REAL NOT NULL DEFAULT 0
) WITHOUT ROWID
"""
# Rows go in as multi-row INSERTs of up to ``_ROWS_PER_STATEMENT`` rows, padded to
# a power of two (repeating the last row, which the upsert then writes twice) so a
# dozen prepared statements serve every batch size. Why not one row per statement:
# the sqlite3 module lets go of the GIL around each step of a statement, and the
# writer thread then waits up to the switch interval (5 ms) to get it back from a
# busy event loop, so a row per step made a 100-row write take tens of
# milliseconds. (Rows as one JSON array through json_each, tried too, cost SQLite
# ~70 µs a row in JSON parsing.) An upsert, not INSERT OR REPLACE: columns a later
# keysvc adds survive an older one's writes.
_ROWS_PER_STATEMENT: Final = 1024  # 17 columns: 17,408 parameters (SQLite allows 32,766)
_ON_CONFLICT: Final = " ON CONFLICT(hash) DO UPDATE SET " + ", ".join(
    f"{c} = excluded.{c}" for c in _COLUMNS[1:]
)
_SELECT: Final = f"SELECT {', '.join(_COLUMNS)} FROM keys"

_Row = tuple[Any, ...]


@functools.cache
def _upsert_sql(rows: int) -> str:
    """An INSERT of ``rows`` rows that updates the rows already there."""
    values = "(" + ", ".join("?" for _ in _COLUMNS) + ")"
    return (
        f"INSERT INTO keys ({', '.join(_COLUMNS)}) VALUES "
        + ", ".join(values for _ in range(rows))
        + _ON_CONFLICT
    )


def _to_row(key_hash: str, record: _Record) -> _Row:
    """The row of ``record``, in ``_COLUMNS`` order (lists and maps as JSON text)."""
    model_ids = record.get("model_ids")
    return (
        key_hash,
        record.get("organization_id", ""),
        record.get("parent") or None,
        json.dumps(record.get("families", [])),
        None if model_ids is None else json.dumps(model_ids),
        *(int(bool(record.get(name, False))) for name in _BOOLEANS),
        record.get("disable_reason"),
        float(record.get("disabled_at", 0.0)),
        float(record.get("last_used", 0.0)),
        float(record.get("last_checked", 0.0)),
        int(record.get("prompt_count", 0)),
        json.dumps(record.get("token_usage", {}), sort_keys=True),
        float(record.get("over_quota_until", 0.0)),
    )


def _upsert(connection: sqlite3.Connection, rows: list[_Row]) -> None:
    """Writes ``rows`` in one transaction: one statement when they fit in one."""
    chunks = [
        rows[at : at + _ROWS_PER_STATEMENT] for at in range(0, len(rows), _ROWS_PER_STATEMENT)
    ]
    if len(chunks) == 1:
        _insert(connection, chunks[0])  # a statement outside BEGIN is its own transaction
        return
    connection.execute("BEGIN IMMEDIATE")
    try:
        for chunk in chunks:
            _insert(connection, chunk)
        connection.execute("COMMIT")
    except BaseException:
        if connection.in_transaction:
            with contextlib.suppress(sqlite3.Error):
                connection.execute("ROLLBACK")
        raise


def _insert(connection: sqlite3.Connection, chunk: list[_Row]) -> None:
    size = 1 << (len(chunk) - 1).bit_length()
    padded = chunk + [chunk[-1]] * (size - len(chunk))
    connection.execute(_upsert_sql(size), [value for row in padded for value in row])


def _from_row(row: _Row) -> tuple[str, _Record]:
    """The record of a row, checked as a JSON file's record was.

    Raises:
        ValueError: a value is not one keysvc writes.
    """
    values = dict(zip(_COLUMNS, row, strict=True))
    key_hash = values.pop("hash")
    if values["parent"] is None:
        del values["parent"]
    for name in _BOOLEANS:
        if values[name] not in (0, 1) or isinstance(values[name], float):
            raise ValueError(f"key {key_hash}: field {name!r} is not 0 or 1")
        values[name] = bool(values[name])
    for name in _JSON_COLUMNS:
        if values[name] is not None:
            if not isinstance(values[name], str):
                raise ValueError(f"key {key_hash}: field {name!r} is not JSON text")
            values[name] = json.loads(values[name])
    _check_record(key_hash, values)
    return key_hash, values


def connect_database(path: Path) -> sqlite3.Connection:
    """A connection to the database at ``path``, in autocommit mode (keysvc says BEGIN).

    The store uses it from its one writer thread after start-up, hence
    ``check_same_thread=False``.
    """
    return sqlite3.connect(path, isolation_level=None, check_same_thread=False)


def _prepare(connection: sqlite3.Connection, path: Path) -> None:
    """Makes a new database keysvc's, or checks an existing one is; WAL, synchronous=FULL.

    Raises:
        StateFileError: the file is another program's database, or a newer keysvc's.
        sqlite3.Error: the file cannot be read or written.
    """
    application_id = connection.execute("PRAGMA application_id").fetchone()[0]
    version = connection.execute("PRAGMA user_version").fetchone()[0]
    tables = connection.execute("SELECT count(*) FROM sqlite_schema").fetchone()[0]
    if application_id == 0 and tables == 0:
        connection.execute("BEGIN IMMEDIATE")
        _create_schema(connection)
        connection.execute("COMMIT")
    elif application_id != APPLICATION_ID:
        raise StateFileError(
            f"KEYSVC_STATE_FILE: {path} is a SQLite database but not a keysvc state file;"
            " keysvc will not write into it"
        )
    elif version > SCHEMA_VERSION:
        raise StateFileError(
            f"KEYSVC_STATE_FILE: {path} was written by a newer keysvc (schema {version},"
            f" this one knows {SCHEMA_VERSION}); keysvc will not start over it"
        )
    elif version < SCHEMA_VERSION:
        connection.execute("BEGIN IMMEDIATE")
        for upgrade in range(version + 1, SCHEMA_VERSION + 1):
            connection.execute(_UPGRADES[upgrade])
        connection.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
        connection.execute("COMMIT")
        _log.info(
            "upgraded the state file's schema",
            extra={"path": str(path), "from": version, "to": SCHEMA_VERSION},
        )
    mode = connection.execute("PRAGMA journal_mode = WAL").fetchone()[0]
    if str(mode).lower() != "wal":
        raise sqlite3.OperationalError(f"cannot use WAL mode (journal mode is {mode})")
    # Every commit is fsynced: a Disable must survive a power loss, not only a crash.
    connection.execute("PRAGMA synchronous = FULL")
    # No checkpoint inside a commit: SQLite's automatic one runs in the commit that
    # crosses 1,000 WAL pages, mostly a Disable's (20 a second against one batch),
    # which then also waits for the database file's writes and fsync. The store
    # checkpoints on a thread of its own instead (``SqliteStateStore``).
    connection.execute("PRAGMA wal_autocheckpoint = 0")


def _read_rows(connection: sqlite3.Connection, path: Path) -> dict[str, _Record]:
    saved: dict[str, _Record] = {}
    try:
        for row in connection.execute(_SELECT):
            key_hash, record = _from_row(row)
            saved[key_hash] = record
    except (ValueError, UnicodeDecodeError) as exc:
        raise _corrupt(path, str(exc)) from exc
    return saved


def _corrupt(path: Path, problem: str) -> CorruptStateFile:
    return CorruptStateFile(
        f"KEYSVC_STATE_FILE: {path} is corrupt ({problem}). keysvc will not start over it:"
        " fix or restore the file, or start with --ignore-state to move it aside"
        " and begin with empty state (disabled keys would be handed out again"
        " until checked)"
    )


def _cannot_write(path: Path, exc: BaseException) -> StateFileError:
    problem = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
    return StateFileError(f"KEYSVC_STATE_FILE: cannot write {path}: {problem}")


def _head(path: Path) -> bytes | None:
    """The file's first bytes, or None when it does not exist.

    Raises:
        StateFileError: it exists but cannot be read.
    """
    try:
        with path.open("rb") as file:
            return file.read(len(_SQLITE_MAGIC))
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise StateFileError(
            f"KEYSVC_STATE_FILE: cannot read {path}: {exc.strerror or exc}"
        ) from exc


def _sidecars(path: Path) -> list[Path]:
    """SQLite's own files beside the database (write-ahead log, shared memory)."""
    return [path.with_name(path.name + suffix) for suffix in ("-wal", "-shm", "-journal")]


def _temporary(path: Path) -> Path:
    return path.with_name(f".{path.name}.{os.getpid()}.tmp")


def remove_stale_temporaries(path: Path) -> list[Path]:
    """Removes ``.<name>.<pid>.tmp`` files beside ``path`` and returns them.

    The JSON state file's writer (and a migration) writes such a file and
    renames it over the state file; a kill -9 in between left it behind for
    good. One keysvc per state file, so at start none is anyone's.
    """
    pattern = re.compile(rf"\.{re.escape(path.name)}\.\d+\.tmp")
    removed: list[Path] = []
    try:
        candidates = list(path.parent.iterdir())
    except OSError:
        return removed  # a missing directory is reported when the database is opened
    for candidate in candidates:
        if pattern.fullmatch(candidate.name):
            with contextlib.suppress(FileNotFoundError):
                candidate.unlink()
                removed.append(candidate)
    if removed:
        _log.info(
            "removed temporary state files left by an earlier process",
            extra={"files": ",".join(p.name for p in removed)},
        )
    return removed


def _create_private(path: Path) -> None:
    """Creates ``path`` empty with mode 0600 if it does not exist (SQLite's own files,
    -wal and -shm, take the database file's mode)."""
    os.close(os.open(path, os.O_WRONLY | os.O_CREAT, 0o600))


def _fsync_directory(path: Path) -> None:
    dir_fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def _migrate_json(path: Path, connect: Callable[[Path], sqlite3.Connection]) -> int:
    """Converts the JSON state file at ``path`` into a database at the same path.

    The database is built beside it and renamed over it, so a crash at any
    point leaves either the JSON file (converted again at the next start) or
    the whole database. The JSON file stays, under another name, as a backup
    keysvc never reads again.

    Returns:
        The number of keys converted.

    Raises:
        StateFileError: the JSON file is corrupt, or the database cannot be written.
    """
    records = _read_json_state(path)
    tmp = _temporary(path)
    backup = path.with_name(f"{path.name}.migrated-{int(time.time())}")
    try:
        tmp.unlink(missing_ok=True)
        _create_private(tmp)
        connection = connect(tmp)
        try:
            # No journal: a crash leaves a temporary file that the next start removes.
            connection.execute("PRAGMA journal_mode = OFF")
            _create_schema(connection)
            _upsert(connection, [_to_row(h, r) for h, r in records.items()])
        finally:
            connection.close()
        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        try:
            os.link(path, backup)
        except OSError:  # a file system without hard links
            shutil.copyfile(path, backup)
        os.replace(tmp, path)
        _fsync_directory(path.parent)
    except (OSError, sqlite3.Error) as exc:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise _cannot_write(path, exc) from exc
    _log.warning(
        "converted the JSON state file to SQLite; the JSON file is kept as a backup"
        " and not read again",
        extra={"path": str(path), "keys": len(records), "backup": str(backup)},
    )
    return len(records)


def _create_schema(connection: sqlite3.Connection) -> None:
    connection.execute(_SCHEMA)
    connection.execute(f"PRAGMA application_id = {APPLICATION_ID}")
    connection.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")


def _open_database(
    path: Path, connect: Callable[[Path], sqlite3.Connection]
) -> tuple[sqlite3.Connection, dict[str, _Record]]:
    """Opens (creating, or converting from JSON, as needed) the database and reads it.

    Raises:
        StateFileError: it cannot be read or written, or is not keysvc's.
    """
    head = _head(path)
    if head and head != _SQLITE_MAGIC:
        _migrate_json(path, connect)
    elif head is None:
        try:
            _create_private(path)
        except OSError as exc:
            raise _cannot_write(path, exc) from exc
    try:
        connection = connect(path)
    except sqlite3.Error as exc:
        raise _cannot_write(path, exc) from exc
    try:
        _prepare(connection, path)
        return connection, _read_rows(connection, path)
    except sqlite3.DatabaseError as exc:
        connection.close()
        if isinstance(exc, sqlite3.OperationalError):
            raise _cannot_write(path, exc) from exc
        raise _corrupt(path, str(exc)) from exc
    except BaseException:
        connection.close()
        raise


def _move_aside(path: Path) -> Path:
    aside = path.with_name(f"{path.name}.corrupt-{int(time.time())}")
    try:
        path.rename(aside)
        for sidecar in _sidecars(path):
            if sidecar.exists():
                sidecar.rename(aside.with_name(aside.name + sidecar.name[len(path.name) :]))
    except OSError as exc:
        raise StateFileError(
            f"KEYSVC_STATE_FILE: {path} is unusable and cannot be moved aside:"
            f" {exc.strerror or exc}"
        ) from exc
    return aside


# -- the store --------------------------------------------------------------------

#: Told the outcome of every write attempt: True written, False failed.
WriteListener = Callable[[bool], None]


class SqliteStateStore:
    """Keys in memory, their state mirrored to a SQLite database, one row per key hash."""

    def __init__(
        self,
        connection: sqlite3.Connection,
        *,
        path: Path,
        saved: dict[str, _Record] | None = None,
        batch_seconds: float = BATCH_SECONDS,
        checkpoint_seconds: float = CHECKPOINT_SECONDS,
        connect: Callable[[Path], sqlite3.Connection] = connect_database,
    ) -> None:
        """A store writing through ``connection`` (to ``path``), starting from ``saved``.

        Use ``open``, which reads ``saved`` from the database first. The store
        owns the connection from now on and uses it only from its writer thread;
        ``connect`` opens the checkpoint thread's own connection.
        """
        self._connection = connection
        self._path = path
        self._batch_seconds = batch_seconds
        self._checkpoint_seconds = checkpoint_seconds
        self._connect = connect
        self._checkpointer = ThreadPoolExecutor(
            max_workers=1, thread_name_prefix="keysvc-checkpoint"
        )
        self._checkpoint_connection: sqlite3.Connection | None = None
        self._checkpointing: asyncio.Future[int] | None = None
        self._last_checkpoint = time.monotonic()
        #: WAL pages the last checkpoint could not copy (writes went on meanwhile).
        self._wal_behind = 0
        self._keys = MemoryKeyStore()
        #: Records of keys not in memory: not configured (yet), or removed.
        self._saved: dict[str, _Record] = dict(saved or {})
        self._dirty: set[str] = set()
        self._version = 0
        self._written = -1
        self._lock = asyncio.Lock()
        self._wakeup = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        # One thread: SQLite sees one writer, and writes stay in order.
        self._writer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="keysvc-state")

        self._listeners: list[WriteListener] = []
        self._failing = False

    @classmethod
    def open(
        cls,
        path: Path,
        *,
        ignore_corrupt: bool = False,
        batch_seconds: float = BATCH_SECONDS,
        checkpoint_seconds: float = CHECKPOINT_SECONDS,
        connect: Callable[[Path], sqlite3.Connection] = connect_database,
    ) -> SqliteStateStore:
        """Opens the database at ``path`` (missing is fine: first start).

        A JSON state file at ``path`` is converted first; stale temporary files
        beside it are removed.

        Raises:
            StateFileError: the file is unreadable, unwritable or corrupt and
                ``ignore_corrupt`` is false. With it, a corrupt file is renamed
                to ``<name>.corrupt-<time>`` and the store starts empty.
        """
        remove_stale_temporaries(path)
        try:
            connection, saved = _open_database(path, connect)
        except StateFileError as exc:
            if not ignore_corrupt or not isinstance(exc, CorruptStateFile):
                raise
            aside = _move_aside(path)
            _log.error(
                "IGNORING THE STATE FILE: starting with empty state; keys disabled before"
                " will be handed out again until checked",
                extra={"problem": str(exc), "moved_to": str(aside)},
            )
            connection, saved = _open_database(path, connect)
        _log.info("state file read", extra={"path": str(path), "keys": len(saved)})
        return cls(
            connection,
            path=path,
            saved=saved,
            batch_seconds=batch_seconds,
            checkpoint_seconds=checkpoint_seconds,
            connect=connect,
        )

    # -- KeyStore ----------------------------------------------------------------

    def get(self, key_hash: str) -> Key | None:
        return self._keys.get(key_hash)

    def add(self, key: Key) -> None:
        """Stores ``key``, first giving it the saved state of its hash, if any."""
        record = self._saved.get(key.hash)
        if record is not None:
            _apply(record, key)
        self._keys.add(key)
        if record is None:
            self.changed(key)
        else:
            del self._saved[key.hash]

    def remove(self, key_hash: str) -> None:
        key = self._keys.get(key_hash)
        if key is not None:
            # Keep its state, inert, in case the key comes back; written as it is now.
            self._saved[key_hash] = _record(key)
            self._dirty.add(key_hash)
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
            StateWriteFailed: the database cannot be written; the changes stay
                in memory and are written by the next write that succeeds.
        """
        target = self._version
        async with self._lock:
            if self._written >= target:
                return
            version = self._version
            batch, self._dirty = self._dirty, set()
            try:
                rows = await self._snapshot(batch)
                loop = asyncio.get_running_loop()
                await loop.run_in_executor(self._writer, self._write, rows)
            except (sqlite3.Error, OSError) as exc:
                self._dirty |= batch
                problem = str(exc) or type(exc).__name__
                self._report(ok=False, problem=problem)
                raise StateWriteFailed(problem) from exc
            except BaseException:
                self._dirty |= batch  # cancelled: written next time (perhaps twice)
                raise
            self._written = version
            self._report(ok=True)

    # -- health ---------------------------------------------------------------------

    @property
    def write_failing(self) -> bool:
        """Whether the last write failed (until one succeeds)."""
        return self._failing

    def add_listener(self, listener: WriteListener) -> None:
        """Calls ``listener`` on the event loop after every write attempt."""
        self._listeners.append(listener)

    # -- lifecycle ----------------------------------------------------------------

    def saved_clones(self) -> list[tuple[str, str]]:
        """(parent hash, organization id) of every organization clone in the state
        and not in memory."""
        return [
            (record["parent"], record.get("organization_id", ""))
            for record in self._saved.values()
            if record.get("parent")
        ]

    def start(self) -> None:
        """Starts writing batched changes in the background (on the running loop)."""
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._batch_writes())

    async def close(self) -> None:
        """Stops the background writer, writes what is left and closes the database."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        try:
            await self.flush()
        except StateWriteFailed:
            _log.error(
                "stopping with changes the state file does not have",
                extra={"path": str(self._path)},
            )
        finally:
            loop = asyncio.get_running_loop()
            await loop.run_in_executor(self._checkpointer, self._close_checkpointer)
            self._checkpointer.shutdown()
            # The last connection to close checkpoints the write-ahead log and removes it.
            await loop.run_in_executor(self._writer, self._connection.close)
            self._writer.shutdown()

    # -- internals ----------------------------------------------------------------

    def _bump(self) -> None:
        self._version += 1
        self._wakeup.set()

    async def _snapshot(self, batch: Iterable[str]) -> list[_Row]:
        """The rows of ``batch`` as they are now, made on the loop (the pool's state is
        the loop's alone), yielding to other work every ``SNAPSHOT_CHUNK`` keys."""
        rows: list[_Row] = []
        for count, key_hash in enumerate(batch, start=1):
            key = self._keys.get(key_hash)
            record = _record(key) if key is not None else self._saved.get(key_hash)
            if record is not None:
                rows.append(_to_row(key_hash, record))
            if count % SNAPSHOT_CHUNK == 0:
                await asyncio.sleep(0)
        return rows

    def _write(self, rows: list[_Row]) -> None:
        """One transaction with every row (in the writer thread)."""
        _upsert(self._connection, rows)

    def _truncate_wal(self) -> None:
        """A checkpoint that waits for nothing else to write and empties the WAL (in
        the writer thread, so no commit of ours runs meanwhile)."""
        self._connection.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()

    def _checkpoint(self) -> int:
        """Copies what it can of the WAL into the database file without holding up
        writes (in the checkpoint thread); returns the WAL pages left behind."""
        if self._checkpoint_connection is None:
            self._checkpoint_connection = self._connect(self._path)
            # Its checkpoints fsync the WAL before copying and the database after.
            self._checkpoint_connection.execute("PRAGMA synchronous = FULL")
        _, wal_pages, copied = self._checkpoint_connection.execute(
            "PRAGMA wal_checkpoint(PASSIVE)"
        ).fetchone()
        return max(0, int(wal_pages) - int(copied))

    def _close_checkpointer(self) -> None:
        if self._checkpoint_connection is not None:
            self._checkpoint_connection.close()
            self._checkpoint_connection = None

    async def _after_batch(self) -> None:
        """After a batch write: a checkpoint on its own thread when one is due, or,
        when checkpoints kept falling behind, the WAL truncated by the writer."""
        if self._checkpointing is not None:
            return
        loop = asyncio.get_running_loop()
        if self._wal_behind > WAL_PAGES_LIMIT:
            try:
                async with self._lock:
                    await loop.run_in_executor(self._writer, self._truncate_wal)
                self._wal_behind = 0
            except sqlite3.Error as exc:
                _log.warning("cannot truncate the state file's WAL", extra={"problem": str(exc)})
            return
        if time.monotonic() - self._last_checkpoint < self._checkpoint_seconds:
            return
        self._last_checkpoint = time.monotonic()
        self._checkpointing = loop.run_in_executor(self._checkpointer, self._checkpoint)
        self._checkpointing.add_done_callback(self._checkpointed)

    def _checkpointed(self, done: asyncio.Future[int]) -> None:
        self._checkpointing = None
        if done.cancelled():
            return
        exc = done.exception()
        if exc is not None:
            # The WAL still has every commit: nothing is lost, the file only grows.
            _log.warning("state file checkpoint failed", extra={"problem": str(exc)})
            return
        self._wal_behind = done.result()

    def _report(self, *, ok: bool, problem: str = "") -> None:
        if not ok:
            _log.error(
                "cannot write the state file; the changes are in memory and the write is retried",
                extra={"path": str(self._path), "problem": problem},
            )
        elif self._failing:
            _log.warning("state file written again", extra={"path": str(self._path)})
        self._failing = not ok
        for listener in self._listeners:
            listener(ok)

    async def _batch_writes(self) -> None:
        while True:
            await self._wakeup.wait()
            await asyncio.sleep(self._batch_seconds)
            self._wakeup.clear()
            try:
                await self.flush()
            except StateWriteFailed:
                self._wakeup.set()  # logged and counted; retried after the next pause
            else:
                await self._after_batch()
