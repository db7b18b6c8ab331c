"""The state file (SQLite): what is kept, how it is written, how bad files are refused,
how a JSON state file of an earlier keysvc is converted."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import sqlite3
import threading
from pathlib import Path
from typing import Any

import pytest

from keysvc import state as state_module
from keysvc.clock import ManualClock
from keysvc.errors import StateWriteFailed
from keysvc.keys import DisableReason, hash_key
from keysvc.models import GPT4_32K, ModelTable
from keysvc.pool import KeyPool
from keysvc.state import SCHEMA_VERSION, SqliteStateStore, StateFileError, connect_database

A, B, C = "sk-state-aaaaaaaaaaaaaaaaaaaa", "sk-state-bbbbbbbbbbbbbbbbbbbb", "sk-state-cccccccccccc"


def _rows(path: Path) -> dict[str, dict[str, Any]]:
    """The rows of the database at ``path``, read by a connection of the test's own."""
    connection = sqlite3.connect(path)
    connection.row_factory = sqlite3.Row
    try:
        return {row["hash"]: dict(row) for row in connection.execute("SELECT * FROM keys")}
    finally:
        connection.close()


def _files(path: Path) -> list[Path]:
    """The database and SQLite's files beside it (write-ahead log, shared memory)."""
    return [p for p in path.parent.iterdir() if p.name.startswith(path.name)]


def _pool(path: Path, secrets: list[str], clock: ManualClock | None = None) -> KeyPool:
    store = SqliteStateStore.open(path)
    pool = KeyPool(store=store, models=ModelTable(), clock=clock or ManualClock())
    for secret in secrets:
        pool.add_key(secret)
    pool.restore_clones()
    return pool


async def test_state_survives_a_new_pool(tmp_path: Path) -> None:
    path = tmp_path / "state.db"
    pool = _pool(path, [A, B])
    pool.disable(hash_key(A), DisableReason.QUOTA)
    pool.increment_usage(hash_key(B), "gpt-4o", 120)
    pool.increment_usage(hash_key(B), "gpt-3.5-turbo", 7)
    key_b = pool.key(hash_key(B))
    key_b.last_checked = 1_700_000_123.0
    await pool.flush()

    again = _pool(path, [A, B])
    a, b = again.key(hash_key(A)), again.key(hash_key(B))
    assert a.is_disabled and a.is_over_quota and a.disable_reason is DisableReason.QUOTA
    assert a.disabled_at == 1_700_000_000.0
    assert b.token_usage == {"gpt4o": 120, "turbo": 7} and b.prompt_count == 2
    assert b.last_checked == 1_700_000_123.0
    assert again.available() == 1
    for _ in range(5):
        assert again.get("gpt-4o").hash == hash_key(B)


async def test_no_secret_in_the_file_and_it_is_private(tmp_path: Path) -> None:
    path = tmp_path / "state.db"
    pool = _pool(path, [A, B])
    pool.disable(hash_key(A), DisableReason.REVOKED)
    await pool.flush()
    files = _files(path)
    assert {p.name for p in files} >= {"state.db", "state.db-wal"}
    for file in files:
        content = file.read_bytes()
        assert A.encode() not in content and B.encode() not in content
        assert b"sk-" not in content
        assert file.stat().st_mode & 0o077 == 0, file.name
    assert _rows(path)[hash_key(A)]["is_revoked"] == 1
    assert not list(tmp_path.glob(".*tmp"))


async def test_families_trial_and_org_clones_are_kept(tmp_path: Path) -> None:
    path = tmp_path / "state.db"
    pool = _pool(path, [A])
    store = pool._store
    key = pool.key(hash_key(A))
    # What a key checker learns: families (32k included), trial flag, org.
    key.profile = type(key.profile)(
        frozenset({"turbo", GPT4_32K}), is_trial=True, model_ids=frozenset({"gpt-4-32k"})
    )
    key.organization_id = "org-default"
    key.revive_if_alive = True
    store.changed(key)
    clone = pool.clone_for_org(key.hash, "org-second")
    assert clone is not None
    pool.increment_usage(clone.hash, "gpt-4o", 9)
    await pool.flush()
    assert all(A.encode() not in file.read_bytes() for file in _files(path))

    again = _pool(path, [A])
    restored = again.key(hash_key(A))
    assert restored.model_families == {"turbo", GPT4_32K} and restored.is_trial
    assert restored.model_ids == {"gpt-4-32k"}
    assert restored.organization_id == "org-default"
    assert restored.revive_if_alive
    restored_clone = again.key(hash_key(A, "org-second"))
    assert restored_clone.secret == A and restored_clone.organization_id == "org-second"
    assert restored_clone.cloned_from == restored.hash
    assert restored_clone.token_usage == {"gpt4o": 9}
    assert len(again) == 2


