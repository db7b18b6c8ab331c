"""Keys from a file, reloaded on SIGHUP or when the file changes.

The keys file holds one key per line, OpenAI and Anthropic keys alike (a key's provider is told
by its prefix, `sk-ant-` for Anthropic); blank lines and lines starting with
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
from .pool import KeyPool, PoolBackend, as_backend

__all__ = ["KeysFileError", "KeysFileWatcher", "read_keys_file"]

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


class KeysFileWatcher:
    """Reloads the keys file when asked (SIGHUP) or when it changes on disk."""

    def __init__(
        self,
        path: Path,
        *,
        pool: PoolBackend | KeyPool,
        base_keys: Sequence[str],
        poll_seconds: float = POLL_SECONDS,
    ) -> None:
        self._path = path
        self._pool = as_backend(pool)
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
        synced = await self._pool.sync_keys([*self._base_keys, *file_keys])
        _log.info(
            "keys file reloaded",
            extra={
                "why": why,
                "added": synced.added,
                "removed": synced.removed,
                "keys": synced.keys,
            },
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
