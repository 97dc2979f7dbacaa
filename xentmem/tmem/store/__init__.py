"""One tmem store with the hypervisor's rules, for both tmem hosts (``zcache``, ``xentmem-hostd``).

``core``: :class:`TmemStore`, the ops and rules; ``records``: pools, clients, counters;
``eviction``: whose ephemeral page goes; ``pages``: the stored forms of a page and the
storage that keeps them (:class:`PageStorage`, :class:`MemoryPages`); ``arena_pages``: the
storage in a page arena that outlives the process (:class:`ArenaPages`).  The rules and their
sources: ``docs/tmem-semantics.md``, "The store".
"""

from xentmem.tmem.store.arena_pages import ArenaPages
from xentmem.tmem.store.core import (
    EPHEMERAL_PAGE_OVERHEAD,
    MAX_AUTH_UUIDS,
    MAX_WEIGHT,
    OBJECT_OVERHEAD,
    PERSISTENT_PAGE_OVERHEAD,
    TmemStore,
)
from xentmem.tmem.store.pages import (
    POOR_COMPRESSION_LIMIT,
    MemoryPages,
    PageKey,
    PageStorage,
    PageStorageFull,
    pack_page,
    unpack_page,
)
from xentmem.tmem.store.records import Client, ClientCounters, Pool

__all__ = [
    "EPHEMERAL_PAGE_OVERHEAD",
    "MAX_AUTH_UUIDS",
    "MAX_WEIGHT",
    "OBJECT_OVERHEAD",
    "PERSISTENT_PAGE_OVERHEAD",
    "POOR_COMPRESSION_LIMIT",
    "ArenaPages",
    "Client",
    "ClientCounters",
    "MemoryPages",
    "PageKey",
    "PageStorage",
    "PageStorageFull",
    "Pool",
    "TmemStore",
    "pack_page",
    "unpack_page",
]
