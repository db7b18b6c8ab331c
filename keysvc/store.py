"""Where the pool's keys live.

The pool keeps its selection indexes in memory and reaches the key records only
through ``KeyStore``. ``MemoryKeyStore`` is the default; a store that persists
or shares state implements the same protocol (``keysvc.state.SqliteStateStore``),
and ``changed`` is its cue that a key must be written.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Protocol

from .keys import Key

__all__ = ["KeyStore", "MemoryKeyStore"]


class KeyStore(Protocol):
    """Key records by hash, in load order."""

    def get(self, key_hash: str) -> Key | None: ...

    def add(self, key: Key) -> None: ...

    def __iter__(self) -> Iterator[Key]: ...

    def __len__(self) -> int: ...

    def remove(self, key_hash: str) -> None:
        """Forgets the key; a persistent store may keep its state for when it returns."""
        ...

    def changed(self, key: Key) -> None:
        """Called after the pool has mutated ``key``."""
        ...

    async def flush(self) -> None:
        """Returns once every change reported so far is durable.

        Raises:
            keysvc.errors.StateWriteFailed: a persistent store could not write;
                the changes stay in memory and are written later.
        """
        ...


class MemoryKeyStore:
    """Keeps keys in a dict; nothing survives the process."""

    def __init__(self) -> None:
        self._keys: dict[str, Key] = {}

    def get(self, key_hash: str) -> Key | None:
        return self._keys.get(key_hash)

    def add(self, key: Key) -> None:
        if key.hash in self._keys:
            raise ValueError(f"key {key.hash} is already stored")
        self._keys[key.hash] = key

    def __iter__(self) -> Iterator[Key]:
        return iter(self._keys.values())

    def __len__(self) -> int:
        return len(self._keys)

    def remove(self, key_hash: str) -> None:
        del self._keys[key_hash]

    def changed(self, key: Key) -> None:
        """Nothing to write: the record is the stored object."""

    async def flush(self) -> None:
        """Nothing to write."""
