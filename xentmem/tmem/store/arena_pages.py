"""A store's pages in a page arena: :class:`PageStorage` over :class:`~xentmem.tmem.arena.Arena`.

The store names a page ``(store-wide pool id, oid word 0, 1, 2, index)``; the arena
``(pool, (oid words), index)``: the same numbers, regrouped.  The arena is not thread-safe;
the store calls its storage only under its own lock (every ``put``, ``get`` and ``delete``
is inside :class:`~xentmem.tmem.store.TmemStore`'s lock), and ``keys``, ``counters`` and
``slack`` are for the owner to call under that lock too.  Why a file and where it lives:
``docs/page-arena.md``.
"""

from __future__ import annotations

import os
import weakref
from collections.abc import Iterator
from typing import Any

from xentmem.errors import ArenaError
from xentmem.tmem.arena import Arena
from xentmem.tmem.store.pages import PageKey, PageStorageFull


class ArenaPages:
    """:class:`~xentmem.tmem.store.PageStorage` in an open :class:`Arena`, which it owns."""

    def __init__(self, arena: Arena) -> None:
        self.arena = arena
        # A storage dropped without close() (a backend never removed, a test) still lets go
        # of the file's descriptor, lock and map: the arena holds them as a plain fd.
        self._closer = weakref.finalize(self, arena.close)
        self._put = arena.put
        self._get = arena.get
        self._delete = arena.delete
        self._take = arena.take

    @classmethod
    def open(cls, path: str | os.PathLike[str], **arena_args: Any) -> ArenaPages:
        """The arena at ``path`` (made if missing, rebuilt if there): ``Arena.open``'s args."""
        return cls(Arena.open(path, **arena_args))

    def put(self, key: PageKey, data: bytes) -> None:
        pool, w0, w1, w2, index = key
        try:
            self._put((pool, (w0, w1, w2), index), data)
        except ArenaError as exc:  # full, or tmpfs has no memory left: the key holds nothing
            raise PageStorageFull(str(exc)) from None

    def get(self, key: PageKey) -> bytes | None:
        pool, w0, w1, w2, index = key
        return self._get((pool, (w0, w1, w2), index))

    def delete(self, key: PageKey) -> None:
        pool, w0, w1, w2, index = key
        self._delete((pool, (w0, w1, w2), index))

    def take(self, key: PageKey) -> bytes | None:
        """``get`` and ``delete`` in one lookup (an exclusive get)."""
        pool, w0, w1, w2, index = key
        return self._take((pool, (w0, w1, w2), index))

    def keys(self) -> Iterator[PageKey]:
        """Every key held, listed first (the caller may change the arena while it iterates)."""
        return iter([(pool, oid[0], oid[1], oid[2], index)
                     for pool, oid, index in self.arena.keys()])  # noqa: SIM118

    def sized_keys(self) -> list[tuple[PageKey, int]]:
        """Every key held with its stored length, in one pass over the arena's records."""
        return [((pool, oid[0], oid[1], oid[2], index), size)
                for pool, oid, index, size in self.arena.sized_keys()]

    def sized_objects(self) -> Iterator[tuple[int, int, int, int, dict[int, int]]]:
        """Every object held: (pool, oid words, {index: stored length}), one per object."""
        return self.arena.sized_objects()

    def size_of(self, key: PageKey) -> int | None:
        pool, w0, w1, w2, index = key
        return self.arena.size_of((pool, (w0, w1, w2), index))

    def slack(self) -> int:
        """Bytes of memory the arena holds beyond the pages' own bytes (the allocator's
        rounding, its frame headers, free frames not yet given back, the index): what a
        capacity must count on top of the data."""
        arena = self.arena
        return max(0, arena.footprint() - arena.stored_bytes)

    def trim(self) -> int:
        """Give the memory of the arena's free frames back; the bytes given back."""
        return self.arena.trim()

    def counters(self) -> dict[str, int]:
        arena = self.arena
        return {"storage_pages": len(arena), "storage_bytes": arena.stored_bytes,
                "storage_footprint": arena.footprint(),
                "storage_checksum_failures": arena.checksum_failures}

    def close(self) -> None:
        """Unmap the arena; the file keeps every page for the next open."""
        self._closer()

    def discard(self) -> None:
        """Close and remove the file (its pages were repatriated, or are not wanted)."""
        self._closer.detach()
        self.arena.discard()


__all__ = ["ArenaPages"]
