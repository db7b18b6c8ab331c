"""Keys from a file, reloaded on SIGHUP or when the file changes.

The keys file holds one key per line; blank lines and lines starting with
``#`` are ignored. Its keys join those of OPENAI_KEY. On reload, new keys join
the pool unchecked, keys no longer configured leave it (with their
organization clones), and keys kept keep all their state. A file that cannot
be read or holds a malformed line leaves the pool as it was, and the log says
which line (never what the line holds: it may be a secret).
"""

from __future__ import annotations

import asyncio
import logging
import os
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Final

from .config import ConfigError
from .keys import hash_key
from .pool import KeyPool
from .store import KeyStore

__all__ = ["KeysFileError", "KeysFileWatcher", "read_keys_file", "restore_clones", "sync_keys"]

_log = logging.getLogger("keysvc.reload")

#: How often the file's modification time, size and inode are looked at.
POLL_SECONDS: Final = 1.0
#: One key per line: printable ASCII (0x21-0x7E) except the comma. A regex, not a
#: per-character check: the latter took half a second of start-up at 100k keys.
_KEY_LINE: Final = re.compile(r"[!-+\--~]+")


class KeysFileError(ConfigError):
    """The keys file cannot be read or has a malformed line."""


def read_keys_file(path: Path) -> list[str]:
    """The keys in ``path``: trimmed, de-duplicated, in order.

    Raises:
        KeysFileError: the file cannot be read, or a line is not a single
            token of printable ASCII (for instance two keys on one line).
    """
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise KeysFileError(f"KEYSVC_KEYS_FILE: cannot read {path}: {exc}") from exc
    keys: list[str] = []
    for number, line in enumerate(text.splitlines(), start=1):
        token = line.strip()
        if not token or token.startswith("#"):
            continue
        if not _KEY_LINE.fullmatch(token):
            raise KeysFileError(
                f"KEYSVC_KEYS_FILE: {path} line {number} is not one key"
                " (expected one key per line, printable ASCII, no spaces or commas)"
            )
        keys.append(token)
    return list(dict.fromkeys(keys))


def restore_clones(pool: KeyPool, store: KeyStore) -> int:
    """Rebuilds the organization clones the store remembers whose parent is in the pool."""
    saved_clones = getattr(store, "saved_clones", None)
    if saved_clones is None:
        return 0
    restored = 0
    for parent_hash, organization_id in saved_clones():
        if store.get(parent_hash) is None or not organization_id:
            continue
        if pool.clone_for_org(parent_hash, organization_id) is not None:
            restored += 1
    return restored


def sync_keys(pool: KeyPool, store: KeyStore, secrets: Sequence[str]) -> tuple[int, int]:
    """Makes the pool's configured keys exactly ``secrets``; kept keys are not touched.

    Returns:
        How many keys were added and removed (clones included).
    """
    wanted = dict.fromkeys(secrets)
    removed = 0
    for key in pool.keys():
        if key.secret not in wanted:
            pool.remove_key(key.hash)
            removed += 1
    added = 0
    for secret in wanted:
        if store.get(hash_key(secret)) is None and pool.add_key(secret) is not None:
            added += 1
    added += restore_clones(pool, store)
    return added, removed


class KeysFileWatcher:
    """Reloads the keys file when asked (SIGHUP) or when it changes on disk."""

    def __init__(
        self,
        path: Path,
        *,
        pool: KeyPool,
        store: KeyStore,
        base_keys: Sequence[str],
        poll_seconds: float = POLL_SECONDS,
    ) -> None:
        self._path = path
        self._pool = pool
        self._store = store
        self._base_keys = tuple(base_keys)
        self._poll_seconds = poll_seconds
        self._seen = self._stat()
        self._requested = asyncio.Event()

    def _stat(self) -> tuple[int, int, int] | None:
        try:
            st = os.stat(self._path)
        except OSError:
            return None
        return (st.st_mtime_ns, st.st_size, st.st_ino)

    def request_reload(self) -> None:
        """Asks for a reload soon (safe to call from a signal handler on the loop)."""
        self._requested.set()

    async def reload(self, why: str) -> bool:
        """Reads the file and syncs the pool; False (old pool kept) when the file is bad."""
        self._seen = self._stat()
        try:
            file_keys = await asyncio.to_thread(read_keys_file, self._path)
        except KeysFileError as exc:
            _log.error(
                "keys file not reloaded; keeping the current keys",
                extra={"why": why, "problem": str(exc)},
            )
            return False
        added, removed = sync_keys(self._pool, self._store, [*self._base_keys, *file_keys])
        _log.info(
            "keys file reloaded",
            extra={"why": why, "added": added, "removed": removed, "keys": len(self._pool)},
        )
        return True

    async def run(self) -> None:
        """Polls the file and serves reload requests until cancelled."""
        while True:
            try:
                await asyncio.wait_for(self._requested.wait(), self._poll_seconds)
            except TimeoutError:
                pass
            if self._requested.is_set():
                self._requested.clear()
                await self.reload("SIGHUP")
            elif self._stat() != self._seen:
                await self.reload("file changed")
