"""The keys file: parsing, and syncing the pool on reload."""

from __future__ import annotations

from pathlib import Path

import pytest

from keysvc.clock import ManualClock
from keysvc.keys import DisableReason, hash_key
from keysvc.logs import TextFormatter
from keysvc.models import ModelTable
from keysvc.pool import KeyPool
from keysvc.reload import KeysFileError, KeysFileWatcher, read_keys_file
from keysvc.store import MemoryKeyStore

A, B, C, D = (f"sk-reload-{c * 20}" for c in "abcd")


def test_read_keys_file(tmp_path: Path) -> None:
    path = tmp_path / "keys"
    path.write_text(f"# pool one\n{A}\n\n   {B}   \n#{C}\n{A}\n")
    assert read_keys_file(path) == [A, B]


@pytest.mark.parametrize("line", [f"{A} {B}", f"{A},{B}", "sk-ünïcode"])
def test_malformed_line_names_the_line_not_the_key(tmp_path: Path, line: str) -> None:
    path = tmp_path / "keys"
    path.write_text(f"{C}\n{line}\n")
    with pytest.raises(KeysFileError, match="line 2 is not one key") as exc:
        read_keys_file(path)
    assert A not in str(exc.value) and C not in str(exc.value)


def _pool(secrets: list[str]) -> tuple[KeyPool, MemoryKeyStore]:
    store = MemoryKeyStore()
    pool = KeyPool(store=store, models=ModelTable(), clock=ManualClock())
    for secret in secrets:
        pool.add_key(secret)
    return pool, store


def test_sync_adds_removes_and_keeps_state() -> None:
    pool, store = _pool([A, B, C])
    pool.disable(hash_key(A), DisableReason.REVOKED)
    pool.increment_usage(hash_key(B), "gpt-4o", 5)
    pool.add_key(C, organization_id="org-x")  # a clone leaves with its parent
    added, removed = pool.sync_keys([A, B, D])
    assert (added, removed) == (1, 2)
    assert [k.hash for k in pool.keys()] == [hash_key(s) for s in (A, B, D)]
    assert pool.key(hash_key(A)).is_disabled
    assert pool.key(hash_key(B)).token_usage == {"gpt4o": 5}
    assert pool.key(hash_key(D)).last_checked == 0.0
    assert pool.available() == 2
    handed = {pool.get("gpt-4o").hash for _ in range(4)}
    assert hash_key(A) not in handed and hash_key(C) not in handed


async def test_malformed_file_keeps_the_old_pool(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "keys"
    path.write_text(f"{B}\n")
    pool, store = _pool([A, B])
    watcher = KeysFileWatcher(path, pool=pool, base_keys=[A])
    path.write_text(f"{B}\n{C} {D}\n")
    assert not await watcher.reload("test")
    assert [k.hash for k in pool.keys()] == [hash_key(A), hash_key(B)]
    logged = "\n".join(TextFormatter().format(r) for r in caplog.records)
    assert "keys file not reloaded" in logged and "line 2 is not one key" in logged
    assert C not in logged and D not in logged
    path.unlink()
    assert not await watcher.reload("test")
    assert len(pool) == 2
    path.write_text(f"{C}\n")
    assert await watcher.reload("test")
    assert [k.hash for k in pool.keys()] == [hash_key(A), hash_key(C)]  # A from OPENAI_KEY
