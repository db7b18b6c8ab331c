"""The state file: what is kept, how it is written, how bad files are refused."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest

from keysvc.clock import ManualClock
from keysvc.keys import DisableReason, hash_key
from keysvc.models import GPT4_32K, ModelTable
from keysvc.pool import KeyPool
from keysvc.reload import restore_clones
from keysvc.state import FileStateStore, StateFileError

A, B, C = "sk-state-aaaaaaaaaaaaaaaaaaaa", "sk-state-bbbbbbbbbbbbbbbbbbbb", "sk-state-cccccccccccc"


def _pool(path: Path, secrets: list[str], clock: ManualClock | None = None) -> KeyPool:
    store = FileStateStore.open(path)
    pool = KeyPool(store=store, models=ModelTable(), clock=clock or ManualClock())
    for secret in secrets:
        pool.add_key(secret)
    restore_clones(pool, store)
    return pool


async def test_state_survives_a_new_pool(tmp_path: Path) -> None:
    path = tmp_path / "state.json"
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
    path = tmp_path / "state.json"
    pool = _pool(path, [A, B])
    pool.disable(hash_key(A), DisableReason.REVOKED)
    await pool.flush()
    text = path.read_text()
    assert A not in text and B not in text
    assert "sk-" not in text
    assert path.stat().st_mode & 0o077 == 0
    assert not list(tmp_path.glob(".*tmp"))


async def test_families_trial_and_org_clones_are_kept(tmp_path: Path) -> None:
    path = tmp_path / "state.json"
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
    assert A not in path.read_text()

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
    path = tmp_path / "state.json"
    pool = _pool(path, [A, B])
    pool.disable(hash_key(A), DisableReason.REVOKED)
    await pool.flush()

    without_a = _pool(path, [B])
    assert [k.hash for k in without_a.keys()] == [hash_key(B)]
    await without_a.flush()
    assert hash_key(A) in json.loads(path.read_text())["keys"]

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
    path = tmp_path / "state.json"
    path.write_bytes(content)
    with pytest.raises(StateFileError, match="is corrupt.*--ignore-state"):
        FileStateStore.open(path)
    assert path.read_bytes() == content  # never silently reset


def test_ignore_state_moves_the_corrupt_file_aside(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "state.json"
    path.write_bytes(b"{broken")
    store = FileStateStore.open(path, ignore_corrupt=True)
    assert len(store) == 0
    assert not path.exists()
    (aside,) = tmp_path.glob("state.json.corrupt-*")
    assert aside.read_bytes() == b"{broken"
    assert any(
        r.levelname == "ERROR" and "IGNORING THE STATE FILE" in r.getMessage()
        for r in caplog.records
    )


def test_unreadable_file_refuses_to_start(tmp_path: Path) -> None:
    path = tmp_path / "state.json"
    path.mkdir()  # a directory cannot be read as a file, even by root
    with pytest.raises(StateFileError, match="cannot read"):
        FileStateStore.open(path)


async def test_batched_writes_and_shared_flushes(tmp_path: Path) -> None:
    path = tmp_path / "state.json"
    store = FileStateStore(path, batch_seconds=0.05)
    pool = KeyPool(store=store, models=ModelTable(), clock=ManualClock())
    pool.add_key(A)
    store.start()
    try:
        pool.increment_usage(hash_key(A), "gpt-4o", 3)
        assert not path.exists()  # not written at once...
        for _ in range(100):  # ...but within the batch window
            if path.exists():
                break
            await asyncio.sleep(0.02)
        record = json.loads(path.read_text())["keys"][hash_key(A)]
        assert record["token_usage"] == {"gpt4o": 3}
    finally:
        await store.close()


async def test_removed_key_state_is_kept_for_its_return(tmp_path: Path) -> None:
    path = tmp_path / "state.json"
    pool = _pool(path, [A, B])
    pool.increment_usage(hash_key(A), "gpt-4o", 11)
    removed = pool.remove_key(hash_key(A))
    assert removed is not None and len(pool) == 1 and pool.available() == 1
    back = pool.add_key(A)
    assert back is not None and back.token_usage == {"gpt4o": 11}
