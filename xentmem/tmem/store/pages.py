"""Where a store's page data lives: the stored forms of a page, and the storage under them.

The store (:mod:`xentmem.tmem.store.core`) keeps the rules and the index; the bytes of each
page go through :class:`PageStorage`, so a page arena can take the place of
:class:`MemoryPages` without the rules changing.  How a page is kept is told by its length
alone (``docs/zcache.md``, "Storage"): ``b""`` is a zero page, 4096 bytes the page itself,
anything else an lz4 block without its size header.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Protocol, runtime_checkable

from lz4.block import compress, decompress

from xentmem.tmem.abi import PAGE_SIZE, ZERO_PAGE

#: A compressed page longer than this is kept raw (63 chunks of 64 bytes, zbud's largest).
POOR_COMPRESSION_LIMIT = 4032

#: A page's name in the storage: (store-wide pool id, oid word 0, 1, 2, index).
PageKey = tuple[int, int, int, int, int]

_EMPTY = b""


def pack_page(page: bytes) -> bytes:
    """The stored form of a 4096-byte page: ``b""`` if zero, lz4 if it saves, else the page."""
    if page == ZERO_PAGE:
        return _EMPTY
    block = compress(page, store_size=False)
    if len(block) > POOR_COMPRESSION_LIMIT:
        return page if type(page) is bytes else bytes(page)
    return block


def unpack_page(data: bytes) -> bytes:
    """The 4096-byte page a stored form stands for.

    ValueError for an lz4 block that decodes to fewer bytes (``uncompressed_size`` only
    bounds the output): a stored form may come from elsewhere (a shared pool's value in
    RAMster's cluster is written by other hosts), and a page is never shorter than a page.
    """
    size = len(data)
    if size == PAGE_SIZE:
        return data
    if size:
        page = decompress(data, uncompressed_size=PAGE_SIZE)
        if len(page) != PAGE_SIZE:
            raise ValueError(f"an lz4 page decodes to {len(page)} bytes, not {PAGE_SIZE}")
        return page
    return ZERO_PAGE


class PageStorageFull(Exception):
    """The storage has no room for a page, whatever the store's capacity says."""


@runtime_checkable
class PageStorage(Protocol):
    """The bytes of each stored page, by key; the store decides what may be kept.

    ``put`` stores a key the storage does not hold (the store deletes a page before it puts
    its replacement) and may raise :class:`PageStorageFull`; ``get`` answers None for a key
    it does not hold (a page lost or damaged: the store reports it missing and forgets it);
    ``delete`` forgets a key it holds (the store never asks for one ``get`` said was not
    there); ``keys`` lists every key held (to rebuild an index); ``counters`` are figures for
    stats.
    """

    def put(self, key: PageKey, data: bytes) -> None: ...

    def get(self, key: PageKey) -> bytes | None: ...

    def delete(self, key: PageKey) -> None: ...

    def keys(self) -> Iterator[PageKey]: ...

    def counters(self) -> dict[str, int]: ...


class MemoryPages:
    """:class:`PageStorage` in this process's memory: one dict, one ``bytes`` per page.

    ``put``, ``get`` and ``delete`` are the dict's own methods, bound per instance: the store
    calls them on every op, and a Python-level method around each would double their cost.
    """

    def __init__(self) -> None:
        self._pages: dict[PageKey, bytes] = {}
        self.put = self._pages.__setitem__  # type: ignore[method-assign]
        self.get = self._pages.get  # type: ignore[method-assign]
        self.delete = self._pages.__delitem__  # type: ignore[method-assign]

    def put(self, key: PageKey, data: bytes) -> None:  # bound per instance in __init__
        self._pages[key] = data

    def get(self, key: PageKey) -> bytes | None:  # bound per instance in __init__
        return self._pages.get(key)

    def delete(self, key: PageKey) -> None:  # bound per instance in __init__
        del self._pages[key]

    def take(self, key: PageKey) -> bytes | None:
        """``get`` and ``delete`` in one (an exclusive get); None if not held."""
        return self._pages.pop(key, None)

    def keys(self) -> Iterator[PageKey]:
        return iter(list(self._pages))

    def counters(self) -> dict[str, int]:
        return {"storage_pages": len(self._pages),
                "storage_bytes": sum(map(len, self._pages.values()))}


__all__ = [
    "POOR_COMPRESSION_LIMIT",
    "MemoryPages",
    "PageKey",
    "PageStorage",
    "PageStorageFull",
    "pack_page",
    "unpack_page",
]