async def test_state_of_unconfigured_keys_is_kept_but_inert(tmp_path: Path) -> None:
    path = tmp_path / "state.db"
    pool = _pool(path, [A, B])
    pool.disable(hash_key(A), DisableReason.REVOKED)
    await pool.flush()

    without_a = _pool(path, [B])
    assert [k.hash for k in without_a.keys()] == [hash_key(B)]
    await without_a.flush()
    assert _rows(path)[hash_key(A)]["is_disabled"] == 1

    with_a_again = _pool(path, [A, B, C])
    assert with_a_again.key(hash_key(A)).is_disabled
    assert not with_a_again.key(hash_key(C)).is_disabled


@pytest.mark.parametrize(
    "content",
    [
        b"{not json",
        b"[]",
        b'{"version": 99, "keys": {}}',
        b'{"version": 1}',
        b'{"version": 1, "keys": {"not-a-hash": {}}}',
        b'{"version": 1, "keys": {"oai-0123abcd": {"is_disabled": "yes"}}}',
        b'{"version": 1, "keys": {"oai-0123abcd": {"prompt_count": true}}}',
        b'{"version": 1, "keys": {"oai-0123abcd": {"token_usage": {"gpt4": -1}}}}',
        b'{"version": 1, "keys": {"oai-0123abcd": {"disable_reason": "bored"}}}',
        b"\xff\xfe",
    ],
)
def test_corrupt_file_refuses_to_start(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "state.db"
    path.write_bytes(content)
    with pytest.raises(StateFileError, match="is corrupt.*--ignore-state"):
        SqliteStateStore.open(path)
    assert path.read_bytes() == content  # never silently reset


def test_ignore_state_moves_the_corrupt_file_aside(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "state.db"
    path.write_bytes(b"{broken")
    store = SqliteStateStore.open(path, ignore_corrupt=True)
    assert len(store) == 0
    assert _rows(path) == {}  # a new, empty database in its place
    (aside,) = tmp_path.glob("state.db.corrupt-*")
    assert aside.read_bytes() == b"{broken"
    assert any(
        r.levelname == "ERROR" and "IGNORING THE STATE FILE" in r.getMessage()
        for r in caplog.records
    )


def test_unreadable_file_refuses_to_start(tmp_path: Path) -> None:
    path = tmp_path / "state.db"
    path.mkdir()  # a directory cannot be read as a file, even by root
    with pytest.raises(StateFileError, match="cannot read"):
        SqliteStateStore.open(path)


async def test_batched_writes_and_shared_flushes(tmp_path: Path) -> None:
    path = tmp_path / "state.db"
    store = SqliteStateStore.open(path, batch_seconds=0.05)
    pool = KeyPool(store=store, models=ModelTable(), clock=ManualClock())
    pool.add_key(A)
    store.start()
    try:
        pool.increment_usage(hash_key(A), "gpt-4o", 3)
        assert _rows(path) == {}  # not written at once...
        for _ in range(100):  # ...but within the batch window
            if _rows(path):
                break
            await asyncio.sleep(0.02)
        assert json.loads(_rows(path)[hash_key(A)]["token_usage"]) == {"gpt4o": 3}
    finally:
        await store.close()


async def test_removed_key_state_is_kept_for_its_return(tmp_path: Path) -> None:
    path = tmp_path / "state.db"
    pool = _pool(path, [A, B])
    pool.increment_usage(hash_key(A), "gpt-4o", 11)
    removed = pool.remove_key(hash_key(A))
    assert removed is not None and len(pool) == 1 and pool.available() == 1
    back = pool.add_key(A)
    assert back is not None and back.token_usage == {"gpt4o": 11}


async def test_only_changed_rows_are_written(tmp_path: Path) -> None:
    path = tmp_path / "state.db"
    pool = _pool(path, [A, B])
    await pool.flush()
    # Behind the store's back: a row the store must not rewrite unless B changes.
    with sqlite3.connect(path) as other:
        other.execute("UPDATE keys SET prompt_count = 999 WHERE hash = ?", (hash_key(B),))
    other.close()
    pool.increment_usage(hash_key(A), "gpt-4o", 5)
    await pool.flush()
    rows = _rows(path)
    assert rows[hash_key(A)]["prompt_count"] == 1
    assert rows[hash_key(B)]["prompt_count"] == 999
    pool.increment_usage(hash_key(B), "gpt-4o", 5)
    await pool.flush()
    assert _rows(path)[hash_key(B)]["prompt_count"] == 1


async def test_writes_run_in_a_worker_thread_in_one_durable_transaction(tmp_path: Path) -> None:
    path = tmp_path / "state.db"
    seen: list[tuple[int, str]] = []
    connections: list[sqlite3.Connection] = []

    def connect(at: Path) -> sqlite3.Connection:
        connection = connect_database(at)
        connection.set_trace_callback(lambda sql: seen.append((threading.get_ident(), sql)))
        connections.append(connection)
        return connection

    store = SqliteStateStore.open(path, connect=connect)
    pool = KeyPool(store=store, models=ModelTable(), clock=ManualClock())
    for secret in (A, B, C):
        pool.add_key(secret)
    seen.clear()
    await pool.flush()
    statements = [sql.split()[0] for _, sql in seen]
    assert statements == ["INSERT"]  # one statement: one transaction
    assert all(hash_key(s) in seen[0][1] for s in (A, B, C))
    assert {thread for thread, _ in seen} != {threading.get_ident()}
    (connection,) = connections
    assert connection.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert connection.execute("PRAGMA synchronous").fetchone()[0] == 2  # FULL
    await store.close()


def _main_file_rows(path: Path, scratch: Path) -> int:
    """Rows in the database file alone, as if its WAL were lost: what checkpoints copied."""
    shutil.copyfile(path, scratch)
    with contextlib.closing(sqlite3.connect(scratch)) as copy:
        return int(copy.execute("SELECT count(*) FROM keys").fetchone()[0])


async def test_commits_carry_no_checkpoint_and_batches_checkpoint_on_their_own_thread(
    tmp_path: Path,
) -> None:
    path = tmp_path / "state.db"
    seen: list[tuple[int, str]] = []

    def connect(at: Path) -> sqlite3.Connection:
        connection = connect_database(at)
        connection.set_trace_callback(lambda sql: seen.append((threading.get_ident(), sql)))
        return connection

    store = SqliteStateStore.open(path, connect=connect, batch_seconds=0.01, checkpoint_seconds=0)
    pool = KeyPool(store=store, models=ModelTable(), clock=ManualClock())
    for n in range(20_000):  # ~1,500 pages of WAL: SQLite's own checkpoint comes at 1,000
        pool.add_key(f"sk-checkpoint-{n:05d}")
    await pool.flush()  # as a Disable does
    assert _main_file_rows(path, tmp_path / "copy.db") == 0  # all in the WAL still
    (writer,) = {thread for thread, sql in seen if sql.startswith("INSERT")}
    store.start()
    try:
        pool.increment_usage(hash_key("sk-checkpoint-00000"), "gpt-4o", 1)
        for _ in range(200):
            if any("wal_checkpoint" in sql for _, sql in seen):
                break
            await asyncio.sleep(0.02)
        while store._checkpointing is not None:  # noqa: SLF001 - let it finish
            await asyncio.sleep(0.01)
        assert _main_file_rows(path, tmp_path / "copy2.db") == 20_000
        checkpointers = {thread for thread, sql in seen if "wal_checkpoint" in sql}
        assert checkpointers and writer not in checkpointers
        assert threading.get_ident() not in checkpointers
    finally:
        await store.close()
    assert _rows(path)[hash_key("sk-checkpoint-00000")]["prompt_count"] == 1


async def test_the_writer_empties_the_wal_when_checkpoints_fall_behind(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "state.db"
    store = SqliteStateStore.open(path, batch_seconds=0.01, checkpoint_seconds=3600)
    pool = KeyPool(store=store, models=ModelTable(), clock=ManualClock())
    for n in range(2_000):
        pool.add_key(f"sk-truncate-{n:05d}")
    await pool.flush()
    wal = path.with_name(path.name + "-wal")
    assert wal.stat().st_size > 0
    monkeypatch.setattr(state_module, "WAL_PAGES_LIMIT", 10)
    store._wal_behind = 11  # noqa: SLF001 - as a PASSIVE checkpoint that fell behind reports
    store.start()
    try:
        pool.increment_usage(hash_key("sk-truncate-00000"), "gpt-4o", 1)
        for _ in range(200):
            if wal.stat().st_size == 0:
                break
            await asyncio.sleep(0.02)
        assert wal.stat().st_size == 0  # TRUNCATE: every page copied, the log emptied
        assert _main_file_rows(path, tmp_path / "copy.db") == 2_000
    finally:
        await store.close()


async def test_a_failed_write_keeps_the_change_and_is_retried(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "state.db"
    connections: list[sqlite3.Connection] = []

    def connect(at: Path) -> sqlite3.Connection:
        connections.append(connect_database(at))
        return connections[-1]

    store = SqliteStateStore.open(path, connect=connect, batch_seconds=0.02)
    outcomes: list[bool] = []
    store.add_listener(outcomes.append)
    pool = KeyPool(store=store, models=ModelTable(), clock=ManualClock())
    pool.add_key(A)
    pool.add_key(B)
    await pool.flush()
    store.start()
    (connection,) = connections
    # SQLite itself refuses the writes, as it does on a read-only file system.
    connection.execute("PRAGMA query_only = ON")
    pool.disable(hash_key(A), DisableReason.REVOKED)
    with pytest.raises(StateWriteFailed) as caught:
        await pool.flush()
    assert caught.value.code == "UNAVAILABLE" and caught.value.reason == "STATE_WRITE_FAILED"
    assert "in memory" in caught.value.message and "readonly" in caught.value.message
    assert store.write_failing and outcomes[-1] is False
    assert pool.key(hash_key(A)).is_disabled and pool.available() == 1  # in memory
    assert _rows(path)[hash_key(A)]["is_disabled"] == 0
    await asyncio.sleep(0.2)  # the batch writer retries, and fails, and says so each time
    failures = [r for r in caplog.records if "cannot write the state file" in r.getMessage()]
    assert len(failures) == outcomes.count(False) >= 3
    assert all(r.levelname == "ERROR" for r in failures)

    connection.execute("PRAGMA query_only = OFF")
    for _ in range(100):
        if not store.write_failing:
            break
        await asyncio.sleep(0.02)
    assert not store.write_failing and outcomes[-1] is True
    assert _rows(path)[hash_key(A)]["is_disabled"] == 1  # the change was kept and written
    await store.close()


def _json_state(records: dict[str, dict[str, Any]]) -> bytes:
    return json.dumps({"version": 1, "keys": records}).encode()


async def test_a_json_state_file_is_converted_once_and_kept_as_a_backup(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "state.json"
    clone_hash = hash_key(A, "org-second")
    old = _json_state(
        {
            hash_key(A): {
                "families": ["gpt4", "gpt4o", "turbo"],
                "is_disabled": True,
                "is_revoked": True,
                "disable_reason": "revoked",
                "disabled_at": 1_700_000_000.5,
                "organization_id": "org-default",
            },
            hash_key(B): {"prompt_count": 4, "token_usage": {"gpt4o": 40}, "last_used": 12.0},
            clone_hash: {"parent": hash_key(A), "organization_id": "org-second"},
            hash_key(C): {"is_disabled": True, "disable_reason": "manual"},  # not configured
        }
    )
    path.write_bytes(old)
    pool = _pool(path, [A, B])
    assert path.read_bytes().startswith(b"SQLite format 3\x00")
    (backup,) = tmp_path.glob("state.json.migrated-*")
    assert backup.read_bytes() == old
    assert any("converted the JSON state file" in r.getMessage() for r in caplog.records)
    a, b = pool.key(hash_key(A)), pool.key(hash_key(B))
    assert a.is_disabled and a.is_revoked and a.disable_reason is DisableReason.REVOKED
    assert a.disabled_at == 1_700_000_000.5 and a.organization_id == "org-default"
    assert b.prompt_count == 4 and b.token_usage == {"gpt4o": 40} and b.last_used == 12.0
    assert pool.key(clone_hash).organization_id == "org-second"
    assert set(_rows(path)) == {hash_key(A), hash_key(B), clone_hash, hash_key(C)}
    assert not list(tmp_path.glob(".*tmp"))

    pool.increment_usage(hash_key(B), "gpt-4o", 2)
    await pool.flush()
    again = _pool(path, [A, B, C])  # read from the database; the backup is not read again
    assert again.key(hash_key(B)).prompt_count == 5
    assert again.key(hash_key(C)).is_disabled
    assert len(list(tmp_path.glob("state.json.migrated-*"))) == 1


def test_stale_temporary_files_are_removed_at_start(tmp_path: Path) -> None:
    path = tmp_path / "state.json"
    path.write_bytes(_json_state({hash_key(A): {"is_disabled": True}}))
    stale = [tmp_path / ".state.json.4242.tmp", tmp_path / f".state.json.{os.getpid()}.tmp"]
    for file in stale:
        file.write_bytes(b'{"version": 1, "keys": {' * 1000)  # a write cut short
    others = [tmp_path / ".other.json.7.tmp", tmp_path / ".state.json.x.tmp"]
    for file in others:
        file.write_bytes(b"not keysvc's")
    store = SqliteStateStore.open(path)
    assert not any(file.exists() for file in stale)
    assert all(file.exists() for file in others)
    assert hash_key(A) in _rows(path)
    assert len(store) == 0


@pytest.mark.parametrize(
    "spoil",
    [
        "UPDATE keys SET is_disabled = 3",
        "UPDATE keys SET disable_reason = 'bored'",
        "UPDATE keys SET token_usage = '{\"gpt4\": -1}'",
        "UPDATE keys SET families = 'not json'",
        "UPDATE keys SET hash = 'not-a-hash'",
    ],
)
async def test_a_corrupt_row_refuses_to_start(tmp_path: Path, spoil: str) -> None:
    path = tmp_path / "state.db"
    await _pool(path, [A]).flush()
    with sqlite3.connect(path) as other:
        other.execute(spoil)
    other.close()
    with pytest.raises(StateFileError, match="is corrupt.*--ignore-state"):
        SqliteStateStore.open(path)


def test_a_damaged_or_foreign_database_refuses_to_start(tmp_path: Path) -> None:
    damaged = tmp_path / "damaged.db"
    damaged.write_bytes(b"SQLite format 3\x00" + b"\x07" * 4000)
    with pytest.raises(StateFileError, match="is corrupt"):
        SqliteStateStore.open(damaged)
    assert damaged.read_bytes().startswith(b"SQLite format 3\x00\x07\x07")  # untouched
    foreign = tmp_path / "foreign.db"
    with sqlite3.connect(foreign) as other:
        other.execute("CREATE TABLE t (x)")
    other.close()
    with pytest.raises(StateFileError, match="not a keysvc state file"):
        SqliteStateStore.open(foreign)


async def test_a_large_batch_is_one_transaction_of_a_few_statements(tmp_path: Path) -> None:
    path = tmp_path / "state.db"
    seen: list[str] = []

    def connect(at: Path) -> sqlite3.Connection:
        connection = connect_database(at)
        connection.set_trace_callback(lambda sql: seen.append(sql.split()[0]))
        return connection

    store = SqliteStateStore.open(path, connect=connect)
    pool = KeyPool(store=store, models=ModelTable(), clock=ManualClock())
    secrets = [f"sk-state-many-{n:05d}-xxxxxxxxxxxx" for n in range(2_500)]
    for secret in secrets:
        pool.add_key(secret)
    seen.clear()
    await pool.flush()
    # 1024 + 1024 + 452 rows (the last statement padded to 512 by repeating a row).
    assert seen == ["BEGIN", "INSERT", "INSERT", "INSERT", "COMMIT"]
    rows = _rows(path)
    assert set(rows) == {hash_key(s) for s in secrets}
    pool.increment_usage(hash_key(secrets[-1]), "gpt-4o", 6)
    await pool.flush()
    assert json.loads(_rows(path)[hash_key(secrets[-1])]["token_usage"]) == {"gpt4o": 6}
    await store.close()


async def test_a_spend_limit_survives_a_restart_and_still_ends(tmp_path: Path) -> None:
    path = tmp_path / "state.db"
    secret = "sk-ant-state-spend"
    clock = ManualClock()
    pool = _pool(path, [secret], clock)
    pool.disable(hash_key(secret), DisableReason.QUOTA, until=clock.now() + 3600)
    await pool.flush()

    later = ManualClock(clock.now() + 600)
    again = _pool(path, [secret], later)
    key = again.key(hash_key(secret))
    assert key.is_over_quota and key.over_quota_until == clock.now() + 3600
    later.advance(3000)
    assert again.get("claude-sonnet-4-5") is key and not key.is_over_quota


def test_a_schema_1_file_gains_the_spend_limit_column(tmp_path: Path) -> None:
    path = tmp_path / "state.db"
    SqliteStateStore.open(path)  # written by this keysvc, then made a schema 1 file
    connection = sqlite3.connect(path)
    connection.execute("ALTER TABLE keys DROP COLUMN over_quota_until")
    connection.execute("PRAGMA user_version = 1")
    connection.commit()
    connection.close()
    pool = _pool(path, [A])
    pool.disable(hash_key(A), DisableReason.QUOTA, until=1_700_003_600.0)
    connection = sqlite3.connect(path)
    assert connection.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
    connection.execute("SELECT over_quota_until FROM keys")  # the column is there
    connection.close()
